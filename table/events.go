package table

import (
	"slices"
	"strings"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Events: what happened to the cluster, one record per thing, kept in a
// bounded ring in the table so that every server can answer (and a
// snapshot carries it).
//
// As in Nomad's state/events.go, the events are derived from what a
// command changed: each operation notes them as it changes records
// (txn.event), and they are published, stamped with the command's index,
// only if the command succeeds; a failed command (or a failed command of a
// batch) leaves none. All the events of one command share its index, and
// the ring drops whole indexes only, oldest first, so that "the events
// after index N" (Events, and ShimService.Events' since) is exact for
// every N at or after EventsBase.

// MaxEvents is how many events the ring keeps, give or take the events of
// one command (a spawn of many replicas notes one each).
const MaxEvents = 4096

// Event types.
const (
	EvPlaced        = "process.placed"         // spawned, or queued and now placed: on node
	EvPending       = "process.pending"        // lost its node and no other has room: queued
	EvRunning       = "process.running"        // a run started (reason: its pid)
	EvBackoff       = "process.backoff"        // exited, restarting on its node after a delay
	EvExited        = "process.exited"         // ended for good
	EvFailed        = "process.failed"         // could not start, or failed for good
	EvKilled        = "process.killed"         // stopped by a kill, or lost while being stopped
	EvStopping      = "process.stopping"       // a kill asked it to stop
	EvMoving        = "process.moving"         // a make-before-break move started (drain, resize, growth)
	EvMoved         = "process.moved"          // now runs on node: a move committed, or its node was lost
	EvMoveFailed    = "process.move_failed"    // the next incarnation failed to start: it stays
	EvResized       = "process.resized"        // new bounds
	EvGrown         = "process.grown"          // a bigger grant
	EvShrunk        = "process.shrunk"         // a smaller grant
	EvWaiting       = "process.waiting"        // a growth waits for room (reason: why, and what moves)
	EvGrowCancelled = "process.grow_cancelled" // a growth that waited is no longer asked for
	EvRoom          = "process.room"           // moves to make room for another (reason: whom, where to)
	EvNodeJoined    = "node.joined"
	EvNodeUp        = "node.up"
	EvNodeDown      = "node.down"
	EvNodeLeft      = "node.left"
	EvNodeDrained   = "node.drained"
	EvNodeUndrained = "node.undrained"
	EvNodeRemoved   = "node.removed"
)

// event notes an event about process rec (nil for none) on node.
func (x *txn) event(typ string, rec *pb.ProcessRecord, node, reason string) {
	e := &pb.Event{Type: typ, Node: node, Reason: reason, UnixNano: x.now}
	if rec != nil {
		e.Id = rec.Id
	}
	x.events = append(x.events, e)
}

// publish appends the command's events to the ring, stamped with the
// table's index, and returns them.
func (x *txn) publish() []*pb.Event {
	t := x.t
	evs := x.events
	if len(evs) == 0 {
		return nil
	}
	for _, e := range evs {
		e.Index = t.index
	}
	if len(t.events)+len(evs) > MaxEvents && len(t.events) > 0 {
		// Drop a sixteenth of the ring at once (amortized O(1) per
		// event; a full ring's size, and so a snapshot's, then varies by
		// 6 %, not 25 %), and never part of an index.
		drop := min(max(len(t.events)+len(evs)-MaxEvents, MaxEvents/16), len(t.events))
		for drop < len(t.events) && t.events[drop].Index == t.events[drop-1].Index {
			drop++
		}
		t.eventsBase = t.events[drop-1].Index
		t.events = slices.Delete(t.events, 0, drop)
	}
	t.events = append(t.events, evs...)
	return evs
}

// Events returns the events after index since whose type is one of types
// (a type ending in "." matches every type it starts; none: all), oldest
// first; the ring's base, the index of the newest event dropped from it;
// and the table's index: every event up to it was in the ring. Events at
// or before the base are gone: a since below it (but 0, "from the oldest
// kept") misses some. The events are shared: do not modify them.
func (t *Table) Events(since uint64, types []string) (evs []*pb.Event, base, index uint64) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	i, _ := slices.BinarySearchFunc(t.events, since+1, func(e *pb.Event, idx uint64) int { return cmpUint(e.Index, idx) })
	for _, e := range t.events[i:] {
		if MatchType(e.Type, types) {
			evs = append(evs, e)
		}
	}
	return evs, t.eventsBase, t.index
}

// EventsBase returns the index of the newest event dropped from the ring.
func (t *Table) EventsBase() uint64 {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.eventsBase
}

// MatchType reports whether an event type is one of types: equal to one,
// or starting with one that ends in "." ("node." matches "node.down").
// No types match everything.
func MatchType(typ string, types []string) bool {
	if len(types) == 0 {
		return true
	}
	for _, w := range types {
		if typ == w || strings.HasSuffix(w, ".") && strings.HasPrefix(typ, w) {
			return true
		}
	}
	return false
}

// RoleName is the short name of a node role ("server", "worker").
func RoleName(r pb.NodeRole) string {
	switch r {
	case pb.NodeRole_NODE_ROLE_SERVER:
		return "server"
	case pb.NodeRole_NODE_ROLE_WORKER:
		return "worker"
	}
	return "node"
}
