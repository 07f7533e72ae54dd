package table

import (
	"cmp"
	"slices"
	"sort"
	"strings"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// The derived indexes: which node holds what, creation order, and the
// per-node logs of departures and changes the agents are sent deltas from.

// depart logs that id is no longer assigned to node as of the table index.
func (t *Table) depart(node, id string) {
	d := t.left[node]
	if d == nil {
		d = &departures{since: t.leftBase}
		t.left[node] = d
	}
	if len(d.log) >= maxDepartures {
		drop := len(d.log) / 2
		d.since = d.log[drop-1].index
		d.log = slices.Delete(d.log, 0, drop)
	}
	d.log = append(d.log, departure{id: id, index: t.index})
}

// insertOrder adds a new record's id to order. Records usually arrive in
// creation order, so this is an append.
func (t *Table) insertOrder(rec *pb.ProcessRecord) {
	n := len(t.order)
	if n == 0 || t.orderLess(t.order[n-1], rec) {
		t.order = append(t.order, rec.Id)
		return
	}
	i := sort.Search(n, func(i int) bool { return !t.orderLess(t.order[i], rec) })
	t.order = slices.Insert(t.order, i, rec.Id)
}

// sortNew puts the records collected by put into the creation order. The
// replicas of a spawn share a creation time and have random ids: sorted
// first, each is an append (or a search from the end), not a search and an
// insert in the middle of a run of equal times.
func (x *txn) sortNew() {
	recs := x.newRecs
	x.newRecs, x.collecting = nil, false
	slices.SortFunc(recs, func(a, b *pb.ProcessRecord) int {
		if c := cmp.Compare(a.CreatedUnixNano, b.CreatedUnixNano); c != 0 {
			return c
		}
		return strings.Compare(a.Id, b.Id)
	})
	for _, rec := range recs {
		x.t.insertOrder(rec)
	}
}

// orderLess reports whether the record of id sorts before rec.
func (t *Table) orderLess(id string, rec *pb.ProcessRecord) bool {
	a := t.procs[id]
	if a.CreatedUnixNano != rec.CreatedUnixNano {
		return a.CreatedUnixNano < rec.CreatedUnixNano
	}
	return id < rec.Id
}

// logChange logs that id's record changed while assigned to node, as of the
// table index.
func (t *Table) logChange(node, id string) {
	d := t.changes[node]
	if d == nil {
		d = &departures{since: t.leftBase}
		t.changes[node] = d
	}
	if n := len(d.log); n > 0 && d.log[n-1].id == id && d.log[n-1].index == t.index {
		return
	}
	if len(d.log) >= maxDepartures {
		drop := len(d.log) / 2
		d.since = d.log[drop-1].index
		d.log = slices.Delete(d.log, 0, drop)
	}
	d.log = append(d.log, departure{id: id, index: t.index})
}

// holders are the nodes a live record reserves room on: its node, during a
// make-before-break move also the node it moves to, and while an older
// incarnation may still run on a cut-off node (on-lost keep) that node,
// which is so sent the record and learns when to stop its copy (lost.go).
func holders(rec *pb.ProcessRecord) []string {
	var out []string
	if rec.Node != "" {
		out = append(out, rec.Node)
		if rec.MoveTo != "" {
			out = append(out, rec.MoveTo)
		}
	}
	if c := rec.CutOff.GetNode(); c != "" && c != rec.Node && c != rec.MoveTo {
		out = append(out, c)
	}
	return out
}

func (t *Table) hold(node string, rec *pb.ProcessRecord) {
	addIndex(t.byNode, node, rec.Id)
	a := t.alloc[node]
	if a == nil {
		a = &Alloc{}
		t.alloc[node] = a
		t.candsOK = false
	}
	a.add(claimOn(rec, node), 1)
}

func (t *Table) release(node string, rec *pb.ProcessRecord) {
	delIndex(t.byNode, node, rec.Id)
	if a := t.alloc[node]; a != nil {
		a.add(claimOn(rec, node), -1)
		if a.Count == 0 {
			delete(t.alloc, node)
			t.candsOK = false
		}
	}
}

func (a *Alloc) add(c claim, sign int64) {
	a.CPUGrant += sign * c.cpu
	a.MemGrant += sign * c.mem
	a.CPUMin += sign * c.bounds.GetCpuMinMilli()
	a.CPUMax += sign * c.bounds.GetCpuMaxMilli()
	a.MemMin += sign * c.bounds.GetMemMinBytes()
	a.MemMax += sign * c.bounds.GetMemMaxBytes()
	a.MemLimit += sign * c.memLimit
	a.Count += int(sign)
}

func addIndex(m map[string]map[string]struct{}, key, id string) {
	s := m[key]
	if s == nil {
		s = map[string]struct{}{}
		m[key] = s
	}
	s[id] = struct{}{}
}

func delIndex(m map[string]map[string]struct{}, key, id string) {
	if s := m[key]; s != nil {
		delete(s, id)
		if len(s) == 0 {
			delete(m, key)
		}
	}
}

func cmpUint(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// handedOff marks id's departure from node, just logged, as a committed
// make-before-break move: the node may stop its copy gracefully.
func (t *Table) handedOff(node, id string) {
	if d := t.left[node]; d != nil && len(d.log) > 0 && d.log[len(d.log)-1].id == id {
		d.log[len(d.log)-1].handoff = true
	}
}
