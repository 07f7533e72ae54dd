// Package client is a Go client for a shim cluster's API: typed calls that
// fail over between the members given and retry, without duplicating, when
// an answer may have been lost. The shim CLI is built on it.
//
// A call tries each address in turn, starting with the one that answered
// last, and moves on only when an address did not answer (nothing listens,
// the member cannot reach a leader): a server's refusal is final. Spawn and
// Kill are safe to repeat (a spawn carries a request id the table answers
// retries with), so they also retry while answers are lost, for at most the
// call's Timeout in all.
package client

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

// DefaultPort is the API port an address without one gets.
const DefaultPort = "7070"

// Dialer makes the API client of one member from its base URL
// ("https://host:port").
type Dialer func(baseURL string) (shimv1connect.ShimServiceClient, error)

// Config says where the cluster is and how to talk to it.
type Config struct {
	// Addrs are members' API addresses, HOST[:PORT], each with an optional
	// https:// (the default) or http:// prefix (a cluster with trust off).
	Addrs []string
	// Token is sent as "Authorization: Bearer TOKEN" ("" sends none).
	Token string
	// TLS is used for https addresses; its RootCAs should hold the
	// cluster's CA (ca.pem in the bootstrap server's data dir).
	TLS *tls.Config
	// Timeout bounds each call (a retried call in all); 0 means none.
	Timeout time.Duration
	// Dial replaces the default HTTP dialer built from Token and TLS.
	Dial Dialer
}

// Client is a failover client. It is safe for concurrent use.
type Client struct {
	addrs   []string // base URLs
	timeout time.Duration
	dial    Dialer

	mu      sync.Mutex
	clients map[string]shimv1connect.ShimServiceClient
	first   int // the address that answered last
}

// New checks cfg and returns a client. It does not connect.
func New(cfg Config) (*Client, error) {
	addrs, err := ParseAddrs(strings.Join(cfg.Addrs, ","))
	if err != nil {
		return nil, err
	}
	if cfg.Timeout < 0 {
		return nil, fmt.Errorf("timeout %s: negative", cfg.Timeout)
	}
	c := &Client{addrs: addrs, timeout: cfg.Timeout, dial: cfg.Dial,
		clients: map[string]shimv1connect.ShimServiceClient{}}
	if c.dial == nil {
		c.dial = HTTPDialer(cfg.Token, cfg.TLS, cfg.Timeout)
	}
	return c, nil
}

// AddrError is an address that is not HOST:PORT.
type AddrError struct {
	Addr string
	Err  error
}

func (e *AddrError) Error() string { return fmt.Sprintf("address %q: %v", e.Addr, e.Err) }
func (e *AddrError) Unwrap() error { return e.Err }

// ParseAddrs splits a comma-separated address list into base URLs. Each
// entry is HOST[:PORT] with an optional https:// (the default) or http://
// prefix; a missing port means DefaultPort.
func ParseAddrs(v string) ([]string, error) {
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
				return nil, &AddrError{raw, errors.New("use HOST:PORT")}
			}
			s = net.JoinHostPort(strings.Trim(s, "[]"), DefaultPort)
		}
		host, port, _ := net.SplitHostPort(s)
		if host == "" || port == "" || strings.ContainsAny(s, "/?#@ ") {
			return nil, &AddrError{raw, errors.New("use HOST:PORT")}
		}
		out = append(out, scheme+s)
	}
	if len(out) == 0 {
		return nil, &AddrError{v, errors.New("no address")}
	}
	return out, nil
}

