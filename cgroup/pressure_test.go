package cgroup

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestPressureParsers(t *testing.T) {
	psi := []byte("some avg10=1.50 avg60=0.20 avg300=0.00 total=123456\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=789\n")
	if got := psiTotal(psi, "some"); got != 123456 {
		t.Errorf("psiTotal some = %d", got)
	}
	if got := psiTotal(psi, "full"); got != 789 {
		t.Errorf("psiTotal full = %d", got)
	}
	if got := psiTotal([]byte("some avg10=0.00\n"), "some"); got != 0 {
		t.Errorf("psiTotal without total= = %d", got)
	}
	stat := []byte("inactive_file 4096\nworkingset_refault_anon 7\nworkingset_refault_file 9\ntotal_inactive_file 8192\ntotal_workingset_refault_anon 70\ntotal_workingset_refault_file 90")
	var p Pressure
	if err := parseMemStat(stat, &p, false); err != nil || p.MemInactiveFile != 8192 || p.RefaultAnon != 70 || p.RefaultFile != 90 {
		t.Errorf("v1 memory.stat: %+v, %v; want the total_ fields", p, err)
	}
	p = Pressure{}
	if err := parseMemStat(stat, &p, true); err != nil || p.MemInactiveFile != 4096 || p.RefaultAnon != 7 || p.RefaultFile != 9 {
		t.Errorf("v2 memory.stat: %+v, %v", p, err)
	}
	// A key that is a prefix of another must not match it.
	if got := kv([]byte("nr_throttled_x 5\nnr_throttled 3\n"), "nr_throttled"); got != 3 {
		t.Errorf("kv prefix = %d, want 3", got)
	}
	for in, want := range map[string]uint64{"max\n": 0, "9223372036854771712\n": 0, "67108864\n": 64 << 20} {
		p := Pressure{MemLimitBytes: 1}
		if err := parseMemMax([]byte(in), &p, false); err != nil || p.MemLimitBytes != want {
			t.Errorf("parseMemMax(%q) = %d, %v; want %d", in, p.MemLimitBytes, err, want)
		}
	}
	for in, want := range map[string]uint64{"-1\n": 0, "150000\n": 1500, "1000\n": 10} {
		p := Pressure{CPUQuotaMilli: 1}
		if err := parseCFSQuota([]byte(in), &p, false); err != nil || p.CPUQuotaMilli != want {
			t.Errorf("parseCFSQuota(%q) = %d, %v; want %d", in, p.CPUQuotaMilli, err, want)
		}
	}
	for in, want := range map[string]uint64{"max 100000\n": 0, "50000 100000\n": 500, "20000 10000": 2000} {
		p := Pressure{CPUQuotaMilli: 1}
		if err := parseCPUMax([]byte(in), &p, true); err != nil || p.CPUQuotaMilli != want {
			t.Errorf("parseCPUMax(%q) = %d, %v; want %d", in, p.CPUQuotaMilli, err, want)
		}
	}
	for _, bad := range []string{"50000", "50000 0", "x 100000"} {
		if err := parseCPUMax([]byte(bad), &Pressure{}, true); !errors.Is(err, ErrInvalid) {
			t.Errorf("parseCPUMax(%q): %v, want ErrInvalid", bad, err)
		}
	}
	for _, bad := range []string{"", "\n", "12a", "-1", "99999999999999999999"} {
		if _, err := parseUintBytes([]byte(bad)); !errors.Is(err, ErrInvalid) {
			t.Errorf("parseUintBytes(%q): %v, want ErrInvalid", bad, err)
		}
	}
	if n, err := parseUintBytes([]byte(" 18446744073709551615\n")); err != nil || n != 1<<64-1 {
		t.Errorf("parseUintBytes(max) = %d, %v", n, err)
	}
	if ws := (Pressure{MemBytes: 100, MemInactiveFile: 30}).WorkingSet(); ws != 70 {
		t.Errorf("WorkingSet = %d", ws)
	}
	if ws := (Pressure{MemBytes: 10, MemInactiveFile: 30}).WorkingSet(); ws != 0 {
		t.Errorf("WorkingSet below zero = %d", ws)
	}
}

