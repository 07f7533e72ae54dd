package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

// lossyClient serves each request with the handler, then loses the answers
// of the first `lose` calls: the server did the work, the client sees a
// reset connection.
type lossyClient struct {
	h    http.Handler
	mu   *sync.Mutex
	lose *int
}

func (c lossyClient) Do(req *http.Request) (*http.Response, error) {
	rec := httptest.NewRecorder()
	c.h.ServeHTTP(rec, req)
	c.mu.Lock()
	defer c.mu.Unlock()
	if *c.lose > 0 {
		*c.lose--
		return nil, syscall.ECONNRESET
	}
	return rec.Result(), nil
}

// recordingServer remembers every spawn request and answers a repeated
// request id with its first answer, as the table does.
type recordingServer struct {
	fakeServer
	spawns []*pb.SpawnRequest
	kills  int
	first  map[string]*pb.SpawnResponse
}

func (f *recordingServer) Spawn(ctx context.Context, r *connect.Request[pb.SpawnRequest]) (*connect.Response[pb.SpawnResponse], error) {
	f.mu.Lock()
	f.spawns = append(f.spawns, r.Msg)
	if resp := f.first[r.Msg.RequestId]; resp != nil {
		f.mu.Unlock()
		return connect.NewResponse(resp), nil
	}
	f.mu.Unlock()
	resp, err := f.fakeServer.Spawn(ctx, r)
	if err == nil {
		f.mu.Lock()
		f.first[r.Msg.RequestId] = resp.Msg
		f.mu.Unlock()
	}
	return resp, err
}

func (f *recordingServer) Kill(ctx context.Context, r *connect.Request[pb.KillRequest]) (*connect.Response[pb.KillResponse], error) {
	f.mu.Lock()
	f.kills++
	f.mu.Unlock()
	return f.fakeServer.Kill(ctx, r)
}

func runLossy(t *testing.T, h shimv1connect.ShimServiceHandler, lose int, env string, args ...string) result {
	t.Helper()
	var out, errOut bytes.Buffer
	a := newApp(&out, &errOut)
	a.getenv = func(k string) string {
		if k == "SHIM_ADDR" {
			return env
		}
		return ""
	}
	a.newRequestID = func() string { return "rid1" }
	var mu sync.Mutex
	_, hh := shimv1connect.NewShimServiceHandler(h)
	a.dial = func(base string) (shimv1connect.ShimServiceClient, error) {
		var c connect.HTTPClient = lossyClient{h: hh, mu: &mu, lose: &lose}
		if strings.Contains(base, "down") {
			c = downClient{}
		}
		return shimv1connect.NewShimServiceClient(c, base), nil
	}
	code := a.execute(context.Background(), args)
	return result{code, out.String(), errOut.String()}
}

// A spawn whose answers are lost is retried with the same request id, and
// answered with the first spawn's processes.
func TestSpawnRetriesWithOneRequestID(t *testing.T) {
	f := &recordingServer{first: map[string]*pb.SpawnResponse{}}
	r := runLossy(t, f, 3, "down:1,up:2", "spawn", "--count", "2", "--", "sleep", "1")
	if r.code != 0 || r.out != "p1\np2\n" || r.errOut != "" {
		t.Fatalf("spawn with lost answers = %+v", r)
	}
	if len(f.spawns) != 4 {
		t.Fatalf("server saw %d spawns, want 4 (3 answers lost)", len(f.spawns))
	}
	for _, s := range f.spawns {
		if s.RequestId != "rid1" {
			t.Fatalf("a retry used request id %q", s.RequestId)
		}
	}
	if len(f.procs) != 2 {
		t.Fatalf("%d processes after retries", len(f.procs))
	}

	// --request-id is used as given, and checked.
	f = &recordingServer{first: map[string]*pb.SpawnResponse{}}
	if r := runLossy(t, f, 0, "up:2", "spawn", "--request-id", "mine-1", "--", "true"); r.code != 0 || f.spawns[0].RequestId != "mine-1" {
		t.Fatalf("--request-id: %+v, %v", r, f.spawns)
	}
	r = runLossy(t, f, 0, "up:2", "spawn", "--request-id", "a b", "--", "true")
	if r.code != 2 || !strings.HasPrefix(r.errOut, `shim: invalid --request-id "a b": request id "a b": use letters`) {
		t.Fatalf("bad --request-id: %+v", r)
	}

	// Nothing listening anywhere: no retrying.
	start := time.Now()
	r = runLossy(t, f, 0, "down:1", "spawn", "--", "true")
	if r.code != 1 || r.errOut != "shim: cannot reach shim at down:1: connection refused\n" || time.Since(start) > time.Second {
		t.Fatalf("spawn, all down = %+v after %s", r, time.Since(start))
	}
}

