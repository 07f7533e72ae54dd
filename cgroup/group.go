package cgroup

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/cgroups/v3/cgroup1"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// Group is one process's cgroup below a Manager's root.
type Group struct {
	m    *Manager
	name string
	rel  string         // m.root/name, relative to each mount
	dir  string         // v2: absolute directory
	ctls []controller   // v1: the hierarchies the group lives in
	cg   cgroup1.Cgroup // v1

	mu sync.Mutex // serializes Update and Spawn, which both write pids.max
}

// Name returns the group's name below the manager root.
func (g *Group) Name() string { return g.name }

// Path returns the group's path relative to the cgroup mount, as it appears
// in /proc/PID/cgroup (with a leading "/").
func (g *Group) Path() string { return "/" + g.rel }

// dirs returns the group's directory in every distinct hierarchy.
func (g *Group) dirs() []string {
	if g.m.v2 {
		return []string{g.dir}
	}
	return uniqueDirs(g.ctls, g.rel)
}

// ctlDir returns the group's directory in the v1 hierarchy n.
func (g *Group) ctlDir(n cgroup1.Name) (string, bool) {
	for _, c := range g.ctls {
		if c.name == n {
			return filepath.Join(c.dir, g.rel), true
		}
	}
	return "", false
}

// exists returns an error wrapping ErrNotFound if the group is gone.
func (g *Group) exists() error {
	d := g.dir
	if !g.m.v2 {
		if len(g.ctls) == 0 {
			return ErrNotFound
		}
		d = filepath.Join(g.ctls[0].dir, g.rel)
	}
	if _, err := os.Stat(d); err != nil {
		return notFound(err)
	}
	return nil
}

