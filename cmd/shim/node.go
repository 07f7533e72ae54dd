package main

import (
	"context"
	"fmt"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

// shim node rm: remove a node for good.

func (a *app) nodeCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "node",
		Short: "Manage one node (rm)",
		Args:  noArgs,
		RunE:  func(cmd *cobra.Command, args []string) error { return cmd.Help() },
	}
	cmd.AddCommand(a.nodeRmCmd())
	return cmd
}

func (a *app) nodeRmCmd() *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:   "rm NODE [--force]",
		Short: "Remove a node from the cluster for good (admin)",
		Long: "Remove a node from the cluster for good: its record, its Raft vote if it is a server,\n" +
			"and its processes, which are placed on other nodes. A node that is up is refused\n" +
			"unless --force: stop its shimd first (a shimd still running registers again).",
		Args: exactArgs(1, "one node name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			var moved []string
			err := a.call(cmd.Context(), func(ctx context.Context, c shimv1connect.ShimServiceClient) error {
				resp, err := c.RemoveNode(ctx, connect.NewRequest(&pb.RemoveNodeRequest{Node: args[0], Force: force}))
				if err == nil {
					moved = resp.Msg.GetMoved()
				}
				return err
			})
			if err != nil {
				return err
			}
			if len(moved) == 0 {
				fmt.Fprintf(a.out, "removed %s\n", args[0])
				return nil
			}
			fmt.Fprintf(a.out, "removed %s; %d processes placed elsewhere\n", args[0], len(moved))
			return nil
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "remove the node even while it is up")
	return cmd
}
