package table

import (
	"testing"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// The cutoff drops what ended before the retention, and the oldest ended
// ones beyond the cap; nothing to drop is 0, and a live process is never
// counted.
func TestPruneCutoff(t *testing.T) {
	x := threeNodes(t)
	x.ok(spawnCmd(spec(100), "a", "b", "c", "d"))
	for i, id := range []string{"a", "b", "c"} {
		x.ok(reportCmd(x.get(id).Node, &pb.StatusUpdate{Id: id, Incarnation: 1, State: exited, AtUnixNano: int64(100 * (i + 1))}))
	}
	if got := x.tb.PruneCutoff(50, 0); got != 0 {
		t.Fatalf("nothing ended before 50: cutoff %d", got)
	}
	if got := x.tb.PruneCutoff(150, 0); got != 150 {
		t.Fatalf("retention only: cutoff %d, want 150", got)
	}
	if got := x.tb.PruneCutoff(50, 1); got != 201 {
		t.Fatalf("keep 1 of 3 ended: cutoff %d, want 201", got)
	}
	if got := x.tb.PruneCutoff(50, 3); got != 0 {
		t.Fatalf("keep 3 of 3 ended: cutoff %d, want 0", got)
	}
	res := x.ok(pruneCmd(x.tb.PruneCutoff(50, 1)))
	if len(res.IDs) != 2 || x.tb.Get("c") == nil || x.tb.Get("d") == nil {
		t.Fatalf("pruned %v; want a and b, c (the newest ended) and d (live) kept", res.IDs)
	}
}
