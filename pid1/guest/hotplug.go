package guest

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

const (
	cpuDir = "/sys/devices/system/cpu"
	memDir = "/sys/devices/system/memory"
)

// hotplug onlines vCPUs and memory blocks as the kernel announces them.
type hotplug struct {
	fd      int
	changed chan struct{} // one-slot: something was added or removed
}

// startHotplug subscribes to kernel uevents, onlines whatever is offline
// now, and keeps doing so for every "add" of a cpu or memory device.
func startHotplug() (*hotplug, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_KOBJECT_UEVENT)
	if err != nil {
		return nil, err
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: 1}); err != nil {
		unix.Close(fd)
		return nil, err
	}
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 1<<20)
	h := &hotplug{fd: fd, changed: make(chan struct{}, 1)}
	onlineAll()
	go h.run()
	return h, nil
}

func (h *hotplug) run() {
	buf := make([]byte, 16<<10)
	for {
		n, _, err := unix.Recvfrom(h.fd, buf, 0)
		if err == unix.EINTR || err == unix.ENOBUFS {
			if err == unix.ENOBUFS {
				onlineAll() // events were lost
			}
			continue
		}
		if err != nil {
			return
		}
		action, devpath, subsystem := parseUevent(buf[:n])
		if subsystem != "cpu" && subsystem != "memory" {
			continue
		}
		if action == "add" || action == "online" {
			online(subsystem, filepath.Join("/sys", devpath))
		}
		select {
		case h.changed <- struct{}{}:
		default:
		}
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

// online brings one cpu or memory block online if it is offline.
func online(subsystem, dir string) {
	switch subsystem {
	case "cpu":
		if b, err := os.ReadFile(filepath.Join(dir, "online")); err == nil && strings.TrimSpace(string(b)) == "0" {
			_ = os.WriteFile(filepath.Join(dir, "online"), []byte("1"), 0)
		}
	case "memory":
		if b, err := os.ReadFile(filepath.Join(dir, "state")); err == nil && strings.TrimSpace(string(b)) == "offline" {
			_ = os.WriteFile(filepath.Join(dir, "state"), []byte("online"), 0) // the kernel's online_policy picks the zone
		}
	}
}

// onlineAll onlines every offline cpu and memory block.
func onlineAll() {
	for _, d := range []struct{ sub, dir, prefix string }{{"cpu", cpuDir, "cpu"}, {"memory", memDir, "memory"}} {
		ents, _ := os.ReadDir(d.dir)
		for _, e := range ents {
			rest, ok := strings.CutPrefix(e.Name(), d.prefix)
			if !ok || rest == "" || strings.Trim(rest, "0123456789") != "" {
				continue
			}
			online(d.sub, filepath.Join(d.dir, e.Name()))
		}
	}
}
