package server

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"sync"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/table"
)

// Services: Scale, Endpoints, Services, and what kill, resize and logs do
// with a service's name (the whole service). The table keeps the count
// and replaces replicas (table/services.go); these handlers only propose.

// serviceRef returns the service that refs names, if refs is exactly one
// service's name.
func (s *Server) serviceRef(refs []string) string {
	if len(refs) != 1 || s.Table == nil {
		return ""
	}
	if s.Table.Service(refs[0]) != nil {
		return refs[0]
	}
	return ""
}

func (h *shimAPI) Scale(ctx context.Context, req *connect.Request[pb.ScaleRequest]) (*resp[pb.ScaleResponse], error) {
	s := h.s
	if s.Table == nil {
		return forward(ctx, s, func(p *peer) (*resp[pb.ScaleResponse], error) {
			return p.shim.Scale(ctx, connect.NewRequest(req.Msg))
		})
	}
	m := req.Msg
	if m.Count < 0 {
		return nil, invalid("count %d is negative", m.Count)
	}
	if m.Count > table.MaxSpawnIDs {
		return nil, invalid("count %d is more than %d", m.Count, table.MaxSpawnIDs)
	}
	if err := s.linearize(ctx); err != nil {
		return nil, err
	}
	if s.Table.Service(m.Name) == nil {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("no service %q (spawn --name %s --count N makes one)", m.Name, m.Name))
	}
	ids := make([]string, m.Count)
	for i := range ids {
		ids[i] = s.NewID()
	}
	cmd := &pb.Scale{Name: m.Name, Count: uint32(m.Count), Ids: ids}
	if m.Count == 0 {
		cmd = &pb.Scale{Name: m.Name, Remove: true}
	}
	res, err := s.apply(ctx, &pb.Command{Op: &pb.Command_Scale{Scale: cmd}})
	if err != nil {
		return nil, err
	}
	if err := s.waitIndex(ctx, res.Index); err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.ScaleResponse{Service: s.Table.Service(m.Name), Processes: s.Table.Replicas(m.Name)}), nil
}

func (h *shimAPI) Services(ctx context.Context, req *connect.Request[pb.ServicesRequest]) (*resp[pb.ServicesResponse], error) {
	s := h.s
	if s.Table == nil {
		return forward(ctx, s, func(p *peer) (*resp[pb.ServicesResponse], error) {
			return p.shim.Services(ctx, connect.NewRequest(req.Msg))
		})
	}
	if !stale(req.Msg.Consistency) {
		if err := s.linearize(ctx); err != nil {
			return nil, err
		}
	}
	return connect.NewResponse(&pb.ServicesResponse{Services: s.Table.Services()}), nil
}

func (h *shimAPI) Endpoints(ctx context.Context, req *connect.Request[pb.EndpointsRequest]) (*resp[pb.EndpointsResponse], error) {
	s := h.s
	if s.Table == nil {
		return forward(ctx, s, func(p *peer) (*resp[pb.EndpointsResponse], error) {
			return p.shim.Endpoints(ctx, connect.NewRequest(req.Msg))
		})
	}
	m := req.Msg
	if !stale(m.Consistency) {
		if err := s.linearize(ctx); err != nil {
			return nil, err
		}
	}
	if s.Table.Service(m.Name) == nil {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("no service %q", m.Name))
	}
	return connect.NewResponse(&pb.EndpointsResponse{Endpoints: Endpoints(s.Table, m.Name), Index: s.Table.Index()}), nil
}

// Endpoints lists the healthy replicas of service name in t, by replica
// index. The DNS server (dns/) answers from it too.
func Endpoints(t *table.Table, name string) []*pb.Endpoint {
	var out []*pb.Endpoint
	for _, r := range t.Replicas(name) {
		if !table.Healthy(r) {
			continue
		}
		n := t.Node(r.Node)
		if n == nil || n.State != pb.NodeState_NODE_STATE_UP {
			continue
		}
		out = append(out, &pb.Endpoint{Id: r.Id, Node: r.Node, Address: hostOf(n.ApiAddr), Replica: r.Replica, Ports: r.Ports})
	}
	return out
}

// hostOf returns the host part of addr ("127.0.0.1" of "127.0.0.1:7000").
func hostOf(addr string) string {
	if h, _, err := net.SplitHostPort(addr); err == nil {
		return h
	}
	return addr
}

// resizeService resizes every live replica of svc in place, one command
// each, and stops at the first that fails (the replicas before it keep
// the new bounds; the error says how far it got).
func (h *shimAPI) resizeService(ctx context.Context, req *connect.Request[pb.ResizeRequest], svc string) (*resp[pb.ResizeResponse], error) {
	var last *pb.ProcessRecord
	reps := h.s.Table.Replicas(svc)
	for i, r := range reps {
		if r.Stop {
			continue
		}
		sub := proto.CloneOf(req.Msg)
		sub.Id = r.Id
		sr := connect.NewRequest(sub)
		for k, v := range req.Header() {
			sr.Header()[k] = v
		}
		out, err := h.Resize(ctx, sr)
		if err != nil {
			return nil, fmt.Errorf("service %s, replica %d (%s), after %d of %d resized: %w", svc, r.Replica, r.Id, i, len(reps), err)
		}
		last = out.Msg.Process
	}
	if last == nil {
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("service %s has no live replica", svc))
	}
	return connect.NewResponse(&pb.ResizeResponse{Process: last}), nil
}

// serviceLogs streams the logs of every live replica of svc at once, each
// line prefixed with "NAME.REPLICA| ".
func (s *Server) serviceLogs(ctx context.Context, m *pb.LogsRequest, svc string, stream *connect.ServerStream[pb.LogsChunk]) error {
	reps := s.Table.Replicas(svc)
	if len(reps) == 0 {
		return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("service %s has no live replica", svc))
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var mu sync.Mutex
	send := func(b []byte) error {
		mu.Lock()
		defer mu.Unlock()
		return stream.Send(&pb.LogsChunk{Data: b})
	}
	errs := make(chan error, len(reps))
	for _, r := range reps {
		go func() {
			errs <- s.replicaLogs(ctx, m, r, fmt.Sprintf("%s.%d| ", svc, r.Replica), send)
		}()
	}
	var first error
	for range reps {
		if err := <-errs; err != nil && first == nil {
			first = err
			cancel()
		}
	}
	return first
}

// replicaLogs copies one replica's log, line by line with prefix, to send.
func (s *Server) replicaLogs(ctx context.Context, m *pb.LogsRequest, r *pb.ProcessRecord, prefix string, send func([]byte) error) error {
	owner := s.ownerAPI(r)
	if owner == "" {
		return send([]byte(prefix + "(its node is not reachable)\n"))
	}
	sub := proto.CloneOf(m)
	sub.Id = r.Id
	cs, err := s.peer(owner).shim.Logs(ctx, connect.NewRequest(sub))
	if err != nil {
		return err
	}
	defer cs.Close()
	var part []byte
	for cs.Receive() {
		part = append(part, cs.Msg().Data...)
		var out []byte
		for {
			i := bytes.IndexByte(part, '\n')
			if i < 0 {
				break
			}
			out = append(out, prefix...)
			out = append(out, part[:i+1]...)
			part = part[i+1:]
		}
		if len(out) > 0 {
			if err := send(out); err != nil {
				return err
			}
		}
	}
	if len(part) > 0 {
		if err := send(append(append([]byte(prefix), part...), '\n')); err != nil {
			return err
		}
	}
	if err := cs.Err(); err != nil && ctx.Err() == nil {
		return err
	}
	return nil
}
