// Package exec starts workloads in cgroup-bounded sandboxes and re-adopts
// them after the agent restarts.
//
// Every workload runs below its own PID 1, shim-init (package pid1, found
// through Runtime.Init), in its own pid, mount, uts and ipc namespaces, its
// own session, and its own cgroup, named "<id>.<incarnation>" below the
// Runtime's cgroup.Manager root. The init is in that cgroup from its first
// instruction. It forwards the usual termination signals to the workload,
// reaps zombies, and reports through a pipe how the workload ended, so that
// Signal(SIGTERM) ends a workload without a handler at once and Exit tells
// an exit code from a death by signal. Killing the init kills the pid
// namespace. There is no parent-death signal: workloads outlive the agent,
// and a restarted agent finds them with Existing and takes them back (their
// init) with Adopt.
//
// Three isolation levels (see Isolation):
//
//   - IsolationProcess, the default, is a process sandbox: shim-init is
//     cloned straight into new pid, mount, uts, ipc and cgroup namespaces
//     (and a network namespace with NetworkNone), and the root it gets is
//     a read-only view of the host's /usr, /etc, /bin, /sbin and /lib*
//     (prepared once per Runtime as a template mount namespace, see
//     Prepare), with a minimal /dev, a fresh /proc, a read-only /sys with
//     no cgroup file system, a private /tmp, the work folder at /work and
//     the declared Mounts, and runc's masked and read-only paths; then it
//     drops to the workload's user with no_new_privs, runc's default
//     capabilities at most (none for a user other than root) and the
//     default seccomp filter (compiled once per agent with libseccomp,
//     -tags seccomp), and executes the workload.
//   - IsolationContainer runs the workload in a libcontainer sandbox: its
//     own root file system (Rootfs) or the same host view, with shim-init
//     bound read-only into it as PID 1. Binaries that start containers must
//     call Init early in main (see IsInit).
//   - IsolationHost is for administrators: the same namespaces and init,
//     but the host's file system and no privilege dropped beyond the user.
//
// A workload runs as User, "" meaning nobody (65534:65534). Its work folder
// (Spec.WorkDir) is made its own, mode 0700. Its output goes to files the
// agent opens (0600, in folders made 0700) and passes as descriptors, so
// that no sandbox sees a log path (not even in /proc/self/fd, see openLog).
// It inherits no other descriptor.
//
// Importing the package locks the main goroutine to the main thread (see
// the package's init), and the first container start sets GOMAXPROCS=1 in
// the process environment if it is unset (passed on to container inits).
//
// Each Process costs one parked goroutine and two descriptors (a pidfd and
// the status pipe): exit is learned from the pidfd through the Go netpoller,
// never by polling.
package exec

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shim-run/shim/cgroup"
	"github.com/shim-run/shim/pid1"
)

// Sentinel errors, wrapped with context; test with errors.Is.
var (
	// ErrNotFound: the executable does not exist (message: exec: "/x": not found).
	ErrNotFound = errors.New("not found")
	// ErrGone: the process to adopt is not alive with the given start time.
	ErrGone = errors.New("process is gone")
	// ErrExited: the process has already exited.
	ErrExited = errors.New("process has exited")
	// ErrInvalid: the Spec or arguments are unusable.
	ErrInvalid = errors.New("invalid argument")
)

// Spec describes a workload to start.
type Spec struct {
	ID          string // workload id; must be a valid file name (no "/")
	Incarnation uint64 // restart counter; with ID it names the cgroup
	Argv        []string
	// Env is the workload's environment, "K=V"; nil = empty. HOME is added
	// (the work folder) if it has none and there is a work folder. Argv[0]
	// is looked up inside the sandbox in its PATH, or a default PATH.
	Env []string
	// Dir is the working directory, an absolute path inside the sandbox
	// (host isolation: on the host); "" = the work folder, else "/" (host
	// isolation: the agent's).
	Dir string
	// WorkDir is the workload's work folder, a host directory (created if
	// missing) that Start makes owned by the workload's user, mode 0700,
	// and binds read-write at /work in a sandbox or container; host
	// isolation uses it in place. "" = none.
	WorkDir string
	// Mounts are host paths bound into a sandbox or container. Start only
	// refuses relative paths and targets that overlap each other or the
	// sandbox's own mount points (/, /proc, /dev, /sys, /tmp, /work, the
	// host view); which sources are allowed is the caller's decision.
	Mounts    []Mount
	Stdout    string // file appended to (created 0600 with 0700 parents); "" = /dev/null
	Stderr    string // file appended to (created 0600 with 0700 parents); "" = /dev/null
	Resources cgroup.Resources
	Isolation Isolation
	Network   Network
	User      string // "UID[:GID]" (GID defaults to UID); "" = nobody (65534:65534)
	// Rootfs is a container's root directory (mounted read-only); "" = a
	// read-only view of the host's /usr, /etc, /bin, /sbin and /lib*.
	Rootfs string
}

