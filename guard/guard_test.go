package guard

import (
	"context"
	"errors"
	"os"
	"path/filepath"
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
	g := &Guard{File: f, Now: clock.Now, After: clock.After, Kill: func() error {
		kills = append(kills, clock.now)
		if len(kills) == 3 {
			cancel()
		}
		return nil
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
	g := &Guard{File: f, Now: clock.Now, After: after, Kill: func() error {
		if killedAt == 0 {
			killedAt = clock.now
		}
		return nil
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
	g := &Guard{File: f, Now: clock.Now, After: after, Kill: func() error { killedAt = clock.now; return nil },
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
