package agent

import (
	pb "github.com/shim-run/shim/proto/shimv1"
)

// On-lost keep (see table/lost.go). When the lease runs out, the fence
// spares the running processes whose spec says on-lost keep (KillAll and
// the guard skip their sandboxes: Spec.Keep), and the agent keeps them in
// its books. Back with a lease, the table holds such a process here as its
// cut_off incarnation while the newer one starts elsewhere; Reconcile
// keeps the copy until the newer one runs, then fences it with the record,
// and the agent reports the copy's end, which clears cut_off. A copy that
// is no longer here (it ended while shimd was away) is reported ended at
// once.

// keptOnLost reports whether a fence spares l: a running process with
// on-lost keep.
func (l *local) keptOnLost() bool {
	return l.proc != nil && !l.starting && !l.fencing && !l.stopping &&
		l.rec.GetSpec().GetOnLost() == pb.OnLost_ON_LOST_KEEP
}

// cutOffCopiesLocked is the assignments Reconcile sees: a record this node
// holds only for a cut-off copy is passed on if that copy is here (Reconcile
// keeps or stops it), and otherwise reported ended and left out (there is
// nothing here to start).
func (a *Agent) cutOffCopiesLocked() []*pb.ProcessRecord {
	out := a.assigned[:0:0]
	for _, r := range a.assigned {
		c := r.GetCutOff()
		if c == nil || c.Node != a.Node.Name || r.Node == a.Node.Name || r.MoveTo == a.Node.Name {
			out = append(out, r)
			continue
		}
		if l := a.procs[r.Id]; l != nil && l.inc == c.Incarnation {
			out = append(out, r)
			continue
		}
		if a.mayStartLocked() {
			a.reports.put(&pb.StatusUpdate{Id: r.Id, Incarnation: c.Incarnation, State: pb.ProcessState_PROCESS_STATE_KILLED,
				ExitCode: -1, Reason: "not running here when the node came back", AtUnixNano: a.Clock.Now().UnixNano()})
		}
	}
	return out
}

// reportCutOffEnd reports that the cut-off copy l ended.
func (a *Agent) reportCutOffEnd(l *local, exit Exit) {
	rec := l.rec
	if rec == nil || rec.Incarnation != l.inc {
		rec = &pb.ProcessRecord{Id: l.id, Incarnation: l.inc}
	}
	exit.Reason = "stopped: the newer incarnation runs"
	a.report(rec, pb.ProcessState_PROCESS_STATE_KILLED, 0, exit, l.restarts)
}
