package table

import (
	"slices"
	"strconv"
	"strings"
	"testing"

	pb "github.com/shim-run/shim/proto/shimv1"
)

func spawnReq(s *pb.ProcessSpec, rid string, ids ...string) *pb.Command {
	c := spawnCmd(s, ids...)
	c.GetSpawn().RequestId = rid
	return c
}

// A retry with the same request id is answered with the first spawn's
// processes and creates nothing; another spec under that id is refused.
func TestRequestIDRetry(t *testing.T) {
	x := newTester(t)
	x.ok(nodeCmd("n1", 4*core, 4*gib))
	first := x.ok(spawnReq(spec(100), "req-1", "p1", "p2"))
	if !slices.Equal(first.IDs, []string{"p1", "p2"}) {
		t.Fatalf("first spawn ids %v", first.IDs)
	}
	retry := x.ok(spawnReq(spec(100), "req-1", "q1", "q2"))
	if !slices.Equal(retry.IDs, first.IDs) {
		t.Fatalf("retry answered %v, want the first answer %v", retry.IDs, first.IDs)
	}
	if x.tb.Get("q1") != nil || x.tb.Len() != 2 {
		t.Fatalf("retry created processes: %d in the table", x.tb.Len())
	}
	err := x.fail(spawnReq(spec(200), "req-1", "r1", "r2"), ErrExists)
	if !strings.Contains(err.Error(), "request id req-1 was used for a different spawn") {
		t.Fatalf("conflict error: %v", err)
	}
	x.fail(spawnReq(spec(100), "req-1", "r1"), ErrExists) // another count
	x.fail(spawnReq(spec(100), "bad id!", "r1"), ErrInvalid)
	x.fail(spawnReq(spec(100), strings.Repeat("a", MaxRequestIDLen+1), "r1"), ErrInvalid)

	// A spawn without a request id is not remembered.
	x.ok(spawnCmd(spec(100), "s1"))
	if x.tb.Requests() != 1 {
		t.Fatalf("remembered %d request ids, want 1", x.tb.Requests())
	}

	// Twice in one batch: one set of processes, both answered with it.
	res := x.ok(batchCmd(spawnReq(spec(100), "req-2", "b1"), spawnReq(spec(100), "req-2", "b2")))
	if x.tb.Get("b2") != nil || !slices.Equal(res.Results[1].IDs, []string{"b1"}) {
		t.Fatalf("batch retry: results %+v", res.Results)
	}
}

// A spawn that fails is not remembered: its retry tries again.
func TestRequestIDFailedSpawn(t *testing.T) {
	x := newTester(t)
	x.fail(spawnReq(spec(100), "req-1", "p1"), ErrNoCapacity)
	if x.tb.Request("req-1") != nil {
		t.Fatal("a failed spawn was remembered")
	}
	x.ok(nodeCmd("n1", 4*core, 4*gib))
	if res := x.ok(spawnReq(spec(100), "req-1", "p2")); !slices.Equal(res.IDs, []string{"p2"}) {
		t.Fatalf("retry after a failure answered %v", res.IDs)
	}
}

// Request ids are forgotten RequestTTL after their spawn, in command time,
// and kept in snapshots.
func TestRequestIDExpiryAndSnapshot(t *testing.T) {
	x := newTester(t)
	x.ok(nodeCmd("n1", 64*core, 64*gib))
	x.ok(spawnReq(spec(1), "old", "p1"))
	x.now += int64(RequestTTL) / 2
	x.ok(spawnReq(spec(1), "young", "p2"))

	c := clone(t, x.tb)
	if !Equal(c, x.tb) || c.Requests() != 2 || c.Applied() != x.tb.Applied() {
		t.Fatalf("snapshot lost request ids: %d remembered, applied %d want %d", c.Requests(), c.Applied(), x.tb.Applied())
	}
	if ids := c.Request("old"); !slices.Equal(ids, []string{"p1"}) {
		t.Fatalf("restored request old: %v", ids)
	}

	x.now += int64(RequestTTL)/2 + 1e9
	x.tb = c // go on from the restored copy
	// "old" is now past its TTL: a spawn under it is a new one.
	if res := x.ok(spawnReq(spec(1), "old", "p3")); !slices.Equal(res.IDs, []string{"p3"}) {
		t.Fatalf("expired request id answered %v", res.IDs)
	}
	if res := x.ok(spawnReq(spec(1), "young", "p4")); !slices.Equal(res.IDs, []string{"p2"}) {
		t.Fatalf("remembered request id answered %v", res.IDs)
	}
}

// The memory is bounded by count, oldest dropped first.
func TestRequestsBound(t *testing.T) {
	q := newRequests()
	for i := range 5000 {
		q.expire(int64(i), 999)
		q.add(&pb.RequestRecord{Id: "r" + strconv.Itoa(i), UnixNano: int64(i)})
	}
	if n := len(q.fifo) - q.head; n != 1000 || len(q.byID) != 1000 {
		t.Fatalf("remembered %d (map %d), want 1000", n, len(q.byID))
	}
	if got := q.live()[0].UnixNano; got != 4000 {
		t.Fatalf("oldest kept is from %d, want 4000", got)
	}
	if len(q.fifo) > 3000 {
		t.Fatalf("fifo not compacted: %d slots", len(q.fifo))
	}
}