// HTTPDialer is the default Dialer: HTTP/2 over TLS (or plain HTTP for
// http:// addresses), the token on every request. timeout bounds dialling
// (3 s at most).
func HTTPDialer(token string, tc *tls.Config, timeout time.Duration) Dialer {
	dialTimeout := min(3*time.Second, timeout)
	if dialTimeout <= 0 {
		dialTimeout = 3 * time.Second
	}
	return func(baseURL string) (shimv1connect.ShimServiceClient, error) {
		if strings.HasPrefix(baseURL, "https://") && tc == nil {
			return nil, fmt.Errorf("%s: https needs a TLS config with the cluster's CA", HostOf(baseURL))
		}
		tr := &http.Transport{
			DialContext:         (&net.Dialer{Timeout: dialTimeout, KeepAlive: 30 * time.Second}).DialContext,
			TLSClientConfig:     tc,
			ForceAttemptHTTP2:   true,
			TLSHandshakeTimeout: dialTimeout,
			MaxIdleConnsPerHost: 4,
			IdleConnTimeout:     90 * time.Second,
		}
		return shimv1connect.NewShimServiceClient(&http.Client{Transport: tr}, baseURL, Bearer(token)), nil
	}
}

// Bearer is a client option that sends tok as a bearer token with every
// call, streams included.
func Bearer(tok string) connect.Option {
	return connect.WithInterceptors(bearerInterceptor(tok))
}

type bearerInterceptor string

func (b bearerInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if b != "" {
			req.Header().Set("Authorization", "Bearer "+string(b))
		}
		return next(ctx, req)
	}
}

func (b bearerInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, spec)
		if b != "" {
			conn.RequestHeader().Set("Authorization", "Bearer "+string(b))
		}
		return conn
	}
}

func (b bearerInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

// Addrs returns the base URLs the client tries.
func (c *Client) Addrs() []string { return append([]string(nil), c.addrs...) }

// Timeout is the per-call timeout the client was made with.
func (c *Client) Timeout() time.Duration { return c.timeout }

// Member is the address (host:port) that answered the last call.
func (c *Client) Member() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return HostOf(c.addrs[c.first])
}

func (c *Client) start() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.first
}

func (c *Client) answered(n int) {
	c.mu.Lock()
	c.first = n
	c.mu.Unlock()
}

func (c *Client) member(n int) (shimv1connect.ShimServiceClient, error) {
	base := c.addrs[n]
	c.mu.Lock()
	defer c.mu.Unlock()
	if m, ok := c.clients[base]; ok {
		return m, nil
	}
	m, err := c.dial(base)
	if err != nil {
		return nil, err
	}
	c.clients[base] = m
	return m, nil
}

// ErrInterrupted is returned when the caller's context ended the call.
var ErrInterrupted = errors.New("interrupted")

// UnreachableError means no address answered.
type UnreachableError struct {
	Addrs []string // base URLs
	Err   error    // the last address's error
}

func (e *UnreachableError) Error() string {
	hosts := make([]string, len(e.Addrs))
	for i, u := range e.Addrs {
		hosts[i] = HostOf(u)
	}
	return fmt.Sprintf("cannot reach shim at %s: %s", strings.Join(hosts, ","), Reason(e.Err))
}

func (e *UnreachableError) Unwrap() error { return e.Err }

// TimeoutError means a member took longer than the timeout to answer.
type TimeoutError struct {
	Addr    string // host:port
	Timeout time.Duration
	Err     error
}

func (e *TimeoutError) Error() string {
	return fmt.Sprintf("no answer from %s within %s", e.Addr, e.Timeout)
}

func (e *TimeoutError) Unwrap() error { return e.Err }

// LostError means every retry of a repeatable call lost its answer until
// the timeout: it may or may not have been done.
type LostError struct {
	Timeout time.Duration
	What    string // what to do about it
	Err     error
}

func (e *LostError) Error() string {
	return fmt.Sprintf("no answer within %s (%s; %s)", e.Timeout, Reason(e.Err), e.What)
}

func (e *LostError) Unwrap() error { return e.Err }

// HostOf strips the scheme from a base URL.
func HostOf(baseURL string) string {
	if _, rest, ok := strings.Cut(baseURL, "://"); ok {
		return rest
	}
	return baseURL
}

