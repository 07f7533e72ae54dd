package main

import (
	"fmt"
	"sync"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/pflag"

	"github.com/shim-run/shim/agent"
	"github.com/shim-run/shim/exec"
	"github.com/shim-run/shim/grow"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
	"github.com/shim-run/shim/server"
)

// Growth: the flags of the node's growth loop (agent/grow.go), and what the
// runtime gives it: each process's pressure, read from its cgroup.

// growOptions are the growth loop's flags.
type growOptions struct {
	interval       time.Duration
	memShrinkAfter time.Duration
	cpuShrinkAfter time.Duration
}

// Default shrink delays. Memory gives back what stays unused for 30 s: over
// a load that wanders between 100 and 300 MiB the grant's slack is then
// about 23% (grow's package doc; 32% with 2 min), Autopilot's mark. CPU, a
// compressible resource, the same.
const (
	defaultMemShrinkAfter = 30 * time.Second
	defaultCPUShrinkAfter = 30 * time.Second
)

// memShrinkBelow: memory shrinks once the working set stays below 70% of
// the grant (grow's default is 60%), down to its peak at 85%. Over a load
// wandering between 100 and 300 MiB every 10 min this takes the mean slack
// from about 24% to 20% (a simulation of the policy; bench row 11c
// measures it), at the cost of a shrink more often: one at most every
// shrink delay, and never below what the peak needs.
const memShrinkBelow = 0.7

func addGrowFlags(f *pflag.FlagSet, o *growOptions) {
	f.DurationVar(&o.interval, "grow-interval", 100*time.Millisecond,
		"how often the growth loop samples each elastic process's pressure (10ms-10s)")
	f.DurationVar(&o.memShrinkAfter, "grow-mem-shrink-after", defaultMemShrinkAfter,
		"an elastic process gives back memory it has not used for this long")
	f.DurationVar(&o.cpuShrinkAfter, "grow-cpu-shrink-after", defaultCPUShrinkAfter,
		"an elastic process gives back CPU it has not used for this long")
}

// policy returns the growth policy the flags set.
func (o *growOptions) policy() (grow.Policy, error) {
	if o.interval < 10*time.Millisecond || o.interval > 10*time.Second {
		return grow.Policy{}, fmt.Errorf("--grow-interval %s: use 10ms to 10s", o.interval)
	}
	p := grow.DefaultPolicy()
	p.MemShrinkAfter, p.CPUShrinkAfter, p.MemShrinkBelow = o.memShrinkAfter, o.cpuShrinkAfter, memShrinkBelow
	if err := p.Validate(); err != nil {
		return grow.Policy{}, fmt.Errorf("--grow-*-shrink-after: %w", err)
	}
	return p, nil
}

// wire gives the agent its growth loop: the policy, and a client of the
// user API (SetGrant, as this node) per address.
func (o *growOptions) wire(ag *agent.Agent, newClient func(addr string) shimv1connect.ShimServiceClient) error {
	p, err := o.policy()
	if err != nil {
		return err
	}
	var mu sync.Mutex
	clients := map[string]shimv1connect.ShimServiceClient{}
	ag.GrowPolicy, ag.GrowInterval = p, o.interval
	ag.Shim = func(addr string) shimv1connect.ShimServiceClient {
		mu.Lock()
		defer mu.Unlock()
		c := clients[addr]
		if c == nil {
			c = newClient(addr)
			clients[addr] = c
		}
		return c
	}
	return nil
}

// shimClient makes a user API client that presents this node's certificate.
func shimClient(httpc connect.HTTPClient, secure bool) func(addr string) shimv1connect.ShimServiceClient {
	return func(addr string) shimv1connect.ShimServiceClient {
		return shimv1connect.NewShimServiceClient(httpc, server.URL(addr, secure))
	}
}

// Pressure opens a reader of a process's pressure (agent.PressureRuntime):
// its cgroup's, after moving every process in it into its PSI group (on v1
// hybrid, the unified twin; JoinPSI moves one process, and the workload's
// init has started the workload by now).
func (e *execRuntime) Pressure(id string, inc uint64, _ agent.Proc) (agent.PressureReader, error) {
	g, err := e.cg.Open(exec.GroupName(id, inc))
	if err != nil {
		return nil, err
	}
	pids, err := g.Procs()
	if err != nil {
		return nil, err
	}
	for _, pid := range pids {
		if err := g.JoinPSI(pid); err != nil {
			e.log.Debug("growth: no PSI for a process; the loop decides without it", "id", id, "pid", pid, "err", err)
		}
	}
	return g.PressureReader()
}
