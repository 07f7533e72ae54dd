package server

import (
	"context"
	"errors"
	"testing"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Commands forwarded together are committed together, each answered on its
// own: ids and index for one that commits, the Connect code and message a
// call of its own would have had for one that fails, and nothing changed by
// it.
func TestApplyForwarded(t *testing.T) {
	s, f := testServer(t, "s1", true)
	register(t, s, "w1", "127.0.0.1:1", pb.NodeRole_NODE_ROLE_WORKER)
	sp := &pb.ProcessSpec{Command: []string{"/bin/true"}, Resources: &pb.Resources{}}
	spawn := func(id string) *pb.Command {
		return &pb.Command{Op: &pb.Command_Spawn{Spawn: &pb.Spawn{Ids: []string{id}, Spec: sp}}}
	}
	dup := func() *pb.Command { // an id in use, not a retry of its spawn
		return &pb.Command{Op: &pb.Command_Spawn{Spawn: &pb.Spawn{Ids: []string{"aaaaaa000001"},
			Spec: &pb.ProcessSpec{Command: []string{"/bin/false"}, Resources: &pb.Resources{}}}}}
	}
	kill := &pb.Command{Op: &pb.Command_Kill{Kill: &pb.Kill{Ids: []string{"nosuchprocess"}, Signal: 9}}}
	entries := len(f.entries)
	got := s.applyForwarded(context.Background(), []*pb.Command{spawn("aaaaaa000001"), kill, nil, spawn("aaaaaa000002"), dup()})
	if len(got) != 5 {
		t.Fatalf("%d results for 5 commands", len(got))
	}
	for _, i := range []int{0, 3} {
		if got[i].Code != 0 || len(got[i].Ids) != 1 || got[i].Index == 0 {
			t.Errorf("command %d: %v, want committed", i, got[i])
		}
	}
	// What the single-command Apply answers for the same failures.
	h := &agentAPI{s: s}
	_, killErr := h.Apply(context.Background(), connect.NewRequest(&pb.ApplyRequest{Command: kill}))
	_, dupErr := h.Apply(context.Background(), connect.NewRequest(&pb.ApplyRequest{Command: dup()}))
	for _, c := range []struct {
		i    int
		want error
	}{{1, killErr}, {4, dupErr}} {
		var ce *connect.Error
		if !errors.As(c.want, &ce) || got[c.i].Code != int32(ce.Code()) || got[c.i].Message != ce.Message() {
			t.Errorf("command %d: %v, want the code and message of %v", c.i, got[c.i], c.want)
		}
	}
	if got[2].Code != int32(connect.CodeInvalidArgument) {
		t.Errorf("empty command: %v", got[2])
	}
	if s.Table.Len() != 2 {
		t.Errorf("table holds %d processes, want 2", s.Table.Len())
	}
	// The four non-empty commands went as one entry (the two single Apply
	// calls after it add one each).
	if n := len(f.entries) - entries; n != 3 {
		t.Errorf("%d Raft entries, want 3", n)
	}
}
