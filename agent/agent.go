// Package agent is the node side of shim: it holds the node's lease, fences
// the node's processes when the lease runs out, watches the table for the
// node's assignments, starts, stops and restarts processes through a
// Runtime, re-adopts them after a restart of shimd, and reports their state.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"github.com/shim-run/shim/metrics"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
	"github.com/shim-run/shim/restart"
)

// Agent runs one node's processes. Fields are dependencies; set them before Run.
type Agent struct {
	Node    *pb.NodeRecord // name, role, addresses, capacity
	Addrs   func() []string
	Client  func(addr string) shimv1connect.AgentServiceClient
	Runtime Runtime
	DataDir string // state.log and logs/ live here
	Policy  restart.Policy
	Lease   time.Duration // until the leader says otherwise
	Now     func() time.Time
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
	// Deadline, if set, is told every new deadline of the node's lease,
	// for the guard: a separate process that fences the node when the agent
	// cannot (package guard). After a clean stop it is the held lease's.
	Deadline func(until time.Time)

	mu       sync.Mutex
	procs    map[string]*local
	table    map[string]*pb.ProcessRecord // the node's assignments as the table has them
	assigned []*pb.ProcessRecord          // what the node must run: effective(table), by id
	// lease is guarded by its own lock, so that renewing and fencing never
	// wait behind the agent's other work.
	lease struct {
		sync.Mutex
		until   time.Time // monotonic: the node may run processes until then
		fenced  bool
		killing bool   // the fence is under way; a renewal waits for it
		index   uint64 // the index of a renewal that came while killing
		stopped bool   // the agent is shutting down: no fence, no starts
		granted bool   // a leader has granted a lease since the agent started
	}
	// minIndex is the leader's table index when the lease was granted (at
	// start, or again after a fence). The agent acts on assignments only from
	// a table at least that new: a replica still catching up (its own server
	// just restarted, or a lagging follower) may assign it incarnations the
	// cluster has long moved elsewhere. Until the first grant it is the
	// largest index, so nothing is started, stopped or fenced on a table of
	// unknown age.
	minIndex   uint64
	tableIndex uint64    // table index of the assignments held
	nodeIndex  uint64    // index of the last change to the assignments held
	lagSince   time.Time // when a heartbeat first showed newer assignments than held
	fenceTimer *time.Timer
	kick       chan struct{}
	reports    chan *pb.StatusUpdate
	startSem   chan struct{}
	states     *stateLog    // what a restarted agent adopts
	serverKey  string       // the servers last passed to OnServers
	good       atomic.Int32 // index in Addrs() of the address that answered last
}

// local is the agent's view of one process.
type local struct {
	id          string
	inc         uint64
	rec         *pb.ProcessRecord
	proc        Proc
	applied     *pb.Resources
	restarts    uint32
	consecutive int
	startedAt   time.Time
	stopping    bool
	done        bool // finished; its final report may not be in the table yet
	handoff     bool // stopping after a make-before-break move: no report
	movedAway   bool // the table says it left by a make-before-break move
	fencing     bool
	lost        *Exit // exited while the agent was down
	timer       *time.Timer
	starting    bool      // the runtime is starting it
	usage       *pb.Usage // last sample
	sampledAt   time.Time
}

