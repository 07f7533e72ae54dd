package exec

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/opencontainers/cgroups"
	devconfig "github.com/opencontainers/cgroups/devices/config"
	"github.com/opencontainers/runc/libcontainer"
	"github.com/opencontainers/runc/libcontainer/configs"
	"github.com/opencontainers/runc/libcontainer/configs/validate"
	"github.com/opencontainers/runc/libcontainer/seccomp"
	"github.com/opencontainers/runc/libcontainer/specconv"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/shim-run/shim/cgroup"
	"github.com/shim-run/shim/exec/internal/boot"
	"github.com/shim-run/shim/pid1"

	// The cgroup v1 devices controller and v2 device eBPF programs.
	_ "github.com/opencontainers/cgroups/devices"
)

func init() {
	// Starting a container, libcontainer joins its mount namespace from a
	// goroutine locked to its thread, and lets the thread end with the
	// goroutine. The runtime cannot end the main thread, only park it: had
	// that goroutine run there, the process (/proc/self is the main thread)
	// would see the container's mounts from then on. Keeping the main
	// goroutine on the main thread (a package init may do this) rules it
	// out; the same holds for the threads cgroup.Spawn discards.
	runtime.LockOSThread()
}

// IsInit reports whether this process is a container's init, started by
// libcontainer as "<this binary> init". A binary that starts containers
// must then call Init before anything else in main:
//
//	if exec.IsInit() {
//		exec.Init()
//	}
//
// In practice the call is not reached: a package initializer imported by
// exec (exec/internal/boot) already diverts the init, as early as Go
// allows, to skip the initializers of packages the init does not need.
func IsInit() bool { return boot.IsInit() }

// Init runs libcontainer's init, which finishes setting up the sandbox and
// executes the workload. It never returns.
func Init() { boot.Init() }

// defaultPath is the PATH used to find a workload's executable when its
// environment has none.
const defaultPath = pid1.DefaultPath

// hostView lists the host directories a container without Rootfs sees,
// read-only. Those that are symlinks on the host (merged /usr) are
// recreated as the same symlinks instead of being mounted.
var hostView = []string{"/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"}

// maskedHostFiles are hidden (bound to /dev/null) in the host view: the
// workload may run as root.
var maskedHostFiles = []string{"/etc/shadow", "/etc/gshadow"}

const defaultStateDir = "/run/shim"

// stateDir returns where libcontainer keeps a container's state while it
// starts, and where the host view's root directory is.
func (r *Runtime) stateDir() string {
	if r.StateDir != "" {
		return r.StateDir
	}
	return defaultStateDir
}

// containerRoot returns libcontainer's state directory, shared by all
// Runtimes with the same StateDir (see containerID).
func (r *Runtime) containerRoot() string {
	return filepath.Join(r.stateDir(), "containers")
}

// view is the prepared root directory of the host view, shared by all
// containers: empty mount points and the host's top-level symlinks.
type view struct {
	once    sync.Once
	dir     string
	mounts  []*configs.Mount // read-only binds of hostView
	masked  []string         // maskedHostFiles that exist
	prepErr error
}

var views sync.Map // state dir -> *view

func (r *Runtime) hostView() (*view, error) {
	sd := r.stateDir()
	v, _ := views.LoadOrStore(sd, &view{})
	vw := v.(*view)
	vw.once.Do(func() { vw.prepErr = vw.prepare(filepath.Join(sd, "rootfs")) })
	return vw, vw.prepErr
}

func (v *view) prepare(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("container root: %w", err)
	}
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return fmt.Errorf("container root: %w", err)
	}
	v.dir = real
	for _, d := range []string{"proc", "dev", "sys", "tmp"} {
		if err := os.Mkdir(filepath.Join(real, d), 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("container root: %w", err)
		}
	}
	for _, h := range hostView {
		fi, err := os.Lstat(h)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("container root: %w", err)
		}
		in := filepath.Join(real, h)
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(h)
			if err != nil {
				return fmt.Errorf("container root: %w", err)
			}
			if cur, err := os.Readlink(in); err == nil && cur == target {
				continue
			}
			_ = os.Remove(in)
			if err := os.Symlink(target, in); err != nil {
				// Another agent on this host may have just made it.
				if cur, rerr := os.Readlink(in); rerr != nil || cur != target {
					return fmt.Errorf("container root: %w", err)
				}
			}
		case fi.IsDir():
			if err := os.Mkdir(in, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
				return fmt.Errorf("container root: %w", err)
			}
			v.mounts = append(v.mounts, &configs.Mount{
				Source: h, Destination: h, Device: "bind",
				Flags: unix.MS_BIND | unix.MS_REC | unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV,
			})
		}
	}
	for _, f := range maskedHostFiles {
		if _, err := os.Stat(f); err == nil {
			v.masked = append(v.masked, f)
		}
	}
	return nil
}

