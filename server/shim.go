package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"github.com/shim-run/shim/auth"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
	"github.com/shim-run/shim/table"
)

// shimAPI implements ShimService.
type shimAPI struct {
	shimv1connect.UnimplementedShimServiceHandler // calls not built yet answer unimplemented
	s                                             *Server
}

type resp[T any] = connect.Response[T]

func (h *shimAPI) Spawn(ctx context.Context, req *connect.Request[pb.SpawnRequest]) (*resp[pb.SpawnResponse], error) {
	s := h.s
	if s.Table == nil {
		return forward(ctx, s, func(p *peer) (*resp[pb.SpawnResponse], error) {
			return p.shim.Spawn(ctx, connect.NewRequest(req.Msg))
		})
	}
	m := req.Msg
	if err := table.ValidateSpec(m.Spec); err != nil {
		return nil, apiError(err)
	}
	if err := checkSpawn(ctx, m.Spec); err != nil {
		return nil, err
	}
	n := max(int(m.Count), 1)
	if n > table.MaxSpawnIDs {
		return nil, invalid("count %d is more than %d", n, table.MaxSpawnIDs)
	}
	if err := checkSpawnSize(m.Spec, n); err != nil {
		return nil, err
	}
	if m.RequestId != "" {
		if err := table.ValidateRequestID(m.RequestId); err != nil {
			return nil, apiError(err)
		}
	}
	ids := make([]string, n)
	for i := range ids {
		ids[i] = s.NewID()
	}
	res, err := s.apply(ctx, &pb.Command{Op: &pb.Command_Spawn{Spawn: &pb.Spawn{Ids: ids, Spec: m.Spec, RequestId: m.RequestId, Force: m.Force,
		Service: m.Service, Min: m.Min, Max: m.Max}}})
	if err != nil {
		return nil, err
	}
	if len(res.IDs) > 0 {
		ids = res.IDs // a retried request: the processes its first spawn made
	}
	s.Metrics.Placements.Add(float64(len(ids)))
	if err := s.waitIndex(ctx, res.Index); err != nil {
		return nil, err
	}
	if m.Wait {
		if err := s.waitStarted(ctx, ids); err != nil {
			return nil, err
		}
	}
	return connect.NewResponse(&pb.SpawnResponse{Processes: s.records(ids)}), nil
}

// waitStarted blocks until every process has been running or finished. A
// process seen started is not looked at again, so waiting for n processes
// costs O(n) over all wake-ups, not O(n) per wake-up.
func (s *Server) waitStarted(ctx context.Context, ids []string) error {
	for {
		ch := s.Watch.Any()
		for len(ids) > 0 {
			r := s.Table.Get(ids[0])
			if r != nil && r.State != pb.ProcessState_PROCESS_STATE_RUNNING && !table.Terminal(r.State) {
				break
			}
			ids = ids[1:]
		}
		if len(ids) == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return apiError(fmt.Errorf("waiting for processes to start: %w", ctx.Err()))
		case <-ch:
		}
	}
}

func (s *Server) records(ids []string) []*pb.ProcessRecord {
	out := make([]*pb.ProcessRecord, 0, len(ids))
	for _, id := range ids {
		if r := s.Table.Get(id); r != nil {
			out = append(out, r)
		}
	}
	return out
}

// resolve turns user references (id, id prefix or name) into ids.
func (s *Server) resolve(refs []string) ([]string, error) {
	var ids []string
	seen := map[string]bool{}
	for _, ref := range refs {
		got, err := s.Table.Resolve(ref)
		if err != nil {
			return nil, apiError(err)
		}
		for _, id := range got {
			if !seen[id] {
				seen[id] = true
				ids = append(ids, id)
			}
		}
	}
	return ids, nil
}

