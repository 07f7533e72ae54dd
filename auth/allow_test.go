package auth

import (
	"errors"
	"testing"

	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

func TestAllow(t *testing.T) {
	var (
		none     = Identity{}
		admin    = Identity{Kind: KindToken, Role: RoleAdmin, TokenID: "a"}
		operator = Identity{Kind: KindToken, Role: RoleOperator, TokenID: "o"}
		read     = Identity{Kind: KindToken, Role: RoleRead, TokenID: "r"}
		join     = Identity{Kind: KindToken, Role: RoleNode, TokenID: "j"}
		unknown  = Identity{Kind: KindToken, Role: "root", TokenID: "x"}
		passed   = Identity{Kind: KindToken, TokenID: "p", Unchecked: true}
		server   = Identity{Kind: KindNode, Role: RoleServer, Node: "s1"}
		worker   = Identity{Kind: KindNode, Role: RoleWorker, Node: "w1"}
		oddNode  = Identity{Kind: KindNode, Role: RoleAdmin, Node: "x"}
	)
	const (
		spawn   = shimv1connect.ShimServiceSpawnProcedure
		kill    = shimv1connect.ShimServiceKillProcedure
		resize  = shimv1connect.ShimServiceResizeProcedure
		drain   = shimv1connect.ShimServiceDrainProcedure
		list    = shimv1connect.ShimServiceListProcedure
		nodes   = shimv1connect.ShimServiceNodesProcedure
		logs    = shimv1connect.ShimServiceLogsProcedure
		create  = shimv1connect.ShimServiceCreateTokenProcedure
		tokens  = shimv1connect.ShimServiceListTokensProcedure
		revoke  = shimv1connect.ShimServiceRevokeTokenProcedure
		whoami  = shimv1connect.ShimServiceWhoamiProcedure
		grant   = shimv1connect.ShimServiceSetGrantProcedure
		future  = "/shim.v1.ShimService/SomethingNew"
		hb      = shimv1connect.AgentServiceHeartbeatProcedure
		asg     = shimv1connect.AgentServiceAssignmentsProcedure
		report  = shimv1connect.AgentServiceReportProcedure
		joinRPC = shimv1connect.AgentServiceJoinProcedure
		leave   = shimv1connect.AgentServiceLeaveProcedure
		apply   = shimv1connect.AgentServiceApplyProcedure
		readIdx = shimv1connect.AgentServiceReadIndexProcedure
		usage   = shimv1connect.AgentServiceUsageProcedure
		certify = shimv1connect.AgentServiceCertifyProcedure
		other   = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
	)
	// Every identity against every procedure: the rows are who may.
	procs := []string{spawn, kill, resize, drain, list, nodes, logs, ProcEvents, create, tokens, revoke, whoami, grant, future,
		ProcMetrics, hb, ProcHeartbeatStream, asg, report, joinRPC, leave, apply, readIdx, usage, certify, other}
	may := map[string][]Identity{
		spawn:               {admin, operator, passed},
		kill:                {admin, operator, passed},
		resize:              {admin, operator, passed},
		drain:               {admin, operator, passed},
		list:                {admin, operator, read, passed},
		nodes:               {admin, operator, read, passed},
		logs:                {admin, operator, read, passed, server},
		ProcEvents:          {admin, operator, read, passed},
		create:              {admin, passed},
		tokens:              {admin, passed},
		revoke:              {admin, passed},
		whoami:              {admin, operator, read, join, passed, server, worker},
		grant:               {admin, operator, passed, server, worker},
		future:              {admin, passed},
		ProcMetrics:         {admin, operator, read},
		hb:                  {server, worker},
		ProcHeartbeatStream: {server, worker},
		asg:                 {server, worker},
		report:              {server, worker},
		joinRPC:             {server, worker},
		leave:               {server, worker},
		apply:               {server},
		readIdx:             {server},
		usage:               {server},
		certify:             {join},
		other:               {},
	}
	all := []Identity{none, admin, operator, read, join, unknown, passed, server, worker, oddNode}
	for _, p := range procs {
		for _, id := range all {
			want := false
			for _, w := range may[p] {
				want = want || w == id
			}
			err := Allow(id, p)
			switch {
			case want && err != nil:
				t.Errorf("%s may call %s, got %v", id, p, err)
			case !want && id.Kind == KindNone && !errors.Is(err, ErrUnauthenticated):
				t.Errorf("%s calling %s: %v, want unauthenticated", id, p, err)
			case !want && id.Kind != KindNone && !errors.Is(err, ErrPermissionDenied):
				t.Errorf("%s calling %s: %v, want permission denied", id, p, err)
			}
		}
		if err := Allow(Self, p); err != nil {
			t.Errorf("trust off: %s: %v", p, err)
		}
	}
	if err := Allow(read, spawn); err == nil || err.Error() != "permission denied: token r (read) may not call Spawn" {
		t.Errorf("message: %v", err)
	}
}

func TestActsFor(t *testing.T) {
	cases := []struct {
		id   Identity
		node string
		ok   bool
	}{
		{Identity{Kind: KindNode, Role: RoleWorker, Node: "w1"}, "w1", true},
		{Identity{Kind: KindNode, Role: RoleWorker, Node: "w1"}, "w2", false},
		{Identity{Kind: KindNode, Role: RoleWorker, Node: "w1"}, "", false},
		{Identity{Kind: KindNode, Role: RoleServer, Node: "s1"}, "w2", true}, // forwards
		{Identity{Kind: KindToken, Role: RoleAdmin, TokenID: "a"}, "w1", false},
		{Identity{}, "w1", false},
		{Self, "w1", true},
	}
	for _, c := range cases {
		err := ActsFor(c.id, c.node)
		if (err == nil) != c.ok || (err != nil && !errors.Is(err, ErrPermissionDenied)) {
			t.Errorf("ActsFor(%s, %q) = %v", c.id, c.node, err)
		}
	}
}

func TestParseTokenRole(t *testing.T) {
	for _, r := range TokenRoles {
		if got, err := ParseTokenRole(string(r)); err != nil || got != r {
			t.Errorf("%s: %v", r, err)
		}
	}
	for _, s := range []string{"server", "worker", "", "Admin"} {
		if _, err := ParseTokenRole(s); err == nil {
			t.Errorf("role %q accepted", s)
		}
	}
}