// checkRootfs checks a container's Rootfs, if any: an absolute path to a
// directory.
func checkRootfs(s Spec, name string) error {
	if s.Rootfs == "" {
		return nil
	}
	if !filepath.IsAbs(s.Rootfs) {
		return fmt.Errorf("start %s: root file system %q: must be absolute: %w", name, s.Rootfs, ErrInvalid)
	}
	if fi, err := os.Stat(s.Rootfs); err != nil || !fi.IsDir() {
		if err == nil {
			err = syscall.ENOTDIR
		}
		return fmt.Errorf("start %s: root file system %q: %w", name, s.Rootfs, err)
	}
	return nil
}

// initInContainer is where shim-init is bound (read-only) in a container:
// inside the container's own /dev tmpfs, so that nothing is created in a
// Rootfs on the host.
const initInContainer = "/dev/.shim/shim-init"

// startContainer starts s through libcontainer in the existing group g and
// returns the pid of its init (a child of this process: nsexec clones with
// CLONE_PARENT), which executes shim-init (bound at initInContainer) with
// the status pipe's write end status as descriptor 3; shim-init starts the
// workload. libcontainer's init is born in g (v1) or moved there before it
// does anything else (v2).
func (r *Runtime) startContainer(s Spec, initPath string, uid, gid uint32, stdio []*os.File, status *os.File, g *cgroup.Group) (int, error) {
	cfg, err := r.containerConfig(s, initPath, g)
	if err != nil {
		return 0, err
	}
	oneProc.Do(func() {
		if _, set := os.LookupEnv("GOMAXPROCS"); !set {
			os.Setenv("GOMAXPROCS", "1")
		}
	})
	root := r.containerRoot()
	id := containerID(r.Cgroups.Root() + "/" + g.Name())
	_ = os.RemoveAll(filepath.Join(root, id)) // left by an agent that died mid-start
	// Where a container start's time went, measured with the agent's own
	// 22 MB binary as libcontainer's init (perf trace of the syscalls and
	// scheduler events; 2 vCPUs): about 9 ms in libcontainer's cgroup
	// manager on v1, which created the group in all ten mounted hierarchies
	// (cpuset with cpus and mems copied down three levels) and wrote the
	// init's pid into each cgroup.procs. A pid written to cgroup.procs takes
	// the kernel's global threadgroup lock for writing, which waits for an
	// RCU grace period first: 5 to 15 ms here, the largest single cost of a
	// start. So on v1 libcontainer does not manage cgroups at all
	// (createUnmanaged): package cgroup makes the group, devices hierarchy
	// included, and the init is born inside it, forked from a thread that
	// Group.Spawn has moved in by writing "0" to each hierarchy's tasks
	// file, which needs no such lock. v2 keeps libcontainer's manager, which
	// can use neither. What is left (medians of 40 starts, loaded VM): our
	// preparation (group, state, libcontainer's clone of this binary) 2.5
	// ms, exec 0.5, nsexec's namespaces 3.5, the init's Go runtime and
	// package initialization 4 (2 ms more than a binary of libcontainer
	// alone; see exec/internal/boot), mounts 3.5, then pivot_root, masked
	// and read-only paths, capabilities, seccomp (0.7) and the exec 4.
	// Re-executing the agent from a sealed memfd once, so that libcontainer
	// skips its per-start clone (an overlayfs mount), made starts 1.5 ms
	// slower here (page faults on the memfd's pages), so it is not done;
	// nor is pre-mounting the host view (a root without it starts only 0.5
	// ms sooner).
	var c *libcontainer.Container
	if r.Cgroups.V2() {
		c, err = libcontainer.Create(root, id, cfg)
	} else {
		c, err = createUnmanaged(root, id, cfg)
	}
	if err != nil {
		return 0, err
	}
	// The state is only needed until the workload runs: an agent adopts
	// containers by pid and cgroup, like processes.
	defer os.RemoveAll(filepath.Join(root, id))
	// shim-init changes to the working directory (as the workload's user)
	// and looks the workload up inside the container. libcontainer gets
	// no Cwd: it would make a missing one as root, in the root directory
	// on the host, before making it read-only.
	// libcontainer's init would give stdout and stderr files to the
	// workload's user (fixStdioPermissions; it leaves /dev/null alone):
	// shim-init installs them instead, and the logs stay the agent's.
	argv := append([]string{initInContainer, "--status-fd", "3", "--stdout-fd", "4", "--stderr-fd", "5",
		"--dir", workingDir(s), "--"}, s.Argv...)
	p := &libcontainer.Process{
		Args: argv, Env: workloadEnv(s.Env, home(s)), Init: true,
		Stdin: stdio[0], Stdout: stdio[0], Stderr: stdio[0], ExtraFiles: []*os.File{status, stdio[1], stdio[2]},
		UID: int(uid), GID: int(gid),
	}
	// Start returns once init is ready and waits for Exec; on failure it
	// has killed init (the caller removes the group).
	if r.Cgroups.V2() {
		err = c.Start(p)
	} else {
		err = g.Spawn(func(int) error { return c.Start(p) })
	}
	if err != nil {
		return 0, err
	}
	pid, err := p.Pid()
	if err != nil {
		return 0, err
	}
	if err := c.Exec(); err != nil {
		return pid, err
	}
	return pid, nil
}

