package table

import (
	"slices"
	"testing"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// A lost node's process moves either way; with on-lost keep the table keeps
// the old copy as cut off (the lost node still holds the record) until that
// node reports it stopped, which moves it to the history. With fence the
// old copy goes to the history at once.
func TestOnLostKeep(t *testing.T) {
	x := threeNodes(t)
	keep, fence := spec(100), spec(100)
	keep.Node, fence.Node = "", ""
	keep.OnLost = pb.OnLost_ON_LOST_KEEP
	x.ok(spawnCmd(keep, "k"))
	node := x.get("k").Node
	x.ok(reportCmd(node, &pb.StatusUpdate{Id: "k", Incarnation: 1, State: pb.ProcessState_PROCESS_STATE_RUNNING, Pid: 42}))
	fence.Node = node
	x.ok(spawnCmd(fence, "f"))
	x.ok(downCmd(node))

	k, f := x.get("k"), x.get("f")
	if k.Incarnation != 2 || k.Node == node || k.CutOff.GetNode() != node || k.CutOff.GetIncarnation() != 1 || k.CutOff.GetPid() != 42 {
		t.Fatalf("keep: inc %d on %s, cut off %v; want inc 2 elsewhere, inc 1 (pid 42) cut off on %s", k.Incarnation, k.Node, k.CutOff, node)
	}
	if len(k.History) != 0 {
		t.Fatalf("keep: history %v before the copy is seen stopped", k.History)
	}
	if f.CutOff != nil || len(f.History) != 1 || f.History[0].State != pb.ProcessState_PROCESS_STATE_KILLED {
		t.Fatalf("fence: cut off %v, history %v; want the old copy killed in the history", f.CutOff, f.History)
	}
	held, _ := x.tb.Assignments(node)
	if len(held) != 1 || held[0].Id != "k" {
		t.Fatalf("the lost node holds %v, want k alone (its cut-off copy)", held)
	}
	// A report on the new incarnation from the lost node is stale; one on
	// the cut-off copy ends it.
	x.ok(reportCmd(node, &pb.StatusUpdate{Id: "k", Incarnation: 2, State: pb.ProcessState_PROCESS_STATE_RUNNING, Pid: 7}))
	if x.get("k").State != pb.ProcessState_PROCESS_STATE_STARTING {
		t.Fatal("a report from the lost node changed the new incarnation")
	}
	x.ok(reportCmd(node, &pb.StatusUpdate{Id: "k", Incarnation: 1, State: pb.ProcessState_PROCESS_STATE_KILLED, ExitCode: -1}))
	k = x.get("k")
	if k.CutOff != nil || len(k.History) != 1 || k.History[0].Incarnation != 1 || k.History[0].State != pb.ProcessState_PROCESS_STATE_KILLED {
		t.Fatalf("after the copy's end: cut off %v, history %v", k.CutOff, k.History)
	}
	held, _ = x.tb.Assignments(node)
	if slices.ContainsFunc(held, func(r *pb.ProcessRecord) bool { return r.Id == "k" }) {
		t.Fatal("the lost node still holds k after its copy ended")
	}
}
