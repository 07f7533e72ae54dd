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
// deadline is passed on to the guard (Deadline), and a timer fences the node
// when it passes: every process in the node's sandboxes is killed at once.
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
				a.renew(leaseEnd(sent, resp.Msg.LeaseMillis, a.Lease), resp.Msg.Index)
				a.servers(resp.Msg.Servers)
				a.checkWatch(resp.Msg.NodeIndex)
			}
		}()
		a.lease.Lock()
		wait := beatWait(a.Lease, a.lease.until.Sub(a.Clock.Now()))
		a.lease.Unlock()
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
	a.lease.Lock()
	a.publish(sent.Add(a.Hold))
	a.lease.Unlock()
	a.Log.Info("lease held for a restart", "for", a.Hold)
}

// renew takes in a lease granted until until, with the leader's table at
// index.
func (a *Agent) renew(until time.Time, index uint64) {
	a.lease.Lock()
	now := a.Clock.Now()
	extend, counts := renewal(now, until, a.lease.until, a.lease.granted)
	if extend {
		a.lease.until = until
		a.fenceTimer.Reset(until.Sub(now))
		a.publish(until)
	}
	if !counts {
		a.lease.Unlock()
		return
	}
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
	if left := a.lease.until.Sub(a.Clock.Now()); left > 0 {
		a.fenceTimer.Reset(left) // renewed since the timer was set
		a.lease.Unlock()
		return
	}
	if a.lease.fenced || a.lease.stopped {
		a.lease.Unlock()
		return
	}
	a.lease.fenced, a.lease.killing, a.lease.index = true, true, 0
	granted := a.lease.granted
	a.lease.Unlock()
	start := a.Clock.Now()
	if err := a.Runtime.KillAll(); err != nil {
		a.Log.Error("fence: kill all failed", "err", err)
	}
	took := a.Clock.Now().Sub(start)
	a.mu.Lock()
	n := 0
	for _, l := range a.procs {
		if l.occupied() {
			a.fenceLocked(l, "lease expired")
			n++
		}
	}
	a.mu.Unlock()
	if note := fenceNote(granted, n); note != "" {
		a.Log.Warn(note, "processes", n, "took", took)
	} else {
		a.Log.Debug("no lease yet: nothing may run here until a leader grants one")
	}
	// A renewal that came in meanwhile takes effect only now, after the
	// fence has finished.
	a.lease.Lock()
	a.lease.killing = false
	back := a.lease.index != 0 && a.Clock.Now().Before(a.lease.until)
	index, first := a.lease.index, !a.lease.granted
	if back {
		a.lease.fenced, a.lease.granted = false, true
	}
	a.lease.Unlock()
	if back {
		a.regained(index, first)
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
	return !a.lease.fenced && !a.lease.stopped && a.Clock.Now().Before(a.lease.until)
}

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
