package server

import (
	"context"
	"fmt"
	"strings"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/table"
)

// Events: the table's event ring (table/events.go), served from any
// server's replica as a stream (since an index, of some types, and, with
// follow, as they are applied), and counted and logged here: each server
// counts the growth events its replica applies in /metrics, and the
// leader logs them.

// Events streams the events after req.since. A since older than the ring
// keeps is refused (out_of_range: the events in between are gone), as
// etcd refuses a watch from a compacted revision; 0 starts from the oldest
// kept.
func (h *shimAPI) Events(ctx context.Context, req *connect.Request[pb.EventsRequest], stream *connect.ServerStream[pb.Event]) error {
	s := h.s
	m := req.Msg
	for _, t := range m.Types {
		if t == "" || strings.ContainsAny(t, " \t\n") || len(t) > 64 {
			return invalid("event type %q: give a type such as process.grown, or a prefix such as node.", t)
		}
	}
	if s.Table == nil {
		return s.forwardEvents(ctx, m, stream)
	}
	since := m.Since
	for {
		changed := s.Watch.Any()
		evs, base, index := s.Table.Events(since, m.Types)
		if since != 0 && since < base {
			return connect.NewError(connect.CodeOutOfRange, fmt.Errorf(
				"the events up to index %d are no longer kept; ask from index %d on (or 0 for the oldest kept)", base, base))
		}
		for _, e := range evs {
			if err := stream.Send(e); err != nil {
				return err
			}
		}
		since = max(since, index)
		if !m.Follow {
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-s.closed:
			return nil
		case <-changed:
		}
	}
}

// forwardEvents passes a worker's events call to a server, and the stream
// back.
func (s *Server) forwardEvents(ctx context.Context, m *pb.EventsRequest, stream *connect.ServerStream[pb.Event]) error {
	var last error = connect.NewError(connect.CodeUnavailable, fmt.Errorf("events: no servers known"))
	for _, addr := range s.servers() {
		cs, err := s.peer(addr).shim.Events(ctx, connect.NewRequest(m))
		if err != nil {
			last = err
			continue
		}
		sent := false
		for cs.Receive() {
			sent = true
			if err := stream.Send(cs.Msg()); err != nil {
				cs.Close()
				return err
			}
		}
		err = cs.Err()
		cs.Close()
		if err == nil || sent || !retryable(err) {
			return err
		}
		last = err
	}
	return last
}

// Growth events are counted in /metrics by change.
var grantChanges = map[string]string{
	table.EvGrown: "grown", table.EvShrunk: "shrunk", table.EvWaiting: "waiting", table.EvGrowCancelled: "cancelled",
}

// countEvents counts and logs, as the replica applies them, the events
// of growth: grants that grow, shrink or wait, and moves to make room.
// Only the leader logs them, so that a cluster logs each once.
func (s *Server) countEvents(ctx context.Context) {
	types := []string{table.EvGrown, table.EvShrunk, table.EvWaiting, table.EvGrowCancelled, table.EvRoom}
	since := s.Table.Index() // from now on
	for {
		changed := s.Watch.Any()
		evs, _, index := s.Table.Events(since, types)
		since = max(since, index)
		leader := len(evs) > 0 && s.Raft.IsLeader()
		for _, e := range evs {
			if e.Type == table.EvRoom {
				s.Metrics.RoomMoves.Inc()
			} else {
				s.Metrics.Grants.WithLabelValues(grantChanges[e.Type]).Inc()
			}
			if leader {
				s.Log.Info(e.Type, "id", e.Id, "node", e.Node, "reason", e.Reason, "index", e.Index,
					"at", time.Unix(0, e.UnixNano).UTC().Format(time.RFC3339Nano))
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
	}
}
