package table

import (
	"bytes"
	"errors"
	"math"
	"math/rand"
	"testing"

	pb "github.com/shim-run/shim/proto/shimv1"
	"google.golang.org/protobuf/proto"
)

// FuzzApply turns the fuzz input into a sequence of mostly valid commands over
// a small universe of nodes and ids, so that placement, node loss, kills and
// reports interact, and checks after every command that
//
//   - two tables fed the same log are Equal (determinism);
//   - a Snapshot persists to the same bytes twice, and restores to an Equal
//     table that persists to the same bytes again;
//   - a failed command left the table exactly as it was;
//   - the table's invariants hold (see checkInvariants), node reservations
//     stay within capacity, and no incarnation ever decreases.
//
// Some steps, and the whole input once, are applied as raw log entries: they
// must not panic, and when they fail they must not change the table.
//
//	go test -run='^$' -fuzz=FuzzApply -parallel=1 ./table/
func FuzzApply(f *testing.F) {
	f.Add([]byte{})
	// Register nodes, spawn, report, lose a node.
	f.Add([]byte{0, 0, 0, 1, 0, 2, 4, 0, 0, 1, 1, 0, 4, 1, 2, 0, 0, 6, 0, 3, 1, 1, 0, 0, 0, 0})
	// Spawn pinned, kill, node down and up again, prune.
	f.Add([]byte{0, 0, 0, 1, 4, 2, 1, 1, 2, 1, 5, 0, 1, 1, 0, 1, 1, 0, 1, 5, 0, 8, 3})
	// Batches and raw entries.
	f.Add([]byte{9, 3, 0, 0, 4, 0, 0, 1, 10, 5, 0x0a, 0x03, 0x62, 0x01, 0x78, 7, 0, 2})
	f.Add(bytes.Repeat([]byte{0, 1, 4, 3, 6, 0, 1, 2, 5, 7}, 8))
	// Long random inputs reach states (queued processes, full nodes, several
	// incarnations) that mutating short seeds takes long to find.
	for i := range int64(6) {
		b := make([]byte, 256)
		rand.New(rand.NewSource(i)).Read(b)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		// The raw input as one log entry.
		raw := New()
		res := raw.Apply(1, data).(Result)
		if res.Err != nil && !Equal(raw, New()) {
			t.Fatalf("failed raw entry changed the table: %v", res.Err)
		}
		if err := checkInvariants(raw); err != nil {
			t.Fatalf("raw entry: %v", err)
		}

		g := &gen{in: data, a: New(), b: New(), incs: map[string]uint64{}}
		for step := 0; step < 64 && len(g.in) > 0; step++ {
			g.step(t)
		}
		roundTrip(t, g.a)
	})
}

var (
	fzNodes = []string{"n1", "n2", "n3", "n4"}
	fzIDs   = []string{"a", "b", "c", "d", "e", "f"}
	// Capacities are fixed per node name, so that reservations must always
	// fit; n3 is huge to catch overflow.
	fzCaps = map[string]*pb.NodeRecord{
		"n1": {Capacity: &pb.Resources{CpuMaxMilli: 2000, MemMaxBytes: 4 * gib}},
		"n2": {Capacity: &pb.Resources{CpuMaxMilli: 1000, MemMaxBytes: 1 * gib}, OvercommitPercent: 150},
		"n3": {Capacity: &pb.Resources{CpuMaxMilli: math.MaxInt64, MemMaxBytes: math.MaxInt64}, OvercommitPercent: math.MaxUint32},
		"n4": {Capacity: &pb.Resources{CpuMaxMilli: 500, MemMaxBytes: 512 * mib}, OvercommitPercent: 100},
	}
	fzCPU = []int64{0, 100, 500, 1000, 1500, math.MaxInt64 - 1, math.MaxInt64}
	fzMem = []int64{0, 256 * mib, gib, 3 * gib, math.MaxInt64}
)

type gen struct {
	in     []byte
	a, b   *Table
	index  uint64
	shrunk bool              // a node was re-registered smaller: reservations may exceed capacity
	incs   map[string]uint64 // last incarnation seen per id
	past   map[string][]view // per node: earlier full assignments, newest last
}

