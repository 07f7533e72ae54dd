package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"github.com/shim-run/shim/auth"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/table"
)

// The cluster's trust through the API: signing a joining node's certificate
// (Certify), client tokens (CreateToken, ListTokens, RevokeToken), Whoami,
// and committing the bootstrap's CA and first tokens (BootstrapTrust).

// Certify signs a joining node's certificate. The caller holds a join token
// (the interceptor checked it); the leader signs, with the CA the table
// keeps, a certificate for the name in the request and the addresses it
// asks for.
func (h *agentAPI) Certify(ctx context.Context, req *connect.Request[pb.CertifyRequest]) (*resp[pb.CertifyResponse], error) {
	s := h.s
	role := auth.RoleWorker
	switch req.Msg.Role {
	case pb.NodeRole_NODE_ROLE_SERVER:
		role = auth.RoleServer
	case pb.NodeRole_NODE_ROLE_WORKER:
	default:
		return nil, invalid("certify: role %s: a node is a server or a worker", req.Msg.Role)
	}
	return onLeader(withForward(ctx), s, 0, func() (*resp[pb.CertifyResponse], error) {
		tr := s.Table.Trust()
		if tr == nil {
			return nil, connect.NewError(connect.CodeUnavailable, errors.New("certify: the cluster has no CA yet"))
		}
		ca, err := auth.ParseCA(tr.CaCert, tr.CaKey)
		if err != nil {
			return nil, apiError(fmt.Errorf("certify: %w", err))
		}
		der, name, err := ca.Sign(req.Msg.Csr, role, s.Now())
		if err != nil {
			return nil, invalid("certify: %v", err)
		}
		// A live node's name is its own: a join token does not make a
		// second node with it (a dead node's may be taken over, as a
		// reinstalled host does).
		if n := s.Table.Node(name); n != nil && n.State == pb.NodeState_NODE_STATE_UP {
			return nil, connect.NewError(connect.CodeAlreadyExists, fmt.Errorf(
				"certify: node %s is up in this cluster; a new node needs a name of its own (or its old data dir)", name))
		}
		s.Log.Info("signed a node certificate", "node", name, "role", role, "token", callerOf(ctx).id.TokenID)
		return connect.NewResponse(&pb.CertifyResponse{Cert: der, CaCert: tr.CaCert, ClusterId: tr.ClusterId}), nil
	}, func(ctx context.Context, p *peer) (*resp[pb.CertifyResponse], error) {
		return p.agent.Certify(ctx, connect.NewRequest(req.Msg))
	})
}

// maxTokenName bounds a token's free-text name.
const maxTokenName = 256

var pbRoles = map[auth.Role]pb.TokenRole{
	auth.RoleAdmin:    pb.TokenRole_TOKEN_ROLE_ADMIN,
	auth.RoleOperator: pb.TokenRole_TOKEN_ROLE_OPERATOR,
	auth.RoleRead:     pb.TokenRole_TOKEN_ROLE_READ,
	auth.RoleNode:     pb.TokenRole_TOKEN_ROLE_NODE,
}

// NewTokenRecord makes a token of role and the record the table keeps of it
// (the secret's hash). A node token pins the CA (its pin, from the table).
func NewTokenRecord(role auth.Role, name, pin string, expires time.Time) (auth.Token, *pb.TokenRecord, error) {
	r, ok := pbRoles[role]
	if !ok {
		return auth.Token{}, nil, fmt.Errorf("%w: unknown token role %q", table.ErrInvalid, role)
	}
	if role != auth.RoleNode {
		pin = ""
	}
	tok := auth.NewToken(pin)
	rec := &pb.TokenRecord{Id: tok.ID, Hash: tok.Hash(), Role: r, Name: name}
	if !expires.IsZero() {
		rec.ExpiresUnixNano = expires.UnixNano()
	}
	return tok, rec, nil
}

func (h *shimAPI) CreateToken(ctx context.Context, req *connect.Request[pb.CreateTokenRequest]) (*resp[pb.CreateTokenResponse], error) {
	s := h.s
	if s.Table == nil {
		return forward(ctx, s, func(p *peer) (*resp[pb.CreateTokenResponse], error) {
			return p.shim.CreateToken(ctx, connect.NewRequest(req.Msg))
		})
	}
	m := req.Msg
	var role auth.Role
	for r, pr := range pbRoles {
		if pr == m.Role {
			role = r
		}
	}
	if role == "" {
		return nil, invalid("token role %s: use admin, operator, read or node", m.Role)
	}
	if m.TtlMillis < 0 {
		return nil, invalid("token ttl %dms is negative", m.TtlMillis)
	}
	if len(m.Name) > maxTokenName {
		return nil, invalid("token name is longer than %d bytes", maxTokenName)
	}
	tr := s.Table.Trust()
	if tr == nil {
		return nil, connect.NewError(connect.CodeUnavailable, errors.New("the cluster has no CA yet"))
	}
	var expires time.Time
	if m.TtlMillis > 0 {
		expires = s.Now().Add(time.Duration(m.TtlMillis) * time.Millisecond)
	}
	tok, rec, err := NewTokenRecord(role, m.Name, auth.Pin(tr.CaCert), expires)
	if err != nil {
		return nil, apiError(err)
	}
	res, err := s.apply(ctx, &pb.Command{Op: &pb.Command_AddToken{AddToken: &pb.AddToken{Token: rec}}})
	if err != nil {
		return nil, err
	}
	if err := s.waitIndex(ctx, res.Index); err != nil {
		return nil, err
	}
	s.Log.Info("token created", "id", tok.ID, "role", role, "by", callerOf(ctx).id.String())
	return connect.NewResponse(&pb.CreateTokenResponse{Token: tok.String(), Record: withoutHash(s.Table.Token(tok.ID))}), nil
}

