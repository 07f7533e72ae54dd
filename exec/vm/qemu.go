package vm

import (
	"errors"
	"fmt"
	"os"
	osexec "os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/shim-run/shim/pid1/guest"
	"golang.org/x/sys/unix"
)

// DefaultQEMU is the QEMU binary looked up in PATH.
const DefaultQEMU = "qemu-system-x86_64"

// Accelerators.
const (
	AccelKVM = "kvm"
	AccelTCG = "tcg"
)

// systemPaths are the host folders a guest sees read-only, as in exec's
// host view: shared over 9p when a directory, recreated when a symbolic
// link (on merged-/usr systems /bin, /sbin and /lib* are links into /usr).
var systemPaths = []string{"/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"}

// Available reports whether this host can run VMs with the default
// settings (QEMU in PATH, the newest /boot/vmlinuz-* and its modules), in
// one line; nil if it can. The accelerator is never a reason: without
// KVM, QEMU emulates (TCG).
func Available() error {
	return (&Runtime{}).available()
}

func (r *Runtime) available() error {
	if _, err := r.qemuPath(); err != nil {
		return err
	}
	_, ver, err := kernelInfo(r.Kernel)
	if err != nil {
		return err
	}
	if _, err := resolveModules(filepath.Join(r.modulesRoot(), ver), guestModules); err != nil {
		return fmt.Errorf("guest kernel %s: %w", ver, err)
	}
	return nil
}

// Check is Available for this Runtime's settings, including its Init.
func (r *Runtime) Check() error {
	if err := r.available(); err != nil {
		return err
	}
	if _, err := os.Stat(r.initPath()); err != nil {
		return fmt.Errorf("no guest init: %w (build it with CGO_ENABLED=0 go build ./cmd/shim-init)", err)
	}
	return nil
}

func (r *Runtime) qemuPath() (string, error) {
	q := r.QEMU
	if q == "" {
		q = DefaultQEMU
	}
	p, err := osexec.LookPath(q)
	if err != nil {
		return "", fmt.Errorf("no QEMU: %s not found (install qemu-system-x86)", q)
	}
	return p, nil
}

func (r *Runtime) modulesRoot() string {
	if r.ModulesDir != "" {
		return r.ModulesDir
	}
	return "/lib/modules"
}

// accel picks the accelerator: Runtime.Accel if set, else KVM when it can
// boot a stock kernel, else TCG.
func (r *Runtime) accel() string {
	if r.Accel != "" {
		return r.Accel
	}
	if kvmUsable() {
		return AccelKVM
	}
	return AccelTCG
}

// kvmUsable reports whether /dev/kvm opens and is backed by hardware
// virtualization (kvm_intel or kvm_amd). A /dev/kvm that opens is not
// enough: a host can offer KVM through kvm_pvm (pagetable-based, for nested
// guests without VMX), which boots only kernels built as PVM guests; a
// stock Debian kernel hangs there after the firmware (measured on this
// machine kind).
func kvmUsable() bool {
	fd, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	const kvmGetAPIVersion = 0xAE00
	v, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), kvmGetAPIVersion, 0)
	if errno != 0 || v != 12 {
		return false
	}
	for _, m := range []string{"kvm_intel", "kvm_amd"} {
		if _, err := os.Stat("/sys/module/" + m); err == nil {
			return true
		}
	}
	return false
}

// share is a host directory exported to the guest over 9p.
type share struct {
	guest.Share
	Host string
}

// hostView returns the shares and links that give the guest the host's
// system folders read-only, plus dir (if not "") read-write at the same
// path.
func hostView(dir string) ([]share, []guest.Link, error) {
	var shares []share
	var links []guest.Link
	for i, p := range systemPaths {
		fi, err := os.Lstat(p)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, nil, err
		}
		switch {
		case fi.Mode()&os.ModeSymlink != 0:
			t, err := os.Readlink(p)
			if err != nil {
				return nil, nil, err
			}
			links = append(links, guest.Link{Path: p, Target: t})
		case fi.IsDir():
			shares = append(shares, share{Share: guest.Share{Tag: "sys" + strconv.Itoa(i), Path: p, ReadOnly: true}, Host: p})
		}
	}
	if dir != "" {
		shares = append(shares, share{Share: guest.Share{Tag: "work", Path: dir}, Host: dir})
	}
	return shares, links, nil
}

// qemuConfig is everything that goes on QEMU's command line.
type qemuConfig struct {
	Name      string
	Accel     string
	Kernel    string
	Initrd    string
	Plan      plan
	Dir       string // the VM's state directory
	Stdout    string // host files for the workload's output ("" = none)
	Stderr    string
	Shares    []share
	QMPFD     int // listening sockets inherited by QEMU
	ControlFD int
}

// State directory files.
const (
	fileQMP     = "qmp.sock"
	fileControl = "control.sock"
	fileConsole = "console.log"
	fileConfig  = "guest.json"
	fileMeta    = "vm.json"
	fileQEMULog = "qemu.log"
)

// tcgTBSize is TCG's translation cache in MiB. QEMU's default is 1 GiB
// (touched as it fills); a boot alone fills about 43 MiB of it. 32 MiB
// costs a boot about 0.05 s of retranslation over 64 MiB (measured) and
// keeps QEMU's RSS beyond the guest's memory small.
const tcgTBSize = 32

