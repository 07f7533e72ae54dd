package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/hashicorp/go-msgpack/v2/codec"
	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"

	"github.com/shim-run/shim/auth"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
	"github.com/shim-run/shim/server"
)

// The rogue-client suite: against a real 3-server cluster, everything an
// attacker on the network tried in issue 11 is refused, with one line, and
// the table (`ps -a -o json`, and the nodes) is as it was.

// lastLine is the last line of s.
func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

// caPool is the cluster's CA as a pool.
func (c *cluster) caPool() *x509.CertPool {
	c.t.Helper()
	ca, err := auth.ReadCA(filepath.Join(c.dataDir(), "ca.pem"))
	if err != nil {
		c.t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	return pool
}

// userAPI is a ShimService client of addr with token tok ("" for none).
func (c *cluster) userAPI(addr, tok string) shimv1connect.ShimServiceClient {
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: auth.Config(auth.APIClient, c.caPool(), nil)}}
	return shimv1connect.NewShimServiceClient(hc, "https://"+addr, withToken(tok))
}

// agentAPI is an AgentService client of addr presenting cr (nil: no
// certificate) and tok.
func (c *cluster) agentAPI(addr string, cr *auth.Credentials, tok string) shimv1connect.AgentServiceClient {
	tc := auth.Config(auth.APIClient, c.caPool(), nil)
	if cr != nil {
		tc = cr.TLS(auth.APIClient)
	}
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: tc}}
	return shimv1connect.NewAgentServiceClient(hc, "https://"+addr, withToken(tok))
}

// enroll gets a certificate for a made-up node, as a joining shimd would:
// a join token from `shim token create --role node`, Certify.
func (c *cluster) enroll(name string, role pb.NodeRole) *auth.Credentials {
	c.t.Helper()
	tok := lastLine(c.must("token", "create", "--role", "node", "--name", "test "+name))
	key, err := auth.NewKey()
	if err != nil {
		c.t.Fatal(err)
	}
	csr, err := auth.NewCSR(key, name, nil)
	if err != nil {
		c.t.Fatal(err)
	}
	resp, err := c.agentAPI(c.nodes[0].api, nil, tok).Certify(context.Background(),
		connect.NewRequest(&pb.CertifyRequest{Csr: csr, Role: role}))
	if err != nil {
		c.t.Fatalf("certify %s: %v", name, err)
	}
	cr, err := auth.NewCredentials(resp.Msg.Cert, key, resp.Msg.CaCert)
	if err != nil {
		c.t.Fatal(err)
	}
	return cr
}

// leader returns the daemon that leads.
func (c *cluster) leader() *daemon {
	c.t.Helper()
	var lead *daemon
	waitFor(c.t, 10*time.Second, "a leader", func() bool {
		for _, ni := range c.nodesInfo() {
			for _, d := range c.nodes {
				if ni.Leader && ni.Name == d.name {
					lead = d
				}
			}
		}
		return lead != nil
	})
	return lead
}

var termRE = regexp.MustCompile(`term=(\d+)`)

// raftLog returns what d's shimd has logged, and the highest Raft term it
// has named.
func raftLog(t *testing.T, d *daemon) (string, int) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(d.dir, "shimd.log"))
	if err != nil {
		t.Fatal(err)
	}
	term := 0
	for _, m := range termRE.FindAllStringSubmatch(string(b), -1) {
		if n, _ := strconv.Atoi(m[1]); n > term {
			term = n
		}
	}
	return string(b), term
}

