package e2e

import (
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// VM processes in the cluster (issue 16): TCG here (no /dev/kvm), a boot
// takes about 3 s, so each test runs one VM at a time.

// needVMs skips when the node cannot run VMs (it says why); CI installs
// what they need (.ci/run), so there the tests run.
func needVMs(t *testing.T, c *cluster) {
	t.Helper()
	if v := c.nodeVMs(); v != "yes" {
		t.Skipf("the node runs no VMs: %s", v)
	}
}

// guestRelease is the kernel release a VM boots: the newest
// /boot/vmlinuz-*, as exec/vm picks it.
func guestRelease(t *testing.T) string {
	t.Helper()
	ks, _ := filepath.Glob("/boot/vmlinuz-*")
	var rels []string
	for _, k := range ks {
		rels = append(rels, strings.TrimPrefix(filepath.Base(k), "vmlinuz-"))
	}
	if len(rels) == 0 {
		t.Skip("no /boot/vmlinuz-*")
	}
	slices.Sort(rels)
	return rels[len(rels)-1]
}

// TestVMProcess: `spawn --isolation vm -- uname -r` prints the guest
// kernel's release through `shim logs` and exits with its code; ps -o wide
// shows vm.
func TestVMProcess(t *testing.T) {
	c := startNode(t)
	needVMs(t, c)
	id := c.spawn("--isolation", "vm", "--restart", "never", "--cpu", "1:1", "--mem", "256M:512M", "--",
		"/bin/sh", "-c", "uname -r; grep MemTotal /proc/meminfo; exit 3")
	p := c.waitProc(id, "to end", 60*time.Second, func(p proc) bool { return p.State == "failed" || p.State == "exited" })
	out := c.must("logs", id)
	if lines := strings.Split(out, "\n"); lines[0] != guestRelease(t) || !strings.HasPrefix(lines[1], "MemTotal:") {
		t.Errorf("output %q: want the guest kernel's release %s, then MemTotal", out, guestRelease(t))
	}
	if p.State != "failed" || p.ExitCode != 3 {
		t.Errorf("ended %s with code %d (%s), want failed with 3", p.State, p.ExitCode, p.Reason)
	}
	if wide := c.must("ps", "-a", "-o", "wide", id); !strings.Contains(wide, " vm ") {
		t.Errorf("ps -o wide does not show vm:\n%s", wide)
	}
}

// TestVMResizeAndFence: `shim resize --mem` raises MemTotal inside the
// running VM by the amount added within 2 s, same QEMU; kill -9 of the
// node's shimd leaves the fence to the guard, which kills QEMU with the
// rest once the lease runs out.
func TestVMResizeAndFence(t *testing.T) {
	c := startNode(t)
	needVMs(t, c)
	id := c.spawn("--isolation", "vm", "--cpu", "1:1", "--mem", "256M:1G", "--",
		"/bin/sh", "-c", "while :; do grep MemTotal /proc/meminfo; sleep 0.1; done")
	p := c.waitRunning(id)
	memTotal := func() int64 { // the last MemTotal the guest printed, in bytes
		out := strings.TrimSpace(c.shim("logs", "--tail", "200", id).stdout)
		l := lastLine(out)
		f := strings.Fields(l)
		if len(f) < 2 {
			return 0
		}
		kb, _ := strconv.ParseInt(f[1], 10, 64)
		return kb << 10
	}
	var before int64
	waitFor(t, 60*time.Second, "the guest to print its memory", func() bool { before = memTotal(); return before > 0 })
	if wide := c.must("ps", "-o", "wide", id); !strings.Contains(wide, " vm ") {
		t.Errorf("ps -o wide does not show vm:\n%s", wide)
	}
	start := time.Now()
	c.must("resize", id, "--mem", "512M:") // the min alone: one value would also cap the max
	const added = 256 << 20
	var now int64
	waitFor(t, 2*time.Second+time.Since(start), "MemTotal to rise by 256M", func() bool {
		now = memTotal()
		return now >= before+added-(8<<20) // the guest may keep a little for the new memory's page structs
	}, func() string {
		return strconv.FormatInt(now>>20, 10) + "M from " + strconv.FormatInt(before>>20, 10) + "M"
	})
	t.Logf("MemTotal %dM -> %dM in %s", before>>20, now>>20, time.Since(start).Round(time.Millisecond))
	if q := c.waitRunning(id); q.PID != p.PID {
		t.Errorf("QEMU pid %d after the resize, want %d", q.PID, p.PID)
	}
	var guest string
	waitFor(t, 10*time.Second, "ps -o wide to show the guest's memory", func() bool {
		lines := strings.Split(strings.TrimSpace(c.must("ps", "-o", "wide", id)), "\n")
		head, row := strings.Fields(lines[0]), strings.Fields(lines[len(lines)-1])
		if i := slices.Index(head, "GUESTMEM"); i >= 0 && i < len(row) {
			guest = row[i]
		}
		return strings.HasSuffix(guest, "M") && guest >= "3" // about 400M: boot memory less the kernel's, plus 256M
	}, func() string { return guest })

	c.stop(c.nodes[0], syscall.SIGKILL)
	waitFor(t, 10*time.Second, "the guard to kill QEMU", func() bool { return !alive(p.PID) })
	if _, err := os.Stat(filepath.Join("/proc", strconv.Itoa(p.PID))); err == nil && alive(p.PID) {
		t.Errorf("QEMU %d still runs after the fence", p.PID)
	}
}

// TestVMGuestGrows: a VM's guest that allocates past its grant asks its
// node for more; the node asks the table (SetGrant, as the node) and the
// VM grows to what it is granted: same QEMU, no OOM kill, and the grant
// and its event say so.
func TestVMGuestGrows(t *testing.T) {
	c := startNode(t)
	needVMs(t, c)
	args := append([]string{"--isolation", "vm", "--restart", "never", "--cpu", "1:1", "--mem", "256M:1G"}, ramp(20, 600, 600)...)
	id := c.spawn(args...)
	p := c.waitRunning(id)
	var log string
	waitFor(t, 90*time.Second, "the guest to hold 600 MiB", func() bool {
		log = c.shim("logs", id).stdout
		return strings.Contains(log, "held")
	}, 250*time.Millisecond, func() string { return log + " " + c.shim("ps", "-o", "wide", id).stdout })
	g := c.growGet(id)
	if g.PID != p.PID || g.State != "running" || g.Grant.Mem < 600<<20 || g.Grant.Mem > 1<<30 {
		t.Errorf("after the guest's requests: %+v, want the same QEMU running with a grant of 600M to 1G", g)
	}
	var asked bool
	for _, e := range c.events("--type", "process.grown") {
		asked = asked || (e.ID == id && strings.Contains(e.Reason, "the guest asks") && strings.Contains(e.Reason, "asked by node"))
	}
	if !asked {
		t.Errorf("no process.grown event from the guest's request: %+v", c.events("--type", "process.grown"))
	}
}