// TestPressureV2 reads a fake unified group (plain files in a temporary
// directory; this host has no usable v2): every field from its v2 file,
// fresh values on the next Read through the same descriptors, no PSI when
// the pressure files are missing, and ErrNotFound for a missing group.
func TestPressureV2(t *testing.T) {
	mount := t.TempDir()
	m := &Manager{root: "grow/n", v2: true, mount: mount}
	g := m.group("w.1")
	if err := os.MkdirAll(g.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	write := func(f, s string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(g.dir, f), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("memory.current", "1048576\n")
	write("memory.max", "max\n")
	write("memory.events", "low 0\nhigh 2\nmax 5\noom 0\noom_kill 0\n")
	write("memory.stat", "anon 1000\nfile 2000\ninactive_file 4096\nworkingset_refault_anon 3\nworkingset_refault_file 4\n")
	write("cpu.stat", "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 20\nnr_throttled 18\nthrottled_usec 900\n")
	write("cpu.max", "max 100000\n")
	r, err := g.PressureReader()
	if err != nil {
		t.Fatalf("PressureReader: %v", err)
	}
	defer r.Close()
	p, err := r.Read()
	want := Pressure{MemBytes: 1 << 20, MemInactiveFile: 4096, MemFailcnt: 5, RefaultAnon: 3, RefaultFile: 4,
		CPUUsageNanos: 1500000, CPUPeriods: 20, CPUThrottled: 18, CPUThrottledNs: 900000}
	if err != nil || p != want {
		t.Fatalf("Read = %+v, %v\nwant %+v", p, err, want)
	}
	// New contents, same descriptors; the pressure files appear.
	write("memory.current", "2097152\n")
	write("memory.max", "4194304\n")
	write("cpu.max", "150000 100000\n")
	write("memory.pressure", "some avg10=0.00 avg60=0.00 avg300=0.00 total=11\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=7\n")
	write("cpu.pressure", "some avg10=0.00 avg60=0.00 avg300=0.00 total=13\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
	p, err = r.Read()
	if err != nil || p.PSI {
		t.Fatalf("second Read = %+v, %v; want no PSI yet (looked for every 16th Read)", p, err)
	}
	for range 15 {
		p, err = r.Read()
	}
	want.MemBytes, want.MemLimitBytes, want.CPUQuotaMilli = 2<<20, 4<<20, 1500
	want.MemSomeUsec, want.MemFullUsec, want.CPUSomeUsec, want.PSI = 11, 7, 13, true
	if err != nil || p != want {
		t.Fatalf("17th Read = %+v, %v\nwant %+v", p, err, want)
	}
	if p, err := g.Pressure(); err != nil || p != want {
		t.Errorf("Pressure = %+v, %v", p, err)
	}
	write("memory.current", "12x\n") // unparsable: one clear error
	if _, err := r.Read(); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "memory.current") {
		t.Errorf("Read of a bad memory.current: %v", err)
	}
	if _, err := m.group("gone").Pressure(); !errors.Is(err, ErrNotFound) {
		t.Errorf("Pressure of a missing group: %v, want ErrNotFound", err)
	}
	if err := g.JoinPSI(1); err != nil {
		t.Errorf("JoinPSI on v2: %v, want a no-op", err)
	}
}

// newGrowManager returns a Manager whose root is unique to the test and
// named after this task ("grow-"), and checks at the end that nothing of it
// is left in any hierarchy, the hybrid unified one included.
func newGrowManager(t *testing.T) *Manager {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: cgroup tests need root")
	}
	top := fmt.Sprintf("grow-%d-%s", os.Getpid(), strings.ReplaceAll(t.Name(), "/", "_"))
	m, err := NewManager(top + "/node")
	if err != nil {
		t.Skipf("skipping: %v", err)
	}
	t.Cleanup(func() {
		names, _ := m.List()
		for _, n := range names {
			if g, err := m.Open(n); err == nil {
				_ = g.Kill()
				_ = g.Delete()
			}
		}
		dirs := mountDirs(m)
		if u, ok := m.unifiedMount(); ok {
			dirs = append(dirs, u)
		}
		for _, d := range dirs {
			if _, err := os.Stat(filepath.Join(d, top)); err == nil {
				t.Errorf("%s left behind", filepath.Join(d, top))
				_ = os.Remove(filepath.Join(d, top, "node"))
				_ = os.Remove(filepath.Join(d, top))
			}
		}
	})
	return m
}

// create creates a group that the test deletes at its end (after the
// workloads started later are killed and reaped).
func create(t *testing.T, m *Manager, name string, r Resources) *Group {
	t.Helper()
	g, err := m.Create(name, r)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = g.Kill()
		if err := g.Delete(); err != nil {
			t.Errorf("Delete: %v", err)
		}
	})
	return g
}

