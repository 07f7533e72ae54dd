package auth

import (
	"errors"
	"strings"
	"testing"

	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

func TestSelfTokenRoundTrip(t *testing.T) {
	secret := SelfSecret([]byte("a CA key"))
	tok := NewSelfToken(secret, "c1", "p-1", 3)
	s := tok.String()
	if !strings.HasPrefix(s, "self.p-1.3.") || !IsSelfToken(s) {
		t.Fatalf("token %q", s)
	}
	got, err := ParseSelfToken(" " + s + "\n")
	if err != nil || got != tok {
		t.Fatalf("ParseSelfToken = %+v, %v; want %+v", got, err, tok)
	}
	if !got.Check(secret, "c1") {
		t.Fatal("a token does not check against its own secret")
	}
	// Each input changes the MAC: another cluster, key, process or incarnation.
	for name, other := range map[string]bool{
		"cluster":     got.Check(secret, "c2"),
		"key":         got.Check(SelfSecret([]byte("another key")), "c1"),
		"process":     SelfToken{Process: "p-2", Incarnation: 3, MAC: got.MAC}.Check(secret, "c1"),
		"incarnation": SelfToken{Process: "p-1", Incarnation: 4, MAC: got.MAC}.Check(secret, "c1"),
	} {
		if other {
			t.Errorf("a token checks with another %s", name)
		}
	}
	// Fields are length-prefixed: "p-1" + "13" is not "p-11" + "3".
	if NewSelfToken(secret, "c1", "p-1", 13).MAC == NewSelfToken(secret, "c1", "p-11", 3).MAC {
		t.Error("ambiguous MAC input")
	}
}

func TestParseSelfTokenRefuses(t *testing.T) {
	mac := strings.Repeat("ab", 32)
	for _, s := range []string{
		"", "self.", "self.p.1", "self.p.1." + mac[:10], "self.p.0." + mac, "self.p.01." + mac, "self..1." + mac,
		"self.P.1." + mac, "self.../..1." + mac, "self.p.1." + strings.ToUpper(mac), "self.p.-1." + mac,
		"self.p.1.x." + mac, "token.p.1." + mac, "self.p.18446744073709551616." + mac,
	} {
		if _, err := ParseSelfToken(s); !errors.Is(err, ErrToken) {
			t.Errorf("ParseSelfToken(%q) = %v, want ErrToken", s, err)
		} else if len(s) > 20 && strings.Contains(err.Error(), s) {
			t.Errorf("the error repeats the token: %v", err)
		}
	}
}

func TestAllowSelf(t *testing.T) {
	self := Identity{Kind: KindWorkload, Role: RoleSelf, Process: "p1", Incarnation: 2}
	passed := self
	passed.Unchecked = true
	may := map[string]bool{
		shimv1connect.ShimServiceListProcedure:     true,
		shimv1connect.ShimServiceResizeProcedure:   true,
		shimv1connect.ShimServiceSetGrantProcedure: true,
	}
	for _, p := range []string{
		shimv1connect.ShimServiceSpawnProcedure, shimv1connect.ShimServiceKillProcedure,
		shimv1connect.ShimServiceResizeProcedure, shimv1connect.ShimServiceListProcedure,
		shimv1connect.ShimServiceNodesProcedure, shimv1connect.ShimServiceLogsProcedure,
		shimv1connect.ShimServiceDrainProcedure, shimv1connect.ShimServiceCreateTokenProcedure,
		shimv1connect.ShimServiceWhoamiProcedure, shimv1connect.ShimServiceSetGrantProcedure, ProcEvents,
		ProcMetrics, shimv1connect.AgentServiceAssignmentsProcedure, shimv1connect.AgentServiceReportProcedure,
		ProcHeartbeatStream, "/shim.v1.ShimService/SomethingNew",
	} {
		for _, id := range []Identity{self, passed} {
			err := Allow(id, p)
			if may[p] && err != nil {
				t.Errorf("%s may call %s: %v", id, p, err)
			}
			if !may[p] && !errors.Is(err, ErrPermissionDenied) {
				t.Errorf("%s calling %s: %v, want permission denied", id, p, err)
			}
		}
	}
	if err := OwnProcess(self, "p1"); err != nil {
		t.Errorf("own process: %v", err)
	}
	if err := OwnProcess(self, "p2"); !errors.Is(err, ErrPermissionDenied) {
		t.Errorf("another process: %v, want permission denied", err)
	}
	admin := Identity{Kind: KindToken, Role: RoleAdmin, TokenID: "a"}
	if err := OwnProcess(admin, "p2"); err != nil {
		t.Errorf("an admin is not limited to one process: %v", err)
	}
	if err := ActsFor(self, "n1"); !errors.Is(err, ErrPermissionDenied) {
		t.Errorf("a workload acts for a node: %v", err)
	}
}
