package exec

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/sys/unix"
)

// devNull is stdin for every workload, opened once and never closed (the
// child gets its own copy of the descriptor).
var devNull struct {
	once sync.Once
	f    *os.File
	err  error
}

// openStdio returns the workload's stdin (/dev/null), stdout and stderr, the
// outputs opened for appending by openLog, and a func that closes what it
// opened. Stdout and Stderr naming the same file (an agent's
// one log per process) share one descriptor, and parents are made only if
// the open finds them missing: a few path walks less per start.
func openStdio(s Spec) ([]*os.File, func(), error) {
	devNull.once.Do(func() { devNull.f, devNull.err = os.Open(os.DevNull) })
	if devNull.err != nil {
		return nil, nil, devNull.err
	}
	files := []*os.File{devNull.f}
	var opened []*os.File
	closeAll := func() {
		for _, f := range opened {
			f.Close()
		}
	}
	for i, path := range []string{s.Stdout, s.Stderr} {
		if i == 1 && path == s.Stdout {
			files = append(files, files[1])
			continue
		}
		var f *os.File
		var err error
		if path == "" {
			f, err = os.OpenFile(os.DevNull, os.O_WRONLY, 0)
		} else {
			f, err = openLog(path)
		}
		if err != nil {
			closeAll()
			return nil, nil, err
		}
		opened = append(opened, f)
		files = append(files, f)
	}
	return files, closeAll, nil
}

// logFlags open a log for the workload: appending, created if missing, no
// symbolic link followed.
const logFlags = unix.O_WRONLY | unix.O_APPEND | unix.O_CREAT | unix.O_NOFOLLOW | unix.O_CLOEXEC

// openLog opens path for the workload to append to: created 0600 (its
// folder 0700 if missing), so that only the agent reads it; the workload
// writes through the descriptor. It is opened through a detached mount of
// its folder (logTree), so that the descriptor's path, which the workload
// can read in /proc/self/fd, is "/NAME" only: no host path. Where no such
// mount can be made (not root, an old kernel) it is opened by its path.
func openLog(path string) (*os.File, error) {
	dir, name := filepath.Split(filepath.Clean(path))
	if name == "" || dir == "" {
		return nil, fmt.Errorf("log %q: %w", path, ErrInvalid)
	}
	dfd, err := logTree(dir)
	if err != nil {
		if errors.Is(err, errNoTree) {
			return os.OpenFile(path, logFlags, 0o600)
		}
		return nil, err
	}
	fd, err := unix.Openat(dfd, name, logFlags, 0o600)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	return os.NewFile(uintptr(fd), path), nil
}

// errNoTree: open_tree is not available here; open logs by their path.
var errNoTree = errors.New("no detached mount")

// logTrees caches, per log folder, a detached mount of it (open_tree with
// OPEN_TREE_CLONE: in no mount namespace, so its root is "/"), with the
// folder's device and inode. A folder replaced by another of the same name
// gets a new mount; the old one's descriptor is kept (a concurrent Start
// may be using it), a descriptor per replacement.
var logTrees sync.Map // folder -> *logTreeFD

type logTreeFD struct {
	fd       int
	dev, ino uint64
}

// logTree returns the descriptor of a detached mount of dir, made (with its
// parents, 0700) if missing.
func logTree(dir string) (int, error) {
	var st unix.Stat_t
	err := unix.Stat(dir, &st)
	if errors.Is(err, unix.ENOENT) {
		if err = os.MkdirAll(dir, 0o700); err == nil {
			err = unix.Stat(dir, &st)
		}
	}
	if err != nil {
		return -1, &fs.PathError{Op: "stat", Path: dir, Err: err}
	}
	if v, ok := logTrees.Load(dir); ok {
		if t := v.(*logTreeFD); t.dev == st.Dev && t.ino == st.Ino {
			return t.fd, nil
		}
	}
	fd, err := unix.OpenTree(unix.AT_FDCWD, dir, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if err != nil {
		return -1, errNoTree
	}
	var tst unix.Stat_t
	if err := unix.Fstat(fd, &tst); err != nil || tst.Dev != st.Dev || tst.Ino != st.Ino {
		unix.Close(fd)
		return -1, errNoTree // replaced meanwhile: the path will do
	}
	t := &logTreeFD{fd: fd, dev: st.Dev, ino: st.Ino}
	if v, loaded := logTrees.LoadOrStore(dir, t); loaded {
		if old := v.(*logTreeFD); old.dev == t.dev && old.ino == t.ino {
			unix.Close(fd)
			return old.fd, nil
		}
		logTrees.Store(dir, t)
	}
	return fd, nil
}