// oneProc sets GOMAXPROCS=1 in this process's environment (unless it is
// set) before the first container start: libcontainer passes that variable
// on to every container init, and an init that starts with one P skips
// shrinking to the single P libcontainer.Init uses (about 10% fewer page
// faults per start). It does not change this process's own GOMAXPROCS;
// children that inherit its environment see it.
var oneProc sync.Once

// containerID makes a libcontainer id (letters, digits, "_+-.") from a
// group's path below the cgroup mount, unique on the host: "/" becomes "+",
// anything else not allowed "_".
func containerID(path string) string {
	return strings.Map(func(c rune) rune {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '_', c == '-', c == '.':
			return c
		case c == '/':
			return '+'
		}
		return '_'
	}, path)
}

// containerConfig builds the libcontainer configuration for s in group g.
func (r *Runtime) containerConfig(s Spec, initPath string, g *cgroup.Group) (*configs.Config, error) {
	example := specconv.Example() // runc's defaults: capabilities, masked and read-only paths
	caps := example.Process.Capabilities
	cfg := &configs.Config{
		Readonlyfs:      true,
		RootPropagation: unix.MS_PRIVATE | unix.MS_REC,
		Namespaces: configs.Namespaces{
			{Type: configs.NEWNS}, {Type: configs.NEWUTS}, {Type: configs.NEWIPC}, {Type: configs.NEWPID},
		},
		Hostname: hostname(s.ID),
		Capabilities: &configs.Capabilities{
			Bounding: caps.Bounding, Effective: caps.Effective, Permitted: caps.Permitted,
		},
		NoNewPrivileges: true,
		MaskPaths:       example.Linux.MaskedPaths,
		ReadonlyPaths:   example.Linux.ReadonlyPaths,
		Cgroups: &cgroups.Cgroup{
			Path:      g.Path(),
			Resources: &cgroups.Resources{},
		},
	}
	if r.Cgroups.V2() {
		cfg.Cgroups.Resources.Devices = deviceRules() // libcontainer's eBPF program
	}
	for _, d := range specconv.AllowedDevices {
		if d.Path != "" {
			cfg.Devices = append(cfg.Devices, d)
		}
	}
	if s.Network == NetworkNone {
		cfg.Namespaces = append(cfg.Namespaces, configs.Namespace{Type: configs.NEWNET})
		cfg.Networks = []*configs.Network{{Type: "loopback"}}
	}
	if seccomp.Enabled {
		cfg.Seccomp = defaultSeccomp()
	}
	const (
		noexec = unix.MS_NOSUID | unix.MS_NOEXEC | unix.MS_NODEV
	)
	cfg.Mounts = []*configs.Mount{
		{Source: "proc", Destination: "/proc", Device: "proc", Flags: noexec},
		{Source: "tmpfs", Destination: "/dev", Device: "tmpfs", Flags: unix.MS_NOSUID | unix.MS_STRICTATIME, Data: "mode=755,size=65536k"},
		{Source: "shm", Destination: "/dev/shm", Device: "tmpfs", Flags: noexec, Data: "mode=1777,size=65536k"},
		{Source: "sysfs", Destination: "/sys", Device: "sysfs", Flags: noexec | unix.MS_RDONLY},
		{Source: "tmpfs", Destination: "/tmp", Device: "tmpfs", Flags: unix.MS_NOSUID | unix.MS_NODEV, Data: "mode=1777"},
	}
	if s.Rootfs != "" {
		root, err := filepath.EvalSymlinks(s.Rootfs)
		if err != nil {
			return nil, err
		}
		cfg.Rootfs = root
	} else {
		v, err := r.hostView()
		if err != nil {
			return nil, err
		}
		cfg.Rootfs = v.dir
		for _, m := range v.mounts {
			m := *m // each config its own, whatever libcontainer does with it
			cfg.Mounts = append(cfg.Mounts, &m)
		}
		cfg.MaskPaths = append(slices.Clip(cfg.MaskPaths), v.masked...)
	}
	const bind = unix.MS_BIND | unix.MS_REC | unix.MS_NOSUID | unix.MS_NODEV
	if s.WorkDir != "" {
		cfg.Mounts = append(cfg.Mounts, &configs.Mount{Source: s.WorkDir, Destination: "/work", Device: "bind", Flags: bind})
	}
	for _, m := range s.Mounts {
		flags := bind
		if m.ReadOnly {
			flags |= unix.MS_RDONLY
		}
		cfg.Mounts = append(cfg.Mounts, &configs.Mount{Source: m.Source, Destination: m.Target, Device: "bind", Flags: flags})
	}
	// After /dev, in whose tmpfs libcontainer makes the mount point.
	cfg.Mounts = append(cfg.Mounts, &configs.Mount{
		Source: initPath, Destination: initInContainer, Device: "bind",
		Flags: unix.MS_BIND | unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV,
	})
	return cfg, nil
}

