// Package guest is the init of a shim VM: the program the guest kernel runs
// as PID 1 from the initramfs that exec/vm builds. It also defines what the
// host and the guest say to each other (Config, Msg).
//
// Boot, in order (Main): mount /proc, /sys, /dev (devtmpfs), /tmp and /run;
// load the kernel modules listed in /shim/modules.order (the initramfs
// builder resolved their order from modules.dep); read the Config from the
// fw_cfg file FwCfgName; bring lo up; mount the host's system folders and
// the work directory over 9p (Config.Shares) and make the host's symbolic
// links (/bin -> usr/bin...); start onlining hot-added vCPUs and memory as
// their uevents arrive (netlink, no polling; memory is normally onlined by
// the kernel itself, memhp_default_state=online) and keep Config.VCPUs
// vCPUs online (see hotplug); open the
// virtio-serial ports; run the workload as Config.UID:GID in its own
// session with Config.Env and Config.Dir, its stdout and stderr on the
// output ports, so that its writes reach the host's log file directly (a
// blocking virtio-serial write returns once QEMU has taken the data).
//
// While the workload runs, init reaps every orphan, forwards the signals the
// host asks for, onlines or offlines vCPUs to the count it asks for ("cpus"),
// answers "stat", reports its memory (MemTotal,
// MemAvailable, online vCPUs) when it changes, and asks for more memory or
// CPU ("want") when MemAvailable runs low or every vCPU stays busy (see
// wantMem, wantCPU). When the workload ends it reports the exit on the
// control channel and on the serial console (ConsolePrefix), kills what is
// left, syncs and powers the VM off.
//
// The control channel is a virtio-serial port whose host end is a unix
// socket chardev that QEMU keeps listening on, so the host agent may come
// and go: while nobody is connected the guest's writes block, and only its
// writer goroutine waits (stat lines are dropped meanwhile, never the exit,
// which also goes to the console).
package guest

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// IsGuest reports whether this process is the init of a shim VM: PID 1
// with GuestEnv=1 in its environment (put on the kernel command line by the
// host). The sandbox init of exec is PID 1 of a pid namespace, without it.
func IsGuest() bool {
	return os.Getpid() == 1 && os.Getenv(GuestEnv) == "1"
}

// Main runs the guest init and powers the VM off; it never returns.
func Main() {
	g := &initProc{console: os.Stdout}
	code := g.run()
	g.shutdown(code)
}

// initProc is the guest init's state.
type initProc struct {
	console *os.File
	ctl     *control
	cfg     Config
	marks   string // boot steps and the uptime at their end
}

func (g *initProc) logf(format string, args ...any) {
	fmt.Fprintf(g.console, ConsolePrefix+format+"\n", args...)
}

// run sets the guest up and runs the workload; it returns the message that
// reports its end.
func (g *initProc) run() Msg {
	if err := mountBasics(); err != nil {
		return g.fail(err)
	}
	g.mark("basics")
	if err := loadModules("/shim/modules.order"); err != nil {
		return g.fail(err)
	}
	g.mark("modules")
	cfg, err := readConfig()
	if err != nil {
		return g.fail(err)
	}
	g.cfg = cfg
	if err := loopbackUp(); err != nil {
		g.logf("lo: %v", err) // not fatal: the workload has no network anyway
	}
	if err := mountShares(cfg); err != nil {
		return g.fail(err)
	}
	g.mark("shares")
	hp, err := startHotplug(cfg.VCPUs)
	if err != nil {
		return g.fail(err)
	}
	ctlPath, err := findPort(PortControl, 5*time.Second)
	if err != nil {
		return g.fail(err)
	}
	g.ctl, err = openControl(ctlPath)
	if err != nil {
		return g.fail(err)
	}
	stdio, err := openStdio(cfg)
	if err != nil {
		return g.fail(err)
	}
	g.mark("ports")
	g.logf("boot%s", g.marks)
	return g.runWorkload(stdio, hp)
}

// mark notes the guest's uptime at the end of a boot step; the steps go
// to the console in one line before the workload starts.
func (g *initProc) mark(step string) {
	b, _ := os.ReadFile("/proc/uptime")
	g.marks += " " + step + "=" + strings.Fields(string(b) + " ?")[0]
}

