package server_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/shim-run/shim/agent"
	"github.com/shim-run/shim/auth"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
	"github.com/shim-run/shim/raftlog"
	"github.com/shim-run/shim/server"
	"github.com/shim-run/shim/table"
)

// node is one in-process cluster member: in-memory Raft, a real HTTPS API on
// loopback (trust on: a node certificate from the cluster's CA) and an agent
// with simulated processes.
type node struct {
	name   string
	srv    *server.Server
	raft   *raftlog.Node
	http   *httptest.Server
	creds  *auth.Credentials
	cancel context.CancelFunc
	done   chan struct{}
}

type cluster struct {
	t     *testing.T
	nodes []*node
	lease time.Duration
	ca    *auth.CA
	admin auth.Token // an admin token, committed at bootstrap
}

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func newCluster(t *testing.T, n int, lease time.Duration) *cluster {
	ca, err := auth.NewCA("test", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	c := &cluster{t: t, lease: lease, ca: ca}
	for i := range n {
		c.add(fmt.Sprintf("n%d", i+1), i == 0)
	}
	t.Cleanup(func() {
		for _, nd := range c.nodes {
			nd.stop()
		}
	})
	return c
}

// creds signs a certificate for a node, as Certify would.
func (c *cluster) creds(name string, role auth.Role) *auth.Credentials {
	c.t.Helper()
	key, err := auth.NewKey()
	if err != nil {
		c.t.Fatal(err)
	}
	csr, err := auth.NewCSR(key, name, []string{"127.0.0.1"})
	if err != nil {
		c.t.Fatal(err)
	}
	der, _, err := c.ca.Sign(csr, role, time.Now())
	if err != nil {
		c.t.Fatal(err)
	}
	cr, err := auth.NewCredentials(der, key, c.ca.Cert.Raw)
	if err != nil {
		c.t.Fatal(err)
	}
	return cr
}

// serveTLS serves h over HTTPS (HTTP/2 and HTTP/1.1) with a node's
// credentials.
func serveTLS(h http.Handler, cr *auth.Credentials) *httptest.Server {
	hs := httptest.NewUnstartedServer(h)
	hs.EnableHTTP2 = true
	hs.TLS = cr.TLS(auth.APIServer)
	hs.StartTLS()
	return hs
}

func (c *cluster) add(name string, bootstrap bool) *node {
	t := c.t
	tb := table.New()
	w := server.NewWatcher()
	rn, err := raftlog.Open(raftlog.Config{ID: name, InMemory: true, Bootstrap: bootstrap, Logger: io.Discard},
		&server.FSM{Table: tb, Watch: w})
	if err != nil {
		t.Fatal(err)
	}
	cr := c.creds(name, auth.RoleServer)
	srv := &server.Server{Name: name, Table: tb, Raft: rn, Watch: w, Lease: c.lease, Log: quietLog(),
		LogDir: t.TempDir(), Auth: cr,
		// In-memory Raft has no socket to probe (raftlog's TLS tests
		// cover the transport).
		ProbeRaft: func(context.Context, string, string) error { return nil }}
	hs := serveTLS(srv.Handler(), cr)
	addr := strings.TrimPrefix(hs.URL, "https://")
	nd := &node{name: name, srv: srv, raft: rn, http: hs, creds: cr, done: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	nd.cancel = cancel
	if bootstrap {
		keyDER, err := c.ca.KeyDER()
		if err != nil {
			t.Fatal(err)
		}
		c.admin = auth.NewToken("")
		bctx, bcancel := context.WithTimeout(ctx, 10*time.Second)
		err = srv.BootstrapTrust(bctx, &pb.Trust{ClusterId: "test", CaCert: c.ca.Cert.Raw, CaKey: keyDER},
			[]*pb.TokenRecord{{Id: c.admin.ID, Hash: c.admin.Hash(), Role: pb.TokenRole_TOKEN_ROLE_ADMIN}})
		bcancel()
		if err != nil {
			t.Fatal(err)
		}
	}
	rec := &pb.NodeRecord{Name: name, Role: pb.NodeRole_NODE_ROLE_SERVER, ApiAddr: addr, RaftAddr: rn.Addr(),
		Capacity: &pb.Resources{CpuMaxMilli: 4000, MemMaxBytes: 8 << 30}}
	httpc := server.NewHTTPClient(cr.TLS(auth.APIClient))
	if !bootstrap {
		cl := shimv1connect.NewAgentServiceClient(httpc, c.nodes[0].http.URL)
		waitFor(t, 5*time.Second, "join "+name, func() bool {
			_, err := cl.Join(ctx, connect.NewRequest(&pb.JoinRequest{Node: rec}))
			return err == nil
		})
	}
	// The agent heartbeats over a stream, as simulated workers do: a
	// follower's agent is sent on to the leader.
	streams := server.NewStreams(httpc, cr.TLS(auth.StreamClient))
	var clientsMu sync.Mutex
	clients := map[string]shimv1connect.AgentServiceClient{}
	ag := &agent.Agent{
		Node: rec, Addrs: func() []string { return []string{addr} },
		Client: func(a string) shimv1connect.AgentServiceClient {
			clientsMu.Lock()
			defer clientsMu.Unlock()
			if clients[a] == nil {
				clients[a] = streams.Client(server.URL(a, true))
			}
			return clients[a]
		},
		Runtime: &agent.SimRuntime{}, DataDir: t.TempDir(), Lease: c.lease, Log: quietLog(),
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); srv.Run(ctx) }()
	go func() { defer wg.Done(); _ = ag.Run(ctx) }()
	go func() { wg.Wait(); close(nd.done) }()
	c.nodes = append(c.nodes, nd)
	return nd
}

func (n *node) stop() {
	if n.cancel == nil {
		return
	}
	n.cancel()
	<-n.done
	n.http.Close()
	_ = n.raft.Shutdown()
	n.cancel = nil
}

// bearer adds a token to every call of a client.
func bearer(tok string) connect.Option {
	return connect.WithInterceptors(connect.UnaryInterceptorFunc(func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			if tok != "" {
				req.Header().Set("Authorization", "Bearer "+tok)
			}
			return next(ctx, req)
		}
	}))
}