// appendEntriesAttack speaks hashicorp/raft's own wire format to a Raft
// port as a self-declared leader with a far higher term, one entry and a
// commit index: the forgery of issue 11, which took over a plain TCP
// transport. wrap, if set, turns the connection into TLS first. It returns
// the error of the exchange: nil means the forgery was accepted.
func appendEntriesAttack(addr string, wrap func(net.Conn) net.Conn) error {
	conn, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return err
	}
	if wrap != nil {
		conn = wrap(conn)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	cmd := &pb.Command{Op: &pb.Command_Prune{Prune: &pb.Prune{BeforeUnixNano: 1 << 62}}}
	data, _ := proto.Marshal(cmd)
	req := &raft.AppendEntriesRequest{
		RPCHeader:         raft.RPCHeader{ProtocolVersion: raft.ProtocolVersionMax, ID: []byte("evil"), Addr: []byte("127.0.0.1:1")},
		Term:              1 << 40,
		PrevLogEntry:      0,
		PrevLogTerm:       0,
		Entries:           []*raft.Log{{Index: 1, Term: 1 << 40, Type: raft.LogCommand, Data: data}},
		LeaderCommitIndex: 1,
	}
	w := bufio.NewWriter(conn)
	_ = w.WriteByte(0) // rpcAppendEntries
	if err := codec.NewEncoder(w, &codec.MsgpackHandle{}).Encode(req); err != nil {
		return err
	}
	if err := w.Flush(); err != nil {
		return err
	}
	dec := codec.NewDecoder(bufio.NewReader(conn), &codec.MsgpackHandle{})
	var rpcErr string
	if err := dec.Decode(&rpcErr); err != nil {
		return err
	}
	var resp raft.AppendEntriesResponse
	if err := dec.Decode(&resp); err != nil {
		return err
	}
	return nil // raft answered: it read the forgery
}

