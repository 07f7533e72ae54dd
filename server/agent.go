package server

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"github.com/shim-run/shim/auth"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
	"github.com/shim-run/shim/table"
)

// agentAPI implements AgentService, spoken by node agents and servers.
type agentAPI struct {
	shimv1connect.UnimplementedAgentServiceHandler // calls not built yet answer unimplemented
	s                                              *Server
}

// onLeader runs local on the leader; elsewhere it calls remote on the leader
// (servers) or on any server (workers), retrying while there is no leader.
//
// attempt, if set, bounds each remote try, so that a call stuck on a leader
// that is gone gives way to a try on its successor.
func onLeader[T any](ctx context.Context, s *Server, attempt time.Duration, local func() (T, error), remote func(ctx context.Context, p *peer) (T, error)) (T, error) {
	if s.Table == nil {
		return forward(ctx, s, func(p *peer) (T, error) { return remote(ctx, p) })
	}
	var zero T
	backoff := 5 * time.Millisecond
	for {
		if s.Raft.IsLeader() {
			return local()
		}
		if addr := s.leaderAPI(); addr != "" {
			actx, cancel := ctx, context.CancelFunc(func() {})
			if attempt > 0 {
				actx, cancel = context.WithTimeout(ctx, attempt)
			}
			v, err := remote(actx, s.peer(addr))
			cancel()
			if err == nil || (!retryable(err) && connect.CodeOf(err) != connect.CodeDeadlineExceeded) {
				return v, err
			}
		} else if id, _ := s.Raft.Leader(); id != "" {
			return zero, s.leaderUnknown(id)
		}
		select {
		case <-ctx.Done():
			return zero, apiError(errors.Join(ErrNoLeader, ctx.Err()))
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 100*time.Millisecond)
	}
}

func (h *agentAPI) Join(ctx context.Context, req *connect.Request[pb.JoinRequest]) (*resp[pb.JoinResponse], error) {
	s := h.s
	n := req.Msg.Node
	if n == nil || n.Name == "" {
		return nil, invalid("join: node has no name")
	}
	if err := table.ValidateName(n.Name); err != nil {
		return nil, apiError(err)
	}
	if n.Role == pb.NodeRole_NODE_ROLE_SERVER && n.RaftAddr == "" {
		return nil, invalid("join: server %s has no raft address", n.Name)
	}
	if err := checkJoin(ctx, n); err != nil {
		return nil, err
	}
	return onLeader(ctx, s, 0, func() (*resp[pb.JoinResponse], error) {
		if n.Role == pb.NodeRole_NODE_ROLE_SERVER {
			if err := s.probeRaft(ctx, n.Name, n.RaftAddr); err != nil {
				return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("join %s: %w", n.Name, err))
			}
			if err := s.Raft.AddVoter(ctx, n.Name, n.RaftAddr); err != nil {
				return nil, apiError(fmt.Errorf("join %s: add voter: %w", n.Name, err))
			}
		}
		if _, err := s.apply(ctx, &pb.Command{Op: &pb.Command_RegisterNode{RegisterNode: &pb.RegisterNode{Node: n}}}); err != nil {
			return nil, err
		}
		s.leases.renew(n.Name, s.Now())
		s.Log.Info("node joined", "node", n.Name, "role", n.Role, "api", n.ApiAddr)
		return connect.NewResponse(&pb.JoinResponse{Servers: s.serverAPIs()}), nil
	}, func(ctx context.Context, p *peer) (*resp[pb.JoinResponse], error) {
		return p.agent.Join(ctx, connect.NewRequest(req.Msg))
	})
}

// checkJoin lets a node join only under the name and role of its own
// certificate. A server passing on another node's join checked it there.
func checkJoin(ctx context.Context, n *pb.NodeRecord) error {
	id := callerOf(ctx).id
	if id.Kind != auth.KindNode || id.Node != n.Name {
		return actsFor(ctx, n.Name)
	}
	want := auth.RoleWorker
	if n.Role == pb.NodeRole_NODE_ROLE_SERVER {
		want = auth.RoleServer
	}
	if id.Role != want {
		return authError(fmt.Errorf("%w: %s may not join as a %s", auth.ErrPermissionDenied, id, want))
	}
	return nil
}

// serverAPIs lists the API addresses of the server nodes.
func (s *Server) serverAPIs() []string {
	var out []string
	for _, n := range s.Table.ServerRecords() {
		if n.State == pb.NodeState_NODE_STATE_UP {
			out = append(out, n.ApiAddr)
		}
	}
	return out
}

