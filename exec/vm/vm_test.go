package vm

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	osexec "os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	cgroups "github.com/containerd/cgroups/v3"
	"github.com/shim-run/shim/cgroup"
	"github.com/shim-run/shim/exec"
)

const helperEnv = "SHIM_VM_TEST_HELPER"

// Built once by TestMain: the guest init and the memory hog workload.
var (
	testInit  string
	testHog   string
	testCache string
	buildErr  error
)

// TestMain builds the static guest init and the hog, and lets the test
// binary double as a short-lived agent (for the adoption test).
func TestMain(m *testing.M) {
	if exec.IsInit() {
		exec.Init()
	}
	if os.Getenv(helperEnv) == "agent" {
		os.Exit(helperAgent(os.Args[1:]))
	}
	dir, err := os.MkdirTemp("", "vm-test-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	testInit, testHog, testCache = filepath.Join(dir, "shim-init"), filepath.Join(dir, "hog"), filepath.Join(dir, "cache")
	for _, b := range [][2]string{{testInit, "../../cmd/shim-init"}, {testHog, "./testdata/hog"}} {
		cmd := osexec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", b[0], b[1])
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build %s: %v: %s", b[1], err, out)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// helperAgent starts a VM like an agent would, prints its pid and start
// time, and exits without stopping it: ROOT STATEDIR ID WORKDIR.
func helperAgent(args []string) int {
	if len(args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: agent ROOT STATEDIR ID WORKDIR")
		return 2
	}
	m, err := cgroup.NewManager(args[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	rt := &Runtime{Cgroups: m, Init: os.Getenv("SHIM_VM_TEST_INIT"), StateDir: args[1], CacheDir: os.Getenv("SHIM_VM_TEST_CACHE"), Accel: AccelTCG}
	v, err := rt.Start(Spec{ID: args[2], Incarnation: 1, Dir: args[3], Stdout: filepath.Join(args[3], "out.log"),
		Stderr:    filepath.Join(args[3], "out.log"),
		Argv:      []string{"/bin/sh", "-c", `trap 'echo got TERM; exit 7' TERM; echo up; while :; do sleep 0.1; done`},
		Resources: cgroup.Resources{MemMaxBytes: 512 << 20, CPUMaxMilli: 2000}, GrantMemBytes: 256 << 20, GrantCPUMilli: 1000})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println(v.PID(), v.StartTime())
	return 0
}

// newRuntime returns a TCG Runtime whose cgroup root and state directory
// are unique to the test, and checks at the end that nothing is left.
func newRuntime(t testing.TB) *Runtime {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: vm tests need root (cgroups)")
	}
	if cgroups.Mode() == cgroups.Unavailable {
		t.Skip("skipping: no cgroup filesystem at /sys/fs/cgroup")
	}
	if err := Available(); err != nil {
		t.Fatalf("Available: %v", err) // CI installs QEMU and a kernel: a missing one is a failure
	}
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	top := fmt.Sprintf("vm-test-%d-%s", os.Getpid(), strings.ReplaceAll(t.Name(), "/", "_"))
	m, err := cgroup.NewManager(top + "/node")
	if err != nil {
		t.Fatalf("NewManager: %v", err)
	}
	rt := &Runtime{Cgroups: m, Init: testInit, StateDir: t.TempDir(), CacheDir: testCache, Accel: AccelTCG}
	t.Cleanup(func() {
		ex, _ := rt.Existing()
		for _, e := range ex {
			t.Errorf("VM %s left behind (pid %d)", e.Group, e.PID)
			_ = rt.Remove(e.ID, e.Incarnation)
		}
		names, _ := m.List()
		for _, n := range names {
			t.Errorf("cgroup %s left behind", n)
			if g, err := m.Open(n); err == nil {
				_ = g.Kill()
				_ = g.Delete()
			}
		}
		for _, c := range []string{"", "cpu", "cpuacct", "memory", "pids", "freezer"} {
			_ = os.Remove(filepath.Join("/sys/fs/cgroup", c, top, "node"))
			_ = os.Remove(filepath.Join("/sys/fs/cgroup", c, top))
		}
	})
	return rt
}

// start starts a VM and registers its end for cleanup.
func start(t *testing.T, rt *Runtime, s Spec) *VM {
	t.Helper()
	v, err := rt.Start(s)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		_ = v.Kill()
		select {
		case <-v.Done():
		case <-time.After(10 * time.Second):
			t.Errorf("VM %d did not end after Kill", v.PID())
		}
	})
	return v
}

func waitExit(t *testing.T, v *VM, timeout time.Duration) exec.Exit {
	t.Helper()
	select {
	case <-v.Done():
		return v.Exit()
	case <-time.After(timeout):
		t.Fatalf("VM did not exit within %v", timeout)
		return exec.Exit{}
	}
}

// waitLog polls path until re matches a line, returning the submatches of
// the last matching line.
func waitLog(t *testing.T, path string, re *regexp.Regexp, timeout time.Duration, ok func([]string) bool) []string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if f, err := os.Open(path); err == nil {
			sc := bufio.NewScanner(f)
			for sc.Scan() {
				if m := re.FindStringSubmatch(sc.Text()); m != nil && (ok == nil || ok(m)) {
					f.Close()
					return m
				}
			}
			f.Close()
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(path)
			t.Fatalf("no line matching %v in %s within %v; log:\n%s", re, path, timeout, tail(string(b), 2000))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

func kernelRelease(t *testing.T) string {
	_, ver, err := kernelInfo("")
	if err != nil {
		t.Fatal(err)
	}
	return ver
}

// TestBootPrintsGuestKernel: the workload sees the guest's kernel and
// memory, its output reaches the log, and its exit code comes back.
func TestBootPrintsGuestKernel(t *testing.T) {
	rt := newRuntime(t)
	dir := t.TempDir()
	log := filepath.Join(dir, "out.log")
	begin := time.Now()
	work := t.TempDir()
	if err := os.Chmod(work, 0o777); err != nil {
		t.Fatal(err)
	}
	v := start(t, rt, Spec{ID: "boot", Dir: work, Stdout: log, Stderr: log, User: "65534:65534", Env: []string{"PATH=/usr/bin:/bin", "X=y"},
		Argv:      []string{"/bin/sh", "-c", "uname -r; cat /proc/meminfo; echo to-stderr >&2; echo id=$(id -u):$(id -g) x=$X pwd=$PWD; touch made; exit 3"},
		Resources: cgroup.Resources{MemMaxBytes: 256 << 20}})
	e := waitExit(t, v, 60*time.Second)
	t.Logf("boot to exit: %v", time.Since(begin))
	if e.Code != 3 || e.Reason != exec.ReasonExited {
		b, _ := os.ReadFile(log)
		t.Fatalf("exit = %+v, want code 3; log:\n%s", e, b)
	}
	b, _ := os.ReadFile(log)
	out := string(b)
	lines := strings.Split(out, "\n")
	if lines[0] != kernelRelease(t) {
		t.Errorf("uname -r = %q, want the guest kernel %q", lines[0], kernelRelease(t))
	}
	var uts syscall.Utsname
	_ = syscall.Uname(&uts)
	if host := utsString(uts.Release); host != kernelRelease(t) && lines[0] == host {
		t.Errorf("uname -r printed the host's kernel %q", host)
	}
	for _, want := range []string{"MemTotal:", "MemAvailable:", "to-stderr", "id=65534:65534 x=y pwd=" + work} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
	if u, g := owner(t, filepath.Join(work, "made")); u != 65534 || g != 65534 {
		t.Errorf("a file the workload made in its work directory belongs to %d:%d on the host, want 65534:65534", u, g)
	}
}

// owner returns the uid and gid of path.
func owner(t *testing.T, path string) (uint32, uint32) {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatalf("stat: %v", err)
	}
	return st.Uid, st.Gid
}

func utsString(a [65]int8) string {
	b := make([]byte, 0, 65)
	for _, c := range a {
		if c == 0 {
			break
		}
		b = append(b, byte(c))
	}
	return string(b)
}

// lastMatch returns the submatches of the last line of path matching re.
func lastMatch(path string, re *regexp.Regexp) []string {
	b, _ := os.ReadFile(path)
	var last []string
	for _, l := range strings.Split(string(b), "\n") {
		if m := re.FindStringSubmatch(l); m != nil {
			last = m
		}
	}
	return last
}

func atoi64(s string) int64 {
	n, _ := strconv.ParseInt(s, 10, 64)
	return n
}

// groupFile reads a control file of the VM's cgroup (v1: in hierarchy ctl).
func groupFile(t *testing.T, rt *Runtime, name, ctl, file string) string {
	t.Helper()
	p := filepath.Join("/sys/fs/cgroup", ctl, rt.Cgroups.Root(), name, file)
	if rt.Cgroups.V2() {
		p = filepath.Join("/sys/fs/cgroup", rt.Cgroups.Root(), name, file)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("read %s: %v", p, err)
	}
	return strings.TrimSpace(string(b))
}

func memLimit(t *testing.T, rt *Runtime, name string) int64 {
	if rt.Cgroups.V2() {
		return atoi64(groupFile(t, rt, name, "", "memory.max"))
	}
	return atoi64(groupFile(t, rt, name, "memory", "memory.limit_in_bytes"))
}

var (
	memTotalRe = regexp.MustCompile(`^MemTotal:\s+(\d+) kB$`)
	nprocRe    = regexp.MustCompile(`^nproc=(\d+)$`)
)

// TestResize grows and shrinks a running VM's memory and vCPUs: the guest
// sees the change within 2 s, QEMU keeps its PID, and the cgroup follows.
func TestResize(t *testing.T) {
	rt := newRuntime(t)
	dir := t.TempDir()
	log := filepath.Join(dir, "out.log")
	v := start(t, rt, Spec{ID: "resize", Dir: dir, Stdout: log, Stderr: log,
		Argv:      []string{"/bin/sh", "-c", "while :; do grep MemTotal /proc/meminfo; echo nproc=$(nproc); sleep 0.05; done"},
		Resources: cgroup.Resources{MemMaxBytes: 1 << 30, CPUMaxMilli: 2000}, GrantMemBytes: 256 << 20, GrantCPUMilli: 1000})
	pid, st := v.PID(), v.StartTime()
	waitLog(t, log, nprocRe, 60*time.Second, nil)
	before := atoi64(lastMatch(log, memTotalRe)[1]) << 10
	memMargin, _ := rt.margins()
	if got, want := memLimit(t, rt, "resize.0"), int64(256<<20)+memMargin; got != want {
		t.Errorf("memory limit at start = %d, want %d", got, want)
	}

	t0 := time.Now()
	if err := v.Resize(512<<20, 1000); err != nil {
		t.Fatalf("Resize memory up: %v", err)
	}
	waitLog(t, log, memTotalRe, 20*time.Second, func(m []string) bool { return atoi64(m[1])<<10 >= before+256<<20 })
	t.Logf("memory +256 MiB visible in the guest after %v", time.Since(t0))
	if got, want := memLimit(t, rt, "resize.0"), int64(512<<20)+memMargin; got != want {
		t.Errorf("memory limit after growing = %d, want %d", got, want)
	}

	t1 := time.Now()
	if err := v.Resize(512<<20, 2000); err != nil {
		t.Fatalf("Resize CPU up: %v", err)
	}
	waitLog(t, log, nprocRe, 20*time.Second, func(m []string) bool { return m[1] == "2" })
	t.Logf("second vCPU online after %v", time.Since(t1))

	if v.PID() != pid {
		t.Errorf("PID changed: %d -> %d", pid, v.PID())
	}
	if _, s, err := exec.ProcStat(pid); err != nil || s != st {
		t.Errorf("QEMU %d is not the same process (start %d, want %d, err %v)", pid, s, st, err)
	}

	// Back down: virtio-mem gives the memory back, the vCPU is ejected.
	os.Truncate(log, 0)
	if err := v.Resize(256<<20, 1000); err != nil {
		t.Fatalf("Resize down: %v", err)
	}
	waitLog(t, log, memTotalRe, 20*time.Second, func(m []string) bool { return atoi64(m[1])<<10 <= before })
	waitLog(t, log, nprocRe, 20*time.Second, func(m []string) bool { return m[1] == "1" })
	// The limit comes down once QEMU has taken the memory back.
	want := int64(256<<20) + memMargin
	deadline := time.Now().Add(20 * time.Second)
	for memLimit(t, rt, "resize.0") != want && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if got := memLimit(t, rt, "resize.0"); got != want {
		t.Errorf("memory limit after shrinking = %d, want %d", got, want)
	}
	s, err := v.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if s.GrantMem != 256<<20 || s.GrantCPU != 1000 || s.VCPUs != 1 || s.Guest.MemTotal == 0 || s.MemoryBytes == 0 {
		t.Errorf("Stats = %+v", s)
	}
	if err := v.Resize(2<<30, 1000); !errors.Is(err, ErrInvalid) {
		t.Errorf("Resize past the maximum: %v, want ErrInvalid", err)
	}
	if err := v.Resize(256<<20, 3000); !errors.Is(err, ErrInvalid) {
		t.Errorf("Resize past the vCPU maximum: %v, want ErrInvalid", err)
	}
}

// TestOnWantGrows: a guest that allocates past its grant asks for more,
// gets it through OnWant -> Resize up to the maximum, and is not OOM-killed.
func TestOnWantGrows(t *testing.T) {
	rt := newRuntime(t)
	dir := t.TempDir()
	hog := filepath.Join(dir, "hog")
	copyFile(t, testHog, hog)
	log := filepath.Join(dir, "out.log")
	const maxMem = 1 << 30
	v := start(t, rt, Spec{ID: "want", Dir: dir, Stdout: log, Stderr: log,
		Argv:      []string{hog, "600", "8", "30"},
		Resources: cgroup.Resources{MemMaxBytes: maxMem, CPUMaxMilli: 1000}, GrantMemBytes: 256 << 20})
	var asks, refused int
	v.OnWant(func(mem, cpu int64) {
		asks++
		if mem == 0 {
			return
		}
		st, _ := v.Stats()
		t.Logf("want %d MiB; guest total %d avail %d", mem>>20, st.Guest.MemTotal>>20, st.Guest.MemAvailable>>20)
		if err := v.Resize(min(mem, maxMem), 1000); err != nil {
			refused++
			t.Logf("Resize(%d): %v", min(mem, maxMem), err)
		}
	})
	e := waitExit(t, v, 90*time.Second)
	b, _ := os.ReadFile(log)
	if e.Code != 0 || e.OOMKilled || !strings.Contains(string(b), "survived 600 MiB") {
		t.Fatalf("exit %+v, want 0 without an OOM kill; log:\n%s", e, tail(string(b), 1500))
	}
	if asks == 0 {
		t.Fatalf("the guest never asked for memory")
	}
	t.Logf("%d requests, %d refused", asks, refused)
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o755); err != nil {
		t.Fatal(err)
	}
}

// TestBounded: a VM cannot take the host past its cgroup. A CPU-bound guest
// stays within its quota; a guest filling its fixed memory meets the
// guest's OOM killer; a QEMU without margin in its cgroup meets the host's;
// Kill and killing the cgroup end QEMU.
func TestBounded(t *testing.T) {
	rt := newRuntime(t)
	_, cpuMargin := rt.margins()

	t.Run("cpu", func(t *testing.T) {
		dir := t.TempDir()
		log := filepath.Join(dir, "out.log")
		v := start(t, rt, Spec{ID: "cpu", Dir: dir, Stdout: log, Stderr: log,
			Argv:      []string{"/bin/sh", "-c", "echo spinning; while :; do :; done"},
			Resources: cgroup.Resources{MemMaxBytes: 256 << 20, CPUMaxMilli: 500}})
		wants := make(chan int64, 16)
		v.OnWant(func(mem, cpu int64) {
			if cpu > 0 {
				select {
				case wants <- cpu:
				default:
				}
			}
		})
		waitLog(t, log, regexp.MustCompile(`^spinning$`), 60*time.Second, nil)
		c0, _, err := v.Sample()
		if err != nil {
			t.Fatal(err)
		}
		t0 := time.Now()
		time.Sleep(2 * time.Second)
		c1, _, _ := v.Sample()
		used := float64(c1-c0) / float64(time.Since(t0).Nanoseconds())
		limit := float64(500+cpuMargin) / 1000
		t.Logf("QEMU used %.2f cores, quota %.2f", used, limit)
		if used > limit*1.15 {
			t.Errorf("QEMU used %.2f cores, above its quota %.2f", used, limit)
		}
		// Its one vCPU is always busy: the guest asks for a second.
		select {
		case cpu := <-wants:
			if cpu != 2000 {
				t.Errorf("the guest asked for %dm, want 2000m", cpu)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("a busy guest did not ask for CPU")
		}
		if err := v.Kill(); err != nil {
			t.Fatal(err)
		}
		e := waitExit(t, v, 10*time.Second)
		if e.Reason != exec.ReasonKilled {
			t.Errorf("exit after Kill = %+v", e)
		}
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", v.PID())); err == nil {
			t.Errorf("QEMU %d still exists after Kill", v.PID())
		}
	})

	t.Run("guest-oom", func(t *testing.T) {
		dir := t.TempDir()
		hog := filepath.Join(dir, "hog")
		copyFile(t, testHog, hog)
		log := filepath.Join(dir, "out.log")
		v := start(t, rt, Spec{ID: "goom", Dir: dir, Stdout: log, Stderr: log, Argv: []string{hog, "1024", "16", "0"},
			Resources: cgroup.Resources{MemMaxBytes: 256 << 20}})
		wanted := false
		v.OnWant(func(mem, cpu int64) { wanted = true }) // asks, but gets nothing
		e := waitExit(t, v, 90*time.Second)
		if !e.OOMKilled || e.Signal != "SIGKILL" || !strings.Contains(e.Reason, "guest") {
			b, _ := os.ReadFile(log)
			t.Fatalf("exit = %+v, want the guest's OOM kill; log:\n%s", e, tail(string(b), 1000))
		}
		if !wanted {
			t.Errorf("the guest did not ask for memory")
		}
	})

	t.Run("host-oom", func(t *testing.T) {
		tight := &Runtime{Cgroups: rt.Cgroups, Init: rt.Init, StateDir: rt.StateDir, CacheDir: rt.CacheDir, Accel: rt.Accel,
			MemMargin: 4 << 20} // less than QEMU itself needs
		dir := t.TempDir()
		hog := filepath.Join(dir, "hog")
		copyFile(t, testHog, hog)
		log := filepath.Join(dir, "out.log")
		v := start(t, tight, Spec{ID: "hoom", Dir: dir, Stdout: log, Stderr: log, Argv: []string{hog, "1024", "16", "0"},
			Resources: cgroup.Resources{MemMaxBytes: 256 << 20}})
		e := waitExit(t, v, 90*time.Second)
		if !e.OOMKilled || !strings.Contains(e.Reason, "QEMU") {
			t.Fatalf("exit = %+v, want QEMU OOM-killed by its cgroup", e)
		}
	})

	t.Run("cgroup-kill", func(t *testing.T) {
		dir := t.TempDir()
		log := filepath.Join(dir, "out.log")
		v := start(t, rt, Spec{ID: "cgkill", Dir: dir, Stdout: log, Stderr: log,
			Argv: []string{"/bin/sh", "-c", "echo up; sleep 600"}, Resources: cgroup.Resources{MemMaxBytes: 256 << 20}})
		waitLog(t, log, regexp.MustCompile(`^up$`), 60*time.Second, nil)
		g, err := rt.Cgroups.Open("cgkill.0")
		if err != nil {
			t.Fatal(err)
		}
		if err := g.Kill(); err != nil { // what the agent's fence does
			t.Fatal(err)
		}
		e := waitExit(t, v, 10*time.Second)
		if e.Signal != "SIGKILL" {
			t.Errorf("exit = %+v, want QEMU SIGKILLed", e)
		}
	})
}

// TestAdopt: an agent starts a VM and exits; a new Runtime on the same
// state finds it, adopts it, and still controls it (resize, stat, signal),
// and learns the workload's exit code.
func TestAdopt(t *testing.T) {
	rt := newRuntime(t)
	dir := t.TempDir()
	log := filepath.Join(dir, "out.log")
	cmd := osexec.Command(os.Args[0], rt.Cgroups.Root(), rt.StateDir, "adopt", dir)
	cmd.Env = append(os.Environ(), helperEnv+"=agent", "SHIM_VM_TEST_INIT="+testInit, "SHIM_VM_TEST_CACHE="+testCache)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("agent: %v: %s", err, out)
	}
	var pid int
	var st uint64
	if _, err := fmt.Sscan(string(out), &pid, &st); err != nil {
		t.Fatalf("agent printed %q", out)
	}
	ex, err := rt.Existing()
	if err != nil || len(ex) != 1 || ex[0].PID != pid || ex[0].StartTime != st || ex[0].ID != "adopt" || ex[0].Incarnation != 1 {
		t.Fatalf("Existing = %+v, %v; want adopt.1 with pid %d", ex, err, pid)
	}
	if !rt.Owns("adopt", 1) || rt.Owns("adopt", 2) {
		t.Errorf("Owns is wrong")
	}
	if _, err := rt.Adopt("adopt", 1, pid, st+1); !errors.Is(err, ErrGone) {
		t.Errorf("Adopt with a wrong start time: %v, want ErrGone", err)
	}
	v, err := rt.Adopt("adopt", 1, pid, st)
	if err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	t.Cleanup(func() { _ = v.Kill(); <-v.Done() })
	waitLog(t, log, regexp.MustCompile(`^up$`), 60*time.Second, nil)
	g0, err := v.GuestStat(10 * time.Second)
	if err != nil {
		t.Fatalf("GuestStat: %v", err)
	}
	if err := v.Resize(512<<20, 1000); err != nil {
		t.Fatalf("Resize after adopt: %v", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		g, err := v.GuestStat(5 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if g.MemTotal >= g0.MemTotal+250<<20 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("guest MemTotal %d did not grow from %d", g.MemTotal, g0.MemTotal)
		}
	}
	if err := v.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("Signal: %v", err)
	}
	e := waitExit(t, v, 20*time.Second)
	if e.Code != 7 {
		b, _ := os.ReadFile(log)
		t.Errorf("exit = %+v, want code 7; log:\n%s", e, b)
	}
}

