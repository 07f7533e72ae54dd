package table

import (
	"fmt"
	"slices"
	"sort"
	"strings"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Reads: every method here takes the read lock; records handed out are
// immutable.

// Index is the log index of the last applied command.
func (t *Table) Index() uint64 {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.index
}

// Applied is the log index of the last command applied, whether it
// succeeded or not (Index rolls back when a command fails).
func (t *Table) Applied() uint64 {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.applied
}

// Get returns a process record, or nil.
func (t *Table) Get(id string) *pb.ProcessRecord {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.procs[id]
}

// Resolve turns a reference into process ids: an exact id, a unique id
// prefix, or a name (every process with that name).
func (t *Table) Resolve(ref string) ([]string, error) {
	if ref == "" {
		// Unnamed processes share the empty name; "" must not mean all of
		// them.
		return nil, fmt.Errorf("%w: no process %q", ErrNotFound, ref)
	}
	t.mu.RLock()
	defer t.mu.RUnlock()
	if t.procs[ref] != nil {
		return []string{ref}, nil
	}
	if s := t.byName[ref]; len(s) > 0 {
		return sortedKeys(s), nil
	}
	var match []string
	if len(ref) >= 3 {
		for id := range t.procs {
			if strings.HasPrefix(id, ref) {
				match = append(match, id)
				if len(match) > 1 {
					return nil, fmt.Errorf("%w: %q matches more than one process", ErrInvalid, ref)
				}
			}
		}
	}
	if len(match) == 1 {
		return match, nil
	}
	return nil, fmt.Errorf("%w: no process %q", ErrNotFound, ref)
}

// Processes returns records sorted by creation time, then id. all includes
// terminal records; node, if set, keeps only that node's live processes.
func (t *Table) Processes(all bool, node string) []*pb.ProcessRecord {
	t.mu.RLock()
	if node == "" {
		out := make([]*pb.ProcessRecord, 0, len(t.procs))
		for _, id := range t.order {
			if r := t.procs[id]; all || live(r) {
				out = append(out, r)
			}
		}
		t.mu.RUnlock()
		return out
	}
	var out []*pb.ProcessRecord
	for id := range t.byNode[node] {
		out = append(out, t.procs[id])
	}
	t.mu.RUnlock()
	sort.Slice(out, func(i, j int) bool {
		if out[i].CreatedUnixNano != out[j].CreatedUnixNano {
			return out[i].CreatedUnixNano < out[j].CreatedUnixNano
		}
		return out[i].Id < out[j].Id
	})
	return out
}

// Assignments returns a node's live processes, sorted by id, and the index
// of the last change to them.
func (t *Table) Assignments(node string) ([]*pb.ProcessRecord, uint64) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	out := make([]*pb.ProcessRecord, 0, len(t.byNode[node]))
	for _, id := range sortedKeys(t.byNode[node]) {
		out = append(out, t.procs[id])
	}
	return out, t.nodeIndex[node]
}

// AssignmentsSince returns what changed in a node's assignments after index
// since: the processes assigned now that changed, and the ids no longer
// assigned. When since is 0 or older than the table can tell, full is set
// and changed holds every assigned process (removed is then empty).
func (t *Table) AssignmentsSince(node string, since uint64) (changed []*pb.ProcessRecord, removed []string, full bool, index uint64) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	d := t.left[node]
	base := t.leftBase
	if d != nil {
		base = d.since
	}
	full = since == 0 || since < base
	if c := t.changes[node]; !full && (c == nil || c.since <= since) {
		// Only what the change log names, not every assigned process.
		var ids []string
		if c != nil {
			i, _ := slices.BinarySearchFunc(c.log, since+1, func(e departure, idx uint64) int {
				return cmpUint(e.index, idx)
			})
			for _, e := range c.log[i:] {
				if _, ok := t.byNode[node][e.id]; ok {
					ids = append(ids, e.id)
				}
			}
		}
		slices.Sort(ids)
		for _, id := range slices.Compact(ids) {
			changed = append(changed, t.procs[id])
		}
	} else {
		for _, id := range sortedKeys(t.byNode[node]) {
			if r := t.procs[id]; full || r.ModifyIndex > since {
				changed = append(changed, r)
			}
		}
	}
	if !full && d != nil {
		i, _ := slices.BinarySearchFunc(d.log, since+1, func(e departure, idx uint64) int {
			return cmpUint(e.index, idx)
		})
		seen := map[string]bool{}
		for _, e := range d.log[i:] {
			if _, back := t.byNode[node][e.id]; !back && !seen[e.id] {
				seen[e.id] = true
				removed = append(removed, e.id)
			}
		}
	}
	return changed, removed, full, t.nodeIndex[node]
}

// HandedOff returns which of the ids AssignmentsSince(node, since) reports
// removed left by a committed make-before-break move: their next
// incarnation already runs elsewhere, so the node may stop its copy
// gracefully rather than kill it at once. It is empty when AssignmentsSince
// would answer with a full list.
func (t *Table) HandedOff(node string, since uint64) []string {
	t.mu.RLock()
	defer t.mu.RUnlock()
	d := t.left[node]
	if d == nil || since == 0 || since < d.since {
		return nil
	}
	i, _ := slices.BinarySearchFunc(d.log, since+1, func(e departure, idx uint64) int { return cmpUint(e.index, idx) })
	var out []string
	for _, e := range d.log[i:] {
		if _, back := t.byNode[node][e.id]; e.handoff && !back && !slices.Contains(out, e.id) {
			out = append(out, e.id)
		}
	}
	return out
}

// NodeIndex returns the index of the last change to a node's assignments.
func (t *Table) NodeIndex(node string) uint64 {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.nodeIndex[node]
}

// NodeView is a node record with its current allocation.
type NodeView struct {
	Node  *pb.NodeRecord
	Alloc Alloc
}

// Nodes returns every node, sorted by name.
func (t *Table) Nodes() []NodeView {
	t.mu.RLock()
	defer t.mu.RUnlock()
	out := make([]NodeView, 0, len(t.nodeOrder))
	for _, name := range t.nodeOrder {
		out = append(out, NodeView{Node: t.nodes[name], Alloc: t.allocOf(name)})
	}
	return out
}

// NodeRecords returns every node record, sorted by name, without the
// allocation sums Nodes adds.
func (t *Table) NodeRecords() []*pb.NodeRecord {
	t.mu.RLock()
	defer t.mu.RUnlock()
	out := make([]*pb.NodeRecord, 0, len(t.nodeOrder))
	for _, name := range t.nodeOrder {
		out = append(out, t.nodes[name])
	}
	return out
}

// ServerRecords returns the records of the nodes with the server role,
// sorted by name. It costs O(servers), not O(nodes): every heartbeat answer
// lists the servers.
func (t *Table) ServerRecords() []*pb.NodeRecord {
	t.mu.RLock()
	defer t.mu.RUnlock()
	out := make([]*pb.NodeRecord, 0, len(t.servers))
	for _, name := range t.servers {
		out = append(out, t.nodes[name])
	}
	return out
}

// Node returns one node record, or nil.
func (t *Table) Node(name string) *pb.NodeRecord {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.nodes[name]
}

// StateCounts returns how many process records are in each state.
func (t *Table) StateCounts() map[pb.ProcessState]int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	out := make(map[pb.ProcessState]int, len(t.states))
	for st, n := range t.states {
		if n != 0 {
			out[st] = n
		}
	}
	return out
}

// Len returns the number of process records.
func (t *Table) Len() int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return len(t.procs)
}
