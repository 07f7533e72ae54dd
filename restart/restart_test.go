package restart

import (
	"testing"
	"time"

	pb "github.com/shim-run/shim/proto/shimv1"
)

func rec(id string, inc uint64, state pb.ProcessState) *pb.ProcessRecord {
	return &pb.ProcessRecord{Id: id, Incarnation: inc, State: state, Spec: &pb.ProcessSpec{Resources: &pb.Resources{CpuMaxMilli: 500}}}
}

const (
	starting = pb.ProcessState_PROCESS_STATE_STARTING
	running  = pb.ProcessState_PROCESS_STATE_RUNNING
	backoff  = pb.ProcessState_PROCESS_STATE_BACKOFF
)

func kinds(acts []Action) []string {
	var out []string
	for _, a := range acts {
		out = append(out, a.Kind.String()+":"+a.ID)
	}
	return out
}

func TestReconcile(t *testing.T) {
	res := &pb.Resources{CpuMaxMilli: 500}
	stopped := rec("s", 1, running)
	stopped.Stop = true
	resized := rec("r", 1, running)
	resized.Spec.Resources = &pb.Resources{CpuMaxMilli: 1000}
	tests := []struct {
		name     string
		assigned []*pb.ProcessRecord
		local    []Local
		mayStart bool
		want     []string
	}{
		{"start new", []*pb.ProcessRecord{rec("a", 1, starting)}, nil, true, []string{"start:a"}},
		{"no lease, no start", []*pb.ProcessRecord{rec("a", 1, starting)}, nil, false, nil},
		{"in step", []*pb.ProcessRecord{rec("a", 1, running)}, []Local{{ID: "a", Incarnation: 1, Running: true, Resources: res}}, true, nil},
		{"moved elsewhere: fence", nil, []Local{{ID: "a", Incarnation: 1, Running: true}}, true, []string{"fence:a"}},
		{"new incarnation: fence old", []*pb.ProcessRecord{rec("a", 2, starting)}, []Local{{ID: "a", Incarnation: 1, Running: true}}, true, []string{"fence:a", "start:a"}},
		{"fence even without lease", nil, []Local{{ID: "a", Incarnation: 1, Waiting: true}}, false, []string{"fence:a"}},
		{"gone and not running: nothing", nil, []Local{{ID: "a", Incarnation: 1}}, true, nil},
		{"killed: stop", []*pb.ProcessRecord{stopped}, []Local{{ID: "s", Incarnation: 1, Running: true, Resources: res}}, true, []string{"stop:s"}},
		{"stopping already", []*pb.ProcessRecord{stopped}, []Local{{ID: "s", Incarnation: 1, Running: true, Stopping: true, Resources: res}}, true, nil},
		{"killed, not here: finish", []*pb.ProcessRecord{stopped}, nil, false, []string{"finish:s"}},
		{"resize", []*pb.ProcessRecord{resized}, []Local{{ID: "r", Incarnation: 1, Running: true, Resources: res}}, true, []string{"resize:r"}},
		{"running in table, nothing here: recover", []*pb.ProcessRecord{rec("a", 1, running)}, nil, true, []string{"recover:a"}},
		{"backoff in table, nothing here: recover", []*pb.ProcessRecord{rec("a", 1, backoff)}, nil, true, []string{"recover:a"}},
		{"lost while down: recover", []*pb.ProcessRecord{rec("a", 1, running)}, []Local{{ID: "a", Incarnation: 1, Lost: true}}, true, []string{"recover:a"}},
		{"lost, no lease: wait", []*pb.ProcessRecord{rec("a", 1, running)}, []Local{{ID: "a", Incarnation: 1, Lost: true}}, false, nil},
		{"fences first", []*pb.ProcessRecord{rec("a", 1, starting)}, []Local{{ID: "z", Incarnation: 1, Running: true}}, true, []string{"fence:z", "start:a"}},
		{"moved away make-before-break: handoff", nil, []Local{{ID: "a", Incarnation: 1, Running: true, MovingAway: true}}, true, []string{"handoff:a"}},
		{"handing off already", nil, []Local{{ID: "a", Incarnation: 1, Running: true, MovingAway: true, Stopping: true}}, true, nil},
		{"moved away, no lease: fence", nil, []Local{{ID: "a", Incarnation: 1, Running: true, MovingAway: true}}, false, []string{"fence:a"}},
		{"finished, table not told yet: nothing", []*pb.ProcessRecord{rec("a", 1, running)}, []Local{{ID: "a", Incarnation: 1, Done: true}}, true, nil},
		{"finished, new incarnation here: start", []*pb.ProcessRecord{rec("a", 2, starting)}, []Local{{ID: "a", Incarnation: 1, Done: true}}, true, []string{"start:a"}},
		{"moving away, not yet moved", []*pb.ProcessRecord{rec("a", 1, running)}, []Local{{ID: "a", Incarnation: 1, Running: true, MovingAway: true, Resources: res}}, true, nil},
	}
	for _, tc := range tests {
		got := kinds(Reconcile(tc.assigned, tc.local, tc.mayStart))
		if len(got) != len(tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, got, tc.want)
			continue
		}
		for i := range got {
			if got[i] != tc.want[i] {
				t.Errorf("%s: got %v, want %v", tc.name, got, tc.want)
				break
			}
		}
	}
}

