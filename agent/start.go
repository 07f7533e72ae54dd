package agent

import (
	"fmt"
	"slices"
	"strings"
	"time"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/table"
)

// Starting and ending runs. A start reserves the entry under the lock and
// runs the runtime's slow Start outside it, startParallel at a time; an exit
// goes through the restart policy (exitedLocked), and a restart waits out its
// backoff on the agent's clock (restartAfter).

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
	if l.winding() || !a.mayStartLocked() {
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
	fences := a.fences
	a.mu.Unlock()
	spec := rec.Spec
	limits := a.startLimits(rec) // an elastic process's follow its grant (grow.go)
	begin := a.Clock.Now()
	rs, err := a.runSpec(rec)
	var p Proc
	if err == nil {
		rs.Resources, rs.Grant = limits, table.GrantOf(rec)
		p, err = a.Runtime.Start(rs)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	cut := a.procs[l.id] == l && (l.fencing || a.fences != fences || !a.mayStartLocked())
	if err != nil && cut {
		// A fence began while it started: its kill may have ended the
		// sandbox's init. That is no failure of the process. Nothing runs:
		// forget it and let the table say again what to do, as above.
		a.Log.Info("start cut short by a fence", "id", rec.Id, "err", err)
		l.starting = false
		delete(a.procs, l.id)
		a.reconcileLocked()
		return
	}
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
	a.Metrics.StartLatency.Observe(a.Clock.Now().Sub(begin).Seconds())
	if a.procs[l.id] != l || cut {
		// Fenced, moved or killed while starting: it must not run. The
		// entry stays until the process and its sandbox are gone.
		_ = p.Kill()
		if a.procs[l.id] == l {
			l.proc, l.starting, l.fencing = p, false, true
			go a.wait(l, p)
		}
		return
	}
	l.proc, l.applied, l.limits, l.starting, l.startedAt = p, spec.Resources, limits, false, a.Clock.Now()
	a.startedLocked(l, rec) // grow.go
	a.saveState(l)
	a.reportRunning(l)
	go a.wait(l, p)
	if rec.Spec.GetCheck() != nil {
		go a.watchHealth(l, p) // health.go
	}
	if l.stopping || !sameAssignment(a.assigned, rec) {
		// Killed or resized while it was starting: catch up.
		l.stopping = false
		a.reconcileSoon()
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
// SHIM_PROCESS_NAME, SHIM_INCARNATION, SHIM_NODE and the way back to the
// cluster (selfEnv: SHIM_ADDR, SHIM_TOKEN, SHIM_CA).
func (a *Agent) env(rec *pb.ProcessRecord) []string {
	env := make([]string, 0, len(rec.Spec.Env)+8)
	hasPath := false
	for _, e := range rec.Spec.Env {
		hasPath = hasPath || strings.HasPrefix(e, "PATH=")
	}
	if !hasPath {
		env = append(env, defaultPath)
	}
	env = append(env, rec.Spec.Env...)
	env = append(env, "SHIM_PROCESS_ID="+rec.Id, "SHIM_PROCESS_NAME="+rec.Spec.Name,
		fmt.Sprintf("SHIM_INCARNATION=%d", rec.Incarnation), "SHIM_NODE="+a.Node.Name)
	env = append(env, serviceEnv(rec, a.Node.Name)...) // health.go
	return append(env, a.selfEnv(rec)...)
}

// wait handles the end of one run. A run the guard killed while the agent
// was paused says so.
func (a *Agent) wait(l *local, p Proc) {
	<-p.Done()
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.procs[l.id] != l || l.proc != p {
		return
	}
	exit := p.Exit()
	if mayBeFence(exit) && guardFenced(a.readFence(), l.id, l.inc, l.startedAt.UnixNano()) {
		exit = fencedExit
	}
	a.exitedLocked(l, exit)
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
		if l.cutOff {
			a.reportCutOffEnd(l, exit)
			return
		}
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
	d := a.Policy.Decide(rec.Spec.GetRestart(), exit.Failed(), a.Clock.Now().Sub(l.startedAt), l.consecutive)
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
	l.stopTimer()
	l.proc, l.done, l.starting = nil, true, false
	a.dropState(l.id)
}

// restartAfter starts l again after delay. Without a lease (or before the
// table that granted it is seen) it waits and tries again; losing the lease
// for good is the fence's business, which drops the waiting entry.
func (a *Agent) restartAfter(l *local, delay time.Duration) {
	l.timer = a.Clock.AfterFunc(delay, func() {
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
