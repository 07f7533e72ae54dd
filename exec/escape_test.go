package exec

import (
	"bufio"
	"bytes"
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

	"golang.org/x/sys/unix"

	"github.com/shim-run/shim/cgroup"
)

// The escape suite runs this test binary inside a sandbox (bound at
// escapeBin) as a hostile workload: escapeHelper tries each way out with
// raw system calls and prints one line per attempt, "NAME=blocked (why)"
// or "NAME=ESCAPED (what)". TestEscape asserts every attempt is blocked
// and checks on the host that nothing changed.
const escapeBin = "/opt/escape"

// Environment of the helper.
const (
	escTestPID   = "ESCAPE_TEST_PID"  // the test process (the agent), on the host
	escNeighbour = "ESCAPE_NEIGHBOUR" // host pids of a neighbour sandbox's processes
	escSecret    = "ESCAPE_SECRET"    // reversed, a value only the test's environment holds
	escPaths     = "ESCAPE_PATHS"     // host paths the sandbox must not reach (":"-separated)
	escGroup     = "ESCAPE_GROUP"     // the sandbox's own cgroup, below the cgroup mounts
	escID        = "ESCAPE_ID"        // unique per run, for file names
)

// seccompOnly are attempts only the seccomp filter stops (the workload may
// hold the needed privilege over its own processes).
var seccompOnly = map[string]bool{"ptrace-child": true, "userns": true, "keyctl": true, "bpf": true}

