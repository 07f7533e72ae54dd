package table

import (
	"errors"
	"fmt"
	"slices"
	"sort"
	"testing"

	pb "github.com/shim-run/shim/proto/shimv1"
)

func serviceCmd(s *pb.ProcessSpec, ids ...string) *pb.Command {
	return &pb.Command{Op: &pb.Command_Spawn{Spawn: &pb.Spawn{Ids: ids, Spec: s, Service: true}}}
}

func scaleCmd(name string, n uint32, ids ...string) *pb.Command {
	return &pb.Command{Op: &pb.Command_Scale{Scale: &pb.Scale{Name: name, Count: n, Ids: ids}}}
}

func named(s *pb.ProcessSpec, name string) *pb.ProcessSpec {
	s.Name = name
	return s
}

// replicaNodes returns "replica@node" of the live replicas of name.
func replicaNodes(x *tester, name string) []string {
	var out []string
	for _, r := range x.tb.Replicas(name) {
		if !r.Stop {
			out = append(out, fmt.Sprintf("%d@%s", r.Replica, r.Node))
		}
	}
	return out
}

func distinctNodes(x *tester, name string) int {
	seen := map[string]bool{}
	for _, r := range x.tb.Replicas(name) {
		if !r.Stop {
			seen[r.Node] = true
		}
	}
	return len(seen)
}

func TestServiceSpawnScaleSpread(t *testing.T) {
	x := threeNodes(t)
	// Other processes on n1 must not pull replicas onto n2 and n3 twice.
	x.ok(spawnCmd(spec(100), "o1"))
	x.ok(serviceCmd(named(spec(100), "web"), "w0", "w1", "w2"))
	if got := replicaNodes(x, "web"); len(got) != 3 || distinctNodes(x, "web") != 3 {
		t.Fatalf("replicas %v: want 3 on 3 nodes", got)
	}
	if s := x.tb.Service("web"); s == nil || s.Count != 3 {
		t.Fatalf("service %v", s)
	}
	x.ok(scaleCmd("web", 5, "w3", "w4", "w5", "w6", "w7"))
	if got := replicaNodes(x, "web"); len(got) != 5 {
		t.Fatalf("after scale 5: %v", got)
	}
	per := map[string]int{}
	for _, r := range x.tb.Replicas("web") {
		per[r.Node]++
	}
	for n, c := range per {
		if c > 2 {
			t.Errorf("node %s holds %d of 5 replicas: not spread", n, c)
		}
	}
	if r := x.get("w3"); r.Replica != 3 || r.Service != "web" {
		t.Errorf("w3: replica %d service %q", r.Replica, r.Service)
	}
	x.ok(scaleCmd("web", 2))
	got := replicaNodes(x, "web")
	if len(got) != 2 || distinctNodes(x, "web") != 2 {
		t.Fatalf("after scale 2: %v", got)
	}
	if !x.get("w4").Stop || !x.get("w2").Stop || x.get("w0").Stop || x.get("w1").Stop {
		t.Fatalf("scale down must stop the highest replicas")
	}
	if s := x.tb.Service("web"); s.Count != 2 {
		t.Fatalf("count %d", s.Count)
	}
	// Scaling up again fills the lowest missing index.
	x.ok(scaleCmd("web", 3, "w8"))
	if r := x.get("w8"); r.Replica != 2 {
		t.Fatalf("new replica index %d, want 2", r.Replica)
	}
}

