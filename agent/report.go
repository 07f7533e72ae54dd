package agent

import (
	"context"
	"fmt"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

func (a *Agent) report(rec *pb.ProcessRecord, state pb.ProcessState, pid int64, exit Exit, restarts uint32) {
	// The runtime's plain "exited" or "signaled" says less than the code or
	// the signal does; its other reasons (killed, oom-killed, unknown) say
	// more.
	reason := exit.Reason
	if d := describe(exit); d != "" && (reason == "" || reason == "exited" || reason == "signaled") {
		reason = d
	}
	a.queue(&pb.StatusUpdate{Id: rec.Id, Incarnation: rec.Incarnation, State: state, Pid: pid,
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
	a.queue(&pb.StatusUpdate{Id: l.id, Incarnation: l.inc, State: pb.ProcessState_PROCESS_STATE_RUNNING,
		Pid: int64(l.proc.PID()), StartTime: l.proc.StartTime(), Restarts: l.restarts, AtUnixNano: a.Clock.Now().UnixNano()})
}

func (a *Agent) queue(u *pb.StatusUpdate) {
	select {
	case a.reports <- u:
	default:
		a.Log.Warn("report queue full; dropping", "id", u.Id)
	}
}

// reporter sends status updates in batches; the latest update of each
// process wins, and failed batches are retried.
func (a *Agent) reporter(ctx context.Context) {
	pending := map[string]*pb.StatusUpdate{}
	var order []string
	add := func(u *pb.StatusUpdate) {
		if _, ok := pending[u.Id]; !ok {
			order = append(order, u.Id)
		}
		pending[u.Id] = u
	}
	for {
		if len(pending) == 0 {
			select {
			case <-ctx.Done():
				return
			case u := <-a.reports:
				add(u)
			}
		}
	drain:
		for len(pending) < 2048 {
			select {
			case u := <-a.reports:
				add(u)
			default:
				break drain
			}
		}
		batch := make([]*pb.StatusUpdate, 0, len(order))
		for _, id := range order {
			batch = append(batch, pending[id])
		}
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := call(rctx, a, 2*time.Second, func(ctx context.Context, c shimv1connect.AgentServiceClient) (*connect.Response[pb.ReportResponse], error) {
			return c.Report(ctx, connect.NewRequest(&pb.ReportRequest{Report: &pb.Report{Node: a.Node.Name, Updates: batch}}))
		})
		cancel()
		if err != nil {
			a.Log.Debug("report failed; retrying", "err", err)
			select {
			case <-ctx.Done():
				return
			case <-a.Clock.After(100 * time.Millisecond):
			}
			continue
		}
		for _, u := range batch {
			if pending[u.Id] == u {
				delete(pending, u.Id)
			}
		}
		order = order[:0]
		for id := range pending {
			order = append(order, id)
		}
	}
}