func (h *agentAPI) Leave(ctx context.Context, req *connect.Request[pb.LeaveRequest]) (*resp[pb.LeaveResponse], error) {
	s := h.s
	name := req.Msg.Name
	if err := actsFor(ctx, name); err != nil {
		return nil, err
	}
	return onLeader(ctx, s, 0, func() (*resp[pb.LeaveResponse], error) {
		n := s.Table.Node(name)
		if n == nil {
			return nil, apiError(fmt.Errorf("%w: %q", table.ErrUnknownNode, name))
		}
		if n.Role == pb.NodeRole_NODE_ROLE_SERVER {
			if err := s.Raft.RemoveServer(ctx, name); err != nil {
				return nil, apiError(fmt.Errorf("leave %s: %w", name, err))
			}
		}
		_, err := s.apply(ctx, &pb.Command{Op: &pb.Command_SetNodeState{SetNodeState: &pb.SetNodeState{
			Name: name, State: pb.NodeState_NODE_STATE_LEFT}}})
		if err != nil {
			return nil, err
		}
		return connect.NewResponse(&pb.LeaveResponse{}), nil
	}, func(ctx context.Context, p *peer) (*resp[pb.LeaveResponse], error) {
		return p.agent.Leave(ctx, connect.NewRequest(req.Msg))
	})
}

// Heartbeat renews a node's lease. Only the leader grants leases.
func (h *agentAPI) Heartbeat(ctx context.Context, req *connect.Request[pb.HeartbeatRequest]) (*resp[pb.HeartbeatResponse], error) {
	s := h.s
	if err := actsFor(ctx, req.Msg.Node); err != nil {
		return nil, err
	}
	return onLeader(ctx, s, 200*time.Millisecond, func() (*resp[pb.HeartbeatResponse], error) {
		out, err := s.heartbeat(ctx, req.Msg)
		if err != nil {
			return nil, err
		}
		return connect.NewResponse(out), nil
	}, func(ctx context.Context, p *peer) (*resp[pb.HeartbeatResponse], error) {
		return p.agent.Heartbeat(ctx, connect.NewRequest(req.Msg))
	})
}

// heartbeat renews a node's lease on the leader: the unary call and the
// heartbeat stream (stream.go) both come here.
func (s *Server) heartbeat(ctx context.Context, m *pb.HeartbeatRequest) (*pb.HeartbeatResponse, error) {
	name := m.Node
	now := s.Now()
	n := s.Table.Node(name)
	out := &pb.HeartbeatResponse{LeaseMillis: s.Lease.Milliseconds()}
	if n == nil {
		out.Index = s.Table.Index()
		return out, nil
	}
	s.leases.renew(name, now)
	s.Metrics.Heartbeats.Inc()
	if h := m.HoldMillis; h > 0 {
		until := now.Add(time.Duration(h) * time.Millisecond)
		if _, err := s.apply(ctx, &pb.Command{Op: &pb.Command_Hold{Hold: &pb.Hold{
			Name: name, UntilUnixNano: until.UnixNano()}}}); err != nil {
			return nil, err
		}
		s.Log.Info("node is restarting; holding its lease", "node", name, "until", until)
	}
	if n.State != pb.NodeState_NODE_STATE_UP {
		if _, err := s.apply(ctx, &pb.Command{Op: &pb.Command_SetNodeState{SetNodeState: &pb.SetNodeState{
			Name: name, State: pb.NodeState_NODE_STATE_UP}}}); err != nil {
			return nil, err
		}
		s.Log.Info("node is back up", "node", name)
		n = s.Table.Node(name)
	}
	out.Known, out.State, out.Index = true, n.State, s.Table.Index()
	out.NodeIndex = s.Table.NodeIndex(name) // lets the agent notice a stuck assignments query
	out.Servers = s.serverAPIs()
	return out, nil
}

// forwardedHeader marks an assignments query a follower passed on to the
// leader: it is answered where it lands, never passed on again.
const forwardedHeader = "Shim-Forwarded"

