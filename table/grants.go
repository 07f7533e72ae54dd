package table

import (
	"fmt"

	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Grants.
//
// Every process has a grant (ProcessRecord.grant): min <= grant <= max for
// CPU (millicores) and memory (bytes), what its node has promised it.
// Placement and a node's room count grants (claim), never maxima. A new
// process's grant is its minimum. A fixed process (grow OFF) keeps it
// there, and its limits at its maximum, as before grants. An elastic one
// (grow ON or MOVE) has cgroup limits that follow its grant (the agent's
// grow.Limits), and its grant changes by SetGrant: asked by its node's
// growth loop, by the workload itself or by a user.
//
// A SetGrant that fits its node takes effect at once. A growth the node has
// no room for waits in the record (want, want_reason), and the table makes
// room (room.go): it moves other processes away make-before-break. The
// growth is granted by the first command after which the node holds it
// (grantWants): the commit of the last move it waited for, when the node
// releases the mover's grant. A grower with grow MOVE and nothing to move
// moves itself, with its new grant: the node it moves to holds the wanted
// grant (claimOn), and the commit of the move grants it.
//
// Want, when set, is the whole grant asked for, at or above the grant in
// both resources: a part that shrinks is granted at once.

// DefaultPriority is a process's priority when its spec sets none. A lower
// priority moves first to make room.
const DefaultPriority = 500

// MaxPriority is the highest priority a spec may set.
const MaxPriority = 1000

// claim is what a live process holds on one node: its grant, which
// placement counts against capacity; the memory it may use without asking
// (memLimit: an elastic process's grant, a fixed one's max), which the
// node's overcommit bounds; and its bounds, for Alloc's sums.
type claim struct {
	cpu, mem int64
	memLimit int64
	bounds   *pb.Resources
}

// Elastic reports whether a process with spec s has a grant that follows
// its load (grow ON or MOVE).
func Elastic(s *pb.ProcessSpec) bool { return s.GetGrow() != pb.Grow_GROW_OFF }

// Priority returns a spec's priority, DefaultPriority if it sets none.
func Priority(s *pb.ProcessSpec) int32 {
	if s != nil && s.Priority != nil {
		return *s.Priority
	}
	return DefaultPriority
}

// GrantOf returns a record's grant: its minimum if it has none (a record
// from before grants).
func GrantOf(rec *pb.ProcessRecord) *pb.Grant {
	if rec.Grant != nil {
		return rec.Grant
	}
	r := rec.Spec.GetResources()
	return &pb.Grant{CpuMilli: r.GetCpuMinMilli(), MemBytes: r.GetMemMinBytes()}
}

// claimFor is the claim of a process with spec and grant g.
func claimFor(spec *pb.ProcessSpec, g *pb.Grant) claim {
	c := claim{cpu: g.GetCpuMilli(), mem: g.GetMemBytes(), bounds: spec.GetResources()}
	if Elastic(spec) {
		c.memLimit = c.mem
	} else {
		c.memLimit = spec.GetResources().GetMemMaxBytes()
	}
	return c
}

// claimOn is what rec holds on node: its grant, and on the node it moves
// to, the growth it waits for (want), which the move's commit grants.
func claimOn(rec *pb.ProcessRecord, node string) claim {
	g := GrantOf(rec)
	if node != "" && node == rec.MoveTo && rec.Want != nil {
		g = maxGrant(g, rec.Want)
	}
	return claimFor(rec.Spec, g)
}

// moveClaim is what the node a record would move to must hold.
func moveClaim(rec *pb.ProcessRecord) claim {
	g := GrantOf(rec)
	if rec.Want != nil {
		g = maxGrant(g, rec.Want)
	}
	return claimFor(rec.Spec, g)
}

func maxGrant(a, b *pb.Grant) *pb.Grant {
	return &pb.Grant{CpuMilli: max(a.GetCpuMilli(), b.GetCpuMilli()), MemBytes: max(a.GetMemBytes(), b.GetMemBytes())}
}

func sameGrant(a, b *pb.Grant) bool {
	return a.GetCpuMilli() == b.GetCpuMilli() && a.GetMemBytes() == b.GetMemBytes()
}

// minGrant is the grant of a new process with bounds r: its minimum.
func minGrant(r *pb.Resources) *pb.Grant {
	return &pb.Grant{CpuMilli: r.GetCpuMinMilli(), MemBytes: r.GetMemMinBytes()}
}

// boundGrant is the grant a process with spec keeps when its bounds become
// r: a fixed process's is r's minimum, an elastic one's is g within r.
func boundGrant(spec *pb.ProcessSpec, g *pb.Grant, r *pb.Resources) *pb.Grant {
	if !Elastic(spec) {
		return minGrant(r)
	}
	return &pb.Grant{CpuMilli: clampTo(g.GetCpuMilli(), r.GetCpuMinMilli(), r.GetCpuMaxMilli()),
		MemBytes: clampTo(g.GetMemBytes(), r.GetMemMinBytes(), r.GetMemMaxBytes())}
}

// clampTo puts v in [lo, hi]; hi 0 is unbounded.
func clampTo(v, lo, hi int64) int64 {
	if hi > 0 {
		v = min(v, hi)
	}
	return max(v, lo)
}

// land is the end of a move of rec: the growth it waited for, held on the
// node it arrives at, is its grant now.
func land(rec *pb.ProcessRecord) {
	if rec.Want != nil {
		rec.Grant = maxGrant(GrantOf(rec), rec.Want)
		rec.Want, rec.WantReason = nil, ""
	}
}

// FormatGrant formats a grant as "cpu 0.5, memory 64M".
func FormatGrant(g *pb.Grant) string {
	return fmt.Sprintf("cpu %s, memory %s", Cores(g.GetCpuMilli()), Bytes(g.GetMemBytes()))
}

// change describes a grant change, resource by resource: "memory 64M→96M".
func change(from, to *pb.Grant) string {
	var s string
	if from.GetCpuMilli() != to.GetCpuMilli() {
		s = fmt.Sprintf("cpu %s→%s", Cores(from.GetCpuMilli()), Cores(to.GetCpuMilli()))
	}
	if from.GetMemBytes() != to.GetMemBytes() {
		if s != "" {
			s += ", "
		}
		s += fmt.Sprintf("memory %s→%s", Bytes(from.GetMemBytes()), Bytes(to.GetMemBytes()))
	}
	return s
}

// setGrant sets a live process's grant within its bounds (zero fields keep
// their value). A shrink, or a growth its node (and, while it moves, the
// node it moves to) has room for, is granted at once; a growth beyond the
// room of a node it does not move off waits and makes room (room.go). On
// any error the table is unchanged.
func (x *txn) setGrant(c *pb.SetGrant) ([]string, error) {
	t := x.t
	old := t.procs[c.GetId()]
	switch {
	case old == nil:
		return nil, fmt.Errorf("%w: process %q", ErrNotFound, c.GetId())
	case !live(old):
		return nil, fmt.Errorf("%w: process %s has %s", ErrInvalid, old.Id, StateName(old.State))
	case c.GetIncarnation() != 0 && c.GetIncarnation() != old.Incarnation:
		return nil, fmt.Errorf("%w: process %s runs incarnation %d, not %d", ErrStale, old.Id, old.Incarnation, c.GetIncarnation())
	case old.Stop:
		return nil, fmt.Errorf("%w: process %s is being stopped", ErrInvalid, old.Id)
	case c.GetGrant() == nil:
		return nil, fmt.Errorf("%w: set grant of %s without a grant", ErrInvalid, old.Id)
	}
	cur := GrantOf(old)
	want := &pb.Grant{CpuMilli: c.Grant.CpuMilli, MemBytes: c.Grant.MemBytes}
	if want.CpuMilli == 0 {
		want.CpuMilli = cur.CpuMilli
	}
	if want.MemBytes == 0 {
		want.MemBytes = cur.MemBytes
	}
	if err := withinBounds(old, want); err != nil {
		return nil, err
	}
	why := c.GetReason()
	if by := c.GetBy(); by != "" {
		why = fmtBy(by, why)
	}
	rec := proto.CloneOf(old)
	grows := want.CpuMilli > cur.CpuMilli || want.MemBytes > cur.MemBytes
	if !grows || old.Node == "" {
		if sameGrant(want, cur) && old.Want == nil {
			return nil, nil // nothing changes
		}
		rec.Grant, rec.Want, rec.WantReason = want, nil, ""
		x.put(rec)
		switch {
		case sameGrant(want, cur):
			x.event(EvGrowCancelled, old, old.Node, why)
		case grows:
			x.event(EvGrown, old, old.Node, joinWhy(change(cur, want), why))
		default:
			x.event(EvShrunk, old, old.Node, joinWhy(change(cur, want), why))
		}
		return []string{old.Id}, nil
	}
	// A growth: what shrinks is granted at once, the rest if it fits.
	base := &pb.Grant{CpuMilli: min(want.CpuMilli, cur.CpuMilli), MemBytes: min(want.MemBytes, cur.MemBytes)}
	grown := proto.CloneOf(rec)
	grown.Grant, grown.Want, grown.WantReason = want, nil, ""
	var short error
	for _, n := range holders(old) {
		a := t.allocOf(n)
		a.add(claimOn(old, n), -1)
		if err := fits(t.nodes[n], &a, claimOn(grown, n)); err != nil {
			short = fmt.Errorf("node %s: %v", n, err)
			break
		}
	}
	if short == nil {
		x.put(grown)
		x.event(EvGrown, old, old.Node, joinWhy(change(cur, want), why))
		return []string{old.Id}, nil
	}
	if old.MoveTo != "" {
		return nil, fmt.Errorf("%w: %v, and it is moving to %s: ask again once it has moved", ErrNoCapacity, short, old.MoveTo)
	}
	// What the node holds is granted now, the rest waits for room.
	part := t.partial(old, old.Node, base, want)
	rec.Grant, rec.Want = part, want
	if !sameGrant(part, base) {
		x.event(EvGrown, old, old.Node, joinWhy(change(cur, part)+" of "+change(cur, want)+" asked", why))
	}
	return x.makeRoom(old, rec, joinWhy(change(cur, want), why))
}

// partial returns the biggest grant from base up to want, resource by
// resource, that node holds besides what rec holds there now.
func (t *Table) partial(rec *pb.ProcessRecord, node string, base, want *pb.Grant) *pb.Grant {
	n := t.nodes[node]
	a := t.allocOf(node)
	a.add(claimOn(rec, node), -1)
	c := n.GetCapacity()
	cpuFree := c.GetCpuMaxMilli() - a.CPUGrant
	memFree := c.GetMemMaxBytes() - a.MemGrant
	if oc := n.GetOvercommitPercent(); oc > 0 && Elastic(rec.Spec) {
		memFree = min(memFree, percent(c.GetMemMaxBytes(), oc)-a.MemLimit)
	}
	return &pb.Grant{CpuMilli: min(max(cpuFree, base.GetCpuMilli()), want.GetCpuMilli()),
		MemBytes: min(max(memFree, base.GetMemBytes()), want.GetMemBytes())}
}

// withinBounds checks grant g against rec's bounds.
func withinBounds(rec *pb.ProcessRecord, g *pb.Grant) error {
	r := rec.Spec.GetResources()
	switch {
	case g.CpuMilli < 0 || g.MemBytes < 0:
		return fmt.Errorf("%w: grant of %s is negative", ErrInvalid, rec.Id)
	case g.CpuMilli < r.GetCpuMinMilli():
		return fmt.Errorf("%w: cpu grant %s of %s is below its min %s", ErrInvalid, Cores(g.CpuMilli), rec.Id, Cores(r.GetCpuMinMilli()))
	case r.GetCpuMaxMilli() > 0 && g.CpuMilli > r.GetCpuMaxMilli():
		return fmt.Errorf("%w: cpu grant %s of %s is above its max %s", ErrInvalid, Cores(g.CpuMilli), rec.Id, Cores(r.GetCpuMaxMilli()))
	case g.MemBytes < r.GetMemMinBytes():
		return fmt.Errorf("%w: memory grant %s of %s is below its min %s", ErrInvalid, Bytes(g.MemBytes), rec.Id, Bytes(r.GetMemMinBytes()))
	case r.GetMemMaxBytes() > 0 && g.MemBytes > r.GetMemMaxBytes():
		return fmt.Errorf("%w: memory grant %s of %s is above its max %s", ErrInvalid, Bytes(g.MemBytes), rec.Id, Bytes(r.GetMemMaxBytes()))
	}
	return nil
}

func fmtBy(by, why string) string {
	if why == "" {
		return "asked by " + by
	}
	return why + " (asked by " + by + ")"
}

func joinWhy(a, b string) string {
	switch {
	case a == "":
		return b
	case b == "":
		return a
	}
	return a + ": " + b
}

// grantWants grants the growths waiting for room, as far as their nodes
// now hold them (the rest waits on), in id order, and returns their ids.
// It runs after every command that succeeds: the room may come from a
// move's commit, an exit, a kill, a shrink or a bigger node. A grower
// moving to get its growth gets it when the move commits.
func (x *txn) grantWants() []string {
	t := x.t
	if len(t.wants) == 0 {
		return nil
	}
	var out []string
	for _, id := range sortedKeys(t.wants) {
		old := t.procs[id]
		if old.MoveTo != "" || old.Node == "" {
			continue
		}
		cur := GrantOf(old)
		part := t.partial(old, old.Node, cur, old.Want)
		if sameGrant(part, cur) {
			continue
		}
		rec := proto.CloneOf(old)
		rec.Grant = part
		what := change(cur, part) + ": room made"
		if sameGrant(part, old.Want) {
			rec.Want, rec.WantReason = nil, ""
		} else {
			what = change(cur, part) + " of " + change(cur, old.Want) + " asked: room made"
		}
		x.put(rec)
		x.event(EvGrown, old, old.Node, what)
		out = append(out, id)
	}
	return out
}
