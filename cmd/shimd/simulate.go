package main

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/shim-run/shim/agent"
	"github.com/shim-run/shim/metrics"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
	"github.com/shim-run/shim/server"
)

// simulate runs n simulated workers named <name>-sim-<i> in this process.
// Each is a full agent with its own lease, assignments watch and reports,
// talking to the servers over the API like any worker; only its processes
// are pretend (agent.SimRuntime). It is for scale tests and benchmarks.
func simulate(ctx context.Context, o *options, n int, join []string, capacity *pb.Resources, log *slog.Logger) error {
	httpc := server.NewHTTPClient()
	var mu sync.Mutex
	addrs := append([]string(nil), join...)
	clients := map[string]shimv1connect.AgentServiceClient{}
	client := func(addr string) shimv1connect.AgentServiceClient {
		mu.Lock()
		defer mu.Unlock()
		c := clients[addr]
		if c == nil {
			c = shimv1connect.NewAgentServiceClient(httpc, server.URL(addr))
			clients[addr] = c
		}
		return c
	}
	m := metrics.New(nil)
	quiet := slog.New(log.Handler()).With("simulated", true)
	var wg sync.WaitGroup
	for i := range n {
		ag := &agent.Agent{
			Node: &pb.NodeRecord{Name: fmt.Sprintf("%s-sim-%d", o.name, i), Role: pb.NodeRole_NODE_ROLE_WORKER,
				ApiAddr: o.api, Capacity: capacity, OvercommitPercent: o.overcommit},
			Addrs: func() []string {
				mu.Lock()
				defer mu.Unlock()
				return addrs
			},
			Client: client,
			OnServers: func(s []string) {
				mu.Lock()
				addrs = s
				mu.Unlock()
			},
			Runtime: &agent.SimRuntime{},
			DataDir: fmt.Sprintf("%s/sim-%d", o.dataDir, i),
			Lease:   o.lease,
			Log:     quiet,
			Metrics: m,
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := ag.Run(ctx); err != nil && ctx.Err() == nil {
				log.Error("simulated worker stopped", "node", ag.Node.Name, "err", err)
			}
		}()
		// Stagger joins so that heartbeats spread over the lease period.
		select {
		case <-ctx.Done():
		case <-time.After(o.lease / time.Duration(max(n, 1)) / 4):
		}
	}
	log.Info("simulated workers running", "count", n)
	wg.Wait()
	return nil
}
