package table

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"sort"
	"testing"

	pb "github.com/shim-run/shim/proto/shimv1"
	"google.golang.org/protobuf/proto"
)

// ---- command builders ----

const (
	milli = int64(1)
	core  = 1000 * milli
	mib   = int64(1) << 20
	gib   = int64(1) << 30
)

func nodeCmd(name string, cpuMilli, memBytes int64) *pb.Command {
	return &pb.Command{Op: &pb.Command_RegisterNode{RegisterNode: &pb.RegisterNode{Node: &pb.NodeRecord{
		Name: name, Capacity: &pb.Resources{CpuMaxMilli: cpuMilli, MemMaxBytes: memBytes},
	}}}}
}

func stateCmd(name string, s pb.NodeState) *pb.Command {
	return &pb.Command{Op: &pb.Command_SetNodeState{SetNodeState: &pb.SetNodeState{Name: name, State: s}}}
}

func downCmd(name string) *pb.Command { return stateCmd(name, pb.NodeState_NODE_STATE_DOWN) }
func upCmd(name string) *pb.Command   { return stateCmd(name, pb.NodeState_NODE_STATE_UP) }

func drainCmd(name string, on bool) *pb.Command {
	return &pb.Command{Op: &pb.Command_SetDraining{SetDraining: &pb.SetDraining{Name: name, Draining: on}}}
}

func removeCmd(name string) *pb.Command {
	return &pb.Command{Op: &pb.Command_RemoveNode{RemoveNode: &pb.RemoveNode{Name: name}}}
}

// spec returns a valid spec running /bin/sleep 10 that reserves cpuMilli.
func spec(cpuMilli int64) *pb.ProcessSpec {
	return &pb.ProcessSpec{Command: []string{"/bin/sleep", "10"}, Resources: &pb.Resources{CpuMinMilli: cpuMilli}}
}

func pinned(s *pb.ProcessSpec, node string) *pb.ProcessSpec {
	s.Node = node
	return s
}

func spawnCmd(s *pb.ProcessSpec, ids ...string) *pb.Command {
	return &pb.Command{Op: &pb.Command_Spawn{Spawn: &pb.Spawn{Ids: ids, Spec: s}}}
}

func killCmd(ids ...string) *pb.Command {
	return &pb.Command{Op: &pb.Command_Kill{Kill: &pb.Kill{Ids: ids, Signal: 15}}}
}

func reportCmd(node string, ups ...*pb.StatusUpdate) *pb.Command {
	return &pb.Command{Op: &pb.Command_Report{Report: &pb.Report{Node: node, Updates: ups}}}
}

func upd(id string, inc uint64, s pb.ProcessState) *pb.StatusUpdate {
	u := &pb.StatusUpdate{Id: id, Incarnation: inc, State: s}
	if s == pb.ProcessState_PROCESS_STATE_RUNNING {
		u.Pid = 100
	}
	return u
}

func resizeCmd(id string, r *pb.Resources) *pb.Command {
	return &pb.Command{Op: &pb.Command_Resize{Resize: &pb.Resize{Id: id, Resources: r}}}
}

// resizeMoveCmd is resize with move: a process its node cannot hold moves.
func resizeMoveCmd(id string, r *pb.Resources) *pb.Command {
	return &pb.Command{Op: &pb.Command_Resize{Resize: &pb.Resize{Id: id, Resources: r, Move: true}}}
}

func pruneCmd(before int64) *pb.Command {
	return &pb.Command{Op: &pb.Command_Prune{Prune: &pb.Prune{BeforeUnixNano: before}}}
}

func batchCmd(cmds ...*pb.Command) *pb.Command {
	return &pb.Command{Op: &pb.Command_Batch{Batch: &pb.Batch{Commands: cmds}}}
}

const (
	pending  = pb.ProcessState_PROCESS_STATE_PENDING
	starting = pb.ProcessState_PROCESS_STATE_STARTING
	running  = pb.ProcessState_PROCESS_STATE_RUNNING
	backoff  = pb.ProcessState_PROCESS_STATE_BACKOFF
	exited   = pb.ProcessState_PROCESS_STATE_EXITED
	failed   = pb.ProcessState_PROCESS_STATE_FAILED
	killed   = pb.ProcessState_PROCESS_STATE_KILLED
)

// ---- driving a table ----

// tester applies commands to a table through the encoded Apply path, one log
// index each, checking invariants and failure atomicity on every step.
type tester struct {
	t     testing.TB
	tb    *Table
	index uint64
	now   int64
}

func newTester(t testing.TB) *tester { return &tester{t: t, tb: New(), now: 1_000_000_000} }