// TestPressureHelper is the workload of the tests below, run as a child of
// the test binary with SHIM_PRESSURE_HELPER set. It reports each step on
// stdout.
func TestPressureHelper(t *testing.T) {
	mode := os.Getenv("SHIM_PRESSURE_HELPER")
	if mode == "" {
		t.Skip("the workload of the pressure tests, not a test")
	}
	runtime.GOMAXPROCS(1)
	out := bufio.NewWriter(os.Stdout)
	say := func(s string) { fmt.Fprintln(out, s); out.Flush() }
	switch mode {
	case "anon": // 4 MiB every 50 ms, 8 steps, then hold
		var keep [][]byte
		for i := 1; i <= 8; i++ {
			b := make([]byte, 4<<20)
			for j := 0; j < len(b); j += 4096 {
				b[j] = 1
			}
			keep = append(keep, b)
			say("step " + strconv.Itoa(i))
			time.Sleep(50 * time.Millisecond)
		}
		say("done")
		time.Sleep(time.Hour)
		runtime.KeepAlive(keep)
	case "cache": // write a file twice the limit, then read it over and over
		path := os.Getenv("SHIM_PRESSURE_FILE")
		f, err := os.Create(path)
		if err != nil {
			say("error " + err.Error())
			return
		}
		buf := make([]byte, 1<<20)
		for range 48 {
			if _, err := f.Write(buf); err != nil {
				say("error " + err.Error())
				return
			}
		}
		f.Close()
		say("written")
		for {
			f, err := os.Open(path)
			if err != nil {
				say("error " + err.Error())
				return
			}
			for {
				if _, err := f.Read(buf); err != nil {
					break
				}
			}
			f.Close()
			say("read")
		}
	case "spin":
		say("spinning")
		for x := 0; ; x++ {
			if x == -1 {
				say("never")
			}
		}
	}
}

// startHelper starts the helper workload in g (and in its PSI group) and
// returns its pid and a channel of the lines it prints, each with the time
// it was read.
func startHelper(t *testing.T, g *Group, mode string, env ...string) (int, <-chan line) {
	t.Helper()
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	err = g.Spawn(func(fd int) error {
		attr := &syscall.ProcAttr{
			Env:   append([]string{"SHIM_PRESSURE_HELPER=" + mode, "GOGC=off"}, env...),
			Files: []uintptr{0, pw.Fd(), 2},
			Sys:   &syscall.SysProcAttr{UseCgroupFD: fd >= 0, CgroupFD: fd},
		}
		var err error
		pid, err = syscall.ForkExec(os.Args[0], []string{os.Args[0], "-test.run=^TestPressureHelper$"}, attr)
		return err
	})
	pw.Close()
	if err != nil {
		pr.Close()
		t.Fatalf("start the %s workload: %v", mode, err)
	}
	t.Cleanup(func() {
		_ = syscall.Kill(pid, syscall.SIGKILL)
		var ws syscall.WaitStatus
		_, _ = syscall.Wait4(pid, &ws, 0, nil)
		pr.Close()
	})
	if err := g.JoinPSI(pid); err != nil {
		t.Fatalf("JoinPSI: %v", err)
	}
	lines := make(chan line, 1024)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			select {
			case lines <- line{sc.Text(), time.Now()}:
			default: // the test stopped listening
			}
		}
	}()
	return pid, lines
}

type line struct {
	text string
	at   time.Time
}

// waitLine waits for the workload to print want.
func waitLine(t *testing.T, lines <-chan line, want string, timeout time.Duration) line {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("the workload exited before printing %q", want)
			}
			if strings.HasPrefix(l.text, "error") {
				t.Fatalf("workload: %s", l.text)
			}
			if l.text == want {
				return l
			}
		case <-deadline:
			t.Fatalf("no %q from the workload within %v", want, timeout)
		}
	}
}

