package server

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/shim-run/shim/auth"
	pb "github.com/shim-run/shim/proto/shimv1"
)

// Who may call what.
//
// Every request passes one http.Handler (authenticate) that works out who
// the caller is and puts it in the request's context: a node, by the client
// certificate the TLS handshake verified against the cluster CA, or a user,
// by the bearer token in its Authorization header, which wins when both are
// there (a worker passing a user's call on presents its own certificate and
// the user's token). A server checks the token against the table's hash; a
// worker holds no table, so it marks the token unchecked and passes the call
// on with it, and the server decides.
//
// What the caller may do is auth.Allow's answer, asked in one Connect
// interceptor for every RPC, and in serveHeartbeatStream and the /metrics
// handler, which no interceptor sees. What only the request says is checked
// in the handlers: a node heartbeats, reports, reads assignments and joins
// only as itself (auth.ActsFor), an operator spawns nothing as root and
// nothing on the host (checkSpawn), and a workload's self token reads and
// resizes only its own process (sandbox.go).
//
// A refusal is one line: Connect's unauthenticated (no credentials, or a bad
// token) or permission_denied (credentials without the right), and the
// table is not touched.

// caller is who sent a request, as authenticate found.
type caller struct {
	id    auth.Identity
	err   error  // why the credentials offered were refused (unauthenticated)
	token string // the bearer token as sent, to pass on from a worker
}

type callerKey struct{}

// forwardKey marks a context whose outgoing calls pass the caller's token
// on: every request a worker answers (it answers by passing the call on),
// and a join token's call a follower passes to the leader.
type forwardKey struct{}

func callerOf(ctx context.Context) caller {
	if c, ok := ctx.Value(callerKey{}).(caller); ok {
		return c
	}
	return caller{}
}

// withForward makes calls made with ctx carry the caller's token.
func withForward(ctx context.Context) context.Context {
	return context.WithValue(ctx, forwardKey{}, true)
}

// secure reports whether trust is on.
func (s *Server) secure() bool { return s.Auth != nil }

// tlsFor returns the client tls.Config for use, nil when trust is off.
func (s *Server) tlsFor(use auth.Use) *tls.Config {
	if s.Auth == nil {
		return nil
	}
	return s.Auth.TLS(use)
}

// authenticate puts the caller in the request's context.
func (s *Server) authenticate(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx := context.WithValue(r.Context(), callerKey{}, s.identify(r))
		if s.Table == nil {
			ctx = withForward(ctx)
		}
		next.ServeHTTP(w, r.WithContext(ctx))
	})
}

func (s *Server) identify(r *http.Request) caller {
	if !s.secure() {
		return caller{id: auth.Self}
	}
	var c caller
	if r.TLS != nil && len(r.TLS.VerifiedChains) > 0 && len(r.TLS.VerifiedChains[0]) > 0 {
		id, err := auth.NodeOf(r.TLS.VerifiedChains[0][0])
		if err != nil {
			return caller{err: fmt.Errorf("%w: %v", auth.ErrUnauthenticated, err)}
		}
		c.id = id
	}
	h := r.Header.Get("Authorization")
	if h == "" {
		return c
	}
	raw, ok := cutPrefixFold(h, "Bearer ")
	if !ok {
		return caller{err: fmt.Errorf("%w: the Authorization header is not \"Bearer TOKEN\"", auth.ErrUnauthenticated)}
	}
	id, err := s.checkToken(r.Context(), raw)
	if err != nil {
		return caller{err: err}
	}
	return caller{id: id, token: raw}
}

func cutPrefixFold(s, prefix string) (string, bool) {
	if len(s) < len(prefix) || !strings.EqualFold(s[:len(prefix)], prefix) {
		return "", false
	}
	return strings.TrimSpace(s[len(prefix):]), true
}

// checkToken finds the token in the table and checks its secret and expiry,
// or checks a workload's self token (checkSelfToken). A worker only checks
// its form (unchecked). A token this server's table does not hold is looked
// for again once the table holds everything the leader had committed
// (read.go): a server that restarted may not have replayed its creation
// yet. If that cannot be confirmed, the caller is told unavailable rather
// than unauthenticated.
func (s *Server) checkToken(ctx context.Context, raw string) (auth.Identity, error) {
	if auth.IsSelfToken(raw) {
		return s.checkSelfToken(raw)
	}
	tok, err := auth.ParseToken(raw)
	if err != nil {
		return auth.Identity{}, fmt.Errorf("%w: %v", auth.ErrUnauthenticated, err)
	}
	if s.Table == nil {
		return auth.Identity{Kind: auth.KindToken, TokenID: tok.ID, Unchecked: true}, nil
	}
	rec := s.Table.Token(tok.ID)
	if rec == nil {
		if err := s.linearize(ctx); err != nil {
			return auth.Identity{}, err
		}
		rec = s.Table.Token(tok.ID)
	}
	if rec == nil || !tok.Matches(rec.Hash) {
		return auth.Identity{}, fmt.Errorf("%w: token %s is not valid (unknown, revoked, or a wrong secret)", auth.ErrUnauthenticated, tok.ID)
	}
	if exp := rec.ExpiresUnixNano; exp > 0 && s.Now().UnixNano() >= exp {
		return auth.Identity{}, fmt.Errorf("%w: token %s expired at %s", auth.ErrUnauthenticated, tok.ID,
			time.Unix(0, exp).UTC().Format(time.RFC3339))
	}
	role, ok := tokenRoles[rec.Role]
	if !ok {
		return auth.Identity{}, fmt.Errorf("%w: token %s has no role", auth.ErrUnauthenticated, tok.ID)
	}
	return auth.Identity{Kind: auth.KindToken, Role: role, TokenID: tok.ID}, nil
}

