package exec

import (
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
