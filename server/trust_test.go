package server_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/shim-run/shim/auth"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
	"github.com/shim-run/shim/server"
)

// trustCluster is a 3-server in-process cluster with every node up.
func trustCluster(t *testing.T) *cluster {
	c := newCluster(t, 3, 500*time.Millisecond)
	waitFor(t, 10*time.Second, "3 nodes up", func() bool {
		resp, err := c.client(0).Nodes(context.Background(), connect.NewRequest(&pb.NodesRequest{}))
		if err != nil || len(resp.Msg.Nodes) != 3 {
			return false
		}
		for _, n := range resp.Msg.Nodes {
			if n.Node.State != pb.NodeState_NODE_STATE_UP {
				return false
			}
		}
		return true
	})
	return c
}

// token makes a token of role through the API, as `shim token create`.
func (c *cluster) token(role pb.TokenRole, ttl time.Duration) string {
	c.t.Helper()
	resp, err := c.client(1).CreateToken(context.Background(), connect.NewRequest(&pb.CreateTokenRequest{
		Role: role, TtlMillis: ttl.Milliseconds(), Name: "test"}))
	if err != nil {
		c.t.Fatal(err)
	}
	return resp.Msg.Token
}

// userState is what a user's refused call could have changed: processes
// and tokens.
func (c *cluster) userState() string {
	c.t.Helper()
	tb := c.nodes[0].srv.Table
	return fmt.Sprint(tb.Processes(true, ""), tb.Tokens())
}

func wantCode(t *testing.T, what string, err error, code connect.Code) {
	t.Helper()
	if connect.CodeOf(err) != code {
		t.Errorf("%s: %v, want %s", what, err, code)
	} else if msg := err.Error(); strings.Contains(msg, "\n") {
		t.Errorf("%s: error of more than one line: %q", what, msg)
	}
}

