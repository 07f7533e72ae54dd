package server

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/raftlog"
)

// Linearizable reads: one loop, many readers.
//
// Every read API answers from this server's own table, but only once the
// table has applied at least the leader's commit index as of the read's
// arrival, with the leader's leadership confirmed after the read arrived
// (a ReadIndex, as etcd does). Then the read sees every write acknowledged
// before it began, whichever member it asks.
//
// Getting that index costs the leader a round of Raft heartbeats, and a
// follower a call to the leader (AgentService.ReadIndex) on top; concurrent
// reads share one. A reader joins the next round and waits for its index.
// One round runs at a time (readLoop, as etcd's linearizableReadLoop): readers
// that arrive while one is in flight join the next, which starts when it
// ends, because an index confirmed before a read arrived does not cover it.
// With the index, each reader waits until the applied watermark (fsm.go)
// reaches it; a follower has usually applied it already, or does within one
// message from the leader.
//
// A leader answers only once a Barrier has run in its term (raftlog's
// ReadIndex; Consul's rule): before, its commit index may lag entries its
// predecessor committed. The round runs that Barrier itself if takeOffice
// has not yet.
//
// A member that cannot get an index within readTimeout (no leader, or none
// it can reach, or a leader it does not know yet) refuses the read with
// unavailable rather than answer from a copy that may be old; so does one
// that has not caught up to the index by then (a restarted server replaying
// its log). Stale reads (Consistency STALE) skip all this and say how old
// the copy may be (staleness).

const (
	// readTimeout bounds one round: getting an index and catching up to it.
	readTimeout = 3 * time.Second
	// readAttempt bounds one call to the leader for an index, so that a
	// call stuck on a leader that died gives way to its successor.
	readAttempt = time.Second
	// readPoll is how often a reader rechecks the watermark while what it
	// waits for may be entries that never reach the FSM (fsm.go).
	readPoll = time.Millisecond
)

// reads batches concurrent readers into rounds.
type reads struct {
	mu      sync.Mutex
	next    *readRound // the round new readers join; nil until one does
	running bool       // readLoop is running
}

// readRound is one confirmation of a read index, shared by its readers.
type readRound struct {
	done  chan struct{} // closed when index or err is set
	index uint64
	err   error
}

// linearize returns once this server's table may answer a linearizable read
// that arrived before the call: it holds every write acknowledged before.
func (s *Server) linearize(ctx context.Context) error {
	index, err := s.readIndex(ctx)
	if err != nil {
		return err
	}
	return s.waitApplied(ctx, index)
}

// readIndex joins the next round and returns its confirmed index.
func (s *Server) readIndex(ctx context.Context) (uint64, error) {
	r := &s.reads
	r.mu.Lock()
	if r.next == nil {
		r.next = &readRound{done: make(chan struct{})}
	}
	round := r.next
	if !r.running {
		r.running = true
		go s.readLoop()
	}
	r.mu.Unlock()
	select {
	case <-round.done:
		return round.index, round.err
	case <-ctx.Done():
		return 0, apiError(ctx.Err())
	}
}

// readLoop runs rounds while readers wait.
func (s *Server) readLoop() {
	r := &s.reads
	for {
		r.mu.Lock()
		round := r.next
		r.next = nil
		if round == nil {
			r.running = false
			r.mu.Unlock()
			return
		}
		r.mu.Unlock()
		round.index, round.err = s.fetchReadIndex()
		close(round.done)
	}
}

// fetchReadIndex gets a confirmed read index: from Raft on the leader, from
// the leader elsewhere. It retries while there is no leader, for at most
// readTimeout.
func (s *Server) fetchReadIndex() (uint64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), readTimeout)
	defer cancel()
	go func() { // the round also ends when this server stops
		select {
		case <-s.closed:
			cancel()
		case <-ctx.Done():
		}
	}()
	backoff := 2 * time.Millisecond
	var last error
	for {
		var err error
		if s.Raft.IsLeader() {
			var index uint64
			index, err = s.Raft.ReadIndex(ctx)
			if err == nil {
				return index, nil
			}
			if errors.Is(err, raftlog.ErrNotReady) {
				// takeOffice's Barrier has not run in this term yet.
				if err = s.Raft.Barrier(ctx); err == nil {
					continue
				}
			}
		} else if addr := s.leaderAPI(); addr != "" {
			actx, acancel := context.WithTimeout(ctx, readAttempt)
			resp, rerr := s.peer(addr).agent.ReadIndex(actx, connect.NewRequest(&pb.ReadIndexRequest{}))
			acancel()
			if rerr == nil {
				return resp.Msg.Index, nil
			}
			err = rerr
			if !retryable(err) && connect.CodeOf(err) != connect.CodeDeadlineExceeded {
				return 0, err
			}
		} else if id, _ := s.Raft.Leader(); id != "" {
			return 0, s.leaderUnknown(id)
		}
		if err != nil {
			last = err
		}
		select {
		case <-ctx.Done():
			return 0, s.readUnavailable(last)
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 50*time.Millisecond)
	}
}