// do applies cmd at the next index. A failing command must leave the table
// exactly as it was.
func (x *tester) do(cmd *pb.Command) Result {
	x.t.Helper()
	x.index++
	x.now += 1_000_000_000
	if cmd.NowUnixNano == 0 {
		cmd = proto.CloneOf(cmd)
		cmd.NowUnixNano = x.now
	}
	data, err := proto.Marshal(cmd)
	if err != nil {
		x.t.Fatalf("marshal: %v", err)
	}
	before := clone(x.t, x.tb)
	res := x.tb.Apply(x.index, data).(Result)
	if res.Err != nil && !Equal(before, x.tb) {
		x.t.Fatalf("failed command %s changed the table (err %v)", brief(cmd), res.Err)
	}
	if err := checkInvariants(x.tb); err != nil {
		x.t.Fatalf("after %s: %v", brief(cmd), err)
	}
	return res
}

// ok applies cmd and fails the test if it returns an error.
func (x *tester) ok(cmd *pb.Command) Result {
	x.t.Helper()
	res := x.do(cmd)
	if res.Err != nil {
		x.t.Fatalf("%s: unexpected error %v", brief(cmd), res.Err)
	}
	return res
}

// fail applies cmd, wants an error matching target, and returns it.
func (x *tester) fail(cmd *pb.Command, target error) error {
	x.t.Helper()
	res := x.do(cmd)
	if !errors.Is(res.Err, target) {
		x.t.Fatalf("%s: error %v, want %v", brief(cmd), res.Err, target)
	}
	return res.Err
}

func (x *tester) get(id string) *pb.ProcessRecord {
	x.t.Helper()
	r := x.tb.Get(id)
	if r == nil {
		x.t.Fatalf("no process %s", id)
	}
	return r
}

// where returns "node/state" for each id.
func (x *tester) where(ids ...string) []string {
	x.t.Helper()
	var out []string
	for _, id := range ids {
		r := x.get(id)
		out = append(out, r.Node+"/"+StateName(r.State))
	}
	return out
}

// brief prints a command, cut short.
func brief(cmd *pb.Command) string {
	s := fmt.Sprint(cmd)
	if len(s) > 300 {
		s = s[:300] + "..."
	}
	return s
}

// clone copies a table through Snapshot, Persist and Restore.
func clone(t testing.TB, tb *Table) *Table {
	t.Helper()
	var buf bytes.Buffer
	if err := tb.Snapshot().Persist(&buf); err != nil {
		t.Fatalf("persist: %v", err)
	}
	c := New()
	if err := c.Restore(&buf); err != nil {
		t.Fatalf("restore: %v", err)
	}
	return c
}

