package agent

import (
	"context"
	"io"
	"log/slog"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

func TestTryOrder(t *testing.T) {
	for _, c := range []struct {
		name         string
		good         string
		addrs, known []string
		want         []string
	}{
		{"addrs alone", "", []string{"own"}, nil, []string{"own"}},
		{"then the servers known", "", []string{"own"}, []string{"a", "own", "b"}, []string{"own", "a", "b"}},
		{"the last to answer first", "b", []string{"own"}, []string{"a", "own", "b"}, []string{"b", "own", "a"}},
		{"a stale good is dropped", "gone", []string{"own"}, []string{"a"}, []string{"own", "a"}},
		{"each once", "", []string{"a", "a", ""}, []string{"a"}, []string{"a"}},
		{"none", "x", nil, nil, []string{}},
	} {
		if got := tryOrder(c.good, c.addrs, c.known); !slices.Equal(got, c.want) {
			t.Errorf("%s: %v, want %v", c.name, got, c.want)
		}
	}
}

func TestJoinTry(t *testing.T) {
	want := []time.Duration{250 * time.Millisecond, 500 * time.Millisecond, time.Second, 2 * time.Second, 2 * time.Second, 2 * time.Second}
	for round, w := range want {
		if got := joinTry(round); got != w {
			t.Errorf("joinTry(%d) = %s, want %s", round, got, w)
		}
	}
	if got := joinTry(1 << 20); got != 2*time.Second {
		t.Errorf("joinTry(a late round) = %s, want 2s", got)
	}
}

func TestAddrBookRemembers(t *testing.T) {
	path := filepath.Join(t.TempDir(), serversFile)
	var b addrBook
	if err := b.load(path); err != nil || len(b.known) != 0 {
		t.Fatalf("nothing remembered: %v, %v", b.known, err)
	}
	if changed, err := b.learn([]string{"a:1", "b:2"}); !changed || err != nil {
		t.Fatalf("learn: changed %v, %v", changed, err)
	}
	if changed, _ := b.learn([]string{"a:1", "b:2"}); changed {
		t.Fatal("the same list again counted as a change")
	}
	if changed, _ := b.learn(nil); changed {
		t.Fatal("an empty list counted as a change")
	}
	var next addrBook
	if err := next.load(path); err != nil || !slices.Equal(next.known, []string{"a:1", "b:2"}) {
		t.Fatalf("the next agent remembers %v, %v", next.known, err)
	}
}

// stuckCP is a server that cannot answer for the cluster yet, as a server
// restarted after a crash whose table has not caught up: every call waits
// until its caller gives up.
type stuckCP struct{ *fakeCP }

func (stuckCP) Join(ctx context.Context, _ *connect.Request[pb.JoinRequest]) (*connect.Response[pb.JoinResponse], error) {
	<-ctx.Done()
	return nil, connect.NewError(connect.CodeDeadlineExceeded, ctx.Err())
}

func (stuckCP) Heartbeat(ctx context.Context, _ *connect.Request[pb.HeartbeatRequest]) (*connect.Response[pb.HeartbeatResponse], error) {
	<-ctx.Done()
	return nil, connect.NewError(connect.CodeDeadlineExceeded, ctx.Err())
}

// serversCP is fakeCP that lists the servers in its answers.
type serversCP struct {
	*fakeCP
	servers []string
}

func (cp serversCP) Join(ctx context.Context, req *connect.Request[pb.JoinRequest]) (*connect.Response[pb.JoinResponse], error) {
	return connect.NewResponse(&pb.JoinResponse{Servers: cp.servers}), nil
}

func (cp serversCP) Heartbeat(ctx context.Context, req *connect.Request[pb.HeartbeatRequest]) (*connect.Response[pb.HeartbeatResponse], error) {
	resp, err := cp.fakeCP.Heartbeat(ctx, req)
	if err == nil {
		resp.Msg.Servers = cp.servers
	}
	return resp, err
}

// A server node restarted after a crash rejoins in well under a second
// although its own API, the one address its wiring gives it, cannot answer
// yet: it goes on to the servers the agent before it learned.
func TestRestartedServerRejoinsThroughAnother(t *testing.T) {
	cp := newFakeCP()
	dir := t.TempDir()
	answers := serversCP{cp, []string{"own", "other"}}
	run := func(client func(string) shimv1connect.AgentServiceClient) (*Agent, func()) {
		a := &Agent{
			Node:    &pb.NodeRecord{Name: "n1", Role: pb.NodeRole_NODE_ROLE_SERVER, ApiAddr: "own"},
			Addrs:   func() []string { return []string{"own"} },
			Client:  client,
			Runtime: &countingRuntime{}, DataDir: dir, Lease: testLease,
			Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); _ = a.Run(ctx) }()
		stop := func() { cancel(); <-done }
		t.Cleanup(stop)
		return a, stop
	}
	granted := func(a *Agent) func() bool {
		return func() bool {
			a.lease.Lock()
			defer a.lease.Unlock()
			return a.lease.granted
		}
	}

	// The first agent: its own API answers, and lists both servers.
	a, stop := run(func(string) shimv1connect.AgentServiceClient { return answers })
	waitUntil(t, 5*time.Second, "the first agent's lease", granted(a))
	stop()

	// The node crashed; its server is back but cannot answer yet.
	start := time.Now()
	a, _ = run(func(addr string) shimv1connect.AgentServiceClient {
		if addr == "own" {
			return stuckCP{cp}
		}
		return answers
	})
	waitUntil(t, 5*time.Second, "the restarted agent's lease", granted(a))
	took := time.Since(start)
	t.Logf("rejoined in %s", took)
	if took > 2*time.Second {
		t.Fatalf("rejoined in %s, want well under the 5 s a join round used to wait on its own API", took)
	}
}