// TestStartErrors: bad specs fail with one clear error and leave nothing.
func TestStartErrors(t *testing.T) {
	rt := newRuntime(t)
	for _, c := range []struct {
		name string
		s    Spec
		want error
	}{
		{"missing", Spec{ID: "e1", Argv: []string{"/no/such/binary"}}, ErrNotFound},
		{"small", Spec{ID: "e2", Argv: []string{"/bin/true"}, Resources: cgroup.Resources{MemMaxBytes: 64 << 20}}, ErrInvalid},
		{"user", Spec{ID: "e3", Argv: []string{"/bin/true"}, User: "nobody"}, ErrInvalid},
		{"id", Spec{ID: "a/b", Argv: []string{"/bin/true"}}, ErrInvalid},
		{"grant", Spec{ID: "e4", Argv: []string{"/bin/true"}, Resources: cgroup.Resources{MemMaxBytes: 256 << 20}, GrantMemBytes: 512 << 20}, ErrInvalid},
		{"argv", Spec{ID: "e5"}, ErrInvalid},
		{"root dir", Spec{ID: "e6", Argv: []string{"/bin/true"}, Dir: "/"}, ErrInvalid},
		{"relative dir", Spec{ID: "e7", Argv: []string{"/bin/true"}, Dir: "tmp"}, ErrInvalid},
		{"comma", Spec{ID: "e8", Argv: []string{"/bin/true"}, Stdout: "/tmp/a,b"}, ErrInvalid},
	} {
		_, err := rt.Start(c.s)
		if !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", c.name, err, c.want)
		} else if strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: error spans lines: %q", c.name, err)
		}
	}
}

