package e2e

import (
	"fmt"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// beatFiles makes the FIFO the beat workloads sleep on and names the file
// they append their beats to.
func beatFiles(t *testing.T) (fifo, beats string) {
	t.Helper()
	dir := t.TempDir()
	fifo, beats = filepath.Join(dir, "fifo"), filepath.Join(dir, "beats")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	return fifo, beats
}

// TestAgentGone takes one node's shimd away while its host keeps running:
// first paused (SIGSTOP, later SIGCONT), then killed (SIGKILL, later started
// again). Either way no agent is left to fence the node's processes, so its
// guard must kill them before the cluster starts their replacements. The
// workloads' own beats are the evidence that no two incarnations of a
// process ever ran at the same time. When the agent comes back it rejoins
// and holds nothing stale.
func TestAgentGone(t *testing.T) {
	needRoot(t)
	c := startCluster(t, 3)
	fifo, beats := beatFiles(t)
	const n = 30
	c.must("spawn", "--name", "beat", "--count", fmt.Sprint(n), "--restart", "always", "--isolation", "host", "--user", "0", "--",
		"/bin/bash", "-c", ptBeatScript, "beat", fifo, beats)
	waitFor(t, 20*time.Second, fmt.Sprintf("%d running", n), func() bool { return countRunning(c.ps()) == n })

	for round, how := range []string{"paused", "killed"} {
		victim := c.follower(round)
		var others []string
		for _, d := range c.nodes {
			if d != victim {
				others = append(others, d.api)
			}
		}
		addr := strings.Join(others, ",") // a paused server accepts connections but never answers
		lost := map[string]proc{}
		for _, p := range c.ps() {
			if p.Node == victim.name {
				lost[p.ID] = p
			}
		}
		if len(lost) == 0 {
			t.Fatalf("%s holds no process", victim.name)
		}
		start := time.Now()
		switch how {
		case "paused":
			_ = victim.cmd.Process.Signal(syscall.SIGSTOP)
		case "killed":
			_ = victim.cmd.Process.Signal(syscall.SIGKILL)
			_ = victim.cmd.Wait()
			victim.cmd = nil
			victim.log.Close()
		}
		var after []proc
		waitFor(t, 10*time.Second, "the lost processes running elsewhere", func() bool {
			after = c.psAt(addr)
			moved := 0
			for _, p := range after {
				if old, ok := lost[p.ID]; ok && p.Node != victim.name && p.Incarnation > old.Incarnation &&
					p.State == "running" && alive(p.PID) {
					moved++
				}
			}
			return moved == len(lost)
		})
		for id, old := range lost {
			if alive(old.PID) {
				t.Fatalf("%s: the %s agent's process %d (incarnation %d) still runs after it was replaced", id, how, old.PID, old.Incarnation)
			}
		}
		t.Logf("agent %s on %s: its %d processes running elsewhere after %s", how, victim.name, len(lost), time.Since(start))

		back := time.Now()
		switch how {
		case "paused":
			_ = victim.cmd.Process.Signal(syscall.SIGCONT)
		case "killed":
			c.start(victim)
		}
		c.waitNodesUp(3, 20*time.Second)
		rejoin := time.Since(back)
		t.Logf("agent %s on %s: up again %s after it was resumed or restarted", how, victim.name, rejoin.Round(time.Millisecond))
		// A restarted server's agent rejoins through the members it
		// joined with while its own table catches up (about half a
		// second here); 3 s is generous for a loaded machine.
		if how == "killed" && rejoin > 3*time.Second {
			t.Fatalf("restarted %s took %s to rejoin, more than 3s", victim.name, rejoin)
		}
		waitFor(t, 10*time.Second, victim.name+" holding no stale sandbox", func() bool {
			for group := range ptLiveGroups(victim.name) {
				id, _, _ := strings.Cut(group, ".")
				if _, ok := lost[id]; ok {
					return false
				}
			}
			return true
		})
	}
	b, err := ptReadBeatsFile(beats)
	if err != nil {
		t.Fatal(err)
	}
	if o := b.overlaps(); len(o) > 0 {
		t.Fatalf("%d overlapping incarnations in %d beats:\n%s", len(o), b.lines, strings.Join(o, "\n"))
	}
	t.Logf("%d beats, no overlapping incarnations", b.lines)
}
