package server_test

import (
	"context"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/shim-run/shim/auth"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
	"github.com/shim-run/shim/server"
	"github.com/shim-run/shim/table"
)

// nodeShim is a ShimService client holding a node's certificate, as a
// node's growth loop calls SetGrant.
func (c *cluster) nodeShim(i int, cr *auth.Credentials) shimv1connect.ShimServiceClient {
	return shimv1connect.NewShimServiceClient(server.NewHTTPClient(cr.TLS(auth.APIClient)), c.nodes[i].http.URL)
}

func TestSetGrantWhoMay(t *testing.T) {
	c := trustCluster(t)
	ctx := context.Background()
	w := c.creds("w9", auth.RoleWorker)
	if _, err := c.nodeClient(1, w, "").Join(ctx, connect.NewRequest(&pb.JoinRequest{Node: &pb.NodeRecord{Name: "w9",
		Role: pb.NodeRole_NODE_ROLE_WORKER, Capacity: &pb.Resources{CpuMaxMilli: 2000, MemMaxBytes: 1 << 30}}})); err != nil {
		t.Fatal(err)
	}
	spawn := func(node string) *pb.ProcessRecord {
		s := spec("/bin/sleep", "100")
		s.Node, s.Grow = node, pb.Grow_GROW_ON
		s.Resources = &pb.Resources{CpuMinMilli: 100, CpuMaxMilli: 1500, MemMinBytes: 32 << 20, MemMaxBytes: 512 << 20}
		resp, err := c.client(0).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: s}))
		if err != nil {
			t.Fatal(err)
		}
		return resp.Msg.Processes[0]
	}
	own, other := spawn("w9"), spawn("n2")
	if g := own.Grant; g.GetCpuMilli() != 100 || g.GetMemBytes() != 32<<20 {
		t.Fatalf("a new process's grant is %v, want its min", g)
	}
	grow := func(id string, mem int64) *pb.SetGrantRequest {
		return &pb.SetGrantRequest{Id: id, Grant: &pb.Grant{MemBytes: mem}, Reason: "test"}
	}
	read, op := c.token(pb.TokenRole_TOKEN_ROLE_READ, 0), c.token(pb.TokenRole_TOKEN_ROLE_OPERATOR, 0)
	grants := func() string {
		var s string
		for _, r := range c.nodes[0].srv.Table.Processes(true, "") {
			s += r.Id + ":" + table.FormatGrant(table.GrantOf(r)) + " "
		}
		return s
	}
	for i := range c.nodes {
		before := grants()
		_, err := c.nodeShim(i, w).SetGrant(ctx, connect.NewRequest(grow(other.Id, 64<<20)))
		wantCode(t, "a node setting another node's process's grant", err, connect.CodePermissionDenied)
		_, err = c.userClient(i, read).SetGrant(ctx, connect.NewRequest(grow(own.Id, 64<<20)))
		wantCode(t, "a read token setting a grant", err, connect.CodePermissionDenied)
		_, err = c.userClient(i, "").SetGrant(ctx, connect.NewRequest(grow(own.Id, 64<<20)))
		wantCode(t, "setting a grant without credentials", err, connect.CodeUnauthenticated)
		_, err = c.client(i).SetGrant(ctx, connect.NewRequest(grow(own.Id, 600<<20)))
		wantCode(t, "a grant above max", err, connect.CodeInvalidArgument)
		_, err = c.client(i).SetGrant(ctx, connect.NewRequest(&pb.SetGrantRequest{Id: own.Id}))
		wantCode(t, "a grant of nothing", err, connect.CodeInvalidArgument)
		r := grow(own.Id, 64<<20)
		r.Incarnation = 7
		_, err = c.nodeShim(i, w).SetGrant(ctx, connect.NewRequest(r))
		wantCode(t, "a grant for another incarnation", err, connect.CodeFailedPrecondition)
		if after := grants(); after != before {
			t.Fatalf("refused grants changed the table:\n%s\n%s", before, after)
		}
	}
	// The node, for its own process, and an operator, for any.
	r := grow(own.Id, 64<<20)
	r.Incarnation = own.Incarnation
	resp, err := c.nodeShim(2, w).SetGrant(ctx, connect.NewRequest(r))
	if err != nil || resp.Msg.Process.Grant.MemBytes != 64<<20 {
		t.Fatalf("the node's own grant: %v %v", resp, err)
	}
	resp, err = c.userClient(1, op).SetGrant(ctx, connect.NewRequest(&pb.SetGrantRequest{Id: other.Id,
		Grant: &pb.Grant{CpuMilli: 1200}}))
	if err != nil || resp.Msg.Process.Grant.CpuMilli != 1200 || resp.Msg.Process.Grant.MemBytes != 32<<20 {
		t.Fatalf("an operator's grant: %v %v", resp, err)
	}
	// Nodes show what they granted.
	nodes, err := c.client(0).Nodes(ctx, connect.NewRequest(&pb.NodesRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes.Msg.Nodes {
		if n.Node.Name == "w9" && n.Granted.GetMemBytes() != 64<<20 {
			t.Errorf("w9 granted %v", n.Granted)
		}
	}
}

func TestEventsStream(t *testing.T) {
	c := trustCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	read := c.token(pb.TokenRole_TOKEN_ROLE_READ, 0)
	idx := c.nodes[1].srv.Table.Index()
	waitFor(t, 5*time.Second, "every server to know the token", func() bool {
		return c.nodes[0].srv.Table.Index() >= idx && c.nodes[2].srv.Table.Index() >= idx
	})
	// A follower streams what the leader commits, as it applies it. (The
	// call returns once the first event comes: Connect sends the headers
	// with it.)
	evc := make(chan *pb.Event, 100)
	errc := make(chan error, 1)
	go func() {
		stream, err := c.userClient(2, "").Events(ctx, withToken(&pb.EventsRequest{Follow: true,
			Types: []string{"process."}}, read))
		if err != nil {
			errc <- err
			return
		}
		defer stream.Close()
		for stream.Receive() {
			evc <- stream.Msg()
		}
		errc <- stream.Err()
	}()
	sp, err := c.client(0).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec("/bin/sleep", "100"), Wait: true}))
	if err != nil {
		t.Fatal(err)
	}
	id := sp.Msg.Processes[0].Id
	if _, err := c.client(1).Kill(ctx, connect.NewRequest(&pb.KillRequest{Ids: []string{id}})); err != nil {
		t.Fatal(err)
	}
	var got []string
	var last uint64
	for len(got) < 4 {
		var e *pb.Event
		select {
		case e = <-evc:
		case err := <-errc:
			t.Fatalf("the stream ended after %v: %v", got, err)
		}
		if e.Id != id {
			continue
		}
		if e.Index < last {
			t.Fatalf("event at %d after one at %d", e.Index, last)
		}
		last = e.Index
		got = append(got, e.Type)
	}
	want := []string{table.EvPlaced, table.EvRunning, table.EvStopping, table.EvKilled}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("events %v, want %v", got, want)
		}
	}
	// Resumable: since an index, only what came after it; without follow
	// the stream ends.
	all, err := c.userClient(0, "").Events(ctx, withToken(&pb.EventsRequest{Since: last - 1}, read))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for all.Receive() {
		if all.Msg().Index <= last-1 {
			t.Fatalf("since %d gave index %d", last-1, all.Msg().Index)
		}
		n++
	}
	if err := all.Err(); err != nil || n == 0 {
		t.Fatalf("since %d: %d events, %v", last-1, n, err)
	}
	// Bad types are refused with one line.
	bad, err := c.userClient(0, "").Events(ctx, withToken(&pb.EventsRequest{Types: []string{"a b"}}, read))
	if err == nil {
		for bad.Receive() {
		}
		err = bad.Err()
	}
	wantCode(t, "a bad event type", err, connect.CodeInvalidArgument)
}

// withToken makes a request that carries a token (bearer's interceptor
// sees unary calls only).
func withToken[T any](m *T, tok string) *connect.Request[T] {
	r := connect.NewRequest(m)
	r.Header().Set("Authorization", "Bearer "+tok)
	return r
}
