package vm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/shim-run/shim/cgroup"
	"github.com/shim-run/shim/exec"
	"github.com/shim-run/shim/pid1/guest"
	"golang.org/x/sys/unix"
)

// onMsg handles a message from the guest (on the control reader).
func (v *VM) onMsg(m guest.Msg) {
	switch m.Kind {
	case guest.KindMem:
		v.mu.Lock()
		v.view = GuestView{MemTotal: m.A, MemAvailable: m.B, CPUs: int(m.C), At: time.Now()}
		close(v.statc)
		v.statc = make(chan struct{})
		v.mu.Unlock()
	case guest.KindStarted:
		v.mu.Lock()
		v.started = time.Now()
		v.mu.Unlock()
	case guest.KindExit, guest.KindFail:
		v.mu.Lock()
		v.guestEnd = &m
		v.mu.Unlock()
	case guest.KindWant:
		w := [2]int64{m.A, m.B}
		for {
			select {
			case v.wantc <- w:
				return
			default:
			}
			select {
			case <-v.wantc: // drop the older request
			default:
			}
		}
	}
}

// wants calls the OnWant function with the latest request, one at a time.
func (v *VM) wants() {
	for {
		select {
		case <-v.done:
			return
		case w := <-v.wantc:
			f := v.onWant.Load()
			if f == nil {
				continue
			}
			// The guest asks in MemTotal terms; MemTotal is less than
			// the grant by what its kernel keeps for itself.
			v.mu.Lock()
			seen := v.view.MemTotal
			v.mu.Unlock()
			if w[0] > 0 && seen > 0 {
				v.resizeMu.Lock()
				w[0] = roundUp(w[0]+max(v.plan.GrantMem-seen, 0), MemBlock)
				v.resizeMu.Unlock()
			}
			(*f)(w[0], w[1])
		}
	}
}

// OnWant sets the function called when the guest asks for more: memBytes is
// the memory grant it wants (0 = no change; the guest's MemTotal request
// plus what its kernel keeps), cpuMilli the CPU (0 = no change). Calls come one at a time from one goroutine, only the latest
// request if several arrive meanwhile; f may call Resize.
func (v *VM) OnWant(f func(memBytes, cpuMilli int64)) {
	if f == nil {
		v.onWant.Store(nil)
		return
	}
	v.onWant.Store(&f)
}

// PID returns QEMU's process id.
func (v *VM) PID() int { return v.pid }

// StartTime returns QEMU's start time (field 22 of /proc/PID/stat).
func (v *VM) StartTime() uint64 { return v.start }

// Done is closed once QEMU has exited and the cgroup and state are gone.
func (v *VM) Done() <-chan struct{} { return v.done }

// Exit returns how the workload ended. Valid after Done is closed.
func (v *VM) Exit() exec.Exit {
	select {
	case <-v.done:
		return v.exit
	default:
		return exec.Exit{Code: -1, Reason: "still running"}
	}
}

// Started returns when the guest reported that the workload started (zero
// if it has not, or the report went to an earlier agent).
func (v *VM) Started() time.Time {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.started
}

func (v *VM) exited() bool {
	select {
	case <-v.done:
		return true
	default:
		return false
	}
}

// Signal forwards sig to the workload through the control channel.
func (v *VM) Signal(sig syscall.Signal) error {
	if v.exited() {
		return fmt.Errorf("signal %s: %w", v.name, ErrExited)
	}
	if err := v.ctl.send(guest.Msg{Kind: guest.KindSignal, A: int64(sig)}, 2*time.Second); err != nil {
		if v.exited() {
			return fmt.Errorf("signal %s: %w", v.name, ErrExited)
		}
		return fmt.Errorf("signal %s: %w", v.name, err)
	}
	return nil
}

// Kill SIGKILLs everything in the VM's cgroup (QEMU and its threads) at
// once. It returns once they are signalled; Done reports the end.
func (v *VM) Kill() error {
	v.killed.Store(true)
	err := v.group.Kill()
	if errors.Is(err, cgroup.ErrNotFound) {
		rc, err := v.pidfd.SyscallConn()
		if err != nil {
			return nil
		}
		_ = rc.Control(func(fd uintptr) { _ = unix.PidfdSendSignal(int(fd), unix.SIGKILL, nil, 0) })
		return nil
	}
	return err
}

// Stop ends the VM gently: SIGTERM to the workload, then after grace a QMP
// quit, then Kill. It returns once the VM is gone.
func (v *VM) Stop(grace time.Duration) error {
	if v.exited() {
		return nil
	}
	_ = v.Signal(syscall.SIGTERM)
	select {
	case <-v.done:
		return nil
	case <-time.After(grace):
	}
	v.resizeMu.Lock()
	if q, err := v.qmpLocked(); err == nil {
		_ = q.run("quit", nil, nil)
	}
	v.resizeMu.Unlock()
	select {
	case <-v.done:
		return nil
	case <-time.After(2 * time.Second):
	}
	if err := v.Kill(); err != nil {
		return err
	}
	<-v.done
	return nil
}

// Stats returns the cgroup's usage, the guest's last report and the grant.
func (v *VM) Stats() (Stats, error) {
	if v.exited() {
		return Stats{}, fmt.Errorf("stats %s: %w", v.name, ErrExited)
	}
	u, err := v.group.Stats()
	if err != nil {
		if v.exited() {
			return Stats{}, fmt.Errorf("stats %s: %w", v.name, ErrExited)
		}
		return Stats{}, err
	}
	st := Stats{Usage: u}
	v.mu.Lock()
	st.Guest = v.view
	v.mu.Unlock()
	v.resizeMu.Lock()
	st.GrantMem, st.GrantCPU, st.VCPUs = v.plan.GrantMem, v.plan.GrantCPU, v.plan.VCPUs
	v.resizeMu.Unlock()
	return st, nil
}

