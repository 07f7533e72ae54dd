package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/shim-run/shim/agent"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/server"
)

// shim exec on this node: the command enters the process's namespaces
// (mount, UTS, IPC, network, PID, cgroup) with nsenter(1), its root and
// working directory, its cgroups and its user, with the workload's
// environment. A small host shell joins the cgroups first, so that
// everything the command starts is in them from its first instruction.

// execLocal returns the Server.ExecLocal of this node.
func execLocal(ag *agent.Agent) func(ctx context.Context, st *pb.ExecStart, eio server.ExecIO) (int, error) {
	return func(ctx context.Context, st *pb.ExecStart, eio server.ExecIO) (int, error) {
		pid, rec, ok := ag.RunningPID(st.Id)
		if !ok {
			return 0, fmt.Errorf("process %s does not run on this node now", st.Id)
		}
		if rec.GetSpec().GetIsolation() == pb.Isolation_ISOLATION_VM {
			return 0, errors.New("exec into a VM is not supported")
		}
		target := workloadPID(pid)
		cmd, err := enterCommand(ctx, target, st.Command)
		if err != nil {
			return 0, err
		}
		var master, slave *os.File
		if st.Tty {
			m, sl, err := openPTY()
			if err != nil {
				return 0, fmt.Errorf("terminal: %w", err)
			}
			defer m.Close()
			defer sl.Close()
			master, slave = m, sl
			setSize(m, st.Size)
			cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
			cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
		} else {
			cmd.Stdout, cmd.Stderr = eio.Stdout, eio.Stderr
			cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
			if eio.Stdin != nil {
				w, err := cmd.StdinPipe()
				if err != nil {
					return 0, err
				}
				go func() { _, _ = io.Copy(w, eio.Stdin); w.Close() }()
			}
		}
		if err := cmd.Start(); err != nil {
			return 0, err
		}
		if master != nil {
			slave.Close() // the command holds it: its end ends the output
			go func() { _, _ = io.Copy(master, eio.Stdin) }()
			go func() {
				for sz := range eio.Resize {
					setSize(master, sz)
				}
			}()
			done := make(chan struct{})
			go func() { _, _ = io.Copy(eio.Stdout, master); close(done) }()
			err := cmd.Wait()
			select {
			case <-done:
			case <-time.After(time.Second): // a grandchild holds the terminal
			}
			return exitCode(err)
		}
		return exitCode(cmd.Wait())
	}
}

func exitCode(err error) (int, error) {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return 128 + int(ws.Signal()), nil
		}
		return ee.ExitCode(), nil
	}
	if err != nil {
		return 0, err
	}
	return 0, nil
}

// workloadPID is the workload inside the sandbox whose init is pid: its
// first child, or pid itself. The init is a Go program: the thread that
// forked the workload may be any of its threads, so every thread's
// children are looked at.
func workloadPID(pid int) int {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue
		}
		if f := strings.Fields(string(b)); len(f) > 0 {
			if c, err := strconv.Atoi(f[0]); err == nil {
				return c
			}
		}
	}
	return pid
}

// enterCommand builds the command that runs argv in pid's sandbox.
func enterCommand(ctx context.Context, pid int, argv []string) (*exec.Cmd, error) {
	cgs, err := cgroupProcs(pid)
	if err != nil {
		return nil, err
	}
	uid, gid, err := procIDs(pid)
	if err != nil {
		return nil, err
	}
	env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		return nil, fmt.Errorf("its environment: %w", err)
	}
	nsenter, err := exec.LookPath("nsenter")
	if err != nil {
		return nil, errors.New("nsenter (util-linux) is not installed on this node")
	}
	p := strconv.Itoa(pid)
	args := []string{"-c", `for p in $SHIM_EXEC_CGROUPS; do echo $$ > "$p" || exit 126; done; unset SHIM_EXEC_CGROUPS; exec "$@"`, "sh",
		nsenter, "-t", p, "-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w", "-S", uid, "-G", gid, "--"}
	cmd := exec.CommandContext(ctx, "/bin/sh", append(args, argv...)...)
	for _, e := range strings.Split(string(env), "\x00") {
		if e != "" && !strings.HasPrefix(e, "SHIM_TOKEN=") {
			cmd.Env = append(cmd.Env, e)
		}
	}
	cmd.Env = append(cmd.Env, "SHIM_EXEC_CGROUPS="+strings.Join(cgs, " "))
	return cmd, nil
}

// cgroupProcs lists the cgroup.procs files of pid's cgroups, as this
// (host) process sees them.
func cgroupProcs(pid int) ([]string, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return nil, fmt.Errorf("its cgroups: %w", err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 || strings.ContainsAny(parts[2], " \t") {
			continue
		}
		var roots []string
		switch c := parts[1]; {
		case c == "":
			roots = []string{"/sys/fs/cgroup/unified", "/sys/fs/cgroup"}
		case strings.HasPrefix(c, "name="):
			roots = []string{"/sys/fs/cgroup/" + strings.TrimPrefix(c, "name=")}
		default:
			roots = []string{"/sys/fs/cgroup/" + c}
		}
		for _, r := range roots {
			p := filepath.Join(r, parts[2], "cgroup.procs")
			if _, err := os.Stat(p); err == nil {
				out = append(out, p)
				break
			}
		}
	}
	return out, sc.Err()
}

// procIDs returns pid's real user and group ids.
func procIDs(pid int) (string, string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return "", "", fmt.Errorf("its user: %w", err)
	}
	var uid, gid string
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 {
			switch f[0] {
			case "Uid:":
				uid = f[1]
			case "Gid:":
				gid = f[1]
			}
		}
	}
	if uid == "" || gid == "" {
		return "", "", errors.New("its user: not in /proc status")
	}
	return uid, gid, nil
}

// openPTY opens a new pseudo-terminal pair.
func openPTY() (*os.File, *os.File, error) {
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		m.Close()
		return nil, nil, err
	}
	n, err := unix.IoctlGetInt(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		m.Close()
		return nil, nil, err
	}
	s, err := os.OpenFile("/dev/pts/"+strconv.Itoa(n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		m.Close()
		return nil, nil, err
	}
	return m, s, nil
}

func setSize(f *os.File, sz *pb.TermSize) {
	if sz == nil || sz.Rows == 0 || sz.Cols == 0 {
		return
	}
	_ = unix.IoctlSetWinsize(int(f.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: uint16(sz.Rows), Col: uint16(sz.Cols)})
}