func TestRogueClients(t *testing.T) {
	needRoot(t)
	c := startCluster(t, 3)
	ctx := context.Background()
	n2 := c.nodes[1]
	victim := strings.TrimSpace(c.must("spawn", "--node", n2.name, "--", "/bin/sleep", "100000"))
	waitFor(t, 10*time.Second, "a process running on "+n2.name, func() bool {
		p := c.ps(victim)
		return len(p) == 1 && p[0].State == "running"
	})
	readTok := lastLine(c.must("token", "create", "--role", "read"))
	opTok := lastLine(c.must("token", "create", "--role", "operator"))
	revoked := lastLine(c.must("token", "create", "--role", "operator"))
	c.must("token", "revoke", strings.SplitN(revoked, ".", 2)[0])
	lead := c.leader()
	logBefore, termBefore := raftLog(t, lead)
	snapshot := func() string {
		var names []string
		for _, n := range c.nodesInfo() {
			names = append(names, n.Name+"/"+n.State)
		}
		return c.must("ps", "-a", "-o", "json") + strings.Join(names, ",")
	}
	before := snapshot()
	oneLine := func(what string, err error, code connect.Code) {
		t.Helper()
		if connect.CodeOf(err) != code {
			t.Errorf("%s: %v, want %s", what, err, code)
		} else if strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: more than one line: %q", what, err)
		}
	}
	cliRefused := func(what string, r result, want string) {
		t.Helper()
		if r.code != 1 || strings.Count(r.stderr, "\n") != 1 || !strings.Contains(r.stderr, want) {
			t.Errorf("%s: exit %d, stderr %q; want one line with %q", what, r.code, r.stderr, want)
		}
	}
	addr := c.nodes[2].api
	sp := &pb.SpawnRequest{Spec: &pb.ProcessSpec{Command: []string{"/bin/sleep", "1000"}}}

	// Users.
	_, err := c.userAPI(addr, "").Spawn(ctx, connect.NewRequest(sp))
	oneLine("spawn with no token", err, connect.CodeUnauthenticated)
	cliRefused("CLI spawn with no token", runCLI(t, []string{"SHIM_CA=" + filepath.Join(c.dataDir(), "ca.pem")},
		"--addr", addr, "spawn", "--", "/bin/true"), "no token")
	cliRefused("spawn with a revoked token", c.shimAt(addr, "--token", revoked, "spawn", "--user", "1000", "--", "/bin/true"), "is not valid")
	_, err = c.userAPI(addr, revoked).Spawn(ctx, connect.NewRequest(sp))
	oneLine("API spawn with a revoked token", err, connect.CodeUnauthenticated)
	cliRefused("spawn with a read token", c.shimAt(addr, "--token", readTok, "spawn", "--", "/bin/true"), "permission denied")
	cliRefused("operator spawning as root", c.shimAt(addr, "--token", opTok, "spawn", "--user", "0", "--", "/bin/true"), "(root)")
	cliRefused("read token making a token", c.shimAt(addr, "--token", readTok, "token", "create", "--role", "admin"), "permission denied")
	// Plaintext HTTP to the API port.
	resp, err := http.Post("http://"+addr+"/shim.v1.ShimService/Spawn", "application/json",
		strings.NewReader(`{"spec":{"command":["/bin/sh","-c","touch /tmp/pwned"]}}`))
	if err == nil {
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "HTTPS") {
			t.Errorf("plaintext HTTP: %d %q", resp.StatusCode, body)
		}
	}
	if got := snapshot(); got != before {
		t.Fatalf("refused user calls changed the table:\n%s\n%s", before, got)
	}

	// Joins without a token, or with a wrong one: shimd says why in one
	// line and exits.
	joinTok, err := os.ReadFile(filepath.Join(c.dataDir(), "join.token"))
	if err != nil {
		t.Fatal(err)
	}
	good, err := auth.ParseToken(string(joinTok))
	if err != nil {
		t.Fatal(err)
	}
	wrong := auth.Token{ID: good.ID, Secret: strings.Repeat("0", 32), Pin: good.Pin}.String()
	foreign := auth.Token{ID: good.ID, Secret: good.Secret, Pin: strings.Repeat("a", 64)}.String()
	for _, k := range []struct {
		what, want string
		args       []string
	}{
		{"join with no token", "join token", nil},
		{"join with a wrong token", "is not valid", []string{"--join-token", wrong}},
		{"join with another cluster's pin", "does not match the join token", []string{"--join-token", foreign}},
	} {
		dir := t.TempDir()
		args := append([]string{"--name", c.nodes[0].name + "-rogue", "--data-dir", dir, "--api", freePort(t),
			"--role", "worker", "--join", c.nodes[0].api}, k.args...)
		cmd := exec.Command(filepath.Join(bin, "shimd"), args...)
		cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
		var errb strings.Builder
		cmd.Stderr = &errb
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		done := make(chan error, 1)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			lines := strings.Split(strings.TrimSpace(errb.String()), "\n")
			last := lines[len(lines)-1]
			if err == nil || !strings.HasPrefix(last, "shimd: ") || !strings.Contains(last, k.want) {
				t.Errorf("%s: %v, last line %q; want one with %q", k.what, err, last, k.want)
			}
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-done
			t.Errorf("%s: shimd still running after 20s: %s", k.what, errb.String())
		}
		if _, err := os.Stat(filepath.Join(dir, "tls", "node.pem")); err == nil {
			t.Errorf("%s: a certificate was written", k.what)
		}
	}
	_, err = c.agentAPI(addr, nil, "").Join(ctx, connect.NewRequest(&pb.JoinRequest{Node: &pb.NodeRecord{Name: "evil",
		Capacity: &pb.Resources{CpuMaxMilli: 1e6, MemMaxBytes: 1 << 50}}}))
	oneLine("Join with no certificate", err, connect.CodeUnauthenticated)
	_, err = c.agentAPI(addr, nil, readTok).Join(ctx, connect.NewRequest(&pb.JoinRequest{Node: &pb.NodeRecord{Name: "evil"}}))
	oneLine("Join with a read token", err, connect.CodePermissionDenied)

	// A node certificate acting as another node.
	rogue := c.enroll(c.nodes[0].name+"-w", pb.NodeRole_NODE_ROLE_WORKER)
	before = snapshot() // the enrollment made a token
	for _, d := range c.nodes {
		a := c.agentAPI(d.api, rogue, "")
		_, err = a.Heartbeat(ctx, connect.NewRequest(&pb.HeartbeatRequest{Node: n2.name}))
		oneLine("heartbeat as another node via "+d.name, err, connect.CodePermissionDenied)
		_, err = a.Report(ctx, connect.NewRequest(&pb.ReportRequest{Report: &pb.Report{Node: n2.name,
			Updates: []*pb.StatusUpdate{{Id: victim, Incarnation: 1, State: pb.ProcessState_PROCESS_STATE_FAILED, Reason: "forged"}}}}))
		oneLine("report as another node via "+d.name, err, connect.CodePermissionDenied)
		_, err = a.Assignments(ctx, connect.NewRequest(&pb.AssignmentsRequest{Node: n2.name}))
		oneLine("assignments of another node via "+d.name, err, connect.CodePermissionDenied)
		_, err = a.Apply(ctx, connect.NewRequest(&pb.ApplyRequest{Command: &pb.Command{Op: &pb.Command_SetNodeState{
			SetNodeState: &pb.SetNodeState{Name: n2.name, State: pb.NodeState_NODE_STATE_DOWN}}}}))
		oneLine("raw Apply from a worker via "+d.name, err, connect.CodePermissionDenied)
		_, err = a.Join(ctx, connect.NewRequest(&pb.JoinRequest{Node: &pb.NodeRecord{Name: "evil",
			Capacity: &pb.Resources{CpuMaxMilli: 1e6, MemMaxBytes: 1 << 50}}}))
		oneLine("join under another name via "+d.name, err, connect.CodePermissionDenied)
		streams := server.NewStreams(&http.Client{Transport: &http.Transport{TLSClientConfig: rogue.TLS(auth.APIClient)}},
			rogue.TLS(auth.StreamClient))
		_, err = streams.Client("https://"+d.api).Heartbeat(ctx, connect.NewRequest(&pb.HeartbeatRequest{Node: n2.name}))
		oneLine("streamed heartbeat as another node via "+d.name, err, connect.CodePermissionDenied)
	}
	// A server whose Raft address is dead must not become a voter.
	deadRaft := c.enroll(c.nodes[0].name+"-s", pb.NodeRole_NODE_ROLE_SERVER)
	before = snapshot()
	_, err = c.agentAPI(addr, deadRaft, "").Join(ctx, connect.NewRequest(&pb.JoinRequest{Node: &pb.NodeRecord{
		Name: deadRaft.Node.Node, Role: pb.NodeRole_NODE_ROLE_SERVER, RaftAddr: freePort(t), ApiAddr: freePort(t)}}))
	oneLine("a server joining with a dead Raft address", err, connect.CodeFailedPrecondition)
	if got := snapshot(); got != before {
		t.Fatalf("forged node calls changed the table:\n%s\n%s", before, got)
	}

	// The Raft port: plain TCP, TLS without a certificate, TLS with a
	// worker's certificate. None reaches Raft.
	for _, k := range []struct {
		what string
		wrap func(net.Conn) net.Conn
	}{
		{"plain TCP", nil},
		{"TLS without a certificate", func(cn net.Conn) net.Conn {
			return tls.Client(cn, auth.Config(auth.RaftClient, c.caPool(), nil))
		}},
		{"TLS with a worker certificate", func(cn net.Conn) net.Conn { return tls.Client(cn, rogue.TLS(auth.RaftClient)) }},
	} {
		for _, d := range c.nodes {
			if err := appendEntriesAttack(d.raft, k.wrap); err == nil {
				t.Errorf("%s: the forged AppendEntries reached Raft on %s", k.what, d.name)
			}
		}
	}
	logText, termAfter := raftLog(t, lead)
	if termAfter != termBefore || c.leader() != lead {
		t.Errorf("the attacks moved the leader's term %d -> %d (leader %s -> %s)", termBefore, termAfter, lead.name, c.leader().name)
	}
	if strings.Count(logText, "entering follower state") != strings.Count(logBefore, "entering follower state") {
		t.Errorf("the leader stepped down:\n%s", tail(logText, 2000))
	}
	if got := snapshot(); got != before {
		t.Fatalf("the Raft attacks changed the table:\n%s\n%s", before, got)
	}
	if p := c.ps(victim); len(p) != 1 || p[0].State != "running" {
		t.Errorf("the victim is %+v", p)
	}
}

