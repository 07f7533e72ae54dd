package pid1

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// stepError is a failed setup step; its message names the step.
type stepError struct {
	step string
	err  error
}

func (e *stepError) Error() string { return e.step + ": " + e.err.Error() }
func (e *stepError) Unwrap() error { return e.err }

func fail(step string, err error) error { return &stepError{step, err} }

// devices are the character devices of a sandbox's /dev, as runc makes them.
var devices = []struct {
	name         string
	major, minor uint32
}{
	{"null", 1, 3}, {"zero", 1, 5}, {"full", 1, 7}, {"random", 1, 8}, {"urandom", 1, 9}, {"tty", 5, 0},
}

var devLinks = []Symlink{
	{"/dev/fd", "/proc/self/fd"}, {"/dev/stdin", "/proc/self/fd/0"}, {"/dev/stdout", "/proc/self/fd/1"},
	{"/dev/stderr", "/proc/self/fd/2"}, {"/dev/ptmx", "pts/ptmx"},
}

const (
	noexec = unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC
)

// InitInTemplate is where a template (see buildTemplate) holds shim-init
// itself, read-only: the path exec runs it by in a sandbox cloned from the
// template.
const InitInTemplate = "/.shim/shim-init"

// buildRoot gives this process the sandbox's root. With s.Root it builds
// the root there (buildStatic, then sandboxMounts) and makes it "/" (seal);
// without, the process's root already is a template's (see buildTemplate)
// and only the sandbox's own file systems are mounted on it. The mount
// namespace is this process's own, with private propagation, so nothing
// here reaches the host.
func buildRoot(s *Sandbox) error {
	if s.Root == "" {
		return sandboxMounts(s, "")
	}
	if err := buildStatic(s); err != nil {
		return err
	}
	if err := sandboxMounts(s, s.Root); err != nil {
		return err
	}
	return seal(s.Root)
}

// buildTemplate builds the part of a sandbox's root that all sandboxes
// share (buildStatic), with this executable bound read-only at
// InitInTemplate, and makes it "/" of this process's mount namespace: a
// template that exec keeps (by its namespace) and clones every process
// sandbox's from.
func buildTemplate(s *Sandbox) error {
	if err := buildStatic(s); err != nil {
		return err
	}
	if err := bind("/proc/self/exe", s.Root+InitInTemplate, true); err != nil {
		return fail("bind shim-init at "+InitInTemplate, err)
	}
	return seal(s.Root)
}

// buildStatic mounts a tmpfs at s.Root and makes in it the mount points of
// the sandbox's own file systems, s.Symlinks, the binds of host paths
// (Source), and the masks of what exists so far.
func buildStatic(s *Sandbox) error {
	root := s.Root
	if !filepath.IsAbs(root) {
		return fail("sandbox root", fmt.Errorf("%q is not absolute", root))
	}
	// The root holds only mount points and links; seal makes it
	// read-only.
	if err := unix.Mount("tmpfs", root, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=755,size=64k"); err != nil {
		return fail("mount the root tmpfs", err)
	}
	for _, d := range []string{"proc", "dev", "sys", "tmp", "work"} {
		if err := unix.Mkdir(root+"/"+d, 0o755); err != nil {
			return fail("root", err)
		}
	}
	for _, l := range s.Symlinks {
		if err := mkdirAll(filepath.Dir(in(root, l.Path))); err != nil {
			return fail("symlink "+l.Path, err)
		}
		if err := unix.Symlink(l.Target, in(root, l.Path)); err != nil {
			return fail("symlink "+l.Path, err)
		}
	}
	for _, b := range s.Binds {
		if b.FD > 2 {
			continue // a detached mount: sandboxMounts moves it in
		}
		if err := bind(b.Source, in(root, b.Target), b.ReadOnly); err != nil {
			return fail("bind "+b.Source+" at "+b.Target, err)
		}
	}
	for _, p := range s.Masked {
		if err := mask(in(root, p), "/dev/null"); err != nil {
			return fail("mask "+p, err)
		}
	}
	return nil
}