func (a *Agent) init() {
	if a.Now == nil {
		a.Now = time.Now
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
	a.procs = map[string]*local{}
	a.kick = make(chan struct{}, 1)
	a.reports = make(chan *pb.StatusUpdate, 4096)
	a.startSem = make(chan struct{}, startParallel)
	a.minIndex = math.MaxUint64
}

// Run adopts what an earlier agent left, joins the cluster and serves the
// node until ctx ends. Processes keep running after Run returns.
func (a *Agent) Run(ctx context.Context) error {
	a.init()
	if err := a.adopt(); err != nil {
		return fmt.Errorf("adopt processes: %w", err)
	}
	// Adopted processes may run until the lease the previous agent held
	// runs out (the held one after a clean stop), while this one finds the
	// leader; after that, with no lease, they are fenced. Running them any
	// longer could overlap their replacements.
	a.lease.Lock()
	a.lease.until = a.Resume
	if now := a.Now(); a.lease.until.Before(now) {
		a.lease.until = now
	}
	a.fenceTimer = time.AfterFunc(a.lease.until.Sub(a.Now()), a.checkLease)
	a.publish(a.lease.until)
	a.lease.Unlock()
	if err := a.join(ctx); err != nil {
		return err
	}
	go func() {
		// Stopping on purpose: the processes outlive the agent, so the
		// fence is off from now on; the leader is asked to hold the lease.
		<-ctx.Done()
		a.lease.Lock()
		a.lease.stopped = true
		a.fenceTimer.Stop()
		a.lease.Unlock()
	}()
	var wg sync.WaitGroup
	for _, f := range []func(context.Context){a.heartbeats, a.watch, a.reporter, a.sample} {
		wg.Add(1)
		go func() { defer wg.Done(); f(ctx) }()
	}
	wg.Wait()
	a.holdLease()
	a.mu.Lock()
	for _, l := range a.procs {
		if l.timer != nil {
			l.timer.Stop()
		}
	}
	a.mu.Unlock()
	return nil
}

// call runs f against the API addresses in turn, starting with the one that
// answered last, until one answers. attempt, if set, bounds each try, so that
// an address that hangs (a server cut off) does not use up the whole call.
func call[T any](ctx context.Context, a *Agent, attempt time.Duration, f func(ctx context.Context, c shimv1connect.AgentServiceClient) (T, error)) (T, error) {
	var zero T
	err := errors.New("no API address")
	addrs := a.Addrs()
	first := int(a.good.Load())
	for i := range addrs {
		k := (first + i) % len(addrs)
		actx, cancel := ctx, context.CancelFunc(func() {})
		if attempt > 0 && len(addrs) > 1 {
			actx, cancel = context.WithTimeout(ctx, attempt)
		}
		var v T
		v, err = f(actx, a.Client(addrs[k]))
		cancel()
		if err == nil {
			a.good.Store(int32(k))
			return v, nil
		}
		if c := connect.CodeOf(err); c != connect.CodeUnavailable && c != connect.CodeUnknown && c != connect.CodeDeadlineExceeded {
			return zero, err
		}
		if ctx.Err() != nil {
			break
		}
	}
	return zero, err
}

// join registers the node, retrying until it succeeds or ctx ends.
func (a *Agent) join(ctx context.Context) error {
	backoff := 50 * time.Millisecond
	for {
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		resp, err := call(rctx, a, 0, func(ctx context.Context, c shimv1connect.AgentServiceClient) (*connect.Response[pb.JoinResponse], error) {
			return c.Join(ctx, connect.NewRequest(&pb.JoinRequest{Node: a.Node}))
		})
		cancel()
		if err == nil {
			if a.OnServers != nil && len(resp.Msg.Servers) > 0 {
				a.OnServers(resp.Msg.Servers)
			}
			a.Log.Info("joined the cluster", "node", a.Node.Name, "servers", resp.Msg.Servers)
			return nil
		}
		a.Log.Warn("join failed; retrying", "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 2*time.Second)
	}
}

// ---- lease and fencing ----

// heartbeats renews the lease every fifth of a lease (every 50 ms while
// unanswered). Each heartbeat runs on its own, so one stuck on a leader that
// is gone never delays the next, which may reach the new one. The lease is
// counted from the moment the acknowledged heartbeat was sent (see
// server/lease.go).
func (a *Agent) heartbeats(ctx context.Context) {
	var rejoin sync.Mutex
	for {
		sent := a.Now()
		go func() {
			hctx, cancel := context.WithTimeout(ctx, a.Lease/2)
			defer cancel()
			resp, err := call(hctx, a, a.Lease/5, func(ctx context.Context, c shimv1connect.AgentServiceClient) (*connect.Response[pb.HeartbeatResponse], error) {
				return c.Heartbeat(ctx, connect.NewRequest(&pb.HeartbeatRequest{Node: a.Node.Name}))
			})
			switch {
			case err != nil:
				a.Log.Debug("heartbeat failed", "err", err)
			case !resp.Msg.Known:
				if rejoin.TryLock() {
					a.Log.Warn("the cluster does not know this node; joining again")
					_ = a.join(ctx)
					rejoin.Unlock()
				}
			default:
				lease := time.Duration(resp.Msg.LeaseMillis) * time.Millisecond
				if lease <= 0 {
					lease = a.Lease
				}
				a.renew(sent.Add(lease), resp.Msg.Index)
				a.servers(resp.Msg.Servers)
				a.checkWatch(resp.Msg.NodeIndex)
			}
		}()
		wait := a.Lease / 5
		a.lease.Lock()
		if a.lease.until.Sub(a.Now()) < a.Lease*3/4 {
			wait = min(wait, 50*time.Millisecond) // the last beats went unanswered
		}
		a.lease.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// watchLag is how long the assignments held may trail the leader's before
// the agent asks again.
const watchLag = 100 * time.Millisecond

// checkWatch compares the leader's index of the node's assignments, from a
// heartbeat, with the assignments held. A watch that has not delivered them
// within watchLag is waiting on a server that is cut off (its connection
// hangs until the long poll's end) or behind: it is asked again, from the
// address that answers.
func (a *Agent) checkWatch(nodeIndex uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if nodeIndex <= a.nodeIndex {
		a.lagSince = time.Time{}
		return
	}
	now := a.Now()
	switch {
	case a.lagSince.IsZero():
		a.lagSince = now
	case now.Sub(a.lagSince) >= watchLag:
		a.lagSince = time.Time{}
		a.Log.Warn("assignments are behind the leader's; asking again", "held", a.nodeIndex, "leader", nodeIndex)
		select {
		case a.kick <- struct{}{}:
		default:
		}
	}
}

// servers passes on a changed list of the servers' API addresses.
func (a *Agent) servers(addrs []string) {
	if len(addrs) == 0 || a.OnServers == nil {
		return
	}
	key := strings.Join(addrs, ",")
	a.mu.Lock()
	changed := key != a.serverKey
	a.serverKey = key
	a.mu.Unlock()
	if changed {
		a.OnServers(addrs)
	}
}

// holdLease tells the leader this shimd is stopping on purpose, so that it
// waits Hold for it to come back before moving the node's processes, which
// keep running meanwhile.
func (a *Agent) holdLease() {
	if a.Hold <= 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	sent := a.Now()
	_, err := call(ctx, a, 500*time.Millisecond, func(ctx context.Context, c shimv1connect.AgentServiceClient) (*connect.Response[pb.HeartbeatResponse], error) {
		return c.Heartbeat(ctx, connect.NewRequest(&pb.HeartbeatRequest{Node: a.Node.Name, HoldMillis: a.Hold.Milliseconds()}))
	})
	if err != nil {
		a.Log.Warn("could not hold the lease for a restart: the guard stops the node's processes when the lease runs out, as the cluster will move them", "err", err)
		return
	}
	a.lease.Lock()
	a.publish(sent.Add(a.Hold))
	a.lease.Unlock()
	a.Log.Info("lease held for a restart", "for", a.Hold)
}

func (a *Agent) renew(until time.Time, index uint64) {
	a.lease.Lock()
	switch {
	case !a.Now().Before(until):
		a.lease.Unlock()
		return // acknowledged too late to be worth anything
	case until.After(a.lease.until):
		a.lease.until = until
		a.fenceTimer.Reset(time.Until(until))
		a.publish(until)
	case a.lease.granted:
		a.lease.Unlock()
		return // nothing new: the lease held runs longer
	}
	// A first grant may run out before the lease held since the agent
	// started (a clean stop's held lease): it still lets the agent act.
	if a.lease.killing {
		a.lease.index = index // checkLease takes it from here
		a.lease.Unlock()
		return
	}
	wasFenced, first := a.lease.fenced, !a.lease.granted
	a.lease.fenced, a.lease.granted = false, true
	a.lease.Unlock()
	if wasFenced || first {
		a.regained(index, first)
	}
}

// publish passes a lease deadline on to the guard. Call with a.lease held,
// so deadlines are published in the order they were granted.
func (a *Agent) publish(until time.Time) {
	if a.Deadline != nil {
		a.Deadline(until)
	}
}

// regained lets a node act, at start or after a fence, once it has seen the
// table that granted its lease.
func (a *Agent) regained(index uint64, first bool) {
	// Back from a partition or a pause: act only on a table at least as new
	// as the leader's, so stale copies are fenced before anything else.
	a.mu.Lock()
	a.minIndex = index
	a.mu.Unlock()
	if first {
		a.Log.Info("lease granted; acting on a table at least this new", "index", index)
	} else {
		a.Log.Warn("lease regained; reconciling with the table before reporting", "index", index)
	}
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

// checkLease fences the node when its lease has run out: it kills every
// process in the node's sandboxes at once, without waiting for the agent's
// lock, and only then tidies the agent's books.
func (a *Agent) checkLease() {
	a.lease.Lock()
	if left := time.Until(a.lease.until); a.Now().Before(a.lease.until) {
		a.fenceTimer.Reset(left)
		a.lease.Unlock()
		return
	}
	if a.lease.fenced || a.lease.stopped {
		a.lease.Unlock()
		return
	}
	a.lease.fenced, a.lease.killing, a.lease.index = true, true, 0
	a.lease.Unlock()
	start := time.Now()
	if err := a.Runtime.KillAll(); err != nil {
		a.Log.Error("fence: kill all failed", "err", err)
	}
	took := time.Since(start)
	a.mu.Lock()
	n := 0
	for _, l := range a.procs {
		if l.proc != nil || l.timer != nil || l.starting {
			a.fenceLocked(l, "lease expired")
			n++
		}
	}
	a.mu.Unlock()
	a.Log.Warn("lease expired: fenced every local process", "processes", n, "took", took)
	// A renewal that came in meanwhile takes effect only now, after the
	// fence has finished.
	a.lease.Lock()
	a.lease.killing = false
	back := a.lease.index != 0 && a.Now().Before(a.lease.until)
	index := a.lease.index
	if back {
		a.lease.fenced = false
	}
	a.lease.Unlock()
	if back {
		a.regained(index, false)
	}
}

// fenceLocked kills a process at once; the table has or will have moved it.
func (a *Agent) fenceLocked(l *local, why string) {
	if l.timer != nil {
		l.timer.Stop()
		l.timer = nil
	}
	if l.starting {
		// start kills it as soon as the runtime hands it over, and keeps
		// the entry until it is gone, so that nothing reuses its sandbox
		// before that.
		l.fencing = true
		return
	}
	if l.proc == nil {
		delete(a.procs, l.id) // waiting out a backoff: nothing runs
		a.dropState(l.id)
		return
	}
	l.fencing = true
	if err := l.proc.Kill(); err != nil {
		a.Log.Warn("fence: kill failed", "id", l.id, "err", err)
	}
	a.Metrics.Fenced.Inc()
	a.Log.Warn("fenced process", "id", l.id, "incarnation", l.inc, "pid", l.proc.PID(), "why", why)
}

// mayStartLocked reports whether the node may start processes: it holds a
// lease and has seen a table at least as new as the one that granted it.
func (a *Agent) mayStartLocked() bool {
	return a.leaseValid() && a.tableIndex >= a.minIndex
}

func (a *Agent) leaseValid() bool {
	a.lease.Lock()
	defer a.lease.Unlock()
	return !a.lease.fenced && !a.lease.stopped && a.Now().Before(a.lease.until)
}

// ---- assignments ----

// watch long-polls the node's assignments and reconciles after each change.
func (a *Agent) watch(ctx context.Context) {
	var index uint64
	backoff := 20 * time.Millisecond
	for ctx.Err() == nil {
		wctx, cancel := context.WithCancel(ctx)
		go func() {
			select {
			case <-a.kick:
				cancel()
			case <-wctx.Done():
			}
		}()
		after := index
		resp, err := call(wctx, a, 0, func(ctx context.Context, c shimv1connect.AgentServiceClient) (*connect.Response[pb.AssignmentsResponse], error) {
			return c.Assignments(ctx, connect.NewRequest(&pb.AssignmentsRequest{Node: a.Node.Name, MinIndex: after, WaitMillis: 30000, Delta: after > 0}))
		})
		kicked := wctx.Err() != nil && ctx.Err() == nil
		cancel()
		if kicked {
			index = 0
			continue
		}
		if err != nil {
			select {
			case <-ctx.Done():
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, time.Second)
			continue
		}
		backoff = 20 * time.Millisecond
		index = resp.Msg.Index
		a.mu.Lock()
		a.merge(resp.Msg)
		a.tableIndex, a.nodeIndex = resp.Msg.TableIndex, resp.Msg.Index
		behind := a.tableIndex < a.minIndex
		a.reconcileLocked()
		a.mu.Unlock()
		if behind {
			// The server that answered has not caught up with the table
			// that granted the lease: ask again shortly rather than wait
			// for the next change to this node.
			index = 0
			select {
			case <-ctx.Done():
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
}

// merge applies an answer to the assignments query: a full list, or the
// changes since the index asked for.
func (a *Agent) merge(m *pb.AssignmentsResponse) {
	if m.Full || a.table == nil {
		a.table = make(map[string]*pb.ProcessRecord, len(m.Processes))
	}
	for _, id := range m.Removed {
		delete(a.table, id)
	}
	for _, id := range m.HandedOff {
		if l := a.procs[id]; l != nil {
			l.movedAway = true
		}
	}
	for _, r := range m.Processes {
		a.table[r.Id] = r
	}
	recs := make([]*pb.ProcessRecord, 0, len(a.table))
	for _, r := range a.table {
		recs = append(recs, r)
	}
	slices.SortFunc(recs, func(x, y *pb.ProcessRecord) int { return strings.Compare(x.Id, y.Id) })
	a.assigned = a.effective(recs)
}

// effective turns the table's assignments into what this node must run: a
// process moving here (make-before-break) is its next incarnation, starting.
func (a *Agent) effective(recs []*pb.ProcessRecord) []*pb.ProcessRecord {
	out := make([]*pb.ProcessRecord, len(recs))
	for i, r := range recs {
		if r.MoveTo == a.Node.Name && r.Node != a.Node.Name {
			r = proto.CloneOf(r)
			r.Node, r.MoveTo, r.Incarnation = a.Node.Name, "", r.Incarnation+1
			r.State, r.Pid, r.Restarts = pb.ProcessState_PROCESS_STATE_STARTING, 0, 0
		}
		out[i] = r
	}
	return out
}

func (a *Agent) reconcileLocked() {
	if a.tableIndex < a.minIndex {
		return // assignments from a table older than the lease's: wait (see minIndex)
	}
	for _, r := range a.assigned {
		if l := a.procs[r.Id]; l != nil && l.inc == r.Incarnation {
			l.rec = r
		}
	}
	locals := make([]restart.Local, 0, len(a.procs))
	for _, l := range a.procs {
		locals = append(locals, restart.Local{
			ID: l.id, Incarnation: l.inc, Running: l.proc != nil || l.starting, Waiting: l.timer != nil,
			Lost: l.lost != nil, Stopping: l.stopping || l.fencing, Resources: l.applied,
			MovingAway: l.movedAway || (l.rec != nil && l.rec.MoveTo != "" && l.rec.MoveTo != a.Node.Name), Done: l.done,
		})
	}
	defer func() {
		// Finished entries are kept only until the table has moved on.
		for id, l := range a.procs {
			if l.done && !a.assignedInc(id, l.inc) {
				delete(a.procs, id)
			}
		}
	}()
	for _, act := range restart.Reconcile(a.assigned, locals, a.mayStartLocked()) {
		l := a.procs[act.ID]
		switch act.Kind {
		case restart.Fence:
			a.fenceLocked(l, "the table moved it elsewhere")
		case restart.Stop:
			l.rec = act.Record
			l.stopping = true
			if l.proc == nil {
				continue // starting: start stops it when it is up
			}
			a.stopLocked(l, syscall.Signal(act.Record.StopSignal))
		case restart.Handoff:
			// Its next incarnation runs elsewhere: after handoffDelay,
			// stop this one as a kill would, and forget it without a
			// report.
			l.stopping, l.handoff = true, true
			if l.timer != nil {
				l.timer.Stop()
			}
			l.timer = time.AfterFunc(handoffDelay, func() {
				a.mu.Lock()
				defer a.mu.Unlock()
				if a.procs[l.id] == l && l.proc != nil && !l.fencing {
					a.stopLocked(l, syscall.SIGTERM)
				}
			})
			a.Log.Info("moved elsewhere; stopping the old incarnation", "id", l.id, "incarnation", l.inc, "in", handoffDelay)
		case restart.Finish:
			if l == nil {
				l = &local{id: act.ID, inc: act.Record.Incarnation}
				a.procs[act.ID] = l
			}
			a.doneLocked(l)
			a.report(act.Record, pb.ProcessState_PROCESS_STATE_KILLED, 0, Exit{Code: -1, Reason: "killed"}, act.Record.Restarts)
		case restart.Resize:
			if l.proc == nil {
				continue // starting: start applies the new bounds when it is up
			}
			if err := l.proc.Resize(act.Record.Spec.GetResources()); err != nil {
				a.Log.Warn("resize failed", "id", l.id, "err", err)
				continue
			}
			l.applied = act.Record.Spec.GetResources()
			l.rec = act.Record
			a.saveState(l)
			a.Log.Info("resized in place", "id", l.id, "pid", l.proc.PID())
		case restart.Start:
			a.startLocked(act.Record, act.Record.Restarts)
		case restart.Recover:
			exit := Exit{Code: -1, Reason: "not running here: exited while shimd was down, or fenced"}
			if l != nil && l.lost != nil {
				exit = *l.lost
			}
			if l == nil {
				l = &local{id: act.ID, inc: act.Record.Incarnation, restarts: act.Record.Restarts}
				a.procs[act.ID] = l
			}
			l.rec, l.lost = act.Record, nil
			a.exitedLocked(l, exit)
		}
	}
}

// stopLocked sends l's process sig (SIGTERM when 0), and SIGKILL once the
// stop grace period is over.
func (a *Agent) stopLocked(l *local, sig syscall.Signal) {
	if sig == 0 {
		sig = syscall.SIGTERM
	}
	if l.timer != nil {
		l.timer.Stop()
		l.timer = nil
	}
	if err := l.proc.Signal(sig); err != nil {
		a.Log.Warn("stop: signal failed; killing", "id", l.id, "err", err)
		_ = l.proc.Kill()
		return
	}
	if sig == syscall.SIGKILL {
		return
	}
	p := l.proc
	time.AfterFunc(a.StopGrace, func() {
		select {
		case <-p.Done():
		default:
			a.Log.Info("stop: grace period over; killing", "id", l.id)
			_ = p.Kill()
		}
	})
}

// startParallel bounds how many processes one node starts at once. A start
// waits on the kernel's cgroup locks as much as it computes: 8 at once
// restarted 150 processes about a third faster than 4 on the 2-core test
// machine (TestNodeDeath), and 16 no faster than 8.
const startParallel = 8

// handoffDelay is how long the old incarnation of a process that moved
// make-before-break (drain, resize --move) keeps running after its successor
// reports running: "running" means exec'd, and a workload takes a moment
// more to start up (bash alone takes milliseconds here). Nomad's
// min_healthy_time (10 s by default) plays this part in its deployments.
const handoffDelay = 500 * time.Millisecond

// startLocked starts one incarnation of a process. The slow part, the
// runtime's Start, runs outside the lock so that lease renewals and fencing
// never wait behind a burst of starts.
func (a *Agent) startLocked(rec *pb.ProcessRecord, restarts uint32) {
	l := a.procs[rec.Id]
	if l == nil {
		l = &local{id: rec.Id}
		a.procs[rec.Id] = l
	}
	l.inc, l.rec, l.restarts = rec.Incarnation, rec, restarts
	l.starting, l.stopping, l.handoff, l.movedAway, l.fencing, l.done, l.timer = true, false, false, false, false, false, nil
	go a.start(l, rec, restarts)
}

func (a *Agent) start(l *local, rec *pb.ProcessRecord, restarts uint32) {
	a.startSem <- struct{}{}
	defer func() { <-a.startSem }()
	a.mu.Lock()
	if a.procs[l.id] != l || !l.starting {
		a.mu.Unlock()
		return
	}
	if l.fencing || l.stopping || !a.mayStartLocked() {
		// Fenced, killed, or the lease ran out while it waited its turn:
		// nothing was started, so nothing is left to wait for. Forget it
		// and let the table say again what to do (report it killed, or
		// start it once the lease is back); kept, it would pass for
		// starting forever.
		l.starting = false
		delete(a.procs, l.id)
		a.reconcileLocked()
		a.mu.Unlock()
		return
	}
	a.mu.Unlock()
	spec := rec.Spec
	begin := time.Now()
	p, err := a.Runtime.Start(Spec{
		ID: rec.Id, Incarnation: rec.Incarnation, Argv: spec.Command, Env: a.env(rec), Dir: spec.Dir,
		LogPath: LogPath(a.DataDir, rec.Id), Resources: spec.Resources, Isolation: spec.Isolation,
		Network: spec.Network, User: spec.User, Rootfs: spec.Rootfs,
	})
	a.mu.Lock()
	defer a.mu.Unlock()
	if err != nil {
		a.Metrics.ProcessFailures.Inc()
		a.Log.Warn("start failed", "id", rec.Id, "err", err)
		if a.procs[l.id] == l {
			a.doneLocked(l)
		}
		a.report(rec, pb.ProcessState_PROCESS_STATE_FAILED, 0, Exit{Code: -1, Reason: err.Error()}, restarts)
		return
	}
	a.Metrics.ProcessStarts.Inc()
	a.Metrics.StartLatency.Observe(time.Since(begin).Seconds())
	if a.procs[l.id] != l || l.fencing || !a.mayStartLocked() {
		// Fenced, moved or killed while starting: it must not run. The
		// entry stays until the process and its sandbox are gone.
		_ = p.Kill()
		if a.procs[l.id] == l {
			l.proc, l.starting, l.fencing = p, false, true
			go a.wait(l, p)
		}
		return
	}
	l.proc, l.applied, l.starting, l.startedAt = p, spec.Resources, false, a.Now()
	a.saveState(l)
	a.reportRunning(l)
	go a.wait(l, p)
	if l.stopping || !sameAssignment(a.assigned, rec) {
		// Killed or resized while it was starting: catch up now.
		l.stopping = false
		a.reconcileLocked()
	}
}

// stillAssigned reports whether the table still assigns l's incarnation here.
func (a *Agent) stillAssigned(l *local) bool {
	for _, r := range a.assigned {
		if r.Id == l.id {
			return r.Incarnation == l.inc && !r.Stop
		}
	}
	return false
}

// assignedInc reports whether the table assigns incarnation inc of id here.
func (a *Agent) assignedInc(id string, inc uint64) bool {
	i, ok := slices.BinarySearchFunc(a.assigned, id, func(r *pb.ProcessRecord, id string) int { return strings.Compare(r.Id, id) })
	return ok && a.assigned[i].Incarnation == inc
}

// sameAssignment reports whether rec is still the current assignment.
func sameAssignment(assigned []*pb.ProcessRecord, rec *pb.ProcessRecord) bool {
	for _, r := range assigned {
		if r.Id == rec.Id {
			return r == rec
		}
	}
	return false
}

const defaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// env is the process's environment: its spec's, plus SHIM_PROCESS_ID,
// SHIM_PROCESS_NAME, SHIM_INCARNATION and SHIM_NODE.
func (a *Agent) env(rec *pb.ProcessRecord) []string {
	env := make([]string, 0, len(rec.Spec.Env)+5)
	hasPath := false
	for _, e := range rec.Spec.Env {
		hasPath = hasPath || strings.HasPrefix(e, "PATH=")
	}
	if !hasPath {
		env = append(env, defaultPath)
	}
	env = append(env, rec.Spec.Env...)
	return append(env, "SHIM_PROCESS_ID="+rec.Id, "SHIM_PROCESS_NAME="+rec.Spec.Name,
		fmt.Sprintf("SHIM_INCARNATION=%d", rec.Incarnation), "SHIM_NODE="+a.Node.Name)
}

func (a *Agent) reportRunning(l *local) {
	a.queue(&pb.StatusUpdate{Id: l.id, Incarnation: l.inc, State: pb.ProcessState_PROCESS_STATE_RUNNING,
		Pid: int64(l.proc.PID()), StartTime: l.proc.StartTime(), Restarts: l.restarts, AtUnixNano: a.Now().UnixNano()})
}

// wait handles the end of one run.
func (a *Agent) wait(l *local, p Proc) {
	<-p.Done()
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.procs[l.id] != l || l.proc != p {
		return
	}
	a.exitedLocked(l, p.Exit())
}

// exitedLocked applies the restart policy to an exit.
func (a *Agent) exitedLocked(l *local, exit Exit) {
	l.proc = nil
	rec := l.rec
	switch {
	case l.handoff:
		delete(a.procs, l.id)
		a.dropState(l.id)
		return
	case l.fencing:
		delete(a.procs, l.id)
		a.dropState(l.id)
		if a.stillAssigned(l) {
			// Fenced for a lost lease that came back before the leader
			// moved it: the table still wants it here, so start it again.
			a.reconcileLocked()
		}
		return
	case l.stopping || rec.GetStop():
		a.doneLocked(l)
		a.report(rec, pb.ProcessState_PROCESS_STATE_KILLED, 0, exit, l.restarts)
		return
	}
	d := a.Policy.Decide(rec.Spec.GetRestart(), exit.Failed(), a.Now().Sub(l.startedAt), l.consecutive)
	if !d.Restart {
		a.doneLocked(l)
		state := pb.ProcessState_PROCESS_STATE_EXITED
		if exit.Failed() {
			state = pb.ProcessState_PROCESS_STATE_FAILED
		}
		a.report(rec, state, 0, exit, l.restarts)
		return
	}
	l.consecutive = d.Consecutive
	a.report(rec, pb.ProcessState_PROCESS_STATE_BACKOFF, 0, exit, l.restarts)
	a.restartAfter(l, d.Delay)
}

// doneLocked keeps l as finished here. Its final state is reported, but
// until the table shows it the table still lists it as live: forgetting it
// now would make it look lost, and Reconcile would "recover" it (report it
// again as dead for an unknown reason, or start it again). reconcileLocked
// drops it once the table no longer assigns that incarnation.
func (a *Agent) doneLocked(l *local) {
	if l.timer != nil {
		l.timer.Stop()
		l.timer = nil
	}
	l.proc, l.done, l.starting = nil, true, false
	a.dropState(l.id)
}

// restartAfter starts l again after delay. Without a lease (or before the
// table that granted it is seen) it waits and tries again; losing the lease
// for good is the fence's business, which drops the waiting entry.
func (a *Agent) restartAfter(l *local, delay time.Duration) {
	l.timer = time.AfterFunc(delay, func() {
		a.mu.Lock()
		defer a.mu.Unlock()
		if a.procs[l.id] != l || l.timer == nil {
			return
		}
		if !a.mayStartLocked() {
			a.restartAfter(l, 100*time.Millisecond)
			return
		}
		l.timer = nil
		a.startLocked(l.rec, l.restarts+1)
	})
}

func (a *Agent) report(rec *pb.ProcessRecord, state pb.ProcessState, pid int64, exit Exit, restarts uint32) {
	// The runtime's plain "exited" or "signaled" says less than the code or
	// the signal does; its other reasons (killed, oom-killed, unknown) say
	// more.
	reason := exit.Reason
	if d := describe(exit); d != "" && (reason == "" || reason == "exited" || reason == "signaled") {
		reason = d
	}
	a.queue(&pb.StatusUpdate{Id: rec.Id, Incarnation: rec.Incarnation, State: state, Pid: pid,
		ExitCode: int32(exit.Code), Reason: reason, Restarts: restarts, AtUnixNano: a.Now().UnixNano()})
}

func describe(e Exit) string {
	switch {
	case e.OOMKilled:
		return "oom-killed"
	case e.Signal != "":
		return "signal: " + e.Signal
	case e.Code > 0:
		return fmt.Sprintf("exit status %d", e.Code)
	}
	return ""
}

// ---- usage ----

// sampleEvery is how often the agent reads its processes' cgroup stats.
const sampleEvery = 2 * time.Second

// sample reads every running process's usage periodically, so that CPU use
// can be given as a rate.
func (a *Agent) sample(ctx context.Context) {
	t := time.NewTicker(sampleEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		a.mu.Lock()
		procs := make([]*local, 0, len(a.procs))
		for _, l := range a.procs {
			if l.proc != nil {
				procs = append(procs, l)
			}
		}
		a.mu.Unlock()
		for _, l := range procs {
			a.sampleOne(l)
		}
	}
}

func (a *Agent) sampleOne(l *local) {
	a.mu.Lock()
	p := l.proc
	a.mu.Unlock()
	if p == nil {
		return
	}
	u, err := p.Stats()
	if err != nil {
		return
	}
	now := a.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	if prev := l.usage; prev != nil && u.CpuUsageNanos >= prev.CpuUsageNanos {
		if dt := now.Sub(l.sampledAt); dt > 0 {
			u.CpuMilli = int64(float64(u.CpuUsageNanos-prev.CpuUsageNanos) / float64(dt.Nanoseconds()) * 1000)
		}
	}
	l.usage, l.sampledAt = u, now
}

// Usage returns the use of the given processes (all when ids is empty):
// their last sample, or, with fresh, their cgroups read now (the CPU rate
// still comes from the last two samples).
func (a *Agent) Usage(ids []string, fresh bool) map[string]*pb.Usage {
	a.mu.Lock()
	var want []*local
	if len(ids) == 0 {
		for _, l := range a.procs {
			want = append(want, l)
		}
	} else {
		for _, id := range ids {
			if l := a.procs[id]; l != nil {
				want = append(want, l)
			}
		}
	}
	out := make(map[string]*pb.Usage, len(want))
	if !fresh {
		for _, l := range want {
			if l.proc != nil && l.usage != nil {
				out[l.id] = l.usage
			}
		}
		a.mu.Unlock()
		return out
	}
	a.mu.Unlock()
	for _, l := range want {
		a.mu.Lock()
		p, last := l.proc, l.usage
		a.mu.Unlock()
		if p == nil {
			continue
		}
		u, err := p.Stats()
		if err != nil {
			continue
		}
		if last != nil {
			u.CpuMilli = last.CpuMilli
		}
		out[l.id] = u
	}
	return out
}

// ---- reports ----

func (a *Agent) queue(u *pb.StatusUpdate) {
	select {
	case a.reports <- u:
	default:
		a.Log.Warn("report queue full; dropping", "id", u.Id)
	}
}

// reporter sends status updates in batches; the latest update of each
// process wins, and failed batches are retried.
func (a *Agent) reporter(ctx context.Context) {
	pending := map[string]*pb.StatusUpdate{}
	var order []string
	add := func(u *pb.StatusUpdate) {
		if _, ok := pending[u.Id]; !ok {
			order = append(order, u.Id)
		}
		pending[u.Id] = u
	}
	for {
		if len(pending) == 0 {
			select {
			case <-ctx.Done():
				return
			case u := <-a.reports:
				add(u)
			}
		}
	drain:
		for len(pending) < 2048 {
			select {
			case u := <-a.reports:
				add(u)
			default:
				break drain
			}
		}
		batch := make([]*pb.StatusUpdate, 0, len(order))
		for _, id := range order {
			batch = append(batch, pending[id])
		}
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := call(rctx, a, 2*time.Second, func(ctx context.Context, c shimv1connect.AgentServiceClient) (*connect.Response[pb.ReportResponse], error) {
			return c.Report(ctx, connect.NewRequest(&pb.ReportRequest{Report: &pb.Report{Node: a.Node.Name, Updates: batch}}))
		})
		cancel()
		if err != nil {
			a.Log.Debug("report failed; retrying", "err", err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(100 * time.Millisecond):
			}
			continue
		}
		for _, u := range batch {
			if pending[u.Id] == u {
				delete(pending, u.Id)
			}
		}
		order = order[:0]
		for id := range pending {
			order = append(order, id)
		}
	}
}

// ---- state kept across agent restarts ----

type state struct {
	Incarnation uint64 `json:"incarnation"`
	PID         int    `json:"pid"`
	StartTime   uint64 `json:"start_time"`
	Restarts    uint32 `json:"restarts"`
	StartedUnix int64  `json:"started_unix_nano"`
	Resources   []byte `json:"resources"` // the bounds applied, as a pb.Resources
}

// LogPath is where a process's output is kept under the data dir.
func LogPath(dataDir, id string) string { return filepath.Join(dataDir, "logs", id+".log") }

func (a *Agent) saveState(l *local) {
	res, _ := proto.Marshal(l.applied)
	st := state{Incarnation: l.inc, PID: l.proc.PID(), StartTime: l.proc.StartTime(),
		Restarts: l.restarts, StartedUnix: l.startedAt.UnixNano(), Resources: res}
	if err := a.states.put(l.id, st); err != nil {
		a.Log.Warn("save process state", "id", l.id, "err", err)
	}
}

func (a *Agent) dropState(id string) {
	if err := a.states.drop(id); err != nil {
		a.Log.Warn("drop process state", "id", id, "err", err)
	}
}

// adopt takes over the processes an earlier agent left running.
func (a *Agent) adopt() error {
	var err error
	if a.states, err = openStateLog(a.DataDir); err != nil {
		return err
	}
	saved := a.states.all()
	found, err := a.Runtime.Existing()
	if err != nil {
		return err
	}
	for _, f := range found {
		st, ok := saved[f.ID]
		if !ok || st.Incarnation != f.Incarnation {
			a.Log.Warn("removing a sandbox with no usable state", "id", f.ID, "incarnation", f.Incarnation)
			_ = a.Runtime.Remove(f.ID, f.Incarnation)
			continue
		}
		l := &local{id: f.ID, inc: f.Incarnation, restarts: st.Restarts, startedAt: time.Unix(0, st.StartedUnix),
			rec: &pb.ProcessRecord{Id: f.ID, Incarnation: f.Incarnation, Spec: &pb.ProcessSpec{}}}
		p, err := a.Runtime.Adopt(f.ID, f.Incarnation, st.PID, st.StartTime)
		if err != nil {
			a.Log.Info("process ended while shimd was down", "id", f.ID, "err", err)
			_ = a.Runtime.Remove(f.ID, f.Incarnation)
			l.lost = &Exit{Code: -1, Reason: "exited while shimd was down"}
			a.procs[f.ID] = l
			continue
		}
		l.proc = p
		l.applied = &pb.Resources{}
		if err := proto.Unmarshal(st.Resources, l.applied); err != nil {
			l.applied = nil // unknown: the next assignment applies its bounds again
		}
		a.procs[f.ID] = l
		a.Log.Info("re-adopted process", "id", f.ID, "pid", p.PID())
		go a.wait(l, p)
	}
	// Lost processes whose sandbox is already gone are still recorded.
	for id, st := range saved {
		if a.procs[id] == nil {
			a.procs[id] = &local{id: id, inc: st.Incarnation, restarts: st.Restarts,
				lost: &Exit{Code: -1, Reason: "exited while shimd was down"},
				rec:  &pb.ProcessRecord{Id: id, Incarnation: st.Incarnation, Spec: &pb.ProcessSpec{}}}
		}
	}
	return nil
}
