package table

import (
	"bytes"
	"errors"
	"math"
	"slices"
	"strings"
	"testing"

	pb "github.com/shim-run/shim/proto/shimv1"
	"google.golang.org/protobuf/proto"
)

// threeNodes returns a tester with nodes n1..n3 of 2 cores and 4 GiB each.
func threeNodes(t *testing.T) *tester {
	x := newTester(t)
	for _, n := range []string{"n1", "n2", "n3"} {
		x.ok(nodeCmd(n, 2*core, 4*gib))
	}
	return x
}

func TestSpawnSpreadsOverNodes(t *testing.T) {
	x := threeNodes(t)
	for _, id := range []string{"a", "b", "c"} {
		x.ok(spawnCmd(spec(500), id))
	}
	if got, want := x.where("a", "b", "c"), []string{"n1/starting", "n2/starting", "n3/starting"}; !slices.Equal(got, want) {
		t.Fatalf("placement %v, want %v", got, want)
	}
	// Replicas spread too: each goes to the node with the fewest processes.
	res := x.ok(spawnCmd(spec(100), "r1", "r2", "r3", "r4", "r5", "r6"))
	if !slices.Equal(res.IDs, []string{"r1", "r2", "r3", "r4", "r5", "r6"}) {
		t.Fatalf("ids %v", res.IDs)
	}
	if !slices.Equal(res.Nodes, []string{"n1", "n2", "n3"}) {
		t.Fatalf("touched nodes %v", res.Nodes)
	}
	for _, v := range x.tb.Nodes() {
		if v.Alloc.Count != 3 || v.Alloc.CPUMin != 700 {
			t.Errorf("node %s alloc %+v, want 3 processes and 0.7 cores", v.Node.Name, v.Alloc)
		}
	}
	r := x.get("a")
	if r.Incarnation != 1 || r.CreatedUnixNano == 0 || r.ModifyIndex != 4 {
		t.Errorf("record a: %v", r)
	}
	// Ties on count go to the node with the most free CPU.
	x.ok(spawnCmd(spec(1000), "big"))
	x.ok(spawnCmd(spec(100), "d"))
	if got := x.where("big", "d"); !slices.Equal(got, []string{"n1/starting", "n2/starting"}) {
		t.Fatalf("placement %v", got)
	}
}

func TestSpawnHonoursPin(t *testing.T) {
	x := threeNodes(t)
	x.ok(spawnCmd(pinned(spec(100), "n3"), "a"))
	x.ok(spawnCmd(pinned(spec(100), "n3"), "b", "c"))
	if got := x.where("a", "b", "c"); !slices.Equal(got, []string{"n3/starting", "n3/starting", "n3/starting"}) {
		t.Fatalf("placement %v", got)
	}
	x.fail(spawnCmd(pinned(spec(100), "n9"), "d"), ErrUnknownNode)
	x.fail(spawnCmd(pinned(spec(1800), "n3"), "d"), ErrNoCapacity)
	x.ok(downCmd("n2"))
	err := x.fail(spawnCmd(pinned(spec(100), "n2"), "d"), ErrNoCapacity)
	if !strings.Contains(err.Error(), "node n2 is down") {
		t.Errorf("error %q does not say n2 is down", err)
	}
}

func TestSpawnReplicasAllOrNothing(t *testing.T) {
	x := newTester(t)
	x.ok(nodeCmd("n1", 1*core, gib))
	x.ok(nodeCmd("n2", 1*core, gib))
	x.ok(spawnCmd(spec(500), "a", "b", "c"))
	// One slot of 0.5 cores is left; three more replicas cannot all fit.
	err := x.fail(spawnCmd(spec(500), "d", "e", "f"), ErrNoCapacity)
	if !strings.Contains(err.Error(), "replica 2 of 3") {
		t.Errorf("error %q does not name the replica", err)
	}
	for _, id := range []string{"d", "e", "f"} {
		if x.tb.Get(id) != nil {
			t.Errorf("%s was created by a failed spawn", id)
		}
	}
	x.ok(spawnCmd(spec(500), "d"))
}

func TestSpawnNoCapacityNamesMostFreeNode(t *testing.T) {
	x := newTester(t)
	x.ok(nodeCmd("n1", 2*core, 4*gib))
	x.ok(nodeCmd("n2", 1*core, 4*gib))
	x.ok(nodeCmd("n3", 4*core, 4*gib))
	x.ok(spawnCmd(pinned(spec(1500), "n1"), "a"))
	x.ok(spawnCmd(pinned(spec(3500), "n3"), "b"))
	err := x.fail(spawnCmd(spec(2000), "c"), ErrNoCapacity)
	want := "no node has room for cpu 2, memory 0: the most free is cpu 1, memory 4G on n2 (3 nodes up): cpu 2 > free 1"
	if err.Error() != want {
		t.Errorf("error %q\nwant  %q", err, want)
	}
	// Memory counts as well as CPU.
	s := spec(0)
	s.Resources.MemMinBytes = 5 * gib
	x.fail(spawnCmd(s, "c"), ErrNoCapacity)

	// With every node down there is no node to name.
	for _, n := range []string{"n1", "n2", "n3"} {
		x.ok(downCmd(n))
	}
	err = x.fail(spawnCmd(spec(1), "c"), ErrNoCapacity)
	if !strings.Contains(err.Error(), "no node is up") {
		t.Errorf("error %q", err)
	}
}

func TestSpawnExists(t *testing.T) {
	x := threeNodes(t)
	x.ok(spawnCmd(spec(100), "a"))
	x.fail(spawnCmd(spec(100), "a"), ErrExists)
	x.fail(spawnCmd(spec(100), "b", "a"), ErrExists)
	x.fail(spawnCmd(spec(100), "c", "c"), ErrExists)
	if x.tb.Get("b") != nil || x.tb.Get("c") != nil {
		t.Fatal("failed spawn created a record")
	}
	// A killed record still owns its id until pruned.
	x.ok(killCmd("a"))
	x.ok(reportCmd("n1", upd("a", 1, exited)))
	x.fail(spawnCmd(spec(100), "a"), ErrExists)
}

