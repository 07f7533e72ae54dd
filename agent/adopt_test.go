package agent

import (
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/shim-run/shim/guard"
	pb "github.com/shim-run/shim/proto/shimv1"
)

func TestLostExit(t *testing.T) {
	fence := guard.Fence{AtUnixNano: 1000, Killed: []guard.Sandbox{{ID: "a", Incarnation: 2}}}
	for _, c := range []struct {
		name   string
		id     string
		st     state
		fenced bool
	}{
		{"killed by the guard", "a", state{Incarnation: 2, StartedUnix: 900}, true},
		{"started before the fence, to the nanosecond", "a", state{Incarnation: 2, StartedUnix: 1000}, true},
		{"another incarnation", "a", state{Incarnation: 1, StartedUnix: 900}, false},
		{"another process", "b", state{Incarnation: 2, StartedUnix: 900}, false},
		{"restarted after the fence", "a", state{Incarnation: 2, StartedUnix: 1100}, false},
	} {
		got := lostExit(c.id, c.st, fence)
		if fenced := got.Reason == ReasonFenced; fenced != c.fenced || !got.Failed() {
			t.Errorf("%s: %+v, want fenced %v (and failed)", c.name, got, c.fenced)
		}
	}
	if got := lostExit("a", state{Incarnation: 2}, guard.Fence{}); got.Reason == ReasonFenced {
		t.Errorf("no record: %+v, want not fenced", got)
	}
}

// goneRuntime finds sandboxes left by an earlier agent whose processes are
// gone.
type goneRuntime struct {
	countingRuntime
	found []Found
}

func (r *goneRuntime) Existing() ([]Found, error) { return r.found, nil }
func (r *goneRuntime) Adopt(string, uint64, int, uint64) (Proc, error) {
	return nil, errors.New("process is gone")
}

// A process the guard killed when the lease ran out while shimd was down is
// reported as fenced, not as exited, even with restart=never; one the guard
// did not kill ended some other way.
func TestAdoptReportsWhatTheGuardFenced(t *testing.T) {
	dir := t.TempDir()
	states, err := openStateLog(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"fenced", "exited"} {
		if err := states.put(id, state{Incarnation: 1, PID: 1234, StartedUnix: 500}); err != nil {
			t.Fatal(err)
		}
	}
	if err := guard.WriteFence(filepath.Join(dir, guard.FencedFileName),
		guard.Fence{Deadline: 7, AtUnixNano: 600, Killed: []guard.Sandbox{{ID: "fenced", Incarnation: 1}}}); err != nil {
		t.Fatal(err)
	}
	cp := newFakeCP()
	var recs []*pb.ProcessRecord
	for _, id := range []string{"exited", "fenced"} {
		r := assignment(id, 1, pb.ProcessState_PROCESS_STATE_RUNNING)
		r.Spec.Restart = pb.RestartPolicy_RESTART_POLICY_NEVER
		recs = append(recs, r)
	}
	cp.set(1, recs...)
	rt := &goneRuntime{found: []Found{{ID: "fenced", Incarnation: 1}, {ID: "exited", Incarnation: 1}}}
	startAgent(t, cp, rt, func(a *Agent) { a.DataDir = dir })
	reasons := map[string]string{}
	waitUntil(t, 5*time.Second, "both reported", func() bool {
		for _, u := range cp.reported() {
			if u.State == pb.ProcessState_PROCESS_STATE_FAILED {
				reasons[u.Id] = u.Reason
			}
		}
		return len(reasons) == 2
	})
	if reasons["fenced"] != ReasonFenced {
		t.Errorf("the fenced process: %q, want %q", reasons["fenced"], ReasonFenced)
	}
	if reasons["exited"] != "exited while shimd was down" {
		t.Errorf("the other: %q, want exited while shimd was down", reasons["exited"])
	}
	if n := rt.starts.Load(); n != 0 {
		t.Errorf("started %d processes, want none (restart never)", n)
	}
}

func TestMayBeFence(t *testing.T) {
	for _, c := range []struct {
		e    Exit
		want bool
	}{
		{Exit{Code: -1, Signal: "SIGKILL", Reason: "signaled"}, true}, // a child, killed by someone else
		{Exit{Code: -1, Reason: "unknown"}, true},                     // an adopted process: no status
		{Exit{Code: -1, Signal: "SIGKILL", Reason: "killed"}, false},  // the agent's own kill
		{Exit{Code: -1, Reason: "killed; unknown"}, false},            // the agent's own kill, adopted
		{Exit{Code: -1, Signal: "SIGKILL", OOMKilled: true, Reason: "oom-killed"}, false},
		{Exit{Code: -1, Signal: "SIGTERM", Reason: "signaled"}, false},
		{Exit{Code: 3, Reason: "exited"}, false},
	} {
		if got := mayBeFence(c.e); got != c.want {
			t.Errorf("mayBeFence(%+v) = %v, want %v", c.e, got, c.want)
		}
	}
}

// heldRuntime starts processes that end, with exit, when release is closed.
type heldRuntime struct {
	countingRuntime
	release chan struct{}
	exit    Exit
}

func (r *heldRuntime) Start(s Spec) (Proc, error) {
	p, err := r.countingRuntime.Start(s)
	if err == nil {
		sp := p.(*simProc)
		go func() {
			<-r.release
			sp.once.Do(func() { sp.exit = r.exit; close(sp.done) })
		}()
	}
	return p, err
}

// A process the guard killed while the agent was paused (SIGSTOP) says so
// when the agent runs again, though the agent sees it end itself.
func TestPausedAgentReportsWhatTheGuardFenced(t *testing.T) {
	dir := t.TempDir()
	cp := newFakeCP()
	rec := assignment("a", 1, pb.ProcessState_PROCESS_STATE_STARTING)
	rec.Spec.Restart = pb.RestartPolicy_RESTART_POLICY_NEVER
	cp.set(1, rec)
	rt := &heldRuntime{release: make(chan struct{}), exit: Exit{Code: -1, Signal: "SIGKILL", Reason: "signaled"}}
	startAgent(t, cp, rt, func(a *Agent) { a.DataDir = dir })
	waitUntil(t, 5*time.Second, "a running", func() bool {
		for _, u := range cp.reported() {
			if u.State == pb.ProcessState_PROCESS_STATE_RUNNING {
				return true
			}
		}
		return false
	})
	if err := guard.WriteFence(filepath.Join(dir, guard.FencedFileName), guard.Fence{Deadline: 1,
		AtUnixNano: time.Now().UnixNano(), Killed: []guard.Sandbox{{ID: "a", Incarnation: 1}}}); err != nil {
		t.Fatal(err)
	}
	close(rt.release)
	var reason string
	waitUntil(t, 5*time.Second, "a's end reported", func() bool {
		for _, u := range cp.reported() {
			if u.State == pb.ProcessState_PROCESS_STATE_FAILED {
				reason = u.Reason
				return true
			}
		}
		return false
	})
	if reason != ReasonFenced {
		t.Fatalf("reported %q, want %q", reason, ReasonFenced)
	}
}
