package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"syscall"
	"time"

	"github.com/shim-run/shim/agent"
	"github.com/shim-run/shim/cgroup"
	"github.com/shim-run/shim/exec"
	pb "github.com/shim-run/shim/proto/shimv1"
)

// execRuntime adapts the exec package to agent.Runtime.
type execRuntime struct {
	rt  *exec.Runtime
	cg  *cgroup.Manager
	log *slog.Logger
}

func newRuntime(node string, log *slog.Logger) (*execRuntime, error) {
	m, err := cgroup.NewManager("shim/" + node)
	if err != nil {
		return nil, fmt.Errorf("cgroups: %w", err)
	}
	return &execRuntime{rt: &exec.Runtime{Cgroups: m}, cg: m, log: log}, nil
}

func resources(r *pb.Resources) cgroup.Resources {
	return cgroup.Resources{
		CPUMinMilli: r.GetCpuMinMilli(), CPUMaxMilli: r.GetCpuMaxMilli(), CPUBurstMilli: r.GetCpuBurstMilli(),
		MemMinBytes: r.GetMemMinBytes(), MemMaxBytes: r.GetMemMaxBytes(), PidsMax: r.GetPidsMax(),
	}
}

// isolation maps the API's isolation; unspecified is the node's default,
// direct process isolation.
func isolation(i pb.Isolation) exec.Isolation {
	if i == pb.Isolation_ISOLATION_CONTAINER {
		return exec.IsolationContainer
	}
	return exec.IsolationProcess
}

// network maps the API's network mode; unspecified is the host's.
func network(n pb.Network) exec.Network {
	if n == pb.Network_NETWORK_NONE {
		return exec.NetworkNone
	}
	return exec.NetworkHost
}

func (e *execRuntime) Start(s agent.Spec) (agent.Proc, error) {
	spec := exec.Spec{
		ID: s.ID, Incarnation: s.Incarnation, Argv: s.Argv, Env: s.Env, Dir: s.Dir,
		Stdout: s.LogPath, Stderr: s.LogPath, Resources: resources(s.Resources),
		Isolation: isolation(s.Isolation), Network: network(s.Network), User: s.User, Rootfs: s.Rootfs,
	}
	p, err := e.rt.Start(spec)
	if errors.Is(err, cgroup.ErrExists) {
		// The sandbox of a run that was just fenced or killed is still
		// being torn down: finish that, then start afresh.
		deadline := time.Now().Add(2 * time.Second)
		for errors.Is(err, cgroup.ErrExists) && time.Now().Before(deadline) {
			_ = e.Remove(s.ID, s.Incarnation)
			p, err = e.rt.Start(spec)
			if errors.Is(err, cgroup.ErrExists) {
				time.Sleep(20 * time.Millisecond) // the kernel is still tearing the old group down
			}
		}
	}
	if err != nil {
		return nil, err
	}
	return proc{p}, nil
}

func (e *execRuntime) Adopt(id string, inc uint64, pid int, startTime uint64) (agent.Proc, error) {
	p, err := e.rt.Adopt(id, inc, pid, startTime)
	if err != nil {
		return nil, err
	}
	return proc{p}, nil
}

func (e *execRuntime) Existing() ([]agent.Found, error) {
	ex, err := e.rt.Existing()
	if err != nil {
		return nil, err
	}
	out := make([]agent.Found, 0, len(ex))
	for _, x := range ex {
		out = append(out, agent.Found{ID: x.ID, Incarnation: x.Incarnation})
	}
	return out, nil
}

// Remove kills and deletes a sandbox that will not be adopted.
func (e *execRuntime) Remove(id string, inc uint64) error {
	return e.removeGroup(exec.GroupName(id, inc))
}

// removeGroup kills what runs in a sandbox's group and deletes the group.
func (e *execRuntime) removeGroup(name string) error {
	g, err := e.cg.Open(name)
	if err != nil {
		return err
	}
	if err := g.Kill(); err != nil {
		return err
	}
	return g.Delete()
}

// proc adapts *exec.Process to agent.Proc.
type proc struct{ p *exec.Process }

func (p proc) PID() int                        { return p.p.PID() }
func (p proc) StartTime() uint64               { return p.p.StartTime() }
func (p proc) Signal(sig syscall.Signal) error { return p.p.Signal(sig) }
func (p proc) Kill() error                     { return p.p.Kill() }
func (p proc) Done() <-chan struct{}           { return p.p.Done() }
func (p proc) Resize(r *pb.Resources) error    { return p.p.Resize(resources(r)) }
func (p proc) Stats() (*pb.Usage, error) {
	cpu, mem, err := p.p.Sample()
	if err != nil {
		return nil, err
	}
	return &pb.Usage{CpuUsageNanos: cpu, MemoryBytes: mem}, nil
}
func (p proc) Exit() agent.Exit {
	x := p.p.Exit()
	return agent.Exit{Code: x.Code, Signal: x.Signal, OOMKilled: x.OOMKilled, Reason: x.Reason}
}

// RemoveAll kills what is left in this node's sandboxes and removes their
// cgroups, and the node's own parent groups once empty: the node is gone.
func (e *execRuntime) RemoveAll() error {
	names, err := e.cg.List()
	if err != nil {
		return err
	}
	var errs []error
	for _, n := range names {
		if err := e.removeGroup(n); err != nil && !errors.Is(err, cgroup.ErrNotFound) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// KillAll sends SIGKILL to every process in every sandbox of this node at
// once: the fence. It neither freezes nor waits, so it takes about a
// millisecond per hundred processes.
func (e *execRuntime) KillAll() error {
	names, err := e.cg.List()
	if err != nil {
		return err
	}
	for _, n := range names {
		g, err := e.cg.Open(n)
		if err != nil {
			continue
		}
		pids, _ := g.Procs()
		for _, pid := range pids {
			if pid != os.Getpid() {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	return nil
}
