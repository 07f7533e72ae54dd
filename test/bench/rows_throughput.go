package main

import (
	"context"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

// simCluster starts 3 servers (drained, so they run nothing) and simulated
// workers, sims per simulator process, and waits until every node is up.
// flags go to servers and simulators alike.
func simCluster(e *env, tag string, nodes, perSim int, flags ...string) (*cluster, error) {
	return startSims(newCluster(e, tag), nodes, perSim, flags...)
}

// startSims is simCluster on a cluster made by the caller.
func startSims(c *cluster, nodes, perSim int, flags ...string) (*cluster, error) {
	e := c.e
	if err := c.startServers(3, flags...); err != nil {
		return c, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.drain(ctx, false, names(c.servers...)...); err != nil {
		return c, err
	}
	// One simulator at a time, each once the last one's nodes are up: a
	// real cluster's nodes do not all join in the same few seconds, and
	// thousands joining (Raft entries, streams, first full assignment
	// lists) while thousands more heartbeat is a load test of its own.
	t0 := time.Now()
	up := 3
	for left := nodes; left > 0; left -= perSim {
		n := min(left, perSim)
		if _, err := c.addWorker(n, flags...); err != nil {
			return c, err
		}
		up += n
		if err := c.waitNodesUp(up, 30*time.Second+time.Duration(n)*20*time.Millisecond); err != nil {
			return c, err
		}
	}
	e.debugf("%d simulated nodes up in %s", nodes, time.Since(t0).Round(time.Millisecond))
	return c, nil
}

type loadResult struct {
	placed   int64
	elapsed  time.Duration
	perSec   []float64 // placements committed in each second
	latMS    []float64 // per request
	errors   int64
	firstErr error
}

// spawnLoad runs conc clients, each sending Spawn{Count: batch} in a loop,
// spread over the servers, until dur has passed or total placements were
// made (total 0: no limit).
func spawnLoad(c *cluster, conc, batch int, dur time.Duration, total int64) loadResult {
	var clients []shimv1connect.ShimServiceClient
	for _, d := range c.servers {
		clients = append(clients, c.api(d.api))
	}
	var placed, errs atomic.Int64
	var mu sync.Mutex
	var lat []float64
	var firstErr error
	ctx, cancel := context.WithTimeout(context.Background(), dur)
	defer cancel()
	var wg sync.WaitGroup
	spec := sleepSpec(pb.Isolation_ISOLATION_UNSPECIFIED)
	start := time.Now()
	var perSec []float64
	sampler := make(chan struct{})
	go func() {
		defer close(sampler)
		t := time.NewTicker(time.Second)
		defer t.Stop()
		last := int64(0)
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				p := placed.Load()
				perSec = append(perSec, float64(p-last))
				last = p
			}
		}
	}()
	var claimed atomic.Int64
	for i := range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cl := clients[i%len(clients)]
			for ctx.Err() == nil {
				n := batch
				if total > 0 {
					got := claimed.Add(int64(batch))
					if got-int64(batch) >= total {
						return
					}
					n = int(min(int64(batch), total-(got-int64(batch))))
				}
				t0 := time.Now()
				r, err := cl.Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec, Count: uint32(n)}))
				if err != nil {
					// The server sees the run's deadline (Connect sends it
					// along) a moment before this client does: a deadline
					// error in the last second is the end of the run.
					if ctx.Err() != nil || connect.CodeOf(err) == connect.CodeDeadlineExceeded && time.Since(start) > dur-time.Second {
						return
					}
					errs.Add(1)
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					if total > 0 {
						claimed.Add(-int64(n))
					}
					time.Sleep(10 * time.Millisecond)
					continue
				}
				placed.Add(int64(len(r.Msg.Processes)))
				mu.Lock()
				lat = append(lat, ms(time.Since(t0)))
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	cancel()
	<-sampler
	return loadResult{placed: placed.Load(), elapsed: elapsed, perSec: perSec, latMS: lat, errors: errs.Load(), firstErr: firstErr}
}

// ---- row 2: placement throughput ----

