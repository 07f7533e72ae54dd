package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
	"github.com/shim-run/shim/table"
)

type spawnOptions struct {
	name, cpu, mem, pids, restart, node, isolation, network, user, rootfs, dir string
	requestID                                                                  string
	count                                                                      int
	env, mounts                                                                []string
	wait                                                                       bool
	grow                                                                       growFlags // grow.go
}

func (a *app) spawnCmd() *cobra.Command {
	var o spawnOptions
	cmd := &cobra.Command{
		Use:   "spawn [flags] -- CMD [ARG...]",
		Short: "Start a process on the cluster and print its ID",
		Long: "Start a process on the cluster and print its ID (one per line with --count).\n" +
			"Flags after the command belong to the command; use -- to be explicit.",
		Example: "  shim spawn --name web --cpu 0.5:1 --mem 64M:256M -- python3 -m http.server",
		RunE: func(cmd *cobra.Command, args []string) error {
			spec, err := o.spec(cmd.Flags(), args)
			if err != nil {
				return err
			}
			rid := o.requestID
			if rid == "" {
				rid = a.newRequestID()
			} else if err := table.ValidateRequestID(rid); err != nil {
				return flagError("request-id", rid, errors.New(strings.TrimPrefix(err.Error(), table.ErrInvalid.Error()+": ")))
			}
			return a.spawn(cmd.Context(), spec, uint32(o.count), o.wait, rid)
		},
	}
	f := cmd.Flags()
	f.SetInterspersed(false)
	f.StringVar(&o.name, "name", "", "process `NAME` (letters, digits, '.', '_', '-')")
	f.StringVar(&o.cpu, "cpu", "", "CPU in cores: `MIN[:MAX[:BURST]]` (e.g. 0.5:1:2)")
	f.StringVar(&o.mem, "mem", "", "memory `MIN[:MAX]` with K, M, G or T (binary) units")
	f.StringVar(&o.pids, "pids", "", "maximum number of processes and threads `N`")
	f.StringVar(&o.restart, "restart", "", "restart `POLICY`: always, on-failure (default) or never")
	f.StringArrayVarP(&o.env, "env", "e", nil, "environment variable `K=V` (repeatable)")
	f.StringVar(&o.node, "node", "", "run on `NODE`")
	f.IntVar(&o.count, "count", 1, "number of replicas `N`")
	f.BoolVar(&o.wait, "wait", false, "wait until the process is running (up to --timeout); fail if it does not start")
	f.StringVar(&o.isolation, "isolation", "", "isolation `MODE`: process (default), container, vm, or host (admin: no sandbox)")
	f.StringVar(&o.network, "net", "", "network `MODE`: host (default) or none")
	f.StringVar(&o.user, "user", "", "run as `UID[:GID]` (default nobody; 0 needs an admin token)")
	f.StringVar(&o.rootfs, "rootfs", "", "root file system `NAME[/SUB]`: a host path the node declares, or a folder in it (container isolation)")
	f.StringVar(&o.dir, "dir", "", "working `DIR` in the sandbox: /work (the default), /tmp, a mount, or in one of them")
	f.StringArrayVar(&o.mounts, "mount", nil, "mount the node's host path NAME at PATH: `NAME:PATH[:ro]` (repeatable; the node declares NAME with shimd --host-path)")
	f.StringVar(&o.requestID, "request-id", "", "spawn at most once under this `ID` (default: a random one; retries reuse it)")
	o.grow.add(f)
	return cmd
}

// spec builds and validates the process spec from the flags and command.
func (o *spawnOptions) spec(flags *pflag.FlagSet, args []string) (*pb.ProcessSpec, error) {
	if len(args) == 0 || args[0] == "" {
		return nil, usagef("missing command (usage: shim spawn [flags] -- CMD [ARG...])")
	}
	if o.count < 1 || o.count > table.MaxSpawnIDs {
		return nil, flagError("count", fmt.Sprint(o.count), fmt.Errorf("must be 1-%d", table.MaxSpawnIDs))
	}
	s := &pb.ProcessSpec{
		Name: o.name, Command: args, Env: o.env, Node: o.node, Dir: o.dir, Rootfs: o.rootfs,
		Resources: &pb.Resources{},
	}
	r := s.Resources
	var err error
	set := flags.Changed
	if set("cpu") {
		if r.CpuMinMilli, r.CpuMaxMilli, r.CpuBurstMilli, err = parseCPU(o.cpu); err != nil {
			return nil, flagError("cpu", o.cpu, err)
		}
	}
	if set("mem") {
		if r.MemMinBytes, r.MemMaxBytes, err = parseMem(o.mem); err != nil {
			return nil, flagError("mem", o.mem, err)
		}
	}
	if set("pids") {
		if r.PidsMax, err = parsePids(o.pids); err != nil {
			return nil, flagError("pids", o.pids, err)
		}
	}
	if set("restart") {
		if s.Restart, err = parseRestart(o.restart); err != nil {
			return nil, flagError("restart", o.restart, err)
		}
	}
	if set("isolation") {
		if s.Isolation, err = parseIsolation(o.isolation); err != nil {
			return nil, flagError("isolation", o.isolation, err)
		}
	}
	if set("net") {
		if s.Network, err = parseNetwork(o.network); err != nil {
			return nil, flagError("net", o.network, err)
		}
	}
	for _, m := range o.mounts {
		mnt, err := parseMount(m)
		if err != nil {
			return nil, flagError("mount", m, err)
		}
		s.Mounts = append(s.Mounts, mnt)
	}
	if set("user") {
		if s.User, err = parseUser(o.user); err != nil {
			return nil, flagError("user", o.user, err)
		}
	}
	if err := o.grow.apply(flags, s); err != nil {
		return nil, err
	}
	if err := table.ValidateSpec(s); err != nil {
		return nil, &usageError{strings.TrimPrefix(err.Error(), table.ErrInvalid.Error()+": ")}
	}
	return s, nil
}

