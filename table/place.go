package table

import (
	"container/heap"
	"fmt"
	"math"
	"math/bits"
	"slices"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Placement: which node holds a process, whether a node has room, and
// (room.go) which processes move away to make room for one that grows.
//
// A node's room is its capacity minus the grants of the live processes it
// holds (claim): never their maxima. A CPU max is a ceiling on a
// compressible resource, so it does not count; the memory a node's
// processes may use without asking (fixed processes' maxima, elastic ones'
// grants) may reach the node's overcommit percentage of its capacity.

// place picks a node for a process with spec that claims c: the pinned node
// if it has room, else the up, undrained node other than not with room and
// the fewest processes (ties to the most free CPU, then the lowest name).
func (t *Table) place(spec *pb.ProcessSpec, c claim, not string) (string, error) {
	k, err := t.placeWith(spec, c, nil, not)
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
func (t *Table) placeWith(spec *pb.ProcessSpec, need claim, extra []Alloc, not string) (int, error) {
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
	best, bestCount, bestFree, bestSame := -1, 0, int64(0), 0
	sib := t.siblings(spec)
	var portErr error
	bestNo := -1
	var bestNoFree [2]int64
	var bestNoErr, offerErr error // offerErr: the first node that lacks what spec needs (Offers)
	up := 0
	for k := lo; k < hi; k++ {
		c := &cs[k]
		n := c.rec
		if n.State != pb.NodeState_NODE_STATE_UP || (n.Draining && spec.Node == "") || c.name == not {
			continue
		}
		if err := Offers(n, spec); err != nil {
			if offerErr == nil {
				offerErr = err
			}
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
		if err := fits(n, &a, need); err != nil {
			fc, fm := n.Capacity.GetCpuMaxMilli()-a.CPUGrant, n.Capacity.GetMemMaxBytes()-a.MemGrant
			if bestNo < 0 || fc > bestNoFree[0] || (fc == bestNoFree[0] && fm > bestNoFree[1]) {
				bestNo, bestNoFree, bestNoErr = k, [2]int64{fc, fm}, err
			}
			continue
		}
		if len(spec.GetPorts()) > 0 {
			if _, err := t.pickPorts(spec, c.name, nil); err != nil {
				if portErr == nil {
					portErr = err
				}
				continue
			}
		}
		free := n.Capacity.GetCpuMaxMilli() - a.CPUGrant
		same := sib[c.name] + a.Same
		if best < 0 || same < bestSame || (same == bestSame && (a.Count < bestCount || (a.Count == bestCount && free > bestFree))) {
			best, bestCount, bestFree, bestSame = k, a.Count, free, same
		}
	}
	if best >= 0 {
		return best, nil
	}
	if portErr != nil && bestNo < 0 {
		return -1, fmt.Errorf("%w: no node has the ports it asks for (%v)", ErrNoCapacity, portErr)
	}
	want := fmt.Sprintf("cpu %s, memory %s", Cores(need.cpu), Bytes(need.mem))
	switch {
	case up == 0 && offerErr != nil && spec.Node != "":
		return -1, fmt.Errorf("%w: %v", ErrNoCapacity, offerErr)
	case up == 0 && offerErr != nil:
		return -1, fmt.Errorf("%w: no up node offers what it needs (%v)", ErrNoCapacity, offerErr)
	case spec.Node != "" && up == 0:
		return -1, fmt.Errorf("%w: node %s is %s", ErrNoCapacity, spec.Node, NodeStateName(t.nodes[spec.Node].State))
	case up == 0 && not != "":
		return -1, fmt.Errorf("%w: no node but %s is up and accepting work", ErrNoCapacity, not)
	case up == 0:
		return -1, fmt.Errorf("%w: no node is up and accepting work", ErrNoCapacity)
	}
	return -1, fmt.Errorf("%w for %s: the most free is cpu %s, memory %s on %s (%d nodes up): %v",
		ErrNoCapacity, want, Cores(max(bestNoFree[0], 0)), Bytes(max(bestNoFree[1], 0)), cs[bestNo].name, up, bestNoErr)
}

// placeReplicas places n replicas of spec, each claiming need, exactly as n
// calls of placeWith would, each seeing the replicas placed before it (it
// returns candidate positions). placeWith scans every node for each
// replica; this scans them once and keeps the nodes that fit in a heap
// ordered as placeWith chooses (fewest replicas of the same service or
// spawn, then fewest processes, then the most free CPU, then the lowest
// name), so a spawn of n replicas on m nodes costs O(m + n log m), not
// O(n m). Within a spawn, only the chosen node's allocation changes, and a
// node that does not fit a claim never fits it after more is placed, so the
// others' places in the order hold. When no node fits, placeWith gives the
// error. A spec with ports is placed one by one (placeEach): each replica
// holds its ports before the next is placed.
func (t *Table) placeReplicas(spec *pb.ProcessSpec, need claim, n int) ([]int, error) {
	if n == 1 || len(spec.GetPorts()) > 0 {
		return t.placeEach(spec, need, n)
	}
	cs := t.candidates()
	sib := t.siblings(spec)
	extra := make([]Alloc, len(cs))
	out := make([]int, 0, n)
	lo, hi := 0, len(cs)
	if spec.Node != "" {
		i, ok := slices.BinarySearch(t.nodeOrder, spec.Node)
		if !ok {
			return nil, fmt.Errorf("%w: %q", ErrUnknownNode, spec.Node)
		}
		lo, hi = i, i+1
	}
	h := make(placeHeap, 0, hi-lo)
	for k := lo; k < hi; k++ {
		c := &cs[k]
		nr := c.rec
		if nr.State != pb.NodeState_NODE_STATE_UP || (nr.Draining && spec.Node == "") || Offers(nr, spec) != nil {
			continue
		}
		if c.alloc != nil {
			extra[k] = *c.alloc // here: the node's whole allocation
		}
		if fits(nr, &extra[k], need) == nil {
			h = append(h, placeKey{same: sib[c.name], count: extra[k].Count, free: nr.Capacity.GetCpuMaxMilli() - extra[k].CPUGrant, k: k})
		}
	}
	heap.Init(&h)
	for range n {
		if len(h) == 0 {
			// What placeWith reports for the next replica: extra minus
			// the allocations held before the spawn.
			add := make([]Alloc, len(cs))
			for _, k := range out {
				add[k].add(need, 1)
				add[k].Same++
			}
			_, err := t.placeWith(spec, need, add, "")
			if err == nil {
				err = fmt.Errorf("%w: placement disagrees with itself", ErrNoCapacity) // cannot happen
			}
			return out, err
		}
		k := h[0].k
		out = append(out, k)
		a := &extra[k]
		a.add(need, 1)
		if fits(cs[k].rec, a, need) == nil {
			h[0].same++
			h[0].count, h[0].free = a.Count, cs[k].rec.Capacity.GetCpuMaxMilli()-a.CPUGrant
			heap.Fix(&h, 0)
		} else {
			heap.Pop(&h)
		}
	}
	return out, nil
}

// placeEach places n replicas one at a time with placeWith, each seeing
// the ones before it and the ports they hold.
func (t *Table) placeEach(spec *pb.ProcessSpec, need claim, n int) ([]int, error) {
	var extra []Alloc
	out := make([]int, 0, n)
	for range n {
		k, err := t.placeWith(spec, need, extra, "")
		if err != nil {
			return out, err
		}
		out = append(out, k)
		if n == 1 {
			break
		}
		if extra == nil {
			extra = make([]Alloc, len(t.candidates()))
		}
		extra[k].add(need, 1)
		extra[k].Same++
		node := t.candidates()[k].name
		ps, err := t.pickPorts(spec, node, nil)
		if err != nil { // placeWith checked the ports: not reached
			return out, err
		}
		t.holdPorts(node, ps)
	}
	return out, nil
}

// placeKey is a node in placeReplicas's order.
type placeKey struct {
	same  int // replicas of the same service or spawn on the node
	count int
	free  int64
	k     int
}

type placeHeap []placeKey

func (h placeHeap) Len() int { return len(h) }
func (h placeHeap) Less(i, j int) bool {
	a, b := &h[i], &h[j]
	if a.same != b.same {
		return a.same < b.same
	}
	if a.count != b.count {
		return a.count < b.count
	}
	if a.free != b.free {
		return a.free > b.free
	}
	return a.k < b.k
}
func (h placeHeap) Swap(i, j int) { h[i], h[j] = h[j], h[i] }
func (h *placeHeap) Push(x any)   { *h = append(*h, x.(placeKey)) }
func (h *placeHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

func (a *Alloc) plus(e *Alloc) {
	a.CPUGrant += e.CPUGrant
	a.MemGrant += e.MemGrant
	a.MemLimit += e.MemLimit
	a.CPUMin += e.CPUMin
	a.CPUMax += e.CPUMax
	a.MemMin += e.MemMin
	a.MemMax += e.MemMax
	a.Count += e.Count
	a.Same += e.Same
}

func (t *Table) allocOf(node string) Alloc {
	if p := t.alloc[node]; p != nil {
		return *p
	}
	return Alloc{}
}

// fits reports whether claim r fits on node n that already holds a.
// Capacity lives in the node's max fields: the grants must fit it, and the
// memory the processes may use without asking (Alloc.MemLimit) may reach
// capacity times the node's overcommit percentage (0 = unchecked).
//
// Every quantity is non-negative and may be as large as MaxInt64, so the
// checks compare a request with what is left (limit - used) rather than
// adding to what is used, which could overflow.
func fits(n *pb.NodeRecord, a *Alloc, r claim) error {
	c := n.GetCapacity()
	if need := r.cpu; need > 0 && !within(need, a.CPUGrant, c.GetCpuMaxMilli()) {
		return fmt.Errorf("cpu %s > free %s", Cores(need), Cores(max(c.GetCpuMaxMilli()-a.CPUGrant, 0)))
	}
	if need := r.mem; need > 0 && !within(need, a.MemGrant, c.GetMemMaxBytes()) {
		return fmt.Errorf("memory %s > free %s", Bytes(need), Bytes(max(c.GetMemMaxBytes()-a.MemGrant, 0)))
	}
	if oc := n.GetOvercommitPercent(); oc > 0 {
		if m := r.memLimit; m > 0 && !within(m, a.MemLimit, percent(c.GetMemMaxBytes(), oc)) {
			return fmt.Errorf("memory limits would exceed %d%% of capacity", oc)
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