// kernelCmdline is the guest kernel's command line. Besides the vCPUs to
// bring up, the console,
// panic=-1 (a panic ends QEMU, which has -no-reboot) and
// memory hot-plug settings (hot-added memory comes online by itself, in
// ZONE_MOVABLE, so removable, while that stays within 3x the kernel's
// memory, then in ZONE_NORMAL: with everything movable a guest grown far
// past its boot memory runs out of memory for page tables and the memory
// map and OOM-kills with most of its memory free, seen at 1 GiB on a
// 128 MiB boot), it skips work that only costs under emulation:
// mitigations (the VM is the boundary), the TSC watchdog and the timer
// check, the crypto self-tests, slow RCU grace periods, and the i8042
// probe. Together about 0.3 s of a TCG boot (measured).
func kernelCmdline(p plan) string {
	return strings.Join([]string{
		"maxcpus=" + strconv.Itoa(p.VCPUs), // the other vCPUs are present, offline (see pid1/guest's hotplug)
		"console=ttyS0", "quiet", "panic=-1",
		"memhp_default_state=online", "memory_hotplug.online_policy=auto-movable",
		"mitigations=off", "tsc=reliable", "no_timer_check",
		"cryptomgr.notests", "rcupdate.rcu_expedited=1", "random.trust_cpu=on",
		"i8042.noaux", "i8042.nokbd", "i8042.nopnp",
		guest.GuestEnv + "=1",
	}, " ")
}

// args builds QEMU's arguments (without argv[0]).
func (c qemuConfig) args() []string {
	p := c.Plan
	a := []string{
		"-name", "guest=" + c.Name + ",debug-threads=on",
		"-M", "q35", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
		"-msg", "timestamp=on",
	}
	if c.Accel == AccelKVM {
		a = append(a, "-accel", "kvm", "-cpu", "host")
	} else {
		a = append(a, "-accel", "tcg,tb-size="+strconv.Itoa(tcgTBSize))
	}
	mem := "size=" + strconv.FormatInt(p.BootMem>>20, 10) + "M"
	if p.Region > 0 {
		mem += ",maxmem=" + strconv.FormatInt((p.BootMem+p.Region)>>20, 10) + "M"
	}
	a = append(a, "-m", mem)
	// Every possible vCPU is there from the start; the guest keeps the
	// granted ones online (see pid1/guest's hotplug for why not device_add).
	a = append(a, "-smp", fmt.Sprintf("%d,sockets=%d,cores=1,threads=1,maxcpus=%d", p.MaxVCPUs, p.MaxVCPUs, p.MaxVCPUs))
	if p.Region > 0 {
		a = append(a,
			"-object", fmt.Sprintf("memory-backend-ram,id=vmem0,size=%dM,reserve=off", p.Region>>20),
			"-device", fmt.Sprintf("virtio-mem-pci,id=vmem,memdev=vmem0,block-size=%dM,requested-size=%dM",
				MemBlock>>20, p.plugged(p.GrantMem)>>20))
	}
	a = append(a,
		"-kernel", c.Kernel, "-initrd", c.Initrd, "-append", kernelCmdline(p),
		"-fw_cfg", "name="+guest.FwCfgName+",file="+filepath.Join(c.Dir, fileConfig),
		"-chardev", "socket,id=qmp,fd="+strconv.Itoa(c.QMPFD)+",server=on,wait=off",
		"-mon", "chardev=qmp,mode=control",
		"-chardev", "file,id=con,path="+filepath.Join(c.Dir, fileConsole),
		"-serial", "chardev:con",
		"-device", "virtio-serial-pci,id=vser,max_ports=4",
		"-chardev", "socket,id=ctl,fd="+strconv.Itoa(c.ControlFD)+",server=on,wait=off",
		"-device", "virtserialport,bus=vser.0,chardev=ctl,name="+guest.PortControl,
	)
	if c.Stdout != "" {
		a = append(a, "-chardev", "file,id=out,append=on,path="+c.Stdout,
			"-device", "virtserialport,bus=vser.0,chardev=out,name="+guest.PortStdout)
	}
	if c.Stderr != "" && c.Stderr != c.Stdout {
		a = append(a, "-chardev", "file,id=err,append=on,path="+c.Stderr,
			"-device", "virtserialport,bus=vser.0,chardev=err,name="+guest.PortStderr)
	}
	for _, s := range c.Shares {
		model, ro := "passthrough", ""
		if s.ReadOnly {
			model, ro = "none", ",readonly=on"
		}
		a = append(a,
			"-fsdev", fmt.Sprintf("local,id=fs%s,path=%s,security_model=%s,multidevs=remap%s", s.Tag, s.Host, model, ro),
			"-device", fmt.Sprintf("virtio-9p-pci,fsdev=fs%s,mount_tag=%s", s.Tag, s.Tag))
	}
	return a
}

// qemuOptValue reports whether s can stand as a value in QEMU's
// comma-separated options (a comma would have to be doubled).
func qemuOptValue(s string) bool { return !strings.ContainsAny(s, ",\n\x00") }