// sandboxMounts mounts the file systems of this sandbox alone on the root
// at root ("" = "/"): a minimal /dev, a fresh /proc, a read-only /sys, a
// private /tmp, the detached mounts of s.Binds (FD), then s.Masked and
// s.ReadOnly.
func sandboxMounts(s *Sandbox, root string) error {
	if err := buildDev(in(root, "/dev")); err != nil {
		return err
	}
	if err := unix.Mount("proc", in(root, "/proc"), "proc", noexec, ""); err != nil {
		return fail("mount /proc", err)
	}
	if err := unix.Mount("sysfs", in(root, "/sys"), "sysfs", noexec|unix.MS_RDONLY, ""); err != nil {
		return fail("mount /sys", err)
	}
	if err := unix.Mount("tmpfs", in(root, "/tmp"), "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=1777"); err != nil {
		return fail("mount /tmp", err)
	}
	for _, b := range s.Binds {
		if b.FD <= 2 {
			continue // bound by buildStatic
		}
		if err := moveMount(b.FD, in(root, b.Target), b.ReadOnly); err != nil {
			return fail("mount "+b.Source+" at "+b.Target, err)
		}
	}
	for _, p := range s.Masked {
		if err := mask(in(root, p), in(root, "/dev/null")); err != nil {
			return fail("mask "+p, err)
		}
	}
	for _, p := range s.ReadOnly {
		if err := readOnly(in(root, p)); err != nil {
			return fail("read-only "+p, err)
		}
	}
	return nil
}

// seal makes the root tmpfs at root read-only and the root of this mount
// namespace. pivot_root(".", ".") stacks the old root on the new one;
// detaching it leaves the new root alone (runc does the same).
func seal(root string) error {
	if err := unix.Mount("", root, "", unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		return fail("make the root read-only", err)
	}
	if err := unix.Chdir(root); err != nil {
		return fail("pivot_root", err)
	}
	if err := unix.PivotRoot(".", "."); err != nil {
		return fail("pivot_root", err)
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return fail("detach the old root", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fail("pivot_root", err)
	}
	return nil
}

// in returns path p of a root at root ("" = "/").
func in(root, p string) string { return root + filepath.Clean("/"+p) }

// moveMount moves the detached mount fd (open_tree) to dst, an existing
// directory, never with setuid or device files, read-only if ro.
func moveMount(fd int, dst string, ro bool) error {
	defer unix.Close(fd)
	if err := unix.MoveMount(fd, "", unix.AT_FDCWD, dst, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return err
	}
	attr := unix.MountAttr{Attr_set: unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV}
	if ro {
		attr.Attr_set |= unix.MOUNT_ATTR_RDONLY
	}
	return unix.MountSetattr(unix.AT_FDCWD, dst, unix.AT_RECURSIVE|unix.AT_SYMLINK_NOFOLLOW, &attr)
}

// buildDev makes a minimal /dev on a tmpfs at dir.
func buildDev(dir string) error {
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NOEXEC|unix.MS_STRICTATIME, "mode=755,size=64k"); err != nil {
		return fail("mount /dev", err)
	}
	old := unix.Umask(0)
	defer unix.Umask(old)
	for _, d := range devices {
		if err := unix.Mknod(dir+"/"+d.name, unix.S_IFCHR|0o666, int(unix.Mkdev(d.major, d.minor))); err != nil {
			return fail("/dev/"+d.name, err)
		}
	}
	for _, l := range devLinks {
		if err := unix.Symlink(l.Target, dir+strings.TrimPrefix(l.Path, "/dev")); err != nil {
			return fail(l.Path, err)
		}
	}
	for _, d := range []string{"pts", "shm"} {
		if err := unix.Mkdir(dir+"/"+d, 0o755); err != nil {
			return fail("/dev/"+d, err)
		}
	}
	if err := unix.Mount("devpts", dir+"/pts", "devpts", unix.MS_NOSUID|unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"); err != nil {
		return fail("mount /dev/pts", err)
	}
	if err := unix.Mount("shm", dir+"/shm", "tmpfs", noexec, "mode=1777,size=65536k"); err != nil {
		return fail("mount /dev/shm", err)
	}
	return nil
}

