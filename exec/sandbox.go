package exec

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/opencontainers/runc/libcontainer/specconv"
	"golang.org/x/sys/unix"

	"github.com/shim-run/shim/cgroup"
	"github.com/shim-run/shim/pid1"
)

// InitName is shim-init's file name, looked for next to the running
// executable and then in PATH when Runtime.Init is "".
const InitName = "shim-init"

// initPids is added to a group's pids.max for the whole life of the
// workload: shim-init is a Go program, PID 1 of every sandbox, with 6 or 7
// threads of its own (measured), and a thread the Go runtime cannot create
// would end the sandbox. libcontainer's init, which becomes shim-init in a
// container, fits in the same room.
const initPids = 16

// startTimeout bounds how long Start waits for shim-init to report that the
// workload runs.
const startTimeout = 30 * time.Second

// Descriptors of shim-init started by exec (besides stdin, stdout, stderr).
const (
	initConfigFD = 3
	initStatusFD = 4
)

// sandboxCaps are the capabilities a root workload keeps in a process
// sandbox: runc's default set (specconv.Example), as in a container.
const sandboxCaps = 1<<unix.CAP_AUDIT_WRITE | 1<<unix.CAP_KILL | 1<<unix.CAP_NET_BIND_SERVICE

// reservedTargets are the sandbox's own mount points (with the host view's
// directories): a Mount may neither be one nor lie above or below one.
var reservedTargets = append([]string{"/proc", "/dev", "/sys", "/tmp", "/work"}, hostView...)

// initPaths caches where shim-init was found, per Runtime.Init.
var initPaths sync.Map // Runtime.Init -> string

// initPath returns the shim-init executable to use.
func (r *Runtime) initPath() (string, error) {
	if p, ok := initPaths.Load(r.Init); ok {
		return p.(string), nil
	}
	var cands []string
	if r.Init != "" {
		cands = []string{r.Init}
	} else {
		if self, err := os.Executable(); err == nil {
			cands = append(cands, filepath.Join(filepath.Dir(self), InitName))
		}
		for _, d := range filepath.SplitList(os.Getenv("PATH")) {
			if filepath.IsAbs(d) {
				cands = append(cands, filepath.Join(d, InitName))
			}
		}
	}
	for _, c := range cands {
		if !filepath.IsAbs(c) {
			return "", fmt.Errorf("shim-init %q: must be an absolute path: %w", c, ErrInvalid)
		}
		if st, err := os.Stat(c); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			initPaths.Store(r.Init, c)
			return c, nil
		}
	}
	if r.Init != "" {
		return "", fmt.Errorf("shim-init %q: not an executable file: %w", r.Init, ErrInvalid)
	}
	return "", fmt.Errorf("%s not found next to the executable or in PATH (set Runtime.Init): %w", InitName, ErrInvalid)
}

// sandboxBase is what every process sandbox of a state directory (and
// shim-init) shares, prepared once (see Prepare).
//
// The host view is prepared once as a template: shim-init --template builds
// the shared part of the root (the mount points, /usr and /etc bound
// read-only, the links of a merged /usr, masked host files, and shim-init
// itself) in a mount namespace of its own, and the agent keeps that
// namespace by a descriptor. Each sandbox's init is cloned from a thread
// that has joined the template, so its mount namespace is a copy of the
// template's few mounts rather than of the host's: it mounts only its own
// /dev, /proc, /sys, /tmp and /work, with no pivot_root. A sandbox with
// Mounts, whose mount points the shared template cannot hold, builds its
// whole root instead (full), as does every sandbox when the template could
// not be made. Measured (BenchmarkStartProcess, 2 vCPUs, 32 host mounts,
// interleaved runs): the full build took 0.1 ms more per start (median)
// and 0.35 ms more CPU, and more on hosts with many mounts, which it
// copies, makes private and detaches again (+0.2 ms with 230).
type sandboxBase struct {
	once    sync.Once
	full    pid1.Sandbox // a root built from scratch
	own     pid1.Sandbox // what a sandbox cloned from the template mounts itself
	tmpl    *os.File     // the template's mount namespace; nil if tmplErr
	tmplErr error
	err     error
}