func TestTokensAndRoles(t *testing.T) {
	c := trustCluster(t)
	ctx := context.Background()
	read := c.token(pb.TokenRole_TOKEN_ROLE_READ, 0)
	op := c.token(pb.TokenRole_TOKEN_ROLE_OPERATOR, 0)
	short := c.token(pb.TokenRole_TOKEN_ROLE_ADMIN, 300*time.Millisecond)
	sp := &pb.SpawnRequest{Spec: spec("/bin/sleep", "100")}
	before := c.userState()

	_, err := c.userClient(0, "").Spawn(ctx, connect.NewRequest(sp))
	wantCode(t, "spawn without a token", err, connect.CodeUnauthenticated)
	_, err = c.userClient(0, "").List(ctx, connect.NewRequest(&pb.ListRequest{}))
	wantCode(t, "list without a token", err, connect.CodeUnauthenticated)
	_, err = c.userClient(1, "0123456789ab.00000000000000000000000000000000").Spawn(ctx, connect.NewRequest(sp))
	wantCode(t, "spawn with a made-up token", err, connect.CodeUnauthenticated)
	_, err = c.userClient(1, "garbage").Spawn(ctx, connect.NewRequest(sp))
	wantCode(t, "spawn with a malformed token", err, connect.CodeUnauthenticated)
	_, err = c.userClient(2, read).Spawn(ctx, connect.NewRequest(sp))
	wantCode(t, "spawn with a read token", err, connect.CodePermissionDenied)
	_, err = c.userClient(2, read).CreateToken(ctx, connect.NewRequest(&pb.CreateTokenRequest{Role: pb.TokenRole_TOKEN_ROLE_ADMIN}))
	wantCode(t, "read token creating an admin token", err, connect.CodePermissionDenied)
	_, err = c.userClient(2, op).CreateToken(ctx, connect.NewRequest(&pb.CreateTokenRequest{Role: pb.TokenRole_TOKEN_ROLE_ADMIN}))
	wantCode(t, "operator creating an admin token", err, connect.CodePermissionDenied)
	for _, user := range []string{"0", "0:100", "100:0", "000"} {
		s := spec("/bin/sleep", "100")
		s.User = user
		_, err = c.userClient(0, op).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: s}))
		wantCode(t, "operator spawning as "+user, err, connect.CodePermissionDenied)
	}
	s := spec("/bin/sleep", "100")
	s.User, s.Rootfs, s.Isolation = "1000", "images", pb.Isolation_ISOLATION_CONTAINER
	_, err = c.userClient(0, op).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: s}))
	wantCode(t, "operator spawning on a host path rootfs", err, connect.CodePermissionDenied)
	hostIso := spec("/bin/sleep", "100")
	hostIso.Isolation = pb.Isolation_ISOLATION_HOST
	_, err = c.userClient(0, op).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: hostIso}))
	wantCode(t, "operator spawning with isolation host", err, connect.CodePermissionDenied)
	mounted := spec("/bin/sleep", "100")
	mounted.Mounts = []*pb.Mount{{Name: "data", Path: "/data"}}
	_, err = c.userClient(0, op).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: mounted}))
	wantCode(t, "operator mounting a host path", err, connect.CodePermissionDenied)
	s.Rootfs = "/"
	_, err = c.userClient(0, c.admin.String()).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: s}))
	wantCode(t, "admin spawning on the host's root", err, connect.CodeInvalidArgument)
	if after := c.userState(); after != before {
		t.Errorf("refused calls changed the table:\n%s\n%s", before, after)
	}

	// What they may do.
	if _, err := c.userClient(2, read).List(ctx, connect.NewRequest(&pb.ListRequest{})); err != nil {
		t.Errorf("read token listing: %v", err)
	}
	s.Rootfs, s.Isolation = "", 0
	if _, err := c.userClient(0, op).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: s})); err != nil {
		t.Errorf("operator spawning as 1000: %v", err)
	}
	if _, err := c.userClient(0, op).Spawn(ctx, connect.NewRequest(sp)); err != nil {
		t.Errorf("operator spawning as nobody (no user): %v", err)
	}
	if _, err := c.userClient(0, short).List(ctx, connect.NewRequest(&pb.ListRequest{})); err != nil {
		t.Errorf("fresh token: %v", err)
	}
	who, err := c.userClient(2, read).Whoami(ctx, connect.NewRequest(&pb.WhoamiRequest{}))
	if err != nil || who.Msg.Role != "read" || who.Msg.Kind != "token" {
		t.Errorf("whoami: %v, %v", who, err)
	}

	// Revoked and expired tokens are refused.
	id := strings.SplitN(read, ".", 2)[0]
	if _, err := c.client(0).RevokeToken(ctx, connect.NewRequest(&pb.RevokeTokenRequest{Id: id})); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the revocation on every server", func() bool {
		for _, n := range c.nodes {
			if n.srv.Table.Token(id) != nil {
				return false
			}
		}
		return true
	})
	_, err = c.userClient(2, read).List(ctx, connect.NewRequest(&pb.ListRequest{}))
	wantCode(t, "list with a revoked token", err, connect.CodeUnauthenticated)
	waitFor(t, 5*time.Second, "the short token to expire", func() bool {
		_, err := c.userClient(0, short).List(ctx, connect.NewRequest(&pb.ListRequest{}))
		return connect.CodeOf(err) == connect.CodeUnauthenticated
	})

	// The list shows no secrets.
	list, err := c.client(2).ListTokens(ctx, connect.NewRequest(&pb.ListTokensRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	for _, tk := range list.Msg.Tokens {
		if len(tk.Hash) != 0 {
			t.Errorf("token %s listed with its hash", tk.Id)
		}
		if tk.Id == id {
			t.Errorf("revoked token %s listed", id)
		}
	}
}

// nodeClient is an AgentService client holding a node's certificate.
func (c *cluster) nodeClient(i int, cr *auth.Credentials, tok string) shimv1connect.AgentServiceClient {
	var tc *tls.Config
	if cr != nil {
		tc = cr.TLS(auth.APIClient)
	} else {
		tc = auth.Config(auth.APIClient, c.nodes[0].creds.Pool, nil)
	}
	return shimv1connect.NewAgentServiceClient(server.NewHTTPClient(tc), c.nodes[i].http.URL, bearer(tok))
}

func TestNodesActOnlyAsThemselves(t *testing.T) {
	c := trustCluster(t)
	ctx := context.Background()
	w := c.creds("w9", auth.RoleWorker)
	on2 := spec("/bin/sleep", "100")
	on2.Node = "n2"
	sp, err := c.client(0).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: on2}))
	if err != nil {
		t.Fatal(err)
	}
	victim := sp.Msg.Processes[0].Id
	waitFor(t, 5*time.Second, "a process running on n2", c.allRunning(0, 1))
	for i := range c.nodes { // the leader and followers alike
		cl := c.nodeClient(i, w, "")
		_, err := cl.Heartbeat(ctx, connect.NewRequest(&pb.HeartbeatRequest{Node: "n2"}))
		wantCode(t, "heartbeat as another node", err, connect.CodePermissionDenied)
		_, err = cl.Report(ctx, connect.NewRequest(&pb.ReportRequest{Report: &pb.Report{Node: "n2",
			Updates: []*pb.StatusUpdate{{Id: victim, Incarnation: 1, State: pb.ProcessState_PROCESS_STATE_FAILED}}}}))
		wantCode(t, "report as another node", err, connect.CodePermissionDenied)
		_, err = cl.Assignments(ctx, connect.NewRequest(&pb.AssignmentsRequest{Node: "n2"}))
		wantCode(t, "assignments of another node", err, connect.CodePermissionDenied)
		_, err = cl.Join(ctx, connect.NewRequest(&pb.JoinRequest{Node: &pb.NodeRecord{Name: "evil",
			Capacity: &pb.Resources{CpuMaxMilli: 1e6, MemMaxBytes: 1 << 50}}}))
		wantCode(t, "join under another name", err, connect.CodePermissionDenied)
		_, err = cl.Join(ctx, connect.NewRequest(&pb.JoinRequest{Node: &pb.NodeRecord{Name: "w9",
			Role: pb.NodeRole_NODE_ROLE_SERVER, RaftAddr: "127.0.0.1:1"}}))
		wantCode(t, "a worker joining as a server", err, connect.CodePermissionDenied)
		_, err = cl.Apply(ctx, connect.NewRequest(&pb.ApplyRequest{Command: &pb.Command{Op: &pb.Command_SetNodeState{
			SetNodeState: &pb.SetNodeState{Name: "n2", State: pb.NodeState_NODE_STATE_DOWN}}}}))
		wantCode(t, "apply from a worker", err, connect.CodePermissionDenied)
		_, err = c.nodeClient(i, nil, c.admin.String()).Apply(ctx, connect.NewRequest(&pb.ApplyRequest{Command: &pb.Command{
			Op: &pb.Command_Prune{Prune: &pb.Prune{BeforeUnixNano: 1 << 62}}}}))
		wantCode(t, "apply with an admin token", err, connect.CodePermissionDenied)
		_, err = c.nodeClient(i, nil, "").Heartbeat(ctx, connect.NewRequest(&pb.HeartbeatRequest{Node: "n2"}))
		wantCode(t, "heartbeat without a certificate", err, connect.CodeUnauthenticated)
		// The heartbeat stream checks each beat against the certificate.
		streams := server.NewStreams(server.NewHTTPClient(w.TLS(auth.APIClient)), w.TLS(auth.StreamClient))
		_, err = streams.Client(c.nodes[i].http.URL).Heartbeat(ctx, connect.NewRequest(&pb.HeartbeatRequest{Node: "n2"}))
		wantCode(t, "streamed heartbeat as another node", err, connect.CodePermissionDenied)
	}
	// What the forged calls would have changed: n2's state, its
	// process, new nodes.
	if n2 := c.nodes[0].srv.Table.Node("n2"); n2.State != pb.NodeState_NODE_STATE_UP {
		t.Errorf("n2 is %s", n2.State)
	}
	if r := c.nodes[0].srv.Table.Get(victim); r.State != pb.ProcessState_PROCESS_STATE_RUNNING {
		t.Errorf("n2's process is %s", r.State)
	}
	for _, n := range []string{"evil", "w9"} {
		if c.nodes[0].srv.Table.Node(n) != nil {
			t.Errorf("node %s registered", n)
		}
	}
	// As itself, a worker is fine.
	_, err = c.nodeClient(1, w, "").Join(ctx, connect.NewRequest(&pb.JoinRequest{Node: &pb.NodeRecord{Name: "w9",
		Role: pb.NodeRole_NODE_ROLE_WORKER, Capacity: &pb.Resources{CpuMaxMilli: 1000, MemMaxBytes: 1 << 30}}}))
	if err != nil {
		t.Fatalf("join as itself: %v", err)
	}
	streams := server.NewStreams(server.NewHTTPClient(w.TLS(auth.APIClient)), w.TLS(auth.StreamClient))
	if _, err := streams.Client(c.nodes[2].http.URL).Heartbeat(ctx, connect.NewRequest(&pb.HeartbeatRequest{Node: "w9"})); err != nil {
		t.Errorf("streamed heartbeat as itself: %v", err)
	}
}