func rowPlacement(e *env) []Result {
	nodes := pick(e, 100, 1000)
	dur := pick(e, 5*time.Second, 30*time.Second)
	configs := []struct{ conc, batch int }{{64, 1}, {16, 100}, {8, 1000}}
	var out []Result
	for i, cf := range configs {
		row := fmt.Sprintf("2%c", 'a'+i)
		if !e.part(row) {
			continue
		}
		what := fmt.Sprintf("placements committed/s, %d clients × Spawn{Count:%d}", cf.conc, cf.batch)
		const goal = "≥ 10,000"
		c, err := simCluster(e, "place", nodes, e.simsPer)
		if err != nil {
			c.close()
			out = append(out, failed(row, what, "/s", goal, err))
			continue
		}
		before := e.scrapeAll(c.servers...)
		cpu0 := map[string]float64{}
		for _, d := range append(append([]*daemon(nil), c.servers...), c.workers...) {
			cpu0[d.name] = cpuSeconds(d.pid())
		}
		var stopPerf func()
		if ld, err := c.leader(context.Background()); err == nil {
			stopPerf = e.perf("row"+row+"-leader", ld.pid())
		}
		lr := spawnLoad(c, cf.conc, cf.batch, dur, 0)
		if stopPerf != nil {
			stopPerf()
		}
		delta := e.scrapeAll(c.servers...).sub(before)
		var cpuNote string
		var srvCPU, simCPU float64
		for i, d := range append(append([]*daemon(nil), c.servers...), c.workers...) {
			used := cpuSeconds(d.pid()) - cpu0[d.name]
			cpuNote += fmt.Sprintf(" %s %.2f", short(d), used/lr.elapsed.Seconds())
			if i < len(c.servers) {
				srvCPU += used
			} else {
				simCPU += used
			}
		}
		// CPU per placement is steadier than the rate on a machine shared
		// with other work.
		if lr.placed > 0 {
			cpuNote += fmt.Sprintf(" (per placement: servers %.0f µs, simulators %.0f µs)",
				srvCPU/float64(lr.placed)*1e6, simCPU/float64(lr.placed)*1e6)
		}
		rss := math.NaN()
		if ld, err := c.leader(context.Background()); err == nil {
			if r, err := rssKiB(ld.pid()); err == nil {
				rss = r
			}
		}
		c.close()
		rate := float64(lr.placed) / lr.elapsed.Seconds()
		lat := summarize(lr.latMS)
		note := fmt.Sprintf("overall %.0f/s (%d in %.1f s), %d simulated nodes; request latency p50 %.1f ms p99 %.1f ms; %d errors; shim_placements_total Δ %.0f; lease expirations during the run %.0f; raft apply %s; commands per entry %s; CPU cores used:%s; leader RSS %.0f MiB",
			rate, lr.placed, lr.elapsed.Seconds(), nodes, lat.Median, lat.P99, lr.errors, delta["shim_placements_total"], delta["shim_lease_expirations_total"],
			delta.histSummary("shim_raft_apply_seconds"), delta.countSummary("shim_raft_batch_commands"), cpuNote, rss/1024)
		if lr.firstErr != nil {
			note += "; first error: " + lr.firstErr.Error()
		}
		out = append(out, Result{Row: row, What: what, Unit: "/s", Sample: lr.perSec, Goal: goal + " (overall)",
			Check: func(Stats) bool { return rate >= 10000 }, Note: note})
	}
	return out
}

// ---- row 3: process starts on one node ----

func rowStarts(e *env) []Result {
	n := pick(e, 500, 2000)
	rounds := pick(e, 2, 3)
	const what, goal = "process starts/s on one node (Spawn{Count} → all running)", "≥ 500"
	c := newCluster(e, "starts")
	defer c.close()
	if err := c.startServers(1); err != nil {
		return []Result{failed("3", what, "/s", goal, err)}
	}
	var rates, nodeRates []float64
	var notes []string
	for r := range rounds {
		before := e.scrapeAll(c.servers...)
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		t0 := time.Now()
		recs, err := c.spawn(ctx, sleepSpec(pb.Isolation_ISOLATION_PROCESS), n)
		cancel()
		if err != nil {
			return []Result{failed("3", what, "/s", goal, err)}
		}
		ids := idsOf(recs)
		recs, err = c.waitProcs(ids, 5*time.Minute, allRunning(n))
		t1 := time.Now()
		if err != nil {
			return []Result{failed("3", what, "/s", goal, err)}
		}
		delta := e.scrapeAll(c.servers...).sub(before)
		var firstCreated, lastStarted int64
		for _, p := range recs {
			if firstCreated == 0 || p.CreatedUnixNano < firstCreated {
				firstCreated = p.CreatedUnixNano
			}
			lastStarted = max(lastStarted, p.StartedUnixNano)
		}
		rates = append(rates, float64(n)/t1.Sub(t0).Seconds())
		nodeRates = append(nodeRates, float64(n)/time.Duration(lastStarted-firstCreated).Seconds())
		notes = append(notes, fmt.Sprintf("round %d: starts_total Δ %.0f, exec start %s", r+1,
			delta["shim_process_starts_total"], delta.histSummary("shim_process_start_seconds")))
		ctx, cancel = context.WithTimeout(context.Background(), 60*time.Second)
		err = c.killProcs(ctx, ids)
		cancel()
		if err == nil {
			_, err = c.waitProcs(ids, 2*time.Minute, allTerminal)
		}
		if err != nil {
			return []Result{failed("3", what, "/s", goal, fmt.Errorf("cleanup: %w", err))}
		}
	}
	return []Result{
		{Row: "3", What: what, Unit: "/s", Sample: rates, Goal: goal, Check: func(s Stats) bool { return s.Median >= 500 },
			Note: fmt.Sprintf("single-server cluster (Raft, API and agent in one shimd), %d × /bin/sleep per round, --isolation process. %s",
				n, joinNotes(notes))},
		{Row: "3b", What: "same, node side: first created → last reported running", Unit: "/s", Sample: nodeRates},
	}
}

func joinNotes(ns []string) string {
	s := ""
	for i, n := range ns {
		if i > 0 {
			s += "; "
		}
		s += n
	}
	return s
}