func TestSpawnInvalid(t *testing.T) {
	res := func(f func(r *pb.Resources)) *pb.ProcessSpec {
		s := spec(0)
		f(s.Resources)
		return s
	}
	withSpec := func(f func(s *pb.ProcessSpec)) *pb.ProcessSpec {
		s := spec(100)
		f(s)
		return s
	}
	cases := []struct {
		name string
		cmd  *pb.Command
	}{
		{"nil spec", spawnCmd(nil, "a")},
		{"empty command", spawnCmd(&pb.ProcessSpec{}, "a")},
		{"empty program", spawnCmd(&pb.ProcessSpec{Command: []string{"", "x"}}, "a")},
		{"cpu min > max", spawnCmd(res(func(r *pb.Resources) { r.CpuMinMilli, r.CpuMaxMilli = 2000, 1000 }), "a")},
		{"mem min > max", spawnCmd(res(func(r *pb.Resources) { r.MemMinBytes, r.MemMaxBytes = 2*gib, gib }), "a")},
		{"negative cpu", spawnCmd(res(func(r *pb.Resources) { r.CpuMinMilli = -1 }), "a")},
		{"negative cpu max", spawnCmd(res(func(r *pb.Resources) { r.CpuMaxMilli = -1 }), "a")},
		{"negative memory", spawnCmd(res(func(r *pb.Resources) { r.MemMinBytes = -1 }), "a")},
		{"negative pids", spawnCmd(res(func(r *pb.Resources) { r.PidsMax = -1 }), "a")},
		{"burst without max", spawnCmd(res(func(r *pb.Resources) { r.CpuBurstMilli = 500 }), "a")},
		{"bad name", spawnCmd(withSpec(func(s *pb.ProcessSpec) { s.Name = "web server" }), "a")},
		{"long name", spawnCmd(withSpec(func(s *pb.ProcessSpec) { s.Name = strings.Repeat("x", MaxNameLen+1) }), "a")},
		{"bad pin", spawnCmd(withSpec(func(s *pb.ProcessSpec) { s.Node = "n/1" }), "a")},
		{"bad env", spawnCmd(withSpec(func(s *pb.ProcessSpec) { s.Env = []string{"NOEQUALS"} }), "a")},
		{"empty env key", spawnCmd(withSpec(func(s *pb.ProcessSpec) { s.Env = []string{"=x"} }), "a")},
		{"bad restart", spawnCmd(withSpec(func(s *pb.ProcessSpec) { s.Restart = 99 }), "a")},
		{"bad isolation", spawnCmd(withSpec(func(s *pb.ProcessSpec) { s.Isolation = 99 }), "a")},
		{"bad network", spawnCmd(withSpec(func(s *pb.ProcessSpec) { s.Network = 99 }), "a")},
		{"too many args", spawnCmd(withSpec(func(s *pb.ProcessSpec) { s.Command = make([]string, MaxArgs+1); s.Command[0] = "x" }), "a")},
		{"no ids", spawnCmd(spec(100))},
		{"empty id", spawnCmd(spec(100), "")},
		{"upper-case id", spawnCmd(spec(100), "Abc")},
		{"id with dot", spawnCmd(spec(100), "a.b")},
		{"long id", spawnCmd(spec(100), strings.Repeat("a", MaxIDLen+1))},
		{"one bad id of many", spawnCmd(spec(100), "ok1", "ok2", "BAD")},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			x := threeNodes(t)
			x.ok(spawnCmd(spec(100), "existing"))
			x.fail(c.cmd, ErrInvalid)
			if x.tb.Len() != 1 {
				t.Fatalf("table holds %d processes", x.tb.Len())
			}
		})
	}
	// The limits themselves are allowed.
	x := threeNodes(t)
	x.ok(spawnCmd(withSpec(func(s *pb.ProcessSpec) { s.Name = strings.Repeat("x", MaxNameLen) }), strings.Repeat("a", MaxIDLen)))
	x.ok(spawnCmd(res(func(r *pb.Resources) { r.CpuMinMilli, r.CpuMaxMilli, r.CpuBurstMilli = 500, 500, 100 }), "b"))
}

func TestInvalidNodeCommands(t *testing.T) {
	x := threeNodes(t)
	x.fail(nodeCmd("", core, gib), ErrInvalid)
	x.fail(nodeCmd("bad name", core, gib), ErrInvalid)
	x.fail(nodeCmd("n4", -1, gib), ErrInvalid)
	x.fail(&pb.Command{Op: &pb.Command_RegisterNode{RegisterNode: &pb.RegisterNode{}}}, ErrInvalid)
	x.fail(downCmd("n9"), ErrUnknownNode)
	x.fail(stateCmd("n1", pb.NodeState_NODE_STATE_UNSPECIFIED), ErrInvalid)
	x.fail(stateCmd("n1", 42), ErrInvalid)
	x.fail(drainCmd("n9", true), ErrUnknownNode)
	x.fail(removeCmd("n9"), ErrUnknownNode)
	x.fail(&pb.Command{}, ErrDecode)
}

func TestKill(t *testing.T) {
	x := threeNodes(t)
	x.ok(spawnCmd(spec(500), "a", "b", "c"))

	// Unknown ids fail the whole command.
	x.fail(killCmd("zzz"), ErrNotFound)
	x.fail(killCmd("a", "zzz"), ErrNotFound)
	if x.get("a").Stop {
		t.Fatal("a failed kill stopped a")
	}
	x.fail(killCmd(), ErrInvalid)
	x.fail(&pb.Command{Op: &pb.Command_Kill{Kill: &pb.Kill{Ids: []string{"a"}, Signal: 65}}}, ErrInvalid)

	// Running: the stop flag is set, the process stays where it is until
	// its node reports it gone.
	x.ok(reportCmd("n1", upd("a", 1, running)))
	res := x.ok(killCmd("a"))
	if !slices.Equal(res.IDs, []string{"a"}) || !slices.Equal(res.Nodes, []string{"n1"}) {
		t.Fatalf("kill result %+v", res)
	}
	a := x.get("a")
	if !a.Stop || a.StopSignal != 15 || a.State != running || a.Node != "n1" {
		t.Fatalf("after kill: %v", a)
	}
	if as, _ := x.tb.Assignments("n1"); len(as) != 1 || !as[0].Stop {
		t.Fatalf("n1 assignments %v", as)
	}
	// Killing again with the same signal changes nothing.
	if res := x.ok(killCmd("a")); len(res.IDs) != 0 {
		t.Fatalf("second kill changed %v", res.IDs)
	}
	// The node reports the exit: the process is KILLED, whatever it says.
	x.ok(reportCmd("n1", &pb.StatusUpdate{Id: "a", Incarnation: 1, State: exited, ExitCode: 143}))
	a = x.get("a")
	if a.State != killed || a.ExitCode != 143 || a.FinishedUnixNano == 0 {
		t.Fatalf("after exit report: %v", a)
	}
	if as, _ := x.tb.Assignments("n1"); len(as) != 0 {
		t.Fatalf("n1 still holds %v", as)
	}
	// Killing a finished process changes nothing.
	if res := x.ok(killCmd("a")); len(res.IDs) != 0 {
		t.Fatalf("kill of a killed process changed %v", res.IDs)
	}

	// Pending: killed at once.
	x.ok(spawnCmd(pinned(spec(100), "n2"), "p"))
	x.ok(downCmd("n2"))
	if got := x.get("p").State; got != pending {
		t.Fatalf("p is %s", StateName(got))
	}
	x.ok(killCmd("p"))
	p := x.get("p")
	if p.State != killed || !p.Stop || p.Node != "" {
		t.Fatalf("killed pending: %v", p)
	}
	if len(x.tb.pending) != 0 {
		t.Fatalf("pending queue %v", x.tb.pending)
	}
	// The node coming back does not resurrect it.
	x.ok(upCmd("n2"))
	if got := x.get("p").State; got != killed {
		t.Fatalf("p is %s", StateName(got))
	}
}

