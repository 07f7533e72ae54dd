// Package restart decides what a node does with its processes. Reconcile
// compares the table's assignments with what runs locally and returns the
// actions that close the gap; Policy decides whether and when an exited
// process starts again. Both are pure functions; the agent applies them.
package restart

import (
	"sort"
	"time"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Local is what a node knows of one process it holds.
type Local struct {
	ID          string
	Incarnation uint64
	Running     bool // a live process exists
	Waiting     bool // exited, waiting out a restart backoff
	Lost        bool // exited while the agent was down; exit not yet handled
	Stopping    bool // a stop signal was already sent
	// MovingAway: the last assignment seen was moving it to another node
	// make-before-break (a drain, or a resize --move).
	MovingAway bool
	// Done: it finished here and its final state is reported; the table
	// may still list it as live until that report is applied.
	Done      bool
	Resources *pb.Resources // bounds applied to its cgroup
}

// Kind is what to do with a process.
type Kind int

const (
	// Start starts a process the table assigned here.
	Start Kind = iota + 1
	// Stop signals a process the user killed.
	Stop
	// Fence kills a process the table no longer assigns here (moved
	// elsewhere, or gone): it must not run twice.
	Fence
	// Resize applies new bounds to a running process in place.
	Resize
	// Finish reports a killed process that is not running here as done.
	Finish
	// Recover runs the restart policy for a process that died while the
	// agent was down.
	Recover
	// Handoff stops, gracefully, a process whose make-before-break move
	// committed: its next incarnation already runs on the other node.
	Handoff
)

func (k Kind) String() string {
	return [...]string{"", "start", "stop", "fence", "resize", "finish", "recover", "handoff"}[k]
}

// Action is one step for the agent.
type Action struct {
	Kind   Kind
	ID     string
	Record *pb.ProcessRecord // the assignment, nil for Fence
}

// Reconcile returns the actions that bring local in line with assigned,
// sorted by process id, fences first. It starts nothing when mayStart is
// false (the node holds no lease), but always fences. A process that left
// by a committed make-before-break move is handed off (stopped gracefully)
// rather than fenced, but only while the node holds its lease.
func Reconcile(assigned []*pb.ProcessRecord, local []Local, mayStart bool) []Action {
	want := make(map[string]*pb.ProcessRecord, len(assigned))
	for _, r := range assigned {
		want[r.Id] = r
	}
	var out []Action
	have := make(map[string]bool, len(local))
	for _, l := range local {
		r := want[l.ID]
		if l.Done {
			if r != nil && r.Incarnation == l.Incarnation {
				have[l.ID] = true // not lost: its end is on its way to the table
			}
			continue
		}
		if r != nil && r.CutOff != nil && r.CutOff.Incarnation == l.Incarnation && r.Incarnation != l.Incarnation {
			// This node was cut off and kept this copy (on-lost keep):
			// it stops once the newer incarnation runs (or the process
			// is stopped), and says so (Record set: the agent reports).
			switch {
			case l.Stopping:
			case l.Running && !r.Stop && r.State != pb.ProcessState_PROCESS_STATE_RUNNING && !terminal(r.State):
			default:
				out = append(out, Action{Kind: Fence, ID: l.ID, Record: r})
			}
			have[l.ID] = true // held here for this copy only: nothing to start
			continue
		}
		if r == nil || r.Incarnation != l.Incarnation {
			switch {
			case l.MovingAway && l.Running && mayStart:
				if !l.Stopping {
					out = append(out, Action{Kind: Handoff, ID: l.ID})
				}
			case l.Running || l.Waiting || l.Lost:
				out = append(out, Action{Kind: Fence, ID: l.ID})
			}
			continue
		}
		have[l.ID] = true
		switch {
		case r.Stop && l.Running && !l.Stopping:
			out = append(out, Action{Kind: Stop, ID: l.ID, Record: r})
		case r.Stop && !l.Running:
			out = append(out, Action{Kind: Finish, ID: l.ID, Record: r})
		case l.Lost && mayStart:
			out = append(out, Action{Kind: Recover, ID: l.ID, Record: r})
		case l.Running && !sameResources(l.Resources, r.Spec.GetResources()):
			out = append(out, Action{Kind: Resize, ID: l.ID, Record: r})
		}
	}
	for _, r := range assigned {
		if have[r.Id] {
			continue
		}
		switch {
		case r.Stop:
			out = append(out, Action{Kind: Finish, ID: r.Id, Record: r})
		case !mayStart:
		case r.State == pb.ProcessState_PROCESS_STATE_STARTING:
			out = append(out, Action{Kind: Start, ID: r.Id, Record: r})
		case r.State == pb.ProcessState_PROCESS_STATE_RUNNING, r.State == pb.ProcessState_PROCESS_STATE_BACKOFF:
			// The table thinks it runs here, but nothing does: it died
			// while the agent was away.
			out = append(out, Action{Kind: Recover, ID: r.Id, Record: r})
		}
	}
	sort.SliceStable(out, func(i, j int) bool {
		if (out[i].Kind == Fence) != (out[j].Kind == Fence) {
			return out[i].Kind == Fence
		}
		return out[i].ID < out[j].ID
	})
	return out
}

func sameResources(a, b *pb.Resources) bool {
	return a.GetCpuMinMilli() == b.GetCpuMinMilli() && a.GetCpuMaxMilli() == b.GetCpuMaxMilli() &&
		a.GetCpuBurstMilli() == b.GetCpuBurstMilli() && a.GetMemMinBytes() == b.GetMemMinBytes() &&
		a.GetMemMaxBytes() == b.GetMemMaxBytes() && a.GetPidsMax() == b.GetPidsMax()
}

// Policy is the local restart backoff: Initial after the first failure,
// doubling up to Max, and back to Initial once a run lasted Stable.
type Policy struct {
	Initial, Max, Stable time.Duration
}

// DefaultPolicy restarts after 100 ms, doubling to at most 30 s, and forgets
// failures after a 10 s run.
var DefaultPolicy = Policy{Initial: 100 * time.Millisecond, Max: 30 * time.Second, Stable: 10 * time.Second}

// Decision is what to do after a process exits.
type Decision struct {
	Restart     bool
	Delay       time.Duration
	Consecutive int // failures in a row, carried to the next Decide
}

// Decide applies the restart policy to an exit. failed is whether the exit
// counts as a failure (non-zero code, a signal, or unknown); ranFor is how
// long the run lasted; consecutive is the previous Decision's count.
func (p Policy) Decide(policy pb.RestartPolicy, failed bool, ranFor time.Duration, consecutive int) Decision {
	restart := false
	switch policy {
	case pb.RestartPolicy_RESTART_POLICY_ALWAYS:
		restart = true
	case pb.RestartPolicy_RESTART_POLICY_NEVER:
		restart = false
	default: // on-failure
		restart = failed
	}
	if !restart {
		return Decision{}
	}
	if ranFor >= p.Stable {
		consecutive = 0
	}
	d := p.Initial
	for i := 0; i < consecutive && d < p.Max; i++ {
		d *= 2
	}
	return Decision{Restart: true, Delay: min(d, p.Max), Consecutive: consecutive + 1}
}

// terminal reports whether a process in state s has ended for good.
func terminal(s pb.ProcessState) bool {
	switch s {
	case pb.ProcessState_PROCESS_STATE_EXITED, pb.ProcessState_PROCESS_STATE_FAILED, pb.ProcessState_PROCESS_STATE_KILLED:
		return true
	}
	return false
}
