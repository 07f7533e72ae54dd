package raftlog

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/hashicorp/go-msgpack/v2/codec"
	"github.com/hashicorp/raft"

	"github.com/shim-run/shim/auth"
)

// testCA issues node credentials for the TLS tests.
type testCA struct {
	t  *testing.T
	ca *auth.CA
}

func newTestCA(t *testing.T) *testCA {
	ca, err := auth.NewCA("test", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{t: t, ca: ca}
}

func (c *testCA) creds(name string, role auth.Role) *auth.Credentials {
	c.t.Helper()
	key, err := auth.NewKey()
	if err != nil {
		c.t.Fatal(err)
	}
	csr, err := auth.NewCSR(key, name, nil)
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

// openDisk opens a node on a real socket, with TLS when cr is set.
func openDisk(t *testing.T, id string, boot bool, cr *auth.Credentials) (*Node, *kvFSM) {
	t.Helper()
	f := newKV()
	cfg := Config{ID: id, BindAddr: "127.0.0.1:0", DataDir: filepath.Join(t.TempDir(), id), Bootstrap: boot, Logger: testLog(),
		HeartbeatTimeout: 200 * time.Millisecond, ElectionTimeout: 200 * time.Millisecond, LeaderLeaseTimeout: 200 * time.Millisecond}
	if cr != nil {
		cfg.ServerTLS, cfg.ClientTLS = cr.TLS(auth.RaftServer), cr.TLS(auth.RaftClient)
	}
	n, err := Open(cfg, f)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Shutdown() })
	return n, f
}

func TestTLSCluster(t *testing.T) {
	ctx := ctxT(t)
	ca := newTestCA(t)
	n1, _ := openDisk(t, "s1", true, ca.creds("s1", auth.RoleServer))
	waitLeader(t, n1)
	n2, f2 := openDisk(t, "s2", false, ca.creds("s2", auth.RoleServer))
	n3, f3 := openDisk(t, "s3", false, ca.creds("s3", auth.RoleServer))
	for _, n := range []*Node{n2, n3} {
		if err := n1.AddVoter(ctx, n.ID(), n.Addr()); err != nil {
			t.Fatal(err)
		}
	}
	waitLeader(t, n1, n2, n3)
	if _, _, err := n1.Apply(ctx, []byte("k=1")); err != nil {
		t.Fatal(err)
	}
	for _, f := range []*kvFSM{f2, f3} {
		waitFor(t, 10*time.Second, "replication over TLS", func() bool { return hasKV(f, "k", "1") })
	}
}