func TestPolicy(t *testing.T) {
	p := Policy{Initial: 100 * time.Millisecond, Max: time.Second, Stable: 10 * time.Second}
	always, onFail, never := pb.RestartPolicy_RESTART_POLICY_ALWAYS, pb.RestartPolicy_RESTART_POLICY_ON_FAILURE, pb.RestartPolicy_RESTART_POLICY_NEVER
	if d := p.Decide(never, true, 0, 0); d.Restart {
		t.Fatal("never restarted")
	}
	if d := p.Decide(onFail, false, 0, 0); d.Restart {
		t.Fatal("on-failure restarted a clean exit")
	}
	if d := p.Decide(pb.RestartPolicy_RESTART_POLICY_UNSPECIFIED, true, 0, 0); !d.Restart {
		t.Fatal("the default is on-failure")
	}
	// A crash loop backs off exponentially, capped.
	var delays []time.Duration
	c := 0
	for range 6 {
		d := p.Decide(always, true, time.Millisecond, c)
		delays = append(delays, d.Delay)
		c = d.Consecutive
	}
	want := []time.Duration{100, 200, 400, 800, 1000, 1000}
	for i := range want {
		if delays[i] != want[i]*time.Millisecond {
			t.Fatalf("delays %v", delays)
		}
	}
	// A stable run resets it.
	if d := p.Decide(always, true, 11*time.Second, c); d.Delay != 100*time.Millisecond || d.Consecutive != 1 {
		t.Fatalf("after a stable run: %+v", d)
	}
}

// A copy this node kept while cut off (on-lost keep) runs on until the
// newer incarnation runs elsewhere, then is fenced with its record (so the
// agent reports its end); a stopped process stops it at once.
func TestReconcileCutOffCopy(t *testing.T) {
	rec := func(state pb.ProcessState, stop bool) *pb.ProcessRecord {
		return &pb.ProcessRecord{Id: "k", Incarnation: 2, Node: "n2", State: state, Stop: stop,
			CutOff: &pb.Incarnation{Incarnation: 1, Node: "n1"}}
	}
	local := []Local{{ID: "k", Incarnation: 1, Running: true}}
	if acts := Reconcile([]*pb.ProcessRecord{rec(pb.ProcessState_PROCESS_STATE_STARTING, false)}, local, true); len(acts) != 0 {
		t.Fatalf("newer copy starting: %v, want the cut-off copy kept", acts)
	}
	for _, r := range []*pb.ProcessRecord{rec(pb.ProcessState_PROCESS_STATE_RUNNING, false), rec(pb.ProcessState_PROCESS_STATE_STARTING, true)} {
		acts := Reconcile([]*pb.ProcessRecord{r}, local, true)
		if len(acts) != 1 || acts[0].Kind != Fence || acts[0].Record != r {
			t.Fatalf("state %v stop %v: %v, want a fence carrying the record", r.State, r.Stop, acts)
		}
	}
	// Not running here (it ended while cut off): fenced at once, so its
	// end is reported.
	acts := Reconcile([]*pb.ProcessRecord{rec(pb.ProcessState_PROCESS_STATE_STARTING, false)}, []Local{{ID: "k", Incarnation: 1, Waiting: true}}, true)
	if len(acts) != 1 || acts[0].Kind != Fence {
		t.Fatalf("cut-off copy waiting to restart: %v, want a fence", acts)
	}
}