var tokenRoles = map[pb.TokenRole]auth.Role{
	pb.TokenRole_TOKEN_ROLE_ADMIN:    auth.RoleAdmin,
	pb.TokenRole_TOKEN_ROLE_OPERATOR: auth.RoleOperator,
	pb.TokenRole_TOKEN_ROLE_READ:     auth.RoleRead,
	pb.TokenRole_TOKEN_ROLE_NODE:     auth.RoleNode,
}

// allow checks the caller of ctx against procedure.
func allow(ctx context.Context, procedure string) error {
	c := callerOf(ctx)
	if c.err != nil {
		return authError(c.err)
	}
	return authError(auth.Allow(c.id, procedure))
}

// actsFor checks that the caller of ctx may speak for node.
func actsFor(ctx context.Context, node string) error {
	return authError(auth.ActsFor(callerOf(ctx).id, node))
}

// authError turns auth's refusals into Connect errors.
func authError(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, auth.ErrUnauthenticated):
		return connect.NewError(connect.CodeUnauthenticated, err)
	case errors.Is(err, auth.ErrPermissionDenied):
		return connect.NewError(connect.CodePermissionDenied, err)
	}
	return apiError(err)
}

// httpAuthError writes a refusal on a plain HTTP path.
func httpAuthError(w http.ResponseWriter, err error) {
	code := http.StatusForbidden
	if connect.CodeOf(err) == connect.CodeUnauthenticated {
		code = http.StatusUnauthorized
	}
	var ce *connect.Error
	msg := err.Error()
	if errors.As(err, &ce) {
		msg = ce.Message()
	}
	http.Error(w, msg, code)
}

// authInterceptor asks Allow about every RPC this server answers, and passes
// the caller's token on in the calls it makes with a forwarding context.
type authInterceptor struct{}

func (authInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if req.Spec().IsClient {
			if tok := forwardToken(ctx); tok != "" {
				req.Header().Set("Authorization", "Bearer "+tok)
			}
			return next(ctx, req)
		}
		if err := allow(ctx, req.Spec().Procedure); err != nil {
			return nil, err
		}
		return next(ctx, req)
	}
}

func (authInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, spec)
		if tok := forwardToken(ctx); tok != "" {
			conn.RequestHeader().Set("Authorization", "Bearer "+tok)
		}
		return conn
	}
}

func (authInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		if err := allow(ctx, conn.Spec().Procedure); err != nil {
			return err
		}
		return next(ctx, conn)
	}
}

func forwardToken(ctx context.Context) string {
	if ctx.Value(forwardKey{}) == nil {
		return ""
	}
	return callerOf(ctx).token
}

// ---- /metrics ----

// metricsGate lets /metrics through to a read token (or better), unless the
// metrics are open. A worker cannot check a token, so it asks a server
// (Whoami) and remembers the answer for a few seconds.
func (s *Server) metricsGate(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !s.MetricsOpen {
			c := callerOf(r.Context())
			if c.err == nil && c.id.Unchecked {
				c = s.whoamiCached(r.Context(), c)
			}
			err := c.err
			if err == nil {
				err = auth.Allow(c.id, auth.ProcMetrics)
			}
			if err != nil {
				httpAuthError(w, authError(err))
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

// whoamiTTL is how long a worker trusts a server's word on a token.
const whoamiTTL = 5 * time.Second

type whoamiCache struct {
	mu sync.Mutex
	m  map[[32]byte]whoamiEntry
}

type whoamiEntry struct {
	c   caller
	exp time.Time
}

// whoamiCached asks a server who the token of c is.
func (s *Server) whoamiCached(ctx context.Context, c caller) caller {
	key := sha256.Sum256([]byte(c.token))
	now := s.Now()
	s.whoami.mu.Lock()
	e, ok := s.whoami.m[key]
	s.whoami.mu.Unlock()
	if ok && now.Before(e.exp) {
		return e.c
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	resp, err := forward(ctx, s, func(p *peer) (*resp[pb.WhoamiResponse], error) {
		return p.shim.Whoami(ctx, connect.NewRequest(&pb.WhoamiRequest{}))
	})
	out := caller{token: c.token}
	switch {
	case err == nil && resp.Msg.Kind == "token":
		out.id = auth.Identity{Kind: auth.KindToken, Role: auth.Role(resp.Msg.Role), TokenID: resp.Msg.TokenId}
	case err == nil:
		out.err = fmt.Errorf("%w: not a token", auth.ErrUnauthenticated)
	case connect.CodeOf(err) == connect.CodeUnauthenticated:
		out.err = err
	default:
		return caller{err: err} // not an answer about the token: do not remember it
	}
	s.whoami.mu.Lock()
	if s.whoami.m == nil || len(s.whoami.m) > 1024 {
		s.whoami.m = map[[32]byte]whoamiEntry{}
	}
	s.whoami.m[key] = whoamiEntry{out, now.Add(whoamiTTL)}
	s.whoami.mu.Unlock()
	return out
}
