package raftlog

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

func ctxT(tb testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	tb.Cleanup(cancel)
	return ctx
}

// recvLeader waits for the next LeaderChanges value.
func recvLeader(t *testing.T, n *Node) bool {
	t.Helper()
	select {
	case v, ok := <-n.LeaderChanges():
		if !ok {
			t.Fatalf("%s: LeaderChanges closed", n.ID())
		}
		return v
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: no leadership notification", n.ID())
	}
	return false
}

func TestSingleNodeBootstrapApply(t *testing.T) {
	n, fsm := memNode(t, "n1", true)
	if n.HadState() {
		t.Fatal("HadState on a fresh node")
	}
	if !recvLeader(t, n) {
		t.Fatal("first leadership notification is false")
	}
	waitLeader(t, n)
	if id, addr := n.Leader(); id != "n1" || addr != n.Addr() {
		t.Fatalf("Leader() = %q, %q; want n1, %q", id, addr, n.Addr())
	}

	ctx := ctxT(t)
	var last uint64
	for i := 1; i <= 10; i++ {
		res, idx, err := n.Apply(ctx, fmt.Appendf(nil, "k%d=v%d", i, i))
		if err != nil {
			t.Fatalf("apply %d: %v", i, err)
		}
		if res.(int) != i {
			t.Fatalf("apply %d: result %v", i, res)
		}
		if idx <= last {
			t.Fatalf("apply %d: index %d not after %d", i, idx, last)
		}
		last = idx
	}
	if err := n.Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	if got := n.AppliedIndex(); got < last {
		t.Fatalf("AppliedIndex %d < %d", got, last)
	}
	if !hasKV(fsm, "k10", "v10") {
		t.Fatal("k10 missing from FSM")
	}
	srv, err := n.Servers()
	if err != nil {
		t.Fatal(err)
	}
	if len(srv) != 1 || srv[0] != (Server{ID: "n1", Addr: n.Addr(), Voter: true}) {
		t.Fatalf("Servers = %+v", srv)
	}
	if err := n.Snapshot(); err != nil {
		t.Fatal(err)
	}
	if err := n.Snapshot(); err != nil { // nothing new: still fine
		t.Fatal(err)
	}
	if st := n.Stats()["state"]; st != "Leader" {
		t.Fatalf("Stats state %q", st)
	}

	// Cancelled context: refused up front.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, _, err := n.Apply(cctx, []byte("x=y")); !errors.Is(err, context.Canceled) {
		t.Fatalf("apply with cancelled ctx: %v", err)
	}

	if err := n.Shutdown(); err != nil {
		t.Fatal(err)
	}
	if err := n.Shutdown(); err != nil {
		t.Fatal("second Shutdown:", err)
	}
	if _, _, err := n.Apply(ctx, []byte("a=b")); !errors.Is(err, ErrShutdown) {
		t.Fatalf("apply after shutdown: %v", err)
	}
	var vals []bool
	for v := range n.LeaderChanges() { // closed by Shutdown
		vals = append(vals, v)
	}
	if len(vals) == 0 || vals[len(vals)-1] {
		t.Fatalf("leadership notifications after shutdown: %v, want ending in false", vals)
	}
}

