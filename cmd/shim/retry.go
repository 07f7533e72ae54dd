package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"time"

	"connectrpc.com/connect"

	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

// Retries that cannot duplicate.
//
// A spawn whose answer is lost (the connection reset, the member or the
// leader died after committing, the attempt timed out) may or may not have
// happened. Each `shim spawn` makes one random 128-bit request id and sends
// every attempt with it, to any member, until --timeout: the table answers a
// retry with the processes the first attempt created (table/requests.go), so
// retrying never makes a second copy. Kill retries the same way: killing a
// process that is already stopping changes nothing.

// newRequestID returns a random 128-bit request id, in hex.
func newRequestID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// answerLost reports whether a call's answer may have been lost, or the call
// not made at all, so that a retry is worth trying: the member could not be
// reached or could not reach a leader, or the connection broke or the attempt
// timed out after the request was sent.
func answerLost(err error) bool {
	if unreachable(err) {
		return true
	}
	switch connect.CodeOf(err) {
	case connect.CodeDeadlineExceeded, connect.CodeUnknown, connect.CodeAborted, connect.CodeCanceled:
		return true
	}
	return false
}

// refused reports whether nothing listens at the address: the request was
// never sent.
func refused(err error) bool {
	var op *net.OpError
	return notShim(err) || errors.As(err, &op) && op.Op == "dial"
}

// callRetry runs f, which must be safe to repeat, against the addresses in
// turn until one answers, retrying while answers are lost, for at most
// --timeout in all (each attempt gets a share, so that one stuck on a dead
// member leaves time for others). It gives up at once when no address is
// listening at all. what names the request in the final error.
func (a *app) callRetry(ctx context.Context, what string, f func(context.Context, shimv1connect.ShimServiceClient) error) error {
	if err := a.resolve(); err != nil {
		return err
	}
	start := time.Now()
	attempt := max(a.timeout/4, 2*time.Second)
	backoff := 50 * time.Millisecond
	var last error
	allRefused := true
	for i := 0; ; i++ {
		left := a.timeout - time.Since(start)
		if a.timeout > 0 && left <= 0 {
			break
		}
		per := attempt
		if a.timeout > 0 {
			per = min(per, left)
		}
		n := (a.first + i) % len(a.addrs)
		c, err := a.client(a.addrs[n])
		if err != nil {
			return err
		}
		cctx, cancel := context.WithTimeout(ctx, per)
		err = f(cctx, c)
		cancel()
		if err == nil {
			a.first = n
			return nil
		}
		if ctx.Err() != nil {
			return errInterrupted
		}
		if !answerLost(err) {
			a.first = n
			return srvErr(err)
		}
		last = err
		allRefused = allRefused && refused(err)
		if (i+1)%len(a.addrs) == 0 { // every address tried once more
			if allRefused {
				return &unreachableError{addrs: a.addrs, err: last}
			}
			allRefused = true
			select {
			case <-ctx.Done():
				return errInterrupted
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, time.Second)
		}
	}
	return fmt.Errorf("no answer within %s (%s; %s)", a.timeout, reason(last), what)
}
