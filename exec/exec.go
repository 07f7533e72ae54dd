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
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
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

// PID returns the process id (in the agent's pid namespace).
func (p *Process) PID() int { return p.pid }

// StartTime returns field 22 of /proc/PID/stat (clock ticks after boot), which
// together with the PID identifies the process across PID reuse.
func (p *Process) StartTime() uint64 { return p.start }

// Done is closed once the process has exited and its cgroup is gone.
func (p *Process) Done() <-chan struct{} { return p.done }

// Exit returns how the process ended. Valid after Done is closed.
func (p *Process) Exit() Exit {
	select {
	case <-p.done:
		return p.exit
	default:
		return Exit{Code: -1, Reason: "still running"}
	}
}

// Signal sends sig to the workload's init through its pidfd (never to a
// reused pid). The init forwards pid1.Forwarded (SIGTERM, SIGINT, SIGHUP,
// SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH) to the workload, which is not PID 1
// and so gets the default action of those it does not handle; SIGKILL
// kills the init and with it the whole pid namespace; others are ignored.
func (p *Process) Signal(sig syscall.Signal) error {
	rc, err := p.pidfd.SyscallConn()
	if err != nil {
		return fmt.Errorf("signal %s: %w", p.name, err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.PidfdSendSignal(int(fd), sig, nil, 0) }); err != nil {
		return fmt.Errorf("signal %s: %w", p.name, ErrExited) // pidfd closed: reaped
	}
	if errors.Is(serr, unix.ESRCH) {
		return fmt.Errorf("signal %s: %w", p.name, ErrExited)
	}
	if serr != nil {
		return fmt.Errorf("signal %s: %w", p.name, serr)
	}
	return nil
}

// Kill SIGKILLs every process in the workload's cgroup. It returns once they
// are signalled; Done reports the end. Killing an exited process is a no-op.
func (p *Process) Kill() error {
	p.killed.Store(true)
	err := p.group.Kill()
	if errors.Is(err, cgroup.ErrNotFound) {
		// Cleanup has begun, or someone removed the group: make sure of
		// the main process at least.
		if err := p.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, ErrExited) {
			return err
		}
		return nil
	}
	return err
}

// Stats returns the cgroup's usage (PidsCurrent counts shim-init's threads
// too); ErrExited once the process is gone.
func (p *Process) Stats() (cgroup.Usage, error) {
	if p.exited() {
		return cgroup.Usage{}, fmt.Errorf("stats %s: %w", p.name, ErrExited)
	}
	u, err := p.group.Stats()
	if err != nil && p.exited() {
		return cgroup.Usage{}, fmt.Errorf("stats %s: %w", p.name, ErrExited)
	}
	return u, err
}

// Sample returns the CPU time the workload has used and the memory charged
// to it, cheaper than Stats; ErrExited once the process is gone.
func (p *Process) Sample() (cpuNanos, memBytes uint64, err error) {
	if p.exited() {
		return 0, 0, fmt.Errorf("sample %s: %w", p.name, ErrExited)
	}
	cpuNanos, memBytes, err = p.group.Sample()
	if err != nil && p.exited() {
		return 0, 0, fmt.Errorf("sample %s: %w", p.name, ErrExited)
	}
	return cpuNanos, memBytes, err
}

// Resize changes the workload's resources in place; the process keeps
// running under the same PID. As at Start, pids.max gets room for the
// init's threads.
func (p *Process) Resize(r cgroup.Resources) error {
	if p.exited() {
		return fmt.Errorf("resize %s: %w", p.name, ErrExited)
	}
	err := p.group.Update(runResources(r))
	if err != nil && p.exited() {
		return fmt.Errorf("resize %s: %w", p.name, ErrExited)
	}
	return err
}

