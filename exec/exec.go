// Package exec starts workloads in cgroup-bounded sandboxes and re-adopts
// them after the agent restarts.
//
// Every workload runs in its own pid, mount, uts and ipc namespaces (it is
// PID 1 of its pid namespace), in its own session, and in its own cgroup,
// named "<id>.<incarnation>" below the Runtime's cgroup.Manager root. It has
// no parent-death signal: workloads outlive the agent, and a restarted agent
// finds them with Existing and takes them back with Adopt.
//
// Two isolation levels share that model (see Isolation): a process is
// cloned directly into its namespaces and cgroup with the host's file
// system; a container is a libcontainer sandbox with its own root file
// system, masked /proc and /sys, few capabilities, no_new_privs and a
// seccomp filter. Binaries that start containers must call Init early in
// main (see IsInit).
//
// Importing the package locks the main goroutine to the main thread (see
// the package's init), and the first container start sets GOMAXPROCS=1 in
// the process environment if it is unset (passed on to container inits).
//
// Each Process costs one parked goroutine: exit is learned from a pidfd
// through the Go netpoller, never by polling.
package exec

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/shim-run/shim/cgroup"
	"golang.org/x/sys/unix"
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
	Env         []string // exactly the workload's environment, "K=V"; nil = empty
	// Dir is the working directory: "" = the agent's (a container's "/").
	// In a container with the host view it is bind-mounted read-write at
	// the same path (the work directory); with Rootfs it is inside Rootfs.
	Dir       string
	Stdout    string // file appended to (created with its parents); "" = /dev/null
	Stderr    string // file appended to (created with its parents); "" = /dev/null
	Resources cgroup.Resources
	Isolation Isolation
	Network   Network
	User      string // "UID[:GID]" (GID defaults to UID); "" = the agent's (root)
	// Rootfs is a container's root directory (mounted read-only); "" = a
	// read-only view of the host's /usr, /etc, /bin, /sbin and /lib*.
	Rootfs string
}

// Isolation selects how a workload is sandboxed.
type Isolation int

const (
	// IsolationProcess clones the workload directly into new pid, mount,
	// uts and ipc namespaces and its cgroup; it sees the host's files.
	IsolationProcess Isolation = iota
	// IsolationContainer runs it in a libcontainer sandbox: the same
	// namespaces and cgroup, plus its own read-only root file system,
	// masked and read-only /proc and /sys paths, runc's default
	// capabilities, no_new_privs and (built with -tags seccomp) a seccomp
	// filter.
	IsolationContainer
)

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
	// StateDir holds libcontainer's state while a container starts and the
	// root directory of the host view; "" = /run/shim.
	StateDir string
}

