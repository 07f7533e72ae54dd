package agent

import (
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	pb "github.com/shim-run/shim/proto/shimv1"
)

func TestBeatWait(t *testing.T) {
	const lease = time.Second
	for _, c := range []struct {
		left, want time.Duration
	}{
		{left: lease, want: lease / 5},                     // just renewed
		{left: lease * 3 / 4, want: lease / 5},             // one beat unanswered
		{left: lease*3/4 - 1, want: 50 * time.Millisecond}, // more: hurry
		{left: -time.Second, want: 50 * time.Millisecond},  // expired
	} {
		if got := beatWait(lease, c.left); got != c.want {
			t.Errorf("beatWait(%s, %s) = %s, want %s", lease, c.left, got, c.want)
		}
	}
	if got := beatWait(100*time.Millisecond, 0); got != 20*time.Millisecond {
		t.Errorf("a short lease: wait %s, want its fifth (20ms)", got)
	}
}

func TestLeaseEnd(t *testing.T) {
	sent := time.Unix(100, 0)
	if got := leaseEnd(sent, 1500, time.Second); !got.Equal(sent.Add(1500 * time.Millisecond)) {
		t.Errorf("granted 1500 ms: ends %s after sending", got.Sub(sent))
	}
	if got := leaseEnd(sent, 0, time.Second); !got.Equal(sent.Add(time.Second)) {
		t.Errorf("granted 0 ms: ends %s after sending, want the agent's own second", got.Sub(sent))
	}
}

func TestRenewal(t *testing.T) {
	now := time.Unix(100, 0)
	for _, c := range []struct {
		name          string
		until, held   time.Time
		granted       bool
		extend, count bool
	}{
		{"too late", now, now.Add(-time.Second), false, false, false},
		{"first grant", now.Add(time.Second), now, false, true, true},
		{"renewal", now.Add(time.Second), now.Add(time.Second / 2), true, true, true},
		{"older than held, granted", now.Add(time.Second / 2), now.Add(time.Second), true, false, false},
		{"first grant inside a held lease", now.Add(time.Second), now.Add(30 * time.Second), false, false, true},
	} {
		extend, counts := renewal(now, c.until, c.held, c.granted)
		if extend != c.extend || counts != c.count {
			t.Errorf("%s: extend %v, counts %v; want %v, %v", c.name, extend, counts, c.extend, c.count)
		}
	}
}

func TestFenceNote(t *testing.T) {
	for _, c := range []struct {
		granted bool
		n       int
		quiet   bool
	}{
		{granted: false, n: 0, quiet: true}, // a fresh start: nothing expired, nothing fenced
		{granted: false, n: 3},              // the previous shimd's lease ran out
		{granted: true, n: 0},               // a lease this agent held expired
		{granted: true, n: 5},
	} {
		if note := fenceNote(c.granted, c.n); (note == "") != c.quiet {
			t.Errorf("fenceNote(%v, %d) = %q", c.granted, c.n, note)
		}
	}
}

// fenceClock is countingRuntime that notes the time of each fence.
type fenceClock struct {
	countingRuntime
	clock    Clock
	mu       sync.Mutex
	fencedAt []time.Time
}

func (r *fenceClock) KillAll() error {
	r.mu.Lock()
	r.fencedAt = append(r.fencedAt, r.clock.Now())
	r.mu.Unlock()
	return r.countingRuntime.KillAll()
}

func (r *fenceClock) fences() []time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]time.Time(nil), r.fencedAt...)
}

// On a fake clock: the agent fences exactly when its lease runs out, and
// publishes no deadline past it.
func TestFenceAtTheDeadline(t *testing.T) {
	cp := newFakeCP()
	cp.set(1, assignment("a", 1, pb.ProcessState_PROCESS_STATE_STARTING))
	clock := newFakeClock()
	rt := &fenceClock{clock: clock}
	var published []time.Time
	a := startAgent(t, cp, rt, func(a *Agent) {
		a.Clock = clock
		a.Deadline = func(until time.Time) { published = append(published, until) } // under a.lease
	})
	waitUntil(t, 5*time.Second, "a started", func() bool {
		clock.Advance(10 * time.Millisecond)
		return rt.starts.Load() == 1
	})
	before := len(rt.fences())
	cp.setUp(false)
	for i := 0; len(rt.fences()) == before; i++ {
		if i == 100 {
			t.Fatalf("no fence %s after the control plane went away, with a %s lease", 100*10*time.Millisecond, testLease)
		}
		clock.Advance(10 * time.Millisecond) // beats go unanswered
	}
	fenced := rt.fences()[before]
	a.lease.Lock()
	until := a.lease.until
	for _, p := range published {
		if p.After(until) {
			t.Errorf("published a deadline %s past the lease", p.Sub(until))
		}
	}
	a.lease.Unlock()
	if !fenced.Equal(until) {
		t.Fatalf("fenced %s after the lease ran out, want at its end", fenced.Sub(until))
	}

	cp.setUp(true)
	waitUntil(t, 5*time.Second, "a started again with the lease back", func() bool {
		clock.Advance(10 * time.Millisecond)
		return rt.starts.Load() == 2
	})
}

