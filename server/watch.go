package server

import (
	"io"
	"sync"

	"github.com/shim-run/shim/raftlog"
	"github.com/shim-run/shim/table"
)

// Watcher wakes blocking queries when the table changes: one channel for any
// change and one per node for changes to that node's assignments.
type Watcher struct {
	mu    sync.Mutex
	all   chan struct{}
	nodes map[string]chan struct{}
}

// NewWatcher returns a Watcher.
func NewWatcher() *Watcher {
	return &Watcher{all: make(chan struct{}), nodes: map[string]chan struct{}{}}
}

// Notify wakes everyone waiting for any change, and those waiting on nodes.
func (w *Watcher) Notify(nodes []string) {
	w.mu.Lock()
	close(w.all)
	w.all = make(chan struct{})
	for _, n := range nodes {
		if c, ok := w.nodes[n]; ok {
			close(c)
			delete(w.nodes, n)
		}
	}
	w.mu.Unlock()
}

// Any returns a channel closed at the next change.
func (w *Watcher) Any() <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.all
}

// Node returns a channel closed at the next change to node's assignments.
func (w *Watcher) Node(n string) <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	c, ok := w.nodes[n]
	if !ok {
		c = make(chan struct{})
		w.nodes[n] = c
	}
	return c
}

// FSM adapts a table to raftlog.FSM and feeds a Watcher.
type FSM struct {
	Table *table.Table
	Watch *Watcher
}

// Apply applies one log entry and wakes the watchers of what changed.
func (f *FSM) Apply(index uint64, data []byte) any {
	res := f.Table.Apply(index, data)
	if r, ok := res.(table.Result); ok {
		f.Watch.Notify(r.Nodes)
	}
	return res
}

// Snapshot captures the table.
func (f *FSM) Snapshot() (raftlog.Snapshot, error) { return f.Table.Snapshot(), nil }

// Restore replaces the table and wakes every watcher.
func (f *FSM) Restore(r io.Reader) error {
	err := f.Table.Restore(r)
	f.Watch.mu.Lock()
	nodes := make([]string, 0, len(f.Watch.nodes))
	for n := range f.Watch.nodes {
		nodes = append(nodes, n)
	}
	f.Watch.mu.Unlock()
	f.Watch.Notify(nodes)
	return err
}