var sandboxBases sync.Map // state dir and shim-init -> *sandboxBase

func (r *Runtime) sandboxBase(initPath string) *sandboxBase {
	sd := r.stateDir()
	v, _ := sandboxBases.LoadOrStore(sd+"\x00"+initPath, &sandboxBase{})
	b := v.(*sandboxBase)
	b.once.Do(func() { b.err = b.prepare(filepath.Join(sd, "sandbox"), initPath) })
	return b
}

// Prepare prepares now, rather than at the first Start, what the process
// sandboxes of this Runtime share: the seccomp program and the template
// of their root (see sandboxBase), and returns what failed. A template
// that cannot be made is no error for Start: each process sandbox then
// builds its whole root, which is slower.
func (r *Runtime) Prepare() error {
	initPath, err := r.initPath()
	if err != nil {
		return fmt.Errorf("prepare: %w", err)
	}
	b := r.sandboxBase(initPath)
	if b.err != nil {
		return fmt.Errorf("prepare: %w", b.err)
	}
	if b.tmplErr != nil {
		return fmt.Errorf("prepare: %w", b.tmplErr)
	}
	return nil
}

func (b *sandboxBase) prepare(root, initPath string) error {
	// An empty directory each init (and the template) mounts its own
	// tmpfs root on, in its own mount namespace: nothing ever appears
	// here on the host.
	if err := os.MkdirAll(root, 0o700); err != nil {
		return fmt.Errorf("sandbox root: %w", err)
	}
	l, err := hostLayout()
	if err != nil {
		return err
	}
	seccomp, err := seccompProgram()
	if err != nil {
		return err
	}
	example := specconv.Example()
	shared := pid1.Sandbox{Root: root, Symlinks: l.links, Masked: l.masked}
	for _, d := range l.dirs {
		shared.Binds = append(shared.Binds, pid1.Bind{Source: d, Target: d, ReadOnly: true})
	}
	b.own = pid1.Sandbox{
		Masked: example.Linux.MaskedPaths, ReadOnly: example.Linux.ReadonlyPaths, Caps: sandboxCaps, Seccomp: seccomp,
	}
	b.full = b.own
	b.full.Root, b.full.Symlinks, b.full.Binds = root, shared.Symlinks, shared.Binds
	b.full.Masked = append(slices.Clone(b.own.Masked), l.masked...)
	b.tmpl, b.tmplErr = makeTemplate(initPath, &shared)
	return nil
}