// syncBuffer is a log sink safe for concurrent writers.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// A fresh start (no lease held before, nothing left to adopt) says only what
// happened: no lease expired and nothing was fenced. A lease that does run
// out later is told.
func TestFreshStartSaysOnlyWhatHappened(t *testing.T) {
	cp := newFakeCP()
	var logs syncBuffer
	rt := &countingRuntime{}
	a := startAgent(t, cp, rt, func(a *Agent) { a.Log = slog.New(slog.NewTextHandler(&logs, nil)) })
	waitUntil(t, 5*time.Second, "the lease granted", func() bool {
		a.lease.Lock()
		defer a.lease.Unlock()
		return a.lease.granted
	})
	for _, lie := range []string{"expired", "fenced", "regained"} {
		if strings.Contains(logs.String(), lie) {
			t.Errorf("a fresh start logged %q:\n%s", lie, logs.String())
		}
	}
	if !strings.Contains(logs.String(), "lease granted") {
		t.Errorf("the first grant is not told:\n%s", logs.String())
	}
	fences := rt.killAlls.Load()
	cp.setUp(false)
	waitUntil(t, 5*time.Second, "the fence", func() bool { return rt.killAlls.Load() > fences })
	waitUntil(t, 5*time.Second, "the fence told", func() bool {
		return strings.Contains(logs.String(), "lease expired: fenced every local process")
	})
}

// leaseProbe is a lease on a fake clock that notes what it does.
type leaseProbe struct {
	*lease
	clock     *fakeClock
	fences    []bool // granted, at each fence
	regains   []bool // first, at each regain
	published []time.Time
	during    func() // run inside the fence, as a renewal landing then would
}

func newLeaseProbe() *leaseProbe {
	p := &leaseProbe{clock: newFakeClock()}
	p.lease = &lease{clock: p.clock,
		publish: func(until time.Time) { p.published = append(p.published, until) },
		fence: func(granted bool) {
			p.fences = append(p.fences, granted)
			if p.during != nil {
				p.during()
			}
		},
		regained: func(_ uint64, first bool) { p.regains = append(p.regains, first) },
	}
	return p
}

func TestLeaseStates(t *testing.T) {
	const d = time.Second
	// A fresh start: no lease to resume, so the fence is due at once, and
	// says no lease was ever granted; the first grant counts as first.
	p := newLeaseProbe()
	p.arm(time.Time{})
	p.clock.Advance(0)
	if !slices.Equal(p.fences, []bool{false}) || p.valid() {
		t.Fatalf("fresh start: fences %v, valid %v; want one, ungranted, and no lease", p.fences, p.valid())
	}
	p.renew(p.clock.Now().Add(d), 7)
	if !slices.Equal(p.regains, []bool{true}) || !p.valid() {
		t.Fatalf("first grant: regains %v, valid %v", p.regains, p.valid())
	}
	// Renewed before the end: no fence. Not renewed: fenced at the end,
	// once, however often the timer is looked at.
	p.clock.Advance(d / 2)
	p.renew(p.clock.Now().Add(d), 8)
	p.clock.Advance(d - 1)
	if len(p.fences) != 1 {
		t.Fatalf("fenced before the renewed lease ran out")
	}
	p.clock.Advance(1)
	p.check()
	if !slices.Equal(p.fences, []bool{false, true}) || p.valid() {
		t.Fatalf("expiry: fences %v, valid %v", p.fences, p.valid())
	}
	// Granted again: the node may act again.
	p.clock.Advance(d / 2)
	p.renew(p.clock.Now().Add(d), 9)
	if !slices.Equal(p.regains, []bool{true, false}) || !p.valid() {
		t.Fatalf("regained after a fence: regains %v, valid %v", p.regains, p.valid())
	}
	// A renewal that lands during the next fence takes effect after it.
	p.during = func() {
		p.renew(p.clock.Now().Add(d), 10)
		if p.valid() || len(p.regains) != 2 {
			t.Errorf("a renewal during the fence took effect before it finished")
		}
	}
	p.clock.Advance(d)
	if !slices.Equal(p.regains, []bool{true, false, false}) || !p.valid() {
		t.Fatalf("renewal during the fence: regains %v, valid %v; want it regained after the fence", p.regains, p.valid())
	}
	// Stopped on purpose: no fence any more.
	p.during = nil
	p.stop()
	p.clock.Advance(10 * d)
	if len(p.fences) != 3 {
		t.Fatalf("fences %v after a stop, want none more", p.fences)
	}
	for i := 1; i < len(p.published); i++ {
		if p.published[i].Before(p.published[i-1]) {
			t.Fatalf("published deadlines out of order: %v", p.published)
		}
	}
}

// A first grant that lands during the start-up fence still counts as the
// first: the agent says "granted", not "regained".
func TestLeaseFirstGrantDuringStartupFence(t *testing.T) {
	p := newLeaseProbe()
	p.during = func() { p.renew(p.clock.Now().Add(time.Second), 3) }
	p.arm(time.Time{})
	p.clock.Advance(0)
	if !slices.Equal(p.regains, []bool{true}) || !p.valid() {
		t.Fatalf("regains %v, valid %v; want one first grant and a lease", p.regains, p.valid())
	}
}