func TestReport(t *testing.T) {
	x := threeNodes(t)
	x.ok(spawnCmd(spec(500), "a"))

	// Wrong node, stale or future incarnation, unknown id: ignored.
	for _, c := range []*pb.Command{
		reportCmd("n2", upd("a", 1, running)),
		reportCmd("n1", upd("a", 0, running)),
		reportCmd("n1", upd("a", 2, running)),
		reportCmd("n1", upd("zz", 1, running)),
		reportCmd("", upd("a", 1, running)),
	} {
		if res := x.ok(c); len(res.IDs) != 0 {
			t.Fatalf("%v changed %v", c, res.IDs)
		}
	}
	if got := x.get("a").State; got != starting {
		t.Fatalf("a is %s", StateName(got))
	}

	x.ok(reportCmd("n1", &pb.StatusUpdate{Id: "a", Incarnation: 1, State: running, Pid: 42, StartTime: 7, AtUnixNano: 5}))
	a := x.get("a")
	if a.State != running || a.Pid != 42 || a.StartTime != 7 || a.StartedUnixNano != 5 {
		t.Fatalf("running: %v", a)
	}
	// A repeated report changes nothing.
	if res := x.ok(reportCmd("n1", &pb.StatusUpdate{Id: "a", Incarnation: 1, State: running, Pid: 42, StartTime: 7, AtUnixNano: 5})); len(res.IDs) != 0 {
		t.Fatalf("repeat changed %v", res.IDs)
	}
	// Nor does one without a time (agents resend their state): the start
	// time stays that of the run, so the record and its index stay put.
	if res := x.ok(reportCmd("n1", &pb.StatusUpdate{Id: "a", Incarnation: 1, State: running, Pid: 42, StartTime: 7})); len(res.IDs) != 0 {
		t.Fatalf("repeat without a time changed %v: %v", res.IDs, x.get("a"))
	}
	if b := x.get("a"); b != a {
		t.Fatalf("after repeat: %v, want the same record %v", b, a)
	}
	x.ok(reportCmd("n1", &pb.StatusUpdate{Id: "a", Incarnation: 1, State: backoff, ExitCode: 1, Restarts: 1, Reason: "exit 1"}))
	a = x.get("a")
	if a.State != backoff || a.ExitCode != 1 || a.Restarts != 1 || a.Reason != "exit 1" {
		t.Fatalf("backoff: %v", a)
	}
	x.ok(reportCmd("n1", &pb.StatusUpdate{Id: "a", Incarnation: 1, State: running, Pid: 43, Restarts: 1}))
	x.ok(reportCmd("n1", &pb.StatusUpdate{Id: "a", Incarnation: 1, State: exited, Restarts: 1}))
	a = x.get("a")
	if a.State != exited || a.FinishedUnixNano == 0 || a.Pid != 43 {
		t.Fatalf("exited: %v", a)
	}
	// Terminal is terminal.
	if res := x.ok(reportCmd("n1", upd("a", 1, running))); len(res.IDs) != 0 {
		t.Fatalf("report revived a finished process: %v", x.get("a"))
	}

	x.ok(spawnCmd(spec(500), "b"))
	x.ok(reportCmd(x.get("b").Node, &pb.StatusUpdate{Id: "b", Incarnation: 1, State: failed, ExitCode: 127, Reason: "exec: not found"}))
	if b := x.get("b"); b.State != failed || b.ExitCode != 127 {
		t.Fatalf("failed: %v", b)
	}
}

// A node may only report what happened to a process; it cannot put a
// placed process back in the queue or make a queued one look placed.
func TestReportCannotSetTableStates(t *testing.T) {
	x := threeNodes(t)
	x.ok(spawnCmd(spec(500), "a"))
	x.ok(reportCmd("n1", upd("a", 1, running)))
	for _, s := range []pb.ProcessState{pending, starting, pb.ProcessState_PROCESS_STATE_UNSPECIFIED, 42} {
		if res := x.ok(reportCmd("n1", upd("a", 1, s))); len(res.IDs) != 0 {
			t.Errorf("report of %s changed a: %v", StateName(s), x.get("a"))
		}
	}
	// A queued process has no node; a report naming no node must not touch it.
	x.ok(spawnCmd(pinned(spec(100), "n2"), "p"))
	x.ok(downCmd("n2"))
	for _, s := range []pb.ProcessState{starting, running, killed, exited} {
		if res := x.ok(reportCmd("", upd("p", 2, s))); len(res.IDs) != 0 {
			t.Errorf("report of %s with no node changed p: %v", StateName(s), x.get("p"))
		}
	}
}

func TestTerminalReportPlacesPending(t *testing.T) {
	x := newTester(t)
	x.ok(nodeCmd("n1", 1*core, gib))
	x.ok(nodeCmd("n2", 1*core, gib))
	x.ok(spawnCmd(spec(1000), "a"))
	x.ok(spawnCmd(spec(600), "b"))
	x.ok(reportCmd("n1", upd("a", 1, running)))
	x.ok(reportCmd("n2", upd("b", 1, running)))
	// n2 dies: b cannot move to n1, which is full.
	x.ok(downCmd("n2"))
	b := x.get("b")
	if b.State != pending || b.Incarnation != 2 || !strings.HasPrefix(b.Reason, "waiting for room") {
		t.Fatalf("b: %v", b)
	}
	// a exits: its reservation on n1 is freed and b is placed there.
	res := x.ok(reportCmd("n1", upd("a", 1, exited)))
	if !slices.Equal(res.IDs, []string{"a", "b"}) {
		t.Fatalf("report changed %v", res.IDs)
	}
	if got := x.where("a", "b"); !slices.Equal(got, []string{"n1/exited", "n1/starting"}) {
		t.Fatalf("placement %v", got)
	}
	if b := x.get("b"); b.Incarnation != 2 || b.Reason != "" {
		t.Fatalf("b: %v", b)
	}
	if v := x.tb.Nodes()[0]; v.Alloc.CPUMin != 600 || v.Alloc.Count != 1 {
		t.Fatalf("n1 alloc %+v", v.Alloc)
	}
}

