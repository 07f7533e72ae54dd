package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	osexec "os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/shim-run/shim/exec"
	"github.com/shim-run/shim/guard"
)

// guardPIDFile holds the pid of the data dir's guard.
const guardPIDFile = "guard.pid"

// guardCommand is the hidden `shimd guard` subcommand: the node's dead-man
// switch (package guard). shimd starts it; it outlives shimd, and kills the
// node's sandboxes if shimd's lease runs out while shimd is dead or paused.
func guardCommand() *cobra.Command {
	var name, dataDir, cluster string
	cmd := &cobra.Command{
		Use:    "guard",
		Short:  "the node's dead-man switch (started by shimd)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("guard", name)
			f, err := guard.Open(filepath.Join(dataDir, guard.FileName), false)
			if err != nil {
				return err
			}
			defer f.Close()
			if cluster == "" {
				return errors.New("guard: --cluster is required")
			}
			rt, err := newRuntime(cluster, name, "", log)
			if err != nil {
				return err
			}
			rt.protect = guard.NewProtector(filepath.Join(dataDir, guard.PIDFileName))
			rt.keepDir = filepath.Join(dataDir, keepDirName)
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			log.Info("guard started", "data", dataDir)
			err = (&guard.Guard{File: f, Kill: rt.fence, Cleanup: rt.RemoveAll, Log: log,
				Record: filepath.Join(dataDir, guard.FencedFileName)}).Run(ctx)
			if err == context.Canceled {
				return nil
			}
			return err
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "node name")
	cmd.Flags().StringVar(&dataDir, "data-dir", "", "shimd's data dir")
	cmd.Flags().StringVar(&cluster, "cluster", "", "the cluster's ID (names the cgroup root with --name)")
	return cmd
}

// startGuard makes sure a guard runs for dataDir and cluster: the one in
// guard.pid if it is alive, else a new one, detached in its own session (a
// guard of dataDir for another cluster root, from an older shimd, is
// stopped). Call it with the data dir locked and its lease file created.
func startGuard(dataDir, cluster, name string, log *slog.Logger) error {
	dir, err := filepath.Abs(dataDir)
	if err != nil {
		return fmt.Errorf("guard: %w", err)
	}
	pidPath := filepath.Join(dir, guardPIDFile)
	if b, err := os.ReadFile(pidPath); err == nil {
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && isGuard(pid, dir) {
			if isGuard(pid, cluster) {
				log.Info("guard already running", "pid", pid)
				return nil
			}
			log.Info("stopping the guard of an older cgroup root", "pid", pid)
			_ = syscall.Kill(pid, syscall.SIGTERM)
		}
	}
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("guard: %w", err)
	}
	out, err := os.OpenFile(filepath.Join(dir, "guard.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("guard: %w", err)
	}
	defer out.Close()
	cmd := osexec.Command(exe, "guard", "--name", name, "--data-dir", dir, "--cluster", cluster)
	cmd.Stdout, cmd.Stderr, cmd.Dir = out, out, "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true} // not stopped or killed with shimd's session
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start guard: %w", err)
	}
	go func() { _ = cmd.Wait() }() // reap it should it end while shimd runs
	if err := os.WriteFile(pidPath, []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o644); err != nil {
		return fmt.Errorf("guard: %w", err)
	}
	log.Info("guard started", "pid", cmd.Process.Pid)
	return nil
}

// resumeLease returns the deadline of the lease the previous shimd held, as
// its guard still enforces it: the adopted processes may run until then. It
// is capped at longest from now (CLOCK_MONOTONIC restarts at boot, so a file
// from before a reboot could otherwise promise years).
func resumeLease(f *guard.File, longest time.Duration) time.Time {
	d := f.Get()
	if d == 0 {
		return time.Time{}
	}
	left := min(time.Duration(d-guard.Monotonic()), longest)
	return time.Now().Add(left)
}

// isGuard reports whether pid is a live guard with arg (its data dir, its
// cluster) among its arguments.
func isGuard(pid int, arg string) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return false
	}
	args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
	if len(args) < 2 || args[1] != "guard" || !slices.Contains(args, arg) {
		return false
	}
	st, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(st), ')')
	return i > 0 && i+2 < len(st) && st[i+2] != 'Z' && st[i+2] != 'X'
}

// fence is the guard's kill: SIGKILL to every process in every sandbox of
// the node (of this cluster: the root says so), at once, as KillAll sends
// it, and the sandboxes that had any, for the guard's record (a restarted
// agent reports their processes as fenced). Never a shimd or a guard
// (guard.Protector): a shimd thread may sit in a sandbox while it starts a
// process.
func (e *execRuntime) fence() ([]guard.Sandbox, error) {
	names, err := e.cg.List()
	if err != nil {
		return nil, err
	}
	var killed []guard.Sandbox
	for _, n := range names {
		if e.kept(n) {
			continue // on-lost keep: runs on while the node is cut off
		}
		g, err := e.cg.Open(n)
		if err != nil {
			continue
		}
		pids, _ := g.Procs()
		hit := false
		for _, pid := range pids {
			if pid == os.Getpid() || (e.protect != nil && e.protect.Protected(pid)) {
				continue
			}
			if syscall.Kill(pid, syscall.SIGKILL) == nil {
				hit = true
			}
		}
		if id, inc, ok := exec.ParseGroupName(n); ok && hit {
			killed = append(killed, guard.Sandbox{ID: id, Incarnation: inc})
		}
	}
	return killed, nil
}
