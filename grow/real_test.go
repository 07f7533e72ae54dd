package grow

import (
	"bufio"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"syscall"
	"testing"
	"time"

	"github.com/shim-run/shim/cgroup"
)

// The loop the agent will run, on real cgroups: sample every 100 ms,
// decide, apply the limits of the new grant at once (the agent goes through
// the table first).

// TestRealHelper is the workload of the tests below, run as a child of the
// test binary with GROW_REAL_HELPER set.
func TestRealHelper(t *testing.T) {
	mode := os.Getenv("GROW_REAL_HELPER")
	if mode == "" {
		t.Skip("the workload of the real-cgroup tests, not a test")
	}
	out := bufio.NewWriter(os.Stdout)
	say := func(s string) { fmt.Fprintln(out, s); out.Flush() }
	switch mode {
	case "ramp": // 8 MiB every 100 ms up to 384 MiB; on SIGUSR1, free it
		runtime.GOMAXPROCS(1)
		free := make(chan os.Signal, 1)
		signal.Notify(free, syscall.SIGUSR1)
		var keep [][]byte
		for range 48 {
			b := make([]byte, 8<<20)
			for j := 0; j < len(b); j += 4096 {
				b[j] = 1
			}
			keep = append(keep, b)
			time.Sleep(100 * time.Millisecond)
		}
		say("ramped")
		<-free
		keep = nil
		runtime.GC()
		debug.FreeOSMemory()
		say("freed")
		time.Sleep(time.Hour)
		runtime.KeepAlive(keep)
	case "spin": // two busy threads
		runtime.GOMAXPROCS(2)
		say("spinning")
		for range 2 {
			go func() {
				for x := 0; ; x++ {
					if x == -1 {
						say("never")
					}
				}
			}()
		}
		time.Sleep(time.Hour)
	}
}

// loop is one elastic process under the decision loop.
type loop struct {
	t      *testing.T
	p      Policy
	b      cgroup.Resources
	g      *cgroup.Group
	r      *cgroup.PressureReader
	st     State
	window []Sample
	pid    int
	lines  chan string
}

func newLoop(t *testing.T, name string, p Policy, b cgroup.Resources, mode string) *loop {
	t.Helper()
	if testing.Short() {
		t.Skip("skipping: seconds of a real workload")
	}
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root for cgroups")
	}
	m, err := cgroup.NewManager(fmt.Sprintf("grow-%d-%s/node", os.Getpid(), t.Name()))
	if err != nil {
		t.Skipf("skipping: %v", err)
	}
	l := &loop{t: t, p: p, b: b, lines: make(chan string, 64)}
	l.st.Grant = Grant{CPUMilli: b.CPUMinMilli, MemBytes: b.MemMinBytes}
	if l.g, err = m.Create(name, p.Limits(b, l.st.Grant)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = l.g.Kill()
		if l.pid > 0 {
			var ws syscall.WaitStatus
			_, _ = syscall.Wait4(l.pid, &ws, 0, nil)
		}
		if err := l.g.Delete(); err != nil {
			t.Errorf("Delete: %v", err)
		}
	})
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pw.Close()
	t.Cleanup(func() { pr.Close() })
	err = l.g.Spawn(func(fd int) error {
		attr := &syscall.ProcAttr{Env: []string{"GROW_REAL_HELPER=" + mode, "GOGC=off"}, Files: []uintptr{0, pw.Fd(), 2},
			Sys: &syscall.SysProcAttr{UseCgroupFD: fd >= 0, CgroupFD: fd}}
		var err error
		l.pid, err = syscall.ForkExec(os.Args[0], []string{os.Args[0], "-test.run=^TestRealHelper$"}, attr)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.g.JoinPSI(l.pid); err != nil {
		t.Fatal(err)
	}
	if l.r, err = l.g.PressureReader(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.r.Close() })
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			l.lines <- sc.Text()
		}
		close(l.lines)
	}()
	return l
}

// run samples and decides every 100 ms for up to d, or until until (nil:
// never) holds, which it reports.
func (l *loop) run(d time.Duration, until func(cgroup.Pressure, string) bool) bool {
	l.t.Helper()
	end := time.Now().Add(d)
	line := ""
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for ; ; <-tick.C {
		select {
		case s, ok := <-l.lines:
			if !ok {
				l.t.Fatalf("the workload exited (OOM-killed?)")
			}
			line = s
		default:
		}
		p, err := l.r.Read()
		if err != nil {
			l.t.Fatalf("Read: %v", err)
		}
		now := time.Now()
		l.window = append(l.window, Sample{At: now, Pressure: p})
		if len(l.window) > 10 {
			l.window = l.window[1:]
		}
		d := l.p.Decide(l.window, l.b, l.st, now)
		l.st = d.State
		if d.Changed() {
			if err := l.g.Update(l.p.Limits(l.b, d.Grant)); err != nil {
				l.t.Fatalf("Update: %v", err)
			}
			l.t.Logf("%s: cpu %dm, mem %s (use %s): %s", now.Format("05.000"), d.Grant.CPUMilli, mib(d.Grant.MemBytes),
				mib(int64(p.WorkingSet())), d.Reason())
		}
		if until != nil && until(p, line) {
			return true
		}
		if now.After(end) {
			return false
		}
	}
}