func TestNodeDown(t *testing.T) {
	x := threeNodes(t)
	x.ok(spawnCmd(spec(500), "a", "b", "c"))        // one per node
	x.ok(spawnCmd(pinned(spec(100), "n1"), "pin"))  // pinned to n1
	x.ok(spawnCmd(pinned(spec(100), "n1"), "stop")) // being stopped
	x.ok(reportCmd("n1", &pb.StatusUpdate{Id: "a", Incarnation: 1, State: running, Pid: 42, AtUnixNano: 3}))
	x.ok(killCmd("stop"))

	res := x.ok(downCmd("n1"))
	if !slices.Equal(res.IDs, []string{"a", "pin", "stop"}) {
		t.Fatalf("moved %v", res.IDs)
	}
	if !slices.Contains(res.Nodes, "n1") {
		t.Fatalf("touched %v", res.Nodes)
	}
	if got := x.tb.Node("n1").State; got != pb.NodeState_NODE_STATE_DOWN {
		t.Fatalf("n1 is %s", NodeStateName(got))
	}
	a := x.get("a")
	if a.Node == "n1" || a.Node == "" || a.State != starting || a.Incarnation != 2 || a.Pid != 0 {
		t.Fatalf("a: %v", a)
	}
	if len(a.History) != 1 {
		t.Fatalf("history %v", a.History)
	}
	h := a.History[0]
	if h.Incarnation != 1 || h.Node != "n1" || h.Pid != 42 || h.State != killed || h.StartedUnixNano != 3 || h.Reason != "node n1 down" {
		t.Fatalf("history entry %v", h)
	}
	pin := x.get("pin")
	if pin.State != pending || pin.Node != "" || pin.Incarnation != 2 || len(pin.History) != 1 {
		t.Fatalf("pin: %v", pin)
	}
	stop := x.get("stop")
	if stop.State != killed || stop.Node != "n1" || stop.Incarnation != 1 {
		t.Fatalf("stop: %v", stop)
	}
	if as, _ := x.tb.Assignments("n1"); len(as) != 0 {
		t.Fatalf("n1 still assigned %v", as)
	}
	// Reports from the old incarnation are stale now.
	if res := x.ok(reportCmd("n1", upd("a", 1, exited))); len(res.IDs) != 0 {
		t.Fatalf("stale report changed %v", res.IDs)
	}
	// The new incarnation reports from its new node.
	x.ok(reportCmd(a.Node, upd("a", 2, running)))

	// n1 comes back: the pinned process returns to it.
	res = x.ok(upCmd("n1"))
	if !slices.Contains(res.Nodes, "n1") {
		t.Fatalf("touched %v", res.Nodes)
	}
	pin = x.get("pin")
	if pin.Node != "n1" || pin.State != starting || pin.Incarnation != 2 {
		t.Fatalf("pin: %v", pin)
	}
	// Processes that moved away stay away.
	if x.get("a").Node == "n1" {
		t.Fatal("a moved back")
	}
}

func TestNodeLossHistoryIsCapped(t *testing.T) {
	x := newTester(t)
	x.ok(nodeCmd("n1", core, gib))
	x.ok(nodeCmd("n2", core, gib))
	x.ok(spawnCmd(spec(100), "a"))
	for i := 0; i < historyLimit+3; i++ {
		x.ok(downCmd(x.get("a").Node))
		x.ok(upCmd("n1"))
		x.ok(upCmd("n2"))
	}
	a := x.get("a")
	if len(a.History) != historyLimit || a.Incarnation != historyLimit+4 {
		t.Fatalf("incarnation %d, %d history entries", a.Incarnation, len(a.History))
	}
	if last := a.History[historyLimit-1]; last.Incarnation != a.Incarnation-1 {
		t.Fatalf("last history entry %v", last)
	}
}

func TestRemoveNode(t *testing.T) {
	x := threeNodes(t)
	x.ok(spawnCmd(spec(100), "a", "b", "c"))
	x.ok(removeCmd("n2"))
	if x.tb.Node("n2") != nil || len(x.tb.Nodes()) != 2 {
		t.Fatal("n2 still listed")
	}
	b := x.get("b")
	if b.Node == "n2" || b.Incarnation != 2 || b.History[0].Reason != "node n2 removed" {
		t.Fatalf("b: %v", b)
	}
}

func TestDrainingNodeGetsNoNewWork(t *testing.T) {
	x := newTester(t)
	x.ok(nodeCmd("n1", 4*core, gib))
	x.ok(nodeCmd("n2", 1*core, gib))
	x.ok(spawnCmd(spec(100), "a"))
	x.ok(drainCmd("n1", true))
	if !x.tb.Node("n1").Draining {
		t.Fatal("n1 not draining")
	}
	// Existing work stays.
	if got := x.where("a"); got[0] != "n1/starting" {
		t.Fatalf("a %v", got)
	}
	x.ok(spawnCmd(spec(100), "b", "c"))
	if got := x.where("b", "c"); !slices.Equal(got, []string{"n2/starting", "n2/starting"}) {
		t.Fatalf("placement %v", got)
	}
	// n1 has room, but it is draining.
	x.fail(spawnCmd(spec(2000), "d"), ErrNoCapacity)
	// A process moved off a lost node skips it too.
	x.ok(nodeCmd("n3", 1*core, gib))
	x.ok(spawnCmd(pinned(spec(1000), "n3"), "e"))
	x.ok(spawnCmd(spec(500), "f")) // n3 has fewer processes, but it is full
	if got := x.where("f"); got[0] != "n2/starting" {
		t.Fatalf("f %v", got)
	}
	x.ok(downCmd("n2"))
	if got := x.where("b", "c", "f"); !slices.Equal(got, []string{"/pending", "/pending", "/pending"}) {
		t.Fatalf("after n2 down %v", got)
	}
	// Re-registering keeps the drain.
	x.ok(nodeCmd("n1", 4*core, gib))
	if !x.tb.Node("n1").Draining {
		t.Fatal("re-register cleared draining")
	}
	// Undraining places the queue, oldest first.
	x.ok(drainCmd("n1", false))
	if got := x.where("b", "c", "f"); !slices.Equal(got, []string{"n1/starting", "n1/starting", "n1/starting"}) {
		t.Fatalf("after undrain %v", got)
	}
}

func TestNodeUpPlacesPendingInOrder(t *testing.T) {
	x := newTester(t)
	x.ok(nodeCmd("n1", 1*core, gib))
	x.ok(nodeCmd("n2", 1*core, gib))
	x.ok(spawnCmd(pinned(spec(600), "n2"), "a"))
	x.ok(spawnCmd(spec(600), "b")) // n1
	x.ok(downCmd("n2"))            // a pinned: pending
	x.ok(downCmd("n1"))            // b: nowhere to go
	if !slices.Equal(x.tb.pending, []string{"a", "b"}) {
		t.Fatalf("queue %v", x.tb.pending)
	}
	// n2 returns; a (older, pinned) gets it, b waits for room.
	x.ok(upCmd("n2"))
	if got := x.where("a", "b"); !slices.Equal(got, []string{"n2/starting", "/pending"}) {
		t.Fatalf("placement %v", got)
	}
	// A new node registering places b.
	x.ok(nodeCmd("n3", 1*core, gib))
	if got := x.where("b"); got[0] != "n3/starting" {
		t.Fatalf("b %v", got)
	}
}

