package cgroup

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	cgroups "github.com/containerd/cgroups/v3"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// newTestManager returns a Manager whose root is unique to the test, and
// checks at the end that nothing of it is left in any hierarchy.
func newTestManager(t *testing.T) *Manager {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: cgroup tests need root")
	}
	if cgroups.Mode() == cgroups.Unavailable {
		t.Skip("skipping: no cgroup filesystem at /sys/fs/cgroup")
	}
	top := fmt.Sprintf("shimtest-%d-%s", os.Getpid(), strings.ReplaceAll(t.Name(), "/", "_"))
	m, err := NewManager(top + "/node")
	if err != nil {
		t.Fatalf("NewManager: %v", err)
	}
	t.Cleanup(func() {
		names, _ := m.List()
		for _, n := range names {
			if g, err := m.Open(n); err == nil {
				_ = g.Kill()
				_ = g.Delete()
			}
		}
		for _, d := range mountDirs(m) {
			if _, err := os.Stat(filepath.Join(d, top)); err == nil {
				t.Errorf("%s left behind", filepath.Join(d, top))
				_ = os.RemoveAll(filepath.Join(d, top, "node"))
				_ = os.Remove(filepath.Join(d, top))
			}
		}
	})
	return m
}

func mountDirs(m *Manager) []string {
	if m.v2 {
		return []string{v2Mount}
	}
	return uniqueDirs(m.ctls, ".")
}

// file returns the path of a control file of g; for v1, ctl picks the
// hierarchy.
func file(t *testing.T, g *Group, ctl, name string) string {
	t.Helper()
	if g.m.v2 {
		return filepath.Join(g.dir, name)
	}
	for _, c := range g.ctls {
		if string(c.name) == ctl {
			return filepath.Join(c.dir, g.rel, name)
		}
	}
	t.Skipf("skipping: v1 controller %s not mounted", ctl)
	return ""
}

func expectFile(t *testing.T, g *Group, ctl, name, want string) {
	t.Helper()
	p := file(t, g, ctl, name)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Errorf("read %s: %v", p, err)
		return
	}
	if got := strings.TrimSpace(string(b)); got != want {
		t.Errorf("%s = %q, want %q", p, got, want)
	}
}

func expectLimits(t *testing.T, g *Group, r Resources) {
	t.Helper()
	if g.m.v2 {
		v := MapV2(r)
		expectFile(t, g, "", "cpu.weight", strconv.FormatUint(v.CPUWeight, 10))
		expectFile(t, g, "", "cpu.max", v.CPUMax)
		expectFile(t, g, "", "cpu.max.burst", strconv.FormatUint(v.CPUMaxBurst, 10))
		expectFile(t, g, "", "memory.min", strconv.FormatUint(v.MemoryMin, 10))
		expectFile(t, g, "", "memory.max", v.MemoryMax)
		expectFile(t, g, "", "pids.max", v.PidsMax)
		return
	}
	v := MapV1(r)
	unlimited := func(n int64) string {
		if n < 0 {
			return "9223372036854771712" // the kernel's page-aligned "unlimited"
		}
		return strconv.FormatInt(n, 10)
	}
	expectFile(t, g, "cpu", "cpu.shares", strconv.FormatUint(v.CPUShares, 10))
	expectFile(t, g, "cpu", "cpu.cfs_period_us", strconv.FormatUint(v.CPUCfsPeriodUs, 10))
	expectFile(t, g, "cpu", "cpu.cfs_quota_us", strconv.FormatInt(v.CPUCfsQuotaUs, 10))
	if _, err := os.Stat(file(t, g, "cpu", "cpu.cfs_burst_us")); err == nil {
		expectFile(t, g, "cpu", "cpu.cfs_burst_us", strconv.FormatUint(v.CPUCfsBurstUs, 10))
	}
	expectFile(t, g, "memory", "memory.limit_in_bytes", unlimited(v.MemoryLimit))
	expectFile(t, g, "memory", "memory.soft_limit_in_bytes", unlimited(v.MemorySoftLimit))
	pids := "max"
	if v.PidsMax > 0 {
		pids = strconv.FormatInt(v.PidsMax, 10)
	}
	expectFile(t, g, "pids", "pids.max", pids)
}

