package exec

import (
	"errors"
	"fmt"
	"os"
	osexec "os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/opencontainers/runc/libcontainer/seccomp"
	"github.com/shim-run/shim/cgroup"
)

// runScript starts /bin/sh -c script with s's other fields, waits for it and
// returns its exit and combined output.
func runScript(t *testing.T, rt *Runtime, s Spec, script string) (Exit, string) {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out")
	s.Argv = []string{"/bin/sh", "-c", script}
	if s.Env == nil {
		s.Env = []string{"PATH=/usr/bin:/bin:/usr/sbin:/sbin"}
	}
	s.Stdout, s.Stderr = out, out
	p, err := rt.Start(s)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	e := wait(t, p)
	b, _ := os.ReadFile(out)
	return e, string(b)
}

// fields parses "key=value" lines.
func fields(out string) map[string]string {
	m := map[string]string{}
	for _, l := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(l, "="); ok {
			m[k] = strings.TrimSpace(v)
		}
	}
	return m
}

// TestSandboxContainerView checks what a container on the host view sees
// and may do.
func TestSandboxContainerView(t *testing.T) {
	rt := newRuntime(t)
	work := workDir(t)
	script := `echo pid=$$
echo procs=$(ls /proc | grep '^[0-9]' | sort -n | tr '\n' ' ')
touch /usr/shim-test 2>/dev/null && echo usr=writable || echo usr=ro
touch /shim-test 2>/dev/null && echo root=writable || echo root=ro
echo x > /tmp/f && echo tmp=$(cat /tmp/f)
echo w > ./w && echo work=$(cat /work/w)
echo cwd=$(pwd)
echo net=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ' ')
echo lo=$(cat /sys/class/net/lo/operstate 2>&1)
echo host=$(hostname)
echo timer_list=$(wc -c < /proc/timer_list)
echo firmware=$(ls /sys/firmware | wc -l)
echo shadow=$(wc -c < /etc/shadow)
echo procsys=$(echo 1 > /proc/sys/kernel/ns_last_pid 2>/dev/null && echo writable || echo ro)
grep -E '^(NoNewPrivs|Seccomp|CapEff|CapBnd):' /proc/self/status | tr -d '\t' | sed 's/:/=/'
echo mount=$(mount -t tmpfs none /mnt 2>/dev/null && echo ok || echo denied)
echo uid=$(id -u)`
	e, out := runScript(t, rt, Spec{ID: "box", Isolation: IsolationContainer, Network: NetworkNone, WorkDir: work, User: "0"}, script)
	if e.Code != 0 {
		t.Fatalf("exit %+v; output:\n%s", e, out)
	}
	f := fields(out)
	want := map[string]string{
		"usr": "ro", "root": "ro", "tmp": "x", "work": "w", "cwd": "/work", "net": "lo", "lo": "unknown",
		"host": "box", "timer_list": "0", "firmware": "0", "shadow": "0", "procsys": "ro", "NoNewPrivs": "1", "mount": "denied", "uid": "0",
		// runc's default: AUDIT_WRITE, KILL, NET_BIND_SERVICE.
		"CapEff": "0000000020000420", "CapBnd": "0000000020000420",
	}
	if seccomp.Enabled {
		want["Seccomp"] = "2"
	}
	for k, v := range want {
		if f[k] != v {
			t.Errorf("%s = %q, want %q", k, f[k], v)
		}
	}
	if f["pid"] == "1" || f["pid"] == "" {
		t.Errorf("pid = %q, want the init's child", f["pid"])
	}
	// The init, sh and the pipeline: nothing of the host.
	pids := strings.Fields(f["procs"])
	if len(pids) == 0 || pids[0] != "1" || len(pids) > 7 {
		t.Errorf("sees processes %v, want only its own", pids)
	}
	if b, err := os.ReadFile(filepath.Join(work, "w")); err != nil || string(b) != "w\n" {
		t.Errorf("work folder on the host: %q, %v", b, err)
	}
	if _, err := os.Stat("/usr/shim-test"); err == nil {
		os.Remove("/usr/shim-test")
		t.Errorf("the container wrote to the host's /usr")
	}
	if t.Failed() {
		t.Logf("output:\n%s", out)
	}
	expectNoGroups(t, rt)
	expectNoGroupsAnywhere(t, rt)
}

