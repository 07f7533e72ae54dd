package server_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// TestClusterServices drives a service through the API of an in-process
// cluster (simulated processes): spawn, endpoints, scale, a rolling update,
// bad input, kill.
func TestClusterServices(t *testing.T) {
	c := newCluster(t, 3, 500*time.Millisecond)
	ctx := context.Background()
	waitFor(t, 5*time.Second, "3 nodes up", func() bool {
		resp, err := c.client(1).Nodes(ctx, connect.NewRequest(&pb.NodesRequest{}))
		return err == nil && len(resp.Msg.Nodes) == 3
	})
	s := spec("/bin/sleep", "100")
	s.Name, s.Ports = "web", []*pb.PortSpec{{Name: "HTTP"}}
	if _, err := c.client(2).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: s, Count: 3, Service: true})); err != nil {
		t.Fatal(err)
	}
	endpoints := func(i int) []*pb.Endpoint {
		resp, err := c.client(i).Endpoints(ctx, connect.NewRequest(&pb.EndpointsRequest{Name: "web"}))
		if err != nil {
			t.Fatalf("endpoints: %v", err)
		}
		return resp.Msg.Endpoints
	}
	nodes := func(eps []*pb.Endpoint) int {
		seen := map[string]bool{}
		for _, e := range eps {
			seen[e.Node] = true
			if e.Ports["HTTP"] == 0 || e.Address == "" {
				t.Errorf("endpoint %v lacks its port or address", e)
			}
		}
		return len(seen)
	}
	waitFor(t, 30*time.Second, "3 endpoints on 3 nodes", func() bool { eps := endpoints(1); return len(eps) == 3 && nodes(eps) == 3 })
	if _, err := c.client(0).Scale(ctx, connect.NewRequest(&pb.ScaleRequest{Name: "web", Count: 5})); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "5 endpoints", func() bool { return len(endpoints(2)) == 5 })

	// Bad input: refused, table unchanged.
	before := c.nodes[0].srv.Table.Index()
	for _, req := range []*pb.ScaleRequest{{Name: "web", Count: -1}, {Name: "nope", Count: 2}, {Name: "web", Count: 1 << 20}} {
		if _, err := c.client(0).Scale(ctx, connect.NewRequest(req)); err == nil {
			t.Errorf("scale %v accepted", req)
		}
	}
	if _, err := c.client(0).Endpoints(ctx, connect.NewRequest(&pb.EndpointsRequest{Name: "nope"})); connect.CodeOf(err) != connect.CodeNotFound {
		t.Errorf("endpoints of an unknown service: %v", err)
	}
	if got := c.nodes[0].srv.Table.Index(); got != before {
		t.Fatalf("refused calls changed the table index %d -> %d", before, got)
	}

	// A rolling update through a follower.
	ureq := connect.NewRequest(&pb.UpdateRequest{Name: "web", Env: []string{"V=2"}, Parallel: 2, MinHealthyMillis: 100})
	ureq.Header().Set("Authorization", "Bearer "+c.admin.String()) // bearer() covers unary calls only
	st, err := c.client(1).Update(ctx, ureq)
	if err != nil {
		t.Fatal(err)
	}
	var msgs []string
	for st.Receive() {
		msgs = append(msgs, st.Msg().Message)
	}
	if err := st.Err(); err != nil {
		t.Fatalf("update: %v (%v)", err, msgs)
	}
	if n := strings.Count(strings.Join(msgs, "\n"), "replaced by"); n != 5 {
		t.Fatalf("update replaced %d, want 5: %v", n, msgs)
	}
	for _, e := range endpoints(0) {
		r := c.nodes[0].srv.Table.Get(e.Id)
		if len(r.Spec.Env) != 1 || r.Spec.Env[0] != "V=2" {
			t.Errorf("endpoint %s runs env %v", e.Id, r.Spec.Env)
		}
	}

	if _, err := c.client(2).Kill(ctx, connect.NewRequest(&pb.KillRequest{Ids: []string{"web"}})); err != nil {
		t.Fatal(err)
	}
	resp, err := c.client(1).Services(ctx, connect.NewRequest(&pb.ServicesRequest{}))
	if err != nil || len(resp.Msg.Services) != 0 {
		t.Fatalf("services after kill web: %v %v", resp, err)
	}
}