// makeTemplate runs shim-init --template to build the shared part of the
// root described by sb in a new mount namespace, and returns that
// namespace once built (shim-init then exits).
func makeTemplate(initPath string, sb *pid1.Sandbox) (*os.File, error) {
	cf, err := configFile(&pid1.Config{Argv: []string{InitName}, StatusFD: initStatusFD, Sandbox: sb})
	if err != nil {
		return nil, fmt.Errorf("template: %w", err)
	}
	defer cf.Close()
	// shim-init reads its stdin until we close stdinW, once we have the
	// namespace.
	var stdinR, stdinW, statusR, statusW, null *os.File
	defer func() {
		for _, f := range []*os.File{stdinR, stdinW, statusR, statusW, null} {
			if f != nil {
				f.Close()
			}
		}
	}()
	if stdinR, stdinW, err = os.Pipe(); err == nil {
		if statusR, statusW, err = os.Pipe(); err == nil {
			null, err = os.OpenFile(os.DevNull, os.O_WRONLY, 0)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("template: %w", err)
	}
	pid, _, err := syscall.StartProcess(initPath, []string{InitName, "--template", "--config-fd", strconv.Itoa(initConfigFD)}, &syscall.ProcAttr{
		Env:   []string{"GOMAXPROCS=1"},
		Files: []uintptr{stdinR.Fd(), null.Fd(), null.Fd(), cf.Fd(), statusW.Fd()},
		Sys:   &syscall.SysProcAttr{Setsid: true, Unshareflags: syscall.CLONE_NEWNS},
	})
	if err != nil {
		return nil, fmt.Errorf("template: exec %q: %w", initPath, err)
	}
	statusW.Close() // shim-init holds the only write end now
	statusW = nil
	defer func() {
		stdinW.Close() // shim-init exits
		stdinW = nil
		var ws syscall.WaitStatus
		_, _ = syscall.Wait4(pid, &ws, 0, nil)
	}()
	sr := &statusReader{f: statusR}
	rep, ok, err := sr.next(time.Now().Add(startTimeout))
	switch {
	case err != nil:
		return nil, fmt.Errorf("template: %w", err)
	case !ok:
		return nil, errors.New("template: shim-init ended without a report")
	case rep.Kind != pid1.Started:
		return nil, fmt.Errorf("template: %w", &initError{rep.Text, rep.Errno})
	}
	ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/mnt", pid))
	if err != nil {
		return nil, fmt.Errorf("template: %w", err)
	}
	return ns, nil
}

// agentMountNS is the agent's own mount namespace, which a thread that
// joined a template returns to.
var agentMountNS = sync.OnceValues(func() (*os.File, error) { return os.Open("/proc/self/ns/mnt") })

// seccompProgram is the default profile compiled once (see compileSeccomp).
var seccompProgram = sync.OnceValues(compileSeccomp)

// layout is the shape of the host view on this host.
type layout struct {
	dirs   []string       // hostView directories, bound read-only
	links  []pid1.Symlink // hostView entries that are symlinks on the host (merged /usr)
	masked []string       // maskedHostFiles that exist
}

// hostLayout reads the host view's shape once.
var hostLayout = sync.OnceValues(func() (*layout, error) {
	l := &layout{}
	for _, h := range hostView {
		fi, err := os.Lstat(h)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("host view: %w", err)
		}
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(h)
			if err != nil {
				return nil, fmt.Errorf("host view: %w", err)
			}
			l.links = append(l.links, pid1.Symlink{Path: h, Target: target})
		case fi.IsDir():
			l.dirs = append(l.dirs, h)
		}
	}
	for _, f := range maskedHostFiles {
		if _, err := os.Stat(f); err == nil {
			l.masked = append(l.masked, f)
		}
	}
	return l, nil
})

// checkMounts checks s.Mounts: absolute, clean paths; no target that is,
// holds or lies in another target or one of the sandbox's own mount
// points; none at all for host isolation, which sees the host's files.
func checkMounts(s Spec, name string) error {
	if len(s.Mounts) > 0 && s.Isolation == IsolationHost {
		return fmt.Errorf("start %s: mounts need a sandbox; host isolation sees the host's files: %w", name, ErrInvalid)
	}
	for i, m := range s.Mounts {
		for _, p := range []string{m.Source, m.Target} {
			if !filepath.IsAbs(p) || filepath.Clean(p) != p {
				return fmt.Errorf("start %s: mount %s:%s: %q must be an absolute, clean path: %w", name, m.Source, m.Target, p, ErrInvalid)
			}
		}
		if m.Target == "/" {
			return fmt.Errorf("start %s: mount target /: the sandbox's root is its own: %w", name, ErrInvalid)
		}
		others := slices.Clone(reservedTargets)
		for _, o := range s.Mounts[:i] {
			others = append(others, o.Target)
		}
		for _, o := range others {
			if overlaps(m.Target, o) {
				return fmt.Errorf("start %s: mount target %s overlaps %s: %w", name, m.Target, o, ErrInvalid)
			}
		}
	}
	return nil
}

// overlaps reports whether a is b or one lies inside the other (neither
// is "/").
func overlaps(a, b string) bool {
	return a == b || strings.HasPrefix(a, b+"/") || strings.HasPrefix(b, a+"/")
}

// prepareWorkDir creates the work folder if missing and gives it to the
// workload: owned by uid:gid, mode 0700. Missing parents are made 0711
// (traversable, not listable). A symbolic link is refused.
func prepareWorkDir(dir string, uid, gid uint32, name string) error {
	if dir == "" {
		return nil
	}
	if !filepath.IsAbs(dir) {
		return fmt.Errorf("start %s: work folder %q: must be absolute: %w", name, dir, ErrInvalid)
	}
	err := os.Mkdir(dir, 0o700)
	if errors.Is(err, fs.ErrNotExist) {
		if err = os.MkdirAll(filepath.Dir(dir), 0o711); err == nil {
			err = os.Mkdir(dir, 0o700)
		}
	}
	if err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("start %s: work folder: %w", name, err)
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("start %s: work folder: %w", name, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("start %s: work folder %q: not a directory: %w", name, dir, ErrInvalid)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if st.Uid != uid || st.Gid != gid {
		if err := os.Lchown(dir, int(uid), int(gid)); err != nil {
			return fmt.Errorf("start %s: work folder: %w", name, err)
		}
	}
	if fi.Mode().Perm() != 0o700 {
		if err := os.Chmod(dir, 0o700); err != nil {
			return fmt.Errorf("start %s: work folder: %w", name, err)
		}
	}
	return nil
}

// workloadEnv returns s.Env with HOME set to home if s.Env has no HOME and
// home is not "".
func workloadEnv(env []string, home string) []string {
	if env == nil {
		env = []string{}
	}
	if home == "" {
		return env
	}
	for _, kv := range env {
		if strings.HasPrefix(kv, "HOME=") {
			return env
		}
	}
	return append(slices.Clip(env), "HOME="+home)
}

// workingDir returns the workload's working directory: s.Dir, else the work
// folder (at /work in a sandbox, its host path in host isolation), else "/"
// ("" for host isolation: the agent's).
func workingDir(s Spec) string {
	switch {
	case s.Dir != "":
		return s.Dir
	case s.WorkDir != "" && s.Isolation == IsolationHost:
		return s.WorkDir
	case s.WorkDir != "":
		return "/work"
	case s.Isolation == IsolationHost:
		return ""
	}
	return "/"
}

// home is $HOME for a workload whose environment has none: its work folder.
func home(s Spec) string {
	switch {
	case s.WorkDir == "":
		return ""
	case s.Isolation == IsolationHost:
		return s.WorkDir
	}
	return "/work"
}

// workFD is the descriptor a sandbox's init gets its work folder on, as a
// detached mount (see workTree).
const workFD = 5

// initConfig builds shim-init's configuration for a process sandbox or
// host isolation, and returns the template to clone the init from (nil:
// none, the init builds the whole root or none at all).
func (r *Runtime) initConfig(s Spec, initPath string, uid, gid uint32) (*pid1.Config, *os.File, error) {
	env := workloadEnv(s.Env, home(s))
	path, ok := envLookup(env, "PATH")
	if !ok {
		path = defaultPath
	}
	c := &pid1.Config{
		Argv: s.Argv, Env: env, Path: path, Dir: workingDir(s), UID: uid, GID: gid, StatusFD: initStatusFD,
	}
	if s.Isolation == IsolationHost {
		return c, nil, nil
	}
	base := r.sandboxBase(initPath)
	if base.err != nil {
		return nil, nil, base.err
	}
	var sb pid1.Sandbox
	var tmpl *os.File
	if len(s.Mounts) == 0 && base.tmpl != nil {
		sb, tmpl = base.own, base.tmpl
		if s.WorkDir != "" {
			sb.Binds = []pid1.Bind{{Source: s.WorkDir, Target: "/work", FD: workFD}}
		}
	} else {
		sb = base.full
		sb.Binds = slices.Clone(base.full.Binds)
		if s.WorkDir != "" {
			sb.Binds = append(sb.Binds, pid1.Bind{Source: s.WorkDir, Target: "/work"})
		}
		for _, m := range s.Mounts {
			sb.Binds = append(sb.Binds, pid1.Bind{Source: m.Source, Target: m.Target, ReadOnly: m.ReadOnly})
		}
	}
	c.Sandbox = &sb
	c.Hostname = hostname(s.ID)
	return c, tmpl, nil
}

// workTree returns a detached mount (open_tree) of the work folder dir.
func workTree(dir string) (*os.File, error) {
	fd, err := unix.OpenTree(unix.AT_FDCWD, dir, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("work folder %q: %w", dir, err)
	}
	return os.NewFile(uintptr(fd), dir), nil
}

// envLookup returns the last value of key in env.
func envLookup(env []string, key string) (string, bool) {
	v, ok := "", false
	for _, kv := range env {
		if rest, found := strings.CutPrefix(kv, key+"="); found {
			v, ok = rest, true
		}
	}
	return v, ok
}

// configFile returns a sealed-off memory file holding c, for shim-init's
// --config-fd.
func configFile(c *pid1.Config) (*os.File, error) {
	fd, err := unix.MemfdCreate("shim-init-config", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("init configuration: %w", err)
	}
	f := os.NewFile(uintptr(fd), "shim-init-config")
	if _, err := f.Write(c.Marshal()); err != nil {
		f.Close()
		return nil, fmt.Errorf("init configuration: %w", err)
	}
	return f, nil
}

// startInit clones shim-init straight into the workload's namespaces and
// group g (see cgroup.Group.Spawn), from the template tmpl if not nil, with
// its configuration on initConfigFD, the write end of its status pipe on
// initStatusFD and the work folder's detached mount, if it needs one, on
// workFD. It returns
// the init's pid and a pidfd (-1 if the kernel gave none).
func startInit(s Spec, initPath string, cfg *pid1.Config, tmpl *os.File, stdio []*os.File, status *os.File, g *cgroup.Group) (pid, pidfd int, err error) {
	cf, err := configFile(cfg)
	if err != nil {
		return 0, -1, err
	}
	defer cf.Close()
	files := []uintptr{stdio[0].Fd(), stdio[1].Fd(), stdio[2].Fd(), cf.Fd(), status.Fd()}
	if sb := cfg.Sandbox; sb != nil && len(sb.Binds) > 0 && sb.Binds[0].FD == workFD {
		work, err := workTree(s.WorkDir)
		if err != nil {
			return 0, -1, err
		}
		defer work.Close()
		files = append(files, work.Fd())
	}
	flags := uintptr(nsFlags)
	if s.Isolation == IsolationProcess {
		flags |= syscall.CLONE_NEWCGROUP
	}
	var unshare uintptr = syscall.CLONE_NEWNS // and Go makes "/" recursively private in it
	if tmpl != nil {
		// A copy of the template, whose mounts are all private already.
		initPath, flags, unshare = pid1.InitInTemplate, flags|syscall.CLONE_NEWNS, 0
	}
	pidfd = -1
	attr := &syscall.ProcAttr{
		// Two Ps: the init's signal.Notify runs on one while the other
		// builds the sandbox (see pid1.Main).
		Env:   []string{"GOMAXPROCS=2"},
		Files: files,
		Sys: &syscall.SysProcAttr{
			Setsid:       true, // a Ctrl-C on the agent's terminal never reaches workloads
			Cloneflags:   flags,
			Unshareflags: unshare,
			PidFD:        &pidfd,
			// No Pdeathsig: workloads must outlive the agent.
		},
	}
	start := func(cgroupFD int) error {
		if cgroupFD >= 0 {
			attr.Sys.UseCgroupFD, attr.Sys.CgroupFD = true, cgroupFD
		}
		var err error
		// The workload's command after "--" only shows in ps and in the
		// sandbox's /proc/1/cmdline; the init runs what cfg says.
		argv := append([]string{InitName, "--config-fd", strconv.Itoa(initConfigFD), "--"}, s.Argv...)
		pid, _, err = syscall.StartProcess(initPath, argv, attr)
		return err
	}
	switch {
	case tmpl != nil:
		err = spawnInTemplate(g, tmpl, s.Network, start)
	case s.Network == NetworkNone:
		err = spawnInNewNetns(g, start)
	default:
		err = g.Spawn(start)
	}
	if err != nil {
		err = fmt.Errorf("exec %q: %w", initPath, err)
	}
	return pid, pidfd, err
}

// spawnInTemplate runs start through g.SpawnLocked on a thread of its own
// that has joined the template's mount namespace (and, for NetworkNone, a
// new network namespace with lo up), so that the init is born in a copy of
// the template. Joining a mount namespace takes a thread that shares no
// file system information (root, working directory) with the others
// (unshare CLONE_FS), so the thread is never returned to the runtime: it
// ends with its goroutine. It rejoins the agent's mount namespace right
// after the clone, for what SpawnLocked then writes by path.
func spawnInTemplate(g *cgroup.Group, tmpl *os.File, net Network, start func(int) error) error {
	back, err := agentMountNS()
	if err != nil {
		return fmt.Errorf("agent's mount namespace: %w", err)
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with this goroutine
		errc <- func() error {
			if net == NetworkNone {
				if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
					return fmt.Errorf("new network namespace: %w", err)
				}
				if err := loopbackUp(); err != nil {
					return fmt.Errorf("new network namespace: %w", err)
				}
			}
			_, err := g.SpawnLocked(func(cgroupFD int) error {
				if err := unix.Unshare(unix.CLONE_FS); err != nil {
					return fmt.Errorf("unshare file system information: %w", err)
				}
				if err := unix.Setns(int(tmpl.Fd()), unix.CLONE_NEWNS); err != nil {
					return fmt.Errorf("join the template: %w", err)
				}
				err := start(cgroupFD)
				if berr := unix.Setns(int(back.Fd()), unix.CLONE_NEWNS); berr != nil && err == nil {
					err = fmt.Errorf("rejoin the agent's mount namespace: %w", berr)
				}
				return err
			})
			return err
		}()
	}()
	return <-errc
}

