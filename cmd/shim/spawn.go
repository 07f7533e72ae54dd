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
	requestID, onLost                                                          string
	count                                                                      int
	env, mounts                                                                []string
	wait, force                                                                bool
	grow                                                                       growFlags    // grow.go
	svc                                                                        serviceFlags // services.go
	service                                                                    bool         // --name with --count: a service
	countS                                                                     string       // --count N or MIN:MAX (services.go)
	min, max                                                                   uint32       // --count MIN:MAX
}

func (a *app) spawnCmd() *cobra.Command {
	var o spawnOptions
	cmd := &cobra.Command{
		Use:   "spawn [flags] -- CMD [ARG...]",
		Short: "Start a process on the cluster and print its ID",
		Long: "Start a process on the cluster and print its ID (one per line with --count).\n" +
			"Flags after the command belong to the command; use -- to be explicit.\n" +
			"--cpu and --mem take MIN:MAX (a range: the process is promised MIN and may use up\n" +
			"to MAX), MIN: or :MAX (one end), or a single value, a fixed size (MIN = MAX), as\n" +
			"docker run --cpus/--memory reads it. Says on stderr what it set.",
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
			o.service = o.name != "" && cmd.Flags().Changed("count")
			if err := a.spawnReq(cmd.Context(), &pb.SpawnRequest{Spec: spec, Count: uint32(o.count), RequestId: rid, Force: o.force, Service: o.service,
				Min: o.min, Max: o.max}, o.wait); err != nil {
				return err
			}
			// What the bounds mean, on stderr (stdout holds only the IDs).
			if set := cmd.Flags().Changed; set("cpu") || set("mem") {
				fmt.Fprintln(a.errOut, "shim: spawn set "+boundsText(spec.GetResources(), set("cpu"), set("mem")))
			}
			return nil
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
	f.BoolVar(&o.force, "force", false, "with --node: run there even if the node is drained")
	f.StringVar(&o.onLost, "on-lost", "", "when its node is cut off: `fence` (default: stop it, it never runs twice) or keep (keep it running until the replacement runs)")
	f.StringVar(&o.countS, "count", "1", "number of replicas `N`; with --name a service, MIN:MAX to autoscale it (with --grow)")
	f.BoolVar(&o.wait, "wait", false, "wait until the process is running (up to --timeout); fail if it does not start")
	f.StringVar(&o.isolation, "isolation", "", "isolation `MODE`: process (default), container, vm, or host (admin: no sandbox)")
	f.StringVar(&o.network, "net", "", "network `MODE`: host (default) or none")
	f.StringVar(&o.user, "user", "", "run as `UID[:GID]` (default nobody; 0 needs an admin token)")
	f.StringVar(&o.rootfs, "rootfs", "", "root file system `NAME[/SUB]`: a host path the node declares, or a folder in it (container isolation)")
	f.StringVar(&o.dir, "dir", "", "working `DIR` in the sandbox: /work (the default), /tmp, a mount, or in one of them")
	f.StringArrayVar(&o.mounts, "mount", nil, "mount the node's host path NAME at PATH: `NAME:PATH[:ro]` (repeatable; the node declares NAME with shimd --host-path)")
	f.StringVar(&o.requestID, "request-id", "", "spawn at most once under this `ID` (default: a random one; retries reuse it)")
	o.grow.add(f)
	o.svc.add(f)
	return cmd
}

// spec builds and validates the process spec from the flags and command.
func (o *spawnOptions) spec(flags *pflag.FlagSet, args []string) (*pb.ProcessSpec, error) {
	if len(args) == 0 || args[0] == "" {
		return nil, usagef("missing command (usage: shim spawn [flags] -- CMD [ARG...])")
	}
	if err := o.parseCount(); err != nil {
		return nil, err
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
	if set("on-lost") {
		if s.OnLost, err = parseOnLost(o.onLost); err != nil {
			return nil, flagError("on-lost", o.onLost, err)
		}
	}
	if set("force") && o.node == "" {
		return nil, usagef("--force needs --node (it places a pinned process on a drained node)")
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
	if err := o.svc.apply(flags, s); err != nil {
		return nil, err
	}
	if s.Grow != pb.Grow_GROW_OFF && (r.CpuMaxMilli > 0 || r.MemMaxBytes > 0) &&
		!(r.CpuMaxMilli > r.CpuMinMilli) && !(r.MemMaxBytes > r.MemMinBytes) {
		return nil, usagef("grow needs a range to grow in: give --cpu or --mem as MIN:MAX (one value is a fixed size)")
	}
	if err := table.ValidateSpec(s); err != nil {
		return nil, &usageError{strings.TrimPrefix(err.Error(), table.ErrInvalid.Error()+": ")}
	}
	return s, nil
}

// spawnReq asks for the processes, retrying with the same request id while
// answers are lost (retry.go).
func (a *app) spawnReq(ctx context.Context, req *pb.SpawnRequest, wait bool) error {
	var recs []*pb.ProcessRecord
	what := "retry with --request-id " + req.RequestId + " to spawn at most once"
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
			if err != nil {
				return err
			}
			resp = r.Msg
			for tok := r.Msg.GetNextPageToken(); tok != ""; { // the rest of the pages, without waiting
				more, err := c.List(ctx, connect.NewRequest(&pb.ListRequest{Ids: ids, All: true, PageToken: tok}))
				if err != nil {
					return err
				}
				resp.Processes = append(resp.Processes, more.Msg.GetProcesses()...)
				tok = more.Msg.GetNextPageToken()
			}
			return nil
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