// view is a node's full assignments as of index.
type view struct {
	index uint64
	recs  map[string]*pb.ProcessRecord
}

// checkDeltas checks that every earlier view of a node's assignments, brought
// forward with AssignmentsSince, equals the node's full assignments now.
func (g *gen) checkDeltas(t *testing.T) {
	if g.past == nil {
		g.past = map[string][]view{}
	}
	for _, node := range fzNodes {
		all, removed, full, idx := g.a.AssignmentsSince(node, 0)
		if !full || len(removed) > 0 {
			t.Fatalf("step %d: AssignmentsSince(%s, 0): full %v, removed %v", g.index, node, full, removed)
		}
		now := map[string]*pb.ProcessRecord{}
		for _, r := range all {
			now[r.Id] = r
		}
		for _, v := range g.past[node] {
			changed, removed, full, _ := g.a.AssignmentsSince(node, v.index)
			got := map[string]*pb.ProcessRecord{}
			if !full {
				for id, r := range v.recs {
					got[id] = r
				}
			}
			for _, id := range removed {
				delete(got, id)
			}
			for _, r := range changed {
				got[r.Id] = r
			}
			if len(got) != len(now) {
				t.Fatalf("step %d: %s since %d: delta gives %d processes, want %d", g.index, node, v.index, len(got), len(now))
			}
			for id, r := range now {
				if got[id] != r {
					t.Fatalf("step %d: %s since %d: %s is stale or missing", g.index, node, v.index, id)
				}
			}
		}
		if ps := g.past[node]; len(ps) == 0 || ps[len(ps)-1].index != idx {
			g.past[node] = append(ps, view{index: idx, recs: now})
			if len(g.past[node]) > 8 {
				g.past[node] = g.past[node][1:]
			}
		}
	}
}

// byte returns the next input byte, or 0 once the input is used up.
func (g *gen) byte() byte {
	if len(g.in) == 0 {
		return 0
	}
	c := g.in[0]
	g.in = g.in[1:]
	return c
}

func (g *gen) int(n int) int { return int(g.byte()) % n }

func pick[T any](g *gen, xs []T) T { return xs[g.int(len(xs))] }

func (g *gen) step(t *testing.T) {
	g.index++
	var before *Table
	if g.index%8 == 0 {
		before = roundTrip(t, g.a) // the full check, now and then
	} else {
		before = clone(t, g.a)
		if !Equal(before, g.a) {
			t.Fatalf("step %d: snapshot round trip differs", g.index)
		}
	}
	var data []byte
	op := g.int(12)
	if op == 11 {
		// A raw log entry taken from the input.
		n := g.int(24)
		n = min(n, len(g.in))
		data, g.in = g.in[:n], g.in[n:]
	} else {
		cmd := g.command(op, 0)
		switch g.int(8) {
		case 0: // no time
		case 1:
			cmd.NowUnixNano = -int64(g.index)
		default:
			cmd.NowUnixNano = int64(g.index) * second
		}
		var err error
		if data, err = proto.Marshal(cmd); err != nil {
			t.Fatalf("marshal: %v", err)
		}
	}
	prevIndex := g.a.Index()
	res := g.a.Apply(g.index, data).(Result)
	g.b.Apply(g.index, data)
	if !Equal(g.a, g.b) {
		t.Fatalf("step %d: two tables fed the same log differ", g.index)
	}
	if res.Err != nil {
		if !Equal(before, g.a) {
			t.Fatalf("step %d: failed command changed the table: %v", g.index, res.Err)
		}
		if !errors.Is(res.Err, ErrInvalid) && !errors.Is(res.Err, ErrNotFound) && !errors.Is(res.Err, ErrExists) &&
			!errors.Is(res.Err, ErrNoCapacity) && !errors.Is(res.Err, ErrUnknownNode) && !errors.Is(res.Err, ErrDecode) &&
			!errors.Is(res.Err, ErrStale) && !errors.Is(res.Err, ErrDrained) {
			t.Fatalf("step %d: error %v wraps no sentinel", g.index, res.Err)
		}
	}
	if idx := g.a.Index(); idx < prevIndex || res.Index != idx || (res.Err == nil && idx != g.index) {
		t.Fatalf("step %d: index %d -> %d, result %d (err %v)", g.index, prevIndex, idx, res.Index, res.Err)
	}
	if err := checkInvariants(g.a); err != nil {
		t.Fatalf("step %d: %v", g.index, err)
	}
	if !g.shrunk {
		if err := checkFits(g.a); err != nil {
			t.Fatalf("step %d: %v", g.index, err)
		}
	}
	g.checkDeltas(t)
	seen := map[string]bool{}
	for _, r := range g.a.Processes(true, "") {
		seen[r.Id] = true
		if prev, ok := g.incs[r.Id]; ok && r.Incarnation < prev {
			t.Fatalf("step %d: %s incarnation %d -> %d", g.index, r.Id, prev, r.Incarnation)
		}
		g.incs[r.Id] = r.Incarnation
	}
	for id := range g.incs {
		if !seen[id] {
			delete(g.incs, id) // pruned: the id may start again at 1
		}
	}
}

