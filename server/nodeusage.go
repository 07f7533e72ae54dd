package server

import (
	"context"
	"sync"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// nodeUsage asks every up node holding processes, in parallel, for its
// processes' use (their last sample) and returns the sums by node. Nodes
// that do not answer within a second are left out.
func (s *Server) nodeUsage(ctx context.Context) map[string]*pb.Usage {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	var mu sync.Mutex
	out := map[string]*pb.Usage{}
	var wg sync.WaitGroup
	for _, v := range s.Table.Nodes() {
		n := v.Node
		if n.State != pb.NodeState_NODE_STATE_UP || n.ApiAddr == "" || v.Alloc.Count == 0 {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := s.peer(n.ApiAddr).agent.Usage(ctx, connect.NewRequest(&pb.UsageRequest{}))
			if err != nil {
				return
			}
			sum := &pb.Usage{}
			for _, u := range resp.Msg.Usage {
				sum.CpuMilli += u.GetCpuMilli()
				sum.MemoryBytes += u.GetMemoryBytes()
				sum.CpuUsageNanos += u.GetCpuUsageNanos()
			}
			mu.Lock()
			out[n.Name] = sum
			mu.Unlock()
		}()
	}
	wg.Wait()
	return out
}