// TestTLSRefusesNonServers: a worker's certificate, or another cluster's
// server certificate, is refused, so a member added with one never gets the
// log, while a real server added with them does.
func TestTLSRefusesNonServers(t *testing.T) {
	ctx := ctxT(t)
	ca := newTestCA(t)
	n1, _ := openDisk(t, "s1", true, ca.creds("s1", auth.RoleServer))
	waitLeader(t, n1)
	w, fw := openDisk(t, "w1", false, ca.creds("w1", auth.RoleWorker))
	x, fx := openDisk(t, "x1", false, newTestCA(t).creds("x1", auth.RoleServer))
	s2, f2 := openDisk(t, "s2", false, ca.creds("s2", auth.RoleServer))
	// Non-voters: the leader replicates to them but needs no quorum of them.
	for _, n := range []*Node{w, x, s2} {
		f := n1.raft.AddNonvoter(raft.ServerID(n.ID()), raft.ServerAddress(n.Addr()), 0, 0)
		if err := f.Error(); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := n1.Apply(ctx, []byte("k=1")); err != nil {
		t.Fatal(err)
	}
	// Once the real server has the entry, the others had the same chance.
	waitFor(t, 10*time.Second, "replication to s2", func() bool { return hasKV(f2, "k", "1") })
	for _, f := range []*kvFSM{fw, fx} {
		if c, _ := f.stats(); c != 0 {
			t.Errorf("a refused peer applied %d entries", c)
		}
	}
}

// appendEntriesAttack speaks hashicorp/raft's wire format to addr as a
// self-declared leader with a much higher term, appending one entry after
// the target's last one and committing it: what a stranger on the network
// could do to a plain TCP transport. wrap, if set, turns the connection into
// something else first (TLS). It returns the error of the exchange.
func appendEntriesAttack(t *testing.T, target *Node, wrap func(net.Conn) net.Conn) error {
	t.Helper()
	st := target.Stats()
	last, _ := strconv.ParseUint(st["last_log_index"], 10, 64)
	lastTerm, _ := strconv.ParseUint(st["last_log_term"], 10, 64)
	conn, err := net.DialTimeout("tcp", target.Addr(), 2*time.Second)
	if err != nil {
		return err
	}
	if wrap != nil {
		conn = wrap(conn)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
	req := &raft.AppendEntriesRequest{
		RPCHeader:         raft.RPCHeader{ProtocolVersion: raft.ProtocolVersionMax, ID: []byte("evil"), Addr: []byte("127.0.0.1:1")},
		Term:              lastTerm + 1000,
		PrevLogEntry:      last,
		PrevLogTerm:       lastTerm,
		Entries:           []*raft.Log{{Index: last + 1, Term: lastTerm + 1000, Type: raft.LogCommand, Data: []byte("evil=1")}},
		LeaderCommitIndex: last + 1,
	}
	w := bufio.NewWriter(conn)
	if err := w.WriteByte(0); err != nil { // rpcAppendEntries
		return err
	}
	if err := codec.NewEncoder(w, &codec.MsgpackHandle{}).Encode(req); err != nil {
		return err
	}
	if err := w.Flush(); err != nil {
		return err
	}
	r := bufio.NewReader(conn)
	var rpcErr string
	dec := codec.NewDecoder(r, &codec.MsgpackHandle{})
	if err := dec.Decode(&rpcErr); err != nil {
		return err
	}
	var resp raft.AppendEntriesResponse
	if err := dec.Decode(&resp); err != nil {
		return err
	}
	if !resp.Success {
		return fmt.Errorf("append refused: %s", rpcErr)
	}
	return nil
}

func termOf(n *Node) string { return n.Stats()["term"] }

// TestAppendEntriesAttack shows the attack taking over a plain TCP node,
// then failing against TLS: plain TCP, TLS without a certificate, and TLS
// with a worker's certificate all leave the leader's term and state alone.
func TestAppendEntriesAttack(t *testing.T) {
	ctx := ctxT(t)
	// The control: over plain TCP the forged leader wins.
	plain, pf := openDisk(t, "p1", true, nil)
	waitLeader(t, plain)
	if _, _, err := plain.Apply(ctx, []byte("k=1")); err != nil {
		t.Fatal(err)
	}
	before := termOf(plain)
	if err := appendEntriesAttack(t, plain, nil); err != nil {
		t.Fatalf("the attack on plain TCP failed, so it proves nothing: %v", err)
	}
	waitFor(t, 5*time.Second, "the forged entry applied", func() bool { return hasKV(pf, "evil", "1") })
	if termOf(plain) == before {
		t.Fatal("plain TCP: term unchanged after the attack")
	}

	ca := newTestCA(t)
	n, f := openDisk(t, "s1", true, ca.creds("s1", auth.RoleServer))
	waitLeader(t, n)
	if _, _, err := n.Apply(ctx, []byte("k=1")); err != nil {
		t.Fatal(err)
	}
	before = termOf(n)
	count, _ := f.stats()
	worker := ca.creds("w1", auth.RoleWorker)
	for _, k := range []struct {
		what string
		wrap func(net.Conn) net.Conn
	}{
		{"plain TCP", nil},
		{"TLS without a certificate", func(c net.Conn) net.Conn {
			return tls.Client(c, auth.Config(auth.RaftClient, worker.Pool, nil))
		}},
		{"TLS with a worker certificate", func(c net.Conn) net.Conn { return tls.Client(c, worker.TLS(auth.RaftClient)) }},
		{"TLS with another cluster's server certificate", func(c net.Conn) net.Conn {
			return tls.Client(c, auth.Config(auth.RaftClient, worker.Pool, &newTestCA(t).creds("s9", auth.RoleServer).Cert))
		}},
	} {
		if err := appendEntriesAttack(t, n, k.wrap); err == nil {
			t.Errorf("%s: the forged AppendEntries was accepted", k.what)
		}
		if !n.IsLeader() || termOf(n) != before {
			t.Errorf("%s: leader %v, term %s (was %s)", k.what, n.IsLeader(), termOf(n), before)
		}
	}
	if _, _, err := n.Apply(ctx, []byte("k=2")); err != nil {
		t.Fatalf("the leader no longer leads: %v", err)
	}
	if c, _ := f.stats(); c != count+1 || hasKV(f, "evil", "1") {
		t.Errorf("applied %d entries after the attacks (want %d), evil=%v", c, count+1, hasKV(f, "evil", "1"))
	}
}

func TestTLSAdvertise(t *testing.T) {
	cr := newTestCA(t).creds("s1", auth.RoleServer)
	_, err := Open(Config{ID: "s1", BindAddr: "0.0.0.0:0", DataDir: t.TempDir(), Logger: testLog(),
		ServerTLS: cr.TLS(auth.RaftServer), ClientTLS: cr.TLS(auth.RaftClient)}, newKV())
	if err == nil {
		t.Fatal("listening on 0.0.0.0 without an advertised address was accepted")
	}
	adv := freeAddr(t)
	n, err := Open(Config{ID: "s1", BindAddr: "0.0.0.0:0", Advertise: adv, DataDir: t.TempDir(), Logger: testLog(),
		ServerTLS: cr.TLS(auth.RaftServer), ClientTLS: cr.TLS(auth.RaftClient)}, newKV())
	if err != nil {
		t.Fatal(err)
	}
	defer n.Shutdown()
	if n.Addr() != adv {
		t.Errorf("addr %s, want %s", n.Addr(), adv)
	}
}
