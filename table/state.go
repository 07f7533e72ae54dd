package table

import (
	"fmt"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// transitions lists, for each state, the states a record may move to. A
// record moves back to STARTING or PENDING when its node is lost and it is
// placed again under a new incarnation.
var transitions = map[pb.ProcessState][]pb.ProcessState{
	pb.ProcessState_PROCESS_STATE_PENDING: {
		pb.ProcessState_PROCESS_STATE_STARTING, pb.ProcessState_PROCESS_STATE_KILLED,
	},
	pb.ProcessState_PROCESS_STATE_STARTING: {
		pb.ProcessState_PROCESS_STATE_STARTING, pb.ProcessState_PROCESS_STATE_PENDING,
		pb.ProcessState_PROCESS_STATE_RUNNING, pb.ProcessState_PROCESS_STATE_BACKOFF,
		pb.ProcessState_PROCESS_STATE_EXITED, pb.ProcessState_PROCESS_STATE_FAILED,
		pb.ProcessState_PROCESS_STATE_KILLED,
	},
	pb.ProcessState_PROCESS_STATE_RUNNING: {
		pb.ProcessState_PROCESS_STATE_STARTING, pb.ProcessState_PROCESS_STATE_PENDING,
		pb.ProcessState_PROCESS_STATE_RUNNING, pb.ProcessState_PROCESS_STATE_BACKOFF,
		pb.ProcessState_PROCESS_STATE_EXITED, pb.ProcessState_PROCESS_STATE_FAILED,
		pb.ProcessState_PROCESS_STATE_KILLED,
	},
	pb.ProcessState_PROCESS_STATE_BACKOFF: {
		pb.ProcessState_PROCESS_STATE_STARTING, pb.ProcessState_PROCESS_STATE_PENDING,
		pb.ProcessState_PROCESS_STATE_RUNNING, pb.ProcessState_PROCESS_STATE_BACKOFF,
		pb.ProcessState_PROCESS_STATE_EXITED, pb.ProcessState_PROCESS_STATE_FAILED,
		pb.ProcessState_PROCESS_STATE_KILLED,
	},
}

// Terminal reports whether a process in state s is finished for good.
func Terminal(s pb.ProcessState) bool {
	switch s {
	case pb.ProcessState_PROCESS_STATE_EXITED, pb.ProcessState_PROCESS_STATE_FAILED,
		pb.ProcessState_PROCESS_STATE_KILLED:
		return true
	}
	return false
}

// checkTransition returns ErrTransition unless from -> to is allowed.
func checkTransition(from, to pb.ProcessState) error {
	for _, s := range transitions[from] {
		if s == to {
			return nil
		}
	}
	return fmt.Errorf("%w: %s -> %s", ErrTransition, StateName(from), StateName(to))
}

// StateName is the short lower-case name of a process state ("running").
func StateName(s pb.ProcessState) string {
	switch s {
	case pb.ProcessState_PROCESS_STATE_PENDING:
		return "pending"
	case pb.ProcessState_PROCESS_STATE_STARTING:
		return "starting"
	case pb.ProcessState_PROCESS_STATE_RUNNING:
		return "running"
	case pb.ProcessState_PROCESS_STATE_BACKOFF:
		return "backoff"
	case pb.ProcessState_PROCESS_STATE_EXITED:
		return "exited"
	case pb.ProcessState_PROCESS_STATE_FAILED:
		return "failed"
	case pb.ProcessState_PROCESS_STATE_KILLED:
		return "killed"
	}
	return "unknown"
}

// NodeStateName is the short lower-case name of a node state ("up").
func NodeStateName(s pb.NodeState) string {
	switch s {
	case pb.NodeState_NODE_STATE_UP:
		return "up"
	case pb.NodeState_NODE_STATE_DOWN:
		return "down"
	case pb.NodeState_NODE_STATE_LEFT:
		return "left"
	}
	return "unknown"
}
