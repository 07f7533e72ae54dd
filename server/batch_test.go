package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/raftlog"
	"github.com/shim-run/shim/table"
)

// fakeRaft applies entries straight to a table. While gate is set, Apply
// waits on it, so a test can hold an entry in flight.
type fakeRaft struct {
	mu      sync.Mutex
	t       *table.Table
	leader  bool
	leadID  string
	index   uint64
	entries [][]byte
	gate    chan struct{}
	entered chan struct{} // told when an Apply starts waiting at the gate
}

func (f *fakeRaft) Apply(ctx context.Context, data []byte) (any, uint64, error) {
	f.mu.Lock()
	gate, entered := f.gate, f.entered
	f.mu.Unlock()
	if gate != nil {
		entered <- struct{}{}
		<-gate
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.leader {
		return nil, 0, raftlog.ErrNotLeader
	}
	f.index++
	f.entries = append(f.entries, data)
	return f.t.Apply(f.index, data), f.index, nil
}
func (f *fakeRaft) IsLeader() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.leader
}
func (f *fakeRaft) Leader() (string, string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.leadID, ""
}
func (f *fakeRaft) LeaderChanges() <-chan bool                     { return nil }
func (f *fakeRaft) AddVoter(context.Context, string, string) error { return nil }
func (f *fakeRaft) RemoveServer(context.Context, string) error     { return nil }
func (f *fakeRaft) Servers() ([]raftlog.Server, error)             { return nil, nil }
func (f *fakeRaft) Barrier(context.Context) error                  { return nil }

// The fake applies every entry as it commits it.
func (f *fakeRaft) ReadIndex(context.Context) (uint64, error) { return f.CommitIndex(), nil }
func (f *fakeRaft) AppliedThrough(uint64) uint64              { return f.CommitIndex() }
func (f *fakeRaft) LastContact() time.Time                    { return time.Time{} }
func (f *fakeRaft) CommitIndex() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.index
}

func testServer(t *testing.T, name string, leader bool) (*Server, *fakeRaft) {
	t.Helper()
	tb := table.New()
	f := &fakeRaft{t: tb, leader: leader}
	s := &Server{Name: name, Table: tb, Raft: f, Watch: NewWatcher(), Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	s.init()
	return s, f
}

func register(t *testing.T, s *Server, name, api string, role pb.NodeRole) {
	t.Helper()
	_, err := s.apply(context.Background(), &pb.Command{Op: &pb.Command_RegisterNode{RegisterNode: &pb.RegisterNode{Node: &pb.NodeRecord{
		Name: name, Role: role, ApiAddr: api, Capacity: &pb.Resources{CpuMaxMilli: 4000, MemMaxBytes: 8 << 30}}}}})
	if err != nil {
		t.Fatal(err)
	}
}

// Commands that arrive while an entry is in flight are committed together
// in the next one, each with its own result: one that fails changes nothing
// and does not stop the others.
func TestBatchGroupsConcurrentCommands(t *testing.T) {
	s, f := testServer(t, "s1", true)
	register(t, s, "w1", "127.0.0.1:1", pb.NodeRole_NODE_ROLE_WORKER)
	gate := make(chan struct{})
	f.mu.Lock()
	f.gate, f.entered = gate, make(chan struct{}, 100)
	f.mu.Unlock()

	spawn := func(id string) *pb.Command {
		return &pb.Command{Op: &pb.Command_Spawn{Spawn: &pb.Spawn{Ids: []string{id},
			Spec: &pb.ProcessSpec{Command: []string{"/bin/true"}, Resources: &pb.Resources{}}}}}
	}
	type out struct {
		res table.Result
		err error
	}
	results := make([]chan out, 6)
	run := func(i int, cmd *pb.Command) {
		results[i] = make(chan out, 1)
		go func() {
			r, err := s.apply(context.Background(), cmd)
			results[i] <- out{r, err}
		}()
	}
	// The first goes alone and waits at the gate, in flight.
	run(0, spawn("aaaaaa000000"))
	<-f.entered
	// These queue behind it: spawns, a kill of an unknown process, and a
	// spawn that reuses an id of the batch (fails: it exists by then).
	run(1, spawn("bbbbbb000001"))
	run(2, &pb.Command{Op: &pb.Command_Kill{Kill: &pb.Kill{Ids: []string{"nosuchprocess"}, Signal: 9}}})
	run(3, spawn("bbbbbb000003"))
	run(4, spawn("bbbbbb000004"))
	waitQueued(t, s, 4)
	dup := spawn("bbbbbb000001")
	dup.GetSpawn().Spec.Command = []string{"/bin/false"} // not a retry of command 1
	run(5, dup)
	waitQueued(t, s, 5)
	close(gate)
	<-f.entered // the batch
	f.mu.Lock()
	f.gate = nil
	f.mu.Unlock()

	got := make([]out, len(results))
	for i, ch := range results {
		got[i] = <-ch
	}
	if len(f.entries) != 3 { // register, the lone spawn, the batch
		t.Fatalf("%d entries, want 3", len(f.entries))
	}
	var batch pb.Command
	if err := proto.Unmarshal(f.entries[2], &batch); err != nil || len(batch.GetBatch().GetCommands()) != 5 {
		t.Fatalf("third entry is not a batch of 5: %v %v", err, &batch)
	}
	for _, i := range []int{0, 1, 3, 4} {
		if got[i].err != nil || len(got[i].res.IDs) != 1 {
			t.Fatalf("command %d: %v %v", i, got[i].res, got[i].err)
		}
	}
	if got[1].res.Index != 3 || got[3].res.Index != 3 {
		t.Fatalf("batched commands report index %d, %d; want the entry's, 3", got[1].res.Index, got[3].res.Index)
	}
	if connect.CodeOf(got[2].err) != connect.CodeNotFound {
		t.Fatalf("kill of an unknown process in a batch: %v", got[2].err)
	}
	if connect.CodeOf(got[5].err) != connect.CodeAlreadyExists {
		t.Fatalf("duplicate spawn in a batch: %v", got[5].err)
	}
	if n := s.Table.Len(); n != 4 {
		t.Fatalf("table holds %d processes, want 4", n)
	}
	// Replaying the same entries gives the same table.
	replica := table.New()
	for i, e := range f.entries {
		replica.Apply(uint64(i+1), e)
	}
	if !table.Equal(s.Table, replica) {
		t.Fatal("a replica applying the same entries differs")
	}
}

func waitQueued(t *testing.T, s *Server, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		s.batch.mu.Lock()
		q := len(s.batch.queue)
		s.batch.mu.Unlock()
		if q >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d commands queued, want %d", q, n)
		}
		time.Sleep(time.Millisecond)
	}
}

