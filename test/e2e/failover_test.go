package e2e

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shim-run/shim/table"
	"github.com/shim-run/shim/test/report"
)

// killNode kills a node as if its host died: shimd and its guard with
// SIGKILL, then every process in the node's cgroups.
func (c *cluster) killNode(d *daemon) {
	c.t.Helper()
	killGuard(d)
	_ = d.cmd.Process.Signal(syscall.SIGKILL)
	_ = d.cmd.Wait()
	d.cmd = nil
	d.log.Close()
	killCgroups(d.name)
}

// killCgroups SIGKILLs every process in node's sandboxes.
func killCgroups(node string) {
	for _, pids := range ptGroups(node) {
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// removeCgroups removes a node's cgroup directories in every hierarchy,
// leaves first, waiting for killed tasks to leave, and returns the ones it
// could not remove within 5 s. shimd removes a group when its process ends
// and the guard a gone node's groups, but a test that kills both leaves them.
func removeCgroups(node string) []string {
	roots, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", "shim", "*", node)) // shim/<cluster>/<node>
	if v2s, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "shim", "*", node)); len(v2s) > 0 {
		roots = append(roots, v2s...)
	}
	if v2 := filepath.Join("/sys/fs/cgroup", "shim", node); fileExists(v2) {
		roots = append(roots, v2)
	}
	deadline := time.Now().Add(5 * time.Second)
	var left []string
	for _, root := range roots {
		var dirs []string
		_ = filepath.WalkDir(root, func(p string, e fs.DirEntry, err error) error {
			if err == nil && e.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- { // deepest first
			for {
				err := syscall.Rmdir(dirs[i])
				if err == nil || err == syscall.ENOENT {
					break
				}
				if err != syscall.EBUSY || time.Now().After(deadline) {
					left = append(left, dirs[i])
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
		}
		_ = syscall.Rmdir(filepath.Dir(root))               // shim/<cluster>/, if no other node uses it
		_ = syscall.Rmdir(filepath.Dir(filepath.Dir(root))) // shim/ // shim/, if no other node uses it
	}
	return left
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// TestNodeDeath kills one node's shimd and every process it ran, five times
// over: every one of its processes must run elsewhere, with a live PID and a
// new incarnation, and none may be missing or run twice.
//
// The bound is not the 2 s goal: that is judged by `make bench` (row 4),
// which reports p50, p99 and max. Here it only has to catch a recovery that
// hangs (a lease never expiring, a process never re-placed), so it allows a
// loaded 2-core CI machine ten times the goal; the figures are logged and
// kept for the report.
//
// The victim is never the Raft leader: a leader's death adds an election
// before any node can be judged (a new leader gives every node a fresh
// lease, see server/lease.go), which TestLeaderLoss covers.
func TestNodeDeath(t *testing.T) {
	needRoot(t)
	if testing.Short() {
		t.Skip("long: 300 processes, 5 rounds")
	}
	const limit = 20 * time.Second
	c := startCluster(t, 3)
	const n = 300
	// Spawn in batches of 50, as a service rollout would.
	for b := 1; b <= n/50; b++ {
		// A name per batch: --name with --count makes a service, which a
		// second spawn of the same name would not extend.
		c.must("spawn", "--name", fmt.Sprintf("w%d", b), "--count", "50", "--cpu", "0.001:", "--mem", "64K:", "--", "/bin/sleep", "100000")
		waitFor(t, 60*time.Second, fmt.Sprintf("%d running", b*50), func() bool { return countRunning(c.ps()) == b*50 })
	}

	var times []time.Duration
	for round := range 5 {
		victim := c.follower(round)
		before := c.ps()
		lost := map[string]proc{}
		for _, p := range before {
			if p.Node == victim.name {
				lost[p.ID] = p
			}
		}
		start := time.Now()
		c.killNode(victim)
		// Poll the API itself every 10 ms (a CLI run per poll would load
		// the machine it measures), and time each answer by when it was
		// received: the state it shows held by then.
		var after []proc
		var placed, took time.Duration
		waitFor(t, limit, "lost processes running elsewhere", func() bool {
			recs, at := c.list(others(c, victim))
			if recs == nil {
				return false
			}
			onVictim := 0
			for _, r := range recs {
				if r.Node == victim.name {
					onVictim++
				}
			}
			if onVictim == 0 && placed == 0 {
				placed = at.Sub(start)
			}
			after = after[:0]
			for _, r := range recs {
				after = append(after, proc{ID: r.Id, Node: r.Node, State: table.StateName(r.State), PID: int(r.Pid), Incarnation: r.Incarnation})
			}
			if onVictim > 0 || countRunning(after) != n {
				return false
			}
			for _, p := range after {
				if !alive(p.PID) {
					return false
				}
			}
			took = at.Sub(start)
			return true
		}, 10*time.Millisecond)
		times = append(times, took)
		// Nothing missing, nothing twice: every lost process has exactly one
		// live incarnation, on another node, and its old PID is dead.
		seen := map[string]bool{}
		for _, p := range after {
			if seen[p.ID] {
				t.Fatalf("%s listed twice", p.ID)
			}
			seen[p.ID] = true
			if old, ok := lost[p.ID]; ok {
				if p.Incarnation != old.Incarnation+1 || alive(old.PID) {
					t.Fatalf("%s: incarnation %d -> %d, old pid %d alive=%v", p.ID, old.Incarnation, p.Incarnation, old.PID, alive(old.PID))
				}
			}
		}
		if len(seen) != n {
			t.Fatalf("%d processes listed, want %d", len(seen), n)
		}
		t.Logf("round %d: %d processes of %s placed elsewhere after %s, running after %s", round+1, len(lost), victim.name, placed, took)
		// Bring the node back, empty, for the next round.
		c.start(victim)
		c.waitNodesUp(3, 20*time.Second)
	}
	sort.Slice(times, func(i, j int) bool { return times[i] < times[j] })
	summary := fmt.Sprintf("TestNodeDeath: kill -9 of a node's shimd and processes → all running elsewhere, over %d runs: p50 %s, p99 %s, max %s (each: %v)",
		len(times), times[len(times)/2], times[len(times)-1], times[len(times)-1], times)
	t.Log(summary)
	report.Keep(t, "failover", summary)
}

// others returns the API addresses of every node but d.
func others(c *cluster, d *daemon) []string {
	var out []string
	for _, o := range c.nodes {
		if o != d {
			out = append(out, o.api)
		}
	}
	return out
}

// follower returns a node that is up and not the Raft leader, rotating with
// k so that successive calls pick different nodes.
func (c *cluster) follower(k int) *daemon {
	c.t.Helper()
	var cands []*daemon
	waitFor(c.t, 10*time.Second, "a leader and an up follower", func() bool {
		cands = cands[:0]
		leader := false
		for _, ni := range c.nodesInfo() {
			leader = leader || ni.Leader
			for _, d := range c.nodes {
				if d.name == ni.Name && !ni.Leader && ni.State == "up" && d.cmd != nil {
					cands = append(cands, d)
				}
			}
		}
		return leader && len(cands) > 0
	})
	return cands[k%len(cands)]
}

func countRunning(ps []proc) int {
	k := 0
	for _, p := range ps {
		if p.State == "running" && p.PID > 0 {
			k++
		}
	}
	return k
}

// TestLeaderLoss kills the Raft leader: a new one is elected, spawn works
// again, and no node is wrongly declared dead. The 2 s goal is judged by
// `make bench` (row 5); the bound here allows a loaded CI machine.
func TestLeaderLoss(t *testing.T) {
	needRoot(t)
	c := startCluster(t, 3)
	c.must("spawn", "--count", "30", "--", "/bin/sleep", "100000")
	waitFor(t, 20*time.Second, "30 running", func() bool { return countRunning(c.ps()) == 30 })
	var leader *daemon
	for _, ni := range c.nodesInfo() {
		if ni.Leader {
			for _, d := range c.nodes {
				if d.name == ni.Name {
					leader = d
				}
			}
		}
	}
	if leader == nil {
		t.Fatal("no leader")
	}
	before := map[string]proc{}
	for _, p := range c.ps() {
		before[p.ID] = p
	}
	// The leader's host dies: its processes move, the others stay put.
	start := time.Now()
	c.killNode(leader)
	var others []string
	for _, d := range c.nodes {
		if d != leader {
			others = append(others, d.api)
		}
	}
	addr := strings.Join(others, ",")
	waitFor(t, 20*time.Second, "spawn accepted by a new leader", func() bool {
		return c.shimAt(addr, "--timeout", "1s", "spawn", "--", "/bin/sleep", "100000").code == 0
	})
	took := time.Since(start)
	t.Logf("leader killed: writes accepted again after %s", took)
	report.Keep(t, "failover", fmt.Sprintf("TestLeaderLoss: kill -9 of the leader → spawn accepted again after %s", took))
	// The survivors stay up, and their processes were not restarted.
	waitFor(t, 20*time.Second, "leader's processes moved", func() bool {
		for _, p := range c.psAt(addr) {
			if p.Node == leader.name {
				return false
			}
		}
		return true
	})
	r := c.shimAt(addr, "nodes", "-o", "json")
	for _, d := range c.nodes {
		if d != leader && !strings.Contains(r.stdout, fmt.Sprintf(`"name": %q`, d.name)) {
			t.Fatalf("node %s missing from %s", d.name, r.stdout)
		}
	}
	for _, p := range c.psAt(addr) {
		if b, ok := before[p.ID]; ok && b.Node != leader.name {
			if p.PID != b.PID || p.Incarnation != b.Incarnation || p.Restarts != b.Restarts {
				t.Fatalf("%s on surviving node %s was disturbed: %+v -> %+v", p.ID, b.Node, b, p)
			}
		}
	}
}

func (c *cluster) psAt(addr string) []proc {
	c.t.Helper()
	r := c.shimAt(addr, "ps", "-o", "json")
	if r.code != 0 {
		return nil
	}
	return decodePS(c.t, r.stdout)
}