// Mount is a host path (Source) bound at Target in the sandbox.
type Mount struct {
	Source, Target string
	ReadOnly       bool
}

// Isolation selects how a workload is sandboxed.
type Isolation int

const (
	// IsolationProcess is a process sandbox (see the package doc): new pid,
	// mount, uts, ipc and cgroup namespaces, a root built by shim-init from
	// a read-only view of the host's system folders, a fresh /proc, private
	// /tmp and /work, masked paths, no_new_privs, few capabilities and the
	// default seccomp filter.
	IsolationProcess Isolation = iota
	// IsolationContainer runs it in a libcontainer sandbox: the same
	// namespaces (but the cgroup one) and cgroup, its own read-only root file
	// system, masked and read-only /proc and /sys paths, runc's default
	// capabilities, no_new_privs and (built with -tags seccomp) the same
	// seccomp filter, with shim-init as PID 1.
	IsolationContainer
	// IsolationHost only gives the workload new pid, mount, uts and ipc
	// namespaces (and network with NetworkNone), with shim-init as PID 1:
	// it sees the host's files and, as root, keeps every capability. For
	// administrators.
	IsolationHost
)

// String names the isolation level as the API does.
func (i Isolation) String() string {
	switch i {
	case IsolationProcess:
		return "process"
	case IsolationContainer:
		return "container"
	case IsolationHost:
		return "host"
	}
	return "isolation(" + strconv.Itoa(int(i)) + ")"
}

// Network selects a workload's network namespace.
type Network int

const (
	NetworkHost Network = iota // the host's network namespace
	NetworkNone                // a private network namespace with only lo (up)
)

// Exit describes how a process ended.
type Exit struct {
	Code      int    // exit code; -1 when killed by a signal or unknown
	Signal    string // terminating signal, e.g. "SIGKILL"; "" if none or unknown
	OOMKilled bool   // the group's OOM-kill counter rose and the process was SIGKILLed
	Reason    string // "exited", "signaled", "killed" (by Kill), "oom-killed", or why the status is unknown
}

// Exit reasons.
const (
	ReasonExited    = "exited"
	ReasonSignaled  = "signaled"
	ReasonKilled    = "killed"
	ReasonOOMKilled = "oom-killed"
	// ReasonUnknown is used for adopted processes: they are not children of
	// this agent, so their exit status cannot be collected.
	ReasonUnknown = "exit status unknown: adopted process is not a child of this agent"
)

// Runtime starts and adopts workloads. Its zero value is not usable: set
// Cgroups. It holds no per-process state and is safe for concurrent use.
type Runtime struct {
	Cgroups *cgroup.Manager
	// StateDir holds libcontainer's state while a container starts, the
	// root directory of the container's host view, and the empty directory
	// each process sandbox builds its root on; "" = /run/shim.
	StateDir string
	// Init is the shim-init executable (absolute); "" = InitName next to
	// the running executable, else in PATH.
	Init string
}

// Process is a started or adopted workload.
type Process struct {
	name   string
	pid    int // shim-init's
	start  uint64
	child  bool
	group  *cgroup.Group
	pidfd  *os.File      // non-blocking, registered with the netpoller
	status *statusReader // shim-init's reports; nil when adopted
	oom    uint64        // the group's OOM-kill counter when we took charge
	killed atomic.Bool
	done   chan struct{}
	exit   Exit
}

