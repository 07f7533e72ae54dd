// Package vm runs a workload in its own small VM: QEMU booting the host's
// kernel with shim's own initramfs, bounded as a whole by a cgroup, and
// resized while it runs by hot-plugging memory and vCPUs.
//
// # Shape
//
// Start creates the workload's cgroup with the exec package's naming
// (exec.GroupName, below the Runtime's cgroup.Manager root, so the agent's
// fence and cleanup cover VMs too) and starts qemu-system-x86_64 in it from
// its first instruction (cgroup.Group.Spawn). QEMU runs q35 with KVM where
// it can boot a stock kernel (see kvmUsable) and TCG otherwise, with no
// display, no defaults and no network device: this first version offers
// none (the guest has lo only). A state directory <StateDir>/<id>.<inc>/
// holds what outlives the agent: the QMP and control sockets (listening
// sockets the runtime binds and QEMU inherits, so QEMU keeps accepting new
// clients after the agent goes), the serial console's log (the guest init
// writes the workload's exit there too), the guest's Config (fw_cfg) and
// vm.json (shape and grant, for Adopt). The workload's stdout and stderr
// are virtio-serial ports whose host ends are QEMU file chardevs appending
// to the log files directly: output never passes through the agent.
//
// The guest (pid1/guest) is shim's init in an initramfs built here at run
// time and cached (bootFiles): the static shim-init binary and the virtio,
// virtio-serial, virtio-mem, 9p and fw_cfg modules in dependency order
// (modules.dep), a newc cpio packed and gzipped in Go. The kernel is the
// host's newest /boot/vmlinuz-*, booted through its PVH entry point from
// an uncompressed copy in the cache where possible (under TCG a boot takes
// 2.1 s instead of 5.8 s). The guest sees the host's /usr, /etc, /bin...
// read-only and its working directory read-write (same path, host
// ownership) over 9p, with its own /tmp; the workload runs as Spec.User.
//
// # Sizes
//
// A Spec has bounds (Resources) and a starting grant. The VM's ceiling
// (maxmem, maxcpus) is fixed at start from the maxima; within it Resize
// moves the grant: memory through virtio-mem's requested-size, which grows
// and shrinks, vCPUs by device_add/device_del of hot-pluggable CPUs; the
// guest init onlines new vCPUs on their uevent, and the kernel onlines
// memory itself (memhp_default_state=online with the auto-movable policy:
// removable ZONE_MOVABLE memory up to 3x the boot memory, kernel-usable
// memory beyond, so that page tables and the memory map of a guest grown
// far past its boot memory still fit). The guest boots with newPlan's boot
// memory (the minimum, at least MinBootMem) and the rest of its grant
// already plugged, so it starts at its grant and can shrink back to the
// boot memory. The cgroup bounds all of QEMU: memory = guest memory +
// MemMargin, CPU quota = grant + CPUMarginMilli, pids = qemuPids (the
// workload's own PidsMax is not applied inside the guest).
//
// When the guest runs short of memory (or keeps every vCPU busy) its init
// asks over the control channel; the VM passes that to the function given
// to OnWant, which is expected to decide a new grant and call Resize.
//
// # QMP
//
// The QMP client is our own (qmp.go, 200 lines): the maintained Go library,
// github.com/digitalocean/go-qemu's qmp.SocketMonitor, decodes the
// handshake with a json.Decoder and then reads with a fresh bufio.Scanner,
// losing whatever the decoder had buffered (an event right after the
// handshake); it cannot time out a command; its event channel blocks the
// reader when not drained; and the package imports go-libvirt.
//
// # Process model
//
// A *VM is adaptable to the agent's Proc like exec.Process: PID (QEMU's),
// StartTime, Signal (forwarded to the workload), Kill (the whole cgroup),
// Done, Exit (the workload's own code or signal, reported by the guest;
// QEMU dying without a report is "killed" or unknown), Stats, Resize.
// Adopt reconnects to a running QEMU; Existing lists what a runtime left.
// Errors wrap exec's sentinels (exec.ErrInvalid, ErrNotFound, ErrGone,
// ErrExited).
//
// # Figures
//
// Measured with TestFigures (SHIM_VM_FIGURES=5) under TCG on 2 shared
// cores, QEMU 7.2, Debian kernel 6.1, medians of 5: boot to the workload's
// first line 2.2 s; memory hot-add (+256 MiB) to the guest's MemTotal
// 186 ms; vCPU hot-add to online 338 ms; QEMU's own anonymous memory
// beyond the guest's RAM 53 MiB (tb-size 32 MiB of it), plus 85 MiB of
// file-backed pages shared by all VMs (QEMU itself, and the kernel image
// QEMU keeps mapped).
package vm

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/shim-run/shim/cgroup"
	"github.com/shim-run/shim/exec"
	"github.com/shim-run/shim/pid1/guest"
	"golang.org/x/sys/unix"
)

// Sentinel errors: exec's, so that callers treat both runtimes alike.
var (
	ErrInvalid  = exec.ErrInvalid
	ErrNotFound = exec.ErrNotFound
	ErrGone     = exec.ErrGone
	ErrExited   = exec.ErrExited
)

// DefaultStateDir holds the VMs' state directories when Runtime.StateDir
// is empty.
const DefaultStateDir = "/run/shim/vm"

// startTimeout bounds QEMU's start up to its QMP greeting.
const startTimeout = 20 * time.Second

// Runtime starts and adopts VMs. Set Cgroups and Init; the rest has
// defaults. It is safe for concurrent use.
type Runtime struct {
	Cgroups *cgroup.Manager
	// Init is the static shim-init binary (CGO_ENABLED=0) that becomes
	// the guest's /init.
	Init string
	// StateDir holds one directory per VM; "" = DefaultStateDir.
	StateDir string
	// CacheDir holds the extracted kernel and the initramfs; "" =
	// <StateDir>/cache.
	CacheDir string
	// Kernel is the guest kernel (a bzImage named vmlinuz-RELEASE whose
	// modules are in ModulesDir/RELEASE); "" = the newest /boot/vmlinuz-*.
	Kernel     string
	ModulesDir string // "" = /lib/modules
	QEMU       string // "" = DefaultQEMU from PATH
	Accel      string // AccelKVM, AccelTCG, or "" = KVM where usable, else TCG
	// MemMargin and CPUMarginMilli are given to the QEMU process on top
	// of the guest's memory and CPU grant; 0 = the defaults.
	MemMargin      int64
	CPUMarginMilli int64

	bootMu        sync.Mutex
	extractFailed map[string]string
}

func (r *Runtime) stateDir() string {
	if r.StateDir == "" {
		return DefaultStateDir
	}
	return r.StateDir
}

func (r *Runtime) cacheDir() string {
	if r.CacheDir == "" {
		return filepath.Join(r.stateDir(), "cache")
	}
	return r.CacheDir
}

func (r *Runtime) margins() (mem, cpu int64) {
	mem, cpu = r.MemMargin, r.CPUMarginMilli
	if mem == 0 {
		mem = DefaultMemMargin
	}
	if cpu == 0 {
		cpu = DefaultCPUMarginMilli
	}
	return mem, cpu
}

// Prepare builds the boot files (the extracted kernel and the initramfs)
// ahead of the first Start, which otherwise does it (about a second).
func (r *Runtime) Prepare() error {
	_, err := r.bootFiles()
	return err
}

// Spec describes a workload to run in a VM.
type Spec struct {
	ID          string // workload id; a valid file name
	Incarnation uint64
	Argv        []string // resolved in the guest, which sees the host's /usr, /bin...
	Env         []string // exactly the workload's environment
	Dir         string   // working directory, shared read-write at the same path; "" = "/"
	Stdout      string   // host file appended to (created with its parents); "" = none
	Stderr      string   // the same for stderr; the same path as Stdout shares one port
	User        string   // "UID[:GID]" inside the guest; "" = root (of the guest)
	// Resources are the bounds: MemMaxBytes and CPUMaxMilli fix the VM's
	// ceiling (0 = the grant); the minima are the cgroup's.
	Resources cgroup.Resources
	// GrantMemBytes and GrantCPUMilli are the starting grant; 0 = the
	// minimum, or DefaultGrantMem and one core.
	GrantMemBytes int64
	GrantCPUMilli int64
}

// meta is vm.json: what Adopt needs to take a VM over.
type meta struct {
	ID          string           `json:"id"`
	Incarnation uint64           `json:"incarnation"`
	PID         int              `json:"pid"`
	StartTime   uint64           `json:"start_time"`
	Accel       string           `json:"accel"`
	Plan        plan             `json:"plan"`
	Resources   cgroup.Resources `json:"resources"`
	MemMargin   int64            `json:"mem_margin"`
	CPUMargin   int64            `json:"cpu_margin"`
}

// GuestView is the guest's own view of its resources, as last reported.
type GuestView struct {
	MemTotal     int64 // bytes (MemTotal of /proc/meminfo)
	MemAvailable int64 // bytes
	CPUs         int   // online vCPUs
	At           time.Time
}

// Stats is a VM's usage: the QEMU process's cgroup, the guest's view and
// the current grant.
type Stats struct {
	cgroup.Usage
	Guest    GuestView
	GrantMem int64 // guest memory now, bytes
	GrantCPU int64 // millicores
	VCPUs    int
}

// VM is a started or adopted VM.
type VM struct {
	rt     *Runtime
	name   string
	dir    string
	pid    int
	start  uint64
	child  bool
	accel  string
	res    cgroup.Resources
	margin [2]int64 // memory bytes, CPU millicores
	group  *cgroup.Group
	pidfd  *os.File
	oom    uint64
	killed atomic.Bool
	done   chan struct{}
	exit   exec.Exit
	ctl    *control

	onWant atomic.Pointer[func(memBytes, cpuMilli int64)]
	wantc  chan [2]int64 // latest request only

	resizeMu sync.Mutex // serializes Resize; guards plan and qmp
	plan     plan
	qmp      *qmp

	mu       sync.Mutex // guards the guest's reports
	view     GuestView
	statc    chan struct{} // closed and replaced on every "mem" report
	guestEnd *guest.Msg    // exit or fail, from the control channel
	started  time.Time     // when the guest reported the workload started
}

// Start boots a VM for s. It returns once QEMU runs and answers QMP; the
// guest boots on (Started, or the first line in the log, tells when the
// workload runs). The executable is resolved on the host first (the guest
// sees the same files): ErrNotFound if it does not exist, and nothing is
// created. On any later failure the cgroup and state are removed again.
func (r *Runtime) Start(s Spec) (*VM, error) {
	if r.Cgroups == nil {
		return nil, fmt.Errorf("start vm: Runtime.Cgroups is nil: %w", ErrInvalid)
	}
	if err := validID(s.ID); err != nil {
		return nil, fmt.Errorf("start vm: %w", err)
	}
	name := exec.GroupName(s.ID, s.Incarnation)
	fail := func(err error) (*VM, error) { return nil, fmt.Errorf("start vm %s: %w", name, err) }
	if len(s.Argv) == 0 {
		return fail(fmt.Errorf("empty Argv: %w", ErrInvalid))
	}
	uid, gid, err := parseUser(s.User)
	if err != nil {
		return fail(err)
	}
	if s.Dir != "" {
		if fi, err := os.Stat(s.Dir); err != nil || !fi.IsDir() || !filepath.IsAbs(s.Dir) {
			return fail(fmt.Errorf("working directory %q: not an absolute directory: %w", s.Dir, ErrInvalid))
		}
		if filepath.Clean(s.Dir) == "/" {
			return fail(fmt.Errorf("working directory /: the whole host cannot be shared read-write: %w", ErrInvalid))
		}
	}
	for _, p := range []string{s.Dir, s.Stdout, s.Stderr, r.stateDir(), r.cacheDir()} {
		if !qemuOptValue(p) {
			return fail(fmt.Errorf("path %q: commas and newlines are not supported: %w", p, ErrInvalid))
		}
	}
	if err := lookPath(s.Argv[0], s.Env, s.Dir); err != nil {
		return fail(err)
	}
	p, err := newPlan(s.Resources, s.GrantMemBytes, s.GrantCPUMilli)
	if err != nil {
		return fail(err)
	}
	qemuBin, err := r.qemuPath()
	if err != nil {
		return fail(err)
	}
	bf, err := r.bootFiles()
	if err != nil {
		return fail(err)
	}
	shares, links, err := hostView(s.Dir)
	if err != nil {
		return fail(err)
	}
	memMargin, cpuMargin := r.margins()
	g, err := r.Cgroups.Create(name, groupResources(s.Resources, p.GrantMem, p.GrantCPU, memMargin, cpuMargin))
	if err != nil {
		return fail(err)
	}
	// The group is new, so no VM of this name runs: a state directory
	// left by an earlier one is stale.
	dir := filepath.Join(r.stateDir(), name)
	cleanup := func() {
		_ = g.Kill()
		_ = g.Delete()
		_ = os.RemoveAll(dir)
	}
	v, err := r.launch(s, name, dir, p, bf, qemuBin, shares, links, uid, gid, g, memMargin, cpuMargin)
	if err != nil {
		cleanup()
		return fail(err)
	}
	return v, nil
}