func (h *shimAPI) Kill(ctx context.Context, req *connect.Request[pb.KillRequest]) (*resp[pb.KillResponse], error) {
	s := h.s
	if s.Table == nil {
		return forward(ctx, s, func(p *peer) (*resp[pb.KillResponse], error) {
			return p.shim.Kill(ctx, connect.NewRequest(req.Msg))
		})
	}
	if len(req.Msg.Ids) == 0 {
		return nil, invalid("kill needs at least one process id")
	}
	if err := s.linearize(ctx); err != nil {
		return nil, err
	}
	ids, err := s.resolve(req.Msg.Ids)
	if err != nil {
		return nil, err
	}
	sig := req.Msg.Signal
	if sig == 0 {
		sig = 15
	}
	if svc := s.serviceRef(req.Msg.Ids); svc != "" {
		// The whole service: stop every replica and forget it.
		ids = nil
		for _, r := range s.Table.Replicas(svc) {
			ids = append(ids, r.Id)
		}
		res, err := s.apply(ctx, &pb.Command{Op: &pb.Command_Scale{Scale: &pb.Scale{Name: svc, Remove: true}}})
		if err != nil {
			return nil, err
		}
		if err := s.waitIndex(ctx, res.Index); err != nil {
			return nil, err
		}
		return connect.NewResponse(&pb.KillResponse{Processes: s.records(ids)}), nil
	}
	res, err := s.apply(ctx, &pb.Command{Op: &pb.Command_Kill{Kill: &pb.Kill{Ids: ids, Signal: sig}}})
	if err != nil {
		return nil, err
	}
	if err := s.waitIndex(ctx, res.Index); err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.KillResponse{Processes: s.records(ids)}), nil
}

func (h *shimAPI) Resize(ctx context.Context, req *connect.Request[pb.ResizeRequest]) (*resp[pb.ResizeResponse], error) {
	s := h.s
	if s.Table == nil {
		return forward(ctx, s, func(p *peer) (*resp[pb.ResizeResponse], error) {
			return p.shim.Resize(ctx, connect.NewRequest(req.Msg))
		})
	}
	m := req.Msg
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
	if svc := s.serviceRef([]string{m.Id}); svc != "" {
		return h.resizeService(ctx, req, svc)
	}
	if len(ids) != 1 {
		return nil, invalid("%q names %d processes; resize one at a time", m.Id, len(ids))
	}
	cur := s.Table.Get(ids[0])
	r, err := mergeResources(cur.Spec.GetResources(), m.Resources, m.Clear)
	if err != nil {
		return nil, err
	}
	if err := table.ValidateResources(r); err != nil {
		return nil, apiError(err)
	}
	if err := checkSelfResize(ctx, m, cur.Spec.GetResources(), r); err != nil {
		return nil, err
	}
	if err := checkVMResize(cur, r); err != nil {
		return nil, err
	}
	if !m.Force {
		if err := s.checkShrink(ctx, cur, r); err != nil {
			return nil, err
		}
	}
	// One command: in place if the node can hold r, else (with move) a
	// make-before-break move to a node that can; see table's resize.
	res, err := s.apply(ctx, &pb.Command{Op: &pb.Command_Resize{Resize: &pb.Resize{Id: ids[0], Resources: r, Move: m.Move}}})
	var ce *connect.Error
	if !m.Move && errors.As(err, &ce) && ce.Code() == connect.CodeResourceExhausted {
		return nil, connect.NewError(ce.Code(), fmt.Errorf("%s (resize --move moves it to a node that can)", ce.Message()))
	}
	if err != nil {
		return nil, err
	}
	if err := s.waitIndex(ctx, res.Index); err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.ResizeResponse{Process: s.Table.Get(ids[0])}), nil
}