// bind binds src at dst (created in the root tmpfs if missing: a directory,
// or an empty file for a file), read-only if ro, never with setuid or
// device files.
func bind(src, dst string, ro bool) error {
	var st unix.Stat_t
	if err := unix.Stat(src, &st); err != nil {
		return err
	}
	if err := mkdirAll(filepath.Dir(dst)); err != nil {
		return err
	}
	var err error
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		err = unix.Mkdir(dst, 0o755)
	} else {
		var fd int
		fd, err = unix.Open(dst, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_CLOEXEC, 0o644)
		if err == nil {
			unix.Close(fd)
		}
	}
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return err
	}
	if err := unix.Mount(src, dst, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return err
	}
	attr := unix.MountAttr{Attr_set: unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV}
	if ro {
		attr.Attr_set |= unix.MOUNT_ATTR_RDONLY
	}
	return unix.MountSetattr(unix.AT_FDCWD, dst, unix.AT_RECURSIVE|unix.AT_SYMLINK_NOFOLLOW, &attr)
}

// mask hides path: an empty read-only tmpfs over a directory, null (the
// sandbox's /dev/null) over anything else. A missing path is left alone.
func mask(path, null string) error {
	var st unix.Stat_t
	err := unix.Lstat(path, &st)
	switch {
	case errors.Is(err, unix.ENOENT):
		return nil
	case err != nil:
		return err
	case st.Mode&unix.S_IFMT == unix.S_IFDIR:
		return unix.Mount("tmpfs", path, "tmpfs", unix.MS_RDONLY|noexec, "size=0")
	case st.Mode&unix.S_IFMT == unix.S_IFLNK:
		return nil // nothing in /proc or /sys to hide behind a link
	}
	return unix.Mount(null, path, "", unix.MS_BIND, "")
}

// readOnly makes path and everything below it read-only. A missing path is
// left alone.
func readOnly(path string) error {
	err := unix.Mount(path, path, "", unix.MS_BIND|unix.MS_REC, "")
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return err
	}
	attr := unix.MountAttr{Attr_set: unix.MOUNT_ATTR_RDONLY | unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV | unix.MOUNT_ATTR_NOEXEC}
	return unix.MountSetattr(unix.AT_FDCWD, path, unix.AT_RECURSIVE|unix.AT_SYMLINK_NOFOLLOW, &attr)
}

// mkdirAll makes dir and its parents (0755) in the root tmpfs.
func mkdirAll(dir string) error {
	err := unix.Mkdir(dir, 0o755)
	if err == nil || errors.Is(err, unix.EEXIST) {
		return nil
	}
	if !errors.Is(err, unix.ENOENT) || dir == "/" {
		return err
	}
	if err := mkdirAll(filepath.Dir(dir)); err != nil {
		return err
	}
	if err := unix.Mkdir(dir, 0o755); err != nil && !errors.Is(err, unix.EEXIST) {
		return err
	}
	return nil
}