// Sample returns the CPU time and memory charged to the VM's cgroup.
func (v *VM) Sample() (cpuNanos, memBytes uint64, err error) {
	if v.exited() {
		return 0, 0, fmt.Errorf("sample %s: %w", v.name, ErrExited)
	}
	cpuNanos, memBytes, err = v.group.Sample()
	if err != nil && v.exited() {
		return 0, 0, fmt.Errorf("sample %s: %w", v.name, ErrExited)
	}
	return cpuNanos, memBytes, err
}

// GuestStat asks the guest for a fresh report and waits up to timeout.
func (v *VM) GuestStat(timeout time.Duration) (GuestView, error) {
	v.mu.Lock()
	c := v.statc
	v.mu.Unlock()
	if err := v.ctl.send(guest.Msg{Kind: guest.KindStat}, timeout); err != nil {
		return GuestView{}, fmt.Errorf("guest stat %s: %w", v.name, err)
	}
	select {
	case <-c:
	case <-v.done:
		return GuestView{}, fmt.Errorf("guest stat %s: %w", v.name, ErrExited)
	case <-time.After(timeout):
		return GuestView{}, fmt.Errorf("guest stat %s: no answer within %v", v.name, timeout)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.view, nil
}

// wait is the one goroutine per VM that waits for QEMU to exit (parked on
// its pidfd in the netpoller), works out the workload's exit, removes the
// cgroup and the state directory and closes done.
func (v *VM) wait() {
	rc, err := v.pidfd.SyscallConn()
	if err == nil {
		err = rc.Read(func(fd uintptr) bool { return pidfdReady(int(fd), 0) })
	}
	if err != nil {
		for !pidfdReady(int(v.pidfd.Fd()), -1) {
		}
	}
	var ws syscall.WaitStatus
	reaped := false
	if v.child {
		for {
			_, err := syscall.Wait4(v.pid, &ws, 0, nil)
			if err != syscall.EINTR {
				reaped = err == nil
				break
			}
		}
	}
	v.ctl.drain(500 * time.Millisecond)
	v.resizeMu.Lock()
	if v.qmp != nil {
		v.qmp.close()
		v.qmp = nil
	}
	v.resizeMu.Unlock()
	e := v.exitStatus(ws, reaped)
	_ = v.group.Kill()
	_ = v.group.Delete()
	_ = os.RemoveAll(v.dir)
	v.pidfd.Close()
	v.exit = e
	close(v.done)
}

// exitStatus works out how the workload ended: the guest's report on the
// control channel, else the one it wrote to the console, else from how
// QEMU ended.
func (v *VM) exitStatus(ws syscall.WaitStatus, reaped bool) exec.Exit {
	v.mu.Lock()
	end := v.guestEnd
	v.mu.Unlock()
	if end == nil {
		end = consoleEnd(filepath.Join(v.dir, fileConsole))
	}
	oom := false
	if u, err := v.group.Stats(); err == nil && u.OOMKills > v.oom {
		oom = true
	}
	switch {
	case end != nil && end.Kind == guest.KindExit && !end.Signal:
		return exec.Exit{Code: int(end.A), Reason: exec.ReasonExited}
	case end != nil && end.Kind == guest.KindExit:
		e := exec.Exit{Code: -1, Signal: unix.SignalName(syscall.Signal(end.A)), Reason: exec.ReasonSignaled}
		if e.Signal == "" {
			e.Signal = "signal " + strconv.FormatInt(end.A, 10)
		}
		if end.OOM {
			e.OOMKilled, e.Reason = true, exec.ReasonOOMKilled+" (in the guest)"
		}
		return e
	case end != nil && end.Kind == guest.KindFail:
		return exec.Exit{Code: -1, Reason: "guest: " + end.Text}
	case oom:
		return exec.Exit{Code: -1, Signal: "SIGKILL", OOMKilled: true, Reason: exec.ReasonOOMKilled + " (QEMU, by its cgroup)"}
	case v.killed.Load():
		return exec.Exit{Code: -1, Signal: "SIGKILL", Reason: exec.ReasonKilled}
	}
	// QEMU ended on its own: say how, with its last word.
	why := "vm ended without the workload's exit status"
	switch {
	case reaped && ws.Signaled():
		why = "QEMU was killed by " + unix.SignalName(ws.Signal())
	case reaped:
		why += " (QEMU exited " + strconv.Itoa(ws.ExitStatus()) + ")"
	}
	if l := lastLine(filepath.Join(v.dir, fileQEMULog)); l != "" {
		why += ": " + l
	}
	e := exec.Exit{Code: -1, Reason: why}
	if reaped && ws.Signaled() {
		e.Signal = unix.SignalName(ws.Signal())
	}
	return e
}

// consoleEnd finds the guest init's last exit or fail report on the
// serial console.
func consoleEnd(path string) *guest.Msg {
	b, err := readTail(path, 64<<10)
	if err != nil {
		return nil
	}
	lines := strings.Split(string(b), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		l := strings.TrimRight(lines[i], "\r")
		rest, ok := strings.CutPrefix(l, guest.ConsolePrefix)
		if !ok {
			continue
		}
		if m, err := guest.ParseMsg(rest); err == nil && (m.Kind == guest.KindExit || m.Kind == guest.KindFail) {
			return &m
		}
	}
	return nil
}

// pidfdReady reports whether the process behind a pidfd has exited.
func pidfdReady(fd, timeoutMs int) bool {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, timeoutMs)
	return err == nil && n > 0 && fds[0].Revents != 0
}