// command builds one command from the input; op < 11 chooses its kind.
func (g *gen) command(op, depth int) *pb.Command {
	switch op {
	case 0:
		name := pick(g, fzNodes)
		n := proto.CloneOf(fzCaps[name])
		n.Name = name
		switch g.int(8) {
		case 0:
			n.Capacity = &pb.Resources{CpuMaxMilli: pick(g, fzCPU), MemMaxBytes: pick(g, fzMem)}
			g.shrunk = true
		case 1:
			n.Name = "bad name"
		}
		return &pb.Command{Op: &pb.Command_RegisterNode{RegisterNode: &pb.RegisterNode{Node: n}}}
	case 1:
		s := []pb.NodeState{pb.NodeState_NODE_STATE_DOWN, pb.NodeState_NODE_STATE_UP, pb.NodeState_NODE_STATE_UP,
			pb.NodeState_NODE_STATE_LEFT, pb.NodeState_NODE_STATE_UNSPECIFIED, 9}
		return stateCmd(pick(g, fzNodes), pick(g, s))
	case 2:
		return drainCmd(pick(g, fzNodes), g.int(2) == 0)
	case 3:
		return removeCmd(pick(g, fzNodes))
	case 4, 5:
		return g.spawn()
	case 6:
		ids := []string{pick(g, fzIDs)}
		for g.int(3) == 1 { // never true once the input is used up
			ids = append(ids, pick(g, append(fzIDs, "zz")))
		}
		return &pb.Command{Op: &pb.Command_Kill{Kill: &pb.Kill{Ids: ids, Signal: pick(g, []int32{15, 9, 0, -1, 65})}}}
	case 7, 8:
		return g.report()
	case 9:
		if g.int(2) == 0 {
			// A grant: mostly within small bounds, so that growths make
			// room, move growers and wait.
			sg := &pb.SetGrant{Id: pick(g, fzIDs), Grant: &pb.Grant{CpuMilli: pick(g, fzCPU[:5]), MemBytes: pick(g, fzMem)},
				By: "node"}
			switch g.int(6) {
			case 0:
				sg.Incarnation = uint64(g.int(3))
			case 1:
				sg.Grant = nil
			}
			return &pb.Command{Op: &pb.Command_SetGrant{SetGrant: sg}}
		}
		r := &pb.Resources{CpuMinMilli: pick(g, fzCPU), MemMinBytes: pick(g, fzMem)}
		if g.int(2) == 0 {
			r.CpuMaxMilli = pick(g, fzCPU)
		}
		return resizeCmd(pick(g, fzIDs), r)
	case 10:
		if depth < 2 && g.int(2) == 0 {
			var cmds []*pb.Command
			for n := 1 + g.int(4); n > 0; n-- {
				c := g.command(g.int(11), depth+1)
				if g.int(2) == 0 {
					c.NowUnixNano = int64(g.index)*second + int64(n)
				}
				cmds = append(cmds, c)
			}
			return batchCmd(cmds...)
		}
		return pruneCmd(int64(g.int(int(g.index)+2)) * second)
	}
	panic("unknown op")
}

