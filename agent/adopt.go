package agent

import (
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/shim-run/shim/guard"
	pb "github.com/shim-run/shim/proto/shimv1"
)

// Adoption. The agent records each run it starts (statelog.go); a restarted
// agent re-adopts the sandboxes whose runs it recorded, removes the others,
// and keeps a record of runs that ended while no agent watched (lost). Of
// those, the ones the guard killed when the lease ran out are told apart by
// the guard's record (guard.FencedFileName in the data dir) and reported as
// fenced (ReasonFenced), whatever their restart policy; so is a run the guard
// killed while the agent was paused, which the agent sees end (wait).

// state is what the agent records of a run, for a restarted agent.
type state struct {
	Incarnation uint64 `json:"incarnation"`
	PID         int    `json:"pid"`
	StartTime   uint64 `json:"start_time"`
	Restarts    uint32 `json:"restarts"`
	StartedUnix int64  `json:"started_unix_nano"`
	Resources   []byte `json:"resources"`      // the bounds applied, as a pb.Resources
	Keep        bool   `json:"keep,omitempty"` // on-lost keep (lost.go): a fence before the table is seen spares it
}

// LogPath is where a process's output is kept under the data dir.
func LogPath(dataDir, id string) string { return filepath.Join(dataDir, "logs", id+".log") }

func (a *Agent) saveState(l *local) {
	res, _ := proto.Marshal(l.applied)
	st := state{Incarnation: l.inc, PID: l.proc.PID(), StartTime: l.proc.StartTime(),
		Restarts: l.restarts, StartedUnix: l.startedAt.UnixNano(), Resources: res,
		Keep: l.rec.GetSpec().GetOnLost() == pb.OnLost_ON_LOST_KEEP}
	if err := a.states.put(l.id, st); err != nil {
		a.Log.Warn("save process state", "id", l.id, "err", err)
	}
}

func (a *Agent) dropState(id string) {
	if err := a.states.drop(id); err != nil {
		a.Log.Warn("drop process state", "id", id, "err", err)
	}
}

// adopt takes over the processes an earlier agent left running.
func (a *Agent) adopt() error {
	var err error
	if a.states, err = openStateLog(a.DataDir); err != nil {
		return err
	}
	saved := a.states.all()
	fence := a.readFence()
	found, err := a.Runtime.Existing()
	if err != nil {
		return err
	}
	for _, f := range found {
		st, ok := saved[f.ID]
		if !ok || st.Incarnation != f.Incarnation {
			a.Log.Warn("removing a sandbox with no usable state", "id", f.ID, "incarnation", f.Incarnation)
			_ = a.Runtime.Remove(f.ID, f.Incarnation)
			continue
		}
		l := &local{id: f.ID, inc: f.Incarnation, restarts: st.Restarts, startedAt: time.Unix(0, st.StartedUnix),
			rec: &pb.ProcessRecord{Id: f.ID, Incarnation: f.Incarnation, Spec: &pb.ProcessSpec{}}}
		if st.Keep {
			l.rec.Spec.OnLost = pb.OnLost_ON_LOST_KEEP
		}
		p, err := a.Runtime.Adopt(f.ID, f.Incarnation, st.PID, st.StartTime)
		if err != nil {
			exit := lostExit(f.ID, st, fence)
			a.Log.Info("process ended while shimd was down", "id", f.ID, "how", exit.Reason, "err", err)
			_ = a.Runtime.Remove(f.ID, f.Incarnation)
			l.lost = &exit
			a.procs[f.ID] = l
			continue
		}
		l.proc = p
		l.applied = &pb.Resources{}
		if err := proto.Unmarshal(st.Resources, l.applied); err != nil {
			l.applied = nil // unknown: the next assignment applies its bounds again
		}
		a.procs[f.ID] = l
		a.Log.Info("re-adopted process", "id", f.ID, "pid", p.PID())
		go a.wait(l, p)
		go a.watchHealth(l, p) // idle unless its record has a check
	}
	// Lost processes whose sandbox is already gone are still recorded.
	for id, st := range saved {
		if a.procs[id] == nil {
			exit := lostExit(id, st, fence)
			a.procs[id] = &local{id: id, inc: st.Incarnation, restarts: st.Restarts, lost: &exit,
				rec: &pb.ProcessRecord{Id: id, Incarnation: st.Incarnation, Spec: &pb.ProcessSpec{}}}
		}
	}
	return nil
}

// ReasonFenced is the reason reported for a process the guard killed when
// the lease ran out while no agent could: shimd down or paused.
const ReasonFenced = "fenced: lease expired"

// fencedExit is the exit of a run the guard fenced.
var fencedExit = Exit{Code: -1, Signal: "SIGKILL", Reason: ReasonFenced}

// guardFenced reports whether the guard's record says it killed the run of
// incarnation inc of id that started at startedUnix (wall clock ns): it
// killed that sandbox, and after the run started (a run started again in
// the same sandbox, after an older fence, was not).
func guardFenced(fence guard.Fence, id string, inc uint64, startedUnix int64) bool {
	return fence.Has(guard.Sandbox{ID: id, Incarnation: inc}) && fence.AtUnixNano >= startedUnix
}

// lostExit is how a run the agent recorded (st) and found gone ended, as far
// as can be told: fenced, if the guard says so; otherwise it exited, how is
// not known.
func lostExit(id string, st state, fence guard.Fence) Exit {
	if guardFenced(fence, id, st.Incarnation, st.StartedUnix) {
		return fencedExit
	}
	return Exit{Code: -1, Reason: "exited while shimd was down"}
}

// readFence reads the guard's record of what it fenced; none if it cannot.
func (a *Agent) readFence() guard.Fence {
	fence, err := guard.ReadFence(filepath.Join(a.DataDir, guard.FencedFileName))
	if err != nil {
		a.Log.Warn("the guard's record of what it fenced is unreadable: processes it killed are reported as exited", "err", err)
	}
	return fence
}

// mayBeFence reports whether an exit seen by a running agent may be the
// guard's fence (it kills with SIGKILL, and a process the agent adopted
// ends with no status at all), and not the agent's own kill or the OOM
// killer's. The guard's record decides.
func mayBeFence(e Exit) bool {
	return !e.OOMKilled && !strings.HasPrefix(e.Reason, "killed") &&
		(e.Signal == "SIGKILL" || (e.Signal == "" && e.Code == -1))
}