// checkInvariants recomputes every index of the table from its records and
// compares.
func checkInvariants(t *Table) error {
	t.mu.RLock()
	defer t.mu.RUnlock()
	if !sort.StringsAreSorted(t.nodeOrder) || len(t.nodeOrder) != len(t.nodes) {
		return fmt.Errorf("nodeOrder %v does not match nodes", t.nodeOrder)
	}
	var servers []string
	for _, n := range t.nodeOrder {
		if t.nodes[n] == nil || t.nodes[n].Name != n {
			return fmt.Errorf("nodeOrder holds %s, nodes do not", n)
		}
		if t.nodes[n].Role == pb.NodeRole_NODE_ROLE_SERVER {
			servers = append(servers, n)
		}
	}
	if !slices.Equal(servers, t.servers) {
		return fmt.Errorf("servers %v, want %v", t.servers, servers)
	}
	if t.candsOK {
		if len(t.cands) != len(t.nodeOrder) {
			return fmt.Errorf("placement cache holds %d nodes, want %d", len(t.cands), len(t.nodeOrder))
		}
		for i, c := range t.cands {
			if c.name != t.nodeOrder[i] || c.rec != t.nodes[c.name] || c.alloc != t.alloc[c.name] {
				return fmt.Errorf("placement cache is stale for %s", c.name)
			}
		}
	}
	if len(t.order) != len(t.procs) {
		return fmt.Errorf("order holds %d ids, there are %d records", len(t.order), len(t.procs))
	}
	for i, id := range t.order {
		if t.procs[id] == nil {
			return fmt.Errorf("order holds %s, which has no record", id)
		}
		if i > 0 && !t.orderLess(t.order[i-1], t.procs[id]) {
			return fmt.Errorf("order: %s before %s", t.order[i-1], id)
		}
	}
	states := map[pb.ProcessState]int{}
	for _, r := range t.procs {
		states[r.State]++
	}
	for st, n := range t.states {
		if n != states[st] {
			return fmt.Errorf("%d records counted %s, %d are", n, st, states[st])
		}
	}
	for st, n := range states {
		if t.states[st] != n {
			return fmt.Errorf("%d records counted %s, %d are", t.states[st], st, n)
		}
	}
	byNode := map[string]map[string]struct{}{}
	byName := map[string]map[string]struct{}{}
	alloc := map[string]*Alloc{}
	var wantPending []string
	for id, r := range t.procs {
		if r.Id != id {
			return fmt.Errorf("record %s stored under %s", r.Id, id)
		}
		if r.Incarnation < 1 {
			return fmt.Errorf("%s: incarnation %d", id, r.Incarnation)
		}
		addIndex(byName, r.Spec.GetName(), id)
		switch {
		case r.State == pending:
			if r.Node != "" {
				return fmt.Errorf("%s is pending on node %s", id, r.Node)
			}
			wantPending = append(wantPending, id)
		case live(r):
			if r.Node == "" {
				return fmt.Errorf("%s is %s without a node", id, StateName(r.State))
			}
			n := t.nodes[r.Node]
			if n == nil || n.State != pb.NodeState_NODE_STATE_UP {
				return fmt.Errorf("%s is live on node %s which is not up", id, r.Node)
			}
			if r.Spec.GetNode() != "" && r.Spec.GetNode() != r.Node {
				return fmt.Errorf("%s is pinned to %s but runs on %s", id, r.Spec.GetNode(), r.Node)
			}
			if r.MoveTo == r.Node {
				return fmt.Errorf("%s moves to the node it runs on", id)
			}
			for _, h := range holders(r) {
				addIndex(byNode, h, id)
				a := alloc[h]
				if a == nil {
					a = &Alloc{}
					alloc[h] = a
				}
				a.add(claimOn(r, h), 1)
			}
			if err := withinBounds(r, GrantOf(r)); err != nil {
				return fmt.Errorf("%s: %v", id, err)
			}
			if w := r.Want; w != nil {
				g := GrantOf(r)
				if w.CpuMilli < g.CpuMilli || w.MemBytes < g.MemBytes || sameGrant(w, g) {
					return fmt.Errorf("%s wants %s, not above its grant %s", id, FormatGrant(w), FormatGrant(g))
				}
				if _, ok := t.wants[id]; !ok {
					return fmt.Errorf("%s wants a growth, the wants index does not hold it", id)
				}
			} else if _, ok := t.wants[id]; ok {
				return fmt.Errorf("the wants index holds %s, which wants nothing", id)
			}
		case r.State == pb.ProcessState_PROCESS_STATE_UNSPECIFIED || r.State > killed:
			return fmt.Errorf("%s has state %d", id, r.State)
		}
	}
	for id := range t.wants {
		if r := t.procs[id]; r == nil || !live(r) || r.Want == nil {
			return fmt.Errorf("the wants index holds %s", id)
		}
	}
	for i, e := range t.events {
		if e.Index <= t.eventsBase || i > 0 && e.Index < t.events[i-1].Index || e.Index > t.index {
			return fmt.Errorf("event %d (index %d) out of order (base %d, table %d)", i, e.Index, t.eventsBase, t.index)
		}
	}
	got := slices.Clone(t.pending)
	sort.Strings(got)
	sort.Strings(wantPending)
	if !slices.Equal(got, wantPending) {
		return fmt.Errorf("pending queue %v, pending records %v", t.pending, wantPending)
	}
	if err := sameIndex("byNode", t.byNode, byNode); err != nil {
		return err
	}
	if err := sameIndex("byName", t.byName, byName); err != nil {
		return err
	}
	if len(alloc) != len(t.alloc) {
		return fmt.Errorf("alloc has %d nodes, records give %d", len(t.alloc), len(alloc))
	}
	for n, a := range alloc {
		if t.alloc[n] == nil || *t.alloc[n] != *a {
			return fmt.Errorf("alloc of %s is %+v, records give %+v", n, t.alloc[n], *a)
		}
	}
	return nil
}

func sameIndex(what string, got, want map[string]map[string]struct{}) error {
	if len(got) != len(want) {
		return fmt.Errorf("%s has %d keys, records give %d", what, len(got), len(want))
	}
	for k, w := range want {
		if g := sortedKeys(got[k]); !slices.Equal(g, sortedKeys(w)) {
			return fmt.Errorf("%s[%q] = %v, records give %v", what, k, g, sortedKeys(w))
		}
	}
	return nil
}

// checkFits reports a node whose reservations exceed its capacity. It holds
// only while node capacities never shrink.
func checkFits(t *Table) error {
	for _, v := range t.Nodes() {
		c := v.Node.GetCapacity()
		if v.Alloc.CPUGrant < 0 || v.Alloc.CPUGrant > c.GetCpuMaxMilli() || v.Alloc.MemGrant < 0 || v.Alloc.MemGrant > c.GetMemMaxBytes() {
			return fmt.Errorf("node %s holds %+v, capacity %v", v.Node.Name, v.Alloc, c)
		}
	}
	return nil
}