func (g *gen) spawn() *pb.Command {
	s := &pb.ProcessSpec{
		Command:   []string{"/bin/true"},
		Name:      pick(g, []string{"", "", "web", "db"}),
		Resources: &pb.Resources{CpuMinMilli: pick(g, fzCPU[:5]), MemMinBytes: pick(g, fzMem[:3])},
	}
	switch g.int(16) {
	case 0:
		s.Command = nil
	case 1:
		s.Name = "bad name"
	case 2:
		s.Resources.CpuMinMilli = pick(g, fzCPU)
	case 3:
		s.Resources.MemMinBytes = pick(g, fzMem)
	case 4:
		s.Resources.CpuMaxMilli = pick(g, fzCPU)
	case 5:
		s.Resources.MemMaxBytes = pick(g, fzMem)
	case 6:
		s.Resources.CpuBurstMilli = 100
	case 7:
		s.Resources = nil
	}
	if g.int(4) == 0 {
		s.Node = pick(g, append(fzNodes, "n9", "bad/pin"))
	}
	if g.int(2) == 0 {
		s.Grow = pick(g, []pb.Grow{pb.Grow_GROW_ON, pb.Grow_GROW_MOVE, 7})
		if s.Resources != nil && g.int(4) != 0 {
			s.Resources.MemMaxBytes, s.Resources.CpuMaxMilli = pick(g, fzMem[1:]), pick(g, fzCPU[1:])
		}
		p := int32(pick(g, []int{0, 100, 500, 1000, -1}))
		s.Priority = &p
	}
	ids := []string{pick(g, fzIDs)}
	for g.int(3) == 1 { // never true once the input is used up
		ids = append(ids, pick(g, append(fzIDs, "BAD")))
	}
	c := spawnCmd(s, ids...)
	if g.int(3) == 1 { // a client's request id, sometimes retried
		c.GetSpawn().RequestId = pick(g, []string{"r1", "r2", "r1", "bad id"})
	}
	return c
}

// report mostly describes a real process from its node, so that reports
// land; the rest are stale, misdirected or odd.
func (g *gen) report() *pb.Command {
	id := pick(g, fzIDs)
	node, inc := pick(g, fzNodes), uint64(1)
	if r := g.a.Get(id); r != nil {
		node, inc = r.Node, r.Incarnation
		if r.MoveTo != "" && g.int(2) == 0 {
			node, inc = r.MoveTo, r.Incarnation+1 // the move's target
		}
	}
	switch g.int(8) {
	case 0:
		node = pick(g, append(fzNodes, ""))
	case 1:
		inc += uint64(g.int(3)) - 1
	}
	u := &pb.StatusUpdate{
		Id: id, Incarnation: inc, State: pb.ProcessState(g.int(9)),
		Pid: int64(g.int(4)), ExitCode: int32(g.int(3)), Restarts: uint32(g.int(3)),
	}
	if g.int(2) == 0 {
		u.AtUnixNano = int64(g.index) * second
	}
	return reportCmd(node, u)
}

// roundTrip persists a snapshot twice, checks the bytes match, restores them
// into a new table, and checks that table persists to the same bytes.
func roundTrip(t *testing.T, tb *Table) *Table {
	t.Helper()
	snap := tb.Snapshot()
	var b1, b2, b3 bytes.Buffer
	if err := snap.Persist(&b1); err != nil {
		t.Fatalf("persist: %v", err)
	}
	if err := snap.Persist(&b2); err != nil {
		t.Fatalf("persist: %v", err)
	}
	snap.Release()
	if !bytes.Equal(b1.Bytes(), b2.Bytes()) {
		t.Fatal("persisting a snapshot twice gave different bytes")
	}
	c := New()
	if err := c.Restore(bytes.NewReader(b1.Bytes())); err != nil {
		t.Fatalf("restore: %v", err)
	}
	if !Equal(tb, c) {
		t.Fatal("restored table differs")
	}
	if err := checkInvariants(c); err != nil {
		t.Fatalf("restored table: %v", err)
	}
	if err := c.Snapshot().Persist(&b3); err != nil || !bytes.Equal(b1.Bytes(), b3.Bytes()) {
		t.Fatalf("restored table persists differently (err %v)", err)
	}
	return c
}
