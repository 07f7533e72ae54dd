package table

import (
	"slices"
	"testing"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// TestHandedOff checks which departures from a node are committed
// make-before-break moves (the node may stop its copy gracefully) and which
// are not (a lost node's processes, which it must have fenced).
func TestHandedOff(t *testing.T) {
	x := newTester(t)
	x.ok(nodeCmd("n1", 4*core, gib))
	x.ok(spawnCmd(spec(100), "a", "b", "c"))
	x.ok(reportCmd("n1", upd("a", 1, pb.ProcessState_PROCESS_STATE_RUNNING), upd("b", 1, pb.ProcessState_PROCESS_STATE_RUNNING),
		upd("c", 1, pb.ProcessState_PROCESS_STATE_RUNNING)))
	x.ok(nodeCmd("n2", 4*core, gib))
	since := x.tb.Index()
	x.ok(drainCmd("n1", true))
	x.ok(reportCmd("n2", upd("a", 2, pb.ProcessState_PROCESS_STATE_RUNNING))) // a's move commits
	x.ok(reportCmd("n2", upd("b", 2, pb.ProcessState_PROCESS_STATE_FAILED)))  // b's is called off
	_, removed, full, _ := x.tb.AssignmentsSince("n1", since)
	if full || !slices.Equal(removed, []string{"a"}) {
		t.Fatalf("n1 since %d: removed %v full %v, want [a]", since, removed, full)
	}
	if got := x.tb.HandedOff("n1", since); !slices.Equal(got, []string{"a"}) {
		t.Fatalf("handed off %v, want [a]", got)
	}
	// A full answer says nothing about departures.
	if got := x.tb.HandedOff("n1", 0); got != nil {
		t.Fatalf("handed off since 0: %v, want none", got)
	}
	// Moved off a lost node: not a hand-off.
	since = x.tb.Index()
	x.ok(drainCmd("n1", false))
	x.ok(downCmd("n1"))
	_, removed, _, _ = x.tb.AssignmentsSince("n1", since)
	if len(removed) != 2 {
		t.Fatalf("n1 lost: removed %v, want b and c", removed)
	}
	if got := x.tb.HandedOff("n1", since); len(got) != 0 {
		t.Fatalf("n1 lost: handed off %v, want none", got)
	}
}
