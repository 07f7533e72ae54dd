package main

import (
	"context"
	"fmt"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
	"github.com/shim-run/shim/table"
)

func (a *app) resizeCmd() *cobra.Command {
	var cpu, mem, pids string
	var force, move bool
	cmd := &cobra.Command{
		Use:   "resize ID [--cpu MIN[:MAX[:BURST]]] [--mem MIN[:MAX]] [--pids N] [--force] [--move]",
		Short: "Change a process's resource bounds",
		Long: "Change a process's resource bounds. Only the values given change: --cpu :2 sets\n" +
			"just the CPU max, --cpu 1: just the min, and --cpu 1 both (a fixed size). The process keeps running under the same PID, with the new\n" +
			"bounds applied to its cgroup in place. If its node cannot hold the new minimum,\n" +
			"the resize is refused, or with --move the process moves make-before-break to a\n" +
			"node that can: a new copy starts there with the new bounds (new PID) and the old\n" +
			"one stops once the new one runs; watch it with shim ps. Prints the new bounds\n" +
			"(and move-to=NODE while a move is under way).",
		Args: exactArgs(1, "one process ID"),
		RunE: func(cmd *cobra.Command, args []string) error {
			r := &pb.Resources{}
			var err error
			set := cmd.Flags().Changed
			if set("cpu") {
				if r.CpuMinMilli, r.CpuMaxMilli, r.CpuBurstMilli, err = parseCPU(cpu); err != nil {
					return flagError("cpu", cpu, err)
				}
			}
			if set("mem") {
				if r.MemMinBytes, r.MemMaxBytes, err = parseMem(mem); err != nil {
					return flagError("mem", mem, err)
				}
			}
			if set("pids") {
				if r.PidsMax, err = parsePids(pids); err != nil {
					return flagError("pids", pids, err)
				}
			}
			if !set("cpu") && !set("mem") && !set("pids") {
				return usagef("nothing to change: give --cpu, --mem or --pids")
			}
			var rec *pb.ProcessRecord
			err = a.call(cmd.Context(), func(ctx context.Context, c shimv1connect.ShimServiceClient) error {
				req := &pb.ResizeRequest{Id: args[0], Resources: r, Force: force, Move: move}
				resp, err := c.Resize(ctx, connect.NewRequest(req))
				if err == nil {
					rec = resp.Msg.GetProcess()
				}
				return err
			})
			if err != nil {
				return err
			}
			fmt.Fprintln(a.out, boundsLine(rec))
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&cpu, "cpu", "", "CPU in cores: `MIN[:MAX[:BURST]]`; empty parts keep their value")
	f.StringVar(&mem, "mem", "", "memory `MIN[:MAX]` with K, M, G or T units; empty parts keep their value")
	f.StringVar(&pids, "pids", "", "maximum number of processes and threads `N`")
	f.BoolVar(&force, "force", false, "allow a max below current use")
	f.BoolVar(&move, "move", false, "move the process if its node cannot hold the new min")
	return cmd
}

// boundsLine renders a process's bounds in flag syntax:
// "ID cpu=0.5:1:2 mem=64M:128M pids=100 node=n1", "-" for unset, and
// " move-to=n2" while the process moves.
func boundsLine(rec *pb.ProcessRecord) string {
	r := rec.GetSpec().GetResources()
	c := func(m int64) string { return orDash(m, table.Cores) }
	b := func(n int64) string { return orDash(n, table.Bytes) }
	line := fmt.Sprintf("%s cpu=%s:%s:%s mem=%s:%s pids=%s node=%s", rec.GetId(),
		c(r.GetCpuMinMilli()), c(r.GetCpuMaxMilli()), c(r.GetCpuBurstMilli()),
		b(r.GetMemMinBytes()), b(r.GetMemMaxBytes()), orDash(r.GetPidsMax(), itoa), dash(rec.GetNode()))
	if m := rec.GetMoveTo(); m != "" {
		line += " move-to=" + m
	}
	return line
}
