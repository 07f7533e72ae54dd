// Package agent is the node side of shim: it holds the node's lease, fences
// the node's processes when the lease runs out, watches the table for the
// node's assignments, starts, stops and restarts processes through a
// Runtime, re-adopts them after a restart of shimd, and reports their state.
package agent

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"path/filepath"
	"sync"
	"time"

	"github.com/shim-run/shim/grow"
	"github.com/shim-run/shim/metrics"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
	"github.com/shim-run/shim/restart"
)

// Agent runs one node's processes. Fields are dependencies; set them before Run.
type Agent struct {
	Node *pb.NodeRecord // name, role, addresses, capacity
	// Addrs returns the API addresses to try before the servers the agent
	// learned from the cluster (see servers.go).
	Addrs   func() []string
	Client  func(addr string) shimv1connect.AgentServiceClient
	Runtime Runtime
	// DataDir holds state.log, logs/, the servers the agent learned, and
	// the guard's record of what it fenced (package guard).
	DataDir string
	Policy  restart.Policy
	Lease   time.Duration // until the leader says otherwise
	Clock   Clock         // default SystemClock
	Log     *slog.Logger
	Metrics *metrics.Metrics
	// OnServers is told the servers' API addresses after each join.
	OnServers func([]string)
	// StopGrace is how long a stopped process has to exit after its stop
	// signal before it is killed (default 5 s). A workload is PID 1 of its
	// namespace, so signals it has no handler for never reach it.
	StopGrace time.Duration
	// Hold is how long the cluster waits for this shimd to come back after
	// a clean stop before it moves the node's processes (default 30 s).
	Hold time.Duration
	// Resume is the deadline of the lease the previous agent on this node
	// held (from the guard's file): processes it left may run until then.
	// Zero: none, the node starts fenced until a leader grants a lease.
	Resume time.Time
	// HostPaths are the host folders this node offers to sandboxes, by
	// name; CA is the cluster's CA certificate (PEM) workloads get, nil
	// with trust off. See sandbox.go.
	HostPaths map[string]HostPath
	CA        []byte
	// Deadline, if set, is told every new deadline of the node's lease,
	// for the guard: a separate process that fences the node when the agent
	// cannot (package guard). After a clean stop it is the held lease's.
	Deadline func(until time.Time)
	// Shim returns a client of the user API at addr, for the growth loop's
	// SetGrant (grow.go); nil: no growth loop (limits still follow grants).
	Shim func(addr string) shimv1connect.ShimServiceClient
	// GrowPolicy decides growth (zero: grow.DefaultPolicy); GrowInterval
	// is how often the loop samples (default 100 ms).
	GrowPolicy   grow.Policy
	GrowInterval time.Duration

	mu       sync.Mutex
	procs    map[string]*local
	table    map[string]*pb.ProcessRecord // the node's assignments as the table has them
	assigned []*pb.ProcessRecord          // what the node must run: effective(table), by id
	lease    lease                        // its own lock: see lease.go
	// minIndex is the leader's table index when the lease was granted (at
	// start, or again after a fence). The agent acts on assignments only from
	// a table at least that new: a replica still catching up (its own server
	// just restarted, or a lagging follower) may assign it incarnations the
	// cluster has long moved elsewhere. Until the first grant it is the
	// largest index, so nothing is started, stopped or fenced on a table of
	// unknown age.
	minIndex   uint64
	tableIndex uint64 // table index of the assignments held
	// fences counts fences begun (fenceAll). A start that began before a
	// fence and ends after it may have been cut short by the fence's kill,
	// or made its cgroup after the kill looked: either way it must not run
	// or count as a failure of its own.
	fences    uint64
	nodeIndex uint64    // index of the last change to the assignments held
	lagSince  time.Time // when a heartbeat first showed newer assignments than held
	kick      chan struct{}
	recon     chan struct{} // reconcileSoon: one reconcile for many starts
	reports   *reporter
	startSem  chan struct{}
	states    *stateLog // what a restarted agent adopts
	book      addrBook  // the servers besides Addrs, and the one that answered last
	tokensMu  sync.Mutex
	tokens    map[string]string  // self tokens by process id, from the assignments
	growths   map[string]*growth // the growth loop's state, by process (grow.go)
	growClose []PressureReader   // readers of ended growths, for the loop to close
}

func (a *Agent) init() {
	if a.Clock == nil {
		a.Clock = SystemClock{}
	}
	if a.Log == nil {
		a.Log = slog.Default()
	}
	if a.Metrics == nil {
		a.Metrics = metrics.New(nil)
	}
	if a.Policy == (restart.Policy{}) {
		a.Policy = restart.DefaultPolicy
	}
	if a.Lease <= 0 {
		a.Lease = time.Second
	}
	if a.StopGrace <= 0 {
		a.StopGrace = 5 * time.Second
	}
	if a.GrowInterval <= 0 {
		a.GrowInterval = 100 * time.Millisecond
	}
	a.growths = map[string]*growth{}
	a.procs = map[string]*local{}
	a.kick = make(chan struct{}, 1)
	a.recon = make(chan struct{}, 1)
	a.reports = newReporter(a.sendReport, a.Clock, a.Log)
	a.startSem = make(chan struct{}, startParallel)
	a.lease.clock, a.lease.publish, a.lease.fence, a.lease.regained = a.Clock, a.publish, a.fenceAll, a.regained
	a.minIndex = math.MaxUint64
}

// Run adopts what an earlier agent left, joins the cluster and serves the
// node until ctx ends. Processes keep running after Run returns.
func (a *Agent) Run(ctx context.Context) error {
	a.init()
	if err := a.book.load(filepath.Join(a.DataDir, serversFile)); err != nil {
		a.Log.Warn("starting from Addrs alone", "err", err)
	}
	if err := a.adopt(); err != nil {
		return fmt.Errorf("adopt processes: %w", err)
	}
	// Adopted processes may run until the lease the previous agent held
	// runs out (the held one after a clean stop), while this one finds the
	// leader; after that, with no lease, they are fenced. Running them any
	// longer could overlap their replacements.
	a.lease.arm(a.Resume)
	if err := a.join(ctx); err != nil {
		return err
	}
	go func() {
		// Stopping on purpose: the processes outlive the agent, so the
		// fence is off from now on; the leader is asked to hold the lease.
		<-ctx.Done()
		a.lease.stop()
	}()
	var wg sync.WaitGroup
	loops := []func(context.Context){a.heartbeats, a.watch, a.reports.run, a.sample, a.sweepWork, a.reconciler}
	if a.Shim != nil {
		loops = append(loops, a.growLoop)
	}
	for _, f := range loops {
		wg.Add(1)
		go func() { defer wg.Done(); f(ctx) }()
	}
	wg.Wait()
	a.holdLease()
	a.mu.Lock()
	for _, l := range a.procs {
		l.stopTimer()
	}
	a.mu.Unlock()
	return nil
}
