// Package pid1 is shim-init: the first process (PID 1) of every sandbox
// the exec package starts. It builds the sandbox, starts the workload, and
// then does what an init does for it, like tini or `docker run --init`:
// it forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 and
// SIGWINCH to the workload (which, not being PID 1, then gets the default
// action of signals it does not handle), reaps every zombie, and exits as
// soon as the workload exits, whereupon the kernel kills whatever else is
// left in the pid namespace.
//
// It runs in three ways (see Main):
//
//	shim-init --config-fd N [-- CMD [ARG...]]
//	shim-init --template --config-fd N
//	shim-init [--status-fd N] [--stdout-fd N] [--stderr-fd N] [--dir DIR] -- CMD [ARG...]
//
// With --config-fd, exec has cloned it straight into the workload's new
// namespaces and cgroup, and descriptor N holds a Config (Marshal). For a
// sandbox (Config.Sandbox) it builds the root on a tmpfs (host directories
// bound read-only, a minimal /dev, a fresh /proc, read-only /sys, a private
// /tmp, masked and read-only paths) and makes it the root with pivot_root,
// then sets the host name, drops to the workload's identity (bounding set
// first, then groups, GID, UID, capabilities, no_new_privs, and the
// seccomp program last), changes to the working directory, looks the
// executable up inside the sandbox and forks and executes it. The init
// itself keeps no more privilege than the workload and is not dumpable.
//
// With --template, it builds only the part of a sandbox's root that every
// sandbox shares (Sandbox.Root's mount points, links, binds and masks, and
// itself at InitInTemplate), makes it its root, reports Started and waits
// for its stdin to close: exec keeps its mount namespace as a template and
// clones the init of each process sandbox from it, with Sandbox.Root "".
//
// With "--", it is the init of a container that libcontainer has set up
// (the same signals, reaping and reports), or of anything by hand.
//
// Reports (see Report) go to the status descriptor: first Started or why
// it failed, later how the workload ended, so that exec tells an exit code
// from a death by signal. The init's own exit code is the workload's, or
// 128 plus the signal that killed it.
//
// It uses only the standard library and golang.org/x/sys/unix, and is
// built statically (CGO_ENABLED=0): a Go program starts in a fraction of a
// millisecond.
package pid1

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// Forwarded are the signals the init passes on to the workload.
var Forwarded = []os.Signal{
	unix.SIGTERM, unix.SIGINT, unix.SIGHUP, unix.SIGQUIT, unix.SIGUSR1, unix.SIGUSR2, unix.SIGWINCH,
}

// DefaultPath is the PATH the workload's executable is looked up in when
// its environment has none.
const DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

const usage = "usage: shim-init [--template] --config-fd N [-- CMD...] | shim-init [--status-fd N] [--stdout-fd N] [--stderr-fd N] [--dir DIR] -- CMD [ARG...]"