// Process is a started or adopted workload.
type Process struct {
	name   string
	pid    int
	start  uint64
	child  bool
	group  *cgroup.Group
	pidfd  *os.File // non-blocking, registered with the netpoller
	oom    uint64   // the group's OOM-kill counter when we took charge
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

// Start starts s in a new cgroup with s.Resources applied. The process is in
// that cgroup before it executes its first instruction (see
// cgroup.Group.Spawn; for containers libcontainer places its init there
// before the workload is exec'd). The executable is resolved first, using
// PATH from s.Env or else the agent's (in a container: s.Env's or a default
// PATH, inside its root); if it does not exist the error wraps ErrNotFound
// and nothing is created. On any later failure the cgroup is removed again.
//
// For process isolation the mount namespace is unshared in the child
// (SysProcAttr.Unshareflags) rather than cloned, so that Go also makes "/"
// recursively private there and mounts never propagate back to the host.
func (r *Runtime) Start(s Spec) (*Process, error) {
	if r.Cgroups == nil {
		return nil, fmt.Errorf("start: Runtime.Cgroups is nil: %w", ErrInvalid)
	}
	if err := validID(s.ID); err != nil {
		return nil, fmt.Errorf("start: %w", err)
	}
	name := GroupName(s.ID, s.Incarnation)
	if len(s.Argv) == 0 {
		return nil, fmt.Errorf("start %s: empty Argv: %w", name, ErrInvalid)
	}
	cred, err := parseUser(s.User)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	switch {
	case s.Isolation != IsolationProcess && s.Isolation != IsolationContainer:
		return nil, fmt.Errorf("start %s: isolation %d: %w", name, s.Isolation, ErrInvalid)
	case s.Network != NetworkHost && s.Network != NetworkNone:
		return nil, fmt.Errorf("start %s: network %d: %w", name, s.Network, ErrInvalid)
	case s.Rootfs != "" && s.Isolation != IsolationContainer:
		return nil, fmt.Errorf("start %s: a root file system needs container isolation: %w", name, ErrInvalid)
	}
	var path string
	if s.Isolation == IsolationContainer {
		path, err = r.checkContainer(s, name)
	} else {
		path, err = checkProcess(s, name)
	}
	if err != nil {
		return nil, err
	}
	stdio, closeStdio, err := openStdio(s)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	defer closeStdio()
	var g *cgroup.Group
	if s.Isolation == IsolationContainer {
		g, err = r.Cgroups.CreateDevices(name, initResources(s.Resources), deviceCgroups())
	} else {
		g, err = r.Cgroups.Create(name, s.Resources)
	}
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	var pid, pidfd int
	if s.Isolation == IsolationContainer {
		pid, err = r.startContainer(s, name, path, cred, stdio, g)
		pidfd = -1
	} else {
		pid, pidfd, err = startProcess(s, path, cred, stdio, g)
	}
	if err == nil && pidfd < 0 {
		pidfd, err = unix.PidfdOpen(pid, 0)
	}
	if err == nil {
		err = unix.SetNonblock(pidfd, true)
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
		_ = g.Delete()
		if s.Isolation == IsolationContainer {
			return nil, fmt.Errorf("start %s: container: %w", name, err)
		}
		return nil, fmt.Errorf("start %s: exec %q: %w", name, path, err)
	}
	p := &Process{name: name, pid: pid, child: true, group: g, done: make(chan struct{})}
	// The child is ours and unreaped, so its /proc entry is there.
	_, p.start, _ = procStat(pid)
	p.pidfd = os.NewFile(uintptr(pidfd), "pidfd")
	go p.wait()
	return p, nil
}

// checkProcess checks s.Dir and resolves the executable on the host.
func checkProcess(s Spec, name string) (string, error) {
	if err := checkDir(s.Dir, name); err != nil {
		return "", err
	}
	return lookPath(s.Argv[0], s.Env, s.Dir)
}

// checkDir checks that dir ("" = none) is a directory on the host.
func checkDir(dir, name string) error {
	if dir == "" {
		return nil
	}
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		if err == nil {
			err = syscall.ENOTDIR
		}
		return fmt.Errorf("start %s: working directory %q: %w", name, dir, err)
	}
	return nil
}

