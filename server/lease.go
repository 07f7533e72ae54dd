package server

import (
	"context"
	"sync"
	"time"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Node leases.
//
// Every node renews a lease with the leader by heartbeating every Lease/5.
// The leader keeps the time it last heard from each node in memory only; just
// the transitions (down, up) go through Raft.
//
// Fencing argument. A node measures its lease from the moment it *sent* the
// heartbeat the leader acknowledged, by its own monotonic clock, and stops all
// of its processes when Lease has passed since then without a newer
// acknowledgement (agent.Agent). The leader measures from the moment it
// *received* that heartbeat, which is later, and declares the node down only
// after Lease + Margin. So the node always fences first, as long as the two
// clocks' rates differ by less than Margin/Lease (25% by default; real
// clocks differ by parts per million) and the node's fence runs within the
// margin. Wall-clock time is never compared across machines. Should the
// agent be unable to fence (crashed, killed, paused), the node's guard
// process does, at the same deadline (package guard).
//
// A new leader has not heard from anyone. It grants every node a fresh lease
// from the moment it took office, so it neither declares nodes dead for its
// own ignorance nor waits longer than one lease period. A stale leader cut off
// in a minority may still acknowledge heartbeats until Raft's leader lease
// (200 ms in shimd) without a quorum makes it step down; its successor cannot
// take office before the followers' own 200 ms heartbeat timeout has passed
// since they last heard from it. A node acknowledged by the stale leader in
// that overlap fences at most a few milliseconds after the successor's fresh
// lease would run out, which the margin covers.
//
// The cost of this scheme: a node keeps its processes through a leader
// election only if a new leader answers it within one lease of its last
// acknowledged heartbeat, i.e. within 800 ms of the old leader's death at the
// default 1 s lease renewed every 200 ms. shimd's Raft timing elects within
// 200-600 ms (cmd/shimd), and nodes retry every 50 ms after a miss.

// Margin is the safety margin the leader adds to a node's lease.
func Margin(lease time.Duration) time.Duration {
	return max(lease/4, 100*time.Millisecond)
}

type leases struct {
	mu     sync.Mutex
	seen   map[string]time.Time
	active bool
}

func newLeases() *leases { return &leases{seen: map[string]time.Time{}} }

func (l *leases) renew(node string, now time.Time) {
	l.mu.Lock()
	l.seen[node] = now
	l.mu.Unlock()
}

// runLeases checks leases while this server leads. It wakes at the earliest
// deadline of any node (or every tenth of a lease while there is none), so a
// lease is judged within a millisecond or so of running out, without polling.
func (s *Server) runLeases(ctx context.Context) {
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.Raft.LeaderChanges():
		case <-timer.C:
		}
		next := max(s.Lease/10, 10*time.Millisecond)
		s.leases.mu.Lock()
		active := s.leases.active
		s.leases.mu.Unlock()
		switch {
		case !s.Raft.IsLeader():
			s.leases.mu.Lock()
			s.leases.active = false
			s.leases.mu.Unlock()
		case !active:
			s.takeOffice(ctx)
		default:
			next = min(next, s.checkLeases(ctx))
		}
		timer.Reset(next)
	}
}

// takeOffice waits for the table to hold everything committed, then grants
// every node a fresh lease.
func (s *Server) takeOffice(ctx context.Context) {
	bctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := s.Raft.Barrier(bctx); err != nil {
		s.Log.Warn("leader barrier failed", "err", err)
		return
	}
	now := s.Now()
	nodes := s.Table.NodeRecords()
	s.leases.mu.Lock()
	s.leases.seen = make(map[string]time.Time, len(nodes))
	for _, n := range nodes {
		s.leases.seen[n.Name] = now
	}
	s.leases.active = true
	s.leases.mu.Unlock()
	s.Log.Info("leading: every node has a fresh lease", "nodes", len(nodes), "lease", s.Lease)
}

// checkLeases commits every up node whose lease ran out as down, in one
// batch. It returns how long until the next lease among the others runs out.
func (s *Server) checkLeases(ctx context.Context) (next time.Duration) {
	now := s.Now()
	deadline := s.Lease + Margin(s.Lease)
	next = deadline
	var expired []*pb.Command
	s.leases.mu.Lock()
	for _, n := range s.Table.NodeRecords() {
		if n.State != pb.NodeState_NODE_STATE_UP {
			continue
		}
		if n.HoldUntilUnixNano > now.UnixNano() {
			continue // its shimd is restarting; see Agent.Hold
		}
		last, ok := s.leases.seen[n.Name]
		if !ok {
			s.leases.seen[n.Name] = now
			continue
		}
		if left := deadline - now.Sub(last); left >= 0 {
			next = min(next, left+time.Millisecond)
			continue
		}
		expired = append(expired, &pb.Command{Op: &pb.Command_SetNodeState{SetNodeState: &pb.SetNodeState{
			Name: n.Name, State: pb.NodeState_NODE_STATE_DOWN}}})
	}
	s.leases.mu.Unlock()
	if len(expired) == 0 {
		return next
	}
	start := time.Now()
	actx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	res, err := s.apply(actx, &pb.Command{Op: &pb.Command_Batch{Batch: &pb.Batch{Commands: expired}}})
	if err != nil {
		s.Log.Warn("cannot mark nodes down", "err", err)
		return next
	}
	for _, c := range expired {
		s.Log.Warn("node lease expired: marked down, its processes moved", "node", c.GetSetNodeState().Name)
		s.Metrics.LeaseExpiries.Inc()
	}
	s.Metrics.RestartLatency.Observe(time.Since(start).Seconds())
	s.Log.Info("moved processes", "count", len(res.IDs))
	return next
}