// expectNoGroupsAnywhere checks every mounted hierarchy, including those
// only libcontainer joins (cpuset, devices, ... on v1).
func expectNoGroupsAnywhere(t *testing.T, rt *Runtime) {
	t.Helper()
	top := strings.Split(rt.Cgroups.Root(), "/")[0]
	dirs, _ := filepath.Glob("/sys/fs/cgroup/*/" + top)
	if d := filepath.Join("/sys/fs/cgroup", top); rt.Cgroups.V2() {
		dirs = append(dirs, d)
	}
	for _, d := range dirs {
		if _, err := os.Stat(d); err == nil {
			t.Errorf("%s left behind", d)
		}
	}
}

// TestSandboxRootfsAndUser runs a container on its own root as another user.
func TestSandboxRootfsAndUser(t *testing.T) {
	rt := newRuntime(t)
	root := busyboxRoot(t)
	script := `echo uid=$(id -u) gid=$(id -g) groups=$(id -G)
echo bin=$(ls /bin | wc -l)
touch /x 2>/dev/null && echo root=writable || echo root=ro
echo y > /tmp/y && echo tmp=$(cat /tmp/y)
echo CapEff=$(grep CapEff /proc/self/status | cut -f2)`
	e, out := runScript(t, rt, Spec{ID: "bb", Isolation: IsolationContainer, Rootfs: root, User: "1000:1001", Dir: "/tmp"}, script)
	if e.Code != 0 {
		t.Fatalf("exit %+v; output:\n%s", e, out)
	}
	f := fields(out)
	if f["uid"] != "1000 gid=1001 groups=1001" || f["root"] != "ro" || f["tmp"] != "y" || f["CapEff"] != "0000000000000000" {
		t.Errorf("unexpected view:\n%s", out)
	}
	if f["bin"] != "5" {
		t.Errorf("/bin has %s entries, want the 5 of the rootfs", f["bin"])
	}
	// The executable is looked up inside the root, not on the host.
	_, err := rt.Start(Spec{ID: "bb", Isolation: IsolationContainer, Rootfs: root, Argv: []string{"cat"}})
	if !errors.Is(err, ErrNotFound) {
		t.Errorf("cat (not in the rootfs): %v, want ErrNotFound", err)
	}
	expectNoGroups(t, rt)
}

