package guard

import (
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
)

// Who the guard never kills. A sandbox's cgroup holds its workload, and for
// a moment also the shimd thread that moves itself in to start a process
// (cgroup v1 lists that thread's whole process in cgroup.procs). A guard
// that SIGKILLed everything listed could kill a shimd: its own, or, were
// cgroups shared, another cluster's. So before it kills, the guard asks
// Protected, which says no to itself, to the shimd named in the data dir's
// pid file, and to any process running the shimd binary (the guard's own
// executable, same device and inode) or a binary named shimd outside any
// sandbox's root.

// PIDFileName is the file in shimd's data dir that holds shimd's pid.
const PIDFileName = "shimd.pid"

// Protector says which processes the guard must not kill.
type Protector struct {
	// PIDFile, if set, holds a pid never to kill (the node's shimd).
	PIDFile string
	self    int
	exe     syscall.Stat_t
	root    syscall.Stat_t
}

// NewProtector protects this process, whatever runs this executable, and
// the pid in pidFile ("" = none).
func NewProtector(pidFile string) *Protector {
	p := &Protector{PIDFile: pidFile, self: os.Getpid()}
	_ = syscall.Stat("/proc/self/exe", &p.exe)
	_ = syscall.Stat("/proc/self/root", &p.root)
	return p
}

// Protected reports whether pid must not be killed.
func (p *Protector) Protected(pid int) bool {
	if pid <= 1 || pid == p.self {
		return true
	}
	if p.PIDFile != "" {
		if b, err := os.ReadFile(p.PIDFile); err == nil {
			if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && n == pid {
				return true
			}
		}
	}
	proc := "/proc/" + strconv.Itoa(pid)
	var st syscall.Stat_t
	if syscall.Stat(proc+"/exe", &st) == nil && st.Dev == p.exe.Dev && st.Ino == p.exe.Ino && p.exe.Ino != 0 {
		return true // shimd or a guard, this build
	}
	// Another build of shimd (an upgrade, another cluster's): named shimd
	// and living in the host's root, where no sandboxed workload does.
	if link, err := os.Readlink(proc + "/exe"); err == nil {
		base := filepath.Base(strings.TrimSuffix(link, " (deleted)"))
		if slices.Contains([]string{"shimd"}, base) && syscall.Stat(proc+"/root", &st) == nil &&
			st.Dev == p.root.Dev && st.Ino == p.root.Ino {
			return true
		}
	}
	return false
}
