package server_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
)

func (c *cluster) waitUp(n int) {
	c.t.Helper()
	waitFor(c.t, 10*time.Second, "nodes up", func() bool {
		resp, err := c.client(0).Nodes(context.Background(), connect.NewRequest(&pb.NodesRequest{}))
		return err == nil && len(resp.Msg.Nodes) == n
	})
}

func ids(recs []*pb.ProcessRecord) []string {
	out := make([]string, len(recs))
	for i, r := range recs {
		out[i] = r.Id
	}
	return out
}

// listOn lists every process through member i within d.
func (c *cluster) listOn(i int, d time.Duration) ([]*pb.ProcessRecord, error) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	resp, err := c.client(i).List(ctx, connect.NewRequest(&pb.ListRequest{All: true}))
	if err != nil {
		return nil, err
	}
	return resp.Msg.Processes, nil
}

// A spawn acknowledged by one member is in the next read of any other: the
// issue's witness was a follower listing without a process 2 ms after its
// spawn returned.
func TestReadYourWritesAnywhere(t *testing.T) {
	c := newCluster(t, 3, time.Second)
	c.waitUp(3)
	ctx := context.Background()
	for i := range 30 {
		resp, err := c.client(i%3).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec("/bin/sleep", "100")}))
		if err != nil {
			t.Fatal(err)
		}
		id := resp.Msg.Processes[0].Id
		recs, err := c.listOn((i+1)%3, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Contains(ids(recs), id) {
			t.Fatalf("round %d: n%d lists no %s, spawned through n%d", i, (i+1)%3+1, id, i%3+1)
		}
		// Kill through another member: the next read there shows it
		// stopping.
		if _, err := c.client((i+2)%3).Kill(ctx, connect.NewRequest(&pb.KillRequest{Ids: []string{id}})); err != nil {
			t.Fatal(err)
		}
		recs, err = c.listOn(i%3, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range recs {
			if r.Id == id && !r.Stop {
				t.Fatalf("round %d: n%d shows %s not stopping after its kill returned", i, i%3+1, id)
			}
		}
	}
}

// A failed spawn commits an entry the table rolls back: reads after it must
// not wait for a table index that never comes.
func TestReadAfterFailedSpawn(t *testing.T) {
	c := newCluster(t, 3, time.Second)
	c.waitUp(3)
	ctx := context.Background()
	huge := spec("/bin/sleep", "100")
	huge.Resources.CpuMinMilli = 1_000_000
	for i := range 3 {
		_, err := c.client(i).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: huge}))
		if connect.CodeOf(err) != connect.CodeResourceExhausted {
			t.Fatalf("spawn too big: %v", err)
		}
		for j := range 3 {
			start := time.Now()
			if _, err := c.listOn(j, 2*time.Second); err != nil {
				t.Fatalf("list on n%d after a failed spawn: %v", j+1, err)
			}
			if d := time.Since(start); d > time.Second {
				t.Fatalf("list on n%d took %s after a failed spawn", j+1, d)
			}
		}
	}
}

// Right after the leader dies, a read waits for the election and answers
// with everything acknowledged before.
func TestReadAfterElection(t *testing.T) {
	c := newCluster(t, 3, time.Second)
	c.waitUp(3)
	ctx := context.Background()
	resp, err := c.client(0).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec("/bin/sleep", "100"), Count: 3}))
	if err != nil {
		t.Fatal(err)
	}
	want := ids(resp.Msg.Processes)
	c.nodes[0].stop() // the bootstrap node leads
	start := time.Now()
	var recs []*pb.ProcessRecord
	for {
		recs, err = c.listOn(1, 5*time.Second)
		if err == nil || time.Since(start) > 8*time.Second {
			break
		}
		if connect.CodeOf(err) != connect.CodeUnavailable {
			t.Fatalf("read during the election: %v", err)
		}
	}
	if err != nil {
		t.Fatalf("no read within %s of the leader's death: %v", time.Since(start), err)
	}
	t.Logf("first read after the leader's death answered after %s", time.Since(start))
	for _, id := range want {
		if !slices.Contains(ids(recs), id) {
			t.Fatalf("read after the election lacks %s", id)
		}
	}
	// A write through the new leader, read at once on the other member.
	resp, err = c.client(2).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec("/bin/true")}))
	if err != nil {
		t.Fatal(err)
	}
	if recs, err = c.listOn(1, 2*time.Second); err != nil || !slices.Contains(ids(recs), resp.Msg.Processes[0].Id) {
		t.Fatalf("read after a write in the new term: %v %v", ids(recs), err)
	}
}

