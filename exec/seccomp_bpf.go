//go:build cgo && seccomp

package exec

import (
	"fmt"
	"io"
	"os"

	libseccomp "github.com/seccomp/libseccomp-golang"
	"golang.org/x/sys/unix"
)

// seccompBuilt: this binary compiles seccomp filters (-tags seccomp).
const seccompBuilt = true

// compileSeccomp compiles the default profile (defaultSeccomp's rules) with
// libseccomp into a BPF program for shim-init to load: allow by default,
// EPERM for deniedSyscalls and for clone with CLONE_NEWUSER, ENOSYS for
// clone3. Other architectures (i386, x32) are killed.
func compileSeccomp() ([]byte, error) {
	f, err := libseccomp.NewFilter(libseccomp.ActAllow)
	if err != nil {
		return nil, fmt.Errorf("seccomp: %w", err)
	}
	defer f.Release()
	// shim-init sets no_new_privs itself; libseccomp must not.
	if err := f.SetNoNewPrivsBit(false); err != nil {
		return nil, fmt.Errorf("seccomp: %w", err)
	}
	_ = f.SetOptimize(2) // a binary tree, where libseccomp has one
	eperm := libseccomp.ActErrno.SetReturnCode(int16(unix.EPERM))
	for _, name := range deniedSyscalls {
		sc, err := libseccomp.GetSyscallFromName(name)
		if err != nil {
			continue // unknown to libseccomp or this architecture
		}
		if err := f.AddRule(sc, eperm); err != nil {
			return nil, fmt.Errorf("seccomp: %s: %w", name, err)
		}
	}
	if sc, err := libseccomp.GetSyscallFromName("clone3"); err == nil {
		if err := f.AddRule(sc, libseccomp.ActErrno.SetReturnCode(int16(unix.ENOSYS))); err != nil {
			return nil, fmt.Errorf("seccomp: clone3: %w", err)
		}
	}
	sc, err := libseccomp.GetSyscallFromName("clone")
	if err != nil {
		return nil, fmt.Errorf("seccomp: clone: %w", err)
	}
	// x86-64 and most others: flags are argument 0.
	cond, err := libseccomp.MakeCondition(0, libseccomp.CompareMaskedEqual, unix.CLONE_NEWUSER, unix.CLONE_NEWUSER)
	if err != nil {
		return nil, fmt.Errorf("seccomp: clone: %w", err)
	}
	if err := f.AddRuleConditional(sc, eperm, []libseccomp.ScmpCondition{cond}); err != nil {
		return nil, fmt.Errorf("seccomp: clone: %w", err)
	}
	// ExportBPFMem needs libseccomp 2.6; a memfd works with any.
	fd, err := unix.MemfdCreate("seccomp", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("seccomp: %w", err)
	}
	mf := os.NewFile(uintptr(fd), "seccomp")
	defer mf.Close()
	if err := f.ExportBPF(mf); err != nil {
		return nil, fmt.Errorf("seccomp: export: %w", err)
	}
	if _, err := mf.Seek(0, io.SeekStart); err != nil {
		return nil, fmt.Errorf("seccomp: %w", err)
	}
	b, err := io.ReadAll(mf)
	if err != nil {
		return nil, fmt.Errorf("seccomp: %w", err)
	}
	if len(b) == 0 || len(b)%8 != 0 {
		return nil, fmt.Errorf("seccomp: libseccomp exported %d bytes", len(b))
	}
	return b, nil
}