func escapeHelper() int {
	w := bufio.NewWriter(os.Stdout)
	defer w.Flush()
	report := func(name string, escaped bool, detail string) {
		if escaped {
			fmt.Fprintf(w, "%s=ESCAPED (%s)\n", name, detail)
		} else {
			fmt.Fprintf(w, "%s=blocked (%s)\n", name, detail)
		}
	}
	// mustFail: the attempt escaped if err is nil.
	mustFail := func(name string, err error) {
		report(name, err == nil, fmt.Sprint(err))
	}
	// mustEPERM: only EPERM (or EACCES) counts; any other error means the
	// privilege check passed and something else failed.
	mustEPERM := func(name string, err error) {
		report(name, !errors.Is(err, unix.EPERM) && !errors.Is(err, unix.EACCES), fmt.Sprint(err))
	}
	testPID := os.Getenv(escTestPID)
	id := os.Getenv(escID)

	// The sandbox is usable at all (or every "blocked" below is moot).
	err := os.WriteFile("/tmp/ok", []byte("x"), 0o600)
	if err == nil {
		err = os.WriteFile("/work/ok", []byte("x"), 0o600)
	}
	if err != nil {
		fmt.Fprintf(w, "sanity=FAILED (%v)\n", err)
	} else {
		fmt.Fprintf(w, "sanity=ok\n")
	}

	// Host processes in /proc, and their environment.
	_, err = os.Stat("/proc/" + testPID)
	mustFail("proc-host-pid", err)
	_, err = os.ReadFile("/proc/" + testPID + "/environ")
	mustFail("host-environ", err)
	secret := reverse(os.Getenv(escSecret))
	found := ""
	ents, _ := os.ReadDir("/proc")
	nprocs := 0
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		nprocs++
		if b, err := os.ReadFile("/proc/" + e.Name() + "/environ"); err == nil && bytes.Contains(b, []byte(secret)) {
			found = e.Name()
		}
	}
	report("environ-secret", found != "", "found in /proc/"+found+"/environ")
	comm, _ := os.ReadFile("/proc/1/comm")
	report("proc-is-own", strings.TrimSpace(string(comm)) != "shim-init" || nprocs > 30,
		fmt.Sprintf("/proc/1 is %q, %d processes", strings.TrimSpace(string(comm)), nprocs))

	// The host's files.
	for name, p := range map[string]string{"write-usr": "/usr/shim-escape-" + id, "write-etc": "/etc/shim-escape-" + id, "write-root": "/shim-escape-" + id} {
		mustFail(name, os.WriteFile(p, []byte("x"), 0o644))
	}
	if f, err := os.OpenFile("/proc/sys/vm/overcommit_ratio", os.O_WRONLY, 0); err != nil {
		mustFail("write-proc-sys", err)
	} else {
		cur, _ := os.ReadFile("/proc/sys/vm/overcommit_ratio")
		_, err = f.Write(cur) // the same value: harmless if it went through
		f.Close()
		mustFail("write-proc-sys", err)
	}
	// Opened only, never written: a write would act on the host.
	if f, err := os.OpenFile("/proc/sysrq-trigger", os.O_WRONLY, 0); err == nil {
		f.Close()
		mustFail("sysrq-open", nil)
	} else {
		mustFail("sysrq-open", err)
	}
	for _, p := range filepath.SplitList(os.Getenv(escPaths)) {
		_, err := os.ReadFile(p)
		if errors.Is(err, syscall.EISDIR) {
			_, err = os.ReadDir(p)
		}
		mustFail("host-path "+p, err)
	}
	_, err = os.Stat("/dev/vda")
	mustFail("dev-disk", err)
	mustEPERM("mknod-disk", unix.Mknod("/tmp/disk-"+id, unix.S_IFBLK|0o600, int(unix.Mkdev(254, 0))))
	kcore, err := os.ReadFile("/proc/kcore")
	report("kcore", err == nil && len(kcore) > 0, fmt.Sprintf("%d bytes, %v", len(kcore), err))

	// Mounts and namespaces.
	mustEPERM("mount-tmpfs", unix.Mount("none", "/tmp", "tmpfs", 0, ""))
	_, err = unix.Fsopen("tmpfs", 0)
	mustEPERM("fsopen", err)
	mustEPERM("unshare-mount", unix.Unshare(unix.CLONE_NEWNS))
	mustFail("chroot", unix.Chroot("/tmp"))
	_, err = os.Open("/proc/" + testPID + "/ns/mnt")
	mustFail("host-mount-ns", err)
	// A user namespace is the usual way to regain every capability.
	pid, err := syscall.ForkExec("/bin/true", []string{"true"}, &syscall.ProcAttr{Sys: &syscall.SysProcAttr{
		Cloneflags: syscall.CLONE_NEWUSER,
	}})
	if err == nil {
		var ws syscall.WaitStatus
		_, _ = syscall.Wait4(pid, &ws, 0, nil)
	}
	mustFail("userns", err)

	// Capabilities and kernel modules.
	status, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(status), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.HasPrefix(k, "Cap") {
			fmt.Fprintf(w, "%s=%s\n", k, strings.TrimSpace(v))
		}
	}
	// ENOSYS: a kernel without modules, which none can load either.
	noModule := func(name string, err error) {
		report(name, !errors.Is(err, unix.EPERM) && !errors.Is(err, unix.ENOSYS), fmt.Sprint(err))
	}
	noModule("init-module", unix.InitModule([]byte("\x7fELF not a module"), ""))
	if f, err := os.Open("/dev/null"); err == nil {
		noModule("finit-module", unix.FinitModule(int(f.Fd()), "", 0))
		f.Close()
	}
	noModule("delete-module", unix.DeleteModule("dummy", 0))

	// A neighbour sandbox's processes.
	for _, s := range strings.Fields(os.Getenv(escNeighbour)) {
		n, _ := strconv.Atoi(s)
		_, err := os.Stat("/proc/" + s)
		mustFail("neighbour-proc "+s, err)
		mustFail("neighbour-kill "+s, unix.Kill(n, 0))
		mustFail("neighbour-ptrace "+s, ptraceAttach(n))
	}
	// Its own child: the filter refuses ptrace altogether.
	if p, err := os.StartProcess("/bin/sleep", []string{"sleep", "5"}, &os.ProcAttr{}); err == nil {
		err := ptraceAttach(p.Pid)
		_ = p.Kill()
		_, _ = p.Wait()
		mustFail("ptrace-child", err)
	}

	// Cgroups: its own, the root, by any path.
	group := os.Getenv(escGroup)
	for _, p := range []string{
		"/sys/fs/cgroup/cgroup.procs", "/sys/fs/cgroup/memory/cgroup.procs", "/sys/fs/cgroup/memory/tasks",
		"/sys/fs/cgroup/unified/cgroup.procs", "/sys/fs/cgroup/pids/" + group + "/pids.max",
		"/sys/fs/cgroup/memory/" + group + "/memory.limit_in_bytes", "/sys/fs/cgroup/" + group + "/memory.max",
		"/proc/1/root/sys/fs/cgroup/memory/cgroup.procs",
	} {
		f, err := os.OpenFile(p, os.O_WRONLY, 0)
		if err == nil {
			f.Close()
		}
		mustFail("cgroup-write "+p, err)
	}
	_ = os.Mkdir("/tmp/cg", 0o755)
	mustEPERM("cgroup-mount", unix.Mount("cgroup", "/tmp/cg", "cgroup", 0, "memory"))

	// Other kernel interfaces the filter closes.
	_, err = unix.KeyctlInt(unix.KEYCTL_GET_KEYRING_ID, unix.KEY_SPEC_SESSION_KEYRING, 1, 0, 0)
	mustEPERM("keyctl", err)
	_, _, e := unix.Syscall(unix.SYS_BPF, unix.BPF_MAP_CREATE, 0, 0)
	mustEPERM("bpf", e)
	_, err = unix.OpenByHandleAt(unix.AT_FDCWD, unix.NewFileHandle(1, []byte{0, 0, 0, 0, 0, 0, 0, 0}), unix.O_RDONLY)
	mustEPERM("open-by-handle", err)
	return 0
}

