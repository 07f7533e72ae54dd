package auth

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
)

// Token formats.
//
// A client token is "<id>.<secret>": 12 hex digits naming it (shown by
// `shim token list`, used to revoke it) and 32 hex digits of secret. A join
// token is a node token that also pins the cluster CA, as k3s's K10 tokens
// and kubeadm's discovery hash do:
//
//	SHIM1<64 hex digits: SHA-256 of the CA certificate>::<id>.<secret>
//
// so that the joiner recognizes the cluster before it trusts anything.
const (
	joinPrefix = "SHIM1"
	pinSep     = "::"
	idLen      = 12
	secretLen  = 32
	pinLen     = 64
)

// ErrToken means a token is malformed.
var ErrToken = errors.New("malformed token")

// Token is a parsed token.
type Token struct {
	ID     string
	Secret string
	Pin    string // join tokens only: the CA's pin
}

// NewToken makes a token with a random id and secret; pin, if set, makes it
// a join token.
func NewToken(pin string) Token {
	return Token{ID: randHex(idLen / 2), Secret: randHex(secretLen / 2), Pin: pin}
}

// String formats the token as users pass it.
func (t Token) String() string {
	s := t.ID + "." + t.Secret
	if t.Pin != "" {
		s = joinPrefix + t.Pin + pinSep + s
	}
	return s
}

// Hash is what the table keeps of the token: the SHA-256 of its secret.
func (t Token) Hash() []byte {
	h := sha256.Sum256([]byte(t.Secret))
	return h[:]
}

// Matches reports, in constant time, whether the token's secret is the one
// hash was made from.
func (t Token) Matches(hash []byte) bool {
	return subtle.ConstantTimeCompare(t.Hash(), hash) == 1
}

// ParseToken reads a token as a user or a file gives it (surrounding space
// is ignored). The error never repeats the token.
func ParseToken(s string) (Token, error) {
	s = strings.TrimSpace(s)
	var t Token
	if rest, ok := strings.CutPrefix(s, joinPrefix); ok {
		pin, tail, ok := strings.Cut(rest, pinSep)
		if !ok || len(pin) != pinLen || !isHex(pin) {
			return Token{}, fmt.Errorf("%w: a join token is %s<CA pin, %d hex digits>%s<id>.<secret>", ErrToken, joinPrefix, pinLen, pinSep)
		}
		t.Pin, s = pin, tail
	}
	id, secret, ok := strings.Cut(s, ".")
	if !ok || len(id) != idLen || len(secret) != secretLen || !isHex(id) || !isHex(secret) {
		return Token{}, fmt.Errorf("%w: want <id>.<secret> (%d and %d hex digits)", ErrToken, idLen, secretLen)
	}
	t.ID, t.Secret = id, secret
	return t, nil
}

// ValidTokenID checks a token id as `shim token revoke` takes it.
func ValidTokenID(id string) error {
	if len(id) != idLen || !isHex(id) {
		return fmt.Errorf("%w: a token id is %d hex digits", ErrToken, idLen)
	}
	return nil
}

func isHex(s string) bool {
	for _, c := range s {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // never fails on Linux
	return hex.EncodeToString(b)
}

// NewClusterID returns a random cluster id (16 hex digits).
func NewClusterID() string { return randHex(8) }