// readUnavailable is the error of a read that got no index in time.
func (s *Server) readUnavailable(last error) error {
	msg := fmt.Sprintf("server %s cannot confirm its table with a leader within %s", s.Name, readTimeout)
	if last != nil {
		msg += " (" + errorText(last) + ")"
	} else {
		msg += " (no leader)"
	}
	return connect.NewError(connect.CodeUnavailable, errors.New(msg+"; a stale read answers from its copy"))
}

// leaderUnknown is the error of a server whose table does not know the
// leader's node yet: it has not caught up since it restarted. It answers at
// once, so that the caller asks another member.
func (s *Server) leaderUnknown(leader string) error {
	return connect.NewError(connect.CodeUnavailable, fmt.Errorf(
		"server %s does not know leader %s's address yet (catching up); ask another member", s.Name, leader))
}

// errorText is an error's message, without a Connect code.
func errorText(err error) string {
	var ce *connect.Error
	if errors.As(err, &ce) {
		return ce.Message()
	}
	return err.Error()
}

// waitApplied blocks until the table's state is complete through index.
func (s *Server) waitApplied(ctx context.Context, index uint64) error {
	var poll *time.Timer
	defer func() {
		if poll != nil {
			poll.Stop()
		}
	}()
	deadline := time.NewTimer(readTimeout)
	defer deadline.Stop()
	for {
		ch := s.Watch.Any()
		if s.applied() >= index {
			return nil
		}
		// No-op, barrier and configuration entries wake no watcher.
		if poll == nil {
			poll = time.NewTimer(readPoll)
		} else {
			poll.Reset(readPoll)
		}
		select {
		case <-ch:
		case <-poll.C:
		case <-deadline.C:
			return connect.NewError(connect.CodeUnavailable, fmt.Errorf(
				"server %s has not caught up to the leader's index %d within %s (it is at %d)", s.Name, index, readTimeout, s.applied()))
		case <-ctx.Done():
			return apiError(ctx.Err())
		}
	}
}

// applied returns the applied watermark (fsm.go), first moved over the
// entries after it that never reach the FSM.
func (s *Server) applied() uint64 {
	w := s.Watch.applied.load()
	if t := s.Raft.AppliedThrough(w); t > w {
		s.Watch.applied.raise(t)
		w = t
	}
	return w
}

// stale reports whether a request asked for a stale read.
func stale(c pb.Consistency) bool { return c == pb.Consistency_CONSISTENCY_STALE }

// staleness says how old this server's copy of the table may be.
func (s *Server) staleness() *pb.Staleness {
	st := &pb.Staleness{Index: s.applied(), LeaderIndex: s.Raft.CommitIndex()}
	if !s.Raft.IsLeader() {
		if lc := s.Raft.LastContact(); lc.IsZero() {
			st.LastContactMillis = -1
		} else {
			st.LastContactMillis = max(time.Since(lc).Milliseconds(), 0)
		}
	}
	return st
}

// ReadIndex gives a follower a read index: the leader's commit index, its
// leadership confirmed after the call arrived. Only the leader answers.
func (h *agentAPI) ReadIndex(ctx context.Context, req *connect.Request[pb.ReadIndexRequest]) (*resp[pb.ReadIndexResponse], error) {
	s := h.s
	if s.Raft == nil || !s.Raft.IsLeader() {
		return nil, connect.NewError(connect.CodeUnavailable, errors.New("not the leader"))
	}
	index, err := s.readIndex(ctx)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.ReadIndexResponse{Index: index}), nil
}
