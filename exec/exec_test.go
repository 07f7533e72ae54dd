package exec

import (
	"errors"
	"fmt"
	"os"
	osexec "os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	cgroups "github.com/containerd/cgroups/v3"
	"github.com/shim-run/shim/cgroup"
)

const (
	helperEnv = "SHIM_EXEC_TEST_HELPER"
	initEnv   = "SHIM_EXEC_TEST_INIT"  // shim-init, built by TestMain
	stateEnv  = "SHIM_EXEC_TEST_STATE" // the Runtimes' StateDir
)

// TestMain lets the test binary double as a workload (memory hog) and as a
// short-lived agent (for the adoption test). It builds shim-init
// (cmd/shim-init, static) for the Runtimes the tests use.
func TestMain(m *testing.M) {
	if IsInit() {
		Init() // a container's init: this binary re-executed by libcontainer
	}
	switch os.Getenv(helperEnv) {
	case "memhog":
		var keep [][]byte
		for range 2048 { // up to 2 GiB, touched page by page
			b := make([]byte, 1<<20)
			for i := 0; i < len(b); i += 4096 {
				b[i] = 1
			}
			keep = append(keep, b)
		}
		fmt.Println("survived", len(keep))
		os.Exit(0)
	case "agent":
		os.Exit(helperAgent(os.Args[1:]))
	case "escape":
		os.Exit(escapeHelper())
	}
	dir, err := os.MkdirTemp("", "sandbox-exec-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// Traversable by every user: the work folders of workloads that run as
	// nobody are below it (host isolation reaches them by path).
	_ = os.Chmod(dir, 0o755)
	code := func() int {
		defer os.RemoveAll(dir)
		init := filepath.Join(dir, "shim-init")
		build := osexec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", init, "github.com/shim-run/shim/cmd/shim-init")
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := build.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "building shim-init: %v\n%s", err, out)
			return 1
		}
		os.Setenv(initEnv, init)
		os.Setenv(stateEnv, filepath.Join(dir, "state"))
		return m.Run()
	}()
	os.Exit(code)
}

