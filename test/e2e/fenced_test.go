package e2e

import (
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shim-run/shim/agent"
)

// TestFencedWhileDown: a single node runs a restart=never sleep; its shimd is
// killed (-9) and stays down past its lease, so the guard fences the process.
// The shimd that comes back reports it as fenced, not as having exited.
func TestFencedWhileDown(t *testing.T) {
	needRoot(t)
	c := startCluster(t, 1)
	id := strings.TrimSpace(c.must("spawn", "--restart", "never", "--", "/bin/sleep", "600"))
	var pid int
	waitFor(t, 20*time.Second, "the sleep running", func() bool {
		for _, p := range c.ps() {
			if p.ID == id && p.State == "running" && p.PID > 0 {
				pid = p.PID
				return true
			}
		}
		return false
	})
	d := c.nodes[0]
	_ = d.cmd.Process.Signal(syscall.SIGKILL)
	_ = d.cmd.Wait()
	d.cmd = nil
	d.log.Close()
	start := time.Now()
	waitFor(t, 5*time.Second, "the guard to fence the sleep", func() bool { return !alive(pid) })
	t.Logf("fenced %s after shimd's death", time.Since(start).Round(time.Millisecond))
	time.Sleep(500 * time.Millisecond) // well past the lease
	c.start(d)
	var got proc
	waitFor(t, 20*time.Second, "the process reported fenced", func() bool {
		for _, p := range c.ps("-a") {
			if p.ID == id {
				got = p
				return p.Reason == agent.ReasonFenced
			}
		}
		return false
	}, func() string { return got.State + ": " + got.Reason })
	if got.State != "failed" && got.State != "killed" {
		t.Fatalf("fenced process is %s (%s)", got.State, got.Reason)
	}
}
