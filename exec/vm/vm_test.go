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
		Stderr: filepath.Join(args[3], "out.log"),
		Argv:   []string{"/bin/sh", "-c", `trap 'echo got TERM; exit 7' TERM; echo up; while :; do sleep 0.1; done`},
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
	v := start(t, rt, Spec{ID: "boot", Dir: dir, Stdout: log, Stderr: log,
		Argv:      []string{"/bin/sh", "-c", "uname -r; cat /proc/meminfo; echo to-stderr >&2; exit 3"},
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
	for _, want := range []string{"MemTotal:", "MemAvailable:", "to-stderr"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
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

var _ = errors.Is
var _ = strconv.Itoa