// ptraceAttach attaches to pid and detaches again if that worked.
func ptraceAttach(pid int) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := unix.PtraceAttach(pid); err != nil {
		return err
	}
	var ws unix.WaitStatus
	_, _ = unix.Wait4(pid, &ws, unix.WALL, nil)
	_ = unix.PtraceDetach(pid)
	return nil
}

// TestEscape runs the escape helper in each isolation that claims to
// isolate, as nobody and as root (User "0": root inside must not get out
// either), next to a neighbour sandbox and a stand-in for the agent's data
// dir.
func TestEscape(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	secret := fmt.Sprintf("shim-escape-secret-%d-%d", os.Getpid(), time.Now().UnixNano())
	t.Setenv("SHIM_TEST_AGENT_SECRET", secret) // in the agent's (this process's) environment only
	for _, iso := range []Isolation{IsolationProcess, IsolationContainer} {
		for _, user := range []string{"", "0"} {
			// The helper comes in the work folder, or bound through Mounts
			// (which makes a process sandbox build its whole root rather
			// than clone the template's).
			for _, mounted := range []bool{false, true} {
				t.Run(fmt.Sprintf("%v/user=%q/mounted=%v", iso, user, mounted), func(t *testing.T) {
					testEscape(t, iso, user, self, secret, mounted)
				})
			}
		}
	}
}