// GroupName returns the cgroup name of incarnation inc of workload id.
func GroupName(id string, inc uint64) string {
	return id + "." + strconv.FormatUint(inc, 10)
}

// ParseGroupName splits a name made by GroupName.
func ParseGroupName(name string) (id string, inc uint64, ok bool) {
	i := strings.LastIndexByte(name, '.')
	if i <= 0 {
		return "", 0, false
	}
	inc, err := strconv.ParseUint(name[i+1:], 10, 64)
	if err != nil || strconv.FormatUint(inc, 10) != name[i+1:] {
		return "", 0, false
	}
	return name[:i], inc, true
}

func validID(id string) error {
	if id == "" || id == "." || id == ".." || len(id) > 200 || strings.ContainsAny(id, "/\x00") {
		return fmt.Errorf("workload id %q: %w", id, ErrInvalid)
	}
	return nil
}

const nsFlags = syscall.CLONE_NEWPID | syscall.CLONE_NEWUTS | syscall.CLONE_NEWIPC

// Start starts s in a new cgroup with s.Resources applied (pids.max with
// room for shim-init's threads, see initPids). shim-init is in that cgroup
// before it executes its first instruction (see cgroup.Group.Spawn; for
// containers libcontainer's init is born there and becomes shim-init), and
// Start returns once shim-init reports that the workload has been executed.
// The executable is looked up inside the sandbox; if it does not exist the
// error is `exec: "NAME": not found` (wrapping ErrNotFound). Other failures
// inside the sandbox wrap the error number (errors.Is(err, fs.ErrNotExist)
// for a missing working directory). On any failure the cgroup is removed
// again.
func (r *Runtime) Start(s Spec) (*Process, error) {
	if r.Cgroups == nil {
		return nil, fmt.Errorf("start: Runtime.Cgroups is nil: %w", ErrInvalid)
	}
	if err := validID(s.ID); err != nil {
		return nil, fmt.Errorf("start: %w", err)
	}
	name := GroupName(s.ID, s.Incarnation)
	if len(s.Argv) == 0 || s.Argv[0] == "" {
		return nil, fmt.Errorf("start %s: empty Argv: %w", name, ErrInvalid)
	}
	uid, gid, err := ParseUser(s.User, nobody)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	switch {
	case s.Isolation != IsolationProcess && s.Isolation != IsolationContainer && s.Isolation != IsolationHost:
		return nil, fmt.Errorf("start %s: isolation %d: %w", name, s.Isolation, ErrInvalid)
	case s.Network != NetworkHost && s.Network != NetworkNone:
		return nil, fmt.Errorf("start %s: network %d: %w", name, s.Network, ErrInvalid)
	case s.Rootfs != "" && s.Isolation != IsolationContainer:
		return nil, fmt.Errorf("start %s: a root file system needs container isolation: %w", name, ErrInvalid)
	case s.Dir != "" && !filepath.IsAbs(s.Dir):
		return nil, fmt.Errorf("start %s: working directory %q: must be absolute: %w", name, s.Dir, ErrInvalid)
	case s.WorkDir != "" && !filepath.IsAbs(s.WorkDir):
		return nil, fmt.Errorf("start %s: work folder %q: must be absolute: %w", name, s.WorkDir, ErrInvalid)
	}
	if err := checkMounts(s, name); err != nil {
		return nil, err
	}
	if s.Isolation == IsolationContainer {
		if err := checkRootfs(s, name); err != nil {
			return nil, err
		}
	}
	initPath, err := r.initPath()
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	var cfg *pid1.Config
	var tmpl *os.File
	if s.Isolation != IsolationContainer {
		if cfg, tmpl, err = r.initConfig(s, initPath, uid, gid); err != nil {
			return nil, fmt.Errorf("start %s: %w", name, err)
		}
	}
	if err := prepareWorkDir(s.WorkDir, uid, gid, name); err != nil {
		return nil, err
	}
	stdio, closeStdio, err := openStdio(s)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	defer closeStdio()
	statusR, statusW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	var g *cgroup.Group
	if s.Isolation == IsolationContainer {
		g, err = r.Cgroups.CreateDevices(name, startResources(s.Resources), deviceCgroups())
	} else {
		g, err = r.Cgroups.Create(name, startResources(s.Resources))
	}
	if err != nil {
		statusR.Close()
		statusW.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	var pid, pidfd int
	if s.Isolation == IsolationContainer {
		pid, err = r.startContainer(s, initPath, uid, gid, stdio, statusW, g)
		pidfd = -1
	} else {
		pid, pidfd, err = startInit(s, initPath, cfg, tmpl, stdio, statusW, g)
	}
	statusW.Close() // the init holds the only write end now
	if err == nil && pidfd < 0 {
		pidfd, err = unix.PidfdOpen(pid, 0)
	}
	if err == nil {
		err = unix.SetNonblock(pidfd, true)
	}
	status := &statusReader{f: statusR}
	if err == nil {
		var rep pid1.Report
		var ok bool
		rep, ok, err = status.next(time.Now().Add(startTimeout))
		switch {
		case err != nil:
			err = fmt.Errorf("start %s: %w", name, err)
		case !ok:
			err = fmt.Errorf("start %s: shim-init ended before the workload started (see its stderr)", name)
		default:
			err = startError(rep, name)
		}
	}
	if err == nil && runResources(s.Resources) != startResources(s.Resources) {
		// Only the values that differ from startResources are written.
		err = g.Update(runResources(s.Resources))
		if err != nil {
			err = fmt.Errorf("start %s: %w", name, err)
		}
	}
	if err != nil {
		if pid > 0 {
			_ = g.Kill()
			var ws syscall.WaitStatus
			_, _ = syscall.Wait4(pid, &ws, 0, nil)
		}
		if pidfd >= 0 {
			unix.Close(pidfd)
		}
		statusR.Close()
		_ = g.Delete()
		return nil, err
	}
	p := &Process{name: name, pid: pid, child: true, group: g, status: status, done: make(chan struct{})}
	// The child is ours and unreaped, so its /proc entry is there.
	_, p.start, _ = ProcStat(pid)
	p.pidfd = os.NewFile(uintptr(pidfd), "pidfd")
	go p.wait()
	return p, nil
}

// startResources are a group's bounds while shim-init (or libcontainer's
// init) sets the sandbox up, before the workload runs: the CPU weight of
// one core and no quota (a workload's small max or weight would stretch a
// start to seconds under load), and room for the init's threads. Start
// applies runResources as soon as the workload runs, so its first
// instructions may run with the lifted CPU bounds for a moment.
func startResources(r cgroup.Resources) cgroup.Resources {
	r = runResources(r)
	r.CPUMinMilli = max(r.CPUMinMilli, 1000)
	r.CPUMaxMilli, r.CPUBurstMilli = 0, 0
	return r
}

// runResources are a group's bounds while the workload runs: r, with
// shim-init's threads counted on top of r.PidsMax.
func runResources(r cgroup.Resources) cgroup.Resources {
	if r.PidsMax > 0 {
		r.PidsMax += initPids
	}
	return r
}

// spawnInNewNetns forks through g.SpawnLocked from a thread that has its own
// new network namespace with lo up, so the child is born there (a plain
// CLONE_NEWNET would leave lo down). The thread then returns to the
// agent's namespace, or is discarded if it cannot.
func spawnInNewNetns(g *cgroup.Group, start func(int) error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		keep, err := func() (bool, error) {
			orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				return true, fmt.Errorf("network namespace: %w", err)
			}
			defer unix.Close(orig)
			if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
				return true, fmt.Errorf("new network namespace: %w", err)
			}
			back := func() bool { return unix.Setns(orig, unix.CLONE_NEWNET) == nil }
			if err := loopbackUp(); err != nil {
				return back(), fmt.Errorf("new network namespace: %w", err)
			}
			restored, err := g.SpawnLocked(start)
			return back() && restored, err
		}()
		if keep {
			runtime.UnlockOSThread()
		} // else: the runtime discards a thread that exits locked
		errc <- err
	}()
	return <-errc
}

// loopbackUp sets lo up in the calling thread's network namespace.
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("lo up: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return fmt.Errorf("lo up: %w", err)
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("lo up: %w", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("lo up: %w", err)
	}
	return nil
}

// nobody is the user a workload runs as when its spec names none.
var nobody = [2]uint32{65534, 65534}
