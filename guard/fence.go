package guard

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
)

// The guard's record of what it fenced. A process the guard killed while no
// agent watched it looks, to the agent that comes back, like any process
// that ended meanwhile: gone, with no exit status. So the guard writes down
// which sandboxes still had processes when it killed them, and when, and the
// agent reads it when it adopts (agent/adopt.go) and reports those processes
// as fenced ("fenced: lease expired") rather than as exited.
//
// The record is one small JSON file in the data dir, holding the last fence
// only (one per lease that ran out): its size is bounded by the node's
// sandboxes. It is written beside its path, synced and renamed into place,
// so a reader sees the old record or the new one, never a torn one.

// FencedFileName is the fence record's name in shimd's data dir.
const FencedFileName = "fenced"

// Sandbox names one run's sandbox: a process and its incarnation.
type Sandbox struct {
	ID          string `json:"id"`
	Incarnation uint64 `json:"incarnation"`
}

// Fence is what the guard killed when a lease ran out.
type Fence struct {
	Deadline   int64     `json:"deadline"`     // the lease's end, CLOCK_MONOTONIC ns
	AtUnixNano int64     `json:"at_unix_nano"` // when it first killed for it (wall clock)
	Killed     []Sandbox `json:"killed"`       // the sandboxes that had processes, sorted
}

// Has reports whether the fence killed the processes of sandbox s.
func (f Fence) Has(s Sandbox) bool {
	_, ok := slices.BinarySearchFunc(f.Killed, s, compareSandbox)
	return ok
}

// add records more killed sandboxes.
func (f *Fence) add(ss []Sandbox) {
	for _, s := range ss {
		if i, ok := slices.BinarySearchFunc(f.Killed, s, compareSandbox); !ok {
			f.Killed = slices.Insert(f.Killed, i, s)
		}
	}
}

func compareSandbox(x, y Sandbox) int {
	if x.ID != y.ID {
		if x.ID < y.ID {
			return -1
		}
		return 1
	}
	switch {
	case x.Incarnation < y.Incarnation:
		return -1
	case x.Incarnation > y.Incarnation:
		return 1
	}
	return 0
}

// ReadFence reads the fence record at path. No record is the zero Fence.
func ReadFence(path string) (Fence, error) {
	var f Fence
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return f, nil
	}
	if err != nil {
		return f, fmt.Errorf("fence record: %w", err)
	}
	if err := json.Unmarshal(b, &f); err != nil {
		return Fence{}, fmt.Errorf("fence record %s: %w", path, err)
	}
	slices.SortFunc(f.Killed, compareSandbox)
	return f, nil
}

// WriteFence replaces the fence record at path with f.
func WriteFence(path string, f Fence) error {
	b, err := json.Marshal(f)
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("fence record: %w", err)
	}
	_, err = tmp.Write(append(b, '\n'))
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		_ = os.Remove(tmp.Name())
		return fmt.Errorf("fence record: %w", err)
	}
	return nil
}
