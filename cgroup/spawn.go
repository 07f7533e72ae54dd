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

	"github.com/containerd/cgroups/v3/cgroup1"
	"golang.org/x/sys/unix"
)

// Spawn calls start so that the one process start creates is inside g from
// its very first instruction, without a window in which it runs elsewhere.
//
// On cgroup v2, start receives an O_PATH descriptor of the group's directory
// to pass as syscall.SysProcAttr.CgroupFD with UseCgroupFD set
// (clone3 with CLONE_INTO_CGROUP).
//
// On cgroup v1, start receives -1 and runs on a goroutine locked to an OS
// thread that has been moved into g (its TID written to each hierarchy's
// "tasks" file). Go's fork/exec clones from the calling thread, so the child
// is born inside g. Afterwards the thread is moved back to the cgroups it
// came from; if that fails the thread is discarded rather than returned to
// the scheduler. Threads the runtime starts meanwhile are cloned from its
// template thread, not from a locked one, so they never land in g.
//
// pids.max and the borrowed thread (v1 only): while inside g the thread
// counts towards pids.current, so with pids.max = N the child could fork
// only N-2 more tasks, and pids.max = 1 would make the fork itself fail.
// Spawn therefore raises pids.max to N+1 before moving in and lowers it back
// to N before moving out. Go forks with CLONE_VFORK, so start returns only
// once the child has exec'd and may already be running: during that window
// the limit is N+1 with the thread counted, i.e. N for the workload; once N
// is restored the thread is still counted (the kernel allows pids.max below
// pids.current, it only refuses new forks), and after it leaves the workload
// has exactly N. The workload never gets more than N tasks.
//
// The OOM killer and the borrowed thread (v1 only): a memory cgroup's OOM
// killer picks its victim among the thread-group leaders in the group
// (mem_cgroup_scan_tasks iterates with CSS_TASK_ITER_PROCS), so a thread of
// the agent inside g does not make the agent a candidate, unless that thread
// is the agent's main thread. (Checked: a 300 MiB process with one thread in
// a 32 MiB group whose child ran out of memory lost the child only; the
// kernel's task dump listed the child alone.) Only in that case, which the
// exec package rules out by keeping its main goroutine on the main thread,
// does Spawn set memory.oom_control's oom_kill_disable while the thread is
// inside: a workload hitting its limit in that window waits instead, and
// meets the OOM killer once the thread is out and the flag is cleared. The
// memory hierarchy is also entered last and left first.
//
// start may also run for long, as libcontainer's Container.Start does: it
// forks the container's init from the calling thread and then waits while
// the init builds the sandbox. The thread stays in g meanwhile (its
// allocations are charged to g), and so does the OOM killer's view above.
//
// Spawn serializes with Update on the same Group.
func (g *Group) Spawn(start func(cgroupFD int) error) error {
	if g.m.v2 {
		fd, err := unix.Open(g.dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("spawn in cgroup %s: %w", g.name, notFound(err))
		}
		defer unix.Close(fd)
		return start(fd)
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		restored, err := g.spawnV1(start)
		if restored {
			runtime.UnlockOSThread()
		} // else: exiting while locked makes the runtime terminate the thread
		errc <- err
	}()
	return <-errc
}

// SpawnLocked is Spawn for a caller that already runs on a goroutine locked
// to its OS thread (runtime.LockOSThread), for example because the thread
// joined a namespace the child must be born in: on v1 that very thread is
// moved into g and back. It reports whether the thread is back in its
// original cgroups; if not, the caller must let the goroutine exit while
// still locked, so that the runtime discards the thread.
func (g *Group) SpawnLocked(start func(cgroupFD int) error) (restored bool, err error) {
	if g.m.v2 {
		return true, g.Spawn(start)
	}
	return g.spawnV1(start)
}