// TestStartQEMUFails: when QEMU refuses to start, Start says why in one
// line and leaves no cgroup or state behind.
func TestStartQEMUFails(t *testing.T) {
	rt := newRuntime(t)
	fake := filepath.Join(t.TempDir(), "qemu-system-x86_64")
	if err := os.WriteFile(fake, []byte("#!/bin/sh\necho 'qemu-system-x86_64: -device virtio-mem-pci: no such thing' >&2\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	bad := &Runtime{Cgroups: rt.Cgroups, Init: rt.Init, StateDir: rt.StateDir, CacheDir: rt.CacheDir, Accel: rt.Accel, QEMU: fake}
	_, err := bad.Start(Spec{ID: "fails", Argv: []string{"/bin/true"}})
	if err == nil || !strings.Contains(err.Error(), "no such thing") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("Start with a failing QEMU: %v", err)
	}
	if ents, _ := os.ReadDir(rt.StateDir); len(ents) > 1 { // only the cache may remain
		t.Errorf("state left behind: %v", ents)
	}
}

// TestStop: a workload that ignores SIGTERM is ended by QMP quit after the
// grace period; Stop returns once the VM is gone.
func TestStop(t *testing.T) {
	rt := newRuntime(t)
	dir := t.TempDir()
	log := filepath.Join(dir, "out.log")
	v := start(t, rt, Spec{ID: "stop", Dir: dir, Stdout: log, Stderr: log,
		Argv: []string{"/bin/sh", "-c", "trap '' TERM; echo up; while :; do sleep 0.1; done"}})
	waitLog(t, log, regexp.MustCompile(`^up$`), 60*time.Second, nil)
	t0 := time.Now()
	if err := v.Stop(500 * time.Millisecond); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	select {
	case <-v.Done():
	default:
		t.Fatal("Stop returned before the VM was gone")
	}
	if d := time.Since(t0); d < 500*time.Millisecond {
		t.Errorf("Stop took %v: it did not wait for the grace period", d)
	}
	if e := v.Exit(); e.Code != -1 || e.Reason == exec.ReasonExited {
		t.Errorf("exit = %+v, want no exit status (QEMU quit)", e)
	}
	if err := v.Signal(syscall.SIGTERM); !errors.Is(err, ErrExited) {
		t.Errorf("Signal after the end: %v, want ErrExited", err)
	}
	if err := v.Resize(256<<20, 1000); !errors.Is(err, ErrExited) {
		t.Errorf("Resize after the end: %v, want ErrExited", err)
	}
}

// TestKVMBoot boots with KVM where it can boot a stock kernel (skipped
// elsewhere: the TCG path is what every other test runs).
func TestKVMBoot(t *testing.T) {
	if !kvmUsable() {
		t.Skip("skipping: no KVM that boots a stock kernel here (see kvmUsable)")
	}
	rt := newRuntime(t)
	rt.Accel = AccelKVM
	dir := t.TempDir()
	log := filepath.Join(dir, "out.log")
	t0 := time.Now()
	v := start(t, rt, Spec{ID: "kvm", Dir: dir, Stdout: log, Stderr: log, Argv: []string{"/bin/sh", "-c", "uname -r; exit 5"},
		Resources: cgroup.Resources{MemMaxBytes: 512 << 20, CPUMaxMilli: 2000}})
	e := waitExit(t, v, 30*time.Second)
	t.Logf("KVM boot to exit: %v", time.Since(t0))
	b, _ := os.ReadFile(log)
	if e.Code != 5 || strings.TrimSpace(string(b)) != kernelRelease(t) {
		t.Errorf("exit %+v, log %q", e, b)
	}
}