// sampleUntil reads r every 5 ms until cond holds, and returns that sample
// and when it was read.
func sampleUntil(t *testing.T, r *PressureReader, what string, timeout time.Duration, cond func(Pressure) bool) (Pressure, time.Time) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		p, err := r.Read()
		if err != nil {
			t.Fatalf("Read: %v", err)
		}
		if cond(p) {
			return p, time.Now()
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v; last sample %+v", what, timeout, p)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestPressureSignalsMemory: a workload that allocates anonymous memory in
// steps shows its use rising; one that caches a file twice its limit and
// reads it again shows limit hits (failcnt), refaults and memory PSI.
func TestPressureSignalsMemory(t *testing.T) {
	m := newGrowManager(t)
	if m.V2() {
		t.Skip("skipping: the signals are checked on cgroup v1 (this host kind)")
	}
	g := create(t, m, "grow-anon", Resources{MemMaxBytes: 128 << 20})
	r, err := g.PressureReader()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	_, lines := startHelper(t, g, "anon")
	first := waitLine(t, lines, "step 1", 30*time.Second)
	p0, _ := sampleUntil(t, r, "use after step 1", 5*time.Second, func(p Pressure) bool { return p.MemBytes > 4<<20 })
	if p0.MemLimitBytes != 128<<20 || p0.CPUQuotaMilli != 0 {
		t.Errorf("MemLimitBytes = %d, CPUQuotaMilli = %d; want %d and 0 (unlimited)", p0.MemLimitBytes, p0.CPUQuotaMilli, 128<<20)
	}
	last := waitLine(t, lines, "step 8", 30*time.Second)
	// Eight steps of 4 MiB, every page touched and all kept: at least 32 MiB.
	// (Not p0 plus 28 MiB: on a busy host p0 may be read after step 2 or 3.)
	p1, seen := sampleUntil(t, r, "use after step 8", 10*time.Second, func(p Pressure) bool { return p.MemBytes >= 32<<20 })
	t.Logf("anon: use %d MiB after step 1, %d MiB after step 8 (%v after it was printed; steps 1-8 took %v); PSI %v",
		p0.MemBytes>>20, p1.MemBytes>>20, seen.Sub(last.at).Round(time.Millisecond), last.at.Sub(first.at).Round(time.Millisecond), p1.PSI)
	if p1.WorkingSet() < 28<<20 {
		t.Errorf("working set %d after 32 MiB of anonymous memory", p1.WorkingSet())
	}

	c := create(t, m, "grow-cache", Resources{MemMaxBytes: 24 << 20})
	_, clines := startHelper(t, c, "cache", "SHIM_PRESSURE_FILE="+filepath.Join(t.TempDir(), "grow-cache"))
	rc, err := c.PressureReader() // after JoinPSI: PSI from the first Read
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	var c0 Pressure // a new group's counters start at zero
	w := waitLine(t, clines, "written", 60*time.Second)
	c1, _ := sampleUntil(t, rc, "failcnt after writing 48 MiB", 5*time.Second, func(p Pressure) bool { return p.MemFailcnt > c0.MemFailcnt })
	waitLine(t, clines, "read", 60*time.Second)
	c2, seen := sampleUntil(t, rc, "refaults while reading it again", 30*time.Second, func(p Pressure) bool {
		return p.RefaultFile > c1.RefaultFile
	})
	t.Logf("cache: failcnt %d after writing (use %d MiB, limit %d MiB); refaults %d->%d %v after the write ended; memory PSI some %d us, full %d us (PSI %v)",
		c1.MemFailcnt, c1.MemBytes>>20, c1.MemLimitBytes>>20, c1.RefaultFile, c2.RefaultFile, seen.Sub(w.at).Round(time.Millisecond), c2.MemSomeUsec, c2.MemFullUsec, c2.PSI)
	if _, ok := m.unifiedMount(); ok {
		// Reclaim and refaults stall the workload: memory PSI.
		sampleUntil(t, rc, "memory PSI while thrashing", 30*time.Second, func(p Pressure) bool { return p.PSI && p.MemSomeUsec > 0 })
	}
	if c2.MemBytes > 24<<20 {
		t.Errorf("use %d above the 24 MiB limit", c2.MemBytes)
	}
}

// TestPressureSignalsCPU: a CPU-bound workload under a 0.1-core quota shows
// throttled periods and, through its PSI group, CPU pressure.
func TestPressureSignalsCPU(t *testing.T) {
	m := newGrowManager(t)
	if m.V2() {
		t.Skip("skipping: the signals are checked on cgroup v1 (this host kind)")
	}
	if _, ok := m.unifiedMount(); !ok {
		t.Skip("skipping: no hybrid unified hierarchy for PSI")
	}
	g := create(t, m, "grow-spin", Resources{CPUMaxMilli: 100})
	r, err := g.PressureReader()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	_, lines := startHelper(t, g, "spin")
	start := waitLine(t, lines, "spinning", 30*time.Second)
	p0, err := r.Read()
	if err != nil {
		t.Fatal(err)
	}
	if !p0.PSI {
		t.Fatalf("no PSI after JoinPSI: %+v", p0)
	}
	if p0.CPUQuotaMilli != 100 {
		t.Errorf("CPUQuotaMilli = %d, want 100", p0.CPUQuotaMilli)
	}
	p1, thr := sampleUntil(t, r, "throttling", 10*time.Second, func(p Pressure) bool { return p.CPUThrottled > p0.CPUThrottled })
	_, psi := sampleUntil(t, r, "CPU pressure", 10*time.Second, func(p Pressure) bool { return p.CPUSomeUsec > p0.CPUSomeUsec })
	// Over a second, the quota binds in most periods and the use stays
	// near 0.1 core.
	time.Sleep(time.Second)
	p2, err := r.Read()
	if err != nil {
		t.Fatal(err)
	}
	periods, throttled := p2.CPUPeriods-p1.CPUPeriods, p2.CPUThrottled-p1.CPUThrottled
	t.Logf("spin: first throttled period %v after start, CPU PSI %v after; then throttled in %d of %d periods, %d ms throttled, %d ms CPU, %d ms CPU some",
		thr.Sub(start.at).Round(time.Millisecond), psi.Sub(start.at).Round(time.Millisecond), throttled, periods,
		(p2.CPUThrottledNs-p1.CPUThrottledNs)/1e6, (p2.CPUUsageNanos-p1.CPUUsageNanos)/1e6, (p2.CPUSomeUsec-p1.CPUSomeUsec)/1000)
	if periods == 0 || throttled*2 < periods {
		t.Errorf("throttled in %d of %d periods, want most", throttled, periods)
	}
	if p2.CPUSomeUsec <= p1.CPUSomeUsec {
		t.Errorf("CPU PSI some did not rise: %d -> %d", p1.CPUSomeUsec, p2.CPUSomeUsec)
	}
}

// TestPressureGone: a reader of a deleted group fails with ErrNotFound.
func TestPressureGone(t *testing.T) {
	m := newGrowManager(t)
	g, err := m.Create("grow-gone", Resources{MemMaxBytes: 64 << 20})
	if err != nil {
		t.Fatal(err)
	}
	r, err := g.PressureReader()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := r.Read(); err != nil {
		t.Fatalf("Read: %v", err)
	}
	if err := g.Delete(); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Read(); !errors.Is(err, ErrNotFound) {
		t.Errorf("Read after Delete: %v, want ErrNotFound", err)
	}
	if _, err := g.Pressure(); !errors.Is(err, ErrNotFound) {
		t.Errorf("Pressure after Delete: %v, want ErrNotFound", err)
	}
	if err := g.JoinPSI(os.Getpid()); !errors.Is(err, ErrNotFound) {
		t.Errorf("JoinPSI after Delete: %v, want ErrNotFound", err)
	}
}

// BenchmarkPressure: the cost of one sample of a live group, through a
// reader's open descriptors (Read) and opening the files each time
// (Pressure).
func BenchmarkPressure(b *testing.B) {
	g := benchGroup(b, "grow-bench", true)
	b.Run("Read", func(b *testing.B) {
		r, err := g.PressureReader()
		if err != nil {
			b.Fatal(err)
		}
		defer r.Close()
		b.ReportAllocs()
		for b.Loop() {
			if _, err := r.Read(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("Pressure", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := g.Pressure(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("ReadWithoutPSI", func(b *testing.B) { // the PSI files are looked for each time
		r, err := benchGroup(b, "grow-bench-nopsi", false).PressureReader()
		if err != nil {
			b.Fatal(err)
		}
		defer r.Close()
		for b.Loop() {
			if _, err := r.Read(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("Sample", func(b *testing.B) { // for scale: the agent's usage sample
		for b.Loop() {
			if _, _, err := g.Sample(); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// benchGroup makes a group with a sleeping process in it (and in its PSI
// group if psi), removed when the benchmark ends.
func benchGroup(b *testing.B, name string, psi bool) *Group {
	b.Helper()
	if os.Geteuid() != 0 {
		b.Skip("skipping: cgroup benchmarks need root")
	}
	m, err := NewManager(fmt.Sprintf("grow-bench-%d/node", os.Getpid()))
	if err != nil {
		b.Fatal(err)
	}
	g, err := m.Create(name, Resources{CPUMaxMilli: 500, MemMaxBytes: 64 << 20})
	if err != nil {
		b.Fatal(err)
	}
	var pid int
	err = g.Spawn(func(fd int) error {
		attr := &syscall.ProcAttr{Files: []uintptr{0, 1, 2}, Sys: &syscall.SysProcAttr{UseCgroupFD: fd >= 0, CgroupFD: fd}}
		pid, err = syscall.ForkExec("/bin/sleep", []string{"sleep", "600"}, attr)
		return err
	})
	if err != nil {
		_ = g.Delete()
		b.Fatal(err)
	}
	b.Cleanup(func() {
		_ = g.Kill()
		var ws syscall.WaitStatus
		_, _ = syscall.Wait4(pid, &ws, 0, nil)
		if err := g.Delete(); err != nil {
			b.Errorf("Delete: %v", err)
		}
	})
	if psi {
		if err := g.JoinPSI(pid); err != nil {
			b.Fatal(err)
		}
	}
	return g
}
