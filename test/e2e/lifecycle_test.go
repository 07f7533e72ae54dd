package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// drainBeatScript is ptBeatScript that also beats once more when it is
// stopped (SIGTERM), so that its last beat marks when it stopped.
const drainBeatScript = `beat() { echo "$SHIM_PROCESS_ID $SHIM_INCARNATION ${EPOCHREALTIME/./}000 $SHIM_NODE" >> "$2"; }
trap 'beat "$@"; exit 0' TERM
exec 9<>"$1"
while :; do
  beat "$@"
  read -t 0.05 -u 9
done`

// TestDrain drains a node: every process on it moves make-before-break (its
// next incarnation beats on another node before the old one stops), the node
// takes no new work while drained, and takes it again after undrain.
func TestDrain(t *testing.T) {
	needRoot(t)
	c := startCluster(t, 3)
	fifo, beats := beatFiles(t)
	const n = 12
	// The beats go to a host file: host isolation, as root (the admin's).
	c.must("spawn", "--name", "beat", "--count", fmt.Sprint(n), "--isolation", "host", "--user", "0", "--",
		"/bin/bash", "-c", drainBeatScript, "beat", fifo, beats)
	waitFor(t, 20*time.Second, fmt.Sprintf("%d running", n), func() bool { return countRunning(c.ps()) == n })
	victim := c.nodes[1]
	old := map[string]proc{}
	for _, p := range c.ps() {
		if p.Node == victim.name {
			old[p.ID] = p
		}
	}
	if len(old) == 0 {
		t.Fatalf("%s holds no process", victim.name)
	}

	c.must("drain", victim.name)
	waitFor(t, 20*time.Second, "every process moved off the drained node", func() bool {
		ps := c.ps()
		for _, p := range ps {
			if p.Node == victim.name || p.State != "running" || !alive(p.PID) {
				return false
			}
		}
		return len(ps) == n
	})
	for _, p := range c.ps() {
		if o, ok := old[p.ID]; ok {
			if p.Incarnation != o.Incarnation+1 || p.PID == o.PID {
				t.Errorf("%s: incarnation %d pid %d after the drain, was %d pid %d", p.ID, p.Incarnation, p.PID, o.Incarnation, o.PID)
			}
			waitFor(t, 10*time.Second, fmt.Sprintf("old pid %d of %s stopped", o.PID, p.ID), func() bool { return !alive(o.PID) })
		}
	}
	// Make-before-break, from the workloads' own beats: each moved process's
	// new incarnation beat before its old one's last beat, which it writes
	// when it is told to stop.
	b, err := ptReadBeatsFile(beats)
	if err != nil {
		t.Fatal(err)
	}
	for id, o := range old {
		before, after := b.spans[id][o.Incarnation], b.spans[id][o.Incarnation+1]
		if before == nil || after == nil {
			t.Fatalf("%s: no beats from incarnation %d or %d", id, o.Incarnation, o.Incarnation+1)
		}
		if after.first > before.last {
			t.Errorf("%s: incarnation %d first beat at %s, after incarnation %d stopped at %s: break-before-make",
				id, o.Incarnation+1, ptTS(after.first), o.Incarnation, ptTS(before.last))
		}
	}

	// Drained: no new work, shown in nodes.
	if out := c.must("nodes"); !strings.Contains(out, "up,draining") {
		t.Errorf("nodes does not show the drain:\n%s", out)
	}
	c.must("spawn", "--count", "6", "--wait", "--", "/bin/sleep", "100000")
	for _, p := range c.ps() {
		if p.Node == victim.name {
			t.Fatalf("%s placed on drained node %s", p.ID, victim.name)
		}
	}
	c.must("undrain", victim.name)
	c.must("spawn", "--count", "6", "--wait", "--", "/bin/sleep", "100000")
	onVictim := 0
	for _, p := range c.ps() {
		if p.Node == victim.name {
			onVictim++
		}
	}
	if onVictim == 0 {
		t.Errorf("undrained node %s took none of 6 new processes", victim.name)
	}
}

// TestRestartPolicy checks the local restart policies on real crashes: a
// crash loop is visible in ps (restarts, last exit code and reason), never
// does not restart, and always restarts a clean exit too.
func TestRestartPolicy(t *testing.T) {
	needRoot(t)
	c := startCluster(t, 1)
	start := time.Now() // before the crash loop's first run: its restarts begin at once
	crash := strings.TrimSpace(c.must("spawn", "--name", "crash", "--restart", "on-failure", "--", "/bin/sh", "-c", "exit 3"))
	never := strings.TrimSpace(c.must("spawn", "--name", "never", "--restart", "never", "--", "/bin/sh", "-c", "exit 4"))
	always := strings.TrimSpace(c.must("spawn", "--name", "always", "--restart", "always", "--", "/bin/true"))
	done := strings.TrimSpace(c.must("spawn", "--name", "done", "--", "/bin/true"))

	get := func(id string) proc {
		for _, p := range c.ps("-a", id) {
			return p
		}
		t.Fatalf("%s not listed", id)
		return proc{}
	}
	waitFor(t, 20*time.Second, "the crash loop restarted 4 times", func() bool { return get(crash).Restarts >= 4 })
	// Backoff doubles from 100 ms: 4 restarts wait 100+200+400+800 ms.
	if took := time.Since(start); took < 1500*time.Millisecond {
		t.Errorf("4 restarts of a crash loop in %s: no exponential backoff", took)
	}
	p := get(crash)
	if p.ExitCode != 3 || !strings.Contains(p.Reason, "exit status 3") || (p.State != "backoff" && p.State != "running") {
		t.Errorf("crash loop shows %+v, want exit 3, reason exit status 3, backoff or running", p)
	}
	var last proc
	waitFor(t, 10*time.Second, "never: failed, not restarted", func() bool {
		last = get(never)
		return last.State == "failed" && last.ExitCode == 4 && last.Restarts == 0
	}, func() string { return fmt.Sprintf("%+v", last) })
	waitFor(t, 10*time.Second, "always: restarted after clean exits", func() bool { return get(always).Restarts >= 2 })
	waitFor(t, 10*time.Second, "on-failure: a clean exit is final", func() bool {
		p := get(done)
		return p.State == "exited" && p.ExitCode == 0 && p.Restarts == 0
	})
}
