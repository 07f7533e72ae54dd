package server_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/shim-run/shim/auth"
	pb "github.com/shim-run/shim/proto/shimv1"
)

// selfToken is the self token of incarnation inc of id in the test cluster.
func (c *cluster) selfToken(id string, inc uint64) string {
	c.t.Helper()
	key, err := c.ca.KeyDER()
	if err != nil {
		c.t.Fatal(err)
	}
	return auth.NewSelfToken(auth.SelfSecret(key), "test", id, inc).String()
}

// TestSelfTokens: a workload's token reads its own record, moves its own
// minimum within its maximum and sets its own grant, on any server, while
// its incarnation lives; it does nothing else, and nothing to another
// process.
func TestSelfTokens(t *testing.T) {
	c := trustCluster(t)
	ctx := context.Background()
	sp := spec("/bin/sleep", "100")
	sp.Resources.MemMaxBytes = 64 << 20
	sp.Resources.CpuMaxMilli = 500
	resp, err := c.client(0).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: sp, Count: 2, Wait: true}))
	if err != nil {
		t.Fatal(err)
	}
	a, b := resp.Msg.Processes[0], resp.Msg.Processes[1]
	tok := c.selfToken(a.Id, a.Incarnation)

	// The node running a gets a's token with its assignments.
	owner := -1
	for i, n := range c.nodes {
		if n.name == a.Node {
			owner = i
		}
	}
	asg, err := c.nodeClient(owner, c.nodes[owner].creds, "").Assignments(ctx, connect.NewRequest(&pb.AssignmentsRequest{Node: a.Node}))
	if err != nil {
		t.Fatal(err)
	}
	if got := asg.Msg.SelfTokens[a.Id]; got != tok {
		t.Errorf("assignments carry token %q for %s, want %q", got, a.Id, tok)
	}
	// Never in a listing.
	for _, r := range c.list(0, true) {
		if strings.Contains(r.String(), tok) {
			t.Errorf("a listing shows the self token of %s", a.Id)
		}
	}

	before := c.userState()
	for i := range c.nodes {
		self := c.userClient(i, tok)
		l, err := self.List(ctx, connect.NewRequest(&pb.ListRequest{}))
		if err != nil || len(l.Msg.Processes) != 1 || l.Msg.Processes[0].Id != a.Id {
			t.Fatalf("node %d: self list: %v %v", i, l, err)
		}
		_, err = self.List(ctx, connect.NewRequest(&pb.ListRequest{Ids: []string{b.Id}}))
		wantCode(t, "self listing another process", err, connect.CodePermissionDenied)
		_, err = self.Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec("/bin/true")}))
		wantCode(t, "self spawning", err, connect.CodePermissionDenied)
		_, err = self.Kill(ctx, connect.NewRequest(&pb.KillRequest{Ids: []string{b.Id}}))
		wantCode(t, "self killing", err, connect.CodePermissionDenied)
		_, err = self.Nodes(ctx, connect.NewRequest(&pb.NodesRequest{}))
		wantCode(t, "self listing nodes", err, connect.CodePermissionDenied)
		_, err = self.Resize(ctx, connect.NewRequest(&pb.ResizeRequest{Id: b.Id, Resources: &pb.Resources{MemMinBytes: 2 << 20}}))
		wantCode(t, "self resizing another process", err, connect.CodePermissionDenied)
		_, err = self.Resize(ctx, connect.NewRequest(&pb.ResizeRequest{Id: a.Id, Resources: &pb.Resources{MemMaxBytes: 1 << 30}}))
		wantCode(t, "self raising its maximum", err, connect.CodePermissionDenied)
		_, err = self.Resize(ctx, connect.NewRequest(&pb.ResizeRequest{Id: a.Id, Resources: &pb.Resources{MemMinBytes: 1 << 30}}))
		wantCode(t, "self raising its minimum past its maximum", err, connect.CodeInvalidArgument)
		_, err = self.Resize(ctx, connect.NewRequest(&pb.ResizeRequest{Id: a.Id, Move: true, Resources: &pb.Resources{MemMinBytes: 2 << 20}}))
		wantCode(t, "self moving", err, connect.CodePermissionDenied)
		_, err = self.SetGrant(ctx, connect.NewRequest(&pb.SetGrantRequest{Id: b.Id, Grant: &pb.Grant{MemBytes: 48 << 20}}))
		wantCode(t, "self setting another process's grant", err, connect.CodePermissionDenied)
		_, err = self.SetGrant(ctx, connect.NewRequest(&pb.SetGrantRequest{Id: a.Id, Grant: &pb.Grant{MemBytes: 128 << 20}}))
		wantCode(t, "self granting itself past its maximum", err, connect.CodeInvalidArgument)
	}
	if after := c.userState(); after != before {
		t.Errorf("refused calls changed the table:\n%s\n%s", before, after)
	}
	r, err := c.userClient(1, tok).Resize(ctx, connect.NewRequest(&pb.ResizeRequest{Id: a.Id,
		Resources: &pb.Resources{MemMinBytes: 32 << 20, CpuMinMilli: 400}}))
	if err != nil {
		t.Fatalf("self resize within bounds: %v", err)
	}
	if got := r.Msg.Process.Spec.Resources; got.MemMinBytes != 32<<20 || got.CpuMinMilli != 400 || got.MemMaxBytes != 64<<20 {
		t.Errorf("after self resize: %v", got)
	}
	g, err := c.userClient(2, tok).SetGrant(ctx, connect.NewRequest(&pb.SetGrantRequest{Id: a.Id, Grant: &pb.Grant{MemBytes: 48 << 20}}))
	if err != nil {
		t.Fatalf("self grant within bounds: %v", err)
	}
	if got := g.Msg.Process.Grant; got.GetMemBytes() != 48<<20 || got.GetCpuMilli() != 400 {
		t.Errorf("after self grant: %v", got)
	}

	// Forged, of another incarnation, or of a process that ended: refused.
	for what, bad := range map[string]string{
		"forged":           auth.SelfToken{Process: a.Id, Incarnation: a.Incarnation, MAC: c.selfToken(b.Id, 1)[len("self.")+len(b.Id)+3:]}.String(),
		"next incarnation": c.selfToken(a.Id, a.Incarnation+1),
		"malformed":        "self.x",
	} {
		_, err := c.userClient(0, bad).List(ctx, connect.NewRequest(&pb.ListRequest{}))
		wantCode(t, what+" self token", err, connect.CodeUnauthenticated)
	}
	if _, err := c.client(0).Kill(ctx, connect.NewRequest(&pb.KillRequest{Ids: []string{a.Id}, Signal: 9})); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the token to die with its process", func() bool {
		_, err := c.userClient(2, tok).List(ctx, connect.NewRequest(&pb.ListRequest{}))
		return connect.CodeOf(err) == connect.CodeUnauthenticated
	})
}

// TestLogsRefusesPaths: a logs request names a process, never a path.
func TestLogsRefusesPaths(t *testing.T) {
	c := trustCluster(t)
	for _, ref := range []string{"../../../../var/log/dpkg", "/etc/passwd", "..", "a/b"} {
		req := connect.NewRequest(&pb.LogsRequest{Id: ref})
		req.Header().Set("Authorization", "Bearer "+c.admin.String())
		st, err := c.client(0).Logs(context.Background(), req)
		if err == nil {
			for st.Receive() {
				t.Errorf("logs %q: got data", ref)
			}
			err = st.Err()
		}
		wantCode(t, "logs "+ref, err, connect.CodeInvalidArgument)
	}
}
