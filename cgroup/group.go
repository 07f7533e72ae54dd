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
	"github.com/containerd/cgroups/v3/cgroup2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// Group is one process's cgroup below a Manager's root.
type Group struct {
	m    *Manager
	name string
	rel  string           // m.root/name, relative to each mount
	dir  string           // v2: absolute directory
	ctls []controller     // v1: the hierarchies the group lives in
	cg   cgroup1.Cgroup   // v1
	cg2  *cgroup2.Manager // v2
	// counted: made by Create and not deleted yet, so in the Manager's
	// live count (guarded by the Manager's mu).
	counted bool

	mu sync.Mutex // serializes Update and Spawn, which both write pids.max
	// v1 or v2 (per the Manager) hold the values last written to the
	// group's files, if known: set by Create and every successful Update,
	// so that an Update writes only what changes and Spawn reads nothing.
	// Unknown for a group found with Open until its first Update.
	known bool
	v1    V1
	v2    V2
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

// v1New are the values of a new v1 group: what Create need not write.
var v1New = V1{CPUShares: 1024, CPUCfsPeriodUs: CFSPeriodUs, CPUCfsQuotaUs: -1, MemoryLimit: -1, MemorySoftLimit: -1, PidsMax: -1}

// spec converts v for cgroup1, leaving out the values equal to prev's (nil:
// none), which are in the files already.
func (v V1) spec(prev *V1) *specs.LinuxResources {
	r := &specs.LinuxResources{CPU: &specs.LinuxCPU{}, Memory: &specs.LinuxMemory{}}
	if prev == nil || v.CPUShares != prev.CPUShares {
		r.CPU.Shares = &v.CPUShares
	}
	if prev == nil || v.CPUCfsPeriodUs != prev.CPUCfsPeriodUs {
		r.CPU.Period = &v.CPUCfsPeriodUs
	}
	if prev == nil || v.CPUCfsQuotaUs != prev.CPUCfsQuotaUs {
		r.CPU.Quota = &v.CPUCfsQuotaUs
	}
	if prev == nil || v.MemoryLimit != prev.MemoryLimit {
		r.Memory.Limit = &v.MemoryLimit
	}
	if prev == nil || v.MemorySoftLimit != prev.MemorySoftLimit {
		r.Memory.Reservation = &v.MemorySoftLimit
	}
	if v.PidsMax > 0 && (prev == nil || v.PidsMax != prev.PidsMax) {
		r.Pids = &specs.LinuxPids{Limit: &v.PidsMax} // "max" is an extra
	}
	return r
}

func (g *Group) createV1(r Resources, devices []specs.LinuxDeviceCgroup) error {
	v := MapV1(r)
	spec, hier := v.spec(&v1New), g.m.hier
	if devices != nil {
		spec.Devices, hier = devices, g.m.devHier
	}
	cg, err := cgroup1.New(cgroup1.StaticPath(g.rel), spec, cgroup1.WithHierarchy(hier))
	if err != nil {
		return err
	}
	g.cg = cg
	if err := g.writeV1Extras(v, &v1New); err != nil {
		return err
	}
	g.v1, g.known = v, true
	return nil
}

// updateV1 writes the values of r that differ from those last written, or
// all of them if those are unknown.
func (g *Group) updateV1(r Resources) error {
	v := MapV1(r)
	var prev *V1
	if g.known {
		prev = &g.v1
	}
	g.known = false // until every write has succeeded
	// The kernel rejects a quota below the current burst: drop the burst
	// first and set the new one after the quota.
	if d, ok := g.ctlDir(cgroup1.Cpu); ok && (prev == nil || prev.CPUCfsBurstUs > 0 &&
		(v.CPUCfsQuotaUs != prev.CPUCfsQuotaUs || v.CPUCfsBurstUs != prev.CPUCfsBurstUs)) {
		if err := writeFile(d, "cpu.cfs_burst_us", "0"); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		if prev != nil {
			p := *prev
			p.CPUCfsBurstUs, prev = 0, &p
		}
	}
	if err := g.cg.Update(v.spec(prev)); err != nil {
		return err
	}
	if err := g.writeV1Extras(v, prev); err != nil {
		return err
	}
	g.v1, g.known = v, true
	return nil
}

// writeV1Extras writes what cgroup1 has no field for: the CFS burst, and
// pids.max = "max" (cgroup1 writes limits above 0 only). Values equal to
// prev's (nil: none) are left out.
func (g *Group) writeV1Extras(v V1, prev *V1) error {
	if d, ok := g.ctlDir(cgroup1.Cpu); ok && (prev == nil || v.CPUCfsBurstUs != prev.CPUCfsBurstUs) {
		err := writeFile(d, "cpu.cfs_burst_us", strconv.FormatUint(v.CPUCfsBurstUs, 10))
		if err != nil && !(errors.Is(err, fs.ErrNotExist) && v.CPUCfsBurstUs == 0) {
			return err
		}
	}
	if d, ok := g.ctlDir(cgroup1.Pids); ok && v.PidsMax <= 0 && (prev == nil || v.PidsMax != prev.PidsMax) {
		if err := writeFile(d, "pids.max", "max"); err != nil {
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
	var err error
	if g.m.v2 {
		limit := int64(-1) // "max"
		if n > 0 {
			limit = n
		}
		err = g.cg2.Update(&cgroup2.Resources{Pids: &cgroup2.Pids{Max: limit}})
	} else {
		err = writeFile(dir, "pids.max", val)
	}
	if err != nil {
		g.known = false
		return fmt.Errorf("set pids.max of cgroup %s: %w", g.name, notFound(err))
	}
	g.v1.PidsMax, g.v2.PidsMax = MapV1(Resources{PidsMax: n}).PidsMax, val
	return nil
}

// v2New are the values of a new v2 group: what Create need not write.
var v2New = V2{CPUWeight: 100, CPUMax: "max " + strconv.Itoa(CFSPeriodUs), MemoryMax: "max", PidsMax: "max"}

// v2Write is one file write of a v2 update: through cgroup2's
// Manager.Update (res) or, for a value cgroup2 has no field for, directly.
type v2Write struct {
	file, val string             // the file and the value it is given
	res       *cgroup2.Resources // nil: write val to file directly
	// unset: the value lifts a limit, so a missing file (its controller is
	// not enabled) is fine.
	unset bool
}

// planV2 returns the writes that take a v2 group from the values prev
// (nil: unknown) to those of r, in order: values equal to prev's are left
// out. cgroup2 has no field for cpu.max.burst, nor for memory.max = "max"
// (it writes numbers only), so those are written directly. The kernel
// rejects a cpu.max quota below the current burst, so a burst is dropped
// before cpu.max changes and set again after it.
func planV2(r Resources, prev *V2) []v2Write {
	v := MapV2(r)
	all := prev == nil
	if all {
		prev = &V2{}
	}
	var w []v2Write
	if all || v.CPUWeight != prev.CPUWeight {
		weight := v.CPUWeight
		w = append(w, v2Write{"cpu.weight", strconv.FormatUint(weight, 10),
			&cgroup2.Resources{CPU: &cgroup2.CPU{Weight: &weight}}, r.CPUMinMilli == 0})
	}
	burst := prev.CPUMaxBurst
	if all || burst > 0 && (v.CPUMax != prev.CPUMax || v.CPUMaxBurst != burst) {
		w = append(w, v2Write{"cpu.max.burst", "0", nil, true})
		burst = 0
	}
	if all || v.CPUMax != prev.CPUMax {
		w = append(w, v2Write{"cpu.max", v.CPUMax,
			&cgroup2.Resources{CPU: &cgroup2.CPU{Max: cgroup2.CPUMax(v.CPUMax)}}, r.CPUMaxMilli == 0})
	}
	if v.CPUMaxBurst != burst {
		w = append(w, v2Write{"cpu.max.burst", strconv.FormatUint(v.CPUMaxBurst, 10), nil, v.CPUMaxBurst == 0})
	}
	if all || v.MemoryMin != prev.MemoryMin {
		low := int64(v.MemoryMin)
		w = append(w, v2Write{"memory.min", strconv.FormatInt(low, 10),
			&cgroup2.Resources{Memory: &cgroup2.Memory{Min: &low}}, low == 0})
	}
	if all || v.MemoryMax != prev.MemoryMax {
		mw := v2Write{"memory.max", v.MemoryMax, nil, r.MemMaxBytes == 0}
		if r.MemMaxBytes > 0 {
			high := r.MemMaxBytes
			mw.res = &cgroup2.Resources{Memory: &cgroup2.Memory{Max: &high}}
		}
		w = append(w, mw)
	}
	if all || v.PidsMax != prev.PidsMax {
		n := int64(-1) // cgroup2 writes "max"
		if r.PidsMax > 0 {
			n = r.PidsMax
		}
		w = append(w, v2Write{"pids.max", v.PidsMax, &cgroup2.Resources{Pids: &cgroup2.Pids{Max: n}}, r.PidsMax == 0})
	}
	return w
}

func (g *Group) createV2(r Resources) error {
	cg, err := cgroup2.Load("/"+g.rel, cgroup2.WithMountpoint(g.m.mount))
	if err != nil {
		return err
	}
	g.cg2 = cg
	prev := v2New
	return g.applyV2(r, &prev)
}

// updateV2 writes the values of r that differ from those last written, or
// all of them if those are unknown.
func (g *Group) updateV2(r Resources) error {
	var prev *V2
	if g.known {
		p := g.v2
		prev = &p
	}
	return g.applyV2(r, prev)
}

func (g *Group) applyV2(r Resources, prev *V2) error {
	g.known = false // until every write has succeeded
	for _, w := range planV2(r, prev) {
		var err error
		if w.res != nil {
			err = g.cg2.Update(w.res)
		} else {
			err = writeFile(g.dir, w.file, w.val)
		}
		if err != nil && !(w.unset && errors.Is(err, fs.ErrNotExist)) {
			return err
		}
	}
	g.v2, g.known = MapV2(r), true
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
		var err error
		if pids, err = procsBelow(g.dir, "cgroup.procs", nil); err != nil {
			return nil, err
		}
	} else {
		if len(g.ctls) == 0 {
			return nil, ErrNotFound
		}
		// Any hierarchy has the full membership; prefer pids, then memory.
		ctl := g.ctls[0].name
		for _, n := range []cgroup1.Name{cgroup1.Memory, cgroup1.Pids} {
			if _, ok := g.ctlDir(n); ok {
				ctl = n
			}
		}
		dir, _ := g.ctlDir(ctl)
		var err error
		if pids, err = procsBelow(dir, "cgroup.procs", nil); err != nil {
			return nil, err
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

// Sample returns the two counters an agent samples for every process every
// few seconds, CPU time used and memory charged, reading one file for each
// (Stats reads four, after a stat of the directory).
func (g *Group) Sample() (cpuNanos, memBytes uint64, err error) {
	cpuFile, memFile := filepath.Join(g.dir, "cpu.stat"), filepath.Join(g.dir, "memory.current")
	if !g.m.v2 {
		dir, _ := g.ctlDir(cgroup1.Cpuacct)
		cpuFile = filepath.Join(dir, "cpuacct.usage")
		dir, _ = g.ctlDir(cgroup1.Memory)
		memFile = filepath.Join(dir, "memory.usage_in_bytes")
	}
	if g.m.v2 {
		var kv map[string]uint64
		if kv, err = readKV(cpuFile); err == nil {
			cpuNanos = kv["usage_usec"] * 1000
		}
	} else {
		cpuNanos, err = readUint(cpuFile)
	}
	if err == nil {
		memBytes, err = readUint(memFile)
	}
	if err != nil {
		return 0, 0, fmt.Errorf("sample cgroup %s: %w", g.name, notFound(err))
	}
	return cpuNanos, memBytes, nil
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
	// Usually everything has exited already (the workload was PID 1 of its
	// namespace): with nobody inside, nobody can fork in, and there is
	// nothing to freeze.
	if pids, err := g.procs(); err != nil {
		return fmt.Errorf("kill cgroup %s: %w", g.name, notFound(err))
	} else if len(pids) == 0 {
		return nil
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
	if g.counted {
		g.counted = false
		g.m.live--
	}
	if g.m.live == 0 {
		g.m.removeParents()
	}
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

// procsBelow appends the pids in file of dir and of every group below it.
// It reads directory entries without a stat of each (cgroup directories
// hold dozens of files): this runs for every Kill and Delete, which cgroup1's
// Processes (a filepath.Walk) made the most expensive part of a process's
// cleanup.
func procsBelow(dir, file string, pids []int) ([]int, error) {
	ps, err := readPids(filepath.Join(dir, file))
	if err != nil {
		return pids, err
	}
	pids = append(pids, ps...)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return pids, err
	}
	for _, e := range ents {
		if e.IsDir() {
			if pids, err = procsBelow(filepath.Join(dir, e.Name()), file, pids); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return pids, err
			}
		}
	}
	return pids, nil
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