// Main runs the init with its arguments (os.Args[1:]) and returns its exit
// code: the workload's, 128+N if signal N killed it, 1 if it could not be
// started (127 if it was not found), 2 for bad arguments.
func Main(args []string) int {
	template := len(args) > 0 && args[0] == "--template"
	if template {
		args = args[1:]
	}
	cfg, err := parseArgs(args)
	if err == nil && template && (cfg.Sandbox == nil || cfg.Sandbox.Root == "") {
		err = errors.New("--template needs --config-fd with a sandbox root")
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "shim-init: %v\n%s\n", err, usage)
		return 2
	}
	// Descriptors the agent inherited without close-on-exec (from its own
	// parent) and passed on are not the workload's.
	if err := closeOnExec(); err != nil {
		fmt.Fprintf(os.Stderr, "shim-init: %v\n", err)
		return 1
	}
	// Not dumpable: a workload with the same user (always, in a container)
	// can neither open the init's /proc/1/mem, environ or fds nor attach
	// to it.
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		fmt.Fprintf(os.Stderr, "shim-init: prctl(PR_SET_DUMPABLE): %v\n", err)
		return 1
	}
	var status *os.File
	if cfg.StatusFD >= 0 {
		// Not for the workload.
		if _, err := unix.FcntlInt(uintptr(cfg.StatusFD), unix.F_SETFD, unix.FD_CLOEXEC); err != nil {
			fmt.Fprintf(os.Stderr, "shim-init: status descriptor %d: %v\n", cfg.StatusFD, err)
			return 2
		}
		status = os.NewFile(uintptr(cfg.StatusFD), "status")
	}
	if template {
		runtime.LockOSThread()
		if err := buildTemplate(cfg.Sandbox); err != nil {
			fmt.Fprintf(os.Stderr, "shim-init: %v\n", err)
			send(status, failure(err))
			return 1
		}
		send(status, Report{Kind: Started})
		_, _ = io.Copy(io.Discard, os.Stdin) // until exec has the namespace
		return 0
	}
	// signal.Notify costs a round trip between two threads per signal
	// (about 60 µs each here), so it runs while the sandbox is built. It
	// is done before Started is reported: the agent signals only after.
	sigs := make(chan os.Signal, 32)
	notified := make(chan struct{})
	go func() {
		signal.Notify(sigs, Forwarded...)
		close(notified)
	}()

	child, err := start(cfg)
	if err != nil {
		r := failure(err)
		fmt.Fprintf(os.Stderr, "shim-init: %v\n", err)
		send(status, r)
		if r.Kind == NotFound {
			return 127
		}
		return 1
	}
	exited := make(chan Report, 1)
	go reap(child, exited)
	<-notified
	send(status, Report{Kind: Started})
	r := supervise(child, sigs, exited)
	send(status, r)
	switch r.Kind {
	case Signaled:
		return 128 + r.Code
	case Exited:
		return r.Code
	}
	return 1
}

// failure is the report for err: NotFound, or Failed with its error number.
func failure(err error) Report {
	r := Report{Kind: Failed, Text: err.Error()}
	var nf *notFoundError
	var errno syscall.Errno
	switch {
	case errors.As(err, &nf):
		r = Report{Kind: NotFound, Text: nf.file}
	case errors.As(err, &errno):
		r.Errno = errno
	}
	return r
}

// parseArgs returns the configuration the arguments ask for.
func parseArgs(args []string) (*Config, error) {
	statusFD, dir := -1, ""
	for len(args) > 0 {
		if a := args[0]; a == "--stdout-fd" || a == "--stderr-fd" {
			// The workload's (and the init's own) output: installed
			// at once, so that errors from here on go there.
			if len(args) < 2 {
				return nil, errors.New(a + " needs a descriptor")
			}
			fd, err := fdArg(args[1])
			if err == nil {
				target := 1
				if a == "--stderr-fd" {
					target = 2
				}
				err = unix.Dup3(fd, target, 0)
			}
			if err != nil {
				return nil, fmt.Errorf("%s %s: %w", a, args[1], err)
			}
			args = args[2:]
			continue
		}
		switch a := args[0]; a {
		case "--config-fd":
			// What follows "--" is the workload's command, for ps and
			// /proc/1/cmdline to show (as tini's "-- CMD" does); the
			// Config's Argv is what runs.
			if len(args) != 2 && (len(args) < 3 || args[2] != "--") {
				return nil, errors.New("--config-fd takes one descriptor (and, after --, the command it runs)")
			}
			fd, err := fdArg(args[1])
			if err != nil {
				return nil, err
			}
			cfg, err := readConfig(fd)
			if err != nil {
				return nil, err
			}
			if len(cfg.Argv) == 0 {
				return nil, fmt.Errorf("%w: no command", ErrConfig)
			}
			return cfg, nil
		case "--status-fd":
			if len(args) < 2 {
				return nil, errors.New("--status-fd needs a descriptor")
			}
			fd, err := fdArg(args[1])
			if err != nil {
				return nil, err
			}
			statusFD, args = fd, args[2:]
		case "--dir":
			if len(args) < 2 || args[1] == "" {
				return nil, errors.New("--dir needs a directory")
			}
			dir, args = args[1], args[2:]
		case "--":
			if len(args) < 2 {
				return nil, errors.New("no command after --")
			}
			path, ok := os.LookupEnv("PATH")
			if !ok {
				path = DefaultPath
			}
			return &Config{Argv: args[1:], Env: os.Environ(), Path: path, Dir: dir, StatusFD: statusFD,
				UID: uint32(os.Getuid()), GID: uint32(os.Getgid())}, nil
		default:
			return nil, fmt.Errorf("unknown argument %q", a)
		}
	}
	return nil, errors.New("no command")
}

