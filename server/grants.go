package server

import (
	"context"
	"fmt"

	"connectrpc.com/connect"

	"github.com/shim-run/shim/auth"
	pb "github.com/shim-run/shim/proto/shimv1"
)

// SetGrant: a process's grant changes (table/grants.go). Its callers are the
// node that runs it (its growth loop, with the node's certificate, only for
// its own processes), the workload itself (its self token, only its own
// grant), and users with an operator or admin token (`shim grant`). One
// table command, which grants at once what the node holds and makes room
// for the rest; the answer is the record as committed: its grant, and the
// growth still waiting (want, want_reason).

func (h *shimAPI) SetGrant(ctx context.Context, req *connect.Request[pb.SetGrantRequest]) (*resp[pb.SetGrantResponse], error) {
	s := h.s
	if s.Table == nil {
		return forward(ctx, s, func(p *peer) (*resp[pb.SetGrantResponse], error) {
			return p.shim.SetGrant(ctx, connect.NewRequest(req.Msg))
		})
	}
	m := req.Msg
	if m.Grant == nil || (m.Grant.CpuMilli == 0 && m.Grant.MemBytes == 0) {
		return nil, invalid("set grant of %q needs a cpu or memory grant", m.Id)
	}
	if err := ownOnly(ctx, m.Id); err != nil {
		return nil, err
	}
	if err := s.linearize(ctx); err != nil {
		return nil, err
	}
	ids, err := s.resolve([]string{m.Id})
	if err != nil {
		return nil, err
	}
	if len(ids) != 1 {
		return nil, invalid("%q names %d processes; set one grant at a time", m.Id, len(ids))
	}
	rec := s.Table.Get(ids[0])
	by, err := granter(callerOf(ctx).id, rec)
	if err != nil {
		return nil, err
	}
	res, err := s.apply(ctx, &pb.Command{Op: &pb.Command_SetGrant{SetGrant: &pb.SetGrant{
		Id: rec.Id, Incarnation: m.Incarnation, Grant: m.Grant, Reason: m.Reason, By: by}}})
	if err != nil {
		return nil, err
	}
	if err := s.waitIndex(ctx, res.Index); err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.SetGrantResponse{Process: s.Table.Get(rec.Id)}), nil
}

// granter checks that id may set rec's grant, and says who asks: a node
// only for the processes it runs (a server certificate, which commits
// anything anyway, for any), a workload only for itself, a user token for
// any process, nobody else.
func granter(id auth.Identity, rec *pb.ProcessRecord) (string, error) {
	switch id.Kind {
	case auth.KindNode:
		if err := auth.ActsFor(id, rec.Node); err != nil || rec.Node == "" {
			return "", authError(fmt.Errorf("%w: %s may set the grants of its own processes only, and %s runs on %q",
				auth.ErrPermissionDenied, id, rec.Id, rec.Node))
		}
		return "node " + id.Node, nil
	case auth.KindToken:
		return "token " + id.TokenID, nil
	case auth.KindWorkload:
		if err := auth.OwnProcess(id, rec.Id); err != nil {
			return "", authError(err)
		}
		return "self", nil
	case auth.KindSelf:
		return "user", nil // trust is off
	}
	return "", authError(fmt.Errorf("%w: %s may not set grants", auth.ErrPermissionDenied, id))
}