func TestServiceBadInput(t *testing.T) {
	x := threeNodes(t)
	x.fail(scaleCmd("nope", 2, "a", "b"), ErrNotFound)
	x.fail(serviceCmd(spec(100), "a"), ErrInvalid) // no name
	x.ok(serviceCmd(named(spec(100), "web"), "w0"))
	x.fail(serviceCmd(named(spec(100), "web"), "w9"), ErrExists)
	x.fail(scaleCmd("web", 3, "w1"), ErrInvalid) // too few ids
	x.fail(scaleCmd("web", MaxSpawnIDs+1), ErrInvalid)
	// A check that names no port of the process.
	s := named(spec(100), "api")
	s.Ports = []*pb.PortSpec{{Name: "HTTP"}}
	s.Check = &pb.HealthCheck{Kind: "http", Port: "ADMIN", Path: "/"}
	x.fail(serviceCmd(s, "a0"), ErrInvalid)
	s.Check.Port = "HTTP"
	s.Ports[0].Name = "http"
	x.fail(serviceCmd(s, "a0"), ErrInvalid)
	// Ports need a network the node reaches.
	s.Ports[0].Name = "HTTP"
	s.Network = pb.Network_NETWORK_NONE
	x.fail(serviceCmd(s, "a0"), ErrInvalid)
	s.Network, s.Isolation = pb.Network_NETWORK_HOST, pb.Isolation_ISOLATION_VM
	x.fail(serviceCmd(s, "a0"), ErrInvalid)
}

func TestServiceKillLowersCountAndForgets(t *testing.T) {
	x := threeNodes(t)
	x.ok(serviceCmd(named(spec(100), "web"), "w0", "w1", "w2"))
	x.ok(killCmd("w1"))
	if s := x.tb.Service("web"); s == nil || s.Count != 2 {
		t.Fatalf("after killing one replica: %v", s)
	}
	x.ok(killCmd("w0", "w2"))
	if s := x.tb.Service("web"); s != nil {
		t.Fatalf("service kept after every replica was killed: %v", s)
	}
	// The name is free again.
	x.ok(serviceCmd(named(spec(100), "web"), "v0"))
}

func TestServiceReplacesEndedReplica(t *testing.T) {
	x := threeNodes(t)
	x.ok(serviceCmd(named(spec(100), "web"), "w0", "w1"))
	r := x.get("w0")
	x.ok(reportCmd(r.Node, upd("w0", 1, pb.ProcessState_PROCESS_STATE_RUNNING)))
	u := upd("w0", 1, pb.ProcessState_PROCESS_STATE_EXITED)
	x.ok(reportCmd(r.Node, u))
	n := x.get("w0")
	if n.State != pb.ProcessState_PROCESS_STATE_STARTING || n.Incarnation != 2 || n.Replica != 0 {
		t.Fatalf("ended replica: %s inc %d replica %d, want starting inc 2 replica 0", StateName(n.State), n.Incarnation, n.Replica)
	}
	if n.Node == r.Node {
		t.Errorf("replaced on the same node %s while others had room", n.Node)
	}
	if len(n.History) != 1 {
		t.Errorf("history %v", n.History)
	}
	// Short runs in a row: replaced maxReplacements times, then left ended.
	for i := 0; i < maxReplacements+2; i++ {
		cur := x.get("w0")
		if Terminal(cur.State) {
			break
		}
		x.ok(reportCmd(cur.Node, upd("w0", cur.Incarnation, pb.ProcessState_PROCESS_STATE_FAILED)))
	}
	if cur := x.get("w0"); !Terminal(cur.State) {
		t.Fatalf("a replica that keeps failing is replaced forever: %s inc %d", StateName(cur.State), cur.Incarnation)
	}
	if s := x.tb.Service("web"); s.Reason == "" {
		t.Errorf("service says nothing about the replica it gave up on")
	}
	// A killed replica is not replaced.
	w1 := x.get("w1")
	x.ok(killCmd("w1"))
	x.ok(reportCmd(w1.Node, upd("w1", 1, pb.ProcessState_PROCESS_STATE_KILLED)))
	if cur := x.get("w1"); cur.State != pb.ProcessState_PROCESS_STATE_KILLED {
		t.Fatalf("killed replica: %s", StateName(cur.State))
	}
}

