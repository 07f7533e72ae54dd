package guard

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestStep(t *testing.T) {
	for _, c := range []struct {
		name   string
		now, d int64
		kill   bool
		wait   time.Duration
	}{
		{name: "not armed", now: 5e9, d: 0, kill: false, wait: Idle},
		{name: "far deadline", now: 1e9, d: 10e9, kill: false, wait: Idle},
		{name: "near deadline", now: 1e9, d: 1e9 + 300e6, kill: false, wait: 300 * time.Millisecond},
		{name: "at deadline", now: 2e9, d: 2e9, kill: true, wait: Recheck},
		{name: "passed", now: 3e9, d: 2e9, kill: true, wait: Recheck},
		{name: "long passed", now: 3e9 + 1, d: 2e9, kill: true, wait: Idle},
	} {
		kill, wait := Step(c.now, c.d)
		if kill != c.kill || wait != c.wait {
			t.Errorf("%s: Step(%d, %d) = %v, %s; want %v, %s", c.name, c.now, c.d, kill, wait, c.kill, c.wait)
		}
	}
}

func TestFileSharedAndRemoved(t *testing.T) {
	path := filepath.Join(t.TempDir(), FileName)
	w, err := Open(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	r, err := Open(path, false)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if got := r.Get(); got != 0 {
		t.Fatalf("new file: deadline %d, want 0", got)
	}
	w.Set(123456789)
	if got := r.Get(); got != 123456789 {
		t.Fatalf("reader sees %d, want 123456789", got)
	}
	before := Monotonic()
	w.SetTime(time.Now().Add(time.Second))
	if d := r.Get() - before; d < int64(900*time.Millisecond) || d > int64(1100*time.Millisecond) {
		t.Fatalf("SetTime(now+1s) published %s from now", time.Duration(d))
	}
	if r.Removed() {
		t.Fatal("Removed before removal")
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if !r.Removed() {
		t.Fatal("not Removed after removal")
	}
	if _, err := Open(filepath.Join(t.TempDir(), "missing"), false); err == nil {
		t.Fatal("opening a missing file read-only succeeded")
	}
}

// fakeClock drives Guard.Run: every wait the guard asks for advances the
// clock by that much at once.
type fakeClock struct {
	now   int64
	waits chan time.Duration
}

func (c *fakeClock) Now() int64 { return c.now }

func (c *fakeClock) After(d time.Duration) <-chan time.Time {
	c.now += int64(d)
	c.waits <- d
	ch := make(chan time.Time, 1)
	ch <- time.Time{}
	return ch
}

func TestGuardKillsOnlyAfterTheDeadline(t *testing.T) {
	f, err := Open(filepath.Join(t.TempDir(), FileName), true)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	clock := &fakeClock{now: 10e9, waits: make(chan time.Duration, 100)}
	f.Set(10e9 + int64(1500*time.Millisecond))
	var kills []int64
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	g := &Guard{File: f, Now: clock.Now, After: clock.After, Kill: func() ([]Sandbox, error) {
		kills = append(kills, clock.now)
		if len(kills) == 3 {
			cancel()
		}
		return nil, nil
	}}
	err = g.Run(ctx)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Run: %v", err)
	}
	// It sleeps the first second, then exactly up to the deadline, then
	// kills there and every Recheck while the deadline stays passed.
	want := []int64{11.5e9, 11.5e9 + int64(Recheck), 11.5e9 + 2*int64(Recheck)}
	if len(kills) != len(want) {
		t.Fatalf("kills at %v, want %v", kills, want)
	}
	for i := range want {
		if kills[i] != want[i] {
			t.Fatalf("kill %d at %d, want %d (all: %v)", i, kills[i], want[i], kills)
		}
	}
}

func TestGuardFollowsRenewals(t *testing.T) {
	f, err := Open(filepath.Join(t.TempDir(), FileName), true)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	clock := &fakeClock{now: 1e9, waits: make(chan time.Duration, 1000)}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	renewals := 0
	after := func(d time.Duration) <-chan time.Time {
		// The agent renews every 200 ms, each time for one more second,
		// ten times over; then it stops (crashed).
		if renewals < 10 {
			renewals++
			f.Set(clock.now + int64(time.Second))
		}
		if clock.now > 20e9 {
			cancel()
		}
		return clock.After(min(d, 200*time.Millisecond))
	}
	var killedAt int64
	g := &Guard{File: f, Now: clock.Now, After: after, Kill: func() ([]Sandbox, error) {
		if killedAt == 0 {
			killedAt = clock.now
		}
		return nil, nil
	}}
	_ = g.Run(ctx)
	// The last renewal happened at 1 s + 9 × 200 ms; it was good for 1 s.
	if want := int64(1e9 + 9*200e6 + 1e9); killedAt != want {
		t.Fatalf("killed at %d, want %d", killedAt, want)
	}
}

func TestGuardExitsWhenFileRemoved(t *testing.T) {
	path := filepath.Join(t.TempDir(), FileName)
	f, err := Open(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	clock := &fakeClock{now: 1e9, waits: make(chan time.Duration, 100)}
	f.Set(3e9) // a lease that runs another 2 s
	after := func(d time.Duration) <-chan time.Time {
		_ = os.Remove(path)
		return clock.After(d)
	}
	killedAt, cleanedAt := int64(0), []int64{}
	g := &Guard{File: f, Now: clock.Now, After: after, Kill: func() ([]Sandbox, error) { killedAt = clock.now; return nil, nil },
		Cleanup: func() error { cleanedAt = append(cleanedAt, clock.now); return nil }}
	if err := g.Run(context.Background()); err != nil {
		t.Fatalf("Run after removal: %v, want nil", err)
	}
	// The file went at once, but the lease in it was still enforced, and
	// only then were the sandboxes' remains removed.
	if killedAt != 3e9 || clock.now != 3e9 {
		t.Fatalf("killed at %d, exited at %d; want both at the deadline 3e9", killedAt, clock.now)
	}
	if len(cleanedAt) != 1 || cleanedAt[0] != 3e9 {
		t.Fatalf("cleaned up at %v, want once at the deadline 3e9", cleanedAt)
	}
}

// The guard says and records what it fenced, and only when it killed
// something: a deadline that passes with nothing to kill (a fresh start, with
// no lease yet) is no fence.
func TestGuardRecordsWhatItFenced(t *testing.T) {
	dir := t.TempDir()
	f, err := Open(filepath.Join(dir, FileName), true)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	record := filepath.Join(dir, FencedFileName)
	clock := &fakeClock{now: 10e9, waits: make(chan time.Duration, 100)}
	wall := time.Unix(1_700_000_000, 0)
	var logs bytes.Buffer
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// Kill finds nothing at the first deadline; at the second, two
	// sandboxes at once and then a third; then nothing again.
	var finds [][]Sandbox
	a, b, c := Sandbox{"a", 1}, Sandbox{"b", 3}, Sandbox{"c", 2}
	kills := 0
	g := &Guard{File: f, Record: record, Now: clock.Now, After: clock.After,
		Wall: func() time.Time { return wall.Add(time.Duration(clock.now)) },
		Log:  slog.New(slog.NewTextHandler(&logs, nil)),
		Kill: func() ([]Sandbox, error) {
			kills++
			var found []Sandbox
			if len(finds) > 0 {
				found, finds = finds[0], finds[1:]
			}
			if kills == 6 {
				cancel()
			}
			return found, nil
		}}
	f.Set(10e9) // passed: nothing to kill
	finds = [][]Sandbox{nil, nil}
	after := g.After
	g.After = func(d time.Duration) <-chan time.Time {
		if kills == 2 {
			f.Set(clock.now) // a new deadline passes, with processes left
			finds = [][]Sandbox{{b, a}, {c}, nil}
		}
		return after(d)
	}
	if err := g.Run(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Run: %v", err)
	}
	got, err := ReadFence(record)
	if err != nil {
		t.Fatal(err)
	}
	if got.Deadline != 10e9+int64(Recheck) || !slices.Equal(got.Killed, []Sandbox{a, b, c}) {
		t.Fatalf("record %+v, want the second deadline with a, b and c", got)
	}
	if want := wall.Add(10e9 + 2*Recheck).UnixNano(); got.AtUnixNano != want {
		t.Errorf("record made at %d, want the first kill that found something (%d)", got.AtUnixNano, want)
	}
	if !got.Has(b) || got.Has(Sandbox{"b", 2}) {
		t.Errorf("Has: b.3 %v, b.2 %v; want true, false", got.Has(b), got.Has(Sandbox{"b", 2}))
	}
	if n := strings.Count(logs.String(), "lease ran out"); n != 2 {
		t.Errorf("said the lease ran out %d times, want twice (a kill that found nothing is no fence):\n%s", n, logs.String())
	}
}

func TestReadFence(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, FencedFileName)
	if f, err := ReadFence(path); err != nil || f.Deadline != 0 || len(f.Killed) != 0 {
		t.Fatalf("no record: %+v, %v; want the zero Fence", f, err)
	}
	want := Fence{Deadline: 5, AtUnixNano: 6, Killed: []Sandbox{{"x", 1}}}
	if err := WriteFence(path, want); err != nil {
		t.Fatal(err)
	}
	if got, err := ReadFence(path); err != nil || got.Deadline != 5 || !got.Has(Sandbox{"x", 1}) {
		t.Fatalf("read back %+v, %v", got, err)
	}
	if err := os.WriteFile(path, []byte("{torn"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadFence(path); err == nil {
		t.Fatal("a torn record read without error")
	}
	if left, _ := filepath.Glob(path + ".*"); len(left) != 0 {
		t.Fatalf("temporary files left: %v", left)
	}
}