func expectGone(t *testing.T, m *Manager) {
	t.Helper()
	top := strings.Split(m.root, "/")[0]
	for _, d := range mountDirs(m) {
		if _, err := os.Stat(filepath.Join(d, top)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still exists after the last Delete (err=%v)", filepath.Join(d, top), err)
		}
	}
}

func TestCreateUpdateDelete(t *testing.T) {
	m := newTestManager(t)
	r := Resources{CPUMinMilli: 500, CPUMaxMilli: 1500, CPUBurstMilli: 300, MemMinBytes: 32 << 20, MemMaxBytes: 256 << 20, PidsMax: 64}
	g, err := m.Create("w.1", r)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	expectLimits(t, g, r)

	// Shrink the quota below the current burst: needs the burst reset first.
	r2 := Resources{CPUMinMilli: 2000, CPUMaxMilli: 100, CPUBurstMilli: 50, MemMaxBytes: 64 << 20, PidsMax: 8}
	if err := g.Update(r2); err != nil {
		t.Fatalf("Update: %v", err)
	}
	expectLimits(t, g, r2)

	// Unset everything: every limit is lifted again.
	if err := g.Update(Resources{}); err != nil {
		t.Fatalf("Update to unset: %v", err)
	}
	expectLimits(t, g, Resources{})

	if err := g.Delete(); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	expectGone(t, m)
	if err := g.Update(r); !errors.Is(err, ErrNotFound) {
		t.Errorf("Update after Delete: got %v, want ErrNotFound", err)
	}
	expectGone(t, m) // and Update did not resurrect it
	if err := g.Delete(); err != nil {
		t.Errorf("second Delete: %v", err)
	}
}

