package raftlog

import (
	"errors"
	"testing"
	"time"
)

func (f *kvFSM) lastIndex() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.last
}

// A leader answers ReadIndex only once a Barrier has run in its term, and
// then with its commit index; followers refuse.
func TestReadIndex(t *testing.T) {
	nodes, fsms := cluster(t, "n1", "n2", "n3")
	ctx := ctxT(t)
	leader := waitLeader(t, nodes...)
	if _, err := leader.ReadIndex(ctx); !errors.Is(err, ErrNotReady) {
		t.Fatalf("ReadIndex before any Barrier: %v, want ErrNotReady", err)
	}
	if err := leader.Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	_, idx, err := leader.Apply(ctx, []byte("a=1"))
	if err != nil {
		t.Fatal(err)
	}
	ri, err := leader.ReadIndex(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ri < idx {
		t.Fatalf("ReadIndex %d is below the index %d of an acknowledged write", ri, idx)
	}
	if err := leader.VerifyLeader(ctx); err != nil {
		t.Fatal(err)
	}
	for i, n := range nodes {
		if n == leader {
			continue
		}
		if _, err := n.ReadIndex(ctx); !errors.Is(err, ErrNotLeader) {
			t.Fatalf("follower ReadIndex: %v, want ErrNotLeader", err)
		}
		if err := n.VerifyLeader(ctx); !errors.Is(err, ErrNotLeader) {
			t.Fatalf("follower VerifyLeader: %v, want ErrNotLeader", err)
		}
		// A follower's FSM, extended over what never reaches it,
		// reaches the read index.
		f := fsms[i]
		waitFor(t, 5*time.Second, n.ID()+" to apply through the read index", func() bool {
			return n.AppliedThrough(f.lastIndex()) >= ri
		})
		if v, _ := f.get("a"); v != "1" {
			t.Fatalf("%s applied through %d without a=1", n.ID(), ri)
		}
		if n.CommitIndex() < ri {
			t.Fatalf("%s: commit index %d below %d", n.ID(), n.CommitIndex(), ri)
		}
		if n.LastContact().IsZero() {
			t.Fatalf("%s: no contact with the leader", n.ID())
		}
	}

	// A new leader: not ready until its Barrier, whose entry (like the
	// term's no-op) never reaches the FSM.
	if err := leader.Shutdown(); err != nil {
		t.Fatal(err)
	}
	var rest []*Node
	var restF []*kvFSM
	for i, n := range nodes {
		if n != leader {
			rest, restF = append(rest, n), append(restF, fsms[i])
		}
	}
	nl := waitLeader(t, rest...)
	if _, err := nl.ReadIndex(ctx); !errors.Is(err, ErrNotReady) {
		t.Fatalf("new leader's ReadIndex before its Barrier: %v, want ErrNotReady", err)
	}
	if err := nl.Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	ri2, err := nl.ReadIndex(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ri2 <= ri {
		t.Fatalf("new leader's read index %d not past the old %d (no-op and barrier)", ri2, ri)
	}
	for i, n := range rest {
		f := restF[i]
		if last := f.lastIndex(); last >= ri2 {
			t.Fatalf("%s: FSM saw index %d, but entries after %d are a no-op and a barrier", n.ID(), last, ri)
		}
		waitFor(t, 5*time.Second, n.ID()+" to apply through the new read index", func() bool {
			return n.AppliedThrough(f.lastIndex()) >= ri2
		})
	}
}

// AppliedThrough stops at a command the FSM has not applied.
func TestAppliedThroughStopsAtCommand(t *testing.T) {
	n, f := memNode(t, "n1", true)
	ctx := ctxT(t)
	waitLeader(t, n)
	_, i1, err := n.Apply(ctx, []byte("a=1"))
	if err != nil {
		t.Fatal(err)
	}
	_, i2, err := n.Apply(ctx, []byte("b=2"))
	if err != nil {
		t.Fatal(err)
	}
	if got := n.AppliedThrough(i1 - 1); got != i1-1 {
		t.Fatalf("AppliedThrough(%d) = %d: it passed the command at %d", i1-1, got, i1)
	}
	if err := n.Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	if got, applied := n.AppliedThrough(f.lastIndex()), n.AppliedIndex(); f.lastIndex() != i2 || got != applied || got <= i2 {
		t.Fatalf("AppliedThrough(%d) = %d, applied %d: want the barrier after %d", f.lastIndex(), got, applied, i2)
	}
}
