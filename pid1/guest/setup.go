package guest

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// mountBasics mounts the kernel file systems and the scratch space.
func mountBasics() error {
	for _, m := range []struct {
		fstype, target, data string
		flags                uintptr
	}{
		{"proc", "/proc", "", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC},
		{"sysfs", "/sys", "", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC},
		{"devtmpfs", "/dev", "mode=0755", unix.MS_NOSUID},
		{"tmpfs", "/tmp", "mode=1777", unix.MS_NOSUID | unix.MS_NODEV},
		{"tmpfs", "/run", "mode=0755", unix.MS_NOSUID | unix.MS_NODEV},
	} {
		if err := os.MkdirAll(m.target, 0o755); err != nil {
			return fmt.Errorf("mount %s: %w", m.target, err)
		}
		if err := unix.Mount(m.fstype, m.target, m.fstype, m.flags, m.data); err != nil {
			return fmt.Errorf("mount %s on %s: %w", m.fstype, m.target, err)
		}
	}
	// Not fatal: /dev/pts and /dev/shm are only for workloads that want them.
	if os.MkdirAll("/dev/pts", 0o755) == nil {
		_ = unix.Mount("devpts", "/dev/pts", "devpts", unix.MS_NOSUID|unix.MS_NOEXEC, "ptmxmode=0666,mode=0620")
	}
	if os.MkdirAll("/dev/shm", 0o1777) == nil {
		_ = unix.Mount("tmpfs", "/dev/shm", "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=1777")
	}
	return nil
}

// loadModules loads the modules listed in the file order (one path a line,
// dependencies first). A module the kernel already has is skipped.
func loadModules(order string) error {
	f, err := os.Open(order)
	if errors.Is(err, os.ErrNotExist) {
		return nil // a kernel with everything built in
	}
	if err != nil {
		return fmt.Errorf("modules: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		path := strings.TrimSpace(sc.Text())
		if path == "" {
			continue
		}
		if err := loadModule(path); err != nil {
			return err
		}
	}
	return sc.Err()
}

func loadModule(path string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("module %s: %w", filepath.Base(path), err)
	}
	defer unix.Close(fd)
	if err := unix.FinitModule(fd, "", 0); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("module %s: %w", filepath.Base(path), err)
	}
	return nil
}

// mountShares makes cfg's links and mounts its 9p shares.
func mountShares(cfg Config) error {
	for _, l := range cfg.Links {
		if err := os.MkdirAll(filepath.Dir(l.Path), 0o755); err != nil {
			return fmt.Errorf("link %s: %w", l.Path, err)
		}
		if err := os.Symlink(l.Target, l.Path); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("link %s: %w", l.Path, err)
		}
	}
	for _, s := range cfg.Shares {
		if err := os.MkdirAll(s.Path, 0o755); err != nil {
			return fmt.Errorf("mount %s: %w", s.Path, err)
		}
		// Read-only shares are the host's system folders: cache them
		// loosely (no revalidation on every lookup, which costs a round
		// trip to QEMU each). The work directory is shared both ways, so
		// it gets no cache but mmap support.
		flags, opts := uintptr(unix.MS_NODEV), "trans=virtio,version=9p2000.L,msize=262144,cache=mmap"
		if s.ReadOnly {
			flags |= unix.MS_RDONLY
			opts = "trans=virtio,version=9p2000.L,msize=262144,cache=loose"
		}
		if err := unix.Mount(s.Tag, s.Path, "9p", flags, opts); err != nil {
			return fmt.Errorf("mount 9p %s on %s: %w", s.Tag, s.Path, err)
		}
	}
	return nil
}

// loopbackUp sets lo up.
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	return unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
}
