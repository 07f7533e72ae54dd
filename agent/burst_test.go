package agent_test

import (
	"context"
	"errors"
	"hash/crc32"
	"io"
	"log/slog"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/shim-run/shim/agent"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
	"github.com/shim-run/shim/raftlog"
	"github.com/shim-run/shim/server"
	"github.com/shim-run/shim/table"
)

// burstRuntime starts pretend processes that all exit at once when release
// is closed, each with its own exit code (exitCode of its ID).
type burstRuntime struct {
	agent.SimRuntime
	release chan struct{}
	started atomic.Int32
}

func exitCode(id string) int { return 1 + int(crc32.ChecksumIEEE([]byte(id))%250) }

func (r *burstRuntime) Start(s agent.Spec) (agent.Proc, error) {
	p := &burstProc{done: make(chan struct{})}
	r.started.Add(1)
	go func() {
		<-r.release
		p.end(agent.Exit{Code: exitCode(s.ID), Reason: "exited"})
	}()
	return p, nil
}

// exited counts the exits the agent has taken in (Exit is called once per
// exit).
var exited atomic.Int32

type burstProc struct {
	once sync.Once
	done chan struct{}
	exit agent.Exit
}

func (p *burstProc) end(e agent.Exit) { p.once.Do(func() { p.exit = e; close(p.done) }) }

func (p *burstProc) PID() int          { return 1 }
func (p *burstProc) StartTime() uint64 { return 1 }
func (p *burstProc) Signal(sig syscall.Signal) error {
	p.end(agent.Exit{Code: -1, Signal: sig.String()})
	return nil
}
func (p *burstProc) Kill() error                  { return p.Signal(syscall.SIGKILL) }
func (p *burstProc) Done() <-chan struct{}        { return p.done }
func (p *burstProc) Exit() agent.Exit             { exited.Add(1); return p.exit }
func (p *burstProc) Resize(r *pb.Resources) error { return nil }
func (p *burstProc) Stats() (*pb.Usage, error)    { return &pb.Usage{}, nil }

// cutReports is an agent's client whose reports fail while cut is set: the
// servers are there, but do not take reports for a while (busy, or between
// leaders).
type cutReports struct {
	shimv1connect.AgentServiceClient
	cut *atomic.Bool
}

func (c cutReports) Report(ctx context.Context, req *connect.Request[pb.ReportRequest]) (*connect.Response[pb.ReportResponse], error) {
	if c.cut.Load() {
		return nil, connect.NewError(connect.CodeUnavailable, errors.New("reports cut off"))
	}
	return c.AgentServiceClient.Report(ctx, req)
}

// A burst of 10,000 process exits on one node, while the servers take no
// reports: every one reaches the table with its own exit code once they do.
// The agent used to queue reports in a channel of 4,096 and drop what did
// not fit, leaving the table saying running.
func TestBurstOfExitsAllReachTheTable(t *testing.T) {
	if testing.Short() {
		t.Skip("10,000 processes")
	}
	const n = table.MaxSpawnIDs
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	tb := table.New()
	w := server.NewWatcher()
	rn, err := raftlog.Open(raftlog.Config{ID: "agentfix-burst", InMemory: true, Bootstrap: true, Logger: io.Discard},
		&server.FSM{Table: tb, Watch: w})
	if err != nil {
		t.Fatal(err)
	}
	// A long lease: a busy machine must not fence the node mid-test.
	srv := &server.Server{Name: "agentfix-burst", Table: tb, Raft: rn, Watch: w, Lease: 5 * time.Second,
		Log: quiet, LogDir: t.TempDir()}
	hs := httptest.NewServer(srv.Handler())
	httpc := server.NewHTTPClient(nil) // trust off: an agent unit test
	rt := &burstRuntime{release: make(chan struct{})}
	var cut atomic.Bool
	ag := &agent.Agent{
		Node: &pb.NodeRecord{Name: "agentfix-burst", Role: pb.NodeRole_NODE_ROLE_SERVER, ApiAddr: hs.Listener.Addr().String(),
			RaftAddr: rn.Addr(), Capacity: &pb.Resources{CpuMaxMilli: 4000, MemMaxBytes: 8 << 30}},
		Addrs: func() []string { return []string{hs.Listener.Addr().String()} },
		Client: func(addr string) shimv1connect.AgentServiceClient {
			return cutReports{server.NewAgentClient(httpc, nil, server.URL(addr, false)), &cut}
		},
		Runtime: rt, DataDir: t.TempDir(), Lease: 5 * time.Second, Log: quiet,
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); srv.Run(ctx) }()
	go func() { defer wg.Done(); _ = ag.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		wg.Wait()
		hs.Close()
		_ = rn.Shutdown()
	})

	client := shimv1connect.NewShimServiceClient(httpc, hs.URL)
	waitUntil(t, 10*time.Second, "the node up", func() bool {
		n := tb.Node("agentfix-burst")
		return n != nil && n.State == pb.NodeState_NODE_STATE_UP
	})
	resp, err := client.Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Count: n, Spec: &pb.ProcessSpec{
		Command: []string{"/bin/false"}, Restart: pb.RestartPolicy_RESTART_POLICY_NEVER}}))
	if err != nil {
		t.Fatal(err)
	}
	ids := make([]string, 0, n)
	for _, r := range resp.Msg.Processes {
		ids = append(ids, r.Id)
	}
	if len(ids) != n {
		t.Fatalf("spawned %d, want %d", len(ids), n)
	}
	waitUntil(t, 3*time.Minute, "every process started", func() bool { return int(rt.started.Load()) == n })
	cut.Store(true)
	exited.Store(0)
	close(rt.release) // every process exits at once
	waitUntil(t, 3*time.Minute, "every exit taken in", func() bool { return int(exited.Load()) == n })
	cut.Store(false)
	reopened := time.Now()

	// Every exit reaches the table, with its own code.
	deadline := time.Now().Add(60 * time.Second)
	for len(ids) > 0 {
		r := tb.Get(ids[0])
		switch {
		case r != nil && r.State == pb.ProcessState_PROCESS_STATE_FAILED:
			if int(r.ExitCode) != exitCode(r.Id) {
				t.Fatalf("%s: exit code %d (%s), want %d", r.Id, r.ExitCode, r.Reason, exitCode(r.Id))
			}
			ids = ids[1:]
			continue
		case time.Now().After(deadline):
			missing := 0
			for _, id := range ids {
				if tb.Get(id).GetState() != pb.ProcessState_PROCESS_STATE_FAILED {
					missing++
				}
			}
			t.Fatalf("after 60 s, %d of %d exits are not in the table (%s is %v)", missing, n, ids[0], r.GetState())
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("%d exits in the table %s after the servers took reports again", n, time.Since(reopened).Round(time.Millisecond))
}

func waitUntil(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
