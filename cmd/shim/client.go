package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

// parseAddrs splits an --addr value into base URLs. Each entry is host:port
// with an optional https:// (the default) or http:// prefix (a cluster
// running with trust off); a missing port means 7070.
func parseAddrs(v string) ([]string, error) {
	var out []string
	for _, raw := range strings.Split(v, ",") {
		s := strings.TrimSpace(raw)
		if s == "" {
			continue
		}
		scheme := "https://"
		if rest, ok := strings.CutPrefix(s, "http://"); ok {
			s, scheme = rest, "http://"
		} else if rest, ok := strings.CutPrefix(s, "https://"); ok {
			s = rest
		}
		s = strings.TrimSuffix(s, "/")
		if _, _, err := net.SplitHostPort(s); err != nil {
			if strings.Contains(s, ":") && !strings.HasPrefix(s, "[") {
				return nil, flagError("addr", raw, errors.New("use HOST:PORT"))
			}
			s = net.JoinHostPort(strings.Trim(s, "[]"), "7070")
		}
		host, port, _ := net.SplitHostPort(s)
		if host == "" || port == "" || strings.ContainsAny(s, "/?#@ ") {
			return nil, flagError("addr", raw, errors.New("use HOST:PORT"))
		}
		out = append(out, scheme+s)
	}
	if len(out) == 0 {
		return nil, flagError("addr", v, errors.New("no address"))
	}
	return out, nil
}

// resolve picks the address list from --addr, $SHIM_ADDR or the default.
func (a *app) resolve() error {
	if a.addrs != nil {
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
	a.addrs = addrs
	a.clients = make(map[string]shimv1connect.ShimServiceClient)
	return nil
}

func (a *app) httpDial(baseURL string) (shimv1connect.ShimServiceClient, error) {
	cr, err := a.credentials(strings.HasPrefix(baseURL, "https://"))
	if err != nil {
		return nil, err
	}
	dialTimeout := min(3*time.Second, a.timeout)
	if dialTimeout <= 0 {
		dialTimeout = 3 * time.Second
	}
	tr := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: dialTimeout, KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:     cr.tls,
		TLSHandshakeTimeout: dialTimeout,
		MaxIdleConnsPerHost: 4,
		IdleConnTimeout:     90 * time.Second,
	}
	return shimv1connect.NewShimServiceClient(&http.Client{Transport: tr}, baseURL, bearer(cr.token)), nil
}

func (a *app) client(baseURL string) (shimv1connect.ShimServiceClient, error) {
	c, ok := a.clients[baseURL]
	if !ok {
		var err error
		if c, err = a.dial(baseURL); err != nil {
			return nil, err
		}
		a.clients[baseURL] = c
	}
	return c, nil
}

var errInterrupted = errors.New("interrupted")

// unreachableError means no address answered.
type unreachableError struct {
	addrs []string
	err   error
}

func (e *unreachableError) Error() string {
	hosts := make([]string, len(e.addrs))
	for i, u := range e.addrs {
		hosts[i] = hostOf(u)
	}
	return fmt.Sprintf("cannot reach shim at %s: %s", strings.Join(hosts, ","), reason(e.err))
}

func (e *unreachableError) Unwrap() error { return e.err }

// hostOf strips the scheme from a base URL.
func hostOf(baseURL string) string {
	if _, rest, ok := strings.Cut(baseURL, "://"); ok {
		return rest
	}
	return baseURL
}

// unreachable reports whether err means "this address did not answer", so
// the next one should be tried. The request was not processed in that case.
func unreachable(err error) bool {
	if connect.CodeOf(err) == connect.CodeUnavailable || notShim(err) {
		return true
	}
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

// notShim reports an HTTP 404 from the address: something else listens there.
func notShim(err error) bool {
	var ce *connect.Error
	return errors.As(err, &ce) && ce.Code() == connect.CodeUnimplemented && ce.Message() == "404 Not Found"
}

// reason is the most specific part of a connection error: "connection refused".
func reason(err error) string {
	var se *os.SyscallError
	var dns *net.DNSError
	var op *net.OpError
	var ce *connect.Error
	switch {
	case notShim(err):
		return "not a shim API (HTTP 404 Not Found)"
	case errors.As(err, &se):
		return se.Err.Error()
	case errors.As(err, &dns):
		return dns.Error()
	case errors.As(err, &op):
		return op.Err.Error()
	case errors.As(err, &ce):
		return serverMessage(ce)
	}
	return err.Error()
}

// call runs f against each address in turn until one answers, with the
// per-call timeout. Server errors are returned as plain errors carrying the
// server's message.
func (a *app) call(ctx context.Context, f func(context.Context, shimv1connect.ShimServiceClient) error) error {
	return a.callTimeout(ctx, a.timeout, f)
}

func (a *app) callTimeout(ctx context.Context, timeout time.Duration, f func(context.Context, shimv1connect.ShimServiceClient) error) error {
	if err := a.resolve(); err != nil {
		return err
	}
	var last error
	for i := range a.addrs {
		n := (a.first + i) % len(a.addrs)
		cctx, cancel := ctx, context.CancelFunc(func() {})
		if timeout > 0 {
			cctx, cancel = context.WithTimeout(ctx, timeout)
		}
		c, err := a.client(a.addrs[n])
		if err != nil {
			cancel()
			return err
		}
		err = f(cctx, c)
		cancel()
		if err == nil {
			a.first = n
			return nil
		}
		if ctx.Err() != nil {
			return errInterrupted
		}
		if !unreachable(err) {
			a.first = n
			if connect.CodeOf(err) == connect.CodeDeadlineExceeded {
				return fmt.Errorf("no answer from %s within %s", hostOf(a.addrs[n]), timeout)
			}
			return srvErr(err)
		}
		last = err
	}
	return &unreachableError{addrs: a.addrs, err: last}
}
