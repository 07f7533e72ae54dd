package vm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/shim-run/shim/cgroup"
	"github.com/shim-run/shim/exec"
)

// Adopt takes charge of a VM started by an earlier runtime (a new Runtime
// on the same StateDir): incarnation inc of id, QEMU running as pid with
// the given start time. It fails with ErrGone unless that QEMU is alive, has
// that start time and is in the workload's cgroup. QMP is dialled when first
// needed; the control channel reconnects by itself (set OnWant again).
// The workload's exit code is known if the guest reports it on the control
// channel or the console.
func (r *Runtime) Adopt(id string, inc uint64, pid int, startTime uint64) (*VM, error) {
	if r.Cgroups == nil {
		return nil, fmt.Errorf("adopt vm: Runtime.Cgroups is nil: %w", ErrInvalid)
	}
	if err := validID(id); err != nil {
		return nil, fmt.Errorf("adopt vm: %w", err)
	}
	name := exec.GroupName(id, inc)
	dir := filepath.Join(r.stateDir(), name)
	m, err := readMeta(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("adopt vm %s: no state: %w", name, ErrGone)
	}
	if err != nil {
		return nil, fmt.Errorf("adopt vm %s: %w", name, err)
	}
	if pid <= 0 || pid != m.PID {
		return nil, fmt.Errorf("adopt vm %s: pid %d is not its QEMU (%d): %w", name, pid, m.PID, ErrGone)
	}
	pidfd, g, err := exec.Claim(r.Cgroups, name, pid, startTime)
	if err != nil {
		return nil, fmt.Errorf("adopt vm %s: %w", name, err)
	}
	start := startTime
	v := &VM{rt: r, name: name, dir: dir, pid: pid, start: start, accel: m.Accel, res: m.Resources,
		margin: [2]int64{m.MemMargin, m.CPUMargin}, group: g, pidfd: pidfd,
		done: make(chan struct{}), wantc: make(chan [2]int64, 1), plan: m.Plan, statc: make(chan struct{})}
	if u, err := g.Stats(); err == nil {
		v.oom = u.OOMKills
	}
	v.ctl = newControl(filepath.Join(dir, fileControl), v.onMsg)
	go v.wait()
	go v.wants()
	return v, nil
}

// Existing describes a VM a runtime left in StateDir.
type Existing struct {
	ID          string
	Incarnation uint64
	Group       string // cgroup name below the manager root
	PID         int    // QEMU's pid; 0 if it is gone
	StartTime   uint64 // for Adopt
}

// Existing lists the VMs in StateDir, so that an agent can Adopt them or
// Remove them. A VM whose QEMU is gone, or whose start never finished, has
// PID 0. Call it before starting VMs: a start under way looks like the
// latter.
func (r *Runtime) Existing() ([]Existing, error) {
	ents, err := os.ReadDir(r.stateDir())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []Existing
	for _, e := range ents {
		id, inc, ok := exec.ParseGroupName(e.Name())
		if !ok || !e.IsDir() {
			continue
		}
		x := Existing{ID: id, Incarnation: inc, Group: e.Name()}
		m, err := readMeta(filepath.Join(r.stateDir(), e.Name()))
		if err != nil {
			out = append(out, x) // a start that did not finish: a leftover
			continue
		}
		if state, start, err := exec.ProcStat(m.PID); err == nil && state != 'Z' && state != 'X' && start == m.StartTime {
			x.PID, x.StartTime = m.PID, start
		}
		out = append(out, x)
	}
	return out, nil
}

// Owns reports whether incarnation inc of id is a VM of this runtime (its
// state directory exists), so that an agent with several runtimes can route
// Adopt and Remove, and leave VMs out of exec's Existing (which lists their
// cgroups too, with no PID).
func (r *Runtime) Owns(id string, inc uint64) bool {
	if validID(id) != nil {
		return false
	}
	_, err := os.Stat(filepath.Join(r.stateDir(), exec.GroupName(id, inc)))
	return err == nil
}

// Remove kills and deletes a VM that will not be adopted: its cgroup and
// its state directory.
func (r *Runtime) Remove(id string, inc uint64) error {
	if err := validID(id); err != nil {
		return fmt.Errorf("remove vm: %w", err)
	}
	name := exec.GroupName(id, inc)
	if r.Cgroups != nil {
		if g, err := r.Cgroups.Open(name); err == nil {
			if err := g.Kill(); err != nil {
				return err
			}
			if err := g.Delete(); err != nil {
				return err
			}
		} else if !errors.Is(err, cgroup.ErrNotFound) {
			return err
		}
	}
	return os.RemoveAll(filepath.Join(r.stateDir(), name))
}

// RemoveAll removes every VM this runtime left: kills and deletes their
// cgroups and removes their state (the cache stays). For a node that is
// gone, after the fence.
func (r *Runtime) RemoveAll() error {
	ex, err := r.Existing()
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range ex {
		if err := r.Remove(e.ID, e.Incarnation); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