func fdArg(s string) (int, error) {
	fd, err := strconv.Atoi(s)
	if err != nil || fd < 3 {
		return 0, fmt.Errorf("descriptor %q: want a number of 3 or more", s)
	}
	return fd, nil
}

// closeOnExec marks every descriptor above stderr close-on-exec.
func closeOnExec() error {
	err := unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC)
	if err == nil {
		return nil
	}
	// Before Linux 5.11: one at a time.
	ents, rerr := os.ReadDir("/proc/self/fd")
	if rerr != nil {
		return fmt.Errorf("close-on-exec: %v; %w", err, rerr)
	}
	for _, e := range ents {
		if fd, err := strconv.Atoi(e.Name()); err == nil && fd > 2 {
			_, _ = unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC)
		}
	}
	return nil
}

type notFoundError struct{ file string }

func (e *notFoundError) Error() string { return fmt.Sprintf("exec: %q: not found", e.file) }

// start sets the sandbox up as cfg says and starts the workload; it
// returns the workload's pid.
func start(cfg *Config) (int, error) {
	// Privileges are dropped on this thread and the workload is forked
	// from it (the bounding set and capabilities are per thread).
	runtime.LockOSThread()
	if cfg.Sandbox != nil {
		if err := buildRoot(cfg.Sandbox); err != nil {
			return 0, err
		}
	}
	if cfg.Hostname != "" {
		if err := unix.Sethostname([]byte(cfg.Hostname)); err != nil {
			return 0, fail("sethostname", err)
		}
	}
	if cfg.Sandbox != nil || cfg.UID != uint32(os.Getuid()) || cfg.GID != uint32(os.Getgid()) {
		if err := dropPrivileges(cfg); err != nil {
			return 0, err
		}
	}
	if cfg.Dir != "" {
		if err := unix.Chdir(cfg.Dir); err != nil {
			return 0, fail(fmt.Sprintf("working directory %q", cfg.Dir), err)
		}
	}
	path, err := lookPath(cfg.Argv[0], cfg.Path)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, &notFoundError{cfg.Argv[0]}
	}
	if err != nil {
		return 0, fail(fmt.Sprintf("exec %q", cfg.Argv[0]), err)
	}
	env := cfg.Env
	if env == nil {
		env = []string{}
	}
	pid, err := syscall.ForkExec(path, cfg.Argv, &syscall.ProcAttr{Env: env, Files: []uintptr{0, 1, 2}})
	if err != nil {
		return 0, fail(fmt.Sprintf("exec %q", cfg.Argv[0]), err)
	}
	runtime.UnlockOSThread()
	if os.Getpid() != 1 {
		// Not a namespace's init: adopt the workload's orphans anyway.
		_ = unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
	}
	return pid, nil
}

// reap waits for every child, the workload's orphans too, until the
// workload itself has exited; then it sends how it ended. A blocking wait
// needs no SIGCHLD handler (and no os/signal round trip for one).
func reap(child int, exited chan<- Report) {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, 0, nil)
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			// ECHILD: cannot happen while the workload is unreaped.
			exited <- Report{Kind: Failed, Text: "wait: " + err.Error()}
			return
		case pid != child:
			continue // an orphan, reaped
		case ws.Signaled():
			exited <- Report{Kind: Signaled, Code: int(ws.Signal())}
		default:
			exited <- Report{Kind: Exited, Code: ws.ExitStatus()}
		}
		return
	}
}

// supervise forwards signals to the workload until it has exited; it
// returns how it ended.
func supervise(child int, sigs <-chan os.Signal, exited <-chan Report) Report {
	for {
		select {
		case s := <-sigs:
			_ = unix.Kill(child, s.(syscall.Signal))
		case r := <-exited:
			return r
		}
	}
}

// send writes r to the status descriptor, if any. A reader that has gone
// (an agent that restarted) is no reason to stop.
func send(status *os.File, r Report) {
	if status != nil {
		_, _ = status.Write(r.Line())
	}
}
