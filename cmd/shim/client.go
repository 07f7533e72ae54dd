package main

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/shim-run/shim/client"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

// The CLI calls the cluster through package client (failover between the
// --addr members, retries that cannot duplicate); here it finds the
// addresses and credentials and turns the package's errors into one line.

// parseAddrs splits an --addr value into base URLs (client.ParseAddrs),
// refusing a bad one as a usage error.
func parseAddrs(v string) ([]string, error) {
	out, err := client.ParseAddrs(v)
	var ae *client.AddrError
	if errors.As(err, &ae) {
		return nil, flagError("addr", ae.Addr, ae.Err)
	}
	return out, err
}

// resolve picks the address list from --addr, $SHIM_ADDR or the default,
// and makes the client.
func (a *app) resolve() error {
	if a.cl != nil {
		return nil
	}
	v := a.addrFlag
	if v == "" {
		v = a.getenv("SHIM_ADDR")
	}
	if v == "" {
		v = defaultAddr
	}
	addrs, err := parseAddrs(v)
	if err != nil {
		return err
	}
	cl, err := client.New(client.Config{Addrs: addrs, Timeout: a.timeout, Dial: a.dial})
	if err != nil {
		return err
	}
	a.addrs, a.cl = addrs, cl
	return nil
}

// httpDial is the CLI's dialer: the credentials it finds (creds.go), an
// https address needing the CA too.
func (a *app) httpDial(baseURL string) (shimv1connect.ShimServiceClient, error) {
	cr, err := a.credentials(strings.HasPrefix(baseURL, "https://"))
	if err != nil {
		return nil, err
	}
	return client.HTTPDialer(cr.token, cr.tls, a.timeout)(baseURL)
}

var errInterrupted = client.ErrInterrupted

// unreachable reports whether err means "this address did not answer".
func unreachable(err error) bool { return client.Unreachable(err) }

// cliErr keeps the client's own errors (one line each) and turns a
// server's refusal into a plain error carrying its message.
func cliErr(err error) error {
	var ue *client.UnreachableError
	var te *client.TimeoutError
	var le *client.LostError
	if err == nil || errors.Is(err, client.ErrInterrupted) || errors.As(err, &ue) || errors.As(err, &te) || errors.As(err, &le) {
		return err
	}
	return srvErr(err)
}

// call runs f against each address in turn until one answers, with the
// per-call timeout.
func (a *app) call(ctx context.Context, f func(context.Context, shimv1connect.ShimServiceClient) error) error {
	return a.callTimeout(ctx, a.timeout, f)
}

func (a *app) callTimeout(ctx context.Context, timeout time.Duration, f func(context.Context, shimv1connect.ShimServiceClient) error) error {
	if err := a.resolve(); err != nil {
		return err
	}
	return cliErr(a.cl.CallTimeout(ctx, timeout, f))
}