func TestServiceMovesKeepReplica(t *testing.T) {
	x := threeNodes(t)
	x.ok(serviceCmd(named(spec(100), "web"), "w0", "w1"))
	r := x.get("w1")
	x.ok(downCmd(r.Node))
	n := x.get("w1")
	if n.Node == r.Node || n.Replica != 1 || n.Incarnation != 2 {
		t.Fatalf("after node death: node %s replica %d inc %d", n.Node, n.Replica, n.Incarnation)
	}
	if distinctNodes(x, "web") != 2 {
		t.Errorf("moved replica joined its sibling: %v", replicaNodes(x, "web"))
	}
}

func TestPorts(t *testing.T) {
	x := threeNodes(t)
	s := named(spec(100), "web")
	s.Ports = []*pb.PortSpec{{Name: "HTTP"}, {Name: "ADMIN", Port: 9000}}
	x.ok(serviceCmd(s, "w0", "w1", "w2"))
	for _, id := range []string{"w0", "w1", "w2"} {
		p := x.get(id).Ports
		if p["ADMIN"] != 9000 || p["HTTP"] != DefaultPortMin {
			t.Errorf("%s ports %v", id, p)
		}
	}
	// 9000 is taken on every node: a fourth replica has nowhere to go.
	x.fail(scaleCmd("web", 4, "w3"), ErrNoCapacity)
	other := spec(100)
	other.Ports = []*pb.PortSpec{{Name: "HTTP", Port: 9000}}
	x.fail(spawnCmd(other, "o"), ErrNoCapacity)
	// Dynamic ports do not collide.
	dyn := spec(100)
	dyn.Ports = []*pb.PortSpec{{Name: "A"}, {Name: "B"}}
	x.ok(spawnCmd(pinned(dyn, "n1"), "d1", "d2"))
	seen := map[uint32]bool{}
	for _, id := range []string{"w0", "w1", "w2", "d1", "d2"} {
		for _, p := range x.get(id).Ports {
			if x.get(id).Node == "n1" {
				if seen[p] {
					t.Fatalf("port %d handed out twice on n1", p)
				}
				seen[p] = true
			}
		}
	}
	// A node's declared range is used.
	n := nodeCmd("n4", 2*core, 4*gib)
	n.GetRegisterNode().Node.PortMin, n.GetRegisterNode().Node.PortMax = 30000, 30001
	x.ok(n)
	x.ok(spawnCmd(pinned(spec(100), "n4"), "p0"))
	one := spec(100)
	one.Ports = []*pb.PortSpec{{Name: "A"}}
	x.ok(spawnCmd(pinned(one, "n4"), "p1", "p2"))
	x.fail(spawnCmd(pinned(one, "n4"), "p3"), ErrNoCapacity)
	got := []int{int(x.get("p1").Ports["A"]), int(x.get("p2").Ports["A"])}
	sort.Ints(got)
	if !slices.Equal(got, []int{30000, 30001}) {
		t.Fatalf("ports on n4 %v", got)
	}
	// Moves keep a dynamic port when it is free on the new node.
	w := x.get("w1")
	x.ok(downCmd(w.Node))
	if m := x.get("w1"); m.Node == w.Node || m.Ports["ADMIN"] != 9000 && m.Node != "" {
		t.Fatalf("moved replica %s ports %v", m.Node, m.Ports)
	}
}