// TestRaftAttackWithoutTLS is the control for the Raft cases above: the same
// forgery against a shimd with trust off (--insecure, plain TCP) is taken,
// and the node steps down to follow the forger.
func TestRaftAttackWithoutTLS(t *testing.T) {
	needRoot(t)
	c := &cluster{t: t}
	d := &daemon{name: fmt.Sprintf("e%d-insecure", time.Now().UnixNano()%1e6), api: freePort(t), raft: freePort(t), dir: t.TempDir()}
	d.args = []string{"--name", d.name, "--data-dir", d.dir, "--api", d.api, "--raft", d.raft, "--insecure"}
	c.nodes = append(c.nodes, d)
	c.start(d)
	t.Cleanup(c.cleanupInsecure)
	hc := &http.Client{Timeout: 2 * time.Second}
	waitFor(t, 15*time.Second, "the insecure node to lead", func() bool {
		r, err := shimv1connect.NewShimServiceClient(hc, "http://"+d.api).Nodes(context.Background(), connect.NewRequest(&pb.NodesRequest{}))
		return err == nil && len(r.Msg.Nodes) == 1 && r.Msg.Nodes[0].Leader
	})
	if err := appendEntriesAttack(d.raft, nil); err != nil {
		t.Fatalf("the forgery was refused even without TLS, so the test above proves nothing: %v", err)
	}
	waitFor(t, 5*time.Second, "the node to follow the forger", func() bool {
		logText, term := raftLog(t, d)
		return term >= 1<<40 || strings.Count(logText, "entering follower state") > 1
	})
}