// dropPrivileges gives the calling thread, which must be locked to its OS
// thread and forks the workload next, the workload's identity: in a
// sandbox only the kept capabilities in the bounding set first (none at all
// for a user other than root), then the supplementary groups cleared, GID
// and UID set, the kept capabilities (inheritable too, so that an exec as
// root gets exactly these; a user other than root has lost them all with
// setuid), no ambient ones, no_new_privs, and the seccomp program last.
//
// Only this thread changes (raw system calls): the workload inherits its
// credentials, and Go's all-thread versions stop the world once per call,
// about 80 µs each here. The init's other threads keep its privileges, but
// nothing in the sandbox can reach them: the init is not dumpable (Main), so
// neither its /proc files nor ptrace are open to the workload (which also
// lacks CAP_SYS_PTRACE and, with the filter, ptrace itself).
func dropPrivileges(c *Config) error {
	s := c.Sandbox
	keep := uint64(0)
	if s != nil && c.UID == 0 {
		keep = s.Caps
	}
	if s != nil {
		// Needs CAP_SETPCAP, so before the UID changes.
		for capn := 0; capn < 64; capn++ {
			if keep&(1<<capn) != 0 {
				continue
			}
			if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(capn), 0, 0, 0); err != nil {
				if errors.Is(err, unix.EINVAL) {
					break // past the kernel's last capability
				}
				return fail("drop capabilities", err)
			}
		}
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETGROUPS, 0, 0, 0); e != 0 {
		return fail("setgroups", e)
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETGID, uintptr(c.GID), 0, 0); e != 0 {
		return fail(fmt.Sprintf("setgid %d", c.GID), e)
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETUID, uintptr(c.UID), 0, 0); e != 0 {
		return fail(fmt.Sprintf("setuid %d", c.UID), e)
	}
	if s == nil {
		return nil
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	for i := range data {
		v := uint32(keep >> (32 * i))
		data[i] = unix.CapUserData{Effective: v, Permitted: v, Inheritable: v}
	}
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return fail("capset", err)
	}
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil {
		return fail("clear ambient capabilities", err)
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fail("no_new_privs", err)
	}
	if len(s.Seccomp) > 0 {
		if err := loadSeccomp(s.Seccomp); err != nil {
			return fail("seccomp", err)
		}
	}
	return nil
}

// loadSeccomp installs a BPF program (struct sock_filter[], native byte
// order) on the calling thread.
func loadSeccomp(prog []byte) error {
	if len(prog)%8 != 0 || len(prog)/8 > unix.BPF_MAXINSNS {
		return fmt.Errorf("BPF program of %d bytes: %w", len(prog), ErrConfig)
	}
	filter := make([]unix.SockFilter, len(prog)/8)
	for i := range filter {
		b := prog[8*i:]
		filter[i] = unix.SockFilter{
			Code: binary.NativeEndian.Uint16(b), Jt: b[2], Jf: b[3], K: binary.NativeEndian.Uint32(b[4:]),
		}
	}
	fprog := &unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	_, _, e := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, 0, uintptr(unsafe.Pointer(fprog)))
	runtime.KeepAlive(filter)
	if e != 0 {
		return e
	}
	return nil
}

// lookPath resolves file like execvp would, in the current root and
// working directory, with the current identity.
func lookPath(file, path string) (string, error) {
	if strings.Contains(file, "/") {
		return file, checkExec(file)
	}
	var firstErr error
	for _, d := range filepath.SplitList(path) {
		if d == "" {
			d = "."
		}
		p := d + "/" + file
		err := checkExec(p)
		if err == nil {
			return p, nil
		}
		if !errors.Is(err, fs.ErrNotExist) && firstErr == nil {
			firstErr = err
		}
	}
	if firstErr != nil {
		return "", firstErr
	}
	return "", fs.ErrNotExist
}

// checkExec reports whether path is a file this process may execute:
// fs.ErrNotExist if there is nothing (or a directory in the way), EACCES
// if it is not executable.
func checkExec(path string) error {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) {
			return fs.ErrNotExist
		}
		return err
	}
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		return unix.EACCES
	}
	return unix.Access(path, unix.X_OK)
}

// readConfig reads and decodes the configuration from fd, which it closes.
func readConfig(fd int) (*Config, error) {
	f := os.NewFile(uintptr(fd), "config")
	if f == nil {
		return nil, fmt.Errorf("config descriptor %d: %w", fd, unix.EBADF)
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("config descriptor %d: %w", fd, err)
	}
	if st.Size > maxConfig {
		return nil, fmt.Errorf("%w: %d bytes", ErrConfig, st.Size)
	}
	b := make([]byte, st.Size)
	n, err := f.ReadAt(b, 0)
	if err != nil && n != len(b) {
		return nil, fmt.Errorf("config descriptor %d: %w", fd, err)
	}
	return Unmarshal(b)
}