func testEscape(t *testing.T, iso Isolation, user, self, secret string, mounted bool) {
	rt := newRuntime(t)
	work := workDir(t)
	argv0, mounts := escapeBin, []Mount{{Source: self, Target: escapeBin, ReadOnly: true}}
	if !mounted {
		b, err := os.ReadFile(self)
		if err == nil {
			err = os.WriteFile(filepath.Join(work, "escape"), b, 0o755)
		}
		if err != nil {
			t.Fatal(err)
		}
		argv0, mounts = "/work/escape", nil
	}
	id := fmt.Sprintf("%d-%d", os.Getpid(), time.Now().UnixNano())
	// The agent's data dir: a secret, and the neighbour's log.
	data := t.TempDir()
	if err := os.WriteFile(filepath.Join(data, "raft.db"), []byte(secret), 0o600); err != nil {
		t.Fatal(err)
	}
	neighbourLog := filepath.Join(data, "logs", "neighbour.log")
	nb, err := rt.Start(Spec{ID: "neighbour", Isolation: iso, Argv: []string{"/bin/sh", "-c", "echo " + secret + "; exec sleep 1000"},
		Env: []string{"PATH=/usr/bin:/bin"}, Stdout: neighbourLog})
	if err != nil {
		t.Fatalf("neighbour: %v", err)
	}
	t.Cleanup(func() { _ = nb.Kill(); <-nb.Done() })
	eventually(t, "the neighbour's log", func() bool { b, _ := os.ReadFile(neighbourLog); return len(b) > 0 })
	neighbours := []string{strconv.Itoa(nb.PID())}
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", nb.PID(), nb.PID())); err == nil {
		neighbours = append(neighbours, strings.Fields(string(b))...)
	}

	mountsBefore := countLines(t, "/proc/self/mountinfo")
	ratioBefore, _ := os.ReadFile("/proc/sys/vm/overcommit_ratio")
	out := filepath.Join(t.TempDir(), "out")
	name := GroupName("esc", 1)
	r := cgroup.Resources{PidsMax: 64, MemMaxBytes: 256 << 20}
	p, err := rt.Start(Spec{
		ID: "esc", Incarnation: 1, Isolation: iso, User: user, Argv: []string{argv0}, WorkDir: work,
		Env: []string{
			helperEnv + "=escape", "PATH=/usr/bin:/bin",
			escTestPID + "=" + strconv.Itoa(os.Getpid()), escNeighbour + "=" + strings.Join(neighbours, " "),
			escSecret + "=" + reverse(secret), escID + "=" + id, escGroup + "=" + rt.Cgroups.Root() + "/" + name,
			escPaths + "=" + strings.Join([]string{data, filepath.Join(data, "raft.db"), neighbourLog, filepath.Dir(self)}, ":"),
		},
		Mounts: mounts, Stdout: out, Stderr: out, Resources: r,
	})
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	// While it runs: its limits as set.
	pidsMax := readTrim(t, filepath.Join(groupDir(rt, "pids", name), "pids.max"))
	e := wait(t, p)
	b, _ := os.ReadFile(out)
	if e.Code != 0 {
		t.Fatalf("helper exit %+v:\n%s", e, b)
	}
	res := fields(string(b))
	if res["sanity"] != "ok" {
		t.Errorf("the sandbox is not usable: sanity=%s", res["sanity"])
	}
	attempts := 0
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		k, v, _ := strings.Cut(l, "=")
		switch {
		case strings.HasPrefix(v, "blocked"):
			attempts++
		case strings.HasPrefix(v, "ESCAPED"):
			if seccompOnly[k] && !seccompBuilt {
				t.Logf("%s (built without -tags seccomp, so not blocked)", l)
				continue
			}
			t.Errorf("%s", l)
		}
	}
	if attempts < 30 {
		t.Errorf("only %d attempts reported:\n%s", attempts, b)
	}
	// Capabilities: runc's default set at most for root, none otherwise.
	allowed := uint64(sandboxCaps)
	for _, k := range []string{"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"} {
		v, err := strconv.ParseUint(res[k], 16, 64)
		if err != nil {
			t.Errorf("%s = %q", k, res[k])
			continue
		}
		want := allowed
		if user == "" && k != "CapBnd" {
			want = 0
		}
		if v&^want != 0 || (k == "CapEff" && v != want) {
			t.Errorf("%s = %016x, want %016x", k, v, want)
		}
	}

	// Nothing changed on the host.
	for _, f := range []string{"/usr/shim-escape-" + id, "/etc/shim-escape-" + id, "/shim-escape-" + id} {
		if _, err := os.Stat(f); err == nil {
			os.Remove(f)
			t.Errorf("%s was written on the host", f)
		}
	}
	if got := countLines(t, "/proc/self/mountinfo"); got != mountsBefore {
		t.Errorf("host mounts: %d, were %d", got, mountsBefore)
	}
	if after, _ := os.ReadFile("/proc/sys/vm/overcommit_ratio"); !bytes.Equal(after, ratioBefore) {
		t.Errorf("overcommit_ratio %q, was %q", after, ratioBefore)
	}
	if want := strconv.FormatInt(cgroup.MapV1(runResources(r)).PidsMax, 10); !rt.Cgroups.V2() && pidsMax != want {
		t.Errorf("pids.max %s while it ran, want %s", pidsMax, want)
	}
	if b, _ := os.ReadFile(filepath.Join(data, "raft.db")); string(b) != secret {
		t.Errorf("the data dir's file changed: %q", b)
	}
	select {
	case <-nb.Done():
		t.Errorf("the neighbour died: %+v", nb.Exit())
	default:
	}
	if t.Failed() {
		t.Logf("helper output:\n%s", b)
	}
}

func countLines(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return bytes.Count(b, []byte("\n"))
}

// reverse reverses s: the helper gets the secret reversed, so that the
// secret itself is in no environment inside the sandbox.
func reverse(s string) string {
	b := []byte(s)
	for i, j := 0, len(b)-1; i < j; i, j = i+1, j-1 {
		b[i], b[j] = b[j], b[i]
	}
	return string(b)
}