// fail reports a setup error.
func (g *initProc) fail(err error) Msg {
	return Msg{Kind: KindFail, Text: err.Error()}
}

// runWorkload starts the workload and serves the control channel until it
// exits.
func (g *initProc) runWorkload(stdio []*os.File, hp *hotplug) Msg {
	sigc := make(chan os.Signal, 16)
	signal.Notify(sigc, syscall.SIGCHLD)
	path, err := lookPath(g.cfg.Argv[0], g.cfg.Env, g.cfg.Dir)
	if err != nil {
		return g.fail(err)
	}
	dir := g.cfg.Dir
	if dir == "" {
		dir = "/"
	}
	fds := make([]uintptr, len(stdio))
	for i, f := range stdio {
		fds[i] = f.Fd()
	}
	pid, err := syscall.ForkExec(path, g.cfg.Argv, &syscall.ProcAttr{
		Dir:   dir,
		Env:   g.cfg.Env,
		Files: fds,
		Sys: &syscall.SysProcAttr{
			Setsid:     true,
			Credential: &syscall.Credential{Uid: g.cfg.UID, Gid: g.cfg.GID, Groups: []uint32{}},
		},
	})
	for _, f := range stdio {
		f.Close()
	}
	if err != nil {
		return g.fail(fmt.Errorf("exec %q: %w", path, err))
	}
	g.ctl.send(Msg{Kind: KindStarted, A: int64(pid)})
	oomBefore := oomKills()

	w := newWatcher(g.ctl, hp)
	go w.run()
	for {
		select {
		case <-sigc:
			if st, done := reap(pid); done {
				w.stop()
				if st.Signaled() {
					oom := st.Signal() == syscall.SIGKILL && oomKills() > oomBefore
					return Msg{Kind: KindExit, A: int64(st.Signal()), Signal: true, OOM: oom}
				}
				return Msg{Kind: KindExit, A: int64(st.ExitStatus())}
			}
		case m := <-g.ctl.in:
			switch m.Kind {
			case KindSignal:
				if m.A > 0 && m.A < 65 {
					_ = unix.Kill(pid, unix.Signal(m.A))
				}
			case KindStat:
				w.kick()
			case KindCPUs:
				if m.A > 0 && m.A <= 1024 {
					hp.setTarget(int(m.A))
				}
			}
		}
	}
}

// reap collects every exited child; it reports whether main was among them.
func reap(main int) (syscall.WaitStatus, bool) {
	var mainSt syscall.WaitStatus
	found := false
	for {
		var st syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &st, syscall.WNOHANG, nil)
		if err == syscall.EINTR {
			continue
		}
		if err != nil || pid <= 0 {
			return mainSt, found
		}
		if pid == main {
			mainSt, found = st, true
		}
	}
}

// oomKills reads the guest's count of OOM kills.
func oomKills() uint64 {
	b, _ := os.ReadFile("/proc/vmstat")
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "oom_kill "); ok {
			n, _ := strconv.ParseUint(v, 10, 64)
			return n
		}
	}
	return 0
}

// shutdown reports the end on the console and the control channel, stops
// what is left and powers off.
func (g *initProc) shutdown(end Msg) {
	g.logf("%s", end.String())
	// The serial driver sends from a buffer: wait until the line is out
	// (tcdrain), or a power-off right after could lose it.
	_ = unix.IoctlSetInt(int(g.console.Fd()), unix.TCSBRK, 1)
	if g.ctl != nil {
		g.ctl.sendWait(end, 2*time.Second)
	}
	_ = unix.Kill(-1, unix.SIGKILL)
	for range 50 { // reap the rest, 0.5 s at most
		if _, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil); err == syscall.ECHILD {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	unix.Sync()
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	select {} // PID 1 must not exit: that would panic the kernel
}

// readConfig reads the Config from fw_cfg.
func readConfig() (Config, error) {
	var cfg Config
	b, err := os.ReadFile("/sys/firmware/qemu_fw_cfg/by_name/" + FwCfgName + "/raw")
	if err != nil {
		return cfg, fmt.Errorf("config: %w", err)
	}
	if err := json.Unmarshal(b, &cfg); err != nil {
		return cfg, fmt.Errorf("config: %w", err)
	}
	if len(cfg.Argv) == 0 {
		return cfg, errors.New("config: empty argv")
	}
	return cfg, nil
}

// findPort waits for the virtio-serial port called name and returns its
// device path.
func findPort(name string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		ents, _ := os.ReadDir("/sys/class/virtio-ports")
		for _, e := range ents {
			b, err := os.ReadFile(filepath.Join("/sys/class/virtio-ports", e.Name(), "name"))
			if err == nil && strings.TrimSpace(string(b)) == name {
				dev := "/dev/" + e.Name()
				if _, err := os.Stat(dev); err == nil {
					return dev, nil
				}
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("virtio-serial port %s: not found", name)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// openStdio opens the workload's stdin (/dev/null), stdout and stderr.
func openStdio(cfg Config) ([]*os.File, error) {
	null, err := os.Open(os.DevNull)
	if err != nil {
		return nil, err
	}
	files := []*os.File{null}
	for i, port := range []string{cfg.Stdout, cfg.Stderr} {
		if i == 1 && port == cfg.Stdout {
			f, err := dup(files[1])
			if err != nil {
				return nil, err
			}
			files = append(files, f)
			continue
		}
		var f *os.File
		if port == "" {
			f, err = os.OpenFile(os.DevNull, os.O_WRONLY, 0)
		} else {
			var dev string
			if dev, err = findPort(port, 5*time.Second); err == nil {
				f, err = os.OpenFile(dev, os.O_WRONLY, 0)
			}
		}
		if err != nil {
			return nil, fmt.Errorf("output %q: %w", port, err)
		}
		files = append(files, f)
	}
	return files, nil
}

func dup(f *os.File) (*os.File, error) {
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), f.Name()), nil
}

// lookPath resolves file like execvp after chdir(dir), with PATH from env
// or a default.
func lookPath(file string, env []string, dir string) (string, error) {
	check := func(p string) error {
		q := p
		if !filepath.IsAbs(q) && dir != "" {
			q = filepath.Join(dir, q)
		}
		st, err := os.Stat(q)
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
			return "", fmt.Errorf("exec %q: %w", file, err)
		}
		return file, nil
	}
	pathEnv := "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			pathEnv = v
		}
	}
	for _, d := range filepath.SplitList(pathEnv) {
		if d == "" {
			d = "."
		}
		if p := d + "/" + file; check(p) == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("exec %q: not found", file)
}

// control is the guest end of the control channel.
type control struct {
	f   *os.File
	in  chan Msg    // from the host
	out chan outMsg // to the host
}

type outMsg struct {
	line string
	done chan struct{} // closed once written; nil if nobody waits
}

func openControl(path string) (*control, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("control channel: %w", err)
	}
	c := &control{f: f, in: make(chan Msg, 16), out: make(chan outMsg, 64)}
	go c.reader()
	go c.writer()
	return c, nil
}

// reader parses the host's lines. While no host is connected a read returns
// end-of-file at once, so it then waits a little before trying again.
func (c *control) reader() {
	for {
		sc := bufio.NewScanner(c.f)
		sc.Buffer(make([]byte, MaxLine), MaxLine)
		for sc.Scan() {
			if m, err := ParseMsg(sc.Text()); err == nil {
				c.in <- m
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// writer writes queued lines; a write blocks while no host is connected.
func (c *control) writer() {
	for m := range c.out {
		_, _ = c.f.Write([]byte(m.line + "\n"))
		if m.done != nil {
			close(m.done)
		}
	}
}

// send queues m, dropping it if the queue is full (the host is away).
func (c *control) send(m Msg) {
	select {
	case c.out <- outMsg{line: m.String()}:
	default:
	}
}

// sendWait queues m and waits until it is written or timeout passes.
func (c *control) sendWait(m Msg, timeout time.Duration) {
	done := make(chan struct{})
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case c.out <- outMsg{line: m.String(), done: done}:
	case <-t.C:
		return
	}
	select {
	case <-done:
	case <-t.C:
	}
}
