package table

import "errors"

// Sentinel errors returned (wrapped) by Apply. Check them with errors.Is.
var (
	ErrInvalid     = errors.New("invalid request")
	ErrNotFound    = errors.New("not found")
	ErrExists      = errors.New("already exists")
	ErrNoCapacity  = errors.New("no node has room")
	ErrUnknownNode = errors.New("unknown node")
	ErrTransition  = errors.New("invalid state transition")
	ErrDecode      = errors.New("cannot decode command")
	ErrStale       = errors.New("stale incarnation")
	ErrDrained     = errors.New("node is drained")
)
