package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/shim-run/shim/agent"
	"github.com/shim-run/shim/auth"
	"github.com/shim-run/shim/metrics"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
	"github.com/shim-run/shim/server"
)

// simJoinRate bounds how many simulated workers one simulator starts a
// second.
const simJoinRate = 200

// simStateDir is where the simulated workers of the simulator called name
// keep the state files an agent writes for every process it starts: in
// memory (/dev/shm) when there is one. Simulated processes cannot be
// re-adopted, so the files serve nothing, and creating a file on this
// project's ext4 disk costs about 400 µs of CPU (the inode allocator scans
// past recently deleted inodes): at thousands of starts a second that was a
// third of all the CPU a placement benchmark used. The caller removes the
// directory after killing a simulator.
func simStateDir(dataDir, name string) string {
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		return filepath.Join("/dev/shm", "shim-sim-"+name)
	}
	return filepath.Join(dataDir, "sim")
}

// simulate runs n simulated workers named <name>-sim-<i> in this process.
// Each is a full agent with its own lease, assignments watch and reports,
// talking to the servers over the API like any worker; only its processes
// are pretend (agent.SimRuntime). It is for scale tests and benchmarks.
func simulate(ctx context.Context, o *options, n int, join []string, capacity *pb.Resources, log *slog.Logger) error {
	// With trust off: one client for all n workers, whose pool keeps
	// enough idle connections for every worker's long poll, heartbeats and
	// reports: with fewer, finished calls close their connections and new
	// ones dial (a third of the simulator's CPU went to connect(2) at 64
	// per host).
	httpc := server.NewHTTPClient(nil)
	if tr, ok := httpc.Transport.(*http.Transport); ok {
		tr.MaxIdleConnsPerHost = 4*n + 64
		tr.MaxIdleConns = 0 // no limit over all hosts
	}
	// With trust on, each worker is a node of its own, with a certificate
	// of its own (signed with the join token, kept in memory only: a
	// simulated worker is never restarted) and so connections of its own.
	var en *enroller
	if !o.insecure {
		tok, err := joinToken(o)
		if err != nil {
			return err
		}
		en = &enroller{join: join, tok: tok}
	}
	stateDir := simStateDir(o.dataDir, o.name)
	_ = os.RemoveAll(stateDir) // a previous run's, killed
	defer os.RemoveAll(stateDir)
	var mu sync.Mutex
	addrs := append([]string(nil), join...)
	// Each worker has clients and heartbeat streams of its own, as a real
	// worker has: n workers hold n streams to the leader, not one.
	clientsOf := func(creds *auth.Credentials) func(addr string) shimv1connect.AgentServiceClient {
		hc, streamTLS := httpc, (*tls.Config)(nil)
		if creds != nil {
			hc = server.NewHTTPClient(creds.TLS(auth.APIClient))
			streamTLS = creds.TLS(auth.StreamClient)
		}
		streams := server.NewStreams(hc, streamTLS)
		clients := map[string]shimv1connect.AgentServiceClient{}
		return func(addr string) shimv1connect.AgentServiceClient {
			mu.Lock()
			defer mu.Unlock()
			c := clients[addr]
			if c == nil {
				c = streams.Client(server.URL(addr, creds != nil))
				clients[addr] = c
			}
			return c
		}
	}
	m := metrics.New(nil)
	quiet := slog.New(log.Handler()).With("simulated", true)
	var wg sync.WaitGroup
	for i := range n {
		name := fmt.Sprintf("%s-sim-%d", o.name, i)
		var creds *auth.Credentials
		if en != nil {
			var err error
			if creds, err = en.enroll(ctx, name, pb.NodeRole_NODE_ROLE_WORKER, nil); err != nil {
				if ctx.Err() != nil {
					break
				}
				return err
			}
		}
		ag := &agent.Agent{
			Node: &pb.NodeRecord{Name: name, Role: pb.NodeRole_NODE_ROLE_WORKER,
				ApiAddr: o.api, Capacity: capacity, OvercommitPercent: o.overcommit, VmUnavailable: "a simulated worker"},
			Addrs: func() []string {
				mu.Lock()
				defer mu.Unlock()
				return addrs
			},
			Client: clientsOf(creds),
			OnServers: func(s []string) {
				mu.Lock()
				addrs = s
				mu.Unlock()
			},
			Runtime: &agent.SimRuntime{},
			DataDir: filepath.Join(stateDir, fmt.Sprintf("sim-%d", i)),
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
		// Stagger joins so that heartbeats spread over the lease period,
		// and so that a whole rack does not join in the same instant: at
		// most simJoinRate workers a second per simulator.
		select {
		case <-ctx.Done():
		case <-time.After(max(o.lease/time.Duration(max(n, 1))/4, time.Second/simJoinRate)):
		}
	}
	log.Info("simulated workers running", "count", n)
	wg.Wait()
	return nil
}