// A Raft error fails every command of the batch with it, so each caller
// retries (or forwards) as it would have alone.
func TestBatchRaftErrorReachesEveryCaller(t *testing.T) {
	s, f := testServer(t, "s1", true)
	f.mu.Lock()
	f.leader = false
	f.mu.Unlock()
	res, err := s.commit(context.Background(), &pb.Command{Op: &pb.Command_Prune{Prune: &pb.Prune{}}})
	if !errors.Is(err, raftlog.ErrNotLeader) {
		t.Fatalf("commit on a deposed leader: %v %v", res, err)
	}
}

// ---- heartbeat streams ----

func TestHeartbeatStream(t *testing.T) {
	s, _ := testServer(t, "s1", true)
	hs := httptest.NewServer(s.Handler())
	defer hs.Close()
	addr := strings.TrimPrefix(hs.URL, "http://")
	register(t, s, "s1", addr, pb.NodeRole_NODE_ROLE_SERVER)
	register(t, s, "w1", "127.0.0.1:1", pb.NodeRole_NODE_ROLE_WORKER)
	c := NewAgentClient(NewHTTPClient(nil), nil, hs.URL)
	ctx := context.Background()
	for range 3 {
		resp, err := c.Heartbeat(ctx, connect.NewRequest(&pb.HeartbeatRequest{Node: "w1"}))
		if err != nil {
			t.Fatal(err)
		}
		m := resp.Msg
		if !m.Known || m.State != pb.NodeState_NODE_STATE_UP || m.LeaseMillis != 1000 || len(m.Servers) != 1 || m.Servers[0] != addr {
			t.Fatalf("heartbeat answer %v", m)
		}
	}
	s.streamsMu.Lock()
	open := len(s.streams)
	s.streamsMu.Unlock()
	if open != 1 {
		t.Fatalf("%d streams open, want 1 (three beats on one)", open)
	}
	if v := counterValue(t, s); v != 3 {
		t.Fatalf("shim_heartbeats_total %v, want 3", v)
	}
	// Unknown nodes are told so.
	resp, err := c.Heartbeat(ctx, connect.NewRequest(&pb.HeartbeatRequest{Node: "nobody"}))
	if err != nil || resp.Msg.Known {
		t.Fatalf("unknown node: %v %v", resp, err)
	}
	// Many beats at once on one stream are answered in order.
	var wg sync.WaitGroup
	errs := make(chan error, 50)
	for i := range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			node := "w1"
			if i%2 == 1 {
				node = "nobody"
			}
			resp, err := c.Heartbeat(ctx, connect.NewRequest(&pb.HeartbeatRequest{Node: node}))
			if err == nil && resp.Msg.Known != (node == "w1") {
				err = fmt.Errorf("beat for %s answered as known=%v", node, resp.Msg.Known)
			}
			if err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	// Closing the streams ends them; the next beat dials again and is
	// refused a stream, so it goes unary.
	s.closeStreams()
	if _, err := c.Heartbeat(ctx, connect.NewRequest(&pb.HeartbeatRequest{Node: "w1"})); err != nil {
		t.Fatalf("beat after the streams closed: %v", err)
	}
}