// checkShrink refuses a new maximum below what the process uses now.
func (s *Server) checkShrink(ctx context.Context, cur *pb.ProcessRecord, r *pb.Resources) error {
	u := s.usage(ctx, []*pb.ProcessRecord{cur}, true)[0].Usage
	if u == nil {
		return nil
	}
	if r.MemMaxBytes > 0 && int64(u.MemoryBytes) > r.MemMaxBytes {
		return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf(
			"memory max %s is below current use %s of %s; pass --force to shrink anyway",
			table.Bytes(r.MemMaxBytes), table.Bytes(int64(u.MemoryBytes)), cur.Id))
	}
	if r.CpuMaxMilli > 0 && u.CpuMilli > r.CpuMaxMilli {
		return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf(
			"cpu max %s is below current use %s of %s; pass --force to shrink anyway",
			table.Cores(r.CpuMaxMilli), table.Cores(u.CpuMilli), cur.Id))
	}
	return nil
}

// mergeResources overlays the non-zero fields of upd on cur, then resets the
// fields named in clear.
func mergeResources(cur, upd *pb.Resources, clear []string) (*pb.Resources, error) {
	r := proto.CloneOf(cur)
	if r == nil {
		r = &pb.Resources{}
	}
	set := func(dst *int64, v int64) {
		if v != 0 {
			*dst = v
		}
	}
	set(&r.CpuMinMilli, upd.GetCpuMinMilli())
	set(&r.CpuMaxMilli, upd.GetCpuMaxMilli())
	set(&r.CpuBurstMilli, upd.GetCpuBurstMilli())
	set(&r.MemMinBytes, upd.GetMemMinBytes())
	set(&r.MemMaxBytes, upd.GetMemMaxBytes())
	set(&r.PidsMax, upd.GetPidsMax())
	for _, f := range clear {
		switch f {
		case "cpu_min":
			r.CpuMinMilli = 0
		case "cpu_max":
			r.CpuMaxMilli = 0
		case "cpu_burst":
			r.CpuBurstMilli = 0
		case "mem_min":
			r.MemMinBytes = 0
		case "mem_max":
			r.MemMaxBytes = 0
		case "pids":
			r.PidsMax = 0
		default:
			return nil, invalid("cannot clear unknown field %q", f)
		}
	}
	return r, nil
}

func (h *shimAPI) List(ctx context.Context, req *connect.Request[pb.ListRequest]) (*resp[pb.ListResponse], error) {
	s := h.s
	if s.Table == nil {
		return forward(ctx, s, func(p *peer) (*resp[pb.ListResponse], error) {
			return p.shim.List(ctx, connect.NewRequest(req.Msg))
		})
	}
	m, err := selfList(ctx, req.Msg)
	if err != nil {
		return nil, err
	}
	if !stale(m.Consistency) {
		if err := s.linearize(ctx); err != nil {
			return nil, err
		}
	}
	if m.MinIndex > 0 {
		wctx, cancel := context.WithTimeout(ctx, waitFor(m.WaitMillis))
		err := s.waitIndex(wctx, m.MinIndex+1)
		cancel()
		if err != nil && ctx.Err() != nil {
			return nil, apiError(ctx.Err())
		}
	}
	index := s.Table.Index()
	var staleness *pb.Staleness
	if stale(m.Consistency) {
		staleness = s.staleness()
	}
	var recs []*pb.ProcessRecord
	if len(m.Ids) > 0 {
		ids, err := s.resolve(m.Ids)
		if err != nil {
			return nil, err
		}
		recs = s.records(ids)
	} else {
		recs = s.Table.Processes(m.All, m.Node)
	}
	recs, next, err := page(recs, m.PageToken, m.PageSize)
	if err != nil {
		return nil, invalid("%v", err)
	}
	if m.Usage {
		recs = s.usage(ctx, recs, false)
	} else if len(m.Ids) == 0 && m.Node == "" && binaryCodec(req.Header().Get("Content-Type")) {
		// A page of the whole table, in binary: from the encoded-record
		// cache.
		raw, err := s.listCache.encode(recs, s.Table.Len())
		if err != nil {
			return nil, apiError(err)
		}
		out := &pb.ListResponse{Index: index, Staleness: staleness, NextPageToken: next}
		out.ProtoReflect().SetUnknown(raw)
		return connect.NewResponse(out), nil
	}
	return connect.NewResponse(&pb.ListResponse{Processes: recs, Index: index, Staleness: staleness, NextPageToken: next}), nil
}

