package main

import (
	"context"

	"github.com/shim-run/shim/client"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

// Retries that cannot duplicate (client.Retry). Each `shim spawn` makes one
// random 128-bit request id and sends every attempt with it, to any member,
// until --timeout: the table answers a retry with the processes the first
// attempt created (table/requests.go), so retrying never makes a second
// copy. Kill retries the same way: killing a process that is already
// stopping changes nothing.

// newRequestID returns a random 128-bit request id, in hex.
func newRequestID() string { return client.NewRequestID() }

// callRetry runs f, which must be safe to repeat, under client.Retry. what
// names the request in the final error.
func (a *app) callRetry(ctx context.Context, what string, f func(context.Context, shimv1connect.ShimServiceClient) error) error {
	if err := a.resolve(); err != nil {
		return err
	}
	return cliErr(a.cl.Retry(ctx, what, f))
}
