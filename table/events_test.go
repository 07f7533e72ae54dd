package table

import (
	"testing"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// The ring stays bounded, drops whole indexes, oldest first, and says how
// far it has dropped; what it keeps is exactly the events after any index
// at or after its base.
func TestEventRingBounded(t *testing.T) {
	x := newTester(t)
	x.ok(nodeCmd("n1", 1000*core, 1000*gib))
	var ids []string
	for i := range 300 {
		id := "p" + string(rune('a'+i%26)) + string(rune('a'+i/26))
		ids = append(ids, id)
	}
	x.ok(spawnCmd(spec(1), ids...)) // 300 events at one index
	// Many more, applied directly (the tester checks each one at length).
	for round := 0; round < 30; round++ {
		for _, id := range ids[:100] {
			for _, st := range []pb.ProcessState{pb.ProcessState_PROCESS_STATE_RUNNING, pb.ProcessState_PROCESS_STATE_BACKOFF} {
				x.index++
				x.now += second
				cmd := reportCmd("n1", upd(id, 1, st))
				cmd.NowUnixNano = x.now
				if res := x.tb.ApplyCommand(x.index, cmd); res.Err != nil {
					t.Fatal(res.Err)
				}
			}
		}
	}
	if err := checkInvariants(x.tb); err != nil {
		t.Fatal(err)
	}
	evs, base, _ := x.tb.Events(0, nil)
	if len(evs) > MaxEvents || len(evs) < MaxEvents/2 {
		t.Fatalf("the ring holds %d events, want about %d", len(evs), MaxEvents)
	}
	if base == 0 || evs[0].Index <= base {
		t.Fatalf("base %d, oldest event at %d", base, evs[0].Index)
	}
	// Since the base: everything kept; since a later index: exactly what
	// follows it.
	if got, _, _ := x.tb.Events(base, nil); len(got) != len(evs) {
		t.Fatalf("since the base: %d events, want %d", len(got), len(evs))
	}
	mid := evs[len(evs)/2].Index
	got, _, _ := x.tb.Events(mid, nil)
	for _, e := range got {
		if e.Index <= mid {
			t.Fatalf("since %d gave an event at %d", mid, e.Index)
		}
	}
	n := 0
	for _, e := range evs {
		if e.Index > mid {
			n++
		}
	}
	if len(got) != n {
		t.Fatalf("since %d: %d events, want %d", mid, len(got), n)
	}
	if got, _, _ := x.tb.Events(0, []string{EvRunning}); len(got) == 0 || got[0].Type != EvRunning {
		t.Fatalf("limit and type: %v", got)
	}
	if Equal(x.tb, clone(t, x.tb)) == false {
		t.Fatal("snapshot round trip lost the ring")
	}
}

// A failed command notes no event, nor does a failed command of a batch;
// the batch's others do.
func TestEventsOnlyOfWhatSucceeded(t *testing.T) {
	x := newTester(t)
	x.ok(nodeCmd("n1", core, gib))
	_, before, _ := x.tb.Events(0, nil)
	evs0, _, _ := x.tb.Events(0, nil)
	x.fail(spawnCmd(spec(2*core), "big"), ErrNoCapacity)
	x.fail(killCmd("nope"), ErrNotFound)
	if evs, base, _ := x.tb.Events(0, nil); len(evs) != len(evs0) || base != before {
		t.Fatalf("failed commands noted events: %v", evs)
	}
	res := x.ok(batchCmd(spawnCmd(spec(2*core), "big"), spawnCmd(spec(100), "small"), killCmd("nope")))
	if len(res.Events) != 1 || res.Events[0].Type != EvPlaced || res.Events[0].Id != "small" || res.Events[0].Index != res.Index {
		t.Fatalf("batch events %v", res.Events)
	}
}