func TestCertify(t *testing.T) {
	c := trustCluster(t)
	ctx := context.Background()
	join := c.token(pb.TokenRole_TOKEN_ROLE_NODE, 0)
	tok, err := auth.ParseToken(join)
	if err != nil || tok.Pin != c.ca.Pin() {
		t.Fatalf("join token %q: %v", join, err)
	}
	key, _ := auth.NewKey()
	csr, _ := auth.NewCSR(key, "w5", []string{"10.1.2.3:7070"})
	req := &pb.CertifyRequest{Csr: csr, Role: pb.NodeRole_NODE_ROLE_WORKER}
	_, err = c.nodeClient(2, nil, "").Certify(ctx, connect.NewRequest(req))
	wantCode(t, "certify without a token", err, connect.CodeUnauthenticated)
	_, err = c.nodeClient(2, nil, c.admin.String()).Certify(ctx, connect.NewRequest(req))
	wantCode(t, "certify with an admin token", err, connect.CodePermissionDenied)
	_, err = c.nodeClient(2, nil, auth.Token{ID: tok.ID, Secret: strings.Repeat("0", 32)}.String()).Certify(ctx, connect.NewRequest(req))
	wantCode(t, "certify with a wrong secret", err, connect.CodeUnauthenticated)
	// Through a follower, which passes the token on to the leader.
	resp, err := c.nodeClient(2, nil, join).Certify(ctx, connect.NewRequest(req))
	if err != nil {
		t.Fatal(err)
	}
	cr, err := auth.NewCredentials(resp.Msg.Cert, key, resp.Msg.CaCert)
	if err != nil || cr.Node.Node != "w5" || cr.Node.Role != auth.RoleWorker || resp.Msg.ClusterId != "test" {
		t.Fatalf("certificate: %+v, %v", cr, err)
	}
	if err := cr.Cert.Leaf.VerifyHostname("10.1.2.3"); err != nil {
		t.Error(err)
	}
	// A live node's name is not for the taking.
	csr2, _ := auth.NewCSR(key, "n2", nil)
	_, err = c.nodeClient(0, nil, join).Certify(ctx, connect.NewRequest(&pb.CertifyRequest{Csr: csr2, Role: pb.NodeRole_NODE_ROLE_SERVER}))
	wantCode(t, "certify the name of a live node", err, connect.CodeAlreadyExists)
}

