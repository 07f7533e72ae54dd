package agent

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

// Reports never drop. The latest status of each process incarnation waits
// in a locked map until a server has acknowledged it, and a one-slot channel
// kicks the sender, as Nomad's allocSync and kubelet's status manager do. A
// newer status of the same incarnation replaces the one waiting, so a burst
// of starts and exits costs one entry per incarnation, never a queue slot:
// the map is bounded by the processes the node runs, not by a buffer size.
//
// The sender takes the oldest entries (up to reportBatch), sends them in one
// Report, and removes each only if the servers acknowledged it and nothing
// newer replaced it meanwhile. A failed send keeps them all, and is retried
// after reportRetry.

// reportBatch is the most updates one Report carries.
const reportBatch = 2048

// reportRetry is how long the sender waits after a failed send.
const reportRetry = 100 * time.Millisecond

// reportKey names one incarnation of a process.
type reportKey struct {
	id  string
	inc uint64
}

// pendingReport is an update that waits for an acknowledgement; seq orders
// updates by arrival.
type pendingReport struct {
	u   *pb.StatusUpdate
	seq uint64
}

// reporter holds the updates no server has acknowledged yet, and sends them.
type reporter struct {
	send  func(ctx context.Context, batch []*pb.StatusUpdate) error
	clock Clock
	log   *slog.Logger

	mu      sync.Mutex
	pending map[reportKey]pendingReport
	seq     uint64
	kick    chan struct{}
}

func newReporter(send func(context.Context, []*pb.StatusUpdate) error, clock Clock, log *slog.Logger) *reporter {
	return &reporter{send: send, clock: clock, log: log, pending: map[reportKey]pendingReport{}, kick: make(chan struct{}, 1)}
}

// put keeps u as the latest status of its incarnation and wakes the sender.
func (r *reporter) put(u *pb.StatusUpdate) {
	r.mu.Lock()
	r.seq++
	r.pending[reportKey{u.Id, u.Incarnation}] = pendingReport{u: u, seq: r.seq}
	r.mu.Unlock()
	select {
	case r.kick <- struct{}{}:
	default: // a kick is already waiting: the sender takes this one too
	}
}

// batch returns up to n of the waiting updates, oldest first.
func (r *reporter) batch(n int) []pendingReport {
	r.mu.Lock()
	out := make([]pendingReport, 0, len(r.pending))
	for _, p := range r.pending {
		out = append(out, p)
	}
	r.mu.Unlock()
	slices.SortFunc(out, func(x, y pendingReport) int { return cmp.Compare(x.seq, y.seq) })
	return out[:min(n, len(out))]
}

// acked removes the updates of a batch the servers acknowledged, except
// those replaced by a newer status meanwhile: that one is still to send.
func (r *reporter) acked(batch []pendingReport) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, p := range batch {
		k := reportKey{p.u.Id, p.u.Incarnation}
		if r.pending[k].seq == p.seq {
			delete(r.pending, k)
		}
	}
}

// waiting returns how many updates wait for an acknowledgement.
func (r *reporter) waiting() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.pending)
}

// run sends what waits, whenever something does, until ctx ends; then it
// tries once more, briefly, so that a clean stop keeps the last exits.
func (r *reporter) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			fctx, cancel := context.WithTimeout(context.Background(), time.Second)
			_ = r.flush(fctx)
			cancel()
			return
		case <-r.kick:
		}
		for r.flush(ctx) != nil {
			select {
			case <-ctx.Done():
			case <-r.clock.After(reportRetry):
			}
			if ctx.Err() != nil {
				break
			}
		}
	}
}

// flush sends every waiting update, a batch at a time, until none waits or a
// send fails.
func (r *reporter) flush(ctx context.Context) error {
	for {
		b := r.batch(reportBatch)
		if len(b) == 0 {
			return nil
		}
		ups := make([]*pb.StatusUpdate, len(b))
		for i, p := range b {
			ups[i] = p.u
		}
		if err := r.send(ctx, ups); err != nil {
			r.log.Debug("report failed; retrying", "updates", len(ups), "waiting", r.waiting(), "err", err)
			return err
		}
		r.acked(b)
	}
}

// sendReport sends one batch of updates to the servers.
func (a *Agent) sendReport(ctx context.Context, batch []*pb.StatusUpdate) error {
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err := call(rctx, a, 2*time.Second, func(ctx context.Context, c shimv1connect.AgentServiceClient) (*connect.Response[pb.ReportResponse], error) {
		return c.Report(ctx, connect.NewRequest(&pb.ReportRequest{Report: &pb.Report{Node: a.Node.Name, Updates: batch}}))
	})
	return err
}

func (a *Agent) report(rec *pb.ProcessRecord, state pb.ProcessState, pid int64, exit Exit, restarts uint32) {
	// The runtime's plain "exited" or "signaled" says less than the code or
	// the signal does; its other reasons (killed, oom-killed, unknown) say
	// more.
	reason := exit.Reason
	if d := describe(exit); d != "" && (reason == "" || reason == "exited" || reason == "signaled") {
		reason = d
	}
	a.reports.put(&pb.StatusUpdate{Id: rec.Id, Incarnation: rec.Incarnation, State: state, Pid: pid,
		ExitCode: int32(exit.Code), Reason: reason, Restarts: restarts, AtUnixNano: a.Clock.Now().UnixNano()})
}

func describe(e Exit) string {
	switch {
	case e.OOMKilled:
		return "oom-killed"
	case e.Signal != "":
		return "signal: " + e.Signal
	case e.Code > 0:
		return fmt.Sprintf("exit status %d", e.Code)
	}
	return ""
}

func (a *Agent) reportRunning(l *local) {
	a.reports.put(&pb.StatusUpdate{Id: l.id, Incarnation: l.inc, State: pb.ProcessState_PROCESS_STATE_RUNNING,
		Pid: int64(l.proc.PID()), StartTime: l.proc.StartTime(), Restarts: l.restarts, AtUnixNano: a.Clock.Now().UnixNano()})
}