// deviceRules are runc's default device cgroup rules: nothing but the
// standard character devices.
func deviceRules() []*devconfig.Rule {
	var rules []*devconfig.Rule
	for _, d := range specconv.AllowedDevices {
		rules = append(rules, &d.Rule)
	}
	return rules
}

// deviceCgroups are deviceRules for package cgroup (v1).
func deviceCgroups() []specs.LinuxDeviceCgroup {
	var out []specs.LinuxDeviceCgroup
	for _, r := range deviceRules() {
		d := specs.LinuxDeviceCgroup{Allow: r.Allow, Type: string(r.Type), Access: string(r.Permissions)}
		if maj := r.Major; maj != devconfig.Wildcard {
			d.Major = &maj
		}
		if mnr := r.Minor; mnr != devconfig.Wildcard {
			d.Minor = &mnr
		}
		out = append(out, d)
	}
	return out
}

// unmanagedPaths stands for "no cgroup paths" in a container state: an
// empty map would be left out of the JSON and libcontainer would compute
// every path again. No cgroup controller has this name.
var unmanagedPaths = map[string]string{"shim-unmanaged": ""}

// createUnmanaged is libcontainer.Create for a container whose cgroups
// libcontainer must leave alone (cgroup v1): the same checks and state
// directory, but the container is loaded from a state (libcontainer.State,
// its documented on-disk form) that gives it no cgroup paths, so its
// cgroup manager neither moves the init nor writes any limit.
func createUnmanaged(root, id string, cfg *configs.Config) (*libcontainer.Container, error) {
	if err := validate.Validate(cfg); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, err
	}
	dir := filepath.Join(root, id)
	if err := os.Mkdir(dir, 0o711); err != nil {
		return nil, err
	}
	st := libcontainer.State{
		BaseState:      libcontainer.BaseState{ID: id, Created: time.Now().UTC(), Config: *cfg},
		CgroupPaths:    unmanagedPaths,
		NamespacePaths: map[configs.NamespaceType]string{},
	}
	b, err := json.Marshal(st)
	if err == nil {
		err = os.WriteFile(filepath.Join(dir, "state.json"), b, 0o600)
	}
	if err != nil {
		return nil, err
	}
	return libcontainer.Load(root, id)
}

func init() {
	// libcontainer's v1 cgroup manager (Set) calls this hook for the devices
	// controller even when it has no path for it, then with an empty path,
	// which the hook's own implementation rejects. An unmanaged container
	// (createUnmanaged) has no paths, and package cgroup has set its devices
	// up already.
	if set := cgroups.DevicesSetV1; set != nil {
		cgroups.DevicesSetV1 = func(path string, r *cgroups.Resources) error {
			if path == "" {
				return nil
			}
			return set(path, r)
		}
	}
}

// hostname is the container's host name: the workload id, cut to the
// kernel's 64 bytes.
func hostname(id string) string {
	if len(id) > 64 {
		id = id[:64]
	}
	return id
}
