package agent

import (
	"context"
	"sync"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

// The node's lease. Heartbeats renew it every fifth of a lease, each on its
// own goroutine; a lease counts from the moment its heartbeat was sent. The
// lease type holds the deadline, passes it on to the guard (Deadline), and
// fences the node when it passes (fenceAll: every process in the node's
// sandboxes is killed at once).
// A node acts (starts, stops, reports) only with a lease, on a table at least
// as new as the one that granted it (minIndex). The decisions are pure
// functions of the time (beatWait, leaseEnd, renewal, fenceNote), as Nomad's
// heartbeatstop.go decides shouldStopAfter(now, d).

// heartbeats renews the lease every fifth of a lease (every 50 ms while
// unanswered). Each heartbeat runs on its own, so one stuck on a leader that
// is gone never delays the next, which may reach the new one. The lease is
// counted from the moment the acknowledged heartbeat was sent (see
// server/lease.go).
func (a *Agent) heartbeats(ctx context.Context) {
	var rejoin sync.Mutex
	for {
		sent := a.Clock.Now()
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
				a.lease.renew(leaseEnd(sent, resp.Msg.LeaseMillis, a.Lease), resp.Msg.Index)
				a.servers(resp.Msg.Servers)
				a.checkWatch(resp.Msg.NodeIndex)
			}
		}()
		wait := beatWait(a.Lease, a.lease.left())
		select {
		case <-ctx.Done():
			return
		case <-a.Clock.After(wait):
		}
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
	sent := a.Clock.Now()
	_, err := call(ctx, a, 500*time.Millisecond, func(ctx context.Context, c shimv1connect.AgentServiceClient) (*connect.Response[pb.HeartbeatResponse], error) {
		return c.Heartbeat(ctx, connect.NewRequest(&pb.HeartbeatRequest{Node: a.Node.Name, HoldMillis: a.Hold.Milliseconds()}))
	})
	if err != nil {
		a.Log.Warn("could not hold the lease for a restart: the guard stops the node's processes when the lease runs out, as the cluster will move them", "err", err)
		return
	}
	a.lease.hold(sent.Add(a.Hold))
	a.Log.Info("lease held for a restart", "for", a.Hold)
}

// lease is the node's lease: until when the node may run processes, and the
// fence when that time passes. It has its own lock, so that renewing and
// fencing never wait behind the agent's other work; what a fence does to the
// agent's books, and what a grant lets the agent do, are its fence and
// regained functions, called without the lock.
type lease struct {
	sync.Mutex
	clock    Clock
	publish  func(until time.Time)          // passes a deadline to the guard; called under the lock, in order
	fence    func(granted bool)             // kills every process in the node's sandboxes
	regained func(index uint64, first bool) // the node may act: at start, or after a fence

	until   time.Time // monotonic: the node may run processes until then
	timer   Timer     // fires at until
	fenced  bool
	killing bool   // the fence is under way; a renewal waits for it
	index   uint64 // the index of a renewal that came while killing
	stopped bool   // the agent is shutting down: no fence, no starts
	granted bool   // a leader has granted a lease since the agent started
}

// arm starts the lease at resume (the lease the previous agent held), or now
// if that has passed: until a leader grants one, nothing may run after it.
func (l *lease) arm(resume time.Time) {
	l.Lock()
	defer l.Unlock()
	now := l.clock.Now()
	l.until = resume
	if l.until.Before(now) {
		l.until = now
	}
	l.timer = l.clock.AfterFunc(l.until.Sub(now), l.check)
	l.publish(l.until)
}

// stop turns the fence off for good: the agent is stopping on purpose, and
// the processes outlive it.
func (l *lease) stop() {
	l.Lock()
	defer l.Unlock()
	l.stopped = true
	l.timer.Stop()
}

// hold publishes the deadline of a lease the leader holds for a restart.
func (l *lease) hold(until time.Time) {
	l.Lock()
	defer l.Unlock()
	l.publish(until)
}

// valid reports whether the node holds a lease now.
func (l *lease) valid() bool {
	l.Lock()
	defer l.Unlock()
	return !l.fenced && !l.stopped && l.clock.Now().Before(l.until)
}

// left returns how long the lease held has to run (negative once past).
func (l *lease) left() time.Duration {
	l.Lock()
	defer l.Unlock()
	return l.until.Sub(l.clock.Now())
}

