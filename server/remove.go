package server

import (
	"context"
	"fmt"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/table"
)

// RemoveNode removes a node for good (`shim node rm`, admin): a server's
// Raft vote first, then its record, its processes placed elsewhere in the
// same table command. A node that is up is refused unless force: a live
// shimd removed this way registers again at its next heartbeat.
func (h *shimAPI) RemoveNode(ctx context.Context, req *connect.Request[pb.RemoveNodeRequest]) (*resp[pb.RemoveNodeResponse], error) {
	s := h.s
	name := req.Msg.GetNode()
	if name == "" {
		return nil, invalid("remove node: give a node name")
	}
	return onLeader(ctx, s, 0, func() (*resp[pb.RemoveNodeResponse], error) {
		n := s.Table.Node(name)
		if n == nil {
			return nil, apiError(fmt.Errorf("%w: %q", table.ErrUnknownNode, name))
		}
		if n.State == pb.NodeState_NODE_STATE_UP && !req.Msg.GetForce() {
			return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf(
				"node %s is up: stop its shimd first (or drain it and use --force)", name))
		}
		if n.Role == pb.NodeRole_NODE_ROLE_SERVER {
			if name == s.Name {
				return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf(
					"node %s is the leader answering: ask another server, or stop it first", name))
			}
			if err := s.Raft.RemoveServer(ctx, name); err != nil {
				return nil, apiError(fmt.Errorf("remove %s from raft: %w", name, err))
			}
		}
		res, err := s.apply(ctx, &pb.Command{Op: &pb.Command_RemoveNode{RemoveNode: &pb.RemoveNode{Name: name}}})
		if err != nil {
			return nil, err
		}
		return connect.NewResponse(&pb.RemoveNodeResponse{Moved: res.IDs}), nil
	}, func(ctx context.Context, p *peer) (*resp[pb.RemoveNodeResponse], error) {
		// The leader checks the caller's admin token itself.
		return p.shim.RemoveNode(withForward(ctx), connect.NewRequest(req.Msg))
	})
}
