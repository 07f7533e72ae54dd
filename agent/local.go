package agent

import (
	"sync"
	"time"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/restart"
)

// What the agent knows of one process on this node, and the questions it
// asks of it. The flags record what was done to the process (a stop signal
// sent, a fence, a move committed elsewhere); the predicates below answer
// what that means, and view() gives restart.Reconcile the facts it decides
// on, as kubelet's podSyncStatus answers WorkType().

// local is the agent's view of one process.
type local struct {
	id          string
	inc         uint64
	rec         *pb.ProcessRecord
	proc        Proc
	applied     *pb.Resources // the bounds its limits derive from
	limits      *pb.Resources // the limits in force (elastic: its grant's, grow.go); nil unknown
	vmGrant     *pb.Grant     // a VM's grant in force (grow.go)
	vmMu        sync.Mutex    // one VM resize at a time
	restarts    uint32
	consecutive int
	startedAt   time.Time
	stopping    bool      // a stop signal was sent (killed, or the table stopped it)
	done        bool      // finished; its final report may not be in the table yet
	handoff     bool      // stopping after a make-before-break move: no report
	movedAway   bool      // the table says it left by a make-before-break move
	fencing     bool      // killed at once: the lease ran out, or the table moved it
	cutOff      bool      // a copy kept while cut off (on-lost keep), now stopped: its end is reported (lost.go)
	lost        *Exit     // exited while the agent was down
	timer       Timer     // a restart backoff, or the hand-off delay
	starting    bool      // the runtime is starting it
	usage       *pb.Usage // last sample
	sampledAt   time.Time
}

// running reports whether a process exists, or the runtime is starting one.
func (l *local) running() bool { return l.proc != nil || l.starting }

// waiting reports whether a timer will act on it: a restart backoff, or
// the delay before the old incarnation of a moved process is stopped.
func (l *local) waiting() bool { return l.timer != nil }

// winding reports whether it is on its way out: signalled or killed.
func (l *local) winding() bool { return l.stopping || l.fencing }

// occupied reports whether it holds or will hold the node: something runs,
// starts or waits to start again. A fence is for these.
func (l *local) occupied() bool { return l.running() || l.waiting() }

// movingAway reports whether its last assignment moves it to another node
// make-before-break (a drain, or a resize --move), or already did.
func (l *local) movingAway(node string) bool {
	return l.movedAway || (l.rec != nil && l.rec.MoveTo != "" && l.rec.MoveTo != node)
}

// view is what restart.Reconcile decides on, on the node named node.
func (l *local) view(node string) restart.Local {
	return restart.Local{
		ID: l.id, Incarnation: l.inc, Running: l.running(), Waiting: l.waiting(), Lost: l.lost != nil,
		Stopping: l.winding(), MovingAway: l.movingAway(node), Done: l.done, Resources: l.applied,
	}
}

// stopTimer cancels its timer, if any.
func (l *local) stopTimer() {
	if l.timer != nil {
		l.timer.Stop()
		l.timer = nil
	}
}
