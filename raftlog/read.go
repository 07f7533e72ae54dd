package raftlog

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/raft"
)

// Linearizable reads.
//
// A read that sees the FSM after it has applied at least the leader's commit
// index as of the read's arrival, that leader's leadership confirmed by a
// quorum after the read arrived, sees every write acknowledged before the
// read began (the Raft thesis §6.4; etcd's ReadIndex). ReadIndex gives that
// index on the leader, with one heartbeat round; followers ask the leader for
// it and wait until their own FSM has applied it.
//
// Two traps. A new leader's commit index may lag its predecessor's until an
// entry of its own term commits, so ReadIndex answers only once a Barrier
// has completed in the current term (Consul's rule: the server calls
// Barrier on taking office). And an FSM cannot tell by itself how far raft
// has applied: no-op, barrier and configuration entries never reach
// FSM.Apply, and AppliedIndex moves before the FSM has applied an entry.
// AppliedThrough closes that gap from the log.

// ErrNotReady is returned (wrapped) by ReadIndex on a leader that has not
// yet had a Barrier applied in its term: its commit index may still lag
// entries its predecessor committed. Retry after Barrier.
var ErrNotReady = errors.New("the leader has not applied its predecessors' entries yet")

// tookOffice records that a Barrier issued in term completed.
func (n *Node) tookOffice(term uint64) {
	if n.raft.State() == raft.Leader && n.raft.CurrentTerm() == term {
		n.office.Store(term)
	}
}

// VerifyLeader confirms, by a round of heartbeats answered by a quorum, that
// this node is still the leader. The error wraps ErrNotLeader when it is not.
func (n *Node) VerifyLeader(ctx context.Context) error {
	if err := n.leaderOnly(); err != nil {
		return fmt.Errorf("verify leader: %w", err)
	}
	if err := wait(ctx, n.raft.VerifyLeader()); err != nil {
		return fmt.Errorf("verify leader: %w", n.mapErr(err))
	}
	return nil
}

// ReadIndex returns the commit index as of the call, this node's leadership
// confirmed by a quorum after the call began: an FSM that has applied it
// (AppliedThrough) may answer a linearizable read. Leader only (ErrNotLeader),
// and only once a Barrier has completed in the current term (ErrNotReady).
func (n *Node) ReadIndex(ctx context.Context) (uint64, error) {
	term := n.raft.CurrentTerm()
	if err := n.leaderOnly(); err != nil {
		return 0, fmt.Errorf("read index: %w", err)
	}
	if n.office.Load() != term {
		return 0, fmt.Errorf("read index: %w", ErrNotReady)
	}
	index := n.raft.CommitIndex()
	if err := wait(ctx, n.raft.VerifyLeader()); err != nil {
		return 0, fmt.Errorf("read index: %w", n.mapErr(err))
	}
	if n.raft.CurrentTerm() != term {
		// Deposed and elected again meanwhile: the index may predate
		// another leader's commits.
		return 0, fmt.Errorf("read index: %w: the term changed", ErrNotLeader)
	}
	return index, nil
}

// CommitIndex returns the highest index this node knows to be committed: on a
// follower, the leader's commit index as last heard.
func (n *Node) CommitIndex() uint64 { return n.raft.CommitIndex() }

// LastContact returns when a follower last heard from the leader (zero on a
// node that never has; meaningless on the leader).
func (n *Node) LastContact() time.Time { return n.raft.LastContact() }

// AppliedThrough returns the highest index the FSM's state is complete
// through, given fsmIndex, the index of the last entry the FSM applied (or
// restored): fsmIndex, extended over the entries after it that raft has
// applied and that never reach the FSM (no-ops, barriers, configuration
// changes). It stops at the first command the FSM has not applied yet.
//
// An entry at or below AppliedIndex is committed, so never overwritten; one
// missing from the log was compacted into a snapshot the FSM has restored
// or taken, so it holds no command the FSM has yet to apply.
func (n *Node) AppliedThrough(fsmIndex uint64) uint64 {
	applied := n.raft.AppliedIndex()
	i := fsmIndex
	if i >= applied {
		return i
	}
	first, err := n.logs.FirstIndex()
	if err == nil && (first == 0 || first > i+1) {
		if first == 0 {
			return applied // an empty log: everything applied came from a snapshot
		}
		i = min(first-1, applied)
	}
	var l raft.Log
	for i < applied {
		if err := n.logs.GetLog(i+1, &l); err == nil && l.Type == raft.LogCommand {
			break
		}
		i++
	}
	return i
}