func (p *Process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// wait is the one goroutine per process. It parks in the netpoller until
// the pidfd becomes readable (the process exited), collects the status,
// removes the cgroup and closes done.
func (p *Process) wait() {
	rc, err := p.pidfd.SyscallConn()
	if err == nil {
		err = rc.Read(func(fd uintptr) bool { return pidfdReady(int(fd), 0) })
	}
	if err != nil {
		// Not pollable through the runtime: block this thread instead.
		for !pidfdReady(int(p.pidfd.Fd()), -1) {
		}
	}
	var e Exit
	if p.child {
		var ws syscall.WaitStatus
		for {
			_, err := syscall.Wait4(p.pid, &ws, 0, nil)
			if err != syscall.EINTR {
				break
			}
		}
		e = p.childExit(ws)
	} else {
		e = Exit{Code: -1, Reason: ReasonUnknown}
		if p.killed.Load() {
			e.Reason = ReasonKilled + "; " + ReasonUnknown
		}
		if p.oomRose() {
			e.OOMKilled, e.Reason = true, ReasonOOMKilled
		}
	}
	// In a pid namespace the kernel kills the rest when PID 1 dies; Kill
	// covers anything that left the namespace but not the cgroup.
	_ = p.group.Kill()
	_ = p.group.Delete() // a leftover shows up in Runtime.Existing
	p.pidfd.Close()
	if p.status != nil {
		p.status.f.Close()
	}
	p.exit = e
	close(p.done)
}

// childExit is how the workload ended, from shim-init's last report, or,
// if it made none (it was killed: by Kill, the OOM killer, or a SIGKILL
// sent to it), from the init's own wait status ws.
func (p *Process) childExit(ws syscall.WaitStatus) Exit {
	var last pid1.Report
	for {
		r, ok, _ := p.status.next(time.Time{}) // the init has exited: no waiting
		if !ok {
			break
		}
		last = r
	}
	var e Exit
	sig := syscall.Signal(-1)
	switch {
	case last.Kind == pid1.Exited:
		e = Exit{Code: last.Code, Reason: ReasonExited}
	case last.Kind == pid1.Signaled:
		sig = syscall.Signal(last.Code)
	case ws.Signaled():
		sig = ws.Signal()
	case ws.Exited():
		return Exit{Code: -1, Reason: fmt.Sprintf("shim-init exited with code %d without reporting the workload's end", ws.ExitStatus())}
	default:
		return Exit{Code: -1, Reason: "unexpected wait status " + strconv.Itoa(int(ws))}
	}
	if sig >= 0 {
		e = Exit{Code: -1, Signal: unix.SignalName(sig), Reason: ReasonSignaled}
		if e.Signal == "" {
			e.Signal = "signal " + strconv.Itoa(int(sig))
		}
		if sig == syscall.SIGKILL && p.killed.Load() {
			e.Reason = ReasonKilled
		}
		if sig == syscall.SIGKILL && p.oomRose() {
			e.OOMKilled, e.Reason = true, ReasonOOMKilled
		}
	}
	return e
}

func (p *Process) oomRose() bool {
	u, err := p.group.Stats()
	return err == nil && u.OOMKills > p.oom
}

// pidfdReady reports whether the process behind a pidfd has exited.
func pidfdReady(fd, timeoutMs int) bool {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, timeoutMs)
	return err == nil && n > 0 && fds[0].Revents != 0
}

// devNull is stdin for every workload, opened once and never closed (the
// child gets its own copy of the descriptor).
var devNull struct {
	once sync.Once
	f    *os.File
	err  error
}