func TestCreateOpenList(t *testing.T) {
	m := newTestManager(t)
	if _, err := m.Open("nope.1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Open missing: got %v, want ErrNotFound", err)
	}
	if names, err := m.List(); err != nil || len(names) != 0 {
		t.Fatalf("List before create = %v, %v; want empty", names, err)
	}
	a, err := m.Create("a.1", Resources{PidsMax: 10})
	if err != nil {
		t.Fatal(err)
	}
	b, err := m.Create("b.2", Resources{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Create("a.1", Resources{}); !errors.Is(err, ErrExists) {
		t.Errorf("Create duplicate: got %v, want ErrExists", err)
	}
	for _, bad := range []string{"", ".", "..", "a/b"} {
		if _, err := m.Create(bad, Resources{}); !errors.Is(err, ErrInvalid) {
			t.Errorf("Create(%q): got %v, want ErrInvalid", bad, err)
		}
	}
	names, err := m.List()
	if err != nil || !slices.Equal(names, []string{"a.1", "b.2"}) {
		t.Fatalf("List = %v, %v; want [a.1 b.2]", names, err)
	}
	o, err := m.Open("a.1")
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	if o.Name() != "a.1" || o.Path() != "/"+m.root+"/a.1" {
		t.Errorf("Name, Path = %q, %q", o.Name(), o.Path())
	}
	if err := o.Update(Resources{PidsMax: 20}); err != nil {
		t.Fatalf("Update via Open: %v", err)
	}
	expectLimits(t, a, Resources{PidsMax: 20})
	if err := a.Delete(); err != nil {
		t.Fatal(err)
	}
	// b still exists, so the parents must stay.
	if names, _ := m.List(); !slices.Equal(names, []string{"b.2"}) {
		t.Errorf("List after deleting a.1 = %v", names)
	}
	if err := b.Delete(); err != nil {
		t.Fatal(err)
	}
	expectGone(t, m)
}

func TestNewManagerRejectsBadRoots(t *testing.T) {
	for _, root := range []string{"", "/abs", ".", "..", "../x"} {
		if _, err := NewManager(root); !errors.Is(err, ErrInvalid) {
			t.Errorf("NewManager(%q): got %v, want ErrInvalid", root, err)
		}
	}
}

// spawn starts argv in g through Spawn and returns its pid.
func spawn(t *testing.T, g *Group, argv ...string) int {
	t.Helper()
	var pid int
	err := g.Spawn(func(fd int) error {
		attr := &syscall.ProcAttr{Env: []string{}, Files: []uintptr{0, 1, 2},
			Sys: &syscall.SysProcAttr{UseCgroupFD: fd >= 0, CgroupFD: fd}}
		var err error
		pid, err = syscall.ForkExec(argv[0], argv, attr)
		return err
	})
	if err != nil {
		t.Fatalf("Spawn %v: %v", argv, err)
	}
	t.Cleanup(func() {
		_ = syscall.Kill(pid, syscall.SIGKILL)
		var ws syscall.WaitStatus
		_, _ = syscall.Wait4(pid, &ws, 0, nil)
	})
	return pid
}

func reap(t *testing.T, pid int) syscall.WaitStatus {
	t.Helper()
	var ws syscall.WaitStatus
	if _, err := syscall.Wait4(pid, &ws, 0, nil); err != nil {
		t.Fatalf("wait %d: %v", pid, err)
	}
	return ws
}

func TestSpawnKillDelete(t *testing.T) {
	m := newTestManager(t)
	// pids.max = 1: the fork only works because Spawn lends the extra slot
	// for the borrowed thread.
	r := Resources{PidsMax: 1, MemMaxBytes: 64 << 20}
	g, err := m.Create("s.1", r)
	if err != nil {
		t.Fatal(err)
	}
	pid := spawn(t, g, "/bin/sleep", "60")
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		parts := strings.SplitN(line, ":", 3)
		ctls := strings.Split(parts[1], ",")
		want := m.v2 && parts[1] == ""
		for _, c := range g.ctls {
			want = want || slices.Contains(ctls, string(c.name))
		}
		if want && parts[2] != g.Path() {
			t.Errorf("child cgroup line %q, want path %s", line, g.Path())
		}
	}
	expectLimits(t, g, r) // pids.max is back to 1
	if !m.v2 {
		// The OOM killer is re-enabled once the borrowed thread is out.
		if b, _ := os.ReadFile(file(t, g, "memory", "memory.oom_control")); !strings.Contains(string(b), "oom_kill_disable 0") {
			t.Errorf("memory.oom_control after Spawn:\n%s", b)
		}
	}
	procs, err := g.Procs()
	if err != nil || !slices.Equal(procs, []int{pid}) {
		t.Fatalf("Procs = %v, %v; want [%d] (no agent thread left inside)", procs, err, pid)
	}
	// No thread of this test process may have stayed in the group.
	tasks, _ := filepath.Glob("/proc/self/task/*/cgroup")
	for _, tf := range tasks {
		b, _ := os.ReadFile(tf)
		if strings.Contains(string(b), g.Path()) {
			t.Errorf("%s still in the group:\n%s", tf, b)
		}
	}
	u, err := g.Stats()
	if err != nil {
		t.Fatalf("Stats: %v", err)
	}
	if u.PidsCurrent != 1 || u.MemoryBytes == 0 {
		t.Errorf("Stats = %+v, want 1 pid and some memory", u)
	}
	if cpu, mem, err := g.Sample(); err != nil || mem == 0 || cpu < u.CPUUsageNanos {
		t.Errorf("Sample = %d, %d, %v; want some memory and at least Stats' cpu %d", cpu, mem, err, u.CPUUsageNanos)
	}
	deleteTimeout = 50 * time.Millisecond
	err = g.Delete()
	deleteTimeout = 5 * time.Second
	if !errors.Is(err, ErrBusy) {
		t.Errorf("Delete with a live process: got %v, want ErrBusy", err)
	}

	if err := g.Kill(); err != nil {
		t.Fatalf("Kill: %v", err)
	}
	if ws := reap(t, pid); ws.Signal() != syscall.SIGKILL {
		t.Errorf("child status %v, want SIGKILL", ws)
	}
	if err := g.Delete(); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	expectGone(t, m)
	if _, _, err := g.Sample(); !errors.Is(err, ErrNotFound) {
		t.Errorf("Sample after Delete: %v, want ErrNotFound", err)
	}
}