// TestRealMemoryRamp is the ramp on a real cgroup: 8 MiB every
// 100 ms up to 384 MiB in --mem 32M:512M. No OOM kill, the same process
// throughout, its limit rises with it, and afterwards use <= grant <= 1.3
// use. Freed, the grant is back below 128 MiB after the shrink delay (5 s
// here).
func TestRealMemoryRamp(t *testing.T) {
	p := DefaultPolicy()
	p.MemShrinkAfter = 5 * time.Second
	b := cgroup.Resources{MemMinBytes: 32 << 20, MemMaxBytes: 512 << 20}
	l := newLoop(t, "grow-ramp", p, b, "ramp")
	if !l.run(60*time.Second, func(_ cgroup.Pressure, line string) bool { return line == "ramped" }) {
		t.Fatalf("the ramp did not end within 60 s")
	}
	l.run(time.Second, nil) // settle: the slope is gone
	last := l.window[len(l.window)-1]
	use, grant := int64(last.MemBytes), l.st.Grant.MemBytes
	t.Logf("after the ramp: use %s (working set %s), grant %s, limit %s", mib(use), mib(int64(last.WorkingSet())), mib(grant), mib(int64(last.MemLimitBytes)))
	if grant < use || float64(grant) > 1.3*float64(use) {
		t.Errorf("grant %s for a use of %s, want between 1 and 1.3 times", mib(grant), mib(use))
	}
	if last.MemLimitBytes != uint64(p.Limits(b, l.st.Grant).MemMaxBytes) {
		t.Errorf("memory limit %d, want %d", last.MemLimitBytes, p.Limits(b, l.st.Grant).MemMaxBytes)
	}
	if u, err := l.g.Stats(); err != nil || u.OOMKills != 0 {
		t.Errorf("Stats = %+v, %v; want no OOM kill", u, err)
	}
	if procs, err := l.g.Procs(); err != nil || len(procs) != 1 || procs[0] != l.pid {
		t.Errorf("Procs = %v, %v; want the workload %d alone", procs, err, l.pid)
	}

	if err := syscall.Kill(l.pid, syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	freed := time.Now()
	if !l.run(30*time.Second, func(cgroup.Pressure, string) bool { return l.st.Grant.MemBytes < 128<<20 }) {
		t.Fatalf("grant %s 30 s after the free", mib(l.st.Grant.MemBytes))
	}
	t.Logf("grant %s %v after the free", mib(l.st.Grant.MemBytes), time.Since(freed).Round(10*time.Millisecond))
}

// TestRealCPURamp is the CPU ramp on a real cgroup: --cpu 0.1:1.5,
// two busy threads: the quota reaches 1.2 cores within 3 s (30 s allowed
// here). On a host whose CPUs are taken by other work (host CPU pressure
// above 50 %), two threads cannot use 1.2 cores and the policy rightly stops
// short: there the quota must still grow to at least 0.6 cores (6x its min).
func TestRealCPURamp(t *testing.T) {
	b := cgroup.Resources{CPUMinMilli: 100, CPUMaxMilli: 1500}
	l := newLoop(t, "grow-spin", DefaultPolicy(), b, "spin")
	for line := range l.lines {
		if line == "spinning" {
			break
		}
	}
	start := time.Now()
	if l.run(30*time.Second, func(p cgroup.Pressure, _ string) bool { return p.CPUQuotaMilli >= 1200 }) {
		t.Logf("quota at 1.2 cores or more %v after the start", time.Since(start).Round(10*time.Millisecond))
		return
	}
	q := l.window[len(l.window)-1].CPUQuotaMilli
	busy := hostCPUPressure(t)
	if busy <= 50 || q < 600 {
		t.Fatalf("CPU quota %dm after 30 s (host CPU pressure %.0f%%)", q, busy)
	}
	t.Logf("quota %dm after 30 s: the host is busy (CPU pressure %.0f%%), so 1.2 cores were not reachable", q, busy)
}

// hostCPUPressure is the host's CPU pressure, some avg10, in percent.
func hostCPUPressure(t *testing.T) float64 {
	b, err := os.ReadFile("/proc/pressure/cpu")
	if err != nil {
		t.Fatalf("host CPU pressure: %v", err)
	}
	var avg float64
	if _, err := fmt.Sscanf(string(b), "some avg10=%f", &avg); err != nil {
		t.Fatalf("host CPU pressure %q: %v", b, err)
	}
	return avg
}
