package table

import (
	"fmt"
	"math"
	"math/bits"
	"slices"
	"sort"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Making room: when a node cannot grant a process's growth, other processes
// on it move away make-before-break, as a drain moves them (move_to: the
// next incarnation starts on the target, and the old one stops once it
// runs), and the growth is granted when the last of them commits
// (grantWants). As in Nomad's scheduler/preemption.go the choice is a pure
// function of the table, so that every replica makes the same:
//
//   - What is short: the node's grants plus the growth, minus its capacity
//     (CPU, memory, and the memory limits its overcommit bounds), less what
//     processes already moving off it will free. Nothing short: the growth
//     waits for those moves.
//   - Who may move: live, running processes on the node other than the
//     grower, unpinned, not being stopped or moved, not moved to make room
//     in the last MoveGap, that some other node can hold (its grant).
//   - Whom to move: lowest priority first (ProcessSpec.priority, default
//     500); then the fewest moves that free enough. For each priority from
//     the lowest, among the processes at or below it, greedily take the one
//     that covers most of what is still short (ties: lower priority, then
//     the larger grant, then the lower id), until nothing is short; then
//     drop, latest first, any the rest make redundant. The targets are
//     placed one after another, each counting those before it.
//   - Rate: at most RoomMoves moves to make room start in any RoomWindow,
//     cluster-wide, counted from the records' moved_unix_nano (time comes
//     in the commands).
//
// If nothing can free enough, a grower with grow MOVE moves itself
// make-before-break, with its new grant, to a node that holds it; else the
// growth waits, and want_reason says why.

// MoveGap is how long a process moved to make room stays where it went.
const MoveGap = time.Minute

// RoomMoves moves to make room may start in any RoomWindow, cluster-wide:
// one a second on average, and a burst of a few dozen for a node that
// fills up at once.
const (
	RoomMoves  = 30
	RoomWindow = 30 * time.Second
)

// vec is an amount of each resource room is made of: CPU, memory, and the
// memory limits the node's overcommit bounds.
type vec [3]int64

func vecOf(c claim) vec { return vec{c.cpu, c.mem, c.memLimit} }

// mover is a process that may move to make room.
type mover struct {
	rec   *pb.ProcessRecord
	frees vec
	prio  int32
}

// makeRoom records rec (old's record with its growth in want) as waiting
// for room, and starts the moves that make it, or moves the grower itself;
// why describes the growth. It returns the processes it changed.
func (x *txn) makeRoom(old, rec *pb.ProcessRecord, why string) ([]string, error) {
	t := x.t
	node := old.Node
	n := t.nodes[node]
	a := t.allocOf(node)
	a.add(claimOn(old, node), -1)
	grown := proto.CloneOf(rec)
	land(grown)
	need := vecOf(claimOn(grown, node))
	c := n.GetCapacity()
	limit := vec{c.GetCpuMaxMilli(), c.GetMemMaxBytes(), 0}
	if oc := n.GetOvercommitPercent(); oc > 0 {
		limit[2] = percent(c.GetMemMaxBytes(), oc)
	}
	used := vec{a.CPUGrant, a.MemGrant, a.MemLimit}
	var short vec
	for i := range short {
		if i == 2 && limit[2] == 0 {
			continue // no overcommit bound
		}
		short[i] = max(satAdd(used[i], need[i])-limit[i], 0)
	}
	// What processes already moving off the node will free.
	var coming vec
	moving := 0
	for _, id := range sortedKeys(t.byNode[node]) {
		p := t.procs[id]
		if p.Node == node && p.MoveTo != "" && p.Id != old.Id {
			moving++
			f := vecOf(claimOn(p, node))
			for i := range coming {
				coming[i] += f[i]
			}
		}
	}
	var rest vec
	for i := range rest {
		rest[i] = max(short[i]-coming[i], 0)
	}
	restText := shortText(rest)
	if moving > 0 {
		restText += fmt.Sprintf(" beyond what %d process%s moving off will free", moving, plural(moving, "es"))
	}
	if rest == (vec{}) {
		return x.wait(rec, why, fmt.Sprintf("waiting for room: %d process%s moving off %s", moving, plural(moving, "es"), node))
	}
	now := x.now
	recent := 0
	for _, p := range t.procs {
		if p.MovedUnixNano != 0 && now-p.MovedUnixNano < int64(RoomWindow) {
			recent++
		}
	}
	budget := RoomMoves - recent
	if budget <= 0 {
		return x.wait(rec, why, fmt.Sprintf("no room on %s (short %s), and %d moves to make room started in the last %v, the most allowed",
			node, restText, recent, RoomWindow))
	}
	movers, skipped := t.movers(old, node, now)
	if limit[2] == 0 {
		for i := range movers {
			movers[i].frees[2] = 0 // no overcommit bound to free room under
		}
	}
	plan := t.planRoom(movers, rest, budget, node)
	if plan == nil {
		if old.Spec.GetGrow() == pb.Grow_GROW_MOVE && old.Spec.GetNode() == "" && old.State == pb.ProcessState_PROCESS_STATE_RUNNING &&
			!movedRecently(old, now) {
			target, err := t.place(old.Spec, moveClaim(rec), node)
			if err == nil {
				rec.MoveTo, rec.MovedUnixNano = target, now
				rec.WantReason = fmt.Sprintf("moving to %s to grow: no room on %s (short %s) and nothing else can move", target, node, restText)
				x.put(rec)
				x.event(EvMoving, old, node, joinWhy(why, rec.WantReason))
				return []string{old.Id}, nil
			}
			skipped = append(skipped, "itself: "+err.Error())
		}
		var parts []string
		if len(movers) > 0 {
			var sum vec
			var names []string
			for _, m := range movers {
				for i := range sum {
					sum[i] = satAdd(sum[i], m.frees[i])
				}
				names = append(names, m.rec.Id)
			}
			if len(names) > 3 {
				names = append(names[:3], fmt.Sprintf("%d more", len(names)-3))
			}
			parts = append(parts, fmt.Sprintf("%s may move, freeing %s", strings.Join(names, ", "), shortText(sum)))
		}
		parts = append(parts, skipped...)
		reason := fmt.Sprintf("no room on %s (short %s), and moving others cannot free it", node, restText)
		if len(parts) > 0 {
			reason += ": " + strings.Join(parts, "; ")
		}
		return x.wait(rec, why, reason)
	}
	ids := []string{old.Id}
	names := make([]string, 0, len(plan))
	for _, m := range plan {
		names = append(names, m.rec.Id)
	}
	rec.WantReason = fmt.Sprintf("waiting for room: moving %s off %s", strings.Join(names, ", "), node)
	x.put(rec)
	x.event(EvWaiting, old, node, joinWhy(why, rec.WantReason))
	for _, m := range plan {
		v := proto.CloneOf(m.rec)
		v.MoveTo, v.MovedUnixNano = m.to, now
		x.put(v)
		x.event(EvRoom, m.rec, node, fmt.Sprintf("moving to %s to make room for %s (%s)", m.to, old.Id, why))
		ids = append(ids, v.Id)
	}
	return ids, nil
}

// wait records rec as waiting for room, and why.
func (x *txn) wait(rec *pb.ProcessRecord, why, reason string) ([]string, error) {
	rec.WantReason = reason
	x.put(rec)
	x.event(EvWaiting, rec, rec.Node, joinWhy(why, reason))
	return []string{rec.Id}, nil
}

func movedRecently(rec *pb.ProcessRecord, now int64) bool {
	return rec.MovedUnixNano != 0 && now-rec.MovedUnixNano < int64(MoveGap)
}

// movers returns the processes on node that may move to make room for
// grower at time now, with what each frees, and a note on the kinds that
// may not.
func (t *Table) movers(grower *pb.ProcessRecord, node string, now int64) ([]mover, []string) {
	var out []mover
	var pinned, recent, busy, nowhere int
	for _, id := range sortedKeys(t.byNode[node]) {
		p := t.procs[id]
		switch {
		case p.Id == grower.Id || p.Node != node || p.MoveTo != "":
			continue // the grower, an arrival, or moving already
		case p.Spec.GetNode() != "":
			pinned++
			continue
		case p.Stop || p.State != pb.ProcessState_PROCESS_STATE_RUNNING:
			busy++
			continue
		case movedRecently(p, now):
			recent++
			continue
		}
		if _, err := t.place(p.Spec, moveClaim(p), node); err != nil {
			nowhere++
			continue
		}
		out = append(out, mover{rec: p, frees: vecOf(claimOn(p, node)), prio: Priority(p.Spec)})
	}
	var skipped []string
	for _, k := range []struct {
		n    int
		what string
	}{{pinned, "pinned"}, {recent, "moved in the last " + MoveGap.String()}, {busy, "not running or being stopped"}, {nowhere, "that no other node can hold"}} {
		if k.n > 0 {
			skipped = append(skipped, fmt.Sprintf("%d %s", k.n, k.what))
		}
	}
	return out, skipped
}

// planned is one move of a plan: rec moves to node to.
type planned struct {
	rec *pb.ProcessRecord
	to  string
}

// planRoom picks at most budget of ms to move off node, so that they free
// need, and their targets (see the top of this file); nil if it cannot.
func (t *Table) planRoom(ms []mover, need vec, budget int, node string) []planned {
	var prios []int32
	for _, m := range ms {
		prios = append(prios, m.prio)
	}
	slices.Sort(prios)
	prios = slices.Compact(prios)
	excluded := map[string]bool{} // cannot be placed along with the others
	for _, p := range prios {
		for range ms {
			var pool []mover
			for _, m := range ms {
				if m.prio <= p && !excluded[m.rec.Id] {
					pool = append(pool, m)
				}
			}
			sel := pickFewest(pool, need)
			if sel == nil || len(sel) > budget {
				break // not enough at this priority: look further
			}
			plan, bad := t.placeAll(sel, node)
			if bad == "" {
				return plan
			}
			excluded[bad] = true
		}
	}
	return nil
}

// pickFewest greedily picks from pool the movers that free need (see the
// top of this file); nil if all of them cannot.
func pickFewest(pool []mover, need vec) []mover {
	rem := need
	used := make([]bool, len(pool))
	var sel []mover
	for rem != (vec{}) {
		best, bestScore, bestAll := -1, int64(0), int64(0)
		for i, m := range pool {
			if used[i] {
				continue
			}
			s, all := score(m.frees, rem, need)
			if s <= 0 {
				continue
			}
			if best < 0 || s > bestScore || s == bestScore && (m.prio < pool[best].prio ||
				m.prio == pool[best].prio && (all > bestAll || all == bestAll && m.rec.Id < pool[best].rec.Id)) {
				best, bestScore, bestAll = i, s, all
			}
		}
		if best < 0 {
			return nil
		}
		used[best] = true
		sel = append(sel, pool[best])
		for i := range rem {
			rem[i] = max(rem[i]-pool[best].frees[i], 0)
		}
	}
	// Drop, latest first, any the others make redundant.
	for i := len(sel) - 1; i >= 0 && len(sel) > 1; i-- {
		rest := slices.Delete(slices.Clone(sel), i, i+1)
		if covers(rest, need) {
			sel = rest
		}
	}
	return sel
}

// score is how much of need what f frees covers, of what is still short
// (rem) and in all, in millionths of need summed over the resources short.
// Integers, so that every replica decides alike.
func score(f, rem, need vec) (s, all int64) {
	for i := range need {
		if need[i] <= 0 {
			continue
		}
		s += frac(min(f[i], rem[i]), need[i])
		all += frac(min(f[i], need[i]), need[i])
	}
	return s, all
}

// frac is a/b in millionths, for 0 <= a <= b.
func frac(a, b int64) int64 {
	if a <= 0 || b <= 0 {
		return 0
	}
	hi, lo := bits.Mul64(uint64(a), 1_000_000)
	q, _ := bits.Div64(hi, lo, uint64(b))
	return int64(q)
}

func covers(sel []mover, need vec) bool {
	var got vec
	for _, m := range sel {
		for i := range got {
			got[i] = satAdd(got[i], m.frees[i])
		}
	}
	for i := range need {
		if got[i] < need[i] {
			return false
		}
	}
	return true
}

// placeAll places the movers of sel one after another, each counting those
// before it, never on node. It returns the plan, or the id of the first it
// cannot place.
func (t *Table) placeAll(sel []mover, node string) ([]planned, string) {
	sel = slices.Clone(sel)
	sort.SliceStable(sel, func(i, j int) bool {
		if sel[i].prio != sel[j].prio {
			return sel[i].prio < sel[j].prio
		}
		return sel[i].rec.Id < sel[j].rec.Id
	})
	extra := make([]Alloc, len(t.candidates()))
	var plan []planned
	for _, m := range sel {
		c := moveClaim(m.rec)
		k, err := t.placeWith(m.rec.Spec, c, extra, node)
		if err != nil {
			return nil, m.rec.Id
		}
		extra[k].add(c, 1)
		plan = append(plan, planned{rec: m.rec, to: t.candidates()[k].name})
	}
	return plan, ""
}

// shortText formats what a node lacks: "cpu 0.5, memory 120M".
func shortText(v vec) string {
	var parts []string
	if v[0] > 0 {
		parts = append(parts, "cpu "+Cores(v[0]))
	}
	if v[1] > 0 {
		parts = append(parts, "memory "+Bytes(v[1]))
	}
	if v[2] > 0 {
		parts = append(parts, "memory limits "+Bytes(v[2]))
	}
	return strings.Join(parts, ", ")
}

func satAdd(a, b int64) int64 {
	if b > 0 && a > math.MaxInt64-b {
		return math.MaxInt64
	}
	return a + b
}

func plural(n int, s string) string {
	if n == 1 {
		return ""
	}
	return s
}
