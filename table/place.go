package table

import (
	"fmt"
	"math"
	"math/bits"
	"slices"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Placement: which node holds a process, and whether a node has room.

// place picks a node for spec: the pinned node if it has room, else the up,
// undrained node with room and the fewest processes (ties to the most free
// CPU, then the lowest name).
func (t *Table) place(spec *pb.ProcessSpec) (string, error) {
	k, err := t.placeWith(spec, nil)
	if err != nil {
		return "", err
	}
	return t.candidates()[k].name, nil
}

// candidates returns the placement cache, rebuilt if it is stale.
func (t *Table) candidates() []cand {
	if !t.candsOK {
		t.cands = t.cands[:0]
		for _, name := range t.nodeOrder {
			t.cands = append(t.cands, cand{name: name, rec: t.nodes[name], alloc: t.alloc[name]})
		}
		t.candsOK = true
	}
	return t.cands
}

// placeWith is place for one replica of several: extra, if not nil, holds
// by candidate the reservations not yet in the table. It returns the
// candidate's position.
func (t *Table) placeWith(spec *pb.ProcessSpec, extra []Alloc) (int, error) {
	cs := t.candidates()
	lo, hi := 0, len(cs)
	if spec.Node != "" {
		// Pinned: only that node is looked at, draining or not.
		i, ok := slices.BinarySearch(t.nodeOrder, spec.Node)
		if !ok {
			return -1, fmt.Errorf("%w: %q", ErrUnknownNode, spec.Node)
		}
		lo, hi = i, i+1
	}
	best, bestCount, bestFree := -1, 0, int64(0)
	bestNo := -1
	var bestNoFree [2]int64
	var bestNoErr error
	up := 0
	for k := lo; k < hi; k++ {
		c := &cs[k]
		n := c.rec
		if n.State != pb.NodeState_NODE_STATE_UP || (n.Draining && spec.Node == "") {
			continue
		}
		up++
		var a Alloc
		if c.alloc != nil {
			a = *c.alloc
		}
		if extra != nil {
			a.plus(&extra[k])
		}
		if err := fits(n, &a, spec.Resources); err != nil {
			fc, fm := n.Capacity.GetCpuMaxMilli()-a.CPUMin, n.Capacity.GetMemMaxBytes()-a.MemMin
			if bestNo < 0 || fc > bestNoFree[0] || (fc == bestNoFree[0] && fm > bestNoFree[1]) {
				bestNo, bestNoFree, bestNoErr = k, [2]int64{fc, fm}, err
			}
			continue
		}
		free := n.Capacity.GetCpuMaxMilli() - a.CPUMin
		if best < 0 || a.Count < bestCount || (a.Count == bestCount && free > bestFree) {
			best, bestCount, bestFree = k, a.Count, free
		}
	}
	if best >= 0 {
		return best, nil
	}
	want := fmt.Sprintf("cpu %s, memory %s", Cores(spec.Resources.GetCpuMinMilli()), Bytes(spec.Resources.GetMemMinBytes()))
	switch {
	case spec.Node != "" && up == 0:
		return -1, fmt.Errorf("%w: node %s is %s", ErrNoCapacity, spec.Node, NodeStateName(t.nodes[spec.Node].State))
	case up == 0:
		return -1, fmt.Errorf("%w: no node is up and accepting work", ErrNoCapacity)
	}
	return -1, fmt.Errorf("%w for %s: the most free is cpu %s, memory %s on %s (%d nodes up): %v",
		ErrNoCapacity, want, Cores(max(bestNoFree[0], 0)), Bytes(max(bestNoFree[1], 0)), cs[bestNo].name, up, bestNoErr)
}

func (a *Alloc) plus(e *Alloc) {
	a.CPUMin += e.CPUMin
	a.CPUMax += e.CPUMax
	a.MemMin += e.MemMin
	a.MemMax += e.MemMax
	a.Count += e.Count
}

func (t *Table) allocOf(node string) Alloc {
	if p := t.alloc[node]; p != nil {
		return *p
	}
	return Alloc{}
}

// fits reports whether r fits on node n that already holds a. Capacity lives
// in the node's max fields; the sum of maxima may reach capacity times the
// node's overcommit percentage (0 = unchecked).
//
// Every quantity is non-negative and may be as large as MaxInt64, so the
// checks compare a request with what is left (limit - used) rather than
// adding to what is used, which could overflow.
func fits(n *pb.NodeRecord, a *Alloc, r *pb.Resources) error {
	c := n.GetCapacity()
	if need := r.GetCpuMinMilli(); need > 0 && !within(need, a.CPUMin, c.GetCpuMaxMilli()) {
		return fmt.Errorf("cpu min %s > free %s", Cores(need), Cores(max(c.GetCpuMaxMilli()-a.CPUMin, 0)))
	}
	if need := r.GetMemMinBytes(); need > 0 && !within(need, a.MemMin, c.GetMemMaxBytes()) {
		return fmt.Errorf("memory min %s > free %s", Bytes(need), Bytes(max(c.GetMemMaxBytes()-a.MemMin, 0)))
	}
	if oc := n.GetOvercommitPercent(); oc > 0 {
		if m := r.GetCpuMaxMilli(); m > 0 && !within(m, a.CPUMax, percent(c.GetCpuMaxMilli(), oc)) {
			return fmt.Errorf("cpu max would exceed %d%% of capacity", oc)
		}
		if m := r.GetMemMaxBytes(); m > 0 && !within(m, a.MemMax, percent(c.GetMemMaxBytes(), oc)) {
			return fmt.Errorf("memory max would exceed %d%% of capacity", oc)
		}
	}
	return nil
}

// within reports whether used+need <= limit, without overflow. A negative
// used means the sum already wrapped (sums of maxima are not checked while a
// node has no overcommit limit): nothing more fits.
func within(need, used, limit int64) bool {
	return used >= 0 && limit >= used && need <= limit-used
}

// percent returns v*p/100 for v >= 0, saturating at MaxInt64.
func percent(v int64, p uint32) int64 {
	if v <= 0 {
		return 0
	}
	hi, lo := bits.Mul64(uint64(v), uint64(p))
	if hi >= 100 {
		return math.MaxInt64
	}
	q, _ := bits.Div64(hi, lo, 100)
	if q > math.MaxInt64 {
		return math.MaxInt64
	}
	return int64(q)
}