func TestResize(t *testing.T) {
	x := newTester(t)
	x.ok(nodeCmd("n1", 2*core, 2*gib))
	x.ok(spawnCmd(spec(500), "a", "b", "c"))
	err := x.fail(resizeCmd("a", &pb.Resources{CpuMinMilli: 1100}), ErrNoCapacity)
	if !strings.Contains(err.Error(), "node n1 cannot hold it") {
		t.Errorf("error %q", err)
	}
	x.fail(resizeCmd("a", &pb.Resources{MemMinBytes: 3 * gib}), ErrNoCapacity)
	x.fail(resizeCmd("zz", &pb.Resources{}), ErrNotFound)
	x.fail(resizeCmd("a", &pb.Resources{CpuMinMilli: -1}), ErrInvalid)
	x.fail(resizeCmd("a", &pb.Resources{CpuMinMilli: 2, CpuMaxMilli: 1}), ErrInvalid)

	x.ok(resizeCmd("a", &pb.Resources{CpuMinMilli: 1000, CpuMaxMilli: 1500}))
	if r := x.get("a").Spec.Resources; r.CpuMinMilli != 1000 || r.CpuMaxMilli != 1500 {
		t.Fatalf("resources %v", r)
	}
	if v := x.tb.Nodes()[0]; v.Alloc.CPUMin != 2000 || v.Alloc.CPUMax != 1500 {
		t.Fatalf("alloc %+v", v.Alloc)
	}
	// The spec is shared by replicas; resizing one must not resize the others.
	if r := x.get("b").Spec.Resources; r.CpuMinMilli != 500 {
		t.Fatalf("b resized too: %v", r)
	}
	x.ok(killCmd("c"))
	x.ok(reportCmd("n1", upd("c", 1, exited)))
	x.fail(resizeCmd("c", &pb.Resources{}), ErrInvalid)
}

func TestResizeRespectsOvercommit(t *testing.T) {
	x := newTester(t)
	n := nodeCmd("n1", 2*core, 2*gib)
	n.GetRegisterNode().Node.OvercommitPercent = 150
	x.ok(n)
	s := spec(100)
	s.Resources.MemMaxBytes = 2 * gib
	x.ok(spawnCmd(s, "a"))
	x.fail(spawnCmd(s, "b"), ErrNoCapacity) // 4 GiB of memory max > 3
	x.fail(resizeCmd("a", &pb.Resources{CpuMinMilli: 100, MemMaxBytes: 3*gib + 1}), ErrNoCapacity)
	x.ok(resizeCmd("a", &pb.Resources{CpuMinMilli: 100, MemMaxBytes: gib / 2}))
	x.ok(spawnCmd(s, "b"))
	// CPU maxima do not count: a CPU max is a ceiling on a compressible
	// resource.
	c := spec(100)
	c.Resources.CpuMaxMilli = 2000
	x.ok(spawnCmd(c, "c", "d", "e"))
	// An elastic process counts its grant, not its max.
	g := spec(100)
	g.Resources.MemMinBytes, g.Resources.MemMaxBytes, g.Grow = 64<<20, 2*gib, pb.Grow_GROW_ON
	x.ok(spawnCmd(g, "g"))
}

// Shrinking a process makes room; the queue must not wait for some other
// event to use it.
func TestResizePlacesPending(t *testing.T) {
	x := newTester(t)
	x.ok(nodeCmd("n1", 1*core, gib))
	x.ok(nodeCmd("n2", 1*core, gib))
	x.ok(spawnCmd(pinned(spec(800), "n1"), "a"))
	x.ok(spawnCmd(spec(800), "d")) // n2
	x.ok(downCmd("n2"))            // n1 is full: d waits
	if got := x.where("d"); got[0] != "/pending" {
		t.Fatalf("d %v", got)
	}
	res := x.ok(resizeCmd("a", &pb.Resources{CpuMinMilli: 100}))
	if !slices.Equal(res.IDs, []string{"a", "d"}) {
		t.Fatalf("resize changed %v", res.IDs)
	}
	if got := x.where("a", "d"); !slices.Equal(got, []string{"n1/starting", "n1/starting"}) {
		t.Fatalf("after shrink %v", got)
	}
	// A queued process that is resized down to fit is placed too.
	x.ok(upCmd("n2"))
	x.ok(spawnCmd(spec(900), "p"))               // n2
	x.ok(spawnCmd(pinned(spec(100), "n2"), "q")) // n2, now full
	x.ok(downCmd("n2"))
	if got := x.where("p", "q"); !slices.Equal(got, []string{"/pending", "/pending"}) {
		t.Fatalf("after n2 down %v", got)
	}
	x.ok(resizeCmd("p", &pb.Resources{CpuMinMilli: 100}))
	if got := x.where("p", "q"); !slices.Equal(got, []string{"n1/starting", "/pending"}) {
		t.Fatalf("after resizing p %v", got)
	}
}

func TestPrune(t *testing.T) {
	x := threeNodes(t)
	x.ok(spawnCmd(spec(100), "a", "b", "c"))
	x.ok(reportCmd("n1", &pb.StatusUpdate{Id: "a", Incarnation: 1, State: exited, AtUnixNano: 100}))
	x.ok(reportCmd("n2", &pb.StatusUpdate{Id: "b", Incarnation: 1, State: failed, AtUnixNano: 200}))
	res := x.ok(pruneCmd(150))
	if !slices.Equal(res.IDs, []string{"a"}) || x.tb.Get("a") != nil || x.tb.Get("b") == nil {
		t.Fatalf("prune(150) removed %v", res.IDs)
	}
	res = x.ok(pruneCmd(math.MaxInt64))
	if !slices.Equal(res.IDs, []string{"b"}) || x.tb.Len() != 1 {
		t.Fatalf("prune(max) removed %v; %d left", res.IDs, x.tb.Len())
	}
	// A pruned id may be used again.
	x.ok(spawnCmd(spec(100), "a"))
}

func TestPruneKeepsNames(t *testing.T) {
	x := threeNodes(t)
	s := spec(100)
	s.Name = "web"
	x.ok(spawnCmd(s, "a", "b"))
	x.ok(reportCmd("n1", &pb.StatusUpdate{Id: "a", Incarnation: 1, State: exited, AtUnixNano: 1}))
	x.ok(pruneCmd(10))
	ids, err := x.tb.Resolve("web")
	if err != nil || !slices.Equal(ids, []string{"b"}) {
		t.Fatalf("Resolve(web) = %v, %v", ids, err)
	}
}

func TestResolve(t *testing.T) {
	x := threeNodes(t)
	s := spec(100)
	s.Name = "web"
	x.ok(spawnCmd(s, "abc-1", "abc-2"))
	x.ok(spawnCmd(spec(100), "xyz-1", "xyz-2"))
	for _, c := range []struct {
		ref  string
		want []string
		err  error
	}{
		{"abc-1", []string{"abc-1"}, nil},
		{"web", []string{"abc-1", "abc-2"}, nil},
		{"xyz-", nil, ErrInvalid},
		{"xyz-2", []string{"xyz-2"}, nil},
		{"ab", nil, ErrNotFound}, // too short for a prefix
		{"nope", nil, ErrNotFound},
		{"", nil, ErrNotFound}, // not "every unnamed process"
	} {
		got, err := x.tb.Resolve(c.ref)
		if !slices.Equal(got, c.want) || !errors.Is(err, c.err) {
			t.Errorf("Resolve(%q) = %v, %v; want %v, %v", c.ref, got, err, c.want, c.err)
		}
	}
}