func TestKillManyForkingProcesses(t *testing.T) {
	m := newTestManager(t)
	g, err := m.Create("k.1", Resources{PidsMax: 200})
	if err != nil {
		t.Fatal(err)
	}
	// A shell that keeps forking short-lived children.
	pid := spawn(t, g, "/bin/sh", "-c", "while :; do /bin/sleep 30 & done")
	if err := poll(5*time.Second, func() (bool, error) {
		p, err := g.Procs()
		return len(p) > 10, err
	}); err != nil {
		t.Fatalf("waiting for the shell to fork: %v", err)
	}
	if err := g.Kill(); err != nil {
		t.Fatalf("Kill: %v", err)
	}
	reap(t, pid)
	if err := g.Delete(); err != nil { // waits for the orphans to exit
		t.Fatalf("Delete: %v", err)
	}
	expectGone(t, m)
}

// TestSetPidsMaxAndExtraHierarchies covers SetPidsMax, and that Delete also
// removes a group that a container runtime created in the hierarchies the
// Manager does not use itself (v1).
func TestSetPidsMaxAndExtraHierarchies(t *testing.T) {
	m := newTestManager(t)
	g, err := m.Create("x.1", Resources{PidsMax: 7, MemMaxBytes: 32 << 20})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		n    int64
		want string
	}{{5, "5"}, {0, "max"}, {9, "9"}} {
		if err := g.SetPidsMax(c.n); err != nil {
			t.Fatalf("SetPidsMax(%d): %v", c.n, err)
		}
		expectFile(t, g, "pids", "pids.max", c.want)
	}
	expectFile(t, g, "memory", "memory.limit_in_bytes", strconv.Itoa(32<<20)) // untouched
	if err := g.SetPidsMax(-1); !errors.Is(err, ErrInvalid) {
		t.Errorf("SetPidsMax(-1): %v, want ErrInvalid", err)
	}
	var extra []string
	for _, x := range m.extra {
		d := filepath.Join(x, g.rel)
		if err := os.MkdirAll(d, 0o755); err == nil {
			extra = append(extra, d)
		}
	}
	if !m.v2 && len(extra) == 0 {
		t.Log("no other v1 hierarchy mounted: only SetPidsMax checked")
	}
	if err := g.Delete(); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	for _, d := range extra {
		if _, err := os.Stat(d); err == nil {
			t.Errorf("%s left behind", d)
		}
		top := filepath.Dir(filepath.Dir(d))
		if _, err := os.Stat(top); err == nil {
			t.Errorf("%s left behind", top)
			_ = os.RemoveAll(top)
		}
	}
	expectGone(t, m)
}

// TestCreateDevices checks a container's group on v1: it also lives in the
// devices hierarchy, where only the given rules allow anything, and Delete
// removes it there too.
func TestCreateDevices(t *testing.T) {
	m := newTestManager(t)
	one, three := int64(1), int64(3)
	g, err := m.CreateDevices("c.1", Resources{PidsMax: 5}, []specs.LinuxDeviceCgroup{
		{Allow: true, Type: "c", Major: &one, Minor: &three, Access: "rwm"},
		{Allow: true, Type: "b", Access: "m"},
	})
	if !m.v2 && m.devCtls == nil {
		if !errors.Is(err, ErrUnsupported) {
			t.Fatalf("CreateDevices without a devices hierarchy: %v, want ErrUnsupported", err)
		}
		return
	}
	if err != nil {
		t.Fatalf("CreateDevices: %v", err)
	}
	expectFile(t, g, "pids", "pids.max", "5")
	if m.v2 {
		t.Log("v2: CreateDevices is Create")
	} else {
		expectFile(t, g, "devices", "devices.list", "c 1:3 rwm\nb *:* m")
	}
	if err := g.Update(Resources{PidsMax: 6}); err != nil {
		t.Fatalf("Update: %v", err)
	}
	expectFile(t, g, "pids", "pids.max", "6")
	if err := g.Delete(); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	expectGone(t, m)
	if m.devCtls != nil {
		top := strings.Split(m.root, "/")[0]
		for _, c := range m.devCtls {
			if _, err := os.Stat(filepath.Join(c.dir, top)); err == nil {
				t.Errorf("%s left behind", filepath.Join(c.dir, top))
			}
		}
	}
}