// spawn asks for the processes, retrying with the same request id while
// answers are lost (retry.go).
func (a *app) spawn(ctx context.Context, spec *pb.ProcessSpec, count uint32, wait bool, requestID string) error {
	var recs []*pb.ProcessRecord
	req := &pb.SpawnRequest{Spec: spec, Count: count, RequestId: requestID}
	what := "retry with --request-id " + requestID + " to spawn at most once"
	err := a.callRetry(ctx, what, func(ctx context.Context, c shimv1connect.ShimServiceClient) error {
		resp, err := c.Spawn(ctx, connect.NewRequest(req))
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
	if !wait {
		return nil
	}
	return a.waitStarted(ctx, recs)
}

// settled reports whether --wait may stop watching a process.
func settled(r *pb.ProcessRecord) bool {
	return r.GetState() == pb.ProcessState_PROCESS_STATE_RUNNING ||
		r.GetState() == pb.ProcessState_PROCESS_STATE_BACKOFF || table.Terminal(r.GetState())
}

// startFailure describes why a settled process did not start, or "".
func startFailure(r *pb.ProcessRecord) string {
	why := ""
	if r.GetReason() != "" {
		why = ": " + r.GetReason()
	}
	id := r.GetId()
	switch r.GetState() {
	case pb.ProcessState_PROCESS_STATE_FAILED:
		if why == "" {
			why = fmt.Sprintf(" (exit code %d)", r.GetExitCode())
		}
		return fmt.Sprintf("process %s failed%s", id, why)
	case pb.ProcessState_PROCESS_STATE_KILLED:
		return fmt.Sprintf("process %s was killed%s", id, why)
	case pb.ProcessState_PROCESS_STATE_BACKOFF:
		return fmt.Sprintf("process %s exited with code %d and is waiting to restart%s", id, r.GetExitCode(), why)
	case pb.ProcessState_PROCESS_STATE_EXITED:
		if r.GetExitCode() != 0 {
			return fmt.Sprintf("process %s exited with code %d%s", id, r.GetExitCode(), why)
		}
	}
	return ""
}

// waitStarted watches the new processes with blocking List calls until each
// is running or finished, for at most --timeout.
func (a *app) waitStarted(ctx context.Context, recs []*pb.ProcessRecord) error {
	deadline := time.Now().Add(a.timeout)
	if a.timeout <= 0 {
		deadline = time.Now().Add(100 * 365 * 24 * time.Hour)
	}
	ids := make([]string, len(recs))
	for i, r := range recs {
		ids[i] = r.GetId()
	}
	var index uint64
	for {
		var waiting *pb.ProcessRecord
		var failures []string
		for _, r := range recs {
			if !settled(r) {
				waiting = r
			} else if f := startFailure(r); f != "" {
				failures = append(failures, f)
			}
		}
		if waiting == nil {
			if len(failures) == 0 {
				return nil
			}
			if len(failures) > 1 {
				return fmt.Errorf("%d of %d processes did not start; %s", len(failures), len(recs), failures[0])
			}
			return errors.New(failures[0])
		}
		left := time.Until(deadline)
		if left <= 0 {
			msg := fmt.Sprintf("timed out after %s waiting for process %s to start (state %s", a.timeout, waiting.GetId(), table.StateName(waiting.GetState()))
			if waiting.GetReason() != "" {
				msg += ": " + waiting.GetReason()
			}
			return errors.New(msg + ")")
		}
		left = min(left, 30*time.Second) // one blocking query
		start := time.Now()
		var resp *pb.ListResponse
		err := a.callTimeout(ctx, left+2*time.Second, func(ctx context.Context, c shimv1connect.ShimServiceClient) error {
			req := &pb.ListRequest{Ids: ids, All: true, MinIndex: index, WaitMillis: left.Milliseconds()}
			r, err := c.List(ctx, connect.NewRequest(req))
			if err == nil {
				resp = r.Msg
			}
			return err
		})
		if err != nil {
			return err
		}
		if resp.GetIndex() <= index && time.Since(start) < 100*time.Millisecond {
			// The server did not block; poll gently.
			select {
			case <-ctx.Done():
				return errInterrupted
			case <-time.After(200 * time.Millisecond):
			}
		}
		index = resp.GetIndex()
		if len(resp.GetProcesses()) > 0 {
			recs = resp.GetProcesses()
		}
	}
}
