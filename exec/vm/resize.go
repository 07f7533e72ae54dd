package vm

import (
	"fmt"
	"path/filepath"
	"time"

	"github.com/shim-run/shim/cgroup"
	"github.com/shim-run/shim/pid1/guest"
)

// qmpLocked returns the QMP connection, dialling it if needed (after
// Adopt, or if it was lost). Callers hold resizeMu.
func (v *VM) qmpLocked() (*qmp, error) {
	if v.qmp != nil {
		select {
		case <-v.qmp.closed:
			v.qmp = nil
		default:
			return v.qmp, nil
		}
	}
	if v.exited() {
		return nil, ErrExited
	}
	q, err := dialQMP(filepath.Join(v.dir, fileQMP), 5*time.Second, nil)
	if err != nil {
		return nil, err
	}
	v.qmp = q
	return q, nil
}

// Resize moves the VM's grant to memBytes of guest memory and cpuMilli
// millicores, within the ceiling fixed at start (ErrInvalid beyond it;
// memory below the boot memory is the boot memory). Growing raises the
// cgroup first, then plugs memory (virtio-mem requested-size) and asks the
// guest to online vCPUs ("cpus N"); the guest sees new memory within about
// 0.2 s and a vCPU within 0.4 s (TCG). Shrinking unplugs, waits up to 3 s
// for the guest to give the memory back, and lowers the cgroup to what
// the guest still has; the CPU quota changes at once. QEMU keeps its PID.
func (v *VM) Resize(memBytes, cpuMilli int64) error {
	v.resizeMu.Lock()
	defer v.resizeMu.Unlock()
	if v.exited() {
		return fmt.Errorf("resize %s: %w", v.name, ErrExited)
	}
	old := v.plan
	np, err := old.resize(memBytes, cpuMilli)
	if err != nil {
		return fmt.Errorf("resize %s: %w", v.name, err)
	}
	q, err := v.qmpLocked()
	if err != nil {
		return fmt.Errorf("resize %s: %w", v.name, err)
	}
	fail := func(err error) error {
		if v.exited() {
			err = ErrExited
		}
		return fmt.Errorf("resize %s: %w", v.name, err)
	}
	if err := v.group.Update(v.groupRes(max(old.GrantMem, np.GrantMem), np.GrantCPU)); err != nil {
		return fail(err)
	}
	if np.GrantMem != old.GrantMem {
		if err := q.run("qom-set", map[string]any{"path": "/machine/peripheral/vmem", "property": "requested-size",
			"value": np.plugged(np.GrantMem)}, nil); err != nil {
			return fail(err)
		}
	}
	v.plan.GrantMem = np.GrantMem // requested; the cgroup follows below
	if np.VCPUs != old.VCPUs {
		if err := v.ctl.send(guest.Msg{Kind: guest.KindCPUs, A: int64(np.VCPUs)}, 2*time.Second); err != nil {
			v.plan.GrantCPU = np.GrantCPU // the quota is set; the guest keeps its vCPUs
			_ = v.saveMeta()
			return fail(fmt.Errorf("vCPUs: %w", err))
		}
	}
	v.plan = np
	if np.GrantMem < old.GrantMem {
		have := v.waitUnplug(q, np.plugged(np.GrantMem), 3*time.Second)
		if err := v.group.Update(v.groupRes(v.plan.BootMem+have, np.GrantCPU)); err != nil {
			return fail(err)
		}
	}
	if err := v.saveMeta(); err != nil {
		return fail(err)
	}
	return nil
}

func (v *VM) groupRes(guestMem, cpuMilli int64) cgroup.Resources {
	return groupResources(v.res, guestMem, cpuMilli, v.margin[0], v.margin[1])
}

// waitUnplug waits until virtio-mem's plugged size is at most want, and
// returns the plugged size.
func (v *VM) waitUnplug(q *qmp, want int64, timeout time.Duration) int64 {
	deadline := time.Now().Add(timeout)
	for {
		var size int64
		if err := q.run("qom-get", map[string]any{"path": "/machine/peripheral/vmem", "property": "size"}, &size); err != nil {
			return v.plan.MaxMem - v.plan.BootMem // unknown: keep the cgroup where it is
		}
		if size <= want || time.Now().After(deadline) {
			return size
		}
		time.Sleep(20 * time.Millisecond)
	}
}