func TestMetricsNeedReadToken(t *testing.T) {
	c := trustCluster(t)
	read := c.token(pb.TokenRole_TOKEN_ROLE_READ, 0)
	httpc := server.NewHTTPClient(auth.Config(auth.APIClient, c.nodes[0].creds.Pool, nil))
	get := func(path, tok string) int {
		req, _ := http.NewRequest("GET", c.nodes[1].http.URL+path, nil)
		if tok != "" {
			req.Header.Set("Authorization", "Bearer "+tok)
		}
		resp, err := httpc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	if got := get("/metrics", ""); got != http.StatusUnauthorized {
		t.Errorf("metrics without a token: %d", got)
	}
	if got := get("/metrics", read); got != http.StatusOK {
		t.Errorf("metrics with a read token: %d", got)
	}
	if got := get("/healthz", ""); got != http.StatusOK {
		t.Errorf("healthz: %d", got)
	}
	join := c.token(pb.TokenRole_TOKEN_ROLE_NODE, 0)
	if got := get("/metrics", join); got != http.StatusForbidden {
		t.Errorf("metrics with a join token: %d", got)
	}
}

// TestGRPCOverTLS calls List and Spawn with the gRPC protocol, which needs
// HTTP/2 (over TLS here).
func TestGRPCOverTLS(t *testing.T) {
	c := trustCluster(t)
	ctx := context.Background()
	httpc := &http.Client{Transport: &http.Transport{TLSClientConfig: auth.Config(auth.APIClient, c.nodes[0].creds.Pool, nil),
		ForceAttemptHTTP2: true}}
	var proto string
	cl := shimv1connect.NewShimServiceClient(httpc, c.nodes[1].http.URL, connect.WithGRPC(), bearer(c.admin.String()),
		connect.WithInterceptors(connect.UnaryInterceptorFunc(func(next connect.UnaryFunc) connect.UnaryFunc {
			return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
				resp, err := next(ctx, req)
				if err == nil {
					proto = resp.Header().Get("Content-Type")
				}
				return resp, err
			}
		})))
	sp, err := cl.Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec("/bin/sleep", "100")}))
	if err != nil || len(sp.Msg.Processes) != 1 {
		t.Fatalf("gRPC spawn: %v", err)
	}
	list, err := cl.List(ctx, connect.NewRequest(&pb.ListRequest{}))
	if err != nil || len(list.Msg.Processes) != 1 {
		t.Fatalf("gRPC list: %v", err)
	}
	if proto != "application/grpc" && proto != "application/grpc+proto" {
		t.Errorf("answered as %q", proto)
	}
	_, err = shimv1connect.NewShimServiceClient(httpc, c.nodes[1].http.URL, connect.WithGRPC()).List(ctx, connect.NewRequest(&pb.ListRequest{}))
	wantCode(t, "gRPC without a token", err, connect.CodeUnauthenticated)
}

