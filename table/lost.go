package table

import (
	"fmt"

	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// On partition: fence or keep (ProcessSpec.on_lost). When a node is lost
// (its lease ran out) the table places its processes elsewhere under a new
// incarnation, either way. What differs is the old copy:
//   - fence (the default): the node stopped it when its lease ran out (its
//     guard if shimd could not), so it never runs twice. It goes to the
//     record's history as killed.
//   - keep: the node keeps it running, for service that must not stop when
//     a network blips. The record keeps it as its cut_off incarnation (its
//     state unknown: shim ps shows it so), and the lost node keeps holding
//     the record (holders), so that when it returns it is sent the record
//     and stops its copy once the newer incarnation runs. Its report of that
//     copy's end moves cut_off to the history.
// Stopping a process (kill) stops both copies: the record ends, the lost
// node no longer holds it, and it stops what it still runs.

// keepOnLost reports whether rec's copy is kept running on a lost node.
func keepOnLost(rec *pb.ProcessRecord) bool {
	return rec.Spec.GetOnLost() == pb.OnLost_ON_LOST_KEEP && !rec.Stop && rec.MoveTo == ""
}

// cutOff keeps rec's current incarnation, on its lost node, as its cut-off
// copy. A copy cut off earlier and not yet reported stopped goes to the
// history (only the newest is tracked; its node will still stop it, as a
// process it no longer holds).
func (x *txn) cutOff(rec *pb.ProcessRecord, reason string) {
	if rec.Node == "" {
		return
	}
	if rec.CutOff != nil {
		x.retireCutOff(rec, pb.ProcessState_PROCESS_STATE_KILLED, "cut off again before it was seen stopped")
	}
	rec.CutOff = &pb.Incarnation{Incarnation: rec.Incarnation, Node: rec.Node, Pid: rec.Pid,
		Reason: reason + ": kept running (on-lost keep)", StartedUnixNano: rec.StartedUnixNano}
}

// retireCutOff moves rec's cut-off copy to its history, ended in state.
func (x *txn) retireCutOff(rec *pb.ProcessRecord, state pb.ProcessState, why string) {
	c := rec.CutOff
	if c == nil {
		return
	}
	rec.CutOff = nil
	rec.History = append(rec.History, &pb.Incarnation{Incarnation: c.Incarnation, Node: c.Node, Pid: c.Pid, State: state,
		ExitCode: c.ExitCode, Reason: c.Reason + "; " + why, StartedUnixNano: c.StartedUnixNano, EndedUnixNano: x.now})
	if len(rec.History) > historyLimit {
		rec.History = rec.History[len(rec.History)-historyLimit:]
	}
}

// cutOffEnded applies a node's report that the cut-off copy of old ended,
// and reports whether u was that.
func (x *txn) cutOffEnded(old *pb.ProcessRecord, node string, u *pb.StatusUpdate) bool {
	c := old.CutOff
	if c == nil || c.Node != node || c.Incarnation != u.Incarnation || !Terminal(u.State) {
		return false
	}
	rec := proto.CloneOf(old)
	rec.CutOff.ExitCode = u.ExitCode
	x.retireCutOff(rec, u.State, fmt.Sprintf("stopped on %s once incarnation %d ran", node, old.Incarnation))
	x.put(rec)
	return true
}