// helperAgent starts a workload like a real agent would, prints its pid and
// start time, and exits without waiting for it.
func helperAgent(args []string) int {
	if len(args) != 2 && len(args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: agent ROOT ID [ISOLATION]")
		return 2
	}
	iso := IsolationProcess
	if len(args) == 3 {
		n, _ := strconv.Atoi(args[2])
		iso = Isolation(n)
	}
	m, err := cgroup.NewManager(args[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	rt := &Runtime{Cgroups: m, Init: os.Getenv(initEnv), StateDir: os.Getenv(stateEnv)}
	p, err := rt.Start(Spec{ID: args[1], Incarnation: 3, Argv: []string{"/bin/sleep", "300"}, Isolation: iso,
		Resources: cgroup.Resources{PidsMax: 16, MemMaxBytes: 64 << 20}})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println(p.PID(), p.StartTime())
	return 0
}

// newRuntime returns a Runtime whose manager root is unique to the test and
// checks at the end that nothing of it is left behind.
func newRuntime(t testing.TB) *Runtime {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: exec tests need root (cgroups and namespaces)")
	}
	if cgroups.Mode() == cgroups.Unavailable {
		t.Skip("skipping: no cgroup filesystem at /sys/fs/cgroup")
	}
	top := fmt.Sprintf("shimtest-%d-%s", os.Getpid(), strings.ReplaceAll(t.Name(), "/", "_"))
	m, err := cgroup.NewManager(top + "/node")
	if err != nil {
		t.Fatalf("NewManager: %v", err)
	}
	rt := &Runtime{Cgroups: m, Init: os.Getenv(initEnv), StateDir: os.Getenv(stateEnv)}
	t.Cleanup(func() {
		ex, _ := rt.Existing()
		for _, e := range ex {
			if g, err := m.Open(e.Group); err == nil {
				_ = g.Kill()
				_ = g.Delete()
			}
		}
		for _, d := range mountDirs(m) {
			if _, err := os.Stat(filepath.Join(d, top)); err == nil {
				t.Errorf("%s left behind", filepath.Join(d, top))
			}
		}
	})
	return rt
}

// mountDirs lists the hierarchies the manager uses.
func mountDirs(m *cgroup.Manager) []string {
	if m.V2() {
		return []string{"/sys/fs/cgroup"}
	}
	var out []string
	for _, c := range []string{"cpu", "cpuacct", "memory", "pids", "freezer"} {
		if _, err := os.Stat(filepath.Join("/sys/fs/cgroup", c, "cgroup.procs")); err == nil {
			out = append(out, filepath.Join("/sys/fs/cgroup", c))
		}
	}
	return out
}

func groupDir(rt *Runtime, ctl, name string) string {
	if rt.Cgroups.V2() {
		return filepath.Join("/sys/fs/cgroup", rt.Cgroups.Root(), name)
	}
	return filepath.Join("/sys/fs/cgroup", ctl, rt.Cgroups.Root(), name)
}

func readTrim(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return strings.TrimSpace(string(b))
}

// wait waits for p to finish, failing the test after a deadline.
func wait(t *testing.T, p *Process) Exit {
	t.Helper()
	select {
	case <-p.Done():
		return p.Exit()
	case <-time.After(30 * time.Second):
		t.Fatalf("process %d did not finish", p.PID())
		return Exit{}
	}
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for pause := time.Millisecond; !cond(); pause = min(2*pause, 50*time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(pause)
	}
}

func expectNoGroups(t *testing.T, rt *Runtime) {
	t.Helper()
	top := strings.Split(rt.Cgroups.Root(), "/")[0]
	for _, d := range mountDirs(rt.Cgroups) {
		if _, err := os.Stat(filepath.Join(d, top)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still exists (err=%v)", filepath.Join(d, top), err)
		}
	}
}

// TestFirstInstructionInCgroup checks that the init (and so the workload)
// is in its group from its first instruction: with host isolation the
// workload sees its group's path; in a process sandbox, its cgroup
// namespace, made at the init's birth, has the group as its root, so every
// hierarchy shows "/" (born elsewhere and moved, it would show a path
// leading out of the root).
func TestFirstInstructionInCgroup(t *testing.T) {
	for _, iso := range []Isolation{IsolationHost, IsolationProcess} {
		t.Run(iso.String(), func(t *testing.T) {
			rt := newRuntime(t)
			out := filepath.Join(t.TempDir(), "out", "cgroup.txt")
			p, err := rt.Start(Spec{ID: "cat", Incarnation: 1, Argv: []string{"cat", "/proc/self/cgroup"}, Isolation: iso,
				Env: []string{"PATH=/usr/bin:/bin"}, Stdout: out, Resources: cgroup.Resources{PidsMax: 4}})
			if err != nil {
				t.Fatalf("Start: %v", err)
			}
			if e := wait(t, p); e.Code != 0 || e.Reason != ReasonExited {
				t.Fatalf("exit = %+v", e)
			}
			want := "/" + rt.Cgroups.Root() + "/cat.1"
			if iso == IsolationProcess {
				want = "/"
			}
			got := readTrim(t, out)
			checked := 0
			for _, line := range strings.Split(got, "\n") {
				parts := strings.SplitN(line, ":", 3)
				if len(parts) != 3 {
					t.Fatalf("bad line %q", line)
				}
				ours := rt.Cgroups.V2() && parts[1] == ""
				for _, c := range strings.Split(parts[1], ",") {
					ours = ours || slices.Contains([]string{"cpu", "cpuacct", "memory", "pids", "freezer"}, c)
				}
				if ours {
					checked++
					if parts[2] != want {
						t.Errorf("workload's first view of its cgroup: %q, want %s", line, want)
					}
				}
			}
			if checked == 0 {
				t.Fatalf("no controller lines in:\n%s", got)
			}
			expectNoGroups(t, rt)
		})
	}
}

func TestLimitsResizeKill(t *testing.T) {
	rt := newRuntime(t)
	r := cgroup.Resources{CPUMinMilli: 500, CPUMaxMilli: 1500, CPUBurstMilli: 200, MemMinBytes: 16 << 20, MemMaxBytes: 128 << 20, PidsMax: 32}
	p, err := rt.Start(Spec{ID: "sleeper", Incarnation: 7, Argv: []string{"/bin/sleep", "300"}, Resources: r})
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	check := func(r cgroup.Resources) {
		t.Helper()
		r = runResources(r) // room for the init's threads
		if rt.Cgroups.V2() {
			v := cgroup.MapV2(r)
			d := groupDir(rt, "", "sleeper.7")
			for file, want := range map[string]string{"cpu.max": v.CPUMax, "memory.max": v.MemoryMax, "pids.max": v.PidsMax,
				"cpu.weight": strconv.FormatUint(v.CPUWeight, 10), "memory.min": strconv.FormatUint(v.MemoryMin, 10)} {
				if got := readTrim(t, filepath.Join(d, file)); got != want {
					t.Errorf("%s = %q, want %q", file, got, want)
				}
			}
			return
		}
		v := cgroup.MapV1(r)
		for _, c := range []struct{ ctl, file, want string }{
			{"cpu", "cpu.shares", strconv.FormatUint(v.CPUShares, 10)},
			{"cpu", "cpu.cfs_quota_us", strconv.FormatInt(v.CPUCfsQuotaUs, 10)},
			{"cpu", "cpu.cfs_period_us", "100000"},
			{"cpu", "cpu.cfs_burst_us", strconv.FormatUint(v.CPUCfsBurstUs, 10)},
			{"memory", "memory.limit_in_bytes", strconv.FormatInt(v.MemoryLimit, 10)},
			{"memory", "memory.soft_limit_in_bytes", strconv.FormatInt(v.MemorySoftLimit, 10)},
			{"pids", "pids.max", strconv.FormatInt(v.PidsMax, 10)},
		} {
			if got := readTrim(t, filepath.Join(groupDir(rt, c.ctl, "sleeper.7"), c.file)); got != c.want {
				t.Errorf("%s = %q, want %q", c.file, got, c.want)
			}
		}
	}
	check(r)
	pid, start := p.PID(), p.StartTime()
	if start == 0 {
		t.Errorf("StartTime = 0")
	}

	r2 := cgroup.Resources{CPUMinMilli: 2000, CPUMaxMilli: 250, CPUBurstMilli: 100, MemMinBytes: 8 << 20, MemMaxBytes: 96 << 20, PidsMax: 5}
	if err := p.Resize(r2); err != nil {
		t.Fatalf("Resize: %v", err)
	}
	check(r2)
	if _, s, err := ProcStat(pid); err != nil || s != start {
		t.Fatalf("after resize pid %d start %d (%v), want the same process", pid, s, err)
	}
	u, err := p.Stats()
	if err != nil || u.PidsCurrent < 2 || u.MemoryBytes == 0 { // the init's threads and sleep
		t.Errorf("Stats = %+v, %v", u, err)
	}

	if err := p.Kill(); err != nil {
		t.Fatalf("Kill: %v", err)
	}
	e := wait(t, p)
	if e.Code != -1 || e.Signal != "SIGKILL" || e.Reason != ReasonKilled || e.OOMKilled {
		t.Errorf("exit = %+v, want SIGKILL/killed", e)
	}
	expectNoGroups(t, rt)
	if err := p.Resize(r); !errors.Is(err, ErrExited) {
		t.Errorf("Resize after exit: %v, want ErrExited", err)
	}
	if err := p.Signal(syscall.SIGTERM); !errors.Is(err, ErrExited) {
		t.Errorf("Signal after exit: %v, want ErrExited", err)
	}
	if err := p.Kill(); err != nil {
		t.Errorf("Kill after exit: %v", err)
	}
}

func TestNotFound(t *testing.T) {
	for _, iso := range []Isolation{IsolationProcess, IsolationHost, IsolationContainer} {
		t.Run(iso.String(), func(t *testing.T) { testNotFound(t, iso) })
	}
}

// testNotFound checks the errors of workloads that cannot start, looked up
// inside the sandbox, and that nothing is left behind.
func testNotFound(t *testing.T, iso Isolation) {
	rt := newRuntime(t)
	for _, tc := range []struct {
		argv0, msg string
		env        []string
	}{
		{"/no/such", `exec: "/no/such": not found`, nil},
		{"no-such-binary", `exec: "no-such-binary": not found`, []string{"PATH=/usr/bin:/bin"}},
		{"cat", `exec: "cat": not found`, []string{"PATH=/no/such/dir-sandbox-test"}},
	} {
		_, err := rt.Start(Spec{ID: "nf", Incarnation: 1, Argv: []string{tc.argv0}, Env: tc.env, Isolation: iso})
		if !errors.Is(err, ErrNotFound) || err.Error() != tc.msg {
			t.Errorf("Start(%q): got %v, want %s", tc.argv0, err, tc.msg)
		}
	}
	// The files are in the work folder: at /work in a sandbox, in place
	// (the host's path) with host isolation.
	work := workDir(t)
	in := func(name string) string {
		if iso == IsolationHost {
			return filepath.Join(work, name)
		}
		return "/work/" + name
	}
	if err := os.WriteFile(filepath.Join(work, "data"), []byte("#!/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := rt.Start(Spec{ID: "perm", Argv: []string{in("data")}, WorkDir: work, Isolation: iso}); !errors.Is(err, os.ErrPermission) || !strings.Contains(err.Error(), "exec ") {
		t.Errorf("non-executable: got %v, want permission denied", err)
	}
	if names, err := rt.Cgroups.List(); err != nil || len(names) != 0 {
		t.Errorf("groups after failed starts: %v, %v", names, err)
	}
	if _, err := rt.Start(Spec{ID: "baddir", Argv: []string{"/bin/true"}, Dir: "/no/such/dir", Isolation: iso}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Start with a missing Dir: %v", err)
	}
	// A failure of the workload's exec itself.
	if err := os.WriteFile(filepath.Join(work, "bad"), []byte("\x7fELF garbage"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := rt.Start(Spec{ID: "badexec", Argv: []string{in("bad")}, WorkDir: work, Isolation: iso}); !errors.Is(err, syscall.ENOEXEC) {
		t.Errorf("Start of a corrupt binary: %v, want ENOEXEC", err)
	}
	expectNoGroups(t, rt)
}

// workDir returns a work folder below a fresh temporary directory that
// every user may traverse (with host isolation the workload, nobody,
// reaches it by its path).
func workDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	work := filepath.Join(dir, "work")
	if err := os.Mkdir(work, 0o755); err != nil {
		t.Fatal(err)
	}
	return work
}

func TestIsolationAndExitCode(t *testing.T) {
	rt := newRuntime(t)
	out := filepath.Join(t.TempDir(), "a", "b", "out.log")
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(out, []byte("previous\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	script := `echo pid=$$ init=$(cat /proc/1/comm); for ns in pid mnt uts ipc; do echo $ns=$(readlink /proc/self/ns/$ns); done; echo oops >&2; exit 7`
	p, err := rt.Start(Spec{ID: "iso", Argv: []string{"/bin/sh", "-c", script}, Env: []string{"PATH=/usr/bin:/bin"},
		Stdout: out, Stderr: out, Dir: "/tmp"})
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	if e := wait(t, p); e.Code != 7 || e.Signal != "" || e.Reason != ReasonExited {
		t.Errorf("exit = %+v, want code 7", e)
	}
	got := readTrim(t, out)
	if !strings.HasPrefix(got, "previous\n") || !strings.Contains(got, "oops") {
		t.Errorf("output not appended:\n%s", got)
	}
	if !strings.Contains(got, " init=shim-init\n") || strings.Contains(got, "pid=1 ") {
		t.Errorf("workload is not below shim-init, PID 1 of its namespace:\n%s", got)
	}
	for _, ns := range []string{"pid", "mnt", "uts", "ipc"} {
		mine, _ := os.Readlink("/proc/self/ns/" + ns)
		if strings.Contains(got, ns+"="+mine) || !strings.Contains(got, ns+"=") {
			t.Errorf("%s namespace not new (agent %s):\n%s", ns, mine, got)
		}
	}
}

func TestSessionAndSignal(t *testing.T) {
	rt := newRuntime(t)
	out := filepath.Join(t.TempDir(), "out")
	// PID 1 of a namespace only gets signals it handles: this one does.
	p, err := rt.Start(Spec{ID: "trap", Argv: []string{"/bin/sh", "-c", `trap "exit 3" TERM; echo ready; while :; do sleep 0.05; done`},
		Env: []string{"PATH=/usr/bin:/bin"}, Stdout: out})
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	f := strings.Fields(readTrim(t, fmt.Sprintf("/proc/%d/stat", p.PID())))
	if f[4] != strconv.Itoa(p.PID()) || f[5] != strconv.Itoa(p.PID()) {
		t.Errorf("pgrp %s, session %s; want both %d (setsid)", f[4], f[5], p.PID())
	}
	eventually(t, "the trap to be set", func() bool { b, _ := os.ReadFile(out); return strings.Contains(string(b), "ready") })
	if err := p.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("Signal: %v", err)
	}
	if e := wait(t, p); e.Code != 3 {
		t.Errorf("exit = %+v, want code 3 from the TERM trap", e)
	}
	expectNoGroups(t, rt)
}

func TestAdoptAfterAgentRestart(t *testing.T) {
	rt := newRuntime(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	// A separate agent process starts the workload and exits.
	cmd := osexec.Command(self, rt.Cgroups.Root(), "adoptee")
	cmd.Env = append(os.Environ(), helperEnv+"=agent")
	outb, err := cmd.Output()
	if err != nil {
		t.Fatalf("helper agent: %v: %s", err, outb)
	}
	var pid int
	var start uint64
	if _, err := fmt.Sscan(string(outb), &pid, &start); err != nil {
		t.Fatalf("helper output %q: %v", outb, err)
	}
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGKILL) })

	// The restarted agent finds it...
	ex, err := rt.Existing()
	if err != nil {
		t.Fatalf("Existing: %v", err)
	}
	if len(ex) != 1 || ex[0].ID != "adoptee" || ex[0].Incarnation != 3 || ex[0].PID != pid || ex[0].StartTime != start || len(ex[0].PIDs) != 2 || !slices.Contains(ex[0].PIDs, pid) {
		t.Fatalf("Existing = %+v, want adoptee.3 pid %d start %d", ex, pid, start)
	}
	// ...refuses a mismatched identity...
	if _, err := rt.Adopt("adoptee", 3, pid, start+1); !errors.Is(err, ErrGone) {
		t.Errorf("Adopt with the wrong start time: %v, want ErrGone", err)
	}
	if _, err := rt.Adopt("adoptee", 3, os.Getpid(), mustStart(t, os.Getpid())); !errors.Is(err, ErrGone) {
		t.Errorf("Adopt of a pid outside the group: %v, want ErrGone", err)
	}
	// ...and adopts it.
	p, err := rt.Adopt("adoptee", 3, pid, start)
	if err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	if p.PID() != pid || p.StartTime() != start {
		t.Errorf("adopted PID/StartTime = %d/%d", p.PID(), p.StartTime())
	}
	if err := p.Signal(0); err != nil {
		t.Errorf("Signal(0): %v", err)
	}
	if err := p.Resize(cgroup.Resources{PidsMax: 9}); err != nil {
		t.Errorf("Resize: %v", err)
	}
	if _, err := p.Stats(); err != nil {
		t.Errorf("Stats: %v", err)
	}
	select {
	case <-p.Done():
		t.Fatal("Done closed while the workload runs")
	default:
	}
	if err := p.Kill(); err != nil {
		t.Fatalf("Kill: %v", err)
	}
	e := wait(t, p)
	if e.Code != -1 || e.OOMKilled || !strings.Contains(e.Reason, "unknown") {
		t.Errorf("exit = %+v, want unknown status", e)
	}
	expectNoGroups(t, rt)
	if _, err := rt.Adopt("adoptee", 3, pid, start); !errors.Is(err, ErrGone) {
		t.Errorf("Adopt after exit: %v, want ErrGone", err)
	}
}

func mustStart(t *testing.T, pid int) uint64 {
	_, s, err := ProcStat(pid)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestOOMKill(t *testing.T) {
	rt := newRuntime(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	errLog := filepath.Join(t.TempDir(), "err")
	// The test binary, bound into the sandbox (its libraries are in the
	// host view).
	p, err := rt.Start(Spec{ID: "hog", Argv: []string{"/opt/memhog"}, Env: []string{helperEnv + "=memhog"}, Stderr: errLog,
		Mounts: []Mount{{Source: self, Target: "/opt/memhog", ReadOnly: true}}, Resources: cgroup.Resources{MemMaxBytes: 64 << 20}})
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	e := wait(t, p)
	if !e.OOMKilled || e.Reason != ReasonOOMKilled || e.Signal != "SIGKILL" {
		b, _ := os.ReadFile(errLog)
		t.Errorf("exit = %+v, want oom-killed; stderr:\n%s", e, b)
	}
	expectNoGroups(t, rt)
}

func TestPidsLimitStopsForkBomb(t *testing.T) {
	rt := newRuntime(t)
	dir := t.TempDir()
	bomb := `i=0; while [ $i -lt 200 ]; do sleep 60 & i=$((i+1)); done; echo survived`
	p, err := rt.Start(Spec{ID: "bomb", Argv: []string{"/bin/sh", "-c", bomb}, Env: []string{"PATH=/usr/bin:/bin"},
		Stdout: filepath.Join(dir, "out"), Stderr: filepath.Join(dir, "err"), Resources: cgroup.Resources{PidsMax: 8}})
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	e := wait(t, p)
	stdout, stderr := readTrim(t, filepath.Join(dir, "out")), readTrim(t, filepath.Join(dir, "err"))
	if e.Code == 0 || strings.Contains(stdout, "survived") || !strings.Contains(strings.ToLower(stderr), "fork") {
		t.Errorf("exit %+v, stdout %q, stderr %q; want the shell to fail to fork", e, stdout, stderr)
	}
	expectNoGroups(t, rt)
}

// TestMemoryPerProcess checks the agent-side cost of a supervised process.
func TestMemoryPerProcess(t *testing.T) {
	if testing.Short() {
		t.Skip("skipping in -short mode")
	}
	rt := newRuntime(t)
	const n = 200
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	procs := make([]*Process, 0, n)
	for i := range n {
		p, err := rt.Start(Spec{ID: "m" + strconv.Itoa(i), Argv: []string{"/bin/sleep", "300"}})
		if err != nil {
			t.Fatalf("Start %d: %v", i, err)
		}
		procs = append(procs, p)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	per := (int64(after.HeapAlloc+after.StackInuse) - int64(before.HeapAlloc+before.StackInuse)) / n
	threads := 0
	if st, err := os.ReadFile("/proc/self/status"); err == nil {
		for _, l := range strings.Split(string(st), "\n") {
			if v, ok := strings.CutPrefix(l, "Threads:"); ok {
				threads, _ = strconv.Atoi(strings.TrimSpace(v))
			}
		}
	}
	t.Logf("agent memory per supervised process: %d bytes (heap+stacks); %d goroutines, %d OS threads for %d processes",
		per, runtime.NumGoroutine(), threads, n)
	if per > 100<<10 {
		t.Errorf("%d bytes per process, want <= 100 KiB", per)
	}
	if threads > n/4 {
		t.Errorf("%d OS threads for %d processes: exit waits must not block threads", threads, n)
	}
	for _, p := range procs {
		_ = p.Kill()
	}
	for _, p := range procs {
		wait(t, p)
	}
	expectNoGroups(t, rt)
}

// BenchmarkStartProcess, BenchmarkStartContainer and BenchmarkStartHost
// start /bin/true in each isolation, bare: no work folder, no log.
func BenchmarkStartProcess(b *testing.B) {
	benchmarkStart(b, Spec{ID: "bench", Argv: []string{"/bin/true"}})
}

func BenchmarkStartContainer(b *testing.B) {
	benchmarkStart(b, Spec{ID: "bench", Argv: []string{"/bin/true"}, Isolation: IsolationContainer})
}

// benchmarkStart measures Start alone (not the workload's run nor the
// cleanup) and reports the median and 90th percentile.
//
// On a host shared with other CPU load, run it under "nice -n -20": the
// benchmark also gives its cgroup subtree the largest CPU weight, so that
// the agent and the sandbox being set up are not starved and the numbers
// show the start path itself.
func benchmarkStart(b *testing.B, s Spec) {
	rt := newRuntime(b)
	// A sibling group keeps the subtree's top (and its weight) in place
	// while the workloads' groups come and go.
	top := filepath.Join("/sys/fs/cgroup/cpu", strings.Split(rt.Cgroups.Root(), "/")[0])
	file, weight := "cpu.shares", "262144"
	if rt.Cgroups.V2() {
		top, file, weight = filepath.Join("/sys/fs/cgroup", strings.Split(rt.Cgroups.Root(), "/")[0]), "cpu.weight", "10000"
	}
	if err := os.MkdirAll(filepath.Join(top, "keep"), 0o755); err == nil {
		b.Cleanup(func() { _ = os.Remove(filepath.Join(top, "keep")); _ = os.Remove(top) })
	}
	_ = os.WriteFile(filepath.Join(top, file), []byte(weight), 0)
	var ru0, ru1, rc0, rc1 syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru0)
	_ = syscall.Getrusage(syscall.RUSAGE_CHILDREN, &rc0)
	defer func() {
		_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru1)
		_ = syscall.Getrusage(syscall.RUSAGE_CHILDREN, &rc1)
		cpu := func(r syscall.Rusage) time.Duration {
			return time.Duration(r.Utime.Nano() + r.Stime.Nano())
		}
		total := cpu(ru1) - cpu(ru0) + cpu(rc1) - cpu(rc0)
		b.ReportMetric(float64(total.Microseconds())/1000/float64(b.N), "cpu-ms/start")
	}()
	var d []time.Duration
	for i := 0; b.Loop(); i++ {
		s.Incarnation = uint64(i)
		t0 := time.Now()
		p, err := rt.Start(s)
		d = append(d, time.Since(t0))
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		<-p.Done()
		b.StartTimer()
	}
	slices.Sort(d)
	b.ReportMetric(float64(d[len(d)/2].Microseconds())/1000, "ms/start(median)")
	b.ReportMetric(float64(d[len(d)*9/10].Microseconds())/1000, "ms/start(p90)")
}

// TestConcurrentStarts races creation of groups against removal of the
// shared parents by exiting workloads.
func TestConcurrentStarts(t *testing.T) {
	rt := newRuntime(t)
	const workers, each = 8, 10
	errc := make(chan error, workers*each)
	for w := range workers {
		go func() {
			for i := range each {
				p, err := rt.Start(Spec{ID: fmt.Sprintf("c%d", w), Incarnation: uint64(i), Argv: []string{"/bin/true"},
					Resources: cgroup.Resources{PidsMax: 4, MemMaxBytes: 32 << 20, CPUMaxMilli: 500}})
				if err != nil {
					errc <- err
					continue
				}
				select {
				case <-p.Done():
					if e := p.Exit(); e.Code != 0 {
						err = fmt.Errorf("%d: exit %+v", p.PID(), e)
					}
				case <-time.After(30 * time.Second):
					err = fmt.Errorf("%d did not finish", p.PID())
				}
				errc <- err
			}
		}()
	}
	for range workers * each {
		if err := <-errc; err != nil {
			t.Error(err)
		}
	}
	expectNoGroups(t, rt)
}

func BenchmarkStartHost(b *testing.B) {
	benchmarkStart(b, Spec{ID: "bench", Argv: []string{"/bin/true"}, Isolation: IsolationHost})
}

// BenchmarkStartProcessAgent starts process sandboxes as the agent does:
// with a work folder and a log file.
func BenchmarkStartProcessAgent(b *testing.B) {
	dir := b.TempDir()
	benchmarkStart(b, Spec{ID: "bench", Argv: []string{"/bin/true"}, WorkDir: filepath.Join(dir, "work", "bench"),
		Stdout: filepath.Join(dir, "logs", "bench.log"), Stderr: filepath.Join(dir, "logs", "bench.log")})
}