// spawnV1 runs on a locked thread. It reports whether the thread is back in
// its original cgroups.
func (g *Group) spawnV1(start func(int) error) (restored bool, err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	orig, err := g.threadDirs()
	if err != nil {
		return true, fmt.Errorf("spawn in cgroup %s: %w", g.name, err)
	}
	pidsDir, hasPids := g.ctlDir(cgroup1.Pids)
	var limit int64 = -1
	if hasPids && g.known {
		limit = g.v1.PidsMax
	} else if hasPids {
		b, err := os.ReadFile(filepath.Join(pidsDir, "pids.max"))
		if err != nil {
			return true, fmt.Errorf("spawn in cgroup %s: %w", g.name, notFound(err))
		}
		if s := strings.TrimSpace(string(b)); s != "max" {
			if limit, err = strconv.ParseInt(s, 10, 64); err != nil {
				return true, fmt.Errorf("spawn in cgroup %s: pids.max %q: %w", g.name, s, err)
			}
		}
	}
	if limit > 0 {
		if err := writeFile(pidsDir, "pids.max", strconv.FormatInt(limit+1, 10)); err != nil {
			return true, fmt.Errorf("spawn in cgroup %s: %w", g.name, notFound(err))
		}
	}
	// The CPU cgroup and the borrowed thread (v1 only): inside g the thread
	// runs under g's CPU weight and quota. Under load a small weight or quota
	// can keep it off the CPU for hundreds of milliseconds, and since it runs
	// Go code, a stop-the-world pause of the whole agent waits for it. So g's
	// CPU bounds are lifted for the duration (weight of one core, no quota)
	// and restored once the thread has left; the workload runs a few
	// microseconds before its exec with the lifted bounds at most.
	//
	// Only values that differ from the lifted ones are written: every write
	// of cpu.cfs_quota_us costs a tg_set_bandwidth in the kernel, the most
	// expensive step of a start when done needlessly.
	if cpuDir, ok := g.ctlDir(cgroup1.Cpu); ok {
		for _, f := range []struct {
			file, lifted string
			known        int64
		}{{"cpu.cfs_quota_us", "-1", g.v1.CPUCfsQuotaUs}, {"cpu.shares", "1024", int64(g.v1.CPUShares)}} {
			cur := strconv.FormatInt(f.known, 10)
			if !g.known {
				b, _ := os.ReadFile(filepath.Join(cpuDir, f.file))
				cur = strings.TrimSpace(string(b))
			}
			if cur == "" || cur == f.lifted {
				continue
			}
			_ = writeFile(cpuDir, f.file, f.lifted)
			defer func() {
				// After the thread has left: restore the workload's bound.
				if werr := writeFile(cpuDir, f.file, cur); werr != nil && err == nil {
					err = fmt.Errorf("spawn in cgroup %s: restore %s: %w", g.name, f.file, werr)
				}
			}()
		}
	}
	memDir, hasMem := g.ctlDir(cgroup1.Memory)
	hasMem = hasMem && unix.Gettid() == unix.Getpid()
	if hasMem {
		if err := writeFile(memDir, "memory.oom_control", "1"); err != nil {
			hasMem = false // without the guard the window is still tiny
		}
	}
	// "0" is the calling thread; unlike its TID it lets the kernel skip the
	// global threadgroup lock.
	tid := []byte("0")
	var moved []string
	for i, dir := range g.dirs() {
		if err = os.WriteFile(filepath.Join(dir, "tasks"), tid, 0); err != nil {
			err = fmt.Errorf("spawn in cgroup %s: enter: %w", g.name, notFound(err))
			break
		}
		moved = append(moved, orig[i])
	}
	if err == nil {
		err = start(-1)
	}
	if limit > 0 {
		if werr := writeFile(pidsDir, "pids.max", strconv.FormatInt(limit, 10)); werr != nil && err == nil {
			err = fmt.Errorf("spawn in cgroup %s: restore pids.max: %w", g.name, werr)
		}
	}
	restored = true
	for i := len(moved) - 1; i >= 0; i-- { // memory first
		if werr := g.m.writeHomeTasks(moved[i]); werr != nil {
			if restored && err == nil {
				err = fmt.Errorf("spawn in cgroup %s: leave: %w", g.name, werr)
			}
			restored = false
		}
	}
	if hasMem && restored {
		if werr := writeFile(memDir, "memory.oom_control", "0"); werr != nil && err == nil {
			err = fmt.Errorf("spawn in cgroup %s: re-enable the OOM killer: %w", g.name, werr)
		}
	}
	return restored, err
}

// threadDirs returns, for each of g.dirs(), the directory of the calling
// thread's current cgroup in the same hierarchy.
func (g *Group) threadDirs() ([]string, error) {
	f, err := os.Open("/proc/thread-self/cgroup")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	cur := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		for _, c := range strings.Split(parts[1], ",") {
			cur[c] = parts[2]
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	var out []string
	seen := map[string]bool{}
	for _, c := range g.ctls {
		if seen[c.dir] {
			continue // co-mounted: same order as uniqueDirs
		}
		seen[c.dir] = true
		p, ok := cur[string(c.name)]
		if !ok {
			return nil, fmt.Errorf("thread has no %s cgroup", c.name)
		}
		rel, err := filepath.Rel(c.mroot, p)
		if err != nil || strings.HasPrefix(rel, "..") {
			return nil, errors.New("thread's " + string(c.name) + " cgroup " + p + " is outside the mount")
		}
		out = append(out, filepath.Join(c.dir, rel))
	}
	return out, nil
}

// writeHomeTasks moves the calling thread back into the group at dir, one
// of the agent's own, through a "tasks" file kept open for it: every Spawn
// returns its thread to the same few groups, and opening their files by
// path was a measurable part of a process start.
func (m *Manager) writeHomeTasks(dir string) error {
	if f, ok := m.homeTasks.Load(dir); ok {
		if _, err := f.(*os.File).Write([]byte("0")); err == nil {
			return nil
		}
		m.homeTasks.Delete(dir) // removed meanwhile? open it again
	}
	f, err := os.OpenFile(filepath.Join(dir, "tasks"), os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if _, err := f.Write([]byte("0")); err != nil {
		f.Close()
		return err
	}
	if _, loaded := m.homeTasks.LoadOrStore(dir, f); loaded {
		f.Close()
	}
	return nil
}