// A member that cannot reach a leader refuses a read within a bounded time;
// a stale read answers from its copy and says how old it may be.
func TestReadWithoutLeader(t *testing.T) {
	c := newCluster(t, 3, time.Second)
	c.waitUp(3)
	ctx := context.Background()
	if _, err := c.client(0).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec("/bin/sleep", "100")})); err != nil {
		t.Fatal(err)
	}
	stale := func() *pb.ListResponse {
		resp, err := c.client(2).List(ctx, connect.NewRequest(&pb.ListRequest{Consistency: pb.Consistency_CONSISTENCY_STALE}))
		if err != nil {
			t.Fatal(err)
		}
		return resp.Msg
	}
	waitFor(t, 5*time.Second, "n3 to apply the spawn", func() bool { return len(stale().Processes) == 1 })
	st := stale().Staleness
	if st == nil || st.Index == 0 || st.LeaderIndex < st.Index || st.LastContactMillis < 0 || st.LastContactMillis > 1000 {
		t.Fatalf("staleness of a healthy follower: %v", st)
	}
	c.nodes[0].stop()
	c.nodes[1].stop()
	start := time.Now()
	_, err := c.listOn(2, 10*time.Second)
	d := time.Since(start)
	if connect.CodeOf(err) != connect.CodeUnavailable {
		t.Fatalf("read without a leader: %v, want unavailable", err)
	}
	if d > 6*time.Second {
		t.Fatalf("read without a leader refused only after %s", d)
	}
	t.Logf("refused after %s: %v", d, err)
	msg := stale()
	if len(msg.Processes) != 1 || msg.Staleness.LastContactMillis < int64(d/time.Millisecond)/2 {
		t.Fatalf("stale read without a leader: %d processes, staleness %v", len(msg.Processes), msg.Staleness)
	}
	// Kill resolves names through a linearizable read too.
	kctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err = c.client(2).Kill(kctx, connect.NewRequest(&pb.KillRequest{Ids: []string{msg.Processes[0].Id}}))
	if connect.CodeOf(err) != connect.CodeUnavailable {
		t.Fatalf("kill without a leader: %v, want unavailable", err)
	}
}

// Spawns with a request id happen once, whichever member the retry asks.
func TestSpawnRequestID(t *testing.T) {
	c := newCluster(t, 3, time.Second)
	c.waitUp(3)
	ctx := context.Background()
	req := &pb.SpawnRequest{Spec: spec("/bin/sleep", "100"), Count: 2, RequestId: "truth-req-1"}
	var first []string
	for i := range 3 {
		resp, err := c.client(i).Spawn(ctx, connect.NewRequest(req))
		if err != nil {
			t.Fatal(err)
		}
		got := ids(resp.Msg.Processes)
		if first == nil {
			first = got
		} else if !slices.Equal(got, first) {
			t.Fatalf("retry through n%d answered %v, want %v", i+1, got, first)
		}
	}
	recs, err := c.listOn(2, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 2 {
		t.Fatalf("%d processes after three tries of one request", len(recs))
	}
	other := &pb.SpawnRequest{Spec: spec("/bin/sleep", "99"), Count: 2, RequestId: "truth-req-1"}
	_, err = c.client(1).Spawn(ctx, connect.NewRequest(other))
	var ce *connect.Error
	if !errors.As(err, &ce) || ce.Code() != connect.CodeAlreadyExists || !strings.Contains(ce.Message(), "request id truth-req-1 was used for a different spawn") {
		t.Fatalf("another spec under the same request id: %v", err)
	}
	bad := &pb.SpawnRequest{Spec: spec("/bin/true"), RequestId: "no spaces"}
	if _, err := c.client(0).Spawn(ctx, connect.NewRequest(bad)); connect.CodeOf(err) != connect.CodeInvalidArgument {
		t.Fatalf("bad request id: %v", err)
	}
}
