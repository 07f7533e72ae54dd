package main

import (
	"context"
	"errors"
	"sync"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

func (a *app) logsCmd() *cobra.Command {
	var follow bool
	var tail string
	cmd := &cobra.Command{
		Use:   "logs [-f] [--tail BYTES] ID",
		Short: "Print a process's output",
		Long: "Print a process's output (stdout and stderr). With -f, keep printing new output\n" +
			"until Ctrl-C.",
		Args: exactArgs(1, "one process ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := &pb.LogsRequest{Id: args[0], Follow: follow}
			if cmd.Flags().Changed("tail") {
				n, err := parseBytes(tail)
				if err != nil {
					return flagError("tail", tail, err)
				}
				req.TailBytes = n
			}
			return a.logs(cmd.Context(), req)
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new output until Ctrl-C")
	cmd.Flags().StringVar(&tail, "tail", "", "print only the last `BYTES` (K, M, G units)")
	return cmd
}

// logs copies the log stream to stdout. The stream has no overall deadline;
// without -f it fails if no data arrives for --timeout.
func (a *app) logs(ctx context.Context, req *pb.LogsRequest) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var idle *time.Timer
	var timedOut bool
	var mu sync.Mutex
	if !req.Follow && a.timeout > 0 {
		idle = time.AfterFunc(a.timeout, func() {
			mu.Lock()
			timedOut = true
			mu.Unlock()
			cancel()
		})
		defer idle.Stop()
	}
	// Open the stream and read its first message under failover; after that
	// the address is committed.
	var stream *connect.ServerStreamForClient[pb.LogsChunk]
	var got bool
	err := a.callTimeout(ctx, 0, func(ctx context.Context, c shimv1connect.ShimServiceClient) error {
		s, err := c.Logs(ctx, connect.NewRequest(req))
		if err != nil {
			return err
		}
		if got = s.Receive(); !got && s.Err() != nil {
			err := s.Err()
			s.Close()
			return err
		}
		stream = s
		return nil
	})
	if err == nil {
		defer stream.Close()
		for got {
			if idle != nil {
				idle.Reset(a.timeout)
			}
			if _, err := a.out.Write(stream.Msg().GetData()); err != nil {
				return err
			}
			got = stream.Receive()
		}
		err = srvErr(stream.Err())
	}
	mu.Lock()
	defer mu.Unlock()
	switch {
	case err == nil:
		return nil
	case timedOut:
		return errors.New("no log data within " + a.timeout.String())
	case ctx.Err() != nil && req.Follow:
		return nil // Ctrl-C ends -f
	}
	return err
}
