package agent

import (
	"slices"
	"sync"
	"testing"
	"time"
)

// fakeClock is a Clock that moves only when a test advances it. Its timers
// fire inside Advance, in deadline order, each with the clock set to its
// deadline; an AfterFunc's function runs to its end before Advance goes on,
// so a test sees its effects as soon as Advance returns. A timer set for
// now or earlier fires on the next Advance (Advance(0) fires it).
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []*fakeTimer
}

type fakeTimer struct {
	c    *fakeClock
	when time.Time
	f    func()         // AfterFunc
	ch   chan time.Time // After
	on   bool           // armed
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Unix(1_000_000, 0)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) After(d time.Duration) <-chan time.Time {
	t := &fakeTimer{c: c, ch: make(chan time.Time, 1)}
	t.Reset(d)
	return t.ch
}

func (c *fakeClock) AfterFunc(d time.Duration, f func()) Timer {
	t := &fakeTimer{c: c, f: f}
	t.Reset(d)
	return t
}

func (t *fakeTimer) Stop() bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	was := t.on
	t.on = false
	t.c.timers = slices.DeleteFunc(t.c.timers, func(x *fakeTimer) bool { return x == t })
	return was
}

func (t *fakeTimer) Reset(d time.Duration) bool {
	was := t.Stop()
	t.c.mu.Lock()
	t.when, t.on = t.c.now.Add(d), true
	t.c.timers = append(t.c.timers, t)
	t.c.mu.Unlock()
	return was
}

// Advance moves the clock d on, firing every timer due by then.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	end := c.now.Add(d)
	c.mu.Unlock()
	for {
		c.mu.Lock()
		var next *fakeTimer
		for _, t := range c.timers {
			if !t.when.After(end) && (next == nil || t.when.Before(next.when)) {
				next = t
			}
		}
		if next == nil {
			if end.After(c.now) {
				c.now = end
			}
			c.mu.Unlock()
			return
		}
		if next.when.After(c.now) {
			c.now = next.when
		}
		next.on = false
		c.timers = slices.DeleteFunc(c.timers, func(x *fakeTimer) bool { return x == next })
		now := c.now
		c.mu.Unlock()
		if next.f != nil {
			next.f()
		} else {
			next.ch <- now
		}
	}
}

func TestFakeClockFiresInOrder(t *testing.T) {
	c := newFakeClock()
	start := c.Now()
	var fired []time.Duration
	for _, d := range []time.Duration{30, 10, 20} {
		c.AfterFunc(d*time.Millisecond, func() { fired = append(fired, c.Now().Sub(start)) })
	}
	stopped := c.AfterFunc(15*time.Millisecond, func() { t.Error("a stopped timer fired") })
	stopped.Stop()
	ch := c.After(25 * time.Millisecond)
	c.Advance(20 * time.Millisecond)
	if want := []time.Duration{10 * time.Millisecond, 20 * time.Millisecond}; !slices.Equal(fired, want) {
		t.Fatalf("fired at %v by 20 ms, want %v", fired, want)
	}
	select {
	case <-ch:
		t.Fatal("After(25 ms) fired at 20 ms")
	default:
	}
	c.Advance(time.Second)
	if len(fired) != 3 || fired[2] != 30*time.Millisecond {
		t.Fatalf("fired at %v, want the third at 30 ms", fired)
	}
	if got := (<-ch).Sub(start); got != 25*time.Millisecond {
		t.Fatalf("After(25 ms) sent %s", got)
	}
	if got := c.Now().Sub(start); got != 1020*time.Millisecond {
		t.Fatalf("now %s after advancing 1.02 s", got)
	}
}
