package table

import (
	"bytes"
	"crypto/sha256"
	"testing"

	pb "github.com/shim-run/shim/proto/shimv1"
	"google.golang.org/protobuf/proto"
)

func trustCmd(cluster string) *pb.Command {
	return &pb.Command{Op: &pb.Command_SetTrust{SetTrust: &pb.SetTrust{Trust: &pb.Trust{
		ClusterId: cluster, CaCert: []byte("cert " + cluster), CaKey: []byte("key " + cluster)}}}}
}

func tokenCmd(id string, role pb.TokenRole, expires int64) *pb.Command {
	h := sha256.Sum256([]byte("secret of " + id))
	return &pb.Command{Op: &pb.Command_AddToken{AddToken: &pb.AddToken{Token: &pb.TokenRecord{
		Id: id, Hash: h[:], Role: role, Name: "for " + id, ExpiresUnixNano: expires}}}}
}

func revokeCmd(id string) *pb.Command {
	return &pb.Command{Op: &pb.Command_RevokeToken{RevokeToken: &pb.RevokeToken{Id: id}}}
}

func TestSetTrustOnce(t *testing.T) {
	x := newTester(t)
	if x.tb.Trust() != nil {
		t.Fatal("a new table has trust")
	}
	for _, bad := range []*pb.Command{
		{Op: &pb.Command_SetTrust{SetTrust: &pb.SetTrust{}}},
		{Op: &pb.Command_SetTrust{SetTrust: &pb.SetTrust{Trust: &pb.Trust{ClusterId: "c1"}}}},
		{Op: &pb.Command_SetTrust{SetTrust: &pb.SetTrust{Trust: &pb.Trust{CaCert: []byte("c"), CaKey: []byte("k")}}}},
	} {
		x.fail(bad, ErrInvalid)
	}
	x.ok(trustCmd("c1"))
	if tr := x.tb.Trust(); tr.GetClusterId() != "c1" || string(tr.CaKey) != "key c1" {
		t.Fatalf("trust %v", tr)
	}
	// Nobody replaces the CA, not even a second bootstrap.
	x.fail(trustCmd("c2"), ErrExists)
	if x.tb.Trust().ClusterId != "c1" {
		t.Fatal("CA replaced")
	}
}

func TestTokens(t *testing.T) {
	x := newTester(t)
	admin, read := pb.TokenRole_TOKEN_ROLE_ADMIN, pb.TokenRole_TOKEN_ROLE_READ
	x.ok(tokenCmd("0123456789ab", admin, 0))
	at := x.now
	x.ok(tokenCmd("00000000000c", read, 5e18))
	tk := x.tb.Token("0123456789ab")
	if tk == nil || tk.Role != admin || tk.CreatedUnixNano != at || len(tk.Hash) != 32 {
		t.Fatalf("token %v (created at %d)", tk, at)
	}
	if got := x.tb.Tokens(); len(got) != 2 || got[0].Id != "00000000000c" {
		t.Fatalf("tokens %v", got)
	}
	x.fail(tokenCmd("0123456789ab", read, 0), ErrExists)
	short := tokenCmd("abc", admin, 0)
	short.GetAddToken().Token.Hash = []byte("not a sha256")
	for _, bad := range []*pb.Command{
		tokenCmd("", admin, 0),
		tokenCmd("UPPER", admin, 0),
		tokenCmd("abc", pb.TokenRole_TOKEN_ROLE_UNSPECIFIED, 0),
		tokenCmd("abc", pb.TokenRole(99), 0),
		tokenCmd("abc", admin, -1),
		short,
		{Op: &pb.Command_AddToken{AddToken: &pb.AddToken{}}},
	} {
		x.fail(bad, ErrInvalid)
	}
	x.ok(revokeCmd("0123456789ab"))
	if x.tb.Token("0123456789ab") != nil || len(x.tb.Tokens()) != 1 {
		t.Fatal("revoked token still there")
	}
	x.fail(revokeCmd("0123456789ab"), ErrNotFound)
	// A revoked id may not come back by accident, but a new token may
	// reuse it: ids are random, so that is a new token.
	x.ok(tokenCmd("0123456789ab", read, 0))
}

func TestTrustSurvivesSnapshot(t *testing.T) {
	x := newTester(t)
	x.ok(trustCmd("c1"))
	x.ok(tokenCmd("0123456789ab", pb.TokenRole_TOKEN_ROLE_ADMIN, 0))
	x.ok(tokenCmd("00000000000c", pb.TokenRole_TOKEN_ROLE_NODE, 7))
	c := clone(t, x.tb)
	if !Equal(x.tb, c) || !proto.Equal(c.Trust(), x.tb.Trust()) || len(c.Tokens()) != 2 {
		t.Fatalf("restored trust %v, tokens %v", c.Trust(), c.Tokens())
	}
	// Equal sees trust and tokens.
	x.ok(revokeCmd("00000000000c"))
	if Equal(x.tb, c) {
		t.Error("Equal ignores tokens")
	}
	// Equal tables give equal snapshot bytes.
	var a, b bytes.Buffer
	_ = c.Snapshot().Persist(&a)
	_ = clone(t, c).Snapshot().Persist(&b)
	if !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Error("snapshot bytes differ")
	}
	// A table without trust snapshots as before: no trust, no tokens.
	e := clone(t, New())
	if e.Trust() != nil || len(e.Tokens()) != 0 {
		t.Error("empty table restored with trust")
	}
}