// Answers lost until --timeout: the error says how to retry safely.
func TestSpawnGivesUp(t *testing.T) {
	f := &recordingServer{first: map[string]*pb.SpawnResponse{}}
	r := runLossy(t, f, 1<<30, "up:2", "--timeout", "300ms", "spawn", "--", "true")
	if r.code != 1 || !strings.Contains(r.errOut, "no answer within 300ms") ||
		!strings.Contains(r.errOut, "retry with --request-id rid1 to spawn at most once") {
		t.Fatalf("spawn that never gets an answer = %+v", r)
	}
	if len(f.procs) != 1 {
		t.Fatalf("%d processes made by one spawn's retries", len(f.procs))
	}
}

// Kill retries while answers are lost (it is idempotent).
func TestKillRetries(t *testing.T) {
	f := &recordingServer{first: map[string]*pb.SpawnResponse{}}
	r := runLossy(t, f, 1, "up:2", "kill", "p1")
	if r.code != 0 || r.out != "p1-full\n" || f.kills != 2 {
		t.Fatalf("kill with a lost answer = %+v, %d kills", r, f.kills)
	}
}

// staleServer answers stale reads with a staleness.
type staleServer struct{ fakeServer }

var testStaleness = &pb.Staleness{Index: 5, LeaderIndex: 7, LastContactMillis: 3}

func (f *staleServer) List(ctx context.Context, r *connect.Request[pb.ListRequest]) (*connect.Response[pb.ListResponse], error) {
	resp, err := f.fakeServer.List(ctx, r)
	if err == nil && r.Msg.Consistency == pb.Consistency_CONSISTENCY_STALE {
		resp.Msg.Staleness = testStaleness
	}
	return resp, err
}

func (f *staleServer) Nodes(ctx context.Context, r *connect.Request[pb.NodesRequest]) (*connect.Response[pb.NodesResponse], error) {
	resp, err := f.fakeServer.Nodes(ctx, r)
	if err == nil && r.Msg.Consistency == pb.Consistency_CONSISTENCY_STALE {
		resp.Msg.Staleness = testStaleness
	}
	return resp, err
}

// --stale asks for a stale read; -o json then says how far behind the
// member was.
func TestStale(t *testing.T) {
	f := &staleServer{fakeServer{procs: []*pb.ProcessRecord{{Id: "p1", Spec: &pb.ProcessSpec{Command: []string{"x"}}}},
		nodes: []*pb.NodeStatus{{Node: &pb.NodeRecord{Name: "n1"}}}}}
	r := runLossy(t, f, 0, "up:2", "ps", "-o", "json")
	if r.code != 0 || !strings.HasPrefix(r.out, "[") || f.listReqs[0].Consistency != pb.Consistency_CONSISTENCY_UNSPECIFIED {
		t.Fatalf("ps -o json = %+v, %v", r, f.listReqs)
	}
	r = runLossy(t, f, 0, "up:2", "--stale", "ps", "-o", "json")
	if r.code != 0 || f.listReqs[1].Consistency != pb.Consistency_CONSISTENCY_STALE {
		t.Fatalf("ps --stale -o json = %+v, %v", r, f.listReqs)
	}
	var got struct {
		Staleness stalenessJSON `json:"staleness"`
		Processes []struct {
			ID string `json:"id"`
		} `json:"processes"`
	}
	if err := json.Unmarshal([]byte(r.out), &got); err != nil {
		t.Fatalf("ps --stale -o json: %v\n%s", err, r.out)
	}
	want := stalenessJSON{Member: "up:2", Index: 5, LeaderIndex: 7, Behind: 2, LastContactMillis: 3}
	if got.Staleness != want || len(got.Processes) != 1 || got.Processes[0].ID != "p1" {
		t.Fatalf("ps --stale -o json = %+v\n%s", got, r.out)
	}
	if !strings.HasPrefix(r.out, "{\n  \"staleness\": {\n    \"member\": \"up:2\",") {
		t.Fatalf("staleness is not first:\n%s", r.out)
	}
	r = runLossy(t, f, 0, "up:2", "--stale", "nodes", "-o", "json")
	var nodes struct {
		Staleness stalenessJSON     `json:"staleness"`
		Nodes     []json.RawMessage `json:"nodes"`
	}
	if err := json.Unmarshal([]byte(r.out), &nodes); err != nil || nodes.Staleness != want || len(nodes.Nodes) != 1 {
		t.Fatalf("nodes --stale -o json = %+v (%v)\n%s", nodes, err, r.out)
	}
}