// cleanupInsecure stops a cluster started without the harness's
// credentials (its CLI cannot list processes; it ran none).
func (c *cluster) cleanupInsecure() {
	for _, d := range c.nodes {
		c.stop(d, syscall.SIGTERM)
		killGuard(d)
		killCgroups(d.name)
		if left := removeCgroups(d.name); len(left) > 0 {
			c.t.Errorf("%s: cgroups left behind: %v", d.name, left)
		}
	}
}

// TestGRPC calls List and Spawn with the generated client speaking the gRPC
// protocol: HTTP/2 over TLS, as grpcurl would.
func TestGRPC(t *testing.T) {
	needRoot(t)
	c := startCluster(t, 1)
	var protos []string
	tr := &http.Transport{TLSClientConfig: auth.Config(auth.APIClient, c.caPool(), nil), ForceAttemptHTTP2: true}
	hc := &http.Client{Timeout: 10 * time.Second, Transport: roundTripFunc(func(r *http.Request) (*http.Response, error) {
		resp, err := tr.RoundTrip(r)
		if err == nil {
			protos = append(protos, fmt.Sprintf("%s %s", resp.Proto, resp.Header.Get("Content-Type")))
		}
		return resp, err
	})}
	tok, err := os.ReadFile(filepath.Join(c.dataDir(), "admin.token"))
	if err != nil {
		t.Fatal(err)
	}
	cl := shimv1connect.NewShimServiceClient(hc, "https://"+c.nodes[0].api, connect.WithGRPC(), withToken(strings.TrimSpace(string(tok))))
	ctx := context.Background()
	sp, err := cl.Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: &pb.ProcessSpec{Command: []string{"/bin/sleep", "100000"}}, Wait: true}))
	if err != nil || len(sp.Msg.Processes) != 1 {
		t.Fatalf("gRPC Spawn: %v", err)
	}
	list, err := cl.List(ctx, connect.NewRequest(&pb.ListRequest{}))
	if err != nil || len(list.Msg.Processes) != 1 || list.Msg.Processes[0].Id != sp.Msg.Processes[0].Id {
		t.Fatalf("gRPC List: %v, %v", list, err)
	}
	for _, p := range protos {
		if !strings.HasPrefix(p, "HTTP/2.0 application/grpc") {
			t.Errorf("answered as %s, want HTTP/2 gRPC", p)
		}
	}
	_, err = shimv1connect.NewShimServiceClient(hc, "https://"+c.nodes[0].api, connect.WithGRPC()).List(ctx, connect.NewRequest(&pb.ListRequest{}))
	if connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Errorf("gRPC without a token: %v", err)
	}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }
