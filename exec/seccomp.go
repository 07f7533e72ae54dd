package exec

import (
	"github.com/opencontainers/runc/libcontainer/configs"
	"golang.org/x/sys/unix"
)

// deniedSyscalls fail with EPERM in containers: kernel-wide and privileged
// operations (modules, kexec, mounts, clocks, swap, reboot, quotas, keys),
// namespace changes, and large attack surfaces a sandboxed workload has no
// use for (bpf, perf events, userfaultfd, io_uring, ptrace and cross-process
// memory access). Most also need capabilities the workload does not have;
// the filter is the second wall. Names the kernel or libseccomp does not
// know are skipped.
var deniedSyscalls = []string{
	"acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "create_module",
	"delete_module", "finit_module", "fsconfig", "fsmount", "fsopen", "fspick",
	"get_kernel_syms", "init_module", "io_uring_enter", "io_uring_register",
	"io_uring_setup", "ioperm", "iopl", "kcmp", "kexec_file_load", "kexec_load",
	"keyctl", "lookup_dcookie", "mount", "mount_setattr", "move_mount",
	"name_to_handle_at", "nfsservctl", "open_by_handle_at", "open_tree",
	"perf_event_open", "pivot_root", "process_vm_readv", "process_vm_writev",
	"ptrace", "query_module", "quotactl", "quotactl_fd", "reboot", "request_key",
	"setns", "settimeofday", "stime", "swapoff", "swapon", "syslog", "sysfs",
	"_sysctl", "umount", "umount2", "unshare", "uselib", "userfaultfd", "ustat",
	"vm86", "vm86old",
}

// defaultSeccomp is the containers' seccomp profile (used when built with
// -tags seccomp): allow by default, deny deniedSyscalls, deny clone with
// CLONE_NEWUSER (unprivileged user namespaces are the usual way to regain
// capabilities), and make clone3 fail with ENOSYS, whose flags a filter
// cannot inspect, so that libc falls back to clone.
//
// A deny list rather than Docker's ~350-entry allow list: it compiles in a
// fraction of the time inside every container's init, which is on the start
// path, and capabilities already stop most of what an allow list adds.
// Only the native architecture is allowed; other ABIs (i386, x32) are
// killed by libseccomp's bad-architecture action.
func defaultSeccomp() *configs.Seccomp {
	eperm, enosys := uint(unix.EPERM), uint(unix.ENOSYS)
	sc := &configs.Seccomp{DefaultAction: configs.Allow}
	for _, name := range deniedSyscalls {
		sc.Syscalls = append(sc.Syscalls, &configs.Syscall{Name: name, Action: configs.Errno, ErrnoRet: &eperm})
	}
	sc.Syscalls = append(sc.Syscalls,
		&configs.Syscall{Name: "clone3", Action: configs.Errno, ErrnoRet: &enosys},
		&configs.Syscall{Name: "clone", Action: configs.Errno, ErrnoRet: &eperm, Args: []*configs.Arg{
			// x86-64 and most others: flags are argument 0.
			{Index: 0, Value: unix.CLONE_NEWUSER, ValueTwo: unix.CLONE_NEWUSER, Op: configs.MaskEqualTo},
		}},
	)
	return sc
}
