// Package guard is a node's dead-man switch. The agent publishes its lease
// deadline in a small memory-mapped file; a guard, run as a separate process
// that outlives the agent, kills every sandbox of the node once that deadline
// has passed. It fences the node's processes when the agent itself cannot:
// crashed, killed with SIGKILL, or paused with SIGSTOP while the cluster
// moves its processes elsewhere.
//
// The deadline is the agent's own (see server/lease.go): the moment the node
// must have stopped its processes, which is before the leader may declare the
// node down. It is a CLOCK_MONOTONIC time, which all processes on a host
// share, so no wall clock is involved.
package guard

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// FileName is the deadline file's name in shimd's data dir.
const FileName = "lease"

// File is a shared lease deadline: eight bytes in a memory-mapped file, the
// CLOCK_MONOTONIC time in nanoseconds until which the node may run processes.
// Zero means no deadline was ever set. Loads and stores are atomic, so the
// agent and the guard never see a torn value.
type File struct {
	path string
	f    *os.File
	mem  []byte
	ino  uint64
}

// Open maps the deadline file at path, creating it when writable.
func Open(path string, writable bool) (*File, error) {
	flag, prot := os.O_RDONLY, unix.PROT_READ
	if writable {
		flag, prot = os.O_RDWR|os.O_CREATE, unix.PROT_READ|unix.PROT_WRITE
	}
	f, err := os.OpenFile(path, flag, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lease deadline file: %w", err)
	}
	fail := func(err error) (*File, error) {
		f.Close()
		return nil, fmt.Errorf("lease deadline file %s: %w", path, err)
	}
	st, err := f.Stat()
	if err != nil {
		return fail(err)
	}
	if st.Size() < 8 {
		if !writable {
			return fail(errors.New("too short"))
		}
		if err := f.Truncate(8); err != nil {
			return fail(err)
		}
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, 8, prot, unix.MAP_SHARED)
	if err != nil {
		return fail(err)
	}
	return &File{path: path, f: f, mem: mem, ino: st.Sys().(*syscall.Stat_t).Ino}, nil
}

func (f *File) word() *int64 { return (*int64)(unsafe.Pointer(&f.mem[0])) }

// Set publishes a deadline (CLOCK_MONOTONIC nanoseconds).
func (f *File) Set(mono int64) { atomic.StoreInt64(f.word(), mono) }

// SetTime publishes until, a time.Time from this process's clock, as a
// CLOCK_MONOTONIC deadline.
func (f *File) SetTime(until time.Time) { f.Set(Monotonic() + int64(time.Until(until))) }

// Get returns the deadline.
func (f *File) Get() int64 { return atomic.LoadInt64(f.word()) }

// Removed reports whether the file is no longer at its path (its data dir
// was removed or replaced).
func (f *File) Removed() bool {
	var st unix.Stat_t
	return unix.Stat(f.path, &st) != nil || st.Ino != f.ino
}

// Close unmaps and closes the file.
func (f *File) Close() error {
	err := unix.Munmap(f.mem)
	if cerr := f.f.Close(); err == nil {
		err = cerr
	}
	return err
}

// Monotonic returns the CLOCK_MONOTONIC time in nanoseconds.
func Monotonic() int64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano()
}

// Timing of the guard's loop.
const (
	// Idle is the longest the guard sleeps: it notices a removed file or a
	// deadline set for the first time within it.
	Idle = time.Second
	// Recheck is how soon the guard looks again after a kill while the
	// deadline stays passed: nothing may run in the node's sandboxes then.
	// Once the deadline is more than Idle behind, it looks every Idle: no
	// agent starts anything without a lease, so nothing new is expected.
	Recheck = 100 * time.Millisecond
)

// Step decides what the guard does at monotonic time now with deadline d:
// whether to kill the node's sandboxes, and how long to wait before looking
// again. It is a pure function.
func Step(now, d int64) (kill bool, wait time.Duration) {
	switch {
	case d == 0:
		return false, Idle // not armed yet
	case now < d:
		return false, min(time.Duration(d-now), Idle)
	case time.Duration(now-d) > Idle:
		return true, Idle
	}
	return true, Recheck
}

// Guard fences the node when the published deadline passes. Fields are
// dependencies; Kill and File are required.
type Guard struct {
	File *File
	// Kill sends SIGKILL to every process in every sandbox of the node, and
	// returns the sandboxes that had any.
	Kill func() ([]Sandbox, error)
	// Record, if set, is the path of the fence record (FencedFileName in
	// the data dir): what the guard killed for the last lease that ran out.
	Record string
	// Cleanup, if set, removes what the node's sandboxes left behind (their
	// cgroups) once the node is gone for good: the lease file removed and
	// its last lease enforced.
	Cleanup func() error
	Log     *slog.Logger
	Now     func() int64                         // CLOCK_MONOTONIC ns; default Monotonic
	Wall    func() time.Time                     // for the fence record; default time.Now
	After   func(time.Duration) <-chan time.Time // default time.After
}

// Run guards until ctx ends, or the deadline file has been removed and the
// last deadline in it has passed (and been enforced).
func (g *Guard) Run(ctx context.Context) error {
	if g.Now == nil {
		g.Now = Monotonic
	}
	if g.After == nil {
		g.After = time.After
	}
	if g.Log == nil {
		g.Log = slog.Default()
	}
	if g.Wall == nil {
		g.Wall = time.Now
	}
	var last Fence // what was killed for the last deadline that passed
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		d := g.File.Get()
		kill, wait := Step(g.Now(), d)
		if kill {
			killed, err := g.Kill()
			if err != nil {
				g.Log.Error("guard: fence failed", "err", err)
			}
			g.fenced(&last, d, killed)
		}
		if g.File.Removed() && (kill || d == 0) {
			// The data dir is gone (the node torn down): once the last
			// lease has run out and its processes are killed, there is
			// nothing left to guard. Until then the mapping still works.
			if g.Cleanup != nil {
				if err := g.Cleanup(); err != nil {
					g.Log.Warn("guard: cleanup", "err", err)
				}
			}
			g.Log.Info("guard: lease file removed; exiting")
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-g.After(wait):
		}
	}
}

// fenced takes in what one kill for deadline d killed. Only a kill that found
// processes is told, and recorded: the deadline also passes when there was
// nothing to kill (a node that has not been granted a lease yet publishes
// one that has passed, so that nothing runs), and then nothing happened.
func (g *Guard) fenced(last *Fence, d int64, killed []Sandbox) {
	if len(killed) == 0 {
		return
	}
	if last.Deadline != d {
		*last = Fence{Deadline: d, AtUnixNano: g.Wall().UnixNano()}
	}
	n := len(last.Killed)
	last.add(killed)
	if len(last.Killed) == n {
		return // seen for this deadline already (a process that ignored the first kill)
	}
	g.Log.Warn("guard: the agent's lease ran out without renewal; killed the processes left in the node's sandboxes",
		"sandboxes", len(last.Killed)-n)
	if g.Record == "" {
		return
	}
	if err := WriteFence(g.Record, *last); err != nil {
		g.Log.Warn("guard: the record of what it fenced is not written: a restarted agent will report those processes as exited", "err", err)
	}
}
