package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"github.com/shim-run/shim/auth"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/table"
)

// Exec runs a command in a running process's sandbox, streaming its stdin,
// stdout and stderr. A server resolves the process (a service's name
// means its lowest running replica) and passes the stream to the process's
// node, which runs the command there (Server.ExecLocal, wired by shimd).

// ExecIO is one exec's plumbing on the process's node.
type ExecIO struct {
	Stdin          io.Reader // nil without stdin
	Stdout, Stderr io.Writer
	Resize         <-chan *pb.TermSize // terminal size changes (tty only)
}

// maxExecArgs bounds an exec's command.
const maxExecArgs = 256

func (h *shimAPI) Exec(ctx context.Context, stream *connect.BidiStream[pb.ExecInput, pb.ExecOutput]) error {
	s := h.s
	first, err := stream.Receive()
	if err != nil {
		return err
	}
	st := first.GetStart()
	if st == nil || len(st.Command) == 0 || st.Command[0] == "" {
		return invalid("exec needs a command")
	}
	if len(st.Command) > maxExecArgs {
		return invalid("exec command has more than %d arguments", maxExecArgs)
	}
	local := false
	owner := ""
	switch {
	case s.Table != nil:
		if err := s.linearize(ctx); err != nil {
			return err
		}
		rec, err := s.execTarget(st.Id)
		if err != nil {
			return err
		}
		st = proto.CloneOf(st)
		st.Id = rec.Id
		if rec.Node == s.Name {
			local = true
		} else if owner = s.ownerAPI(rec); owner == "" {
			return connect.NewError(connect.CodeUnavailable, fmt.Errorf("exec in %s: its node %s is not reachable", rec.Id, rec.Node))
		}
	case callerOf(ctx).id.Kind == auth.KindNode:
		// A server resolved it and found it here.
		if err := table.ValidateID(st.Id); err != nil {
			return apiError(err)
		}
		local = true
	default:
		if owner = firstOr(s.servers(), ""); owner == "" {
			return connect.NewError(connect.CodeUnavailable, errors.New("no server known"))
		}
	}
	if !local {
		return s.proxyExec(ctx, owner, &pb.ExecInput{Start: st}, stream)
	}
	if s.ExecLocal == nil {
		return connect.NewError(connect.CodeUnimplemented, errors.New("this node runs no exec"))
	}
	return s.runExec(ctx, st, stream)
}

// execTarget resolves ref to the running process an exec goes into.
func (s *Server) execTarget(ref string) (*pb.ProcessRecord, error) {
	if svc := s.serviceRef([]string{ref}); svc != "" {
		for _, r := range s.Table.Replicas(svc) {
			if r.State == pb.ProcessState_PROCESS_STATE_RUNNING && !r.Stop {
				return r, nil
			}
		}
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("service %s has no running replica", svc))
	}
	ids, err := s.resolve([]string{ref})
	if err != nil {
		return nil, err
	}
	var live []*pb.ProcessRecord
	for _, r := range s.records(ids) {
		if !table.Terminal(r.State) {
			live = append(live, r)
		}
	}
	if len(live) != 1 {
		return nil, invalid("%q names %d live processes; exec needs exactly one", ref, len(live))
	}
	if r := live[0]; r.State != pb.ProcessState_PROCESS_STATE_RUNNING {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("process %s is %s, not running", r.Id, table.StateName(r.State)))
	}
	return live[0], nil
}

// proxyExec passes the exec to the member at addr, both ways.
func (s *Server) proxyExec(ctx context.Context, addr string, first *pb.ExecInput, stream *connect.BidiStream[pb.ExecInput, pb.ExecOutput]) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cs := s.peer(addr).shim.Exec(ctx)
	if err := cs.Send(first); err != nil {
		return upstreamErr(cs, err)
	}
	go func() {
		for {
			in, err := stream.Receive()
			if err != nil {
				_ = cs.CloseRequest()
				return
			}
			if cs.Send(in) != nil {
				return
			}
		}
	}()
	for {
		out, err := cs.Receive()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := stream.Send(out); err != nil {
			return err
		}
	}
}

// upstreamErr is the error a failed send hides: the stream's own.
func upstreamErr(cs *connect.BidiStreamForClient[pb.ExecInput, pb.ExecOutput], err error) error {
	if _, rerr := cs.Receive(); rerr != nil && !errors.Is(rerr, io.EOF) {
		return rerr
	}
	return err
}

// runExec runs st here, feeding stdin from stream and sending output back.
func (s *Server) runExec(ctx context.Context, st *pb.ExecStart, stream *connect.BidiStream[pb.ExecInput, pb.ExecOutput]) error {
	var mu sync.Mutex
	send := func(o *pb.ExecOutput) error {
		mu.Lock()
		defer mu.Unlock()
		return stream.Send(o)
	}
	if err := send(&pb.ExecOutput{Id: st.Id}); err != nil {
		return err
	}
	pr, pw := io.Pipe()
	resize := make(chan *pb.TermSize, 4)
	go func() {
		defer close(resize)
		for {
			in, err := stream.Receive()
			if err != nil {
				pw.CloseWithError(io.EOF)
				return
			}
			if len(in.Stdin) > 0 {
				if _, err := pw.Write(in.Stdin); err != nil {
					return
				}
			}
			if in.StdinEof {
				pw.Close()
			}
			if in.Resize != nil {
				select {
				case resize <- in.Resize:
				default:
				}
			}
		}
	}()
	io := ExecIO{Stdin: pr, Resize: resize,
		Stdout: writerFunc(func(b []byte) error { return send(&pb.ExecOutput{Stdout: append([]byte(nil), b...)}) }),
		Stderr: writerFunc(func(b []byte) error { return send(&pb.ExecOutput{Stderr: append([]byte(nil), b...)}) })}
	code, err := s.ExecLocal(ctx, st, io)
	pr.Close()
	if err != nil {
		return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("exec in %s: %w", st.Id, err))
	}
	return send(&pb.ExecOutput{Exited: true, ExitCode: int32(code)})
}

type writerFunc func([]byte) error

func (f writerFunc) Write(b []byte) (int, error) {
	if err := f(b); err != nil {
		return 0, err
	}
	return len(b), nil
}