// Assignments is a blocking query for a node's processes.
func (h *agentAPI) Assignments(ctx context.Context, req *connect.Request[pb.AssignmentsRequest]) (*resp[pb.AssignmentsResponse], error) {
	s := h.s
	if err := actsFor(ctx, req.Msg.Node); err != nil {
		return nil, err
	}
	if s.Table == nil {
		return forward(ctx, s, func(p *peer) (*resp[pb.AssignmentsResponse], error) {
			return p.agent.Assignments(ctx, connect.NewRequest(req.Msg))
		})
	}
	m := req.Msg
	wctx, cancel := context.WithTimeout(ctx, waitFor(m.WaitMillis))
	defer cancel()
	go func() { // the wait also ends when this server stops
		select {
		case <-s.closed:
			cancel()
		case <-wctx.Done():
		}
	}()
	// A follower passes the long poll on to the leader, whose table holds
	// every commit first: a follower learns of a commit only with the
	// leader's next message, milliseconds later, and new work would wait
	// that long. If the leader cannot be reached, the follower answers from
	// its own replica (the agent checks that it is new enough).
	if req.Header().Get(forwardedHeader) == "" && !s.Raft.IsLeader() {
		if addr := s.leaderAPI(); addr != "" {
			freq := connect.NewRequest(m)
			freq.Header().Set(forwardedHeader, "1")
			resp, err := s.peer(addr).agent.Assignments(wctx, freq)
			if err == nil {
				return resp, nil
			}
			if ctx.Err() != nil {
				return nil, apiError(ctx.Err())
			}
		}
	}
	for {
		ch := s.Watch.Node(m.Node)
		if m.MinIndex == 0 || s.Table.NodeIndex(m.Node) > m.MinIndex {
			break
		}
		select {
		case <-wctx.Done():
			if ctx.Err() != nil {
				return nil, apiError(ctx.Err())
			}
		case <-ch:
			continue
		}
		break
	}
	since := uint64(0)
	if m.Delta {
		since = m.MinIndex
	}
	recs, removed, full, idx := s.Table.AssignmentsSince(m.Node, since)
	out := &pb.AssignmentsResponse{Processes: recs, Removed: removed, Full: full, Index: idx, TableIndex: s.Table.Index()}
	if len(removed) > 0 {
		out.HandedOff = s.Table.HandedOff(m.Node, since)
	}
	out.SelfTokens = s.selfTokens(m.Node, recs)
	if n := s.Table.Node(m.Node); n != nil {
		out.State = n.State
	}
	return connect.NewResponse(out), nil
}

func (h *agentAPI) Report(ctx context.Context, req *connect.Request[pb.ReportRequest]) (*resp[pb.ReportResponse], error) {
	s := h.s
	if err := actsFor(ctx, req.Msg.Report.GetNode()); err != nil {
		return nil, err
	}
	if s.Table == nil {
		return forward(ctx, s, func(p *peer) (*resp[pb.ReportResponse], error) {
			return p.agent.Report(ctx, connect.NewRequest(req.Msg))
		})
	}
	if req.Msg.Report == nil || req.Msg.Report.Node == "" {
		return nil, invalid("report without a node")
	}
	if _, err := s.apply(ctx, &pb.Command{Op: &pb.Command_Report{Report: req.Msg.Report}}); err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.ReportResponse{}), nil
}

// Apply commits a command forwarded by a follower. Only the leader answers.
func (h *agentAPI) Apply(ctx context.Context, req *connect.Request[pb.ApplyRequest]) (*resp[pb.ApplyResponse], error) {
	s := h.s
	if s.Raft == nil || !s.Raft.IsLeader() {
		return nil, connect.NewError(connect.CodeUnavailable, errors.New("not the leader"))
	}
	if req.Msg.Command == nil {
		return nil, invalid("apply: empty command")
	}
	res, err := s.commit(ctx, req.Msg.Command)
	if err != nil {
		return nil, apiError(err)
	}
	if res.Err != nil {
		return nil, apiError(res.Err)
	}
	return connect.NewResponse(&pb.ApplyResponse{Ids: res.IDs, Index: res.Index}), nil
}

// Usage answers for this node's own processes.
func (h *agentAPI) Usage(ctx context.Context, req *connect.Request[pb.UsageRequest]) (*resp[pb.UsageResponse], error) {
	out := &pb.UsageResponse{}
	if h.s.UsageOf != nil {
		out.Usage = h.s.UsageOf(req.Msg.Ids, req.Msg.Fresh)
	}
	return connect.NewResponse(out), nil
}

// usage asks the nodes holding recs for their use, in parallel, and returns
// copies of recs with Usage filled in where a node answered in time. Nodes
// answer from their last sample (a few seconds old at most) unless fresh is
// set, so listing a large table costs them nothing.
func (s *Server) usage(ctx context.Context, recs []*pb.ProcessRecord, fresh bool) []*pb.ProcessRecord {
	byNode := map[string][]string{}
	for _, r := range recs {
		if r.Node != "" && !table.Terminal(r.State) {
			byNode[r.Node] = append(byNode[r.Node], r.Id)
		}
	}
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	var mu sync.Mutex
	got := map[string]*pb.Usage{}
	var wg sync.WaitGroup
	for node, ids := range byNode {
		n := s.Table.Node(node)
		if n == nil || n.State != pb.NodeState_NODE_STATE_UP || n.ApiAddr == "" {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := s.peer(n.ApiAddr).agent.Usage(ctx, connect.NewRequest(&pb.UsageRequest{Ids: ids, Fresh: fresh}))
			if err != nil {
				return
			}
			mu.Lock()
			for id, u := range resp.Msg.Usage {
				got[id] = u
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	out := make([]*pb.ProcessRecord, len(recs))
	for i, r := range recs {
		if u := got[r.Id]; u != nil {
			r = proto.CloneOf(r)
			r.Usage = u
		}
		out[i] = r
	}
	return out
}