// Unreachable reports whether err means "this address did not answer", so
// the next one should be tried. The request was not processed in that case.
func Unreachable(err error) bool {
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

// AnswerLost reports whether a call's answer may have been lost, or the
// call not made at all, so that a retry of a repeatable call is worth
// trying: the member could not be reached or could not reach a leader, or
// the connection broke or the attempt timed out after the request was sent.
func AnswerLost(err error) bool {
	if Unreachable(err) {
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

// Reason is the most specific part of a connection error: "connection refused".
func Reason(err error) string {
	var se *os.SyscallError
	var dns *net.DNSError
	var op *net.OpError
	var ce *connect.Error
	switch {
	case err == nil:
		return "no error"
	case notShim(err):
		return "not a shim API (HTTP 404 Not Found)"
	case errors.As(err, &se):
		return se.Err.Error()
	case errors.As(err, &dns):
		return dns.Error()
	case errors.As(err, &op):
		return op.Err.Error()
	case errors.As(err, &ce):
		if ce.Message() == "" {
			return ce.Code().String()
		}
		return ce.Message()
	}
	return err.Error()
}

// Call runs f against each address in turn until one answers, each attempt
// bounded by the client's Timeout. A member's refusal comes back as the
// *connect.Error it sent; no answer at all as *UnreachableError.
func (c *Client) Call(ctx context.Context, f func(context.Context, shimv1connect.ShimServiceClient) error) error {
	return c.CallTimeout(ctx, c.timeout, f)
}

// CallTimeout is Call with its own timeout for each attempt (0: none), for
// streams that run long.
func (c *Client) CallTimeout(ctx context.Context, timeout time.Duration, f func(context.Context, shimv1connect.ShimServiceClient) error) error {
	var last error
	first := c.start()
	for i := range c.addrs {
		n := (first + i) % len(c.addrs)
		cctx, cancel := ctx, context.CancelFunc(func() {})
		if timeout > 0 {
			cctx, cancel = context.WithTimeout(ctx, timeout)
		}
		m, err := c.member(n)
		if err != nil {
			cancel()
			return err
		}
		err = f(cctx, m)
		cancel()
		if err == nil {
			c.answered(n)
			return nil
		}
		if ctx.Err() != nil {
			return ErrInterrupted
		}
		if !Unreachable(err) {
			c.answered(n)
			if connect.CodeOf(err) == connect.CodeDeadlineExceeded {
				return &TimeoutError{Addr: HostOf(c.addrs[n]), Timeout: timeout, Err: err}
			}
			return err
		}
		last = err
	}
	return &UnreachableError{Addrs: c.addrs, Err: last}
}

// Retry runs f, which must be safe to repeat, against the addresses in turn
// until one answers, retrying while answers are lost, for at most the
// client's Timeout in all (each attempt gets a share, so that one stuck on
// a dead member leaves time for others). It gives up at once when no
// address is listening at all. what says what to do if the answer never
// comes (it ends up in the *LostError).
func (c *Client) Retry(ctx context.Context, what string, f func(context.Context, shimv1connect.ShimServiceClient) error) error {
	start := time.Now()
	attempt := max(c.timeout/4, 2*time.Second)
	backoff := 50 * time.Millisecond
	var last error
	allRefused := true
	first := c.start()
	for i := 0; ; i++ {
		left := c.timeout - time.Since(start)
		if c.timeout > 0 && left <= 0 {
			break
		}
		per := attempt
		if c.timeout > 0 {
			per = min(per, left)
		}
		n := (first + i) % len(c.addrs)
		m, err := c.member(n)
		if err != nil {
			return err
		}
		cctx, cancel := context.WithTimeout(ctx, per)
		err = f(cctx, m)
		cancel()
		if err == nil {
			c.answered(n)
			return nil
		}
		if ctx.Err() != nil {
			return ErrInterrupted
		}
		if !AnswerLost(err) {
			c.answered(n)
			return err
		}
		last = err
		allRefused = allRefused && refused(err)
		if (i+1)%len(c.addrs) == 0 { // every address tried once more
			if allRefused {
				return &UnreachableError{Addrs: c.addrs, Err: last}
			}
			allRefused = true
			select {
			case <-ctx.Done():
				return ErrInterrupted
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, time.Second)
		}
	}
	return &LostError{Timeout: c.timeout, What: what, Err: last}
}
