package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestNeighbourClusters runs two clusters with the same node names on one
// host. Their cgroups are apart (shim/<cluster>/<node>), so when one
// cluster's shimds are SIGKILLed and their guards fence, the guards kill that
// cluster's processes only: the other cluster's processes and daemons live
// on, with the same PIDs.
func TestNeighbourClusters(t *testing.T) {
	needRoot(t)
	prefix := fmt.Sprintf("%snb%d", os.Getenv("SHIM_E2E_PREFIX"), time.Now().UnixNano()%1e6)
	a := startClusterNamed(t, prefix, 2)
	b := startClusterNamed(t, prefix, 2)
	spawn := func(c *cluster, name string) []int {
		c.must("spawn", "--name", name, "--count", "2", "--wait", "--", "/bin/sleep", "600")
		var pids []int
		waitFor(t, 20*time.Second, name+" running", func() bool {
			pids = pids[:0]
			for _, p := range c.ps() {
				if p.Name == name && p.State == "running" && p.PID > 0 && alive(p.PID) {
					pids = append(pids, p.PID)
				}
			}
			return len(pids) == 2
		})
		return pids
	}
	aPIDs, bPIDs := spawn(a, "in-a"), spawn(b, "in-b")
	roots := map[string]bool{}
	for _, pid := range append(append([]int(nil), aPIDs...), bPIDs...) {
		cg := cgroupOf(t, pid, "pids")
		parts := strings.Split(strings.Trim(cg, "/"), "/") // shim/<cluster>/<node>/<group>
		if len(parts) != 4 || parts[0] != "shim" {
			t.Fatalf("pid %d in cgroup %s, want shim/<cluster>/<node>/<group>", pid, cg)
		}
		roots[parts[1]] = true
	}
	if len(roots) != 2 {
		t.Fatalf("the two clusters' processes are under %d cluster roots, want 2: %v", len(roots), roots)
	}

	// Cluster a's hosts "crash": shimd SIGKILLed, the guards stay and fence.
	for _, d := range a.nodes {
		a.stop(d, syscall.SIGKILL)
	}
	waitFor(t, 15*time.Second, "cluster a's guards to fence its processes", func() bool {
		for _, pid := range aPIDs {
			if alive(pid) {
				return false
			}
		}
		return true
	})
	// Past every fence (the guards recheck every 100 ms, then every second).
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		for _, pid := range bPIDs {
			if !alive(pid) {
				t.Fatalf("cluster b's process %d died when cluster a was fenced", pid)
			}
		}
		for _, d := range b.nodes {
			if d.cmd == nil || !alive(d.cmd.Process.Pid) {
				t.Fatalf("cluster b's shimd %s died when cluster a was fenced", d.name)
			}
			if !guardAlive(d) {
				t.Fatalf("cluster b's guard of %s died when cluster a was fenced", d.name)
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, p := range b.ps() {
		if p.Name == "in-b" && (p.State != "running" || !containsInt(bPIDs, p.PID)) {
			t.Fatalf("cluster b's %s is %s pid %d, want running as one of %v", p.ID, p.State, p.PID, bPIDs)
		}
	}
	for _, d := range a.nodes {
		killGuard(d)
	}
}

func guardAlive(d *daemon) bool {
	b, err := os.ReadFile(filepath.Join(d.dir, "guard.pid"))
	if err != nil {
		return false
	}
	var pid int
	_, err = fmt.Sscan(string(b), &pid)
	return err == nil && alive(pid)
}

func containsInt(xs []int, x int) bool {
	for _, y := range xs {
		if y == x {
			return true
		}
	}
	return false
}