// TestWorkerPassesTokensOn: a worker cannot check tokens (it holds no
// table), so it passes a user's call on with the token and the server
// decides; it asks a server about a token for /metrics.
func TestWorkerPassesTokensOn(t *testing.T) {
	c := trustCluster(t)
	ctx := context.Background()
	cr := c.creds("w1", auth.RoleWorker)
	var peers []string
	for _, n := range c.nodes {
		peers = append(peers, strings.TrimPrefix(n.http.URL, "https://"))
	}
	ws := &server.Server{Name: "w1", Peers: peers, Log: quietLog(), LogDir: t.TempDir(), Auth: cr}
	hs := serveTLS(ws.Handler(), cr)
	defer hs.Close()
	read := c.token(pb.TokenRole_TOKEN_ROLE_READ, 0)
	user := func(tok string) shimv1connect.ShimServiceClient {
		httpc := server.NewHTTPClient(auth.Config(auth.APIClient, cr.Pool, nil))
		return shimv1connect.NewShimServiceClient(httpc, hs.URL, bearer(tok))
	}
	before := c.userState()
	if _, err := user(read).List(ctx, connect.NewRequest(&pb.ListRequest{})); err != nil {
		t.Errorf("list through a worker: %v", err)
	}
	_, err := user("").List(ctx, connect.NewRequest(&pb.ListRequest{}))
	wantCode(t, "list through a worker without a token", err, connect.CodeUnauthenticated)
	_, err = user(read).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec("/bin/true")}))
	wantCode(t, "spawn through a worker with a read token", err, connect.CodePermissionDenied)
	_, err = user("0123456789ab.00000000000000000000000000000000").Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec("/bin/true")}))
	wantCode(t, "spawn through a worker with a made-up token", err, connect.CodeUnauthenticated)
	logs, err := user("0123456789ab.00000000000000000000000000000000").Logs(ctx, connect.NewRequest(&pb.LogsRequest{Id: "x"}))
	if err == nil {
		for logs.Receive() {
		}
		err = logs.Err()
	}
	wantCode(t, "logs through a worker with a made-up token", err, connect.CodeUnauthenticated)
	if after := c.userState(); after != before {
		t.Errorf("refused calls changed the table")
	}
	sp, err := user(c.admin.String()).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec("/bin/true")}))
	if err != nil || len(sp.Msg.Processes) != 1 {
		t.Errorf("spawn through a worker with the admin token: %v", err)
	}
	who, err := user(read).Whoami(ctx, connect.NewRequest(&pb.WhoamiRequest{}))
	if err != nil || who.Msg.Role != "read" {
		t.Errorf("whoami through a worker: %v, %v", who, err)
	}

	httpc := server.NewHTTPClient(auth.Config(auth.APIClient, cr.Pool, nil))
	metrics := func(tok string) int {
		req, _ := http.NewRequest("GET", hs.URL+"/metrics", nil)
		if tok != "" {
			req.Header.Set("Authorization", "Bearer "+tok)
		}
		resp, err := httpc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	if got := metrics(read); got != http.StatusOK {
		t.Errorf("worker metrics with a read token: %d", got)
	}
	if got := metrics(""); got != http.StatusUnauthorized {
		t.Errorf("worker metrics without a token: %d", got)
	}
	if got := metrics("0123456789ab.00000000000000000000000000000000"); got != http.StatusUnauthorized {
		t.Errorf("worker metrics with a made-up token: %d", got)
	}
	if got := metrics(c.token(pb.TokenRole_TOKEN_ROLE_NODE, 0)); got != http.StatusForbidden {
		t.Errorf("worker metrics with a join token: %d", got)
	}
}
