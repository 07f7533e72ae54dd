package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/shim-run/shim/agent"
	"github.com/shim-run/shim/cgroup"
	"github.com/shim-run/shim/exec"
	"github.com/shim-run/shim/exec/vm"
	"github.com/shim-run/shim/guard"
	pb "github.com/shim-run/shim/proto/shimv1"
)

// execRuntime adapts the exec and exec/vm packages to agent.Runtime: VM
// processes (isolation vm) go to exec/vm, the rest to exec. Both name a
// process's cgroup alike below the node's root, so the fence (KillAll, the
// guard's) kills QEMU with everything else; Existing, Adopt and Remove ask
// the VM runtime first (vm.Owns), since exec also lists a VM's cgroup.
type execRuntime struct {
	rt  *exec.Runtime
	vm  *vm.Runtime // VMs, and what earlier VMs left (even where noVM)
	cg  *cgroup.Manager
	log *slog.Logger
	// noVM is why this node cannot run VMs (vm's Check, one line); "" if
	// it can.
	noVM string
	// protect, in the guard, says whom fence must not kill.
	protect *guard.Protector
	// keepDir holds a marker per sandbox with on-lost keep (its group's
	// name): the fence, the agent's (KillAll) and the guard's, spares
	// those sandboxes. "" = none.
	keepDir string
	// onWant is told when a VM's guest asks for more (agent.Want).
	onWant func(id string, inc uint64, memBytes, cpuMilli int64)
}

// vmStateDir holds a node's VM state directories (one per VM: QMP and
// control sockets, console log, vm.json); vmCacheDir the boot files all
// nodes of the host share.
func vmStateDir(cluster, node string) string { return filepath.Join("/run/shim", cluster, node, "vm") }

const vmCacheDir = "/run/shim/vm-cache"

// newRuntime is the runtime of node in cluster; init is shim-init ("" = next
// to the running executable, then in PATH).
func newRuntime(cluster, node, init string, log *slog.Logger) (*execRuntime, error) {
	m, err := cgroup.NewManager(cgroupRoot(cluster, node))
	if err != nil {
		return nil, fmt.Errorf("cgroups: %w", err)
	}
	e := &execRuntime{rt: &exec.Runtime{Cgroups: m, Init: init}, cg: m, log: log}
	vr := &vm.Runtime{Cgroups: m, Init: init, StateDir: vmStateDir(cluster, node), CacheDir: vmCacheDir}
	if vr.Init == "" {
		if p, err := e.initPath(); err == nil {
			vr.Init = p
		}
	}
	if err := vr.Check(); err != nil {
		e.noVM = oneLine(err)
	}
	e.vm = vr
	return e, nil
}

// initPath finds shim-init as exec does: next to this executable, then in
// PATH.
func (e *execRuntime) initPath() (string, error) {
	if e.rt.Init != "" {
		return e.rt.Init, nil
	}
	var cands []string
	if self, err := os.Executable(); err == nil {
		cands = append(cands, filepath.Join(filepath.Dir(self), exec.InitName))
	}
	for _, d := range filepath.SplitList(os.Getenv("PATH")) {
		if filepath.IsAbs(d) {
			cands = append(cands, filepath.Join(d, exec.InitName))
		}
	}
	for _, c := range cands {
		if st, err := os.Stat(c); err == nil && st.Mode().IsRegular() {
			return c, nil
		}
	}
	return "", fmt.Errorf("%s not found next to shimd or in PATH", exec.InitName)
}

// prepare readies the sandboxes ahead of the first start and says, in one
// line each, what does not work here: the process sandbox's template
// (starts then build their whole root, slower), shim-init itself (nothing
// starts), VMs (placement sends none here; the node record says why).
func (e *execRuntime) prepare() {
	if err := e.rt.Prepare(); err != nil {
		if _, ierr := e.initPath(); ierr != nil {
			e.log.Warn("no shim-init: no process can start on this node until it is installed next to shimd (or given with --init)", "err", oneLine(err))
		} else {
			e.log.Warn("the process sandbox's template could not be made: each start builds its whole root (slower); every isolation still works", "err", oneLine(err))
		}
	}
	if e.noVM != "" {
		e.log.Info("this node runs no VMs", "why", e.noVM)
		return
	}
	go func() { // the kernel and initramfs: about a second, off the start path
		if err := e.vm.Prepare(); err != nil {
			e.log.Warn("VM boot files could not be prepared; the first VM start tries again", "err", oneLine(err))
		}
	}()
}

func resources(r *pb.Resources) cgroup.Resources {
	return cgroup.Resources{
		CPUMinMilli: r.GetCpuMinMilli(), CPUMaxMilli: r.GetCpuMaxMilli(), CPUBurstMilli: r.GetCpuBurstMilli(),
		MemMinBytes: r.GetMemMinBytes(), MemMaxBytes: r.GetMemMaxBytes(), PidsMax: r.GetPidsMax(),
	}
}

// isolation maps the API's isolation; unspecified is the node's default,
// the process sandbox.
func isolation(i pb.Isolation) exec.Isolation {
	switch i {
	case pb.Isolation_ISOLATION_CONTAINER:
		return exec.IsolationContainer
	case pb.Isolation_ISOLATION_HOST:
		return exec.IsolationHost
	}
	return exec.IsolationProcess
}

// network maps the API's network mode; unspecified is the host's.
func network(n pb.Network) exec.Network {
	if n == pb.Network_NETWORK_NONE {
		return exec.NetworkNone
	}
	return exec.NetworkHost
}

func (e *execRuntime) Start(s agent.Spec) (agent.Proc, error) {
	if err := e.markKeep(s); err != nil {
		return nil, err
	}
	start := func() (agent.Proc, error) { return e.startExec(s) }
	if s.Isolation == pb.Isolation_ISOLATION_VM {
		start = func() (agent.Proc, error) { return e.startVM(s) }
	}
	p, err := start()
	if errors.Is(err, cgroup.ErrExists) {
		// The sandbox of a run that was just fenced or killed is still
		// being torn down: finish that, then start afresh.
		deadline := time.Now().Add(2 * time.Second)
		for errors.Is(err, cgroup.ErrExists) && time.Now().Before(deadline) {
			_ = e.Remove(s.ID, s.Incarnation)
			p, err = start()
			if errors.Is(err, cgroup.ErrExists) {
				time.Sleep(20 * time.Millisecond) // the kernel is still tearing the old group down
			}
		}
	}
	return p, err
}

func (e *execRuntime) startExec(s agent.Spec) (agent.Proc, error) {
	if err := workFolder(s); err != nil {
		return nil, err
	}
	spec := exec.Spec{
		ID: s.ID, Incarnation: s.Incarnation, Argv: s.Argv, Env: s.Env, Dir: s.Dir, WorkDir: s.WorkDir,
		Stdout: s.LogPath, Stderr: s.LogPath, Resources: resources(s.Resources),
		Isolation: isolation(s.Isolation), Network: network(s.Network), User: s.User, Rootfs: s.Rootfs,
	}
	for _, m := range s.Mounts {
		spec.Mounts = append(spec.Mounts, exec.Mount{Source: m.Source, Target: m.Target, ReadOnly: m.ReadOnly})
	}
	p, err := e.rt.Start(spec)
	if err != nil {
		return nil, err
	}
	return proc{p}, nil
}

// workFolder makes the work folder (its parents 0711: passable, not
// listable) with the cluster's CA in it (agent.CAFile); the runtime then
// gives the folder to the workload's user.
func workFolder(s agent.Spec) error {
	if s.WorkDir == "" {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(s.WorkDir), 0o711); err != nil {
		return fmt.Errorf("work folder: %w", err)
	}
	if err := os.Mkdir(s.WorkDir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("work folder: %w", err)
	}
	if len(s.CA) > 0 {
		ca := filepath.Join(s.WorkDir, agent.CAFile)
		_ = os.Remove(ca) // a workload may have put something else there
		if err := os.WriteFile(ca, s.CA, 0o644); err != nil {
			return fmt.Errorf("work folder: %w", err)
		}
	}
	return nil
}

// vmUser is the guest user for a spec's: "" is nobody, as in a sandbox.
func vmUser(u string) (user string, uid, gid int, err error) {
	if u == "" {
		u = "65534:65534"
	}
	us, gs, hasG := strings.Cut(u, ":")
	a, err := strconv.ParseUint(us, 10, 32)
	b := a
	if err == nil && hasG {
		b, err = strconv.ParseUint(gs, 10, 32)
	}
	if err != nil {
		return "", 0, 0, fmt.Errorf("user %q: want UID[:GID]: %w", u, exec.ErrInvalid)
	}
	return u, int(a), int(b), nil
}

// vmGrant is the grant a VM boots at: the one its spec starts at (the
// table's), else its minimum; 0 is exec/vm's default. Its memory boots at
// the grant's and its vCPUs are ceil(CPU grant).
func vmGrant(s agent.Spec) (memBytes, cpuMilli int64) {
	if g := s.Grant; g != nil {
		return g.GetMemBytes(), g.GetCpuMilli()
	}
	return s.Resources.GetMemMinBytes(), s.Resources.GetCpuMinMilli()
}

func (e *execRuntime) startVM(s agent.Spec) (agent.Proc, error) {
	if e.noVM != "" {
		return nil, fmt.Errorf("this node runs no VMs: %s", e.noVM)
	}
	user, uid, gid, err := vmUser(s.User)
	if err != nil {
		return nil, err
	}
	if err := workFolder(s); err != nil {
		return nil, err
	}
	// The guest shares the work folder at its host path, with its host
	// owner.
	if err := os.Lchown(s.WorkDir, uid, gid); err != nil {
		return nil, fmt.Errorf("work folder: %w", err)
	}
	// The log, as exec makes it: 0600 in a 0700 folder (QEMU appends).
	if err := os.MkdirAll(filepath.Dir(s.LogPath), 0o700); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(s.LogPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, err
	}
	f.Close()
	mem, cpu := vmGrant(s)
	v, err := e.vm.Start(vm.Spec{
		ID: s.ID, Incarnation: s.Incarnation, Argv: s.Argv, Env: s.Env, Dir: s.WorkDir,
		Stdout: s.LogPath, Stderr: s.LogPath, User: user, Resources: resources(s.Resources),
		GrantMemBytes: mem, GrantCPUMilli: cpu,
	})
	if err != nil {
		return nil, err
	}
	e.watchWants(s.ID, s.Incarnation, v)
	return vmProc{v}, nil
}

// watchWants passes a VM's requests for more to onWant.
func (e *execRuntime) watchWants(id string, inc uint64, v *vm.VM) {
	if e.onWant != nil {
		v.OnWant(func(mem, cpu int64) { e.onWant(id, inc, mem, cpu) })
	}
}

func (e *execRuntime) Adopt(id string, inc uint64, pid int, startTime uint64) (agent.Proc, error) {
	if e.vm.Owns(id, inc) {
		v, err := e.vm.Adopt(id, inc, pid, startTime)
		if err != nil {
			return nil, err
		}
		e.watchWants(id, inc, v)
		return vmProc{v}, nil
	}
	p, err := e.rt.Adopt(id, inc, pid, startTime)
	if err != nil {
		return nil, err
	}
	return proc{p}, nil
}

func (e *execRuntime) Existing() ([]agent.Found, error) {
	ex, err := e.rt.Existing()
	if err != nil {
		return nil, err
	}
	out := make([]agent.Found, 0, len(ex))
	for _, x := range ex {
		if e.vm.Owns(x.ID, x.Incarnation) {
			continue // listed below: exec sees only its cgroup, with no PID
		}
		out = append(out, agent.Found{ID: x.ID, Incarnation: x.Incarnation})
	}
	vms, err := e.vm.Existing()
	if err != nil {
		return nil, err
	}
	for _, x := range vms {
		out = append(out, agent.Found{ID: x.ID, Incarnation: x.Incarnation})
	}
	return out, nil
}

// Remove kills and deletes a sandbox (or VM) that will not be adopted.
func (e *execRuntime) Remove(id string, inc uint64) error {
	if e.keepDir != "" {
		_ = os.Remove(filepath.Join(e.keepDir, exec.GroupName(id, inc)))
	}
	if e.vm.Owns(id, inc) {
		return e.vm.Remove(id, inc)
	}
	return e.removeGroup(exec.GroupName(id, inc))
}

// removeGroup kills what runs in a sandbox's group and deletes the group.
func (e *execRuntime) removeGroup(name string) error {
	g, err := e.cg.Open(name)
	if err != nil {
		return err
	}
	if err := g.Kill(); err != nil {
		return err
	}
	return g.Delete()
}

// proc adapts *exec.Process to agent.Proc.
type proc struct{ p *exec.Process }

func (p proc) PID() int                        { return p.p.PID() }
func (p proc) StartTime() uint64               { return p.p.StartTime() }
func (p proc) Signal(sig syscall.Signal) error { return p.p.Signal(sig) }
func (p proc) Kill() error                     { return p.p.Kill() }
func (p proc) Done() <-chan struct{}           { return p.p.Done() }
func (p proc) Resize(r *pb.Resources) error    { return p.p.Resize(resources(r)) }
func (p proc) Stats() (*pb.Usage, error) {
	cpu, mem, err := p.p.Sample()
	if err != nil {
		return nil, err
	}
	return &pb.Usage{CpuUsageNanos: cpu, MemoryBytes: mem}, nil
}
func (p proc) Exit() agent.Exit { return agentExit(p.p.Exit()) }

