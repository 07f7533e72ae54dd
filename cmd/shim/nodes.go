package main

import (
	"context"
	"fmt"
	"io"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

func (a *app) nodesCmd() *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "nodes [-o table|json]",
		Short: "List the cluster's nodes",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := outputFormat(output, "table", "json"); err != nil {
				return err
			}
			resp, err := a.nodesResp(cmd.Context())
			if err != nil {
				return err
			}
			nodes := resp.GetNodes()
			if output == "json" {
				views := make([]nodeJSON, 0, len(nodes))
				for _, n := range nodes {
					views = append(views, nodeView(n))
				}
				if a.stale {
					return a.writeStaleJSON(a.out, resp.GetStaleness(), "nodes", func(w io.Writer) error {
						return writeJSON(w, views)
					})
				}
				return writeJSON(a.out, views)
			}
			return writeNodeTable(a.out, nodes)
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output `FORMAT`: table or json")
	return cmd
}

// drainCmd builds `shim drain` or, with undrain, `shim undrain`.
func (a *app) drainCmd(undrain bool) *cobra.Command {
	use, short := "drain NODE", "Stop placing new processes on a node"
	if undrain {
		use, short = "undrain NODE", "Let a drained node take new processes again"
	}
	return &cobra.Command{
		Use:   use,
		Short: short,
		Args:  exactArgs(1, "one node name"),
		RunE: func(cmd *cobra.Command, args []string) error {
			var node *pb.NodeRecord
			err := a.call(cmd.Context(), func(ctx context.Context, c shimv1connect.ShimServiceClient) error {
				resp, err := c.Drain(ctx, connect.NewRequest(&pb.DrainRequest{Node: args[0], Undrain: undrain}))
				if err == nil {
					node = resp.Msg.GetNode()
				}
				return err
			})
			if err != nil {
				return err
			}
			name := node.GetName()
			if name == "" {
				name = args[0]
			}
			if node == nil {
				fmt.Fprintln(a.out, name)
				return nil
			}
			fmt.Fprintf(a.out, "%s %s\n", name, nodeStateText(node))
			return nil
		},
	}
}