func TestHealthReported(t *testing.T) {
	x := threeNodes(t)
	s := named(spec(100), "web")
	s.Ports = []*pb.PortSpec{{Name: "HTTP"}}
	s.Check = &pb.HealthCheck{Kind: "tcp", Port: "HTTP"}
	x.ok(serviceCmd(s, "w0"))
	r := x.get("w0")
	x.ok(reportCmd(r.Node, upd("w0", 1, pb.ProcessState_PROCESS_STATE_RUNNING)))
	if Healthy(x.get("w0")) {
		t.Fatal("healthy before any check passed")
	}
	u := upd("w0", 1, pb.ProcessState_PROCESS_STATE_RUNNING)
	u.Health = pb.Health_HEALTH_HEALTHY
	x.ok(reportCmd(r.Node, u))
	if !Healthy(x.get("w0")) || HealthName(x.get("w0")) != "healthy" {
		t.Fatal("not healthy after a healthy report")
	}
	u = upd("w0", 1, pb.ProcessState_PROCESS_STATE_RUNNING)
	u.Health = pb.Health_HEALTH_UNHEALTHY
	x.ok(reportCmd(r.Node, u))
	if Healthy(x.get("w0")) {
		t.Fatal("healthy after an unhealthy report")
	}
	// A new incarnation starts with no verdict.
	x.ok(downCmd(r.Node))
	if h := x.get("w0").Health; h != pb.Health_HEALTH_UNSPECIFIED {
		t.Fatalf("moved replica kept health %v", h)
	}
}

func TestServiceSnapshotRoundTrip(t *testing.T) {
	x := threeNodes(t)
	x.ok(serviceCmd(named(spec(100), "web"), "w0", "w1"))
	c := clone(t, x.tb)
	if !Equal(c, x.tb) || c.Service("web") == nil {
		t.Fatal("snapshot lost the service")
	}
	if err := x.fail(scaleCmd("web", 1<<20), ErrInvalid); !errors.Is(err, ErrInvalid) {
		t.Fatal(err)
	}
}

func TestServiceUpdateAndAddReplicas(t *testing.T) {
	x := threeNodes(t)
	x.ok(serviceCmd(named(spec(100), "web"), "w0", "w1"))
	ns := named(spec(100), "web")
	ns.Command = []string{"/bin/sleep", "20"}
	x.fail(&pb.Command{Op: &pb.Command_UpdateService{UpdateService: &pb.UpdateService{Name: "nope", Spec: ns}}}, ErrNotFound)
	x.fail(&pb.Command{Op: &pb.Command_UpdateService{UpdateService: &pb.UpdateService{Name: "web", Spec: named(spec(100), "other")}}}, ErrInvalid)
	x.ok(&pb.Command{Op: &pb.Command_UpdateService{UpdateService: &pb.UpdateService{Name: "web", Spec: ns}}})
	x.ok(&pb.Command{Op: &pb.Command_AddReplicas{AddReplicas: &pb.AddReplicas{Name: "web", Ids: []string{"n0"}, Replicas: []uint32{0}}}})
	n0 := x.get("n0")
	if n0.Replica != 0 || n0.Service != "web" || n0.Spec.Command[1] != "20" {
		t.Fatalf("new replica %v", n0)
	}
	if n0.Node == x.get("w0").Node {
		t.Errorf("new copy of replica 0 on its old copy's node while others had room")
	}
	// The old copy stops: the count stays.
	x.ok(killCmd("w0"))
	if s := x.tb.Service("web"); s.Count != 2 {
		t.Fatalf("count %d after the old copy stopped", s.Count)
	}
	x.fail(&pb.Command{Op: &pb.Command_AddReplicas{AddReplicas: &pb.AddReplicas{Name: "web", Ids: []string{"a", "b"}, Replicas: []uint32{0}}}}, ErrInvalid)
}