// busyboxRoot makes a minimal root file system from busybox-static.
func busyboxRoot(t *testing.T) string {
	t.Helper()
	bb, err := osexec.LookPath("busybox")
	if err != nil {
		t.Skip("busybox (static) not installed")
	}
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(bb)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "bin", "busybox"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, l := range []string{"sh", "id", "ls", "wc"} {
		if err := os.Symlink("busybox", filepath.Join(root, "bin", l)); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

// TestSandboxNotFoundAndCleanup checks the errors before and after the
// group exists, and that a failed start leaves nothing behind.
func TestSandboxNotFoundAndCleanup(t *testing.T) {
	rt := newRuntime(t)
	self, _ := os.Executable()
	for _, argv0 := range []string{"/no/such", "no-such-binary", self} {
		_, err := rt.Start(Spec{ID: "nf", Isolation: IsolationContainer, Argv: []string{argv0}})
		if !errors.Is(err, ErrNotFound) {
			t.Errorf("Start(%q): %v, want ErrNotFound", argv0, err)
		}
	}
	for _, s := range []Spec{
		{User: "nobody"}, {User: "1:x"}, {Rootfs: "relative"}, {Dir: "relative"}, {Isolation: IsolationProcess, Rootfs: "/"},
	} {
		if s.Isolation == 0 && s.Rootfs != "/" {
			s.Isolation = IsolationContainer
		}
		s.ID, s.Argv = "bad", []string{"/bin/true"}
		if _, err := rt.Start(s); !errors.Is(err, ErrInvalid) {
			t.Errorf("Start(%+v): %v, want ErrInvalid", s, err)
		}
	}
	// A failure inside libcontainer (nothing can be mounted on a file at
	// /proc) removes the group too.
	root := busyboxRoot(t)
	if err := os.WriteFile(filepath.Join(root, "proc"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := rt.Start(Spec{ID: "broken", Isolation: IsolationContainer, Rootfs: root, Argv: []string{"/bin/sh"}}); err == nil {
		t.Errorf("Start with a broken rootfs succeeded")
	} else {
		t.Logf("broken rootfs: %v", err)
	}
	if names, err := rt.Cgroups.List(); err != nil || len(names) != 0 {
		t.Errorf("groups after failed starts: %v, %v", names, err)
	}
	expectNoGroups(t, rt)
	expectNoGroupsAnywhere(t, rt)
	ents, _ := os.ReadDir(rt.containerRoot())
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), containerID(rt.Cgroups.Root()+"/")) {
			t.Errorf("libcontainer state left: %s", filepath.Join(rt.containerRoot(), e.Name()))
		}
	}
}

// TestResourceBothIsolations runs the cgroup guarantees for both isolation levels.
func TestResourceBothIsolations(t *testing.T) {
	for _, iso := range []Isolation{IsolationProcess, IsolationContainer, IsolationHost} {
		t.Run(fmt.Sprint("isolation=", iso), func(t *testing.T) {
			t.Run("first instruction", func(t *testing.T) {
				rt := newRuntime(t)
				e, out := runScript(t, rt, Spec{ID: "cat", Incarnation: 2, Isolation: iso, Resources: cgroup.Resources{PidsMax: 4}},
					"exec cat /proc/self/cgroup")
				if e.Code != 0 {
					t.Fatalf("exit %+v: %s", e, out)
				}
				want := "/" + rt.Cgroups.Root() + "/cat.2"
				if iso == IsolationProcess {
					want = "/" // the root of its cgroup namespace
				}
				for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
					parts := strings.SplitN(l, ":", 3)
					if len(parts) == 3 && slices.Contains([]string{"cpu", "cpuacct", "memory", "pids", "freezer", ""}, parts[1]) &&
						(parts[1] != "" || rt.Cgroups.V2()) && parts[2] != want {
						t.Errorf("line %q, want %s", l, want)
					}
				}
				expectNoGroups(t, rt)
			})
			t.Run("fork bomb", func(t *testing.T) {
				rt := newRuntime(t)
				bomb := `i=0; while [ $i -lt 200 ]; do sleep 60 & i=$((i+1)); done; echo survived`
				e, out := runScript(t, rt, Spec{ID: "bomb", Isolation: iso, Resources: cgroup.Resources{PidsMax: 8}}, bomb)
				if e.Code == 0 || strings.Contains(out, "survived") || !strings.Contains(strings.ToLower(out), "fork") {
					t.Errorf("exit %+v, output %q; want the shell to fail to fork", e, out)
				}
				expectNoGroups(t, rt)
			})
			t.Run("oom", func(t *testing.T) {
				rt := newRuntime(t)
				e, out := runScript(t, rt, Spec{ID: "hog", Isolation: iso, Resources: cgroup.Resources{MemMaxBytes: 32 << 20}},
					`x=$(head -c 200000000 /dev/zero | tr '\0' x); echo survived ${#x}`)
				if !e.OOMKilled || e.Reason != ReasonOOMKilled {
					t.Errorf("exit %+v, output %q; want oom-killed", e, out)
				}
				expectNoGroups(t, rt)
			})
			t.Run("limits", func(t *testing.T) {
				// The workload's own bounds are in place once Start returns
				// (a container's init runs with lifted ones).
				rt := newRuntime(t)
				r := cgroup.Resources{CPUMinMilli: 100, CPUMaxMilli: 200, CPUBurstMilli: 100, MemMaxBytes: 48 << 20, PidsMax: 6}
				p, err := rt.Start(Spec{ID: "lim", Isolation: iso, Argv: []string{"/bin/sleep", "60"}, Resources: r})
				if err != nil {
					t.Fatal(err)
				}
				r = runResources(r) // pids.max has room for the init's threads
				name := "lim.0"
				files := map[string]string{}
				if rt.Cgroups.V2() {
					v := cgroup.MapV2(r)
					files[filepath.Join(groupDir(rt, "", name), "cpu.max")] = v.CPUMax
					files[filepath.Join(groupDir(rt, "", name), "cpu.weight")] = strconv.FormatUint(v.CPUWeight, 10)
					files[filepath.Join(groupDir(rt, "", name), "pids.max")] = v.PidsMax
				} else {
					v := cgroup.MapV1(r)
					files[filepath.Join(groupDir(rt, "cpu", name), "cpu.cfs_quota_us")] = strconv.FormatInt(v.CPUCfsQuotaUs, 10)
					files[filepath.Join(groupDir(rt, "cpu", name), "cpu.cfs_burst_us")] = strconv.FormatUint(v.CPUCfsBurstUs, 10)
					files[filepath.Join(groupDir(rt, "cpu", name), "cpu.shares")] = strconv.FormatUint(v.CPUShares, 10)
					files[filepath.Join(groupDir(rt, "pids", name), "pids.max")] = strconv.FormatInt(v.PidsMax, 10)
					files[filepath.Join(groupDir(rt, "memory", name), "memory.limit_in_bytes")] = strconv.FormatInt(v.MemoryLimit, 10)
				}
				for f, want := range files {
					if got := readTrim(t, f); got != want {
						t.Errorf("%s = %s, want %s", f, got, want)
					}
				}
				_ = p.Kill()
				wait(t, p)
				expectNoGroups(t, rt)
			})
			t.Run("adopt", func(t *testing.T) { testAdopt(t, iso) })
		})
	}
}

