package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/shim-run/shim/agent"
	pb "github.com/shim-run/shim/proto/shimv1"
)

// ---- row 14: bounded history ----
//
// 100,000 short-lived processes (full; 20,000 quick) through 3 servers, on
// 4 simulated workers (a sim:exit process ends at once), the servers
// drained, with --retain 2s --retain-max 1000: the leader prunes what ended.
// A warm-up of 10,000 takes the heap to its peak first. The goal: the
// leader's RSS and its newest snapshot end within ±20 % of where they
// stood after the warm-up.

func rowSoak(e *env) []Result {
	const what = "soak: short-lived processes, leader RSS and snapshot after/before"
	goal := "after within ±20 % of before"
	total := pick(e, 20000, 100000)
	const batch, warm = 200, 10000
	c := newCluster(e, "soak")
	defer c.close()
	fail := func(err error) []Result { return []Result{failed("14", what, "%", goal, err)} }
	if err := c.startServers(3, "--retain", "2s", "--retain-max", "1000", "--snapshot-interval", "500ms", "--snapshot-threshold", "1"); err != nil {
		return fail(err)
	}
	if _, err := c.addWorker(4); err != nil {
		return fail(err)
	}
	if err := c.waitNodesUp(7, 60*time.Second); err != nil {
		return fail(err)
	}
	ctx := context.Background()
	if err := c.drain(ctx, false, names(c.servers...)...); err != nil {
		return fail(err)
	}
	spec := &pb.ProcessSpec{Name: "soak", Command: []string{agent.SimExit}, Restart: pb.RestartPolicy_RESTART_POLICY_NEVER,
		Resources: &pb.Resources{CpuMinMilli: 1, MemMinBytes: 1 << 20}}
	run := func(n int) error {
		for range n / batch {
			if _, err := c.spawn(ctx, spec, batch); err != nil {
				return err
			}
			deadline := time.Now().Add(2 * time.Minute)
			for {
				r, err := c.list(ctx, &pb.ListRequest{PageSize: 1})
				if err == nil && len(r.Processes) == 0 && r.NextPageToken == "" {
					break
				}
				if time.Now().After(deadline) {
					return fmt.Errorf("a batch did not end within 2 minutes")
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
		return nil
	}
	// settled waits for every ended process to be pruned and a snapshot
	// to follow, then reads the leader's RSS (KiB) and snapshot (bytes).
	var heap []float64 // the leader's Go heap in use (MiB) at each settled point
	settled := func() (float64, float64, error) {
		deadline := time.Now().Add(time.Minute)
		for {
			r, err := c.list(ctx, &pb.ListRequest{All: true, PageSize: 1})
			if err == nil && len(r.Processes) == 0 {
				break
			}
			if time.Now().After(deadline) {
				return 0, 0, fmt.Errorf("ended processes not pruned within a minute")
			}
			time.Sleep(100 * time.Millisecond)
		}
		lead, err := c.leader(ctx)
		if err != nil {
			return 0, 0, err
		}
		_, before := newestSnapshot(lead.dir)
		if err := c.drain(ctx, true, c.servers[0].name); err != nil { // log entries: a snapshot follows
			return 0, 0, err
		}
		if err := c.drain(ctx, false, c.servers[0].name); err != nil {
			return 0, 0, err
		}
		for {
			size, at := newestSnapshot(lead.dir)
			if at.After(before) {
				if m, err := e.scrape(lead); err == nil {
					heap = append(heap, m["go_memstats_heap_inuse_bytes"]/(1<<20))
				}
				rss, err := rssKiB(lead.pid())
				return rss, float64(size), err
			}
			if time.Now().After(deadline) {
				return 0, 0, fmt.Errorf("no snapshot after the prune within a minute")
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	if err := run(warm); err != nil {
		return fail(err)
	}
	rss0, snap0, err := settled()
	if err != nil {
		return fail(err)
	}
	t0 := time.Now()
	if err := run(total); err != nil {
		return fail(err)
	}
	took := time.Since(t0)
	rss1, snap1, err := settled()
	if err != nil {
		return fail(err)
	}
	within := func(s Stats) bool { return s.Median >= 80 && s.Median <= 120 }
	return []Result{
		{Row: "14", What: "soak: leader RSS after/before", Unit: "%", Sample: []float64{100 * rss1 / rss0}, Goal: goal, Check: within,
			Note: fmt.Sprintf("%d processes in %s after a %d warm-up; RSS %.1f → %.1f MiB; --retain 2s --retain-max 1000",
				total, took.Round(time.Second), warm, rss0/1024, rss1/1024)},
		{Row: "14c", What: "soak: leader Go heap in use after/before (no goal: what RSS holds on to)", Unit: "%", Sample: ratio(heap),
			Note: fmt.Sprintf("heap in use %s MiB", heapNote(heap))},
		{Row: "14b", What: "soak: leader snapshot after/before", Unit: "%", Sample: []float64{100 * snap1 / snap0}, Goal: goal, Check: within,
			Note: fmt.Sprintf("snapshot %.0f → %.0f KiB", snap0/1024, snap1/1024)},
	}
}

// newestSnapshot is the size and time of the newest finished Raft snapshot
// in a server's data dir (raft/snapshots/*/meta.json).
func newestSnapshot(dir string) (int64, time.Time) {
	metas, _ := filepath.Glob(filepath.Join(dir, "raft", "snapshots", "*", "meta.json"))
	var size int64
	var at time.Time
	for _, m := range metas {
		if strings.HasSuffix(filepath.Dir(m), ".tmp") {
			continue
		}
		fi, err := os.Stat(m)
		b, rerr := os.ReadFile(m)
		var meta struct{ Size int64 }
		if err != nil || rerr != nil || json.Unmarshal(b, &meta) != nil {
			continue
		}
		if fi.ModTime().After(at) {
			size, at = meta.Size, fi.ModTime()
		}
	}
	return size, at
}

func ratio(h []float64) []float64 {
	if len(h) != 2 || h[0] == 0 {
		return nil
	}
	return []float64{100 * h[1] / h[0]}
}

func heapNote(h []float64) string {
	if len(h) != 2 {
		return "not scraped"
	}
	return fmt.Sprintf("%.1f → %.1f", h[0], h[1])
}
