package server

import (
	"context"
	"errors"
	"fmt"

	"connectrpc.com/connect"

	"github.com/shim-run/shim/raftlog"
	"github.com/shim-run/shim/table"
)

// ErrNoLeader means no Raft leader could be reached in time.
var ErrNoLeader = errors.New("no leader")

// apiError turns an internal error into a Connect error whose code matches
// its sentinel. Connect errors pass through unchanged.
func apiError(err error) error {
	if err == nil {
		return nil
	}
	var ce *connect.Error
	if errors.As(err, &ce) {
		return err
	}
	code := connect.CodeInternal
	switch {
	case errors.Is(err, table.ErrInvalid), errors.Is(err, table.ErrDecode):
		code = connect.CodeInvalidArgument
	case errors.Is(err, table.ErrNotFound), errors.Is(err, table.ErrUnknownNode):
		code = connect.CodeNotFound
	case errors.Is(err, table.ErrExists):
		code = connect.CodeAlreadyExists
	case errors.Is(err, table.ErrNoCapacity):
		code = connect.CodeResourceExhausted
	case errors.Is(err, table.ErrTransition), errors.Is(err, table.ErrStale), errors.Is(err, table.ErrDrained):
		code = connect.CodeFailedPrecondition
	case errors.Is(err, raftlog.ErrNotLeader), errors.Is(err, ErrNoLeader):
		code = connect.CodeUnavailable
	case errors.Is(err, context.DeadlineExceeded):
		code = connect.CodeDeadlineExceeded
	case errors.Is(err, context.Canceled):
		code = connect.CodeCanceled
	}
	return connect.NewError(code, err)
}

func invalid(format string, a ...any) error {
	return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf(format, a...))
}