// openStdio returns the workload's stdin (/dev/null), stdout and stderr, the
// outputs opened for appending by openLog, and a func that closes what it
// opened. Stdout and Stderr naming the same file (an agent's
// one log per process) share one descriptor, and parents are made only if
// the open finds them missing: a few path walks less per start.
func openStdio(s Spec) ([]*os.File, func(), error) {
	devNull.once.Do(func() { devNull.f, devNull.err = os.Open(os.DevNull) })
	if devNull.err != nil {
		return nil, nil, devNull.err
	}
	files := []*os.File{devNull.f}
	var opened []*os.File
	closeAll := func() {
		for _, f := range opened {
			f.Close()
		}
	}
	for i, path := range []string{s.Stdout, s.Stderr} {
		if i == 1 && path == s.Stdout {
			files = append(files, files[1])
			continue
		}
		var f *os.File
		var err error
		if path == "" {
			f, err = os.OpenFile(os.DevNull, os.O_WRONLY, 0)
		} else {
			f, err = openLog(path)
		}
		if err != nil {
			closeAll()
			return nil, nil, err
		}
		opened = append(opened, f)
		files = append(files, f)
	}
	return files, closeAll, nil
}

// logFlags open a log for the workload: appending, created if missing, no
// symbolic link followed.
const logFlags = unix.O_WRONLY | unix.O_APPEND | unix.O_CREAT | unix.O_NOFOLLOW | unix.O_CLOEXEC

// openLog opens path for the workload to append to: created 0600 (its
// folder 0700 if missing), so that only the agent reads it; the workload
// writes through the descriptor. It is opened through a detached mount of
// its folder (logTree), so that the descriptor's path, which the workload
// can read in /proc/self/fd, is "/NAME" only: no host path. Where no such
// mount can be made (not root, an old kernel) it is opened by its path.
func openLog(path string) (*os.File, error) {
	dir, name := filepath.Split(filepath.Clean(path))
	if name == "" || dir == "" {
		return nil, fmt.Errorf("log %q: %w", path, ErrInvalid)
	}
	dfd, err := logTree(dir)
	if err != nil {
		if errors.Is(err, errNoTree) {
			return os.OpenFile(path, logFlags, 0o600)
		}
		return nil, err
	}
	fd, err := unix.Openat(dfd, name, logFlags, 0o600)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	return os.NewFile(uintptr(fd), path), nil
}

// errNoTree: open_tree is not available here; open logs by their path.
var errNoTree = errors.New("no detached mount")

// logTrees caches, per log folder, a detached mount of it (open_tree with
// OPEN_TREE_CLONE: in no mount namespace, so its root is "/"), with the
// folder's device and inode. A folder replaced by another of the same name
// gets a new mount; the old one's descriptor is kept (a concurrent Start
// may be using it), a descriptor per replacement.
var logTrees sync.Map // folder -> *logTreeFD

type logTreeFD struct {
	fd       int
	dev, ino uint64
}

// logTree returns the descriptor of a detached mount of dir, made (with its
// parents, 0700) if missing.
func logTree(dir string) (int, error) {
	var st unix.Stat_t
	err := unix.Stat(dir, &st)
	if errors.Is(err, unix.ENOENT) {
		if err = os.MkdirAll(dir, 0o700); err == nil {
			err = unix.Stat(dir, &st)
		}
	}
	if err != nil {
		return -1, &fs.PathError{Op: "stat", Path: dir, Err: err}
	}
	if v, ok := logTrees.Load(dir); ok {
		if t := v.(*logTreeFD); t.dev == st.Dev && t.ino == st.Ino {
			return t.fd, nil
		}
	}
	fd, err := unix.OpenTree(unix.AT_FDCWD, dir, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if err != nil {
		return -1, errNoTree
	}
	var tst unix.Stat_t
	if err := unix.Fstat(fd, &tst); err != nil || tst.Dev != st.Dev || tst.Ino != st.Ino {
		unix.Close(fd)
		return -1, errNoTree // replaced meanwhile: the path will do
	}
	t := &logTreeFD{fd: fd, dev: st.Dev, ino: st.Ino}
	if v, loaded := logTrees.LoadOrStore(dir, t); loaded {
		if old := v.(*logTreeFD); old.dev == t.dev && old.ino == t.ino {
			unix.Close(fd)
			return old.fd, nil
		}
		logTrees.Store(dir, t)
	}
	return fd, nil
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