func TestConcurrentApply(t *testing.T) {
	n, fsm := memNode(t, "n1", true)
	waitLeader(t, n)
	ctx := ctxT(t)
	const workers, per = 64, 50
	var (
		mu   sync.Mutex
		seen = map[uint64]bool{}
		wg   sync.WaitGroup
	)
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			for i := range per {
				_, idx, err := n.Apply(ctx, fmt.Appendf(nil, "w%d=%d", w, i))
				if err != nil {
					errs <- err
					return
				}
				mu.Lock()
				dup := seen[idx]
				seen[idx] = true
				mu.Unlock()
				if dup {
					errs <- fmt.Errorf("index %d returned twice", idx)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if c, _ := fsm.stats(); c != workers*per {
		t.Fatalf("count %d, want %d", c, workers*per)
	}
}

// cluster starts n1 (bootstrapped) and joins the others as voters.
func cluster(t *testing.T, ids ...string) ([]*Node, []*kvFSM) {
	t.Helper()
	var nodes []*Node
	var fsms []*kvFSM
	for i, id := range ids {
		n, f := memNode(t, id, i == 0)
		nodes, fsms = append(nodes, n), append(fsms, f)
	}
	leader := waitLeader(t, nodes[0])
	ctx := ctxT(t)
	for _, n := range nodes[1:] {
		if err := leader.AddVoter(ctx, n.ID(), n.Addr()); err != nil {
			t.Fatal(err)
		}
	}
	waitLeader(t, nodes...)
	return nodes, fsms
}

func TestClusterFailover(t *testing.T) {
	nodes, fsms := cluster(t, "n1", "n2", "n3")
	ctx := ctxT(t)
	leader := waitLeader(t, nodes...)

	// Idempotent AddVoter: no new configuration entry is appended.
	before := leader.Stats()["last_log_index"]
	if err := leader.AddVoter(ctx, "n2", nodes[1].Addr()); err != nil {
		t.Fatal(err)
	}
	if after := leader.Stats()["last_log_index"]; after != before {
		t.Fatalf("re-adding n2 appended to the log: %s -> %s", before, after)
	}
	if srv, _ := leader.Servers(); len(srv) != 3 {
		t.Fatalf("servers after re-add: %+v", srv)
	}
	if _, _, err := leader.Apply(ctx, []byte("a=1")); err != nil {
		t.Fatal(err)
	}
	for i, f := range fsms {
		waitFor(t, 5*time.Second, nodes[i].ID()+" to apply a=1", func() bool { return hasKV(f, "a", "1") })
	}

	// Followers refuse writes and membership changes with ErrNotLeader.
	for _, n := range nodes {
		if n == leader {
			continue
		}
		if _, _, err := n.Apply(ctx, []byte("b=2")); !errors.Is(err, ErrNotLeader) {
			t.Fatalf("%s: follower apply: %v", n.ID(), err)
		}
		if err := n.AddVoter(ctx, "x", "y"); !errors.Is(err, ErrNotLeader) {
			t.Fatalf("%s: follower add voter: %v", n.ID(), err)
		}
		if err := n.Barrier(ctx); !errors.Is(err, ErrNotLeader) {
			t.Fatalf("%s: follower barrier: %v", n.ID(), err)
		}
		if id, _ := n.Leader(); id != leader.ID() {
			t.Fatalf("%s: Leader() = %q, want %q", n.ID(), id, leader.ID())
		}
	}

	// Leader loss: the survivors elect a new leader that has the data.
	if err := leader.Shutdown(); err != nil {
		t.Fatal(err)
	}
	var rest []*Node
	var restF []*kvFSM
	for i, n := range nodes {
		if n != leader {
			rest, restF = append(rest, n), append(restF, fsms[i])
		}
	}
	start := time.Now()
	nl := waitLeader(t, rest...)
	t.Logf("new leader %s elected %v after leader shutdown", nl.ID(), time.Since(start))
	if err := nl.Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	if _, _, err := nl.Apply(ctx, []byte("c=3")); err != nil {
		t.Fatal(err)
	}
	for i, f := range restF {
		waitFor(t, 5*time.Second, rest[i].ID()+" to apply c=3", func() bool { return hasKV(f, "c", "3") && hasKV(f, "a", "1") })
	}
}

func TestLeadershipTransfer(t *testing.T) {
	nodes, _ := cluster(t, "n1", "n2", "n3")
	leader := waitLeader(t, nodes...)
	// Drain notifications so far.
	for len(leader.LeaderChanges()) > 0 {
		<-leader.LeaderChanges()
	}
	if err := leader.LeadershipTransfer(); err != nil {
		t.Fatal(err)
	}
	nl := waitLeader(t, nodes...)
	if nl == leader {
		t.Fatal("leadership did not move")
	}
	if recvLeader(t, leader) {
		t.Fatal("old leader: expected false notification")
	}
	if !recvLeader(t, nl) { // nl never led before: its only notification is true
		t.Fatal("new leader: expected true notification")
	}
	if _, _, err := nl.Apply(ctxT(t), []byte("x=1")); err != nil {
		t.Fatal(err)
	}
}

func TestMembershipRemoveAndReplace(t *testing.T) {
	nodes, fsms := cluster(t, "n1", "n2", "n3")
	ctx := ctxT(t)
	leader := waitLeader(t, nodes...)

	var follower *Node
	var followerF *kvFSM
	for i, n := range nodes {
		if n != leader {
			follower, followerF = n, fsms[i]
			break
		}
	}
	if err := leader.RemoveServer(ctx, follower.ID()); err != nil {
		t.Fatal(err)
	}
	if err := leader.RemoveServer(ctx, "nobody"); err != nil {
		t.Fatal("removing unknown id:", err)
	}
	srv, err := leader.Servers()
	if err != nil {
		t.Fatal(err)
	}
	if len(srv) != 2 {
		t.Fatalf("servers after remove: %+v", srv)
	}
	for _, s := range srv {
		if s.ID == follower.ID() {
			t.Fatalf("%s still in %+v", s.ID, srv)
		}
	}
	if _, _, err := leader.Apply(ctx, []byte("after=remove")); err != nil {
		t.Fatal(err)
	}
	if hasKV(followerF, "after", "remove") {
		t.Fatal("removed node received a new entry")
	}
	follower.Shutdown()

	// Same id, new address replaces the old entry: n4 is first registered at
	// a bogus address, then at its real one, and catches up.
	n4, f4 := memNode(t, "n4", false)
	if err := leader.AddVoter(ctx, "n4", t.Name()+"/bogus"); err != nil {
		t.Fatal(err)
	}
	if err := leader.AddVoter(ctx, "n4", n4.Addr()); err != nil {
		t.Fatal(err)
	}
	srv, _ = leader.Servers()
	found := false
	for _, s := range srv {
		if s.ID == "n4" {
			found = s.Addr == n4.Addr() && s.Voter
		}
	}
	if !found || len(srv) != 3 {
		t.Fatalf("n4 not replaced: %+v", srv)
	}
	waitFor(t, 10*time.Second, "n4 to catch up", func() bool { return hasKV(f4, "after", "remove") })

	// The leader removes itself: it steps down and the others carry on.
	var rest []*Node
	for _, n := range append(nodes, n4) {
		if n != leader && n != follower {
			rest = append(rest, n)
		}
	}
	if err := leader.RemoveServer(ctx, leader.ID()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "old leader to step down", func() bool { return !leader.IsLeader() })
	nl := waitLeader(t, rest...)
	if _, _, err := nl.Apply(ctx, []byte("final=1")); err != nil {
		t.Fatal(err)
	}
	if srv, _ := nl.Servers(); len(srv) != 2 {
		t.Fatalf("servers after leader self-removal: %+v", srv)
	}
}

// TestDiskSnapshotRestart uses the real stack: BoltDB, file snapshots and TCP.
func TestDiskSnapshotRestart(t *testing.T) {
	dir := t.TempDir()
	cfg := Config{
		ID:        "d1",
		BindAddr:  freeAddr(t),
		DataDir:   dir,
		Bootstrap: true,
		Logger:    testLog(),
	}
	fsm := newKV()
	n, err := Open(cfg, fsm)
	if err != nil {
		t.Fatal(err)
	}
	if n.HadState() {
		t.Fatal("HadState on empty dir")
	}
	waitLeader(t, n)
	ctx := ctxT(t)
	for i := range 100 {
		if _, _, err := n.Apply(ctx, fmt.Appendf(nil, "k%d=%d", i, i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := n.Snapshot(); err != nil {
		t.Fatal(err)
	}
	var lastIdx uint64
	for i := 100; i < 120; i++ {
		if _, lastIdx, err = n.Apply(ctx, fmt.Appendf(nil, "k%d=%d", i, i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := n.Shutdown(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "raft.db")); err != nil {
		t.Fatal(err)
	}
	snaps, _ := filepath.Glob(filepath.Join(dir, "snapshots", "*", "state.bin"))
	if len(snaps) != 1 {
		t.Fatalf("snapshots on disk: %v", snaps)
	}

	// Restart with the identical config (Bootstrap still true).
	fsm2 := newKV()
	n2, err := Open(cfg, fsm2)
	if err != nil {
		t.Fatal("reopen:", err)
	}
	defer n2.Shutdown()
	if !n2.HadState() {
		t.Fatal("HadState false after restart")
	}
	if _, r := fsm2.stats(); r != 1 {
		t.Fatalf("restores at open = %d, want 1 (from snapshot)", r)
	}
	waitLeader(t, n2)
	if err := n2.Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	if c, _ := fsm2.stats(); c != 120 || !hasKV(fsm2, "k0", "0") || !hasKV(fsm2, "k119", "119") {
		t.Fatalf("restored count %d, want 120", c)
	}
	srv, err := n2.Servers()
	if err != nil {
		t.Fatal(err)
	}
	if len(srv) != 1 || srv[0] != (Server{ID: "d1", Addr: cfg.BindAddr, Voter: true}) {
		t.Fatalf("servers after restart: %+v", srv)
	}
	_, idx, err := n2.Apply(ctx, []byte("new=1"))
	if err != nil {
		t.Fatal(err)
	}
	if idx <= lastIdx {
		t.Fatalf("index after restart %d <= %d", idx, lastIdx)
	}
}

// TestTCPCluster joins two on-disk nodes over TCP (port 0, Node.Addr) to a
// node that already has a snapshot and checks replication.
func TestTCPCluster(t *testing.T) {
	ctx := ctxT(t)
	open := func(id string, boot bool) (*Node, *kvFSM) {
		f := newKV()
		n, err := Open(Config{ID: id, BindAddr: "127.0.0.1:0", DataDir: filepath.Join(t.TempDir(), id), Bootstrap: boot, Logger: testLog()}, f)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { n.Shutdown() })
		return n, f
	}
	n1, _ := open("t1", true)
	waitLeader(t, n1)
	for i := range 50 {
		if _, _, err := n1.Apply(ctx, fmt.Appendf(nil, "k%d=%d", i, i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := n1.Snapshot(); err != nil {
		t.Fatal(err)
	}
	n2, f2 := open("t2", false)
	n3, f3 := open("t3", false)
	for _, n := range []*Node{n2, n3} {
		if err := n1.AddVoter(ctx, n.ID(), n.Addr()); err != nil {
			t.Fatal(err)
		}
	}
	waitLeader(t, n1, n2, n3)
	if _, _, err := n1.Apply(ctx, []byte("last=1")); err != nil {
		t.Fatal(err)
	}
	for _, f := range []*kvFSM{f2, f3} {
		waitFor(t, 10*time.Second, "replication over TCP", func() bool { return hasKV(f, "k0", "0") && hasKV(f, "last", "1") })
	}
}