func TestReads(t *testing.T) {
	x := threeNodes(t)
	x.ok(spawnCmd(spec(100), "c", "b", "a", "d", "e", "f"))
	x.ok(reportCmd("n1", upd("c", 1, exited)))
	if got := ids(x.tb.Processes(false, "")); !slices.Equal(got, []string{"a", "b", "d", "e", "f"}) {
		t.Errorf("Processes(live) = %v", got)
	}
	if got := ids(x.tb.Processes(true, "")); !slices.Equal(got, []string{"a", "b", "c", "d", "e", "f"}) {
		t.Errorf("Processes(all) = %v", got)
	}
	as, idx := x.tb.Assignments("n2")
	if got := ids(as); !slices.Equal(got, []string{"b", "e"}) || idx != 4 {
		t.Errorf("Assignments(n2) = %v, %d", got, idx)
	}
	// n1's assignments changed when c exited.
	if _, idx := x.tb.Assignments("n1"); idx != 5 {
		t.Errorf("n1 index %d", idx)
	}
	if got := ids(x.tb.Processes(false, "n3")); !slices.Equal(got, []string{"a", "f"}) {
		t.Errorf("Processes(n3) = %v", got)
	}
	if x.tb.Index() != 5 || x.tb.Len() != 6 {
		t.Errorf("index %d, len %d", x.tb.Index(), x.tb.Len())
	}
}

func ids(rs []*pb.ProcessRecord) []string {
	var out []string
	for _, r := range rs {
		out = append(out, r.Id)
	}
	return out
}

func TestFailedCommandsDoNotAdvanceIndex(t *testing.T) {
	x := threeNodes(t)
	x.fail(spawnCmd(nil, "a"), ErrInvalid)
	if x.tb.Index() != 3 {
		t.Fatalf("index %d after a failed command", x.tb.Index())
	}
	// Undecodable entries neither.
	before := clone(t, x.tb)
	res := x.tb.Apply(99, []byte{0xff, 0xff, 0xff}).(Result)
	if !errors.Is(res.Err, ErrDecode) || !Equal(before, x.tb) {
		t.Fatalf("garbage: %v; index %d", res.Err, x.tb.Index())
	}
	// Successful commands that change no record still advance it.
	x.ok(pruneCmd(0)) // the tester's fifth index
	if x.tb.Index() != 5 {
		t.Fatalf("index %d", x.tb.Index())
	}
}

func TestBatch(t *testing.T) {
	x := newTester(t)
	b := batchCmd(
		nodeCmd("n1", core, gib),
		&pb.Command{NowUnixNano: 7, Op: nodeCmd("n2", core, gib).Op},
		spawnCmd(spec(100), "a"),
		spawnCmd(spec(200), "a"), // fails alone (the same spawn again would be a harmless repeat)
		spawnCmd(spec(100), "b"),
	)
	b.NowUnixNano = 5
	data, _ := proto.Marshal(b)
	res := x.tb.Apply(1, data).(Result)
	if res.Err != nil || len(res.Results) != 5 {
		t.Fatalf("batch: %+v", res)
	}
	if !errors.Is(res.Results[3].Err, ErrExists) {
		t.Fatalf("sub-result 3: %v", res.Results[3].Err)
	}
	if !slices.Equal(res.IDs, []string{"a", "b"}) || !slices.Equal(res.Nodes, []string{"n1", "n2"}) {
		t.Fatalf("ids %v nodes %v", res.IDs, res.Nodes)
	}
	if err := checkInvariants(x.tb); err != nil {
		t.Fatal(err)
	}
	// Each sub-command without a time gets the batch's, not its
	// predecessor's.
	if got := x.tb.Node("n1").JoinedUnixNano; got != 5 {
		t.Errorf("n1 joined at %d", got)
	}
	if got := x.tb.Node("n2").JoinedUnixNano; got != 7 {
		t.Errorf("n2 joined at %d", got)
	}
	if got := x.get("a").CreatedUnixNano; got != 5 {
		t.Errorf("a created at %d, want the batch's time 5", got)
	}
}

func TestSnapshotRoundTrip(t *testing.T) {
	x := threeNodes(t)
	s := spec(300)
	s.Name = "web"
	x.ok(spawnCmd(s, "a", "b", "c", "d"))
	x.ok(spawnCmd(pinned(spec(100), "n2"), "pin"))
	x.ok(reportCmd("n1", upd("a", 1, running)))
	x.ok(killCmd("b"))
	x.ok(downCmd("n2"))
	x.ok(drainCmd("n3", true))

	var b1, b2 bytes.Buffer
	snap := x.tb.Snapshot()
	if err := snap.Persist(&b1); err != nil {
		t.Fatal(err)
	}
	if err := snap.Persist(&b2); err != nil {
		t.Fatal(err)
	}
	snap.Release()
	if !bytes.Equal(b1.Bytes(), b2.Bytes()) {
		t.Fatal("persisting twice gave different bytes")
	}
	c := New()
	if err := c.Restore(bytes.NewReader(b1.Bytes())); err != nil {
		t.Fatal(err)
	}
	if !Equal(x.tb, c) {
		t.Fatal("restored table differs")
	}
	if err := checkInvariants(c); err != nil {
		t.Fatal(err)
	}
	// The restored table persists to the same bytes and evolves the same.
	var b3 bytes.Buffer
	if err := c.Snapshot().Persist(&b3); err != nil || !bytes.Equal(b1.Bytes(), b3.Bytes()) {
		t.Fatalf("re-persist differs (err %v)", err)
	}
	y := &tester{t: t, tb: c, index: x.index, now: x.now}
	for _, cmd := range []*pb.Command{upCmd("n2"), reportCmd("n1", upd("a", 1, exited)), spawnCmd(spec(100), "e")} {
		x.ok(cmd)
		y.ok(cmd)
	}
	if !Equal(x.tb, c) {
		t.Fatal("tables diverged after restore")
	}
	if _, idx := c.Assignments("n1"); idx < 9 {
		t.Errorf("restored n1 index %d", idx)
	}

	// A bad snapshot leaves the table alone.
	for _, bad := range [][]byte{nil, {0x05, 0xff}, b1.Bytes()[:len(b1.Bytes())-3]} {
		if err := c.Restore(bytes.NewReader(bad)); err == nil {
			t.Errorf("restore of %d bytes succeeded", len(bad))
		}
		if !Equal(x.tb, c) {
			t.Fatal("failed restore changed the table")
		}
	}
}