func counterValue(t *testing.T, s *Server) float64 {
	t.Helper()
	rec := httptest.NewRecorder()
	s.Metrics.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	for _, line := range strings.Split(rec.Body.String(), "\n") {
		if v, ok := strings.CutPrefix(line, "shim_heartbeats_total "); ok {
			var f float64
			fmt.Sscan(v, &f)
			return f
		}
	}
	t.Fatal("no shim_heartbeats_total")
	return 0
}

// A follower names the leader, and the beat (and the stream) moves there.
// When the leader it names cannot be reached, the beat goes to the follower
// as a unary call.
func TestHeartbeatStreamRedirect(t *testing.T) {
	leader, _ := testServer(t, "s1", true)
	lhs := httptest.NewServer(leader.Handler())
	defer lhs.Close()
	follower, ff := testServer(t, "s2", false)
	fhs := httptest.NewServer(follower.Handler())
	defer fhs.Close()
	laddr := strings.TrimPrefix(lhs.URL, "http://")
	faddr := strings.TrimPrefix(fhs.URL, "http://")
	for _, s := range []*Server{leader, follower} {
		s.Raft.(*fakeRaft).mu.Lock()
		s.Raft.(*fakeRaft).leader = true
		s.Raft.(*fakeRaft).mu.Unlock()
		register(t, s, "s1", laddr, pb.NodeRole_NODE_ROLE_SERVER)
		register(t, s, "s2", faddr, pb.NodeRole_NODE_ROLE_SERVER)
		register(t, s, "w1", "127.0.0.1:1", pb.NodeRole_NODE_ROLE_WORKER)
	}
	ff.mu.Lock()
	ff.leader, ff.leadID = false, "s1"
	ff.mu.Unlock()

	c := NewAgentClient(NewHTTPClient(nil), nil, fhs.URL)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for range 2 {
		if _, err := c.Heartbeat(ctx, connect.NewRequest(&pb.HeartbeatRequest{Node: "w1"})); err != nil {
			t.Fatal(err)
		}
	}
	if v := counterValue(t, leader); v != 2 {
		t.Fatalf("leader granted %v beats, want 2", v)
	}
	// The leader goes away: the follower forwards the unary fallback to
	// where it thinks the leader is, which fails here, as nothing answers.
	leader.closeStreams()
	lhs.CloseClientConnections()
	lhs.Close()
	bctx, bcancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer bcancel()
	_, err := c.Heartbeat(bctx, connect.NewRequest(&pb.HeartbeatRequest{Node: "w1"}))
	if err == nil {
		t.Fatal("beat granted with the leader gone")
	}
	if !c.(*agentClient).avoided(laddr) {
		t.Fatal("the unreachable leader is not avoided")
	}
	// The follower becomes the leader: beats are granted there, on the
	// stream to it.
	ff.mu.Lock()
	ff.leader, ff.leadID = true, "s2"
	ff.mu.Unlock()
	if _, err := c.Heartbeat(ctx, connect.NewRequest(&pb.HeartbeatRequest{Node: "w1"})); err != nil {
		t.Fatal(err)
	}
	if v := counterValue(t, follower); v != 1 {
		t.Fatalf("new leader granted %v beats, want 1", v)
	}
}
