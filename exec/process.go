package exec

import (
	"errors"
	"fmt"
	"strconv"
	"syscall"
	"time"

	"github.com/shim-run/shim/cgroup"
	"github.com/shim-run/shim/pid1"
	"golang.org/x/sys/unix"
)

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
