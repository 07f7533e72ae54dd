package agent

import (
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// With on-lost keep, a process survives the fence when the lease runs out;
// back with a lease, it runs on while its newer incarnation starts
// elsewhere, is stopped once that one runs, and its end is reported (for
// its own incarnation). A fence process beside it is fenced as always.
func TestOnLostKeepSurvivesTheFence(t *testing.T) {
	cp := newFakeCP()
	keep := assignment("k", 1, pb.ProcessState_PROCESS_STATE_STARTING)
	keep.Spec.OnLost = pb.OnLost_ON_LOST_KEEP
	fence := assignment("f", 1, pb.ProcessState_PROCESS_STATE_STARTING)
	cp.set(1, keep, fence)
	rt := &countingRuntime{}
	a := startAgent(t, cp, rt)
	waitUntil(t, 5*time.Second, "both started", func() bool { return rt.starts.Load() == 2 })
	procOf := func(id string) *simProc {
		a.mu.Lock()
		defer a.mu.Unlock()
		if l := a.procs[id]; l != nil && l.proc != nil {
			return l.proc.(*simProc)
		}
		return nil
	}
	var kp, fp *simProc
	waitUntil(t, 5*time.Second, "both running", func() bool { kp, fp = procOf("k"), procOf("f"); return kp != nil && fp != nil })
	fences := rt.killAlls.Load()

	cp.setUp(false)
	waitUntil(t, 5*time.Second, "the fence", func() bool { return rt.killAlls.Load() > fences })
	waitUntil(t, 5*time.Second, "f fenced", func() bool {
		select {
		case <-fp.Done():
			return true
		default:
			return false
		}
	})
	select {
	case <-kp.Done():
		t.Fatal("the on-lost keep process was fenced with the lease")
	default:
	}

	// The cluster moved both; the newer k starts on n2, the cut-off copy
	// is held here.
	moved := assignment("k", 2, pb.ProcessState_PROCESS_STATE_STARTING)
	moved.Node, moved.Spec.OnLost = "n2", pb.OnLost_ON_LOST_KEEP
	moved.CutOff = &pb.Incarnation{Incarnation: 1, Node: "n1"}
	cp.set(5, moved)
	cp.setUp(true)
	deadline := time.Now().Add(500 * time.Millisecond) // renewals and a reconcile or two
	for time.Now().Before(deadline) {
		select {
		case <-kp.Done():
			t.Fatal("the cut-off copy was stopped before its newer incarnation ran")
		default:
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n := rt.starts.Load(); n != 2 {
		t.Fatalf("%d starts; the node started a copy it holds only as cut off", n)
	}
	running := proto.CloneOf(moved)
	running.State = pb.ProcessState_PROCESS_STATE_RUNNING
	cp.set(6, running)
	waitUntil(t, 5*time.Second, "the cut-off copy stopped", func() bool {
		select {
		case <-kp.Done():
			return true
		default:
			return false
		}
	})
	waitUntil(t, 5*time.Second, "its end reported for incarnation 1", func() bool {
		for _, u := range cp.reported() {
			if u.Id == "k" && u.Incarnation == 1 && u.State == pb.ProcessState_PROCESS_STATE_KILLED {
				return true
			}
		}
		return false
	})
}
