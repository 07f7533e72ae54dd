package raftlog

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// kvFSM is a tiny test FSM: each entry "k=v" sets a key and bumps a counter.
type kvFSM struct {
	mu       sync.Mutex
	kv       map[string]string
	count    int
	last     uint64
	restores int
}

type kvState struct {
	KV    map[string]string
	Count int
	Last  uint64
}

func newKV() *kvFSM { return &kvFSM{kv: map[string]string{}} }

func (f *kvFSM) Apply(index uint64, data []byte) any {
	f.mu.Lock()
	defer f.mu.Unlock()
	k, v, _ := strings.Cut(string(data), "=")
	f.kv[k] = v
	f.count++
	f.last = index
	return f.count
}

func (f *kvFSM) Snapshot() (Snapshot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	st := kvState{KV: make(map[string]string, len(f.kv)), Count: f.count, Last: f.last}
	for k, v := range f.kv {
		st.KV[k] = v
	}
	return kvSnap{st}, nil
}

func (f *kvFSM) Restore(r io.Reader) error {
	var st kvState
	if err := json.NewDecoder(r).Decode(&st); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.kv, f.count, f.last = st.KV, st.Count, st.Last
	f.restores++
	return nil
}

func (f *kvFSM) get(k string) (string, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	v, ok := f.kv[k]
	return v, ok
}

func (f *kvFSM) stats() (count, restores int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.count, f.restores
}

type kvSnap struct{ st kvState }

func (s kvSnap) Persist(w io.Writer) error { return json.NewEncoder(w).Encode(s.st) }
func (s kvSnap) Release()                  {}

// testLog returns the raft log sink for tests: silent unless RAFTLOG_LOG=1.
func testLog() io.Writer {
	if os.Getenv("RAFTLOG_LOG") != "" {
		return os.Stderr
	}
	return io.Discard
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(tb testing.TB, d time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitLeader waits until exactly one of nodes is leader and all of them agree
// on it, and returns it.
func waitLeader(tb testing.TB, nodes ...*Node) *Node {
	tb.Helper()
	var leader *Node
	waitFor(tb, 10*time.Second, "a leader", func() bool {
		leader = nil
		for _, n := range nodes {
			if n.IsLeader() {
				if leader != nil {
					return false
				}
				leader = n
			}
		}
		if leader == nil {
			return false
		}
		for _, n := range nodes {
			if id, _ := n.Leader(); id != leader.ID() {
				return false
			}
		}
		return true
	})
	return leader
}

// freeAddr returns a currently free 127.0.0.1 TCP address.
func freeAddr(tb testing.TB) string {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// memNode opens an InMemory node named after the test, shut down at cleanup.
func memNode(tb testing.TB, id string, bootstrap bool) (*Node, *kvFSM) {
	tb.Helper()
	fsm := newKV()
	n, err := Open(Config{
		ID:        id,
		BindAddr:  fmt.Sprintf("%s/%s", tb.Name(), id),
		Bootstrap: bootstrap,
		Logger:    testLog(),
		InMemory:  true,
	}, fsm)
	if err != nil {
		tb.Fatalf("open %s: %v", id, err)
	}
	tb.Cleanup(func() { n.Shutdown() })
	return n, fsm
}

// hasKV reports whether f holds k=v.
func hasKV(f *kvFSM, k, v string) bool {
	got, ok := f.get(k)
	return ok && got == v
}
