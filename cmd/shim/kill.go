package main

import (
	"context"
	"fmt"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

func (a *app) killCmd() *cobra.Command {
	var sig string
	cmd := &cobra.Command{
		Use:   "kill [--signal SIG] ID...",
		Short: "Stop processes",
		Long: "Stop processes: send them SIG (default TERM) and do not restart them. IDs may\n" +
			"be exact ids, unique id prefixes or names. Prints the ids of the processes killed.",
		Args: minArgs(1, "at least one process ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			var signal int32
			if cmd.Flags().Changed("signal") {
				var err error
				if signal, err = parseSignal(sig); err != nil {
					return flagError("signal", sig, err)
				}
			}
			var recs []*pb.ProcessRecord
			// Kill is idempotent: retried while answers are lost (retry.go).
			err := a.callRetry(cmd.Context(), "the kill may or may not have been made", func(ctx context.Context, c shimv1connect.ShimServiceClient) error {
				resp, err := c.Kill(ctx, connect.NewRequest(&pb.KillRequest{Ids: args, Signal: signal}))
				if err == nil {
					recs = resp.Msg.GetProcesses()
				}
				return err
			})
			if err != nil {
				return err
			}
			for _, r := range recs {
				fmt.Fprintln(a.out, r.GetId())
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&sig, "signal", "s", "TERM", "`SIG` to send: a name (TERM, SIGKILL, int) or number")
	return cmd
}
