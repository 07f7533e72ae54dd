package server_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Many concurrent writes through a follower, which forwards them to the
// leader together (forward.go): every spawn is made exactly once with ids of
// its own, and every kill of an unknown process fails as it would alone.
func TestForwardedWritesTogether(t *testing.T) {
	// A long lease: the burst below must not starve the nodes' heartbeats
	// into expiry on a loaded machine (that is not what is tested here).
	c := newCluster(t, 3, 10*time.Second)
	c.waitUp(3)
	f := -1
	for i, nd := range c.nodes {
		if !nd.raft.IsLeader() {
			f = i
			break
		}
	}
	if f < 0 {
		t.Fatal("no follower")
	}
	cl := c.client(f) // one client: its connections are reused
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	const n = 200
	sp := spec("/bin/sleep", "100")
	sp.Resources.CpuMinMilli = 1 // room for all of them
	var mu sync.Mutex
	seen := map[string]bool{}
	var wg sync.WaitGroup
	errs := make(chan error, 2*n)
	for i := range n {
		wg.Add(2)
		go func() {
			defer wg.Done()
			r, err := cl.Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: sp,
				RequestId: fmt.Sprintf("fwd-%d", i)}))
			if err != nil {
				errs <- fmt.Errorf("spawn %d: %w", i, err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			for _, p := range r.Msg.Processes {
				if seen[p.Id] {
					errs <- fmt.Errorf("spawn %d: id %s given twice", i, p.Id)
				}
				seen[p.Id] = true
			}
			if len(r.Msg.Processes) != 1 {
				errs <- fmt.Errorf("spawn %d: %d processes", i, len(r.Msg.Processes))
			}
		}()
		go func() {
			defer wg.Done()
			_, err := cl.Kill(ctx, connect.NewRequest(&pb.KillRequest{Ids: []string{fmt.Sprintf("nosuch%06d", i)}}))
			if connect.CodeOf(err) != connect.CodeNotFound {
				errs <- fmt.Errorf("kill of an unknown process %d: %v, want not found", i, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := len(c.list(f, true)); got != n {
		t.Fatalf("the follower lists %d processes, want %d", got, n)
	}
}