// TestUpdateWritesChangesOnly checks that an Update rewrites only the files
// whose values change, and that a group found with Open, whose values are
// not known, gets every file written.
func TestUpdateWritesChangesOnly(t *testing.T) {
	m := newTestManager(t)
	if m.v2 {
		t.Skip("v1 only (the files are written the same way on v2)")
	}
	r := Resources{CPUMinMilli: 500, MemMaxBytes: 64 << 20, PidsMax: 10}
	g, err := m.Create("u.1", r)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Delete()
	// Change a file behind the Group's back; an Update of pids alone must
	// leave it as it is.
	if err := os.WriteFile(file(t, g, "memory", "memory.limit_in_bytes"), []byte(strconv.Itoa(96<<20)), 0); err != nil {
		t.Fatal(err)
	}
	r.PidsMax = 11
	if err := g.Update(r); err != nil {
		t.Fatal(err)
	}
	expectFile(t, g, "pids", "pids.max", "11")
	expectFile(t, g, "memory", "memory.limit_in_bytes", strconv.Itoa(96<<20))
	o, err := m.Open("u.1")
	if err != nil {
		t.Fatal(err)
	}
	if err := o.Update(r); err != nil {
		t.Fatal(err)
	}
	expectLimits(t, o, r)
}

// TestV2ThroughCgroup2 drives the v2 code on a fake unified mount (plain
// files in a temporary directory; this host has no usable v2): Create,
// Update and Open write the values MapV2 gives, through cgroup2's Manager
// where it has a field for them.
func TestV2ThroughCgroup2(t *testing.T) {
	mount := t.TempDir()
	m := &Manager{root: "shim/n", v2: true, mount: mount}
	for _, d := range []string{"", "shim", "shim/n"} {
		if err := os.MkdirAll(filepath.Join(mount, d), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(mount, d, "cgroup.controllers"), []byte("cpuset cpu io memory pids\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	read := func(g *Group, f string) string {
		b, err := os.ReadFile(filepath.Join(g.dir, f))
		if err != nil {
			return "<" + err.Error() + ">"
		}
		return strings.TrimSpace(string(b))
	}
	expect := func(g *Group, r Resources) {
		t.Helper()
		v := MapV2(r)
		for f, want := range map[string]string{
			"cpu.weight": strconv.FormatUint(v.CPUWeight, 10), "cpu.max": v.CPUMax,
			"cpu.max.burst": strconv.FormatUint(v.CPUMaxBurst, 10), "memory.min": strconv.FormatUint(v.MemoryMin, 10),
			"memory.max": v.MemoryMax, "pids.max": v.PidsMax,
		} {
			if got := read(g, f); got != want {
				t.Errorf("%s = %s, want %s", f, got, want)
			}
		}
	}
	r := Resources{CPUMinMilli: 250, CPUMaxMilli: 500, CPUBurstMilli: 100, MemMinBytes: 8 << 20, MemMaxBytes: 64 << 20, PidsMax: 20}
	g, err := m.Create("w.1", r)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	expect(g, r)
	for _, d := range []string{"", "shim"} {
		if got := read(&Group{dir: filepath.Join(mount, d)}, "cgroup.subtree_control"); got != "+cpu +memory +pids" {
			t.Errorf("%s/cgroup.subtree_control = %q", d, got)
		}
	}
	if _, err := m.Create("w.1", r); !errors.Is(err, ErrExists) {
		t.Errorf("second Create: %v, want ErrExists", err)
	}
	r2 := Resources{CPUMinMilli: 2000, PidsMax: 5}
	if err := g.Update(r2); err != nil {
		t.Fatalf("Update: %v", err)
	}
	expect(g, r2)
	if err := g.SetPidsMax(0); err != nil {
		t.Fatalf("SetPidsMax: %v", err)
	}
	r2.PidsMax = 0
	expect(g, r2)
	o, err := m.Open("w.1")
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	if err := o.Update(r); err != nil {
		t.Fatalf("Update after Open: %v", err)
	}
	expect(o, r)
}
