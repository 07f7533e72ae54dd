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
// and shrinks; vCPUs are all present from boot and the guest init keeps
// the granted number online ("cpus N" on the control channel; QEMU 7.2
// aborts on vCPU device_add under multi-threaded TCG, see pid1/guest), and
// the CPU quota of the cgroup is the bound; the kernel onlines memory
// itself (memhp_default_state=online with the auto-movable policy:
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
// Measured with TestFigures (SHIM_VM_FIGURES=5) under TCG on 2 cores
// shared with other work (load 3.5), QEMU 7.2, Debian kernel 6.1, medians
// of 5, two runs: boot to the workload's first line 2.6-2.8 s; memory
// hot-add (+256 MiB) to the guest's MemTotal 131-155 ms; a vCPU online
// 281-418 ms; QEMU's own anonymous memory beyond the guest's RAM 50 MiB
// (the 32 MiB translation cache is most of it), plus 85 MiB of
// file-backed pages shared by all VMs (QEMU itself, and the kernel image
// QEMU keeps mapped).
package vm

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
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

// Runtime starts and adopts VMs. Set Cgroups; the rest has
// defaults. It is safe for concurrent use.
type Runtime struct {
	Cgroups *cgroup.Manager
	// Init is the static shim-init binary (CGO_ENABLED=0) that becomes
	// the guest's /init; "" = DefaultInit next to the running binary.
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

// DefaultInit is the guest init's file name next to the running binary
// (bin/shimd, bin/shim-init), used when Runtime.Init is empty.
const DefaultInit = "shim-init"

func (r *Runtime) initPath() string {
	if r.Init != "" {
		return r.Init
	}
	exe, err := os.Executable()
	if err != nil {
		return DefaultInit
	}
	return filepath.Join(filepath.Dir(exe), DefaultInit)
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
	uid, gid, err := exec.ParseUser(s.User, [2]uint32{}) // root in its own guest
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
	cfg := guest.Config{Argv: s.Argv, Env: s.Env, Dir: s.Dir, UID: uid, GID: gid, Links: links, VCPUs: p.VCPUs}
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
	_, v.start, _ = exec.ProcStat(pid)
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

func validID(id string) error {
	if id == "" || id == "." || id == ".." || len(id) > 200 || strings.ContainsAny(id, "/\x00,\n") || id == "cache" {
		return fmt.Errorf("workload id %q: %w", id, ErrInvalid)
	}
	return nil
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
