package main

import (
	"context"
	"fmt"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

func (a *app) updateCmd() *cobra.Command {
	var cpu, mem string
	var env []string
	var parallel int
	var healthyTimeout, minHealthy time.Duration
	cmd := &cobra.Command{
		Use:   "update NAME [--cpu ..] [--mem ..] [--env K=V]... [--parallel K] [-- NEWCMD [ARG...]]",
		Short: "Replace a service's replicas with a new command or bounds, a few at a time",
		Long: "Replace a service's replicas, --parallel at a time (default 1), make-before-break: a\n" +
			"new copy of each replica starts (same SHIM_REPLICA) and the old one stops only once\n" +
			"the new one is healthy (its check passes, or without a check it ran --min-healthy\n" +
			"without restarting). If a new copy fails or is not healthy within --healthy-timeout,\n" +
			"the update stops and rolls back every replica it replaced, and says so (exit 1).",
		Example: "  shim update web --env VERSION=2 -- python3 -m http.server $PORT",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 1 {
				return usagef("update needs a service name (usage: %s)", usageLine(cmd))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			req := &pb.UpdateRequest{Name: args[0], Command: args[1:], Env: env,
				HealthyTimeoutMillis: healthyTimeout.Milliseconds(), MinHealthyMillis: minHealthy.Milliseconds()}
			if parallel < 1 || parallel > 1000 {
				return flagError("parallel", fmt.Sprint(parallel), fmt.Errorf("must be 1-1000"))
			}
			req.Parallel = uint32(parallel)
			if healthyTimeout < 0 || minHealthy < 0 {
				return usagef("--healthy-timeout and --min-healthy must not be negative")
			}
			f := cmd.Flags()
			if f.Changed("cpu") || f.Changed("mem") {
				req.Resources = &pb.Resources{}
				var err error
				if f.Changed("cpu") {
					if req.Resources.CpuMinMilli, req.Resources.CpuMaxMilli, req.Resources.CpuBurstMilli, err = parseCPU(cpu); err != nil {
						return flagError("cpu", cpu, err)
					}
				}
				if f.Changed("mem") {
					if req.Resources.MemMinBytes, req.Resources.MemMaxBytes, err = parseMem(mem); err != nil {
						return flagError("mem", mem, err)
					}
				}
			}
			return a.callTimeout(cmd.Context(), 0, func(ctx context.Context, c shimv1connect.ShimServiceClient) error {
				s, err := c.Update(ctx, connect.NewRequest(req))
				if err != nil {
					return err
				}
				defer s.Close()
				for s.Receive() {
					fmt.Fprintln(a.out, s.Msg().GetMessage())
				}
				return s.Err()
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&cpu, "cpu", "", "new CPU `MIN[:MAX[:BURST]]`")
	f.StringVar(&mem, "mem", "", "new memory `MIN[:MAX]`")
	f.StringArrayVarP(&env, "env", "e", nil, "set environment variable `K=V` (repeatable)")
	f.IntVar(&parallel, "parallel", 1, "replicas replaced at once `K`")
	f.DurationVar(&healthyTimeout, "healthy-timeout", 60*time.Second, "a new copy not healthy within this `DURATION` fails the update")
	f.DurationVar(&minHealthy, "min-healthy", 2*time.Second, "without a check: a new copy running this `DURATION` counts as healthy")
	return cmd
}