// Placement sums must not overflow: a huge request never fits a node that
// already holds something.
func TestHugeRequestsDoNotOverflow(t *testing.T) {
	x := newTester(t)
	n := nodeCmd("n1", 2*core, 2*gib)
	n.GetRegisterNode().Node.OvercommitPercent = 200
	x.ok(n)
	x.ok(spawnCmd(spec(500), "a"))
	for _, r := range []*pb.Resources{
		{CpuMinMilli: math.MaxInt64},
		{CpuMinMilli: math.MaxInt64 - 499},
		{MemMinBytes: math.MaxInt64},
		{MemMaxBytes: math.MaxInt64},
	} {
		s := spec(0)
		s.Resources = r
		x.fail(spawnCmd(s, "b"), ErrNoCapacity)
		x.fail(resizeCmd("a", r), ErrNoCapacity)
	}
	// A node of huge capacity with a huge overcommit: the limit saturates
	// at MaxInt64 rather than wrapping.
	big := nodeCmd("big", math.MaxInt64, math.MaxInt64)
	big.GetRegisterNode().Node.OvercommitPercent = math.MaxUint32
	x.ok(big)
	s := spec(0)
	s.Resources = &pb.Resources{MemMaxBytes: math.MaxInt64 - 1}
	x.ok(spawnCmd(pinned(s, "big"), "h1"))
	s.Resources.MemMaxBytes = 1
	x.ok(spawnCmd(pinned(s, "big"), "h2"))
	x.fail(spawnCmd(pinned(s, "big"), "h3"), ErrNoCapacity)
	if v := x.tb.Nodes()[0]; v.Alloc.MemLimit != math.MaxInt64 {
		t.Fatalf("big alloc %+v", v.Alloc)
	}
	if err := checkFits(x.tb); err != nil {
		t.Fatal(err)
	}
}

func TestApplyCommandDoesNotAliasCaller(t *testing.T) {
	tb := New()
	tb.ApplyCommand(1, nodeCmd("n1", core, gib))
	s := spec(100)
	tb.ApplyCommand(2, spawnCmd(s, "a"))
	s.Command[0] = "/bin/false"
	s.Resources.CpuMinMilli = 900
	if r := tb.Get("a").Spec; r.Command[0] != "/bin/sleep" || r.Resources.CpuMinMilli != 100 {
		t.Fatalf("caller's edit reached the table: %v", r)
	}
	if err := checkInvariants(tb); err != nil {
		t.Fatal(err)
	}
}

// Commands built by hand may hold nil messages; they must fail, not panic.
func TestApplyCommandNilParts(t *testing.T) {
	tb := New()
	tb.ApplyCommand(1, nodeCmd("n1", core, gib))
	for _, c := range []*pb.Command{
		{Op: &pb.Command_RegisterNode{}},
		{Op: &pb.Command_SetNodeState{}},
		{Op: &pb.Command_SetDraining{}},
		{Op: &pb.Command_RemoveNode{}},
		{Op: &pb.Command_Spawn{}},
		{Op: &pb.Command_Kill{}},
		{Op: &pb.Command_Resize{}},
		{Op: &pb.Command_Batch{Batch: &pb.Batch{Commands: []*pb.Command{nil}}}},
	} {
		if res := tb.ApplyCommand(2, c); res.Err == nil && len(res.Results) == 0 {
			t.Errorf("%v succeeded", c)
		}
	}
	tb.ApplyCommand(3, &pb.Command{Op: &pb.Command_Report{}})
	tb.ApplyCommand(3, reportCmd("n1", nil))
	tb.ApplyCommand(3, &pb.Command{Op: &pb.Command_Prune{}})
	if err := checkInvariants(tb); err != nil {
		t.Fatal(err)
	}
}

func TestFormat(t *testing.T) {
	for _, c := range []struct {
		milli int64
		want  string
	}{{0, "0"}, {500, "0.5"}, {1000, "1"}, {1250, "1.25"}, {2001, "2.001"}, {-500, "-0.5"}, {-1500, "-1.5"}} {
		if got := Cores(c.milli); got != c.want {
			t.Errorf("Cores(%d) = %q, want %q", c.milli, got, c.want)
		}
	}
	for _, c := range []struct {
		b    int64
		want string
	}{{0, "0"}, {1023, "1023"}, {1024, "1K"}, {1536, "1.5K"}, {64 << 20, "64M"}, {4 << 30, "4G"}, {1<<20 - 1, "1M"}, {math.MaxInt64, "8E"}} {
		if got := Bytes(c.b); got != c.want {
			t.Errorf("Bytes(%d) = %q, want %q", c.b, got, c.want)
		}
	}
}

