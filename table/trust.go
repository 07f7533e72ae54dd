package table

import (
	"fmt"
	"sort"

	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Cluster trust: the CA and the client tokens.
//
// The table keeps the cluster's CA (certificate and key) so that whichever
// server leads can sign a joining node's certificate, and the tokens users
// and joining nodes present, as SHA-256 hashes of their secrets, so that any
// server can check one. The table does no cryptography: it stores what the
// commands carry, refuses a second CA, and keeps tokens by id.

// MaxTokens bounds how many tokens the table keeps.
const MaxTokens = 10000

// Trust returns the cluster's trust record, or nil before bootstrap set it.
// The record is shared: do not modify it.
func (t *Table) Trust() *pb.Trust {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.trust
}

// Token returns the token with id, or nil. The record is shared: do not
// modify it.
func (t *Table) Token(id string) *pb.TokenRecord {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.tokens[id]
}

// Tokens returns every token, sorted by id. The records are shared.
func (t *Table) Tokens() []*pb.TokenRecord {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return sortedTokens(t.tokens)
}

func sortedTokens(m map[string]*pb.TokenRecord) []*pb.TokenRecord {
	out := make([]*pb.TokenRecord, 0, len(m))
	for _, tk := range m {
		out = append(out, tk)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Id < out[j].Id })
	return out
}

// setTrust sets the CA and cluster ID, once.
func (x *txn) setTrust(tr *pb.Trust) error {
	switch {
	case tr == nil || tr.ClusterId == "":
		return fmt.Errorf("%w: trust without a cluster id", ErrInvalid)
	case len(tr.CaCert) == 0 || len(tr.CaKey) == 0:
		return fmt.Errorf("%w: trust without a CA certificate and key", ErrInvalid)
	case x.t.trust != nil:
		return fmt.Errorf("%w: the cluster already has a CA (cluster %s)", ErrExists, x.t.trust.ClusterId)
	}
	x.t.trust = proto.CloneOf(tr)
	return nil
}

// addToken stores a new token.
func (x *txn) addToken(tk *pb.TokenRecord) error {
	if tk == nil {
		return fmt.Errorf("%w: empty token", ErrInvalid)
	}
	if err := ValidateID(tk.Id); err != nil {
		return fmt.Errorf("%w: token id %q", ErrInvalid, tk.Id)
	}
	switch {
	case len(tk.Hash) != 32:
		return fmt.Errorf("%w: token %s: its hash is not a SHA-256", ErrInvalid, tk.Id)
	case tk.Role == pb.TokenRole_TOKEN_ROLE_UNSPECIFIED || pb.TokenRole_name[int32(tk.Role)] == "":
		return fmt.Errorf("%w: token %s has no role", ErrInvalid, tk.Id)
	case tk.ExpiresUnixNano < 0:
		return fmt.Errorf("%w: token %s expires before 1970", ErrInvalid, tk.Id)
	case len(tk.Name) > 256:
		return fmt.Errorf("%w: token %s: name longer than 256 bytes", ErrInvalid, tk.Id)
	case x.t.tokens[tk.Id] != nil:
		return fmt.Errorf("%w: token %s", ErrExists, tk.Id)
	case len(x.t.tokens) >= MaxTokens:
		return fmt.Errorf("%w: %d tokens already; revoke some first", ErrInvalid, MaxTokens)
	}
	rec := proto.CloneOf(tk)
	if rec.CreatedUnixNano == 0 {
		rec.CreatedUnixNano = x.now
	}
	x.t.tokens[rec.Id] = rec
	return nil
}

// revokeToken forgets a token.
func (x *txn) revokeToken(id string) error {
	if x.t.tokens[id] == nil {
		return fmt.Errorf("%w: no token %q", ErrNotFound, id)
	}
	delete(x.t.tokens, id)
	return nil
}