// initError is a failure shim-init reported; it wraps the error number.
type initError struct {
	text  string
	errno syscall.Errno
}

func (e *initError) Error() string { return e.text }
func (e *initError) Unwrap() error {
	if e.errno == 0 {
		return nil
	}
	return e.errno
}

// statusReader reads shim-init's reports from the read end of its status
// pipe.
type statusReader struct {
	f   *os.File
	buf []byte // read, not yet parsed
	eof bool
}

// next returns the next report, waiting for it until deadline (zero: do
// not wait for more than is already in the pipe). ok is false if there is
// none: the init exited without one, or the wait timed out (err).
func (sr *statusReader) next(deadline time.Time) (r pid1.Report, ok bool, err error) {
	for {
		if i := slices.Index(sr.buf, '\n'); i >= 0 {
			line := sr.buf[:i]
			sr.buf = sr.buf[i+1:]
			r, err := pid1.ParseReport(line)
			return r, err == nil, err
		}
		if sr.eof || len(sr.buf) > 4096 {
			return pid1.Report{}, false, nil
		}
		var chunk [256]byte
		var n int
		if deadline.IsZero() {
			n, err = sr.readNow(chunk[:])
			if n == 0 && err == nil {
				return pid1.Report{}, false, nil // nothing more now
			}
		} else {
			_ = sr.f.SetReadDeadline(deadline)
			n, err = sr.f.Read(chunk[:])
			_ = sr.f.SetReadDeadline(time.Time{})
		}
		sr.buf = append(sr.buf, chunk[:n]...)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return pid1.Report{}, false, fmt.Errorf("no word from shim-init in %v", startTimeout)
			}
			sr.eof = true // EOF: every writer has gone
		}
	}
}

// readNow reads what the pipe holds without waiting: (0, nil) if it is
// empty but still open.
func (sr *statusReader) readNow(b []byte) (n int, err error) {
	rc, err := sr.f.SyscallConn()
	if err != nil {
		return 0, err
	}
	var rerr error
	if err := rc.Read(func(fd uintptr) bool {
		n, rerr = unix.Read(int(fd), b)
		return true // never park: a non-blocking attempt
	}); err != nil {
		return 0, err
	}
	switch {
	case errors.Is(rerr, unix.EAGAIN):
		return 0, nil
	case rerr != nil:
		return 0, rerr
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

// startError turns shim-init's first report into Start's error (nil for
// Started).
func startError(r pid1.Report, name string) error {
	switch r.Kind {
	case pid1.Started:
		return nil
	case pid1.NotFound:
		return fmt.Errorf("exec: %q: %w", r.Text, ErrNotFound)
	case pid1.Failed:
		return fmt.Errorf("start %s: %w", name, &initError{r.Text, r.Errno})
	}
	return fmt.Errorf("start %s: shim-init reported %q before the workload started", name, r.Kind)
}
