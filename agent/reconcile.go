package agent

import (
	"context"
	"slices"
	"strings"
	"syscall"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
	"github.com/shim-run/shim/restart"
	"github.com/shim-run/shim/table"
)

// The node's assignments. watch long-polls them from the servers and merges
// each answer (a full list or a delta) into the table's view; effective turns
// a make-before-break move to this node into the incarnation to start here;
// reconcileLocked asks restart.Reconcile what to do about the difference
// from what runs (local.view) and does it.

// watchLag is how long the assignments held may trail the leader's before
// the agent asks again.
const watchLag = 100 * time.Millisecond

// checkWatch compares the leader's index of the node's assignments, from a
// heartbeat, with the assignments held. A watch that has not delivered them
// within watchLag is waiting on a server that is cut off (its connection
// hangs until the long poll's end) or behind: it is asked again, from the
// address that answers.
func (a *Agent) checkWatch(nodeIndex uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if nodeIndex <= a.nodeIndex {
		a.lagSince = time.Time{}
		return
	}
	now := a.Clock.Now()
	switch {
	case a.lagSince.IsZero():
		a.lagSince = now
	case now.Sub(a.lagSince) >= watchLag:
		a.lagSince = time.Time{}
		a.Log.Warn("assignments are behind the leader's; asking again", "held", a.nodeIndex, "leader", nodeIndex)
		select {
		case a.kick <- struct{}{}:
		default:
		}
	}
}

// reconcileSoon asks for a reconcile without waiting for it. A start that
// finds its assignment changed while it ran catches up this way: a burst of
// 10,000 starts, each reconciling the whole node (O(n)), cost O(n²), 60 to
// 230 s of CPU in the burst test.
func (a *Agent) reconcileSoon() {
	select {
	case a.recon <- struct{}{}:
	default: // one is due already
	}
}

// reconciler runs the reconciles reconcileSoon asks for, one for as many
// asks as came in meanwhile.
func (a *Agent) reconciler(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.recon:
		}
		a.mu.Lock()
		a.reconcileLocked()
		a.mu.Unlock()
	}
}

// watch long-polls the node's assignments and reconciles after each change.
func (a *Agent) watch(ctx context.Context) {
	var index uint64
	backoff := 20 * time.Millisecond
	for ctx.Err() == nil {
		wctx, cancel := context.WithCancel(ctx)
		go func() {
			select {
			case <-a.kick:
				cancel()
			case <-wctx.Done():
			}
		}()
		after := index
		resp, err := call(wctx, a, 0, func(ctx context.Context, c shimv1connect.AgentServiceClient) (*connect.Response[pb.AssignmentsResponse], error) {
			return c.Assignments(ctx, connect.NewRequest(&pb.AssignmentsRequest{Node: a.Node.Name, MinIndex: after, WaitMillis: 30000, Delta: after > 0}))
		})
		kicked := wctx.Err() != nil && ctx.Err() == nil
		cancel()
		if kicked {
			index = 0
			continue
		}
		if err != nil {
			select {
			case <-ctx.Done():
			case <-a.Clock.After(backoff):
			}
			backoff = min(backoff*2, time.Second)
			continue
		}
		backoff = 20 * time.Millisecond
		index = resp.Msg.Index
		a.mergeTokens(resp.Msg)
		a.mu.Lock()
		a.merge(resp.Msg)
		a.tableIndex, a.nodeIndex = resp.Msg.TableIndex, resp.Msg.Index
		behind := a.tableIndex < a.minIndex
		a.reconcileLocked()
		a.mu.Unlock()
		if behind {
			// The server that answered has not caught up with the table
			// that granted the lease: ask again shortly rather than wait
			// for the next change to this node.
			index = 0
			select {
			case <-ctx.Done():
			case <-a.Clock.After(50 * time.Millisecond):
			}
		}
	}
}

// merge applies an answer to the assignments query: a full list, or the
// changes since the index asked for.
func (a *Agent) merge(m *pb.AssignmentsResponse) {
	if m.Full || a.table == nil {
		a.table = make(map[string]*pb.ProcessRecord, len(m.Processes))
	}
	for _, id := range m.Removed {
		delete(a.table, id)
	}
	for _, id := range m.HandedOff {
		if l := a.procs[id]; l != nil {
			l.movedAway = true
		}
	}
	for _, r := range m.Processes {
		a.table[r.Id] = r
	}
	recs := make([]*pb.ProcessRecord, 0, len(a.table))
	for _, r := range a.table {
		recs = append(recs, r)
	}
	slices.SortFunc(recs, func(x, y *pb.ProcessRecord) int { return strings.Compare(x.Id, y.Id) })
	a.assigned = a.effective(recs)
}