// startProcess clones the workload straight into its namespaces and g. It
// returns the pid and a pidfd (-1 if the kernel gave none).
func startProcess(s Spec, path string, cred *syscall.Credential, stdio []*os.File, g *cgroup.Group) (pid, pidfd int, err error) {
	pidfd = -1
	attr := &syscall.ProcAttr{
		Dir:   s.Dir,
		Env:   s.Env,
		Files: []uintptr{stdio[0].Fd(), stdio[1].Fd(), stdio[2].Fd()},
		Sys: &syscall.SysProcAttr{
			Setsid:       true, // a Ctrl-C on the agent's terminal never reaches workloads
			Cloneflags:   nsFlags,
			Unshareflags: syscall.CLONE_NEWNS,
			PidFD:        &pidfd,
			Credential:   cred,
			// No Pdeathsig: workloads must outlive the agent.
		},
	}
	start := func(cgroupFD int) error {
		if cgroupFD >= 0 {
			attr.Sys.UseCgroupFD, attr.Sys.CgroupFD = true, cgroupFD
		}
		var err error
		pid, _, err = syscall.StartProcess(path, s.Argv, attr)
		return err
	}
	if s.Network == NetworkNone {
		err = spawnInNewNetns(g, start)
	} else {
		err = g.Spawn(start)
	}
	return pid, pidfd, err
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

// parseUser parses "UID[:GID]"; "" is nil (keep the agent's identity). The
// supplementary groups are always cleared.
func parseUser(u string) (*syscall.Credential, error) {
	if u == "" {
		return nil, nil
	}
	us, gs, hasG := strings.Cut(u, ":")
	uid, err := strconv.ParseUint(us, 10, 32)
	gid := uid
	if err == nil && hasG {
		gid, err = strconv.ParseUint(gs, 10, 32)
	}
	if err != nil || uid == 1<<32-1 || gid == 1<<32-1 {
		return nil, fmt.Errorf("user %q: want UID[:GID] (numbers): %w", u, ErrInvalid)
	}
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}, nil
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
	if pid <= 0 {
		return nil, fmt.Errorf("adopt %s: pid %d: %w", name, pid, ErrGone)
	}
	// Open the pidfd first and check the start time after: if the check
	// passes, the pidfd cannot refer to an earlier holder of the pid.
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if errors.Is(err, unix.ESRCH) {
		return nil, fmt.Errorf("adopt %s: pid %d: %w", name, pid, ErrGone)
	}
	if err != nil {
		return nil, fmt.Errorf("adopt %s: pidfd_open %d: %w", name, pid, err)
	}
	fail := func(err error) (*Process, error) {
		unix.Close(fd)
		return nil, fmt.Errorf("adopt %s: %w", name, err)
	}
	state, start, err := procStat(pid)
	switch {
	case errors.Is(err, fs.ErrNotExist) || state == 'Z' || state == 'X':
		return fail(fmt.Errorf("pid %d: %w", pid, ErrGone))
	case err != nil:
		return fail(err)
	case start != startTime:
		return fail(fmt.Errorf("pid %d started at %d, not %d (pid reused): %w", pid, start, startTime, ErrGone))
	}
	g, err := r.Cgroups.Open(name)
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
	p := &Process{name: name, pid: pid, start: start, group: g, done: make(chan struct{})}
	if u, err := g.Stats(); err == nil {
		p.oom = u.OOMKills
	}
	p.pidfd = os.NewFile(uintptr(fd), "pidfd")
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
				if state, start, err := procStat(pid); err == nil && state != 'Z' {
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

// Signal sends sig to the workload's main process through its pidfd (never
// to a reused pid). As PID 1 of its namespace the workload only receives
// signals it has a handler for, except SIGKILL and SIGSTOP.
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

// Stats returns the cgroup's usage; ErrExited once the process is gone.
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
// running under the same PID.
func (p *Process) Resize(r cgroup.Resources) error {
	if p.exited() {
		return fmt.Errorf("resize %s: %w", p.name, ErrExited)
	}
	err := p.group.Update(r)
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
		switch {
		case ws.Exited():
			e = Exit{Code: ws.ExitStatus(), Reason: ReasonExited}
		case ws.Signaled():
			e = Exit{Code: -1, Signal: unix.SignalName(ws.Signal()), Reason: ReasonSignaled}
			if ws.Signal() == syscall.SIGKILL && p.killed.Load() {
				e.Reason = ReasonKilled
			}
		default:
			e = Exit{Code: -1, Reason: "unexpected wait status " + strconv.Itoa(int(ws))}
		}
		if ws.Signaled() && ws.Signal() == syscall.SIGKILL && p.oomRose() {
			e.OOMKilled, e.Reason = true, ReasonOOMKilled
		}
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
	p.exit = e
	close(p.done)
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

// lookPath resolves the executable like execvp would after chdir(dir).
func lookPath(file string, env []string, dir string) (string, error) {
	if strings.Contains(file, "/") {
		if err := checkExec(file, dir); err != nil {
			return "", fmt.Errorf("exec: %q: %w", file, err)
		}
		return file, nil
	}
	pathEnv, ok := "", false
	for _, kv := range env {
		if v, found := strings.CutPrefix(kv, "PATH="); found {
			pathEnv, ok = v, true
		}
	}
	if !ok {
		pathEnv = os.Getenv("PATH")
	}
	for _, d := range filepath.SplitList(pathEnv) {
		if d == "" {
			d = "."
		}
		if p := d + "/" + file; checkExec(p, dir) == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("exec: %q: %w", file, ErrNotFound)
}

func checkExec(path, dir string) error {
	if !filepath.IsAbs(path) && dir != "" {
		path = filepath.Join(dir, path)
	}
	st, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
		return ErrNotFound
	}
	if err != nil {
		return err
	}
	if st.IsDir() || st.Mode()&0o111 == 0 {
		return fs.ErrPermission
	}
	return nil
}

// devNull is stdin for every workload, opened once and never closed (the
// child gets its own copy of the descriptor).
var devNull struct {
	once sync.Once
	f    *os.File
	err  error
}

// openStdio returns the workload's stdin (/dev/null), stdout and stderr, the
// outputs opened for appending (created with their parents), and a func that
// closes what it opened. Stdout and Stderr naming the same file (an agent's
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
		if path == "" {
			path = os.DevNull
		}
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if errors.Is(err, fs.ErrNotExist) && path != os.DevNull {
			if err = os.MkdirAll(filepath.Dir(path), 0o755); err == nil {
				f, err = os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
			}
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

// procStat returns the state (field 3) and start time (field 22) of pid.
func procStat(pid int) (state byte, start uint64, err error) {
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
