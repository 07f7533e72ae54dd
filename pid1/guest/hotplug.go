package guest

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

const (
	cpuDir = "/sys/devices/system/cpu"
	memDir = "/sys/devices/system/memory"
)

// hotplug onlines memory blocks as the kernel announces them, and keeps
// the number of online vCPUs at a target.
//
// vCPUs are all present from boot (QEMU -smp with every possible vCPU; the
// kernel's maxcpus= brings up only the first ones): the host moves the
// target with "cpus N" rather than hot-plugging vCPU devices, because QEMU
// 7.2's multi-threaded TCG aborts when a hot-added vCPU's thread finds
// every translation region taken (tcg_region_initial_alloc), and its
// single-threaded TCG takes 1.5 s to bring a vCPU up. Onlining a present
// vCPU takes 0.4 s the first time and 40 ms after (TCG, measured). The
// host's cgroup quota is what bounds the CPU the VM uses, whatever is
// online.
type hotplug struct {
	fd      int
	changed chan struct{} // one-slot: something was added or removed
	target  atomic.Int64  // vCPUs to keep online; 0 = all
	cpus    chan struct{} // one-slot: apply the target
}

// startHotplug subscribes to kernel uevents, onlines the memory that is
// offline now and the first cpus vCPUs (0 = all), and keeps doing so for
// every "add" of a cpu or memory device.
func startHotplug(cpus int) (*hotplug, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_KOBJECT_UEVENT)
	if err != nil {
		return nil, err
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: 1}); err != nil {
		unix.Close(fd)
		return nil, err
	}
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 1<<20)
	h := &hotplug{fd: fd, changed: make(chan struct{}, 1), cpus: make(chan struct{}, 1)}
	h.target.Store(int64(cpus))
	onlineMemory()
	setCPUs(cpus)
	go h.run()
	go h.runCPUs()
	return h, nil
}

// setTarget asks for n online vCPUs.
func (h *hotplug) setTarget(n int) {
	h.target.Store(int64(n))
	h.applyCPUs()
}

func (h *hotplug) applyCPUs() {
	select {
	case h.cpus <- struct{}{}:
	default:
	}
}

// runCPUs applies the vCPU target whenever asked, one change at a time.
func (h *hotplug) runCPUs() {
	for range h.cpus {
		setCPUs(int(h.target.Load()))
		h.kick()
	}
}

func (h *hotplug) kick() {
	select {
	case h.changed <- struct{}{}:
	default:
	}
}

// run handles uevents: memory blocks that arrive offline are onlined; a
// vCPU that arrives (hot-plugged by other means) is brought to the target.
func (h *hotplug) run() {
	buf := make([]byte, 16<<10)
	for {
		n, _, err := unix.Recvfrom(h.fd, buf, 0)
		if err == unix.EINTR || err == unix.ENOBUFS {
			if err == unix.ENOBUFS {
				onlineMemory() // events were lost
			}
			continue
		}
		if err != nil {
			return
		}
		action, devpath, subsystem := parseUevent(buf[:n])
		switch {
		case subsystem == "memory" && action == "add":
			onlineBlock(filepath.Join("/sys", devpath))
		case subsystem == "cpu" && action == "add":
			h.applyCPUs()
		case subsystem != "memory" && subsystem != "cpu":
			continue
		}
		h.kick()
	}
}

// parseUevent returns the ACTION, DEVPATH and SUBSYSTEM of a kernel uevent
// ("add@/devices/...\0ACTION=add\0DEVPATH=...\0SUBSYSTEM=cpu\0...").
func parseUevent(b []byte) (action, devpath, subsystem string) {
	for _, f := range bytes.Split(b, []byte{0}) {
		k, v, ok := strings.Cut(string(f), "=")
		if !ok {
			continue
		}
		switch k {
		case "ACTION":
			action = v
		case "DEVPATH":
			devpath = v
		case "SUBSYSTEM":
			subsystem = v
		}
	}
	return action, devpath, subsystem
}

// onlineBlock brings a memory block online if it is offline; the kernel's
// online_policy picks the zone.
func onlineBlock(dir string) {
	if b, err := os.ReadFile(filepath.Join(dir, "state")); err == nil && strings.TrimSpace(string(b)) == "offline" {
		_ = os.WriteFile(filepath.Join(dir, "state"), []byte("online"), 0)
	}
}

// onlineMemory onlines every offline memory block.
func onlineMemory() {
	for _, n := range numbered(memDir, "memory") {
		onlineBlock(filepath.Join(memDir, "memory"+strconv.Itoa(n)))
	}
}

// setCPUs keeps vCPUs 0..n-1 online and the others offline (n <= 0: all
// online), onlining upwards and offlining downwards.
func setCPUs(n int) {
	ids := numbered(cpuDir, "cpu")
	set := func(id int, on string) {
		f := filepath.Join(cpuDir, "cpu"+strconv.Itoa(id), "online")
		if b, err := os.ReadFile(f); err == nil && strings.TrimSpace(string(b)) != on {
			_ = os.WriteFile(f, []byte(on), 0)
		}
	}
	for _, id := range ids {
		if n <= 0 || id < n {
			set(id, "1")
		}
	}
	for i := len(ids) - 1; i >= 0; i-- {
		if n > 0 && ids[i] >= n {
			set(ids[i], "0")
		}
	}
}

// numbered returns the N of the entries PREFIXN in dir, sorted.
func numbered(dir, prefix string) []int {
	ents, _ := os.ReadDir(dir)
	var ids []int
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), prefix)
		if !ok || rest == "" || strings.Trim(rest, "0123456789") != "" {
			continue
		}
		if id, err := strconv.Atoi(rest); err == nil {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	return ids
}