func withoutHash(r *pb.TokenRecord) *pb.TokenRecord {
	if r == nil {
		return nil
	}
	r = proto.CloneOf(r)
	r.Hash = nil
	return r
}

func (h *shimAPI) ListTokens(ctx context.Context, req *connect.Request[pb.ListTokensRequest]) (*resp[pb.ListTokensResponse], error) {
	s := h.s
	if s.Table == nil {
		return forward(ctx, s, func(p *peer) (*resp[pb.ListTokensResponse], error) {
			return p.shim.ListTokens(ctx, connect.NewRequest(req.Msg))
		})
	}
	if err := s.linearize(ctx); err != nil {
		return nil, err
	}
	out := &pb.ListTokensResponse{}
	for _, r := range s.Table.Tokens() {
		out.Tokens = append(out.Tokens, withoutHash(r))
	}
	return connect.NewResponse(out), nil
}

func (h *shimAPI) RevokeToken(ctx context.Context, req *connect.Request[pb.RevokeTokenRequest]) (*resp[pb.RevokeTokenResponse], error) {
	s := h.s
	if s.Table == nil {
		return forward(ctx, s, func(p *peer) (*resp[pb.RevokeTokenResponse], error) {
			return p.shim.RevokeToken(ctx, connect.NewRequest(req.Msg))
		})
	}
	id := req.Msg.Id
	if err := auth.ValidTokenID(id); err != nil {
		return nil, invalid("revoke %q: %v", id, err)
	}
	res, err := s.apply(ctx, &pb.Command{Op: &pb.Command_RevokeToken{RevokeToken: &pb.RevokeToken{Id: id}}})
	if err != nil {
		return nil, err
	}
	if err := s.waitIndex(ctx, res.Index); err != nil {
		return nil, err
	}
	s.Log.Info("token revoked", "id", id, "by", callerOf(ctx).id.String())
	return connect.NewResponse(&pb.RevokeTokenResponse{}), nil
}

// Whoami says how this server sees the caller. A worker asks a server about
// a token it cannot check.
func (h *shimAPI) Whoami(ctx context.Context, req *connect.Request[pb.WhoamiRequest]) (*resp[pb.WhoamiResponse], error) {
	s := h.s
	id := callerOf(ctx).id
	if id.Unchecked {
		return forward(ctx, s, func(p *peer) (*resp[pb.WhoamiResponse], error) {
			return p.shim.Whoami(ctx, connect.NewRequest(req.Msg))
		})
	}
	out := &pb.WhoamiResponse{Role: string(id.Role), TokenId: id.TokenID, Node: id.Node}
	switch id.Kind {
	case auth.KindToken:
		out.Kind = "token"
	case auth.KindNode:
		out.Kind = "node"
	case auth.KindSelf:
		out.Kind = "self"
	}
	return connect.NewResponse(out), nil
}

// BootstrapTrust commits the cluster's CA and first tokens once this server
// leads, unless the table holds a CA already (a restart, or another server
// did). The bootstrap server calls it after Handler, before serving.
func (s *Server) BootstrapTrust(ctx context.Context, trust *pb.Trust, tokens []*pb.TokenRecord) error {
	backoff := 10 * time.Millisecond
	for !s.Raft.IsLeader() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("bootstrap trust: waiting to lead: %w", ctx.Err())
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 200*time.Millisecond)
	}
	if err := s.Raft.Barrier(ctx); err != nil {
		return fmt.Errorf("bootstrap trust: %w", err)
	}
	if s.Table.Trust() != nil {
		return nil
	}
	cmds := []*pb.Command{{Op: &pb.Command_SetTrust{SetTrust: &pb.SetTrust{Trust: trust}}}}
	for _, t := range tokens {
		cmds = append(cmds, &pb.Command{Op: &pb.Command_AddToken{AddToken: &pb.AddToken{Token: t}}})
	}
	for _, c := range cmds {
		if _, err := s.apply(ctx, c); err != nil && connect.CodeOf(err) != connect.CodeAlreadyExists {
			return fmt.Errorf("bootstrap trust: %w", err)
		}
	}
	return nil
}

// probeRaft checks, before a server is added as a voter, that its Raft
// address answers over TLS with its own server certificate: a voter that
// cannot be reached would count against the quorum from then on.
func (s *Server) probeRaft(ctx context.Context, name, addr string) error {
	if s.ProbeRaft != nil {
		return s.ProbeRaft(ctx, name, addr)
	}
	if !s.secure() {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	d := tls.Dialer{NetDialer: &net.Dialer{}, Config: s.Auth.TLS(auth.RaftClient)}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("its Raft address %s does not answer: %w", addr, err)
	}
	defer conn.Close()
	st := conn.(*tls.Conn).ConnectionState()
	id, err := auth.NodeOf(st.PeerCertificates[0])
	if err != nil {
		return fmt.Errorf("its Raft address %s: %w", addr, err)
	}
	if id.Node != name {
		return fmt.Errorf("its Raft address %s answers as node %s", addr, id.Node)
	}
	return nil
}