// renew takes in a lease granted until until, with the leader's table at
// index.
func (l *lease) renew(until time.Time, index uint64) {
	l.Lock()
	now := l.clock.Now()
	extend, counts := renewal(now, until, l.until, l.granted)
	if extend {
		l.until = until
		l.timer.Reset(until.Sub(now))
		l.publish(until)
	}
	if !counts {
		l.Unlock()
		return
	}
	if l.killing {
		l.index = index // check takes it from here
		l.Unlock()
		return
	}
	wasFenced, first := l.fenced, !l.granted
	l.fenced, l.granted = false, true
	l.Unlock()
	if wasFenced || first {
		l.regained(index, first)
	}
}

// check fences the node when its lease has run out. A renewal that comes in
// during the fence takes effect only once the fence has finished.
func (l *lease) check() {
	l.Lock()
	if left := l.until.Sub(l.clock.Now()); left > 0 {
		l.timer.Reset(left) // renewed since the timer was set
		l.Unlock()
		return
	}
	if l.fenced || l.stopped {
		l.Unlock()
		return
	}
	l.fenced, l.killing, l.index = true, true, 0
	granted := l.granted
	l.Unlock()
	l.fence(granted)
	l.Lock()
	l.killing = false
	back := l.index != 0 && l.clock.Now().Before(l.until)
	index, first := l.index, !l.granted
	if back {
		l.fenced, l.granted = false, true
	}
	l.Unlock()
	if back {
		l.regained(index, first)
	}
}

// publish passes a lease deadline on to the guard.
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

// fenceAll is the fence: it kills every process in the node's sandboxes at
// once, without waiting for the agent's lock, and only then tidies the
// agent's books. granted tells whether a leader granted this agent a lease.
func (a *Agent) fenceAll(granted bool) {
	a.mu.Lock()
	a.fences++
	a.mu.Unlock()
	start := a.Clock.Now()
	if err := a.Runtime.KillAll(); err != nil {
		a.Log.Error("fence: kill all failed", "err", err)
	}
	took := a.Clock.Now().Sub(start)
	a.mu.Lock()
	n, kept := 0, 0
	for _, l := range a.procs {
		if l.keptOnLost() {
			kept++ // lost.go: it runs on; KillAll spared it
			continue
		}
		if l.occupied() {
			a.fenceLocked(l, "lease expired")
			n++
		}
	}
	a.mu.Unlock()
	if kept > 0 {
		a.Log.Warn("lease expired: kept running the processes with on-lost keep", "processes", kept)
	}
	if note := fenceNote(granted, n); note != "" {
		a.Log.Warn(note, "processes", n, "took", took)
	} else {
		a.Log.Debug("no lease yet: nothing may run here until a leader grants one")
	}
}

// fenceLocked kills a process at once; the table has or will have moved it.
func (a *Agent) fenceLocked(l *local, why string) {
	l.stopTimer()
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
		if l.cutOff {
			a.reportCutOffEnd(l, Exit{Code: -1, Reason: "killed"})
		}
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

func (a *Agent) leaseValid() bool { return a.lease.valid() }

// beatWait is how long the agent waits before its next heartbeat, with left
// of a lease of length lease to run: a fifth of a lease, and at most 50 ms
// once the last beats went unanswered (less than three quarters left).
func beatWait(lease, left time.Duration) time.Duration {
	wait := lease / 5
	if left < lease*3/4 {
		wait = min(wait, 50*time.Millisecond)
	}
	return wait
}

// leaseEnd is the end of a lease granted for grantedMillis (the agent's own
// lease when 0) to a heartbeat sent at sent: the lease counts from the
// moment the heartbeat was sent, which the leader cannot know to be later.
func leaseEnd(sent time.Time, grantedMillis int64, own time.Duration) time.Time {
	lease := time.Duration(grantedMillis) * time.Millisecond
	if lease <= 0 {
		lease = own
	}
	return sent.Add(lease)
}

// renewal decides what a lease granted until until and acknowledged at now
// does to the lease held until held: extend moves the deadline out to until;
// counts tells whether it is news at all, so that a first grant, or the
// first after a fence, lets the agent act. A grant acknowledged too late is
// worth nothing. A first grant may end before the lease held since the agent
// started (a clean stop's held lease): it counts, and leaves the deadline.
func renewal(now, until, held time.Time, granted bool) (extend, counts bool) {
	switch {
	case !now.Before(until):
		return false, false
	case until.After(held):
		return true, true
	}
	return false, !granted
}

// fenceNote is what the agent logs after a fence that found n processes
// (running, starting or waiting to restart), granted telling whether a
// leader has granted this agent a lease. It is "" when there is nothing to
// say: at start, with no lease yet and nothing left by the previous shimd,
// nothing expired and nothing was fenced.
func fenceNote(granted bool, n int) string {
	switch {
	case granted:
		return "lease expired: fenced every local process"
	case n > 0:
		return "the lease the previous shimd held ran out before a leader granted one: fenced the processes it left"
	}
	return ""
}