// userClient returns a user's client of node i: no certificate, the token
// tok ("" for none).
func (c *cluster) userClient(i int, tok string, opts ...connect.ClientOption) shimv1connect.ShimServiceClient {
	httpc := server.NewHTTPClient(auth.Config(auth.APIClient, c.nodes[i].creds.Pool, nil))
	return shimv1connect.NewShimServiceClient(httpc, c.nodes[i].http.URL, append(opts, bearer(tok))...)
}

// client returns an admin's client of node i.
func (c *cluster) client(i int) shimv1connect.ShimServiceClient {
	return c.userClient(i, c.admin.String())
}

func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (c *cluster) list(i int, all bool) []*pb.ProcessRecord {
	resp, err := c.client(i).List(context.Background(), connect.NewRequest(&pb.ListRequest{All: all}))
	if err != nil {
		c.t.Fatalf("list: %v", err)
	}
	return resp.Msg.Processes
}

func (c *cluster) allRunning(i, want int) func() bool {
	return func() bool {
		recs := c.list(i, false)
		if len(recs) != want {
			return false
		}
		for _, r := range recs {
			if r.State != pb.ProcessState_PROCESS_STATE_RUNNING {
				return false
			}
		}
		return true
	}
}

func spec(args ...string) *pb.ProcessSpec {
	return &pb.ProcessSpec{Command: args, Resources: &pb.Resources{CpuMinMilli: 100, MemMinBytes: 1 << 20}}
}

func TestClusterSpawnSpreadKill(t *testing.T) {
	c := newCluster(t, 3, 500*time.Millisecond)
	ctx := context.Background()
	waitFor(t, 5*time.Second, "3 nodes up", func() bool {
		resp, err := c.client(1).Nodes(ctx, connect.NewRequest(&pb.NodesRequest{}))
		return err == nil && len(resp.Msg.Nodes) == 3
	})
	// Spawn through a follower: the write reaches the leader.
	resp, err := c.client(2).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec("/bin/sleep", "100"), Count: 30}))
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Msg.Processes) != 30 {
		t.Fatalf("spawned %d, want 30", len(resp.Msg.Processes))
	}
	waitFor(t, 5*time.Second, "30 running", c.allRunning(0, 30))
	per := map[string]int{}
	for _, r := range c.list(0, false) {
		per[r.Node]++
	}
	if len(per) != 3 || per["n1"] != 10 {
		t.Fatalf("not spread evenly: %v", per)
	}
	// Kill one; it ends as killed and is never restarted.
	id := resp.Msg.Processes[0].Id
	if _, err := c.client(0).Kill(ctx, connect.NewRequest(&pb.KillRequest{Ids: []string{id}})); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "killed", func() bool {
		recs := c.list(1, true)
		for _, r := range recs {
			if r.Id == id {
				return r.State == pb.ProcessState_PROCESS_STATE_KILLED
			}
		}
		return false
	})
	// Unknown id: NotFound, table unchanged.
	before := c.nodes[0].srv.Table.Index()
	_, err = c.client(0).Kill(ctx, connect.NewRequest(&pb.KillRequest{Ids: []string{"nosuchprocess"}}))
	if connect.CodeOf(err) != connect.CodeNotFound {
		t.Fatalf("kill unknown: %v", err)
	}
	if got := c.nodes[0].srv.Table.Index(); got != before {
		t.Fatalf("failed kill changed the table index %d -> %d", before, got)
	}
	// No room: a clear error.
	big := spec("/bin/true")
	big.Resources.CpuMinMilli = 64000
	_, err = c.client(0).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: big}))
	if connect.CodeOf(err) != connect.CodeResourceExhausted || !strings.Contains(err.Error(), "most free") {
		t.Fatalf("spawn too big: %v", err)
	}
}

