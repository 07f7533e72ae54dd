package server

import (
	"context"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Spawn{Wait, WaitMillis} answers when WaitMillis runs out with the records
// as they are (the CLI's --wait keeps watching from there), where Wait alone
// fails at the call's deadline; a process that ran and waits to restart
// (backoff) counts as started.
func TestSpawnWaitMillis(t *testing.T) {
	s, _ := testServer(t, "s1", true)
	register(t, s, "w1", "127.0.0.1:1", pb.NodeRole_NODE_ROLE_WORKER) // no agent: nothing starts
	h := &shimAPI{s: s}
	sp := &pb.ProcessSpec{Command: []string{"/bin/true"}, Resources: &pb.Resources{}}

	t0 := time.Now()
	resp, err := h.Spawn(context.Background(), connect.NewRequest(&pb.SpawnRequest{Spec: sp, Wait: true, WaitMillis: 50}))
	if err != nil {
		t.Fatalf("spawn with wait_millis: %v", err)
	}
	if d := time.Since(t0); d < 50*time.Millisecond {
		t.Fatalf("answered after %s, before wait_millis ran out", d)
	}
	if ps := resp.Msg.Processes; len(ps) != 1 || ps[0].State != pb.ProcessState_PROCESS_STATE_STARTING {
		t.Fatalf("records %v, want one starting process", ps)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	_, err = h.Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: sp, Wait: true}))
	cancel()
	if err == nil {
		t.Fatal("spawn with wait and no wait_millis answered although nothing started")
	}

	// The process runs, exits and waits to restart: settled.
	done := make(chan error, 1)
	go func() {
		_, err := h.Spawn(context.Background(), connect.NewRequest(&pb.SpawnRequest{Spec: sp, Wait: true, WaitMillis: 20_000, RequestId: "backoff"}))
		done <- err
	}()
	var ids []string
	for deadline := time.Now().Add(10 * time.Second); len(ids) == 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the third spawn never committed")
		}
		ids = s.Table.Request("backoff")
	}
	if _, err := s.apply(context.Background(), &pb.Command{Op: &pb.Command_Report{Report: &pb.Report{Node: "w1", Updates: []*pb.StatusUpdate{
		{Id: ids[0], Incarnation: 1, State: pb.ProcessState_PROCESS_STATE_RUNNING, Pid: 100},
		{Id: ids[0], Incarnation: 1, State: pb.ProcessState_PROCESS_STATE_BACKOFF, ExitCode: 1},
	}}}}); err != nil {
		t.Fatal(err)
	}
	if st := s.Table.Get(ids[0]).State; st != pb.ProcessState_PROCESS_STATE_BACKOFF {
		t.Fatalf("state %s after the report, want backoff", st)
	}
	s.Watch.Notify(nil) // the fake Raft applies without the FSM's wake-up
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("spawn waiting on a process in backoff: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("spawn still waiting 10 s after its process went to backoff")
	}
}