// MaxWait is the longest a blocking query waits.
const MaxWait = 5 * time.Minute

// waitFor bounds a blocking query's wait: default 30 s, at most MaxWait
// (clamped before it is multiplied, so a huge wait_millis cannot overflow
// into a wait that ends at once).
func waitFor(ms int64) time.Duration {
	if ms <= 0 {
		return 30 * time.Second
	}
	return time.Duration(min(ms, MaxWait.Milliseconds())) * time.Millisecond
}

func (h *shimAPI) Nodes(ctx context.Context, req *connect.Request[pb.NodesRequest]) (*resp[pb.NodesResponse], error) {
	s := h.s
	if s.Table == nil {
		return forward(ctx, s, func(p *peer) (*resp[pb.NodesResponse], error) {
			return p.shim.Nodes(ctx, connect.NewRequest(req.Msg))
		})
	}
	var staleness *pb.Staleness
	if stale(req.Msg.Consistency) {
		staleness = s.staleness()
	} else if err := s.linearize(ctx); err != nil {
		return nil, err
	}
	leader, _ := s.Raft.Leader()
	voters := map[string]bool{}
	if srv, err := s.Raft.Servers(); err == nil {
		for _, v := range srv {
			voters[v.ID] = v.Voter
		}
	}
	out := &pb.NodesResponse{Index: s.Table.Index(), Staleness: staleness}
	var used map[string]*pb.Usage
	if req.Msg.Usage {
		used = s.nodeUsage(ctx)
	}
	for _, v := range s.Table.Nodes() {
		a := v.Alloc
		out.Nodes = append(out.Nodes, &pb.NodeStatus{
			Node:      v.Node,
			Leader:    v.Node.Name == leader,
			Voter:     voters[v.Node.Name],
			Processes: uint32(a.Count),
			Reserved:  &pb.Resources{CpuMinMilli: a.CPUMin, MemMinBytes: a.MemMin},
			Granted:   &pb.Grant{CpuMilli: a.CPUGrant, MemBytes: a.MemGrant},
			Limit:     &pb.Resources{CpuMaxMilli: a.CPUMax, MemMaxBytes: a.MemMax},
			Usage:     used[v.Node.Name],
		})
	}
	return connect.NewResponse(out), nil
}

func (h *shimAPI) Drain(ctx context.Context, req *connect.Request[pb.DrainRequest]) (*resp[pb.DrainResponse], error) {
	s := h.s
	if s.Table == nil {
		return forward(ctx, s, func(p *peer) (*resp[pb.DrainResponse], error) {
			return p.shim.Drain(ctx, connect.NewRequest(req.Msg))
		})
	}
	name := req.Msg.Node
	if err := s.linearize(ctx); err != nil {
		return nil, err
	}
	if s.Table.Node(name) == nil {
		return nil, apiError(fmt.Errorf("%w: %q", table.ErrUnknownNode, name))
	}
	res, err := s.apply(ctx, &pb.Command{Op: &pb.Command_SetDraining{SetDraining: &pb.SetDraining{
		Name: name, Draining: !req.Msg.Undrain}}})
	if err != nil {
		return nil, err
	}
	if err := s.waitIndex(ctx, res.Index); err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.DrainResponse{Node: s.Table.Node(name)}), nil
}

