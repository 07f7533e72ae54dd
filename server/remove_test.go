package server_test

import (
	"context"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// TestClusterRemoveNode: RemoveNode refuses bad input and a node that is
// up, and removes a dead one for good: its record, its Raft vote, and its
// processes, which run elsewhere.
func TestClusterRemoveNode(t *testing.T) {
	c := newCluster(t, 3, 400*time.Millisecond)
	ctx := context.Background()
	nodes := func() map[string]*pb.NodeStatus {
		out := map[string]*pb.NodeStatus{}
		if resp, err := c.client(0).Nodes(ctx, connect.NewRequest(&pb.NodesRequest{})); err == nil {
			for _, n := range resp.Msg.Nodes {
				out[n.GetNode().GetName()] = n
			}
		}
		return out
	}
	waitFor(t, 5*time.Second, "3 nodes up", func() bool { return len(nodes()) == 3 })
	if _, err := c.client(0).Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec("/bin/sleep", "100"), Count: 9})); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "9 running", c.allRunning(0, 9))

	for _, bad := range []struct {
		req  *pb.RemoveNodeRequest
		code connect.Code
	}{
		{&pb.RemoveNodeRequest{}, connect.CodeInvalidArgument},
		{&pb.RemoveNodeRequest{Node: "nope"}, connect.CodeNotFound},
		{&pb.RemoveNodeRequest{Node: "n2"}, connect.CodeFailedPrecondition}, // up
	} {
		_, err := c.client(1).RemoveNode(ctx, connect.NewRequest(bad.req))
		if connect.CodeOf(err) != bad.code {
			t.Errorf("RemoveNode(%v) = %v, want %s", bad.req, err, bad.code)
		}
	}
	// Admin only, through a follower too.
	op := c.token(pb.TokenRole_TOKEN_ROLE_OPERATOR, 0)
	for i := range 2 {
		_, err := c.userClient(i, op).RemoveNode(ctx, connect.NewRequest(&pb.RemoveNodeRequest{Node: "n3", Force: true}))
		if connect.CodeOf(err) != connect.CodePermissionDenied {
			t.Errorf("an operator's RemoveNode on n%d = %v, want permission_denied", i+1, err)
		}
	}
	if len(nodes()) != 3 {
		t.Fatal("a refused RemoveNode changed the nodes")
	}

	c.nodes[2].stop()
	waitFor(t, 5*time.Second, "n3 down", func() bool {
		return nodes()["n3"].GetNode().GetState() == pb.NodeState_NODE_STATE_DOWN
	})
	resp, err := c.client(1).RemoveNode(ctx, connect.NewRequest(&pb.RemoveNodeRequest{Node: "n3"}))
	if err != nil {
		t.Fatal(err)
	}
	ns := nodes()
	if _, ok := ns["n3"]; ok || len(ns) != 2 {
		t.Fatalf("after RemoveNode(n3): %v", ns)
	}
	for _, n := range ns {
		if !n.GetVoter() {
			t.Errorf("%s is not a voter", n.GetNode().GetName())
		}
	}
	t.Logf("moved when removed: %v", resp.Msg.GetMoved())
	waitFor(t, 5*time.Second, "9 running on n1 and n2", func() bool {
		recs := c.list(0, false)
		for _, r := range recs {
			if r.Node == "n3" {
				return false
			}
		}
		return c.allRunning(0, 9)()
	})
}
