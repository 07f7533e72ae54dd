package server

import (
	"sync"
)

// Watcher wakes blocking queries when the table changes: one channel for any
// change and one per node for changes to that node's assignments. It also
// holds the FSM's applied watermark (fsm.go).
type Watcher struct {
	mu      sync.Mutex
	all     chan struct{}
	nodes   map[string]chan struct{}
	applied watermark
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