// effective turns the table's assignments into what this node must run: a
// process moving here (make-before-break) is its next incarnation, starting.
func (a *Agent) effective(recs []*pb.ProcessRecord) []*pb.ProcessRecord {
	out := make([]*pb.ProcessRecord, len(recs))
	for i, r := range recs {
		if r.MoveTo == a.Node.Name && r.Node != a.Node.Name {
			r = proto.CloneOf(r)
			r.Node, r.MoveTo, r.Incarnation = a.Node.Name, "", r.Incarnation+1
			r.State, r.Pid, r.Restarts = pb.ProcessState_PROCESS_STATE_STARTING, 0, 0
			if w := r.Want; w != nil {
				// This node holds the growth it moves here for.
				g := table.GrantOf(r)
				r.Grant = &pb.Grant{CpuMilli: max(g.CpuMilli, w.CpuMilli), MemBytes: max(g.MemBytes, w.MemBytes)}
				r.Want, r.WantReason = nil, ""
			}
		}
		out[i] = r
	}
	return out
}

func (a *Agent) reconcileLocked() {
	if a.tableIndex < a.minIndex {
		return // assignments from a table older than the lease's: wait (see minIndex)
	}
	for _, r := range a.assigned {
		if l := a.procs[r.Id]; l != nil && l.inc == r.Incarnation {
			l.rec = r
		}
	}
	locals := make([]restart.Local, 0, len(a.procs))
	for _, l := range a.procs {
		locals = append(locals, l.view(a.Node.Name))
	}
	defer func() {
		// Finished entries are kept only until the table has moved on.
		for id, l := range a.procs {
			if l.done && !a.assignedInc(id, l.inc) {
				delete(a.procs, id)
			}
		}
	}()
	for _, act := range restart.Reconcile(a.cutOffCopiesLocked(), locals, a.mayStartLocked()) {
		l := a.procs[act.ID]
		switch act.Kind {
		case restart.Fence:
			if c := act.Record.GetCutOff(); c != nil && c.Incarnation == l.inc {
				l.cutOff = true // lost.go: its end is reported
				a.Log.Info("cut off and kept (on-lost keep): stopping this copy now", "id", l.id, "incarnation", l.inc,
					"newer", act.Record.Incarnation, "state", table.StateName(act.Record.State))
			}
			a.fenceLocked(l, "the table moved it elsewhere")
		case restart.Stop:
			l.rec = act.Record
			l.stopping = true
			if l.proc == nil {
				continue // starting: start stops it when it is up
			}
			a.stopLocked(l, syscall.Signal(act.Record.StopSignal))
		case restart.Handoff:
			// Its next incarnation runs elsewhere: after handoffDelay,
			// stop this one as a kill would, and forget it without a
			// report.
			l.stopping, l.handoff = true, true
			l.stopTimer()
			l.timer = a.Clock.AfterFunc(handoffDelay, func() {
				a.mu.Lock()
				defer a.mu.Unlock()
				if a.procs[l.id] == l && l.proc != nil && !l.fencing {
					a.stopLocked(l, syscall.SIGTERM)
				}
			})
			a.Log.Info("moved elsewhere; stopping the old incarnation", "id", l.id, "incarnation", l.inc, "in", handoffDelay)
		case restart.Finish:
			if l == nil {
				l = &local{id: act.ID, inc: act.Record.Incarnation}
				a.procs[act.ID] = l
			}
			a.doneLocked(l)
			a.report(act.Record, pb.ProcessState_PROCESS_STATE_KILLED, 0, Exit{Code: -1, Reason: "killed"}, act.Record.Restarts)
		case restart.Resize:
			if l.proc == nil {
				continue // starting: start applies the new bounds when it is up
			}
			l.rec = act.Record
			limits := a.limitsOf(act.Record, a.grantLocked(l)) // elastic: its grant's (grow.go)
			if err := l.proc.Resize(limits); err != nil {
				a.Log.Warn("resize failed", "id", l.id, "err", err)
				continue
			}
			l.applied, l.limits = act.Record.Spec.GetResources(), limits
			a.saveState(l)
			a.Log.Info("resized in place", "id", l.id, "pid", l.proc.PID())
		case restart.Start:
			a.startLocked(act.Record, act.Record.Restarts)
		case restart.Recover:
			exit := Exit{Code: -1, Reason: "not running here: exited while shimd was down, or fenced"}
			if l != nil && l.lost != nil {
				exit = *l.lost
			}
			if l == nil {
				l = &local{id: act.ID, inc: act.Record.Incarnation, restarts: act.Record.Restarts}
				a.procs[act.ID] = l
			}
			l.rec, l.lost = act.Record, nil
			a.exitedLocked(l, exit)
		}
	}
	a.applyGrantsLocked() // new grants: limits follow (grow.go)
}

// stopLocked sends l's process sig (SIGTERM when 0), and SIGKILL once the
// stop grace period is over.
func (a *Agent) stopLocked(l *local, sig syscall.Signal) {
	if sig == 0 {
		sig = syscall.SIGTERM
	}
	l.stopTimer()
	if err := l.proc.Signal(sig); err != nil {
		a.Log.Warn("stop: signal failed; killing", "id", l.id, "err", err)
		_ = l.proc.Kill()
		return
	}
	if sig == syscall.SIGKILL {
		return
	}
	p := l.proc
	a.Clock.AfterFunc(a.StopGrace, func() {
		select {
		case <-p.Done():
		default:
			a.Log.Info("stop: grace period over; killing", "id", l.id)
			_ = p.Kill()
		}
	})
}
