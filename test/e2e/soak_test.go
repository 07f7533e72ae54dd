package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/shim-run/shim/agent"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/test/report"
)

// TestSoakBoundedHistory runs many short-lived processes through a
// 3-server cluster with a short retention (--retain 2s, --retain-max
// 1000): the leader prunes them, so its RSS and its snapshot end where
// they began (± 20 %). SHIM_SOAK_ROUNDS sets the rounds of 200. The
// processes run on simulated workers (one shimd --simulate), which end a
// sim:exit process at once; the servers are drained so nothing lands on
// them. A warm-up of the same shape comes first, so "began" is the
// steady state, not an empty process. make bench row 14 runs 100,000.
func TestSoakBoundedHistory(t *testing.T) {
	needRoot(t)
	c := startCluster(t, 3, "--retain", "2s", "--retain-max", "1000",
		"--snapshot-interval", "500ms", "--snapshot-threshold", "1")
	sim := &daemon{name: c.nodes[0].name + "-sim", api: freePort(t), dir: t.TempDir()}
	sim.args = append([]string{"--name", sim.name, "--data-dir", sim.dir, "--api", sim.api, "--role", "worker", "--simulate", "4"},
		c.joinArgs()...)
	c.start(sim)
	defer func() {
		c.stop(sim, syscall.SIGTERM)
		_ = os.RemoveAll(filepath.Join("/dev/shm", "shim-sim-"+sim.name))
	}()
	c.waitNodesUp(3+4, 30*time.Second)
	for _, d := range c.nodes {
		c.must("drain", d.name)
	}
	const batch = 200
	rounds := 25 // 5,000 processes after the warm-up
	if testing.Short() {
		rounds = 10
	}
	if n, err := strconv.Atoi(os.Getenv("SHIM_SOAK_ROUNDS")); err == nil && n > 0 {
		rounds = n
	}
	ctx := context.Background()
	api := c.api(c.nodes[0].api)
	spec := &pb.ProcessSpec{Name: "soak", Command: []string{agent.SimExit}, Restart: pb.RestartPolicy_RESTART_POLICY_NEVER,
		Resources: &pb.Resources{CpuMinMilli: 1, MemMinBytes: 1 << 20}}
	run := func(n int) {
		t.Helper()
		for range n {
			resp, err := api.Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec, Count: batch}))
			if err != nil {
				t.Fatalf("spawn: %v", err)
			}
			if len(resp.Msg.Processes) != batch {
				t.Fatalf("spawned %d, want %d", len(resp.Msg.Processes), batch)
			}
			waitFor(t, 60*time.Second, "a batch to end", func() bool {
				l, err := api.List(ctx, connect.NewRequest(&pb.ListRequest{PageSize: 1})) // live ones
				return err == nil && len(l.Msg.Processes) == 0
			})
		}
	}
	// settled waits until every ended process is pruned and a snapshot
	// newer than the last prune is on the leader's disk, and measures.
	settled := func(what string) (rss, snap int64) {
		t.Helper()
		waitFor(t, 30*time.Second, what+": every ended process pruned", func() bool {
			l, err := api.List(ctx, connect.NewRequest(&pb.ListRequest{All: true, PageSize: 1}))
			return err == nil && len(l.Msg.Processes) == 0
		})
		lead := c.leaderDaemon()
		_, before := newestSnapshot(lead.dir)
		c.must("undrain", c.nodes[0].name) // log entries, so a new snapshot follows the prune
		c.must("drain", c.nodes[0].name)
		var at time.Time
		waitFor(t, 30*time.Second, what+": a snapshot after the prune", func() bool {
			snap, at = newestSnapshot(lead.dir)
			return at.After(before)
		})
		return rssBytes(t, lead.cmd.Process.Pid), snap
	}
	run(rounds) // warm-up, as long as the soak: it fills the event ring (4,096) and takes the heap to its peak
	rss0, snap0 := settled("after the warm-up")
	run(rounds)
	rss1, snap1 := settled("after the soak")
	t.Logf("soak: %d processes; leader RSS %.1f MiB -> %.1f MiB, snapshot %d -> %d bytes",
		rounds*batch, float64(rss0)/(1<<20), float64(rss1)/(1<<20), snap0, snap1)
	report.Keep(t, "soak", fmt.Sprintf("soak (%d short-lived processes after as many to warm up, 3 servers, --retain 2s --retain-max 1000): leader RSS %.1f -> %.1f MiB, snapshot %d -> %d bytes",
		rounds*batch, float64(rss0)/(1<<20), float64(rss1)/(1<<20), snap0, snap1))
	within := func(a, b int64) bool { return float64(b) <= 1.2*float64(a) && float64(b) >= 0.8*float64(a) }
	if !within(rss0, rss1) {
		t.Errorf("the leader's RSS went from %d to %d bytes (more than ±20%%)", rss0, rss1)
	}
	if !within(snap0, snap1) {
		t.Errorf("the leader's snapshot went from %d to %d bytes (more than ±20%%)", snap0, snap1)
	}
}

// leaderDaemon is the daemon the cluster calls its leader.
func (c *cluster) leaderDaemon() *daemon {
	c.t.Helper()
	var lead *daemon
	waitFor(c.t, 15*time.Second, "a leader", func() bool {
		for _, n := range c.nodesInfo() {
			if n.Leader {
				for _, d := range c.nodes {
					if d.name == n.Name && d.cmd != nil {
						lead = d
						return true
					}
				}
			}
		}
		return false
	})
	return lead
}

// newestSnapshot is the size and time of the newest Raft snapshot in a
// server's data dir (hashicorp/raft's file store: raft/snapshots/*/meta.json).
func newestSnapshot(dir string) (int64, time.Time) {
	metas, _ := filepath.Glob(filepath.Join(dir, "raft", "snapshots", "*", "meta.json"))
	var size int64
	var at time.Time
	for _, m := range metas {
		if strings.HasSuffix(filepath.Dir(m), ".tmp") {
			continue // being written
		}
		fi, err := os.Stat(m)
		if err != nil {
			continue
		}
		b, err := os.ReadFile(m)
		var meta struct{ Size int64 }
		if err != nil || json.Unmarshal(b, &meta) != nil {
			continue
		}
		if fi.ModTime().After(at) {
			size, at = meta.Size, fi.ModTime()
		}
	}
	return size, at
}

func rssBytes(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	t.Fatalf("no VmRSS for %d", pid)
	return 0
}