func agentExit(x exec.Exit) agent.Exit {
	return agent.Exit{Code: x.Code, Signal: x.Signal, OOMKilled: x.OOMKilled, Reason: x.Reason}
}

// vmProc adapts *vm.VM to agent.Proc and agent.GrantResizer: a VM's size
// is its grant, which the agent applies with ResizeGrant (hot-plugging
// memory and vCPUs) within the ceiling fixed at boot (the server refuses
// raising that). New bounds change nothing in a running VM by themselves:
// the grant they bring does.
type vmProc struct{ v *vm.VM }

func (p vmProc) PID() int                        { return p.v.PID() }
func (p vmProc) StartTime() uint64               { return p.v.StartTime() }
func (p vmProc) Signal(sig syscall.Signal) error { return p.v.Signal(sig) }
func (p vmProc) Kill() error                     { return p.v.Kill() }
func (p vmProc) Done() <-chan struct{}           { return p.v.Done() }
func (p vmProc) Exit() agent.Exit                { return agentExit(p.v.Exit()) }
func (p vmProc) Resize(*pb.Resources) error      { return nil }

// ResizeGrant moves the VM to a grant; a part that is 0 (a process with no
// minimum and no grant for it) keeps the size the VM has.
func (p vmProc) ResizeGrant(mem, cpu int64) error {
	if mem == 0 || cpu == 0 {
		st, err := p.v.Stats()
		if err != nil {
			return err
		}
		if mem == 0 {
			mem = st.GrantMem
		}
		if cpu == 0 {
			cpu = st.GrantCPU
		}
	}
	return p.v.Resize(mem, cpu)
}
func (p vmProc) Stats() (*pb.Usage, error) {
	st, err := p.v.Stats()
	if err != nil {
		return nil, err
	}
	return &pb.Usage{CpuUsageNanos: st.CPUUsageNanos, MemoryBytes: st.MemoryBytes, GuestMemTotalBytes: st.Guest.MemTotal}, nil
}

// RemoveAll kills what is left in this node's sandboxes and removes their
// cgroups, and the node's VMs' state: the node is gone.
func (e *execRuntime) RemoveAll() error {
	names, err := e.cg.List()
	if err != nil {
		return err
	}
	var errs []error
	for _, n := range names {
		if err := e.removeGroup(n); err != nil && !errors.Is(err, cgroup.ErrNotFound) {
			errs = append(errs, err)
		}
	}
	if err := e.vm.RemoveAll(); err != nil {
		errs = append(errs, err)
	} else {
		_ = os.Remove(e.vm.StateDir) // and the node's folder, if nothing else is left in it
		_ = os.Remove(filepath.Dir(e.vm.StateDir))
	}
	return errors.Join(errs...)
}

// KillAll sends SIGKILL to every process in every sandbox of this node at
// once: the fence, QEMU included. It neither freezes nor waits, so it takes
// about a millisecond per hundred processes.
func (e *execRuntime) KillAll() error {
	names, err := e.cg.List()
	if err != nil {
		return err
	}
	for _, n := range names {
		if e.kept(n) {
			continue // on-lost keep: runs on while the node is cut off
		}
		g, err := e.cg.Open(n)
		if err != nil {
			continue
		}
		pids, _ := g.Procs()
		for _, pid := range pids {
			if pid != os.Getpid() {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	return nil
}

// markKeep writes (or, without Keep, removes) the on-lost keep marker of
// s's sandbox.
func (e *execRuntime) markKeep(s agent.Spec) error {
	if e.keepDir == "" {
		return nil
	}
	p := filepath.Join(e.keepDir, exec.GroupName(s.ID, s.Incarnation))
	if !s.Keep {
		_ = os.Remove(p)
		return nil
	}
	if err := os.MkdirAll(e.keepDir, 0o700); err != nil {
		return fmt.Errorf("on-lost keep: %w", err)
	}
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		return fmt.Errorf("on-lost keep: %w", err)
	}
	return nil
}

// kept reports whether the sandbox group name has on-lost keep.
func (e *execRuntime) kept(name string) bool {
	if e.keepDir == "" {
		return false
	}
	_, err := os.Stat(filepath.Join(e.keepDir, name))
	return err == nil
}