// launch writes the state directory and starts QEMU in g.
func (r *Runtime) launch(s Spec, name, dir string, p plan, bf bootFiles, qemuBin string, shares []share,
	links []guest.Link, uid, gid uint32, g *cgroup.Group, memMargin, cpuMargin int64) (*VM, error) {
	if err := os.RemoveAll(dir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	cfg := guest.Config{Argv: s.Argv, Env: s.Env, Dir: s.Dir, UID: uid, GID: gid, Links: links}
	if cfg.Env == nil {
		cfg.Env = []string{}
	}
	for _, sh := range shares {
		cfg.Shares = append(cfg.Shares, sh.Share)
	}
	if s.Stdout != "" {
		cfg.Stdout = guest.PortStdout
	}
	if s.Stderr != "" {
		cfg.Stderr = guest.PortStderr
		if s.Stderr == s.Stdout {
			cfg.Stderr = guest.PortStdout
		}
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, fileConfig), b, 0o600); err != nil {
		return nil, err
	}
	for _, out := range []string{s.Stdout, s.Stderr} {
		if out != "" {
			if err := touch(out); err != nil {
				return nil, fmt.Errorf("output %s: %w", out, err)
			}
		}
	}
	qmpL, err := listenUnix(filepath.Join(dir, fileQMP))
	if err != nil {
		return nil, err
	}
	defer qmpL.Close()
	ctlL, err := listenUnix(filepath.Join(dir, fileControl))
	if err != nil {
		return nil, err
	}
	defer ctlL.Close()
	logf, err := os.OpenFile(filepath.Join(dir, fileQEMULog), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	null, err := os.Open(os.DevNull)
	if err != nil {
		return nil, err
	}
	defer null.Close()

	accel := r.accel()
	qc := qemuConfig{Name: "shim-" + name, Accel: accel, Kernel: bf.Kernel, Initrd: bf.Initrd, Plan: p, Dir: dir,
		Stdout: s.Stdout, Stderr: s.Stderr, Shares: shares, QMPFD: 3, ControlFD: 4}
	argv := append([]string{qemuBin}, qc.args()...)
	pidfd := -1
	var pid int
	attr := &syscall.ProcAttr{
		Dir:   dir,
		Env:   []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"},
		Files: []uintptr{null.Fd(), logf.Fd(), logf.Fd(), qmpL.Fd(), ctlL.Fd()},
		Sys: &syscall.SysProcAttr{
			Setsid: true, // a Ctrl-C on the agent's terminal never reaches QEMU
			PidFD:  &pidfd,
			// No Pdeathsig: VMs outlive the agent.
		},
	}
	err = g.Spawn(func(cgroupFD int) error {
		if cgroupFD >= 0 {
			attr.Sys.UseCgroupFD, attr.Sys.CgroupFD = true, cgroupFD
		}
		var err error
		pid, _, err = syscall.StartProcess(qemuBin, argv, attr)
		return err
	})
	// QEMU has its own copies of the listening sockets now; without ours,
	// a QEMU that dies makes the QMP dial below fail at once.
	qmpL.Close()
	ctlL.Close()
	if err != nil {
		return nil, fmt.Errorf("exec %s: %w", qemuBin, err)
	}
	if pidfd < 0 {
		if pidfd, err = unix.PidfdOpen(pid, 0); err != nil {
			_ = unix.Kill(pid, unix.SIGKILL)
			_, _ = syscall.Wait4(pid, nil, 0, nil)
			return nil, err
		}
	}
	_ = unix.SetNonblock(pidfd, true)
	v := &VM{rt: r, name: name, dir: dir, pid: pid, child: true, accel: accel, res: s.Resources,
		margin: [2]int64{memMargin, cpuMargin}, group: g, pidfd: os.NewFile(uintptr(pidfd), "pidfd"),
		done: make(chan struct{}), wantc: make(chan [2]int64, 1), plan: p, statc: make(chan struct{})}
	_, v.start, _ = procStat(pid)
	v.qmp, err = dialQMP(filepath.Join(dir, fileQMP), startTimeout, nil)
	if err != nil {
		_ = g.Kill()
		_, _ = syscall.Wait4(pid, nil, 0, nil)
		v.pidfd.Close()
		if msg := lastLine(filepath.Join(dir, fileQEMULog)); msg != "" {
			return nil, fmt.Errorf("qemu: %s", msg)
		}
		return nil, err
	}
	if err := v.saveMeta(); err != nil {
		v.qmp.close()
		_ = g.Kill()
		_, _ = syscall.Wait4(pid, nil, 0, nil)
		v.pidfd.Close()
		return nil, err
	}
	v.ctl = newControl(filepath.Join(dir, fileControl), v.onMsg)
	go v.wait()
	go v.wants()
	return v, nil
}

// touch creates path (and its parents) if missing, for QEMU to append to.
func touch(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if errors.Is(err, os.ErrNotExist) {
		if err = os.MkdirAll(filepath.Dir(path), 0o755); err == nil {
			f, err = os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		}
	}
	if err != nil {
		return err
	}
	return f.Close()
}

// lastLine returns the last non-empty line of a small file, trimmed.
func lastLine(path string) string {
	b, err := readTail(path, 4096)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

// readTail reads at most n bytes from the end of path.
func readTail(path string, n int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	off := max(st.Size()-n, 0)
	return io.ReadAll(io.NewSectionReader(f, off, st.Size()-off))
}

func (v *VM) saveMeta() error {
	m := meta{ID: v.name, PID: v.pid, StartTime: v.start, Accel: v.accel, Plan: v.plan, Resources: v.res,
		MemMargin: v.margin[0], CPUMargin: v.margin[1]}
	m.ID, m.Incarnation, _ = exec.ParseGroupName(v.name)
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	return writeAtomic(filepath.Join(v.dir, fileMeta), func(w io.Writer) error {
		_, err := w.Write(b)
		return err
	})
}

func readMeta(dir string) (meta, error) {
	var m meta
	b, err := os.ReadFile(filepath.Join(dir, fileMeta))
	if err != nil {
		return m, err
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("%s: %w", filepath.Join(dir, fileMeta), err)
	}
	return m, nil
}

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
	case reaped && ws.Signaled():
		return exec.Exit{Code: -1, Signal: unix.SignalName(ws.Signal()), Reason: "QEMU was killed by " + unix.SignalName(ws.Signal())}
	case reaped:
		return exec.Exit{Code: -1, Reason: "vm ended without the workload's exit status (QEMU exited " + strconv.Itoa(ws.ExitStatus()) + ")"}
	}
	return exec.Exit{Code: -1, Reason: "vm ended without the workload's exit status"}
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

// qmpLocked returns the QMP connection, dialling it if needed (after
// Adopt, or if it was lost). Callers hold resizeMu.
func (v *VM) qmpLocked() (*qmp, error) {
	if v.qmp != nil {
		select {
		case <-v.qmp.closed:
			v.qmp = nil
		default:
			return v.qmp, nil
		}
	}
	if v.exited() {
		return nil, ErrExited
	}
	q, err := dialQMP(filepath.Join(v.dir, fileQMP), 5*time.Second, nil)
	if err != nil {
		return nil, err
	}
	v.qmp = q
	return q, nil
}

// Resize moves the VM's grant to memBytes of guest memory and cpuMilli
// millicores, within the ceiling fixed at start (ErrInvalid beyond it;
// memory below the boot memory is the boot memory). Growing raises the
// cgroup first, then plugs memory (virtio-mem requested-size) and vCPUs;
// the guest sees new memory within about 0.1 s and onlines vCPUs on
// arrival. Shrinking unplugs, waits up to 3 s for the guest to give the
// memory back, and lowers the cgroup to what the guest still has. QEMU
// keeps its PID.
func (v *VM) Resize(memBytes, cpuMilli int64) error {
	v.resizeMu.Lock()
	defer v.resizeMu.Unlock()
	if v.exited() {
		return fmt.Errorf("resize %s: %w", v.name, ErrExited)
	}
	old := v.plan
	np, err := old.resize(memBytes, cpuMilli)
	if err != nil {
		return fmt.Errorf("resize %s: %w", v.name, err)
	}
	q, err := v.qmpLocked()
	if err != nil {
		return fmt.Errorf("resize %s: %w", v.name, err)
	}
	fail := func(err error) error {
		if v.exited() {
			err = ErrExited
		}
		return fmt.Errorf("resize %s: %w", v.name, err)
	}
	if err := v.group.Update(v.groupRes(max(old.GrantMem, np.GrantMem), np.GrantCPU)); err != nil {
		return fail(err)
	}
	if np.GrantMem != old.GrantMem {
		if err := q.run("qom-set", map[string]any{"path": "/machine/peripheral/vmem", "property": "requested-size",
			"value": np.plugged(np.GrantMem)}, nil); err != nil {
			return fail(err)
		}
	}
	v.plan.GrantMem = np.GrantMem // requested; the cgroup follows below
	if np.VCPUs != old.VCPUs {
		if err := v.setVCPUs(q, np.VCPUs); err != nil {
			v.plan.GrantCPU = np.GrantCPU // the quota is set; some vCPUs may be missing
			_ = v.saveMeta()
			return fail(err)
		}
	}
	v.plan = np
	if np.GrantMem < old.GrantMem {
		have := v.waitUnplug(q, np.plugged(np.GrantMem), 3*time.Second)
		if err := v.group.Update(v.groupRes(v.plan.BootMem+have, np.GrantCPU)); err != nil {
			return fail(err)
		}
	}
	if err := v.saveMeta(); err != nil {
		return fail(err)
	}
	return nil
}

func (v *VM) groupRes(guestMem, cpuMilli int64) cgroup.Resources {
	return groupResources(v.res, guestMem, cpuMilli, v.margin[0], v.margin[1])
}

// waitUnplug waits until virtio-mem's plugged size is at most want, and
// returns the plugged size.
func (v *VM) waitUnplug(q *qmp, want int64, timeout time.Duration) int64 {
	deadline := time.Now().Add(timeout)
	for {
		var size int64
		if err := q.run("qom-get", map[string]any{"path": "/machine/peripheral/vmem", "property": "size"}, &size); err != nil {
			return v.plan.MaxMem - v.plan.BootMem // unknown: keep the cgroup where it is
		}
		if size <= want || time.Now().After(deadline) {
			return size
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// hotCPU is an entry of query-hotpluggable-cpus.
type hotCPU struct {
	Props struct {
		SocketID int `json:"socket-id"`
	} `json:"props"`
	QOMPath string `json:"qom-path"`
}

// setVCPUs plugs or unplugs vCPUs (sockets 1.., id cpuN) so that n are
// present. Unplugging is asynchronous: the guest offlines the vCPU and
// ejects it.
func (v *VM) setVCPUs(q *qmp, n int) error {
	var cpus []hotCPU
	if err := q.run("query-hotpluggable-cpus", nil, &cpus); err != nil {
		return err
	}
	present := map[int]bool{}
	for _, c := range cpus {
		if c.QOMPath != "" {
			present[c.Props.SocketID] = true
		}
	}
	for s := 1; s < n; s++ {
		if !present[s] {
			if err := q.run("device_add", map[string]any{"driver": cpuDriver(v.accel), "id": "cpu" + strconv.Itoa(s),
				"socket-id": s, "core-id": 0, "thread-id": 0}, nil); err != nil {
				return fmt.Errorf("vCPU %d: %w", s, err)
			}
		}
	}
	for s := v.plan.MaxVCPUs - 1; s >= max(n, 1); s-- {
		if present[s] {
			if err := q.run("device_del", map[string]any{"id": "cpu" + strconv.Itoa(s)}, nil); err != nil {
				return fmt.Errorf("vCPU %d: %w", s, err)
			}
		}
	}
	return nil
}

// Adopt takes charge of a VM started by an earlier runtime (a new Runtime
// on the same StateDir): incarnation inc of id, QEMU running as pid with
// the given start time. It fails with ErrGone unless that QEMU is alive, has
// that start time and is in the workload's cgroup. QMP is dialled when first
// needed; the control channel reconnects by itself. The workload's exit
// code is known if the guest reports it on the control channel or the
// console.
func (r *Runtime) Adopt(id string, inc uint64, pid int, startTime uint64) (*VM, error) {
	if r.Cgroups == nil {
		return nil, fmt.Errorf("adopt vm: Runtime.Cgroups is nil: %w", ErrInvalid)
	}
	if err := validID(id); err != nil {
		return nil, fmt.Errorf("adopt vm: %w", err)
	}
	name := exec.GroupName(id, inc)
	dir := filepath.Join(r.stateDir(), name)
	m, err := readMeta(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("adopt vm %s: no state: %w", name, ErrGone)
	}
	if err != nil {
		return nil, fmt.Errorf("adopt vm %s: %w", name, err)
	}
	if pid <= 0 || pid != m.PID {
		return nil, fmt.Errorf("adopt vm %s: pid %d is not its QEMU (%d): %w", name, pid, m.PID, ErrGone)
	}
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if errors.Is(err, unix.ESRCH) {
		return nil, fmt.Errorf("adopt vm %s: pid %d: %w", name, pid, ErrGone)
	}
	if err != nil {
		return nil, fmt.Errorf("adopt vm %s: pidfd_open %d: %w", name, pid, err)
	}
	fail := func(err error) (*VM, error) {
		unix.Close(fd)
		return nil, fmt.Errorf("adopt vm %s: %w", name, err)
	}
	state, start, err := procStat(pid)
	switch {
	case errors.Is(err, os.ErrNotExist) || state == 'Z' || state == 'X':
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
	v := &VM{rt: r, name: name, dir: dir, pid: pid, start: start, accel: m.Accel, res: m.Resources,
		margin: [2]int64{m.MemMargin, m.CPUMargin}, group: g, pidfd: os.NewFile(uintptr(fd), "pidfd"),
		done: make(chan struct{}), wantc: make(chan [2]int64, 1), plan: m.Plan, statc: make(chan struct{})}
	if u, err := g.Stats(); err == nil {
		v.oom = u.OOMKills
	}
	v.ctl = newControl(filepath.Join(dir, fileControl), v.onMsg)
	go v.wait()
	go v.wants()
	return v, nil
}

// Existing describes a VM a runtime left in StateDir.
type Existing struct {
	ID          string
	Incarnation uint64
	Group       string // cgroup name below the manager root
	PID         int    // QEMU's pid; 0 if it is gone
	StartTime   uint64 // for Adopt
}

// Existing lists the VMs in StateDir, so that an agent can Adopt them or
// Remove them. A VM whose QEMU is gone, or whose start never finished, has
// PID 0. Call it before starting VMs: a start under way looks like the
// latter.
func (r *Runtime) Existing() ([]Existing, error) {
	ents, err := os.ReadDir(r.stateDir())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []Existing
	for _, e := range ents {
		id, inc, ok := exec.ParseGroupName(e.Name())
		if !ok || !e.IsDir() {
			continue
		}
		x := Existing{ID: id, Incarnation: inc, Group: e.Name()}
		m, err := readMeta(filepath.Join(r.stateDir(), e.Name()))
		if err != nil {
			out = append(out, x) // a start that did not finish: a leftover
			continue
		}
		if state, start, err := procStat(m.PID); err == nil && state != 'Z' && state != 'X' && start == m.StartTime {
			x.PID, x.StartTime = m.PID, start
		}
		out = append(out, x)
	}
	return out, nil
}

// Owns reports whether incarnation inc of id is a VM of this runtime (its
// state directory exists), so that an agent with several runtimes can route
// Adopt and Remove, and leave VMs out of exec's Existing (which lists their
// cgroups too, with no PID).
func (r *Runtime) Owns(id string, inc uint64) bool {
	if validID(id) != nil {
		return false
	}
	_, err := os.Stat(filepath.Join(r.stateDir(), exec.GroupName(id, inc)))
	return err == nil
}

// Remove kills and deletes a VM that will not be adopted: its cgroup and
// its state directory.
func (r *Runtime) Remove(id string, inc uint64) error {
	if err := validID(id); err != nil {
		return fmt.Errorf("remove vm: %w", err)
	}
	name := exec.GroupName(id, inc)
	if r.Cgroups != nil {
		if g, err := r.Cgroups.Open(name); err == nil {
			if err := g.Kill(); err != nil {
				return err
			}
			if err := g.Delete(); err != nil {
				return err
			}
		} else if !errors.Is(err, cgroup.ErrNotFound) {
			return err
		}
	}
	return os.RemoveAll(filepath.Join(r.stateDir(), name))
}

// RemoveAll removes every VM this runtime left: kills and deletes their
// cgroups and removes their state (the cache stays). For a node that is
// gone, after the fence.
func (r *Runtime) RemoveAll() error {
	ex, err := r.Existing()
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range ex {
		if err := r.Remove(e.ID, e.Incarnation); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func validID(id string) error {
	if id == "" || id == "." || id == ".." || len(id) > 200 || strings.ContainsAny(id, "/\x00,\n") || id == "cache" {
		return fmt.Errorf("workload id %q: %w", id, ErrInvalid)
	}
	return nil
}

// parseUser parses "UID[:GID]" (GID defaults to UID); "" is root.
func parseUser(u string) (uid, gid uint32, err error) {
	if u == "" {
		return 0, 0, nil
	}
	us, gs, hasG := strings.Cut(u, ":")
	a, err := strconv.ParseUint(us, 10, 32)
	b := a
	if err == nil && hasG {
		b, err = strconv.ParseUint(gs, 10, 32)
	}
	if err != nil || a == 1<<32-1 || b == 1<<32-1 {
		return 0, 0, fmt.Errorf("user %q: want UID[:GID] (numbers): %w", u, ErrInvalid)
	}
	return uint32(a), uint32(b), nil
}

// lookPath checks that file can be executed, like execvp after chdir(dir),
// with PATH from env or the guest init's default.
func lookPath(file string, env []string, dir string) error {
	check := func(p string) error {
		if !filepath.IsAbs(p) && dir != "" {
			p = filepath.Join(dir, p)
		}
		st, err := os.Stat(p)
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
			return ErrNotFound
		}
		if err != nil {
			return err
		}
		if st.IsDir() || st.Mode()&0o111 == 0 {
			return os.ErrPermission
		}
		return nil
	}
	if strings.Contains(file, "/") {
		if err := check(file); err != nil {
			return fmt.Errorf("exec: %q: %w", file, err)
		}
		return nil
	}
	pathEnv := "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	for _, kv := range env {
		if p, ok := strings.CutPrefix(kv, "PATH="); ok {
			pathEnv = p
		}
	}
	for _, d := range filepath.SplitList(pathEnv) {
		if d == "" {
			d = "."
		}
		if check(d+"/"+file) == nil {
			return nil
		}
	}
	return fmt.Errorf("exec: %q: %w", file, ErrNotFound)
}

// procStat returns the state (field 3) and start time (field 22) of pid.
func procStat(pid int) (state byte, start uint64, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	start, err = strconv.ParseUint(f[19], 10, 64)
	return f[0][0], start, err
}