// Reads may run while Apply writes (go test -race checks this).
func TestConcurrentReads(t *testing.T) {
	x := threeNodes(t)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 200; i++ {
			x.tb.Processes(true, "")
			x.tb.Nodes()
			x.tb.Assignments("n1")
			x.tb.Resolve("a")
			var b bytes.Buffer
			if err := x.tb.Snapshot().Persist(&b); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	for i := 0; i < 50; i++ {
		id := "p" + strings.Repeat("x", i%5) + string(rune('a'+i%26))
		if x.tb.Get(id) == nil {
			x.ok(spawnCmd(spec(10), id))
		}
		x.ok(reportCmd(x.get(id).Node, upd(id, 1, running)))
		if i%7 == 0 {
			x.ok(downCmd("n2"))
			x.ok(upCmd("n2"))
		}
	}
	<-done
}

func TestDrainMovesMakeBeforeBreak(t *testing.T) {
	x := newTester(t)
	x.ok(nodeCmd("n1", 4*core, gib))
	x.ok(spawnCmd(spec(100), "a", "b"))
	x.ok(spawnCmd(pinned(spec(100), "n1"), "p"))
	x.ok(reportCmd("n1", upd("a", 1, pb.ProcessState_PROCESS_STATE_RUNNING), upd("b", 1, pb.ProcessState_PROCESS_STATE_RUNNING)))
	x.ok(nodeCmd("n2", 4*core, gib))
	x.ok(drainCmd("n1", true))
	// The moves are planned; the old copies keep running and both nodes
	// hold the reservation.
	for _, id := range []string{"a", "b"} {
		r := x.get(id)
		if r.Node != "n1" || r.MoveTo != "n2" || r.State != pb.ProcessState_PROCESS_STATE_RUNNING || r.Incarnation != 1 {
			t.Fatalf("%s after drain: %v", id, r)
		}
	}
	if x.get("p").MoveTo != "" {
		t.Fatal("a pinned process was moved")
	}
	if got, _ := x.tb.Assignments("n2"); len(got) != 2 {
		t.Fatalf("n2 assignments %d, want 2", len(got))
	}
	// A stale report from n1 about the old copy still lands.
	x.ok(reportCmd("n1", upd("a", 1, pb.ProcessState_PROCESS_STATE_RUNNING)))
	// The new incarnation runs on n2: the move commits.
	x.ok(reportCmd("n2", upd("a", 2, pb.ProcessState_PROCESS_STATE_RUNNING)))
	a := x.get("a")
	if a.Node != "n2" || a.MoveTo != "" || a.Incarnation != 2 || len(a.History) != 1 || a.History[0].Node != "n1" {
		t.Fatalf("a after move: %v", a)
	}
	if got, _ := x.tb.Assignments("n1"); len(got) != 2 { // b (still moving) and p
		t.Fatalf("n1 assignments %d, want 2", len(got))
	}
	// The target failing to start calls the move off; the old copy stays.
	x.ok(reportCmd("n2", upd("b", 2, pb.ProcessState_PROCESS_STATE_FAILED)))
	b := x.get("b")
	if b.Node != "n1" || b.MoveTo != "" || b.Incarnation != 1 || b.State != pb.ProcessState_PROCESS_STATE_RUNNING {
		t.Fatalf("b after failed move: %v", b)
	}
	// A node lost mid-move: the move finishes on its target.
	x.ok(drainCmd("n1", false))
	x.ok(drainCmd("n1", true))
	if x.get("b").MoveTo != "n2" {
		t.Fatal("b not moving again")
	}
	x.ok(downCmd("n1"))
	if b := x.get("b"); b.Node != "n2" || b.Incarnation != 2 || b.State != pb.ProcessState_PROCESS_STATE_STARTING {
		t.Fatalf("b after n1 lost mid-move: %v", b)
	}
}

func TestSpawnAppliedTwiceIsANoOp(t *testing.T) {
	x := newTester(t)
	x.ok(nodeCmd("n1", 4*core, gib))
	cmd := spawnCmd(spec(100), "a", "b")
	cmd.NowUnixNano = 42
	x.ok(cmd)
	before := clone(t, x.tb)
	// The same entry proposed again after a lost leadership.
	again := spawnCmd(spec(100), "a", "b")
	again.NowUnixNano = 42
	if res := x.tb.ApplyCommand(x.tb.Index()+1, again); res.Err != nil {
		t.Fatalf("re-applied spawn: %v", res.Err)
	}
	if got := x.get("a"); !proto.Equal(got, before.Get("a")) {
		t.Fatalf("re-applied spawn changed a: %v", got)
	}
	// A different spawn with a taken id still fails.
	other := spawnCmd(spec(200), "a")
	other.NowUnixNano = 42
	x.fail(other, ErrExists)
}

// TestResizeMove covers resize with move: when the node cannot hold the new
// minimum the process moves make-before-break to a node placement picks,
// in the same command, and the move commits or fails like a drain's.
func TestResizeMove(t *testing.T) {
	x := newTester(t)
	x.ok(nodeCmd("n1", 2*core, gib))
	x.ok(spawnCmd(spec(500), "a", "b"))
	x.ok(spawnCmd(pinned(spec(100), "n1"), "p"))
	x.ok(reportCmd("n1", upd("a", 1, running), upd("b", 1, running)))
	x.ok(nodeCmd("n2", 4*core, 4*gib))
	x.ok(nodeCmd("n3", 2*core, 4*gib))
	big := &pb.Resources{CpuMinMilli: 3000, CpuMaxMilli: 3500, MemMinBytes: gib}

	// Without move the error stays, and names the node.
	err := x.fail(resizeCmd("a", big), ErrNoCapacity)
	if !strings.Contains(err.Error(), "node n1 cannot hold it") {
		t.Errorf("error %q", err)
	}
	// Nowhere to go, pinned, or being stopped: refused, table unchanged.
	err = x.fail(resizeMoveCmd("a", &pb.Resources{CpuMinMilli: 5000}), ErrNoCapacity)
	if !strings.Contains(err.Error(), "no node can take it") {
		t.Errorf("error %q", err)
	}
	err = x.fail(resizeMoveCmd("p", big), ErrNoCapacity)
	if !strings.Contains(err.Error(), "pinned") {
		t.Errorf("error %q", err)
	}
	// A resize that fits stays in place, move or not.
	x.ok(resizeMoveCmd("b", &pb.Resources{CpuMinMilli: 400}))
	if r := x.get("b"); r.Node != "n1" || r.MoveTo != "" {
		t.Fatalf("b after a resize that fits: %v", r)
	}

	// a moves to n2, the only node with 3 free cores, with its new bounds.
	res := x.ok(resizeMoveCmd("a", big))
	if !slices.Contains(res.IDs, "a") {
		t.Fatalf("changed %v", res.IDs)
	}
	a := x.get("a")
	if a.Node != "n1" || a.MoveTo != "n2" || a.State != running || a.Incarnation != 1 ||
		!proto.Equal(a.Spec.Resources, big) {
		t.Fatalf("a after resize --move: %v", a)
	}
	if got, _ := x.tb.Assignments("n2"); len(got) != 1 || got[0].Id != "a" {
		t.Fatalf("n2 assignments %v", got)
	}
	alloc := func(n string) Alloc { return x.tb.allocOf(n) }
	if a1, a2 := alloc("n1"), alloc("n2"); a1.CPUMin != 3500 || a2.CPUMin != 3000 || a2.MemMin != gib {
		t.Fatalf("during the move: n1 %+v, n2 %+v", a1, a2)
	}
	// Already moving: a second move is refused; resizes must fit both nodes.
	err = x.fail(resizeMoveCmd("a", &pb.Resources{CpuMinMilli: 3800}), ErrNoCapacity)
	if !strings.Contains(err.Error(), "already moving to n2") {
		t.Errorf("error %q", err)
	}
	err = x.fail(resizeCmd("a", &pb.Resources{CpuMinMilli: 1600}), ErrNoCapacity)
	if !strings.Contains(err.Error(), "node n1") {
		t.Errorf("error %q", err)
	}

	// The new incarnation runs on n2: the move commits, n1 is freed.
	x.ok(reportCmd("n2", upd("a", 2, running)))
	a = x.get("a")
	if a.Node != "n2" || a.MoveTo != "" || a.Incarnation != 2 || len(a.History) != 1 || a.History[0].Node != "n1" {
		t.Fatalf("a after the move: %v", a)
	}
	if a1 := alloc("n1"); a1.CPUMin != 500 {
		t.Fatalf("n1 after the move: %+v", a1)
	}

	// A failed start calls the move off: b stays on n1, with its new
	// bounds, until resized again.
	x.ok(resizeMoveCmd("b", &pb.Resources{CpuMinMilli: 2000}))
	if b := x.get("b"); b.MoveTo != "n3" {
		t.Fatalf("b moving to %q, want n3", b.MoveTo)
	}
	x.ok(reportCmd("n3", upd("b", 2, failed)))
	b := x.get("b")
	if b.Node != "n1" || b.MoveTo != "" || b.Incarnation != 1 || b.State != running || b.Spec.Resources.CpuMinMilli != 2000 ||
		!strings.Contains(b.Reason, "move to n3 failed") {
		t.Fatalf("b after the failed move: %v", b)
	}

	// Being killed: no move.
	x.ok(killCmd("b"))
	x.fail(resizeMoveCmd("b", big), ErrNoCapacity)
}