func TestAutoscaleVerdict(t *testing.T) {
	svc := &pb.ServiceRecord{Name: "web", Count: 2, Min: 1, Max: 3}
	b := &pb.Resources{CpuMinMilli: 100, CpuMaxMilli: 1000}
	rep := func(cpu int64, state pb.ProcessState) *pb.ProcessRecord {
		return &pb.ProcessRecord{State: state, Spec: &pb.ProcessSpec{Resources: b, Grow: pb.Grow_GROW_ON}, Grant: &pb.Grant{CpuMilli: cpu}}
	}
	run := pb.ProcessState_PROCESS_STATE_RUNNING
	for _, c := range []struct {
		reps []*pb.ProcessRecord
		want int
	}{
		{[]*pb.ProcessRecord{rep(1000, run), rep(1000, run)}, ScaleOut},
		{[]*pb.ProcessRecord{rep(1000, run), rep(500, run)}, 0},
		{[]*pb.ProcessRecord{rep(100, run), rep(100, run)}, ScaleIn},
		{[]*pb.ProcessRecord{rep(1000, run), rep(1000, pb.ProcessState_PROCESS_STATE_STARTING)}, 0},
		{[]*pb.ProcessRecord{rep(1000, run), rep(1000, run), rep(1000, run)}, 0}, // at max count
		{[]*pb.ProcessRecord{rep(100, run)}, 0},                                  // at min count
	} {
		if got := AutoscaleVerdict(svc, c.reps); got != c.want {
			t.Errorf("%d replicas: verdict %d, want %d", len(c.reps), got, c.want)
		}
	}
	if got := AutoscaleVerdict(&pb.ServiceRecord{Name: "x", Count: 2}, []*pb.ProcessRecord{rep(1000, run)}); got != 0 {
		t.Errorf("a service without bounds: verdict %d", got)
	}
	x := threeNodes(t)
	c := serviceCmd(named(spec(100), "web"), "w0")
	c.GetSpawn().Min, c.GetSpawn().Max = 1, 3
	x.fail(c, ErrInvalid) // not elastic
	c.GetSpawn().Spec.Grow = pb.Grow_GROW_ON
	c.GetSpawn().Spec.Resources.CpuMaxMilli = 1000
	x.ok(c)
	if s := x.tb.Service("web"); s.Min != 1 || s.Max != 3 {
		t.Fatalf("bounds %d:%d", s.Min, s.Max)
	}
}

// TestPortsOfAMove: a process moved make-before-break gets ports free on
// its new node for its next incarnation, and keeps them when the move lands.
func TestPortsOfAMove(t *testing.T) {
	x := newTester(t)
	x.ok(nodeCmd("n1", 2*core, 4*gib))
	x.ok(nodeCmd("n2", 2*core, 4*gib))
	p := spec(100)
	p.Ports = []*pb.PortSpec{{Name: "HTTP"}}
	x.ok(spawnCmd(p, "a"))
	x.ok(spawnCmd(p, "b"))
	a, b := x.get("a"), x.get("b")
	if a.Node == b.Node || a.Ports["HTTP"] != b.Ports["HTTP"] {
		t.Fatalf("set-up: a %s %v, b %s %v", a.Node, a.Ports, b.Node, b.Ports)
	}
	x.ok(reportCmd(a.Node, upd("a", 1, pb.ProcessState_PROCESS_STATE_RUNNING)))
	x.ok(drainCmd(a.Node, true))
	m := x.get("a")
	if m.MoveTo != b.Node || m.MovePorts["HTTP"] == 0 || m.MovePorts["HTTP"] == b.Ports["HTTP"] {
		t.Fatalf("moving to %s: move ports %v (b holds %v there)", m.MoveTo, m.MovePorts, b.Ports)
	}
	if got := PortsOn(m, b.Node)["HTTP"]; got != m.MovePorts["HTTP"] {
		t.Errorf("PortsOn the target: %d", got)
	}
	if got := PortsOn(m, a.Node)["HTTP"]; got != a.Ports["HTTP"] {
		t.Errorf("PortsOn the old node: %d", got)
	}
	want := m.MovePorts["HTTP"]
	x.ok(reportCmd(b.Node, upd("a", 2, pb.ProcessState_PROCESS_STATE_RUNNING)))
	l := x.get("a")
	if l.Node != b.Node || l.Ports["HTTP"] != want || l.MovePorts != nil {
		t.Fatalf("after the move: node %s ports %v move ports %v, want port %d", l.Node, l.Ports, l.MovePorts, want)
	}
}