func TestClusterNodeLossMovesProcesses(t *testing.T) {
	c := newCluster(t, 3, 400*time.Millisecond)
	ctx := context.Background()
	waitFor(t, 5*time.Second, "3 nodes up", func() bool {
		resp, err := c.client(0).Nodes(ctx, connect.NewRequest(&pb.NodesRequest{}))
		return err == nil && len(resp.Msg.Nodes) == 3
	})
	if _, err := c.client(0).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec("/bin/sleep", "100"), Count: 30})); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "30 running", c.allRunning(0, 30))
	// Stop n3 (a follower, agent included).
	c.nodes[2].stop()
	start := time.Now()
	waitFor(t, 5*time.Second, "processes moved off n3", func() bool {
		recs := c.list(0, false)
		if len(recs) != 30 {
			return false
		}
		for _, r := range recs {
			if r.Node == "n3" || r.State != pb.ProcessState_PROCESS_STATE_RUNNING {
				return false
			}
		}
		return true
	})
	t.Logf("moved in %s", time.Since(start))
	for _, r := range c.list(0, false) {
		if r.Incarnation == 2 && (len(r.History) != 1 || r.History[0].Node != "n3") {
			t.Fatalf("moved process lacks history: %v", r)
		}
	}
}

func TestClusterLeaderLoss(t *testing.T) {
	c := newCluster(t, 3, 500*time.Millisecond)
	ctx := context.Background()
	waitFor(t, 5*time.Second, "3 nodes up", func() bool {
		resp, err := c.client(0).Nodes(ctx, connect.NewRequest(&pb.NodesRequest{}))
		return err == nil && len(resp.Msg.Nodes) == 3
	})
	if _, err := c.client(0).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec("/bin/sleep", "100"), Count: 6})); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "6 running", c.allRunning(0, 6))
	c.nodes[0].stop() // the bootstrap node leads
	start := time.Now()
	waitFor(t, 5*time.Second, "spawn after leader loss", func() bool {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		_, err := c.client(1).Spawn(cctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec("/bin/true")}))
		return err == nil
	})
	t.Logf("writes accepted again after %s", time.Since(start))
	// n2 and n3 were never declared down.
	resp, err := c.client(1).Nodes(ctx, connect.NewRequest(&pb.NodesRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range resp.Msg.Nodes {
		if n.Node.Name != "n1" && n.Node.State != pb.NodeState_NODE_STATE_UP {
			t.Fatalf("node %s wrongly %s", n.Node.Name, n.Node.State)
		}
	}
}

func TestClusterDrainMakeBeforeBreak(t *testing.T) {
	c := newCluster(t, 3, 500*time.Millisecond)
	ctx := context.Background()
	waitFor(t, 5*time.Second, "3 nodes up", func() bool {
		resp, err := c.client(0).Nodes(ctx, connect.NewRequest(&pb.NodesRequest{}))
		return err == nil && len(resp.Msg.Nodes) == 3
	})
	if _, err := c.client(0).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec("/bin/sleep", "100"), Count: 12})); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "12 running", c.allRunning(0, 12))
	if _, err := c.client(1).Drain(ctx, connect.NewRequest(&pb.DrainRequest{Node: "n2"})); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "n2 drained", func() bool {
		for _, r := range c.list(0, false) {
			if r.Node == "n2" || r.MoveTo != "" || r.State != pb.ProcessState_PROCESS_STATE_RUNNING {
				return false
			}
		}
		return true
	})
	for _, r := range c.list(0, false) {
		if r.Incarnation == 2 && (len(r.History) != 1 || r.History[0].Node != "n2") {
			t.Fatalf("moved process lacks history: %v", r)
		}
	}
	// The drained node takes no new work until undrained.
	resp, err := c.client(0).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec("/bin/true"), Count: 6}))
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range resp.Msg.Processes {
		if r.Node == "n2" {
			t.Fatalf("new work placed on draining n2")
		}
	}
	if _, err := c.client(0).Drain(ctx, connect.NewRequest(&pb.DrainRequest{Node: "n2", Undrain: true})); err != nil {
		t.Fatal(err)
	}
	resp, err = c.client(0).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec("/bin/true")}))
	if err != nil || resp.Msg.Processes[0].Node != "n2" {
		t.Fatalf("after undrain, spawn went to %v (%v)", resp.Msg.GetProcesses(), err)
	}
}
