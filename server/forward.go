package server

import (
	"context"
	"errors"
	"sync"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/table"
)

// Forwarded writes.
//
// A follower passes every write to the leader (Agent.Apply), and under
// load each of those calls costs both servers an HTTP request, which at
// thousands of single spawns a second is most of their CPU. So a follower
// keeps one forwarding call in flight at a time, as the leader keeps one
// Raft entry (batch.go): commands that arrive meanwhile go together in the
// next call, as ApplyRequest.commands. The leader puts them into its own
// queue together (commitMany) and answers each on its own
// (ApplyResponse.results): a command's table error or Raft error reaches
// its caller as a Connect error with the code and message a call of its
// own would have had, so callers retry (or give up) as before. A command
// that arrives while nothing is in flight goes on its own, in the old form.

type fwdCall struct {
	cmd  *pb.Command
	done chan fwdResult // buffered
}

type fwdResult struct {
	res table.Result
	err error
}

type forwarder struct {
	mu       sync.Mutex
	queue    []*fwdCall
	inFlight bool
}

// maxForward bounds the commands of one forwarding call.
const maxForward = 256

// forwardApply sends cmd to the leader at addr, together with whatever
// else this server is forwarding.
func (s *Server) forwardApply(ctx context.Context, addr string, cmd *pb.Command) (table.Result, error) {
	c := &fwdCall{cmd: cmd, done: make(chan fwdResult, 1)}
	f := &s.fwd
	f.mu.Lock()
	f.queue = append(f.queue, c)
	lead := !f.inFlight
	f.inFlight = true
	f.mu.Unlock()
	if lead {
		go s.forwardLoop(addr)
	}
	select {
	case r := <-c.done:
		return r.res, r.err
	case <-ctx.Done():
		return table.Result{}, connect.NewError(connect.CodeDeadlineExceeded, ctx.Err())
	}
}

// forwardLoop forwards the queue, a call at a time, until it is empty.
func (s *Server) forwardLoop(addr string) {
	f := &s.fwd
	for {
		f.mu.Lock()
		n := min(len(f.queue), maxForward)
		if n == 0 {
			f.inFlight = false
			f.mu.Unlock()
			return
		}
		calls := f.queue[:n:n]
		f.queue = f.queue[n:]
		if len(f.queue) == 0 {
			f.queue = nil
		}
		f.mu.Unlock()
		if a := s.leaderAPI(); a != "" {
			addr = a // the leader may have changed since the loop began
		}
		s.forwardCalls(addr, calls)
	}
}

// forwardCalls makes one forwarding call for calls.
func (s *Server) forwardCalls(addr string, calls []*fwdCall) {
	ctx, cancel := context.WithTimeout(context.Background(), batchTimeout)
	defer cancel()
	p := s.peer(addr).agent
	if len(calls) == 1 {
		resp, err := p.Apply(ctx, connect.NewRequest(&pb.ApplyRequest{Command: calls[0].cmd}))
		if err != nil {
			calls[0].done <- fwdResult{err: err}
			return
		}
		calls[0].done <- fwdResult{res: table.Result{IDs: resp.Msg.Ids, Index: resp.Msg.Index}}
		return
	}
	cmds := make([]*pb.Command, len(calls))
	for i, c := range calls {
		cmds[i] = c.cmd
	}
	resp, err := p.Apply(ctx, connect.NewRequest(&pb.ApplyRequest{Commands: cmds}))
	if err == nil && len(resp.Msg.Results) != len(calls) {
		err = connect.NewError(connect.CodeUnavailable, errors.New("the leader answered forwarded commands without a result each"))
	}
	if err != nil {
		for _, c := range calls {
			c.done <- fwdResult{err: err}
		}
		return
	}
	for i, c := range calls {
		r := resp.Msg.Results[i]
		if r.Code != 0 {
			c.done <- fwdResult{err: connect.NewError(connect.Code(r.Code), errors.New(r.Message))}
			continue
		}
		c.done <- fwdResult{res: table.Result{IDs: r.Ids, Index: r.Index}}
	}
}

// applyForwarded commits commands a follower forwarded together and
// answers each.
func (s *Server) applyForwarded(ctx context.Context, cmds []*pb.Command) []*pb.ApplyResult {
	out := make([]*pb.ApplyResult, len(cmds))
	var send []*pb.Command
	var at []int
	for i, c := range cmds {
		if c == nil {
			out[i] = &pb.ApplyResult{Code: int32(connect.CodeInvalidArgument), Message: "apply: empty command"}
			continue
		}
		send = append(send, c)
		at = append(at, i)
	}
	res, errs := s.commitMany(ctx, send)
	for j, i := range at {
		err := errs[j]
		if err == nil {
			err = res[j].Err
		}
		if err != nil {
			var ce *connect.Error
			if !errors.As(apiError(err), &ce) {
				ce = connect.NewError(connect.CodeUnknown, err)
			}
			out[i] = &pb.ApplyResult{Code: int32(ce.Code()), Message: ce.Message()}
			continue
		}
		out[i] = &pb.ApplyResult{Ids: res[j].IDs, Index: res[j].Index}
	}
	return out
}