// testAdopt starts a workload from a separate, short-lived agent process
// and adopts it.
func testAdopt(t *testing.T, iso Isolation) {
	rt := newRuntime(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := osexec.Command(self, rt.Cgroups.Root(), "adoptee", strconv.Itoa(int(iso)))
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
	ex, err := rt.Existing()
	if err != nil || len(ex) != 1 || ex[0].PID != pid || ex[0].StartTime != start {
		t.Fatalf("Existing = %+v, %v; want pid %d start %d", ex, err, pid, start)
	}
	p, err := rt.Adopt("adoptee", 3, pid, start)
	if err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	if err := p.Resize(cgroup.Resources{PidsMax: 9, CPUMaxMilli: 300}); err != nil {
		t.Errorf("Resize: %v", err)
	}
	if err := p.Kill(); err != nil {
		t.Fatalf("Kill: %v", err)
	}
	if e := wait(t, p); !strings.Contains(e.Reason, "killed") {
		t.Errorf("exit = %+v", e)
	}
	expectNoGroups(t, rt)
}

// TestSandboxProcessNetNoneAndUser checks process isolation's private
// network (lo up) and identity.
func TestSandboxProcessNetNoneAndUser(t *testing.T) {
	rt := newRuntime(t)
	if _, err := osexec.LookPath("ip"); err != nil {
		t.Skip("iproute2 not installed")
	}
	self, _ := os.Readlink("/proc/self/ns/net")
	script := `echo net=$(readlink /proc/self/ns/net)
echo links=$(ip -o link | cut -d: -f2 | tr -d ' ' | tr '\n' ' ')
echo loup=$(ip -o link show lo | grep -c LOWER_UP)
echo uid=$(id -u) gid=$(id -g) groups=$(id -G)`
	e, out := runScript(t, rt, Spec{ID: "nn", Network: NetworkNone, User: "65534:65533"}, script)
	if e.Code != 0 {
		t.Fatalf("exit %+v: %s", e, out)
	}
	f := fields(out)
	if f["net"] == self || f["links"] != "lo" || f["loup"] != "1" || f["uid"] != "65534 gid=65533 groups=65533" {
		t.Errorf("agent netns %s; output:\n%s", self, out)
	}
	// The agent's threads are all still in its own network namespace.
	tasks, _ := filepath.Glob("/proc/self/task/*/ns/net")
	for _, tk := range tasks {
		if ns, _ := os.Readlink(tk); ns != self {
			t.Errorf("%s is in %s, not the agent's %s", tk, ns, self)
		}
	}
	expectNoGroups(t, rt)
}

// TestSandboxConcurrent starts containers from several goroutines at
// once, both isolation levels mixed.
func TestSandboxConcurrent(t *testing.T) {
	rt := newRuntime(t)
	const workers, each = 4, 3
	errc := make(chan error, workers*each)
	for w := range workers {
		go func() {
			for i := range each {
				iso := Isolation((w + i) % 3)
				p, err := rt.Start(Spec{ID: fmt.Sprintf("cc%d", w), Incarnation: uint64(i), Argv: []string{"/bin/sh", "-c", "exit 3"},
					Isolation: iso, Network: Network(i % 2), Resources: cgroup.Resources{PidsMax: 8, MemMaxBytes: 32 << 20}})
				if err != nil {
					errc <- err
					continue
				}
				<-p.Done()
				if e := p.Exit(); e.Code != 3 {
					err = fmt.Errorf("%v: exit %+v", iso, e)
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

// TestSandboxContainerCgroups checks where a container's workload lives: in
// its own group in every hierarchy the manager uses and, on v1, in the
// devices hierarchy with only runc's default devices allowed. On v1 the init
// is born there (no runtime moves it), so no hierarchy it does not use gets
// a directory for it.
func TestSandboxContainerCgroups(t *testing.T) {
	rt := newRuntime(t)
	p, err := rt.Start(Spec{ID: "cg", Argv: []string{"/bin/sleep", "30"}, Isolation: IsolationContainer,
		Resources: cgroup.Resources{PidsMax: 8, MemMaxBytes: 64 << 20}})
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", p.PID()))
	if err != nil {
		t.Fatal(err)
	}
	want := "/" + rt.Cgroups.Root() + "/" + GroupName("cg", 0)
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		parts := strings.SplitN(l, ":", 3)
		if len(parts) != 3 {
			continue
		}
		ctls := strings.Split(parts[1], ",")
		uses := rt.Cgroups.V2() && parts[1] == ""
		for _, c := range ctls {
			uses = uses || slices.Contains([]string{"cpu", "cpuacct", "memory", "pids", "freezer", "devices"}, c)
		}
		if uses && parts[2] != want {
			t.Errorf("%s: in %s, want %s", l, parts[2], want)
		}
		if !rt.Cgroups.V2() && !uses && parts[2] == want {
			t.Errorf("%s: a hierarchy the manager does not use has the group", l)
		}
		if slices.Contains(ctls, "devices") {
			list, err := os.ReadFile(filepath.Join("/sys/fs/cgroup/devices", parts[2], "devices.list"))
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(string(list), "a *:* rwm") || !strings.Contains(string(list), "c 1:3 rwm") {
				t.Errorf("devices.list:\n%s\nwant runc's defaults only", list)
			}
		}
	}
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	wait(t, p)
	expectNoGroups(t, rt)
	expectNoGroupsAnywhere(t, rt)
}
