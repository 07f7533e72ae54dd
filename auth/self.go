package auth

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"
)

// Self tokens.
//
// Every workload gets a token of its own ($SHIM_TOKEN) that lets it read its
// own record and change its own bounds within its maximum, and nothing else,
// for as long as that incarnation lives:
//
//	self.<process id>.<incarnation>.<mac>
//
// with mac = HMAC-SHA256(secret, cluster id, process id, incarnation) in hex,
// and secret = HMAC-SHA256(CA key (PKCS#8 DER), "shim self token v1"), which
// every server can compute from the table's trust record. The token is
// stateless: a server computes it when it hands a node its assignments, and
// checks it by computing it again; it is never stored and never listed. What
// makes it die with its incarnation is the server's check that the
// incarnation is the record's current one and the process is not terminal
// (see server's selfIdentity).

// SelfPrefix starts every self token.
const SelfPrefix = "self."

// selfLabel separates the self-token secret from other uses of the CA key.
const selfLabel = "shim self token v1"

// SelfToken is a parsed self token.
type SelfToken struct {
	Process     string
	Incarnation uint64
	MAC         string // hex
}

// String formats the token as a workload presents it.
func (t SelfToken) String() string {
	return SelfPrefix + t.Process + "." + strconv.FormatUint(t.Incarnation, 10) + "." + t.MAC
}

// IsSelfToken reports whether s has a self token's form (it may still be
// malformed).
func IsSelfToken(s string) bool { return strings.HasPrefix(strings.TrimSpace(s), SelfPrefix) }

// ParseSelfToken reads a self token. The error never repeats the token.
func ParseSelfToken(s string) (SelfToken, error) {
	rest, ok := strings.CutPrefix(strings.TrimSpace(s), SelfPrefix)
	parts := strings.Split(rest, ".")
	bad := fmt.Errorf("%w: a self token is %s<process id>.<incarnation>.<mac>", ErrToken, SelfPrefix)
	if !ok || len(parts) != 3 || parts[0] == "" || len(parts[0]) > 64 || len(parts[2]) != 2*sha256.Size || !isHex(parts[2]) {
		return SelfToken{}, bad
	}
	for _, c := range parts[0] {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return SelfToken{}, bad
		}
	}
	inc, err := strconv.ParseUint(parts[1], 10, 64)
	if err != nil || inc == 0 || strconv.FormatUint(inc, 10) != parts[1] {
		return SelfToken{}, bad
	}
	return SelfToken{Process: parts[0], Incarnation: inc, MAC: parts[2]}, nil
}

// SelfSecret derives the key of every self token of a cluster from its CA
// key (PKCS#8 DER, as the table keeps it).
func SelfSecret(caKeyDER []byte) []byte {
	m := hmac.New(sha256.New, caKeyDER)
	m.Write([]byte(selfLabel))
	return m.Sum(nil)
}

// NewSelfToken makes the self token of incarnation inc of process id in the
// cluster clusterID.
func NewSelfToken(secret []byte, clusterID, id string, inc uint64) SelfToken {
	return SelfToken{Process: id, Incarnation: inc, MAC: selfMAC(secret, clusterID, id, inc)}
}

// Check reports, in constant time, whether t was made with secret for the
// cluster clusterID.
func (t SelfToken) Check(secret []byte, clusterID string) bool {
	want := selfMAC(secret, clusterID, t.Process, t.Incarnation)
	return hmac.Equal([]byte(want), []byte(t.MAC))
}

func selfMAC(secret []byte, clusterID, id string, inc uint64) string {
	m := hmac.New(sha256.New, secret)
	// Length-prefixed fields: no two inputs share an encoding.
	for _, f := range []string{clusterID, id, strconv.FormatUint(inc, 10)} {
		m.Write([]byte(strconv.Itoa(len(f)) + ":" + f + ";"))
	}
	return hex.EncodeToString(m.Sum(nil))
}

// OwnProcess decides whether id may act on process processID: a workload's
// self token only on its own process; other callers are not limited here
// (Allow decides for them).
func OwnProcess(id Identity, processID string) error {
	if id.Kind != KindWorkload || id.Process == processID {
		return nil
	}
	return fmt.Errorf("%w: %s may act only on its own process, not on %q", ErrPermissionDenied, id, processID)
}
