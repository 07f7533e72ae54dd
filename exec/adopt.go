package exec

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/shim-run/shim/cgroup"
	"golang.org/x/sys/unix"
)

// Claim checks that pid is the live holder of workload cgroup name (below
// m's root) and started at startTime (Process.StartTime), and returns a pidfd
// for it and the cgroup. It fails with ErrGone if pid is gone, a zombie,
// reused (another start time) or not in that cgroup. Runtimes use it to
// adopt what an earlier agent started; the caller owns the pidfd.
func Claim(m *cgroup.Manager, name string, pid int, startTime uint64) (*os.File, *cgroup.Group, error) {
	if pid <= 0 {
		return nil, nil, fmt.Errorf("pid %d: %w", pid, ErrGone)
	}
	// Open the pidfd first and check the start time after: if the check
	// passes, the pidfd cannot refer to an earlier holder of the pid.
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if errors.Is(err, unix.ESRCH) {
		return nil, nil, fmt.Errorf("pid %d: %w", pid, ErrGone)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	fail := func(err error) (*os.File, *cgroup.Group, error) {
		unix.Close(fd)
		return nil, nil, err
	}
	state, start, err := ProcStat(pid)
	switch {
	case errors.Is(err, fs.ErrNotExist) || state == 'Z' || state == 'X':
		return fail(fmt.Errorf("pid %d: %w", pid, ErrGone))
	case err != nil:
		return fail(err)
	case start != startTime:
		return fail(fmt.Errorf("pid %d started at %d, not %d (pid reused): %w", pid, start, startTime, ErrGone))
	}
	g, err := m.Open(name)
	if err != nil {
		return fail(err)
	}
	pids, err := g.Procs()
	if err != nil {
		return fail(err)
	}
	if !slices.Contains(pids, pid) {
		return fail(fmt.Errorf("pid %d is not in cgroup %s: %w", pid, name, ErrGone))
	}
	return os.NewFile(uintptr(fd), "pidfd"), g, nil
}

// ProcStat returns the state (field 3) and start time (field 22) of pid
// from /proc/PID/stat.
func ProcStat(pid int) (state byte, start uint64, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, err
	}
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	f := strings.Fields(string(b[i+1:])) // f[0] is field 3
	if len(f) < 20 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	start, err = strconv.ParseUint(f[19], 10, 64)
	return f[0][0], start, err
}

// ParseUser parses "UID[:GID]" (GID defaults to UID); "" is def.
func ParseUser(u string, def [2]uint32) (uid, gid uint32, err error) {
	if u == "" {
		return def[0], def[1], nil
	}
	us, gs, hasG := strings.Cut(u, ":")
	uid64, err := strconv.ParseUint(us, 10, 32)
	gid64 := uid64
	if err == nil && hasG {
		gid64, err = strconv.ParseUint(gs, 10, 32)
	}
	if err != nil || uid64 == 1<<32-1 || gid64 == 1<<32-1 {
		return 0, 0, fmt.Errorf("user %q: want UID[:GID] (numbers): %w", u, ErrInvalid)
	}
	return uint32(uid64), uint32(gid64), nil
}

// Adopt takes charge of a workload started by an earlier agent: incarnation
// inc of id, running as pid with the given start time (Process.StartTime).
// It fails with ErrGone unless that pid is alive (not a zombie), has that
// start time, and is in the workload's cgroup. The exit status of an
// adopted process cannot be collected (Exit.Code is -1).
func (r *Runtime) Adopt(id string, inc uint64, pid int, startTime uint64) (*Process, error) {
	if r.Cgroups == nil {
		return nil, fmt.Errorf("adopt: Runtime.Cgroups is nil: %w", ErrInvalid)
	}
	if err := validID(id); err != nil {
		return nil, fmt.Errorf("adopt: %w", err)
	}
	name := GroupName(id, inc)
	pidfd, g, err := Claim(r.Cgroups, name, pid, startTime)
	if err != nil {
		return nil, fmt.Errorf("adopt %s: %w", name, err)
	}
	start := startTime
	p := &Process{name: name, pid: pid, start: start, group: g, done: make(chan struct{})}
	if u, err := g.Stats(); err == nil {
		p.oom = u.OOMKills
	}
	p.pidfd = pidfd
	go p.wait()
	return p, nil
}

// Existing describes a workload cgroup found under the manager root.
type Existing struct {
	ID          string
	Incarnation uint64
	Group       string // cgroup name below the manager root
	PIDs        []int  // every process in the group; empty for a leftover group
	PID         int    // the workload's main process (PID 1 of its pid namespace); 0 if none
	StartTime   uint64 // PID's start time, for Adopt
}

// Existing lists the workload groups under the manager root, so that an
// agent can re-adopt their processes (Adopt with ID, Incarnation, PID,
// StartTime) or clean them up. Names that GroupName did not make are
// skipped.
func (r *Runtime) Existing() ([]Existing, error) {
	if r.Cgroups == nil {
		return nil, fmt.Errorf("existing: Runtime.Cgroups is nil: %w", ErrInvalid)
	}
	names, err := r.Cgroups.List()
	if err != nil {
		return nil, err
	}
	var out []Existing
	for _, name := range names {
		id, inc, ok := ParseGroupName(name)
		if !ok {
			continue
		}
		g, err := r.Cgroups.Open(name)
		if errors.Is(err, cgroup.ErrNotFound) {
			continue // deleted meanwhile
		}
		if err != nil {
			return nil, err
		}
		pids, err := g.Procs()
		if errors.Is(err, cgroup.ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		e := Existing{ID: id, Incarnation: inc, Group: name, PIDs: pids}
		for _, pid := range pids {
			if nsInit(pid) {
				if state, start, err := ProcStat(pid); err == nil && state != 'Z' {
					e.PID, e.StartTime = pid, start
				}
				break
			}
		}
		out = append(out, e)
	}
	return out, nil
}

// nsInit reports whether pid is PID 1 of a pid namespace below ours.
func nsInit(pid int) bool {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "NSpid:"); ok {
			ids := strings.Fields(rest)
			return len(ids) > 1 && ids[len(ids)-1] == "1"
		}
	}
	return false
}