// Update applies r to the live group in place; running processes stay.
// Unset fields lift the corresponding limit. Lowering the memory limit
// below current usage fails if the kernel cannot reclaim enough.
func (g *Group) Update(r Resources) error {
	if err := r.Validate(); err != nil {
		return fmt.Errorf("update cgroup %s: %w", g.name, err)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	// The v1 library recreates missing directories on update; refuse
	// instead of resurrecting a deleted group.
	if err := g.exists(); err != nil {
		return fmt.Errorf("update cgroup %s: %w", g.name, err)
	}
	var err error
	if g.m.v2 {
		err = g.updateV2(r)
	} else {
		err = g.updateV1(r)
	}
	if err != nil {
		return fmt.Errorf("update cgroup %s: %w", g.name, notFound(err))
	}
	return nil
}

// spec converts v for cgroup1. With fresh set (a just-made group) values
// equal to the kernel's defaults for a new group are left out, saving writes.
func (v V1) spec(fresh bool) *specs.LinuxResources {
	r := &specs.LinuxResources{
		CPU:    &specs.LinuxCPU{Shares: &v.CPUShares},
		Memory: &specs.LinuxMemory{},
	}
	if !fresh || v.CPUCfsQuotaUs > 0 {
		r.CPU.Period, r.CPU.Quota = &v.CPUCfsPeriodUs, &v.CPUCfsQuotaUs
	}
	if !fresh || v.MemoryLimit > 0 {
		r.Memory.Limit = &v.MemoryLimit
	}
	if !fresh || v.MemorySoftLimit > 0 {
		r.Memory.Reservation = &v.MemorySoftLimit
	}
	return r
}

func (g *Group) createV1(r Resources) error {
	v := MapV1(r)
	cg, err := cgroup1.New(cgroup1.StaticPath(g.rel), v.spec(true), cgroup1.WithHierarchy(g.m.hier))
	if err != nil {
		return err
	}
	g.cg = cg
	return g.writeV1Extras(v, true)
}

func (g *Group) updateV1(r Resources) error {
	v := MapV1(r)
	// The kernel rejects a quota below the current burst: drop the burst
	// first and set the new one after the quota.
	if d, ok := g.ctlDir(cgroup1.Cpu); ok {
		if err := writeFile(d, "cpu.cfs_burst_us", "0"); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	if err := g.cg.Update(v.spec(false)); err != nil {
		return err
	}
	return g.writeV1Extras(v, false)
}

// writeV1Extras writes what cgroup1 has no field for: the CFS burst, and a
// pids.max that may need resetting to "max". fresh is as for V1.spec.
func (g *Group) writeV1Extras(v V1, fresh bool) error {
	if d, ok := g.ctlDir(cgroup1.Cpu); ok && (!fresh || v.CPUCfsBurstUs > 0) {
		err := writeFile(d, "cpu.cfs_burst_us", strconv.FormatUint(v.CPUCfsBurstUs, 10))
		if err != nil && !(errors.Is(err, fs.ErrNotExist) && v.CPUCfsBurstUs == 0) {
			return err
		}
	}
	if d, ok := g.ctlDir(cgroup1.Pids); ok && (!fresh || v.PidsMax > 0) {
		val := "max"
		if v.PidsMax > 0 {
			val = strconv.FormatInt(v.PidsMax, 10)
		}
		if err := writeFile(d, "pids.max", val); err != nil {
			return err
		}
	}
	return nil
}

// SetPidsMax sets only the task limit (0 = unlimited), leaving the other
// limits as they are.
func (g *Group) SetPidsMax(n int64) error {
	if n < 0 {
		return fmt.Errorf("set pids.max of cgroup %s: %d: %w", g.name, n, ErrInvalid)
	}
	val := "max"
	if n > 0 {
		val = strconv.FormatInt(n, 10)
	}
	dir, ok := g.dir, g.m.v2
	if !ok {
		dir, ok = g.ctlDir(cgroup1.Pids)
	}
	if !ok {
		return nil // no pids controller: nothing to limit
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if err := writeFile(dir, "pids.max", val); err != nil {
		return fmt.Errorf("set pids.max of cgroup %s: %w", g.name, notFound(err))
	}
	return nil
}

func (g *Group) updateV2(r Resources) error {
	v := MapV2(r)
	for _, f := range []struct {
		file, val string
		unset     bool // the value lifts the limit, so a missing file is fine
	}{
		{"cpu.weight", strconv.FormatUint(v.CPUWeight, 10), r.CPUMinMilli == 0},
		{"cpu.max.burst", "0", true},
		{"cpu.max", v.CPUMax, r.CPUMaxMilli == 0},
		{"cpu.max.burst", strconv.FormatUint(v.CPUMaxBurst, 10), v.CPUMaxBurst == 0},
		{"memory.min", strconv.FormatUint(v.MemoryMin, 10), v.MemoryMin == 0},
		{"memory.max", v.MemoryMax, r.MemMaxBytes == 0},
		{"pids.max", v.PidsMax, r.PidsMax == 0},
	} {
		if err := writeFile(g.dir, f.file, f.val); err != nil && !(f.unset && errors.Is(err, fs.ErrNotExist)) {
			return err
		}
	}
	return nil
}

// Procs returns the PIDs of all processes in the group (and any sub-groups
// a workload made), sorted.
func (g *Group) Procs() ([]int, error) {
	pids, err := g.procs()
	if err != nil {
		return nil, fmt.Errorf("list processes of cgroup %s: %w", g.name, notFound(err))
	}
	return pids, nil
}

func (g *Group) procs() ([]int, error) {
	var pids []int
	if g.m.v2 {
		err := filepath.WalkDir(g.dir, func(p string, d fs.DirEntry, err error) error {
			if err != nil || !d.IsDir() {
				return err
			}
			ps, err := readPids(filepath.Join(p, "cgroup.procs"))
			pids = append(pids, ps...)
			return err
		})
		if err != nil {
			return nil, err
		}
	} else {
		if g.cg == nil || len(g.ctls) == 0 {
			return nil, ErrNotFound
		}
		// Any hierarchy has the full membership; prefer pids, then memory.
		ctl := g.ctls[0].name
		for _, n := range []cgroup1.Name{cgroup1.Memory, cgroup1.Pids} {
			if _, ok := g.ctlDir(n); ok {
				ctl = n
			}
		}
		ps, err := g.cg.Processes(ctl, true)
		if err != nil {
			return nil, err
		}
		for _, p := range ps {
			pids = append(pids, p.Pid)
		}
	}
	slices.Sort(pids)
	return slices.Compact(pids), nil
}

// Usage is a snapshot of a group's resource consumption.
type Usage struct {
	CPUUsageNanos uint64 // total CPU time consumed
	MemoryBytes   uint64 // current memory charge
	PidsCurrent   uint64 // current number of tasks
	OOMKills      uint64 // processes killed by the OOM killer in this group
}

// Stats returns the group's current usage. Counters of controllers that are
// not available read as zero.
func (g *Group) Stats() (Usage, error) {
	u, err := g.stats()
	if err != nil {
		return Usage{}, fmt.Errorf("stats of cgroup %s: %w", g.name, notFound(err))
	}
	return u, nil
}

func (g *Group) stats() (Usage, error) {
	if err := g.exists(); err != nil {
		return Usage{}, err
	}
	var u Usage
	if g.m.v2 {
		cpu, err := readKV(filepath.Join(g.dir, "cpu.stat"))
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return u, err
		}
		ev, err := readKV(filepath.Join(g.dir, "memory.events"))
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return u, err
		}
		u.CPUUsageNanos = cpu["usage_usec"] * 1000
		u.OOMKills = ev["oom_kill"]
		u.MemoryBytes, _ = readUint(filepath.Join(g.dir, "memory.current"))
		u.PidsCurrent, _ = readUint(filepath.Join(g.dir, "pids.current"))
		return u, nil
	}
	// Four small files rather than the library's Stat, which reads every
	// controller's full statistics (memory.stat and more): usage is sampled
	// for every process every few seconds.
	if dir, ok := g.ctlDir(cgroup1.Cpuacct); ok {
		u.CPUUsageNanos, _ = readUint(filepath.Join(dir, "cpuacct.usage"))
	}
	if dir, ok := g.ctlDir(cgroup1.Memory); ok {
		u.MemoryBytes, _ = readUint(filepath.Join(dir, "memory.usage_in_bytes"))
		if kv, err := readKV(filepath.Join(dir, "memory.oom_control")); err == nil {
			u.OOMKills = kv["oom_kill"]
		}
	}
	if dir, ok := g.ctlDir(cgroup1.Pids); ok {
		u.PidsCurrent, _ = readUint(filepath.Join(dir, "pids.current"))
	}
	return u, nil
}

// Kill sends SIGKILL to every process in the group and returns once they
// have all been signalled (not necessarily reaped). On v2 it uses
// cgroup.kill when the kernel has it. Otherwise the group is frozen first so
// that nothing can fork behind the kill, then thawed so the kills land; a
// listing/killing loop covers a missing or stuck freezer.
func (g *Group) Kill() error {
	if g.m.v2 {
		err := writeFile(g.dir, "cgroup.kill", "1")
		if err == nil {
			return nil
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("kill cgroup %s: %w", g.name, err)
		}
		if err := g.exists(); err != nil {
			return fmt.Errorf("kill cgroup %s: %w", g.name, err)
		}
	}
	frozen := g.freeze()
	// Never the agent itself: Spawn's borrowed thread may be inside.
	seen := map[int]bool{os.Getpid(): true}
	for range 100 {
		pids, err := g.procs()
		if err != nil {
			if frozen {
				g.thaw()
			}
			return fmt.Errorf("kill cgroup %s: %w", g.name, notFound(err))
		}
		fresh := 0
		for _, pid := range pids {
			if !seen[pid] {
				seen[pid] = true
				fresh++
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		if frozen {
			g.thaw()
			frozen = false
			continue // one more listing to catch anything forked mid-freeze
		}
		if fresh == 0 {
			return nil
		}
	}
	return fmt.Errorf("kill cgroup %s: processes keep appearing: %w", g.name, ErrBusy)
}

const freezeTimeout = time.Second

// freeze freezes the group, reporting whether it is now frozen. It gives up
// (and thaws) after freezeTimeout, e.g. when a task is stuck in the kernel.
func (g *Group) freeze() bool {
	dir, file, on, done := g.dir, "cgroup.freeze", "1", "frozen 1"
	if !g.m.v2 {
		var ok bool
		if dir, ok = g.ctlDir(cgroup1.Freezer); !ok {
			return false
		}
		file, on, done = "freezer.state", "FROZEN", "FROZEN"
	}
	if writeFile(dir, file, on) != nil {
		return false
	}
	err := poll(freezeTimeout, func() (bool, error) {
		if g.m.v2 {
			b, err := os.ReadFile(filepath.Join(dir, "cgroup.events"))
			return bytes.Contains(b, []byte(done)), err
		}
		b, err := os.ReadFile(filepath.Join(dir, file))
		// Rewriting FROZEN makes the v1 freezer retry tasks it missed.
		if err == nil && strings.TrimSpace(string(b)) != done {
			_ = writeFile(dir, file, on)
		}
		return strings.TrimSpace(string(b)) == done, err
	})
	if err != nil {
		g.thaw()
		return false
	}
	return true
}

func (g *Group) thaw() {
	if g.m.v2 {
		_ = writeFile(g.dir, "cgroup.freeze", "0")
	} else if dir, ok := g.ctlDir(cgroup1.Freezer); ok {
		_ = writeFile(dir, "freezer.state", "THAWED")
	}
}

// deleteTimeout bounds how long Delete waits for exiting processes.
var deleteTimeout = 5 * time.Second

// Delete removes the group from every hierarchy (on v1 also from those the
// Manager does not use, where a container runtime may have created it), then
// removes the parents that are left empty, up to but not including the
// cgroup mount. It waits
// (up to 5s) for exiting processes to leave, and fails with ErrBusy if
// processes remain; call Kill first. Deleting a deleted group is a no-op.
func (g *Group) Delete() error {
	err := poll(deleteTimeout, func() (bool, error) {
		pids, err := g.procs()
		return len(pids) == 0, err
	})
	if err != nil && !errors.Is(notFound(err), ErrNotFound) {
		if errors.Is(err, errTimeout) {
			err = ErrBusy
		}
		return fmt.Errorf("delete cgroup %s: %w", g.name, err)
	}
	g.m.mu.Lock()
	defer g.m.mu.Unlock()
	var errs []error
	dirs := g.dirs()
	for _, x := range g.m.extra {
		dirs = append(dirs, filepath.Join(x, g.rel))
	}
	for _, d := range dirs {
		err := poll(deleteTimeout, func() (bool, error) {
			err := os.Remove(d)
			if errors.Is(err, syscall.EBUSY) {
				return false, nil // a task is still on its way out
			}
			return true, err
		})
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("delete cgroup %s: %w: %w", g.name, ErrBusy, errors.Join(errs...))
	}
	g.m.removeParents()
	return nil
}

var errTimeout = errors.New("timed out")

// poll calls cond with growing pauses (1ms to 50ms) until it reports true or
// fails, or until timeout has passed.
func poll(timeout time.Duration, cond func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	pause := time.Millisecond
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return errTimeout
		}
		time.Sleep(pause)
		pause = min(pause*2, 50*time.Millisecond)
	}
}

func writeFile(dir, file, val string) error {
	return os.WriteFile(filepath.Join(dir, file), []byte(val), 0)
}

func readPids(path string) ([]int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		pid, err := strconv.Atoi(f)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		pids = append(pids, pid)
	}
	return pids, nil
}

func readUint(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	return strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
}

func readKV(path string) (map[string]uint64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := map[string]uint64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), " "); ok {
			if n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64); err == nil {
				out[k] = n
			}
		}
	}
	return out, sc.Err()
}
