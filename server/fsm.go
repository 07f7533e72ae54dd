package server

import (
	"io"
	"sync/atomic"

	"github.com/shim-run/shim/raftlog"
	"github.com/shim-run/shim/table"
)

// The FSM and its applied watermark.
//
// A linearizable read waits until the local table has applied the leader's
// commit index (read.go). None of the counters at hand keeps pace with that
// index: the table's Index rolls back when a command fails, no-op, barrier
// and configuration entries never reach FSM.Apply, and raft's AppliedIndex
// moves before the FSM has applied an entry. So the FSM keeps one watermark,
// the index the table's state is complete through: it moves with every
// entry FSM.Apply sees, failed or not, with every Restore, and over the
// entries that never reach the FSM when a reader asks (Server.applied, with
// raftlog's AppliedThrough). Every wait for "the table has applied index i"
// waits on it.

// FSM adapts a table to raftlog.FSM, moves the applied watermark and feeds a
// Watcher.
type FSM struct {
	Table *table.Table
	Watch *Watcher
}

// Apply applies one log entry and wakes the watchers of what changed.
func (f *FSM) Apply(index uint64, data []byte) any {
	res := f.Table.Apply(index, data)
	f.Watch.applied.raise(index) // before waking anyone: waiters check it
	r, ok := res.(table.Result)
	if !ok {
		return res
	}
	f.Watch.Notify(r.Nodes)
	return lean(r)
}

// lean drops from a result what its proposer does not use: the events (the
// table's ring has them) and the nodes touched (just notified). hashicorp/raft
// keeps the answer with its log entry while the entry stays in its log cache
// (512 entries), so a result's events (a spawn or report of hundreds notes one
// each) grew the leader's heap with the size of its recent batches.
func lean(r table.Result) table.Result {
	r.Events, r.Nodes = nil, nil
	if len(r.Results) > 0 {
		subs := make([]table.Result, len(r.Results))
		for i, s := range r.Results {
			subs[i] = lean(s)
		}
		r.Results = subs
	}
	return r
}

// Snapshot captures the table.
func (f *FSM) Snapshot() (raftlog.Snapshot, error) { return f.Table.Snapshot(), nil }

// Restore replaces the table and wakes every watcher.
func (f *FSM) Restore(r io.Reader) error {
	err := f.Table.Restore(r)
	if err == nil {
		f.Watch.applied.raise(f.Table.Applied())
	}
	f.Watch.mu.Lock()
	nodes := make([]string, 0, len(f.Watch.nodes))
	for n := range f.Watch.nodes {
		nodes = append(nodes, n)
	}
	f.Watch.mu.Unlock()
	f.Watch.Notify(nodes)
	return err
}

// watermark is a log index that only moves forward.
type watermark struct{ v atomic.Uint64 }

func (w *watermark) load() uint64 { return w.v.Load() }

// raise moves the watermark to i, unless it is there already.
func (w *watermark) raise(i uint64) {
	for {
		cur := w.v.Load()
		if i <= cur || w.v.CompareAndSwap(cur, i) {
			return
		}
	}
}