// Logs streams a process's output. A process on another node is proxied
// through that node's API.
func (h *shimAPI) Logs(ctx context.Context, req *connect.Request[pb.LogsRequest], stream *connect.ServerStream[pb.LogsChunk]) error {
	s := h.s
	m := req.Msg
	if err := validLogRef(m.Id); err != nil {
		return err
	}
	var rec *pb.ProcessRecord
	if s.Table != nil {
		if err := s.linearize(ctx); err != nil {
			return err
		}
		ids, err := s.resolve([]string{m.Id})
		if err != nil {
			return err
		}
		if svc := s.serviceRef([]string{m.Id}); svc != "" {
			return s.serviceLogs(ctx, m, svc, stream)
		}
		if len(ids) != 1 {
			return invalid("%q names %d processes; logs needs exactly one", m.Id, len(ids))
		}
		rec = s.Table.Get(ids[0])
	} else if id := callerOf(ctx).id; id.Kind == auth.KindNode || id.Kind == auth.KindSelf {
		// A worker answers from its own files only a server, which
		// checked the user's token; a user's call (its token unchecked
		// here) goes to a server, which proxies it back if need be. A
		// server names a process by its full id.
		if err := table.ValidateID(m.Id); err != nil {
			return apiError(err)
		}
		if _, err := os.Stat(LogPath(s.LogDir, m.Id)); err == nil {
			rec = &pb.ProcessRecord{Id: m.Id, Node: s.Name}
		} else if id.Kind == auth.KindNode {
			return connect.NewError(connect.CodeNotFound, fmt.Errorf("no log of %s on node %s", m.Id, s.Name))
		}
	}
	if rec == nil || rec.Node != s.Name {
		owner := s.ownerAPI(rec)
		if owner == "" {
			return connect.NewError(connect.CodeUnavailable, fmt.Errorf("logs of %s: its node is not reachable", m.Id))
		}
		sub := proto.CloneOf(m)
		if rec != nil {
			sub.Id = rec.Id
		}
		cs, err := s.peer(owner).shim.Logs(ctx, connect.NewRequest(sub))
		if err != nil {
			return err
		}
		defer cs.Close()
		for cs.Receive() {
			if err := stream.Send(cs.Msg()); err != nil {
				return err
			}
		}
		return cs.Err()
	}
	return streamFile(ctx, LogPath(s.LogDir, rec.Id), m, stream)
}

// ownerAPI finds the API address of the node holding a process: from the
// table on servers, or by asking a server on workers.
func (s *Server) ownerAPI(rec *pb.ProcessRecord) string {
	if s.Table == nil {
		return firstOr(s.servers(), "")
	}
	if rec == nil || rec.Node == "" {
		return ""
	}
	n := s.Table.Node(rec.Node)
	if n == nil || n.State != pb.NodeState_NODE_STATE_UP {
		return ""
	}
	return n.ApiAddr
}

func firstOr(xs []string, def string) string {
	if len(xs) > 0 {
		return xs[0]
	}
	return def
}

// LogPath is where a process's combined stdout and stderr are kept.
func LogPath(dir, id string) string { return filepath.Join(dir, id+".log") }

func streamFile(ctx context.Context, path string, m *pb.LogsRequest, stream *connect.ServerStream[pb.LogsChunk]) error {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		if !m.Follow {
			return nil // started, but wrote nothing yet
		}
	} else if err != nil {
		return apiError(fmt.Errorf("logs: %w", err))
	}
	for f == nil {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(100 * time.Millisecond):
		}
		f, _ = os.Open(path)
	}
	defer f.Close()
	if m.TailBytes > 0 {
		if st, err := f.Stat(); err == nil && st.Size() > m.TailBytes {
			_, _ = f.Seek(st.Size()-m.TailBytes, io.SeekStart)
		}
	}
	buf := make([]byte, 32<<10)
	for {
		n, err := f.Read(buf)
		if n > 0 {
			if err := stream.Send(&pb.LogsChunk{Data: buf[:n]}); err != nil {
				return err
			}
			continue
		}
		if err != nil && err != io.EOF {
			return apiError(fmt.Errorf("logs: %w", err))
		}
		if !m.Follow {
			return nil
		}
		// tail -f: poll for growth until the client goes away.
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(100 * time.Millisecond):
		}
	}
}
