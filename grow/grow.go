// Package grow decides when an elastic process's grant of CPU and memory
// grows or shrinks, from a short window of its pressure samples. It is pure:
// no I/O, no clock, no randomness; time is an argument. The agent's loop
// samples (cgroup.PressureReader), calls Decide, asks the table for the new
// grant and applies Limits in place.
//
// # The grant
//
// A process has bounds min <= max for CPU (millicores) and memory (bytes),
// and a grant between them: what its node has promised it. The cgroup limits
// follow the grant (Limits): CPU quota and weight by the grant, the burst as
// bounded; memory limit = grant plus a small headroom (an eighth, at least
// 16 MiB, never above max), so that a working set that outruns its grant
// meets the next decision before it meets the OOM killer.
//
// # What the signals mean on these machines (../shared/pressure-signals.md)
//
//   - Memory use is the only warning anonymous memory gives: without swap
//     nothing else moves before the OOM killer, which comes about 90 ms
//     after the limit is reached. So memory grows on a projection: the
//     working set (charge minus inactive page cache, which reclaim takes
//     without a stall) plus its rate over the last MemSlopeSpan times
//     MemLead plus one sample interval. MemLead (400 ms) is the time a new
//     limit takes to come into force (request, Raft commit, write); if it
//     is at least that, the old limit plus its headroom holds until the new
//     one is there. Growth starts when the projection reaches MemGrowAt
//     (90%) of the grant, and puts the working set at MemTarget (85%) and
//     the projection at 90% of the new grant: during a ramp every sample
//     may grow it a little, and when the ramp stops the grant is close to
//     the use (a 384 MiB ramp at 80 MiB/s ends at most 1.25 times its use).
//     No cooldown holds this growth back: it is measured against the
//     newest grant, so it does not repeat itself, and the OOM killer does
//     not wait.
//   - memory.failcnt counts charges that hit the limit; it rises in the
//     first sample, but also whenever page cache fills the limit, which is
//     harmless. Refaults (evicted pages needed again) and memory PSI (time
//     stalled in reclaim or on refaults) tell that hitting the limit hurts;
//     alone they may come from the node's reclaim, which a bigger grant does
//     not cure. So limit hits count together with refaults (MemRefaultAt of
//     the grant per second) or stalls (MemStallAt of the time), and the
//     grant then grows at least by MemStep (×1.25).
//   - CPU: nr_throttled per nr_periods says the quota ran out; CPU PSI some
//     in the process's own group (on v1 hybrid: its unified twin, see
//     cgroup.Group.JoinPSI) says a task waited. Both together mean the
//     quota binds (PSI without throttling is contention for the node's
//     CPUs, which a bigger quota does not cure; throttling without waiting
//     is a burst at a period's end). Without PSI, use near the quota stands
//     in for it. The new grant is at least CPUStep (×1.5) and at least use
//     plus waiting time: a single thread held at 0.1 core waits about 0.85
//     of the time and gets about a core in one step. These counters move
//     within the first 20-50 ms; the decision needs two samples.
//   - Shrinking gives back what the use has left well below the grant
//     (MemShrinkBelow 60%, CPUShrinkBelow 50%) for a while (memory 2 min,
//     CPU 30 s by default: slowly, because a grant given back may not be
//     there when it is needed again), down to the peak of that while at
//     the target (memory 85%, CPU 70%), never below min. Over a load that
//     wanders between 100 and 300 MiB every 10 min, the memory grant's
//     slack averages 32% (23% with a 30 s delay).
//
// Hysteresis: a growth leaves the use at 85% (memory) of the new grant,
// below the 90% that grows; a shrink leaves the peak at 85% (memory) or 70%
// (CPU), above what shrinks; so a steady use never flaps. A cooldown spaces
// two changes of the same resource (except memory growth on the working
// set), and samples taken before the new limit was in force (or before
// ApplyWait has passed) do not count as pressure against it.
package grow

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/shim-run/shim/cgroup"
)

// ErrInvalid is wrapped by the errors of Validate.
var ErrInvalid = errors.New("invalid grow setting")

// Sample is one reading of a process's pressure, taken at At.
type Sample struct {
	At time.Time
	cgroup.Pressure
}

// Grant is what the node has promised a process, within its bounds.
type Grant struct {
	CPUMilli int64 // millicores
	MemBytes int64 // bytes
}

// State is what Decide carries from one call to the next: pass the
// Decision's State to the next call. If a growth is not granted after all,
// set State.Grant back to what is in force; the cooldown spaces the
// retries. If the grant changes elsewhere (a resize, the process's own
// request), set State.Grant and the change time.
type State struct {
	Grant Grant
	// The last change of each grant (zero: none yet).
	CPUChanged, MemChanged time.Time
	// Since when the use has stayed below ShrinkBelow of the grant (zero:
	// it has not), and its peak since then.
	CPULowSince, MemLowSince time.Time
	CPUPeak, MemPeak         int64
}

// Action is what Decide does with one resource's grant.
type Action int

const (
	Hold Action = iota
	Grow
	Shrink
)

func (a Action) String() string {
	switch a {
	case Grow:
		return "grow"
	case Shrink:
		return "shrink"
	}
	return "hold"
}

// Change is the decision for one resource: from one grant to another (equal
// when holding), and why.
type Change struct {
	Action   Action
	From, To int64
	Reason   string // e.g. "memory at 93% of grant for 3 samples"; for Hold, the state of things
}

// Decision is Decide's answer.
type Decision struct {
	CPU, Mem Change
	Grant    Grant // the new grant
	State    State // for the next call
}

// Changed reports whether either grant changes.
func (d Decision) Changed() bool { return d.CPU.Action != Hold || d.Mem.Action != Hold }

// Reason joins the reasons of the resources that change (all if none does).
func (d Decision) Reason() string {
	var rs []string
	for _, c := range []Change{d.CPU, d.Mem} {
		if (c.Action != Hold || !d.Changed()) && c.Reason != "" {
			rs = append(rs, c.Reason)
		}
	}
	return strings.Join(rs, "; ")
}

// Policy holds the thresholds. DefaultPolicy gives the measured defaults;
// fractions are of the grant unless said otherwise.
type Policy struct {
	MemGrowAt      float64       // grow when the projected working set reaches this
	MemTarget      float64       // a change puts the projected (growth) or peak (shrink) working set at this
	MemLead        time.Duration // project the working set this far (plus a sample interval) ahead at its recent rate: the time a new limit takes to come into force
	MemSlopeSpan   time.Duration // measure that rate over at least this span of the window
	MemStep        float64       // a growth on limit hits that hurt multiplies the grant by at least this
	MemRefaultAt   float64       // refaults per second (as a fraction of the grant) that hurt
	MemStallAt     float64       // memory PSI some (fraction of the time) that hurts
	MemShrinkBelow float64       // shrink when the working set stays below this ...
	MemShrinkAfter time.Duration // ... for this long
	MemHeadroom    float64       // the memory limit is the grant plus this fraction of it ...
	MemHeadroomMin int64         // ... or plus this many bytes, whichever is more (never above max)
	MemCooldown    time.Duration // between two changes of the memory grant

	CPUThrottledAt float64       // grow when throttled in at least this fraction of the periods ...
	CPUStallAt     float64       // ... with CPU PSI some at least this fraction of the time ...
	CPUBusyAt      float64       // ... or, without PSI, with use at least this fraction of the grant
	CPUStep        float64       // a growth multiplies the grant by at least this
	CPUTarget      float64       // a shrink puts the peak use at this
	CPUShrinkBelow float64       // shrink when the use stays below this, unthrottled, ...
	CPUShrinkAfter time.Duration // ... for this long
	CPUCooldown    time.Duration // between two changes of the CPU grant

	// ApplyWait: after a change, samples count as pressure once their
	// limit is the new one, or once this much time has passed.
	ApplyWait time.Duration
}

// DefaultPolicy returns the thresholds the package comment explains.
func DefaultPolicy() Policy {
	return Policy{
		MemGrowAt: 0.9, MemTarget: 0.85, MemLead: 400 * time.Millisecond, MemSlopeSpan: 300 * time.Millisecond,
		MemStep: 1.25, MemRefaultAt: 0.01, MemStallAt: 0.01, MemShrinkBelow: 0.6, MemShrinkAfter: 2 * time.Minute,
		MemHeadroom: 0.125, MemHeadroomMin: 16 << 20, MemCooldown: time.Second,
		CPUThrottledAt: 0.5, CPUStallAt: 0.02, CPUBusyAt: 0.8, CPUStep: 1.5, CPUTarget: 0.7,
		CPUShrinkBelow: 0.5, CPUShrinkAfter: 30 * time.Second, CPUCooldown: time.Second,
		ApplyWait: 2 * time.Second,
	}
}

// Validate reports the first setting out of range, as one line.
func (p Policy) Validate() error {
	for _, f := range []struct {
		name   string
		v      float64
		lo, hi float64
	}{
		{"memory grow-at", p.MemGrowAt, 0.01, 1}, {"memory target", p.MemTarget, 0.01, 1},
		{"memory step", p.MemStep, 1, 100}, {"memory refault rate", p.MemRefaultAt, 0, 100},
		{"memory stall", p.MemStallAt, 0, 1}, {"memory shrink-below", p.MemShrinkBelow, 0, 1},
		{"memory headroom", p.MemHeadroom, 0, 10},
		{"CPU throttled-at", p.CPUThrottledAt, 0.01, 1}, {"CPU stall", p.CPUStallAt, 0, 1},
		{"CPU busy-at", p.CPUBusyAt, 0, 1}, {"CPU step", p.CPUStep, 1, 100}, {"CPU target", p.CPUTarget, 0.01, 1},
		{"CPU shrink-below", p.CPUShrinkBelow, 0, 1},
	} {
		if !(f.v >= f.lo && f.v <= f.hi) { // also NaN
			return fmt.Errorf("%w: %s %v is outside [%v, %v]", ErrInvalid, f.name, f.v, f.lo, f.hi)
		}
	}
	if !(p.MemShrinkBelow < p.MemTarget && p.MemTarget <= p.MemGrowAt) {
		return fmt.Errorf("%w: memory shrink-below %v < target %v <= grow-at %v does not hold, so the grant would flap",
			ErrInvalid, p.MemShrinkBelow, p.MemTarget, p.MemGrowAt)
	}
	if p.CPUShrinkBelow >= p.CPUTarget {
		return fmt.Errorf("%w: CPU shrink-below %v must be below the target %v, or the grant would flap", ErrInvalid, p.CPUShrinkBelow, p.CPUTarget)
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{
		{"memory lead", p.MemLead}, {"memory slope span", p.MemSlopeSpan}, {"memory shrink-after", p.MemShrinkAfter},
		{"memory cooldown", p.MemCooldown}, {"CPU shrink-after", p.CPUShrinkAfter}, {"CPU cooldown", p.CPUCooldown},
		{"apply wait", p.ApplyWait},
	} {
		if d.v < 0 {
			return fmt.Errorf("%w: %s %v is negative", ErrInvalid, d.name, d.v)
		}
	}
	if p.MemHeadroomMin < 0 {
		return fmt.Errorf("%w: memory headroom %d bytes is negative", ErrInvalid, p.MemHeadroomMin)
	}
	return nil
}

// ValidateBounds reports whether b can carry a grant: no negative field,
// min <= max for CPU and memory where a max is set.
func ValidateBounds(b cgroup.Resources) error {
	if err := b.Validate(); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if b.CPUMaxMilli > 0 && b.CPUMinMilli > b.CPUMaxMilli {
		return fmt.Errorf("%w: CPU min %dm exceeds max %dm", ErrInvalid, b.CPUMinMilli, b.CPUMaxMilli)
	}
	if b.MemMaxBytes > 0 && b.MemMinBytes > b.MemMaxBytes {
		return fmt.Errorf("%w: memory min %s exceeds max %s", ErrInvalid, mib(b.MemMinBytes), mib(b.MemMaxBytes))
	}
	return nil
}

// Decide decides with DefaultPolicy.
func Decide(window []Sample, bounds cgroup.Resources, s State, now time.Time) Decision {
	return DefaultPolicy().Decide(window, bounds, s, now)
}

// Decide decides, for CPU and memory separately, whether the grant in s
// holds, grows or shrinks, given the latest samples of the process (oldest
// first, a second or two of them; samples not after their predecessor are
// ignored) and its bounds (a resource without a max is not elastic and
// holds). now is the time of the decision, at or after the last sample.
func (p Policy) Decide(window []Sample, bounds cgroup.Resources, s State, now time.Time) Decision {
	w := ordered(window)
	d := Decision{State: s}
	if err := ValidateBounds(bounds); err != nil {
		d.CPU = hold(s.Grant.CPUMilli, err.Error())
		d.Mem = hold(s.Grant.MemBytes, err.Error())
	} else if err := p.Validate(); err != nil {
		d.CPU = hold(s.Grant.CPUMilli, err.Error())
		d.Mem = hold(s.Grant.MemBytes, err.Error())
	} else {
		d.Mem = p.decideMem(w, bounds, &d.State, now)
		d.CPU = p.decideCPU(w, bounds, &d.State, now)
	}
	d.Grant = d.State.Grant
	return d
}

// Limits returns the cgroup limits for grant g of a process with bounds b:
// CPU quota and weight by the grant (quota at least the kernel's 1 ms per
// period), burst as bounded; memory limit the grant plus the headroom,
// never above max; memory protection (v2 memory.min, v1 soft limit) the
// grant. A resource without a max keeps b's values. Pids are b's.
func (p Policy) Limits(b cgroup.Resources, g Grant) cgroup.Resources {
	r := b
	if b.CPUMaxMilli > 0 {
		c := clamp(g.CPUMilli, b.CPUMinMilli, b.CPUMaxMilli)
		r.CPUMinMilli, r.CPUMaxMilli = c, max(c, minCPUMilli)
	}
	if b.MemMaxBytes > 0 {
		m := clamp(g.MemBytes, b.MemMinBytes, b.MemMaxBytes)
		r.MemMinBytes, r.MemMaxBytes = m, p.memLimit(b, m)
	}
	return r
}

// Limits returns the limits for a grant with DefaultPolicy.
func Limits(b cgroup.Resources, g Grant) cgroup.Resources { return DefaultPolicy().Limits(b, g) }

const (
	page = 4096
	// minCPUMilli is the smallest quota (1 ms per 100 ms period).
	minCPUMilli = 10
)

// memLimit is the memory limit for memory grant g: g plus the headroom,
// page-aligned, at most the max.
func (p Policy) memLimit(b cgroup.Resources, g int64) int64 {
	h := max(toInt(float64(g)*p.MemHeadroom), p.MemHeadroomMin)
	return min(roundUp(satAdd(g, h), page), b.MemMaxBytes)
}

// ---- memory

func (p Policy) decideMem(w []Sample, b cgroup.Resources, s *State, now time.Time) Change {
	g, lo, hi := s.Grant.MemBytes, b.MemMinBytes, b.MemMaxBytes
	if hi <= 0 {
		return hold(g, "memory has no max: not elastic")
	}
	if c, ok := p.outOfBounds(g, lo, hi, "memory", mib); ok {
		s.Grant.MemBytes, s.MemChanged, s.MemLowSince, s.MemPeak = c.To, now, time.Time{}, 0
		return c
	}
	if len(w) == 0 {
		return hold(g, "memory: no samples")
	}
	last := w[len(w)-1]
	ws := int64(min(last.WorkingSet(), math.MaxInt64/2))
	slope := memSlope(w, p.MemSlopeSpan) // bytes per second, >= 0
	// Look ahead by the time a new limit takes to come into force, plus
	// the time until the next sample (taken to be the last interval).
	lead := p.MemLead
	if len(w) >= 2 {
		lead += last.At.Sub(w[len(w)-2].At)
	}
	ahead := toInt(slope * lead.Seconds())
	proj := satAdd(ws, ahead)
	cooling := !s.MemChanged.IsZero() && now.Sub(s.MemChanged) < p.MemCooldown

	// The ratio: the working set, projected. No cooldown holds it back:
	// it is measured against the newest grant, so it does not repeat
	// itself, and the OOM killer does not wait.
	var why string
	target, urgent := int64(0), false
	if float64(proj) >= p.MemGrowAt*float64(g) && proj > 0 {
		n := 0 // trailing samples at or over the threshold themselves
		for i := len(w) - 1; i >= 0 && float64(w[i].WorkingSet()) >= p.MemGrowAt*float64(g); i-- {
			n++
		}
		switch {
		case n > 0:
			why = fmt.Sprintf("memory at %s of grant for %d sample%s", pct(ws, g), n, plural(n))
		default:
			why = fmt.Sprintf("memory at %s of grant, rising %s/s", pct(ws, g), mib(toInt(slope)))
		}
		// The new grant puts the working set at the target and the
		// projection just below the threshold: during a ramp each sample
		// may grow it a little, and when the ramp stops the grant is
		// close to the use (the growth to come is not scaled up).
		target, urgent = max(toInt(float64(ws)/p.MemTarget), toInt(float64(proj)/p.MemGrowAt)), true
	}
	// Limit hits that hurt, counted over the samples taken under the
	// grant's limit.
	if c := p.counted(w, s.MemChanged, now, func(x Sample) bool {
		l := int64(min(x.MemLimitBytes, math.MaxInt64))
		want := p.memLimit(b, g)
		return l > want-page && l < want+page
	}); len(c) >= 2 {
		first, last := c[0], c[len(c)-1]
		dt := last.At.Sub(first.At).Seconds()
		hits := sub(last.MemFailcnt, first.MemFailcnt)
		refaults := float64(sub(last.RefaultAnon+last.RefaultFile, first.RefaultAnon+first.RefaultFile)) / dt
		stall := float64(sub(last.MemSomeUsec, first.MemSomeUsec)) / 1e6 / dt
		if first.PSI != last.PSI {
			stall = 0
		}
		hurtRefaults := refaults*page >= p.MemRefaultAt*float64(max(g, page)) && refaults > 0
		hurtStall := stall >= p.MemStallAt && stall > 0
		if hits > 0 && (hurtRefaults || hurtStall) {
			t := max(toInt(float64(g)*p.MemStep), toInt(float64(ws)/p.MemTarget), toInt(float64(proj)/p.MemGrowAt))
			if t > target {
				target, urgent = t, false
				why = fmt.Sprintf("memory limit hit %d times, %.0f refaults/s, stalled %s of the time", hits, refaults, pctf(stall))
			}
		}
	}
	if target > 0 {
		s.MemLowSince, s.MemPeak = time.Time{}, 0
		switch {
		case g >= hi:
			return hold(g, why+", at max "+mib(hi))
		case cooling && !urgent:
			return hold(g, why+", cooling down")
		}
		// At least 1.5% more: a growth costs a Raft commit.
		to := min(max(roundUp(target, page), roundUp(g+g/64, page), g+page), hi)
		s.Grant.MemBytes, s.MemChanged = to, now
		return Change{Action: Grow, From: g, To: to, Reason: why}
	}

	// Shrink: the working set well below the grant for a while.
	peak := int64(0)
	for _, x := range w {
		peak = max(peak, int64(min(x.WorkingSet(), math.MaxInt64/2)))
	}
	if float64(peak) >= p.MemShrinkBelow*float64(g) || g <= lo {
		s.MemLowSince, s.MemPeak = time.Time{}, 0
		return hold(g, fmt.Sprintf("memory at %s of grant", pct(ws, g)))
	}
	if s.MemLowSince.IsZero() {
		s.MemLowSince, s.MemPeak = w[0].At, 0
		if w[0].At.Before(s.MemChanged) {
			s.MemLowSince = s.MemChanged
		}
	}
	s.MemPeak = max(s.MemPeak, peak)
	low := now.Sub(s.MemLowSince)
	to := max(lo, roundUp(toInt(float64(s.MemPeak)/p.MemTarget), page))
	if low < p.MemShrinkAfter || cooling || to >= g {
		return hold(g, fmt.Sprintf("memory at %s of grant for %v", pct(s.MemPeak, g), low.Round(time.Second)))
	}
	c := Change{Action: Shrink, From: g, To: to,
		Reason: fmt.Sprintf("memory at %s of grant for %v", pct(s.MemPeak, g), low.Round(time.Second))}
	s.Grant.MemBytes, s.MemChanged, s.MemLowSince, s.MemPeak = to, now, time.Time{}, 0
	return c
}

// memSlope is the working set's rate of growth in bytes per second, between
// the last sample and the latest one at least span before it (or the
// oldest); 0 if it does not grow.
func memSlope(w []Sample, span time.Duration) float64 {
	if len(w) < 2 {
		return 0
	}
	last := w[len(w)-1]
	i := len(w) - 2
	for i > 0 && last.At.Sub(w[i].At) < span {
		i--
	}
	dt := last.At.Sub(w[i].At).Seconds()
	dv := float64(last.WorkingSet()) - float64(w[i].WorkingSet())
	if dt <= 0 || dv <= 0 {
		return 0
	}
	return dv / dt
}

// ---- CPU

func (p Policy) decideCPU(w []Sample, b cgroup.Resources, s *State, now time.Time) Change {
	g, lo, hi := s.Grant.CPUMilli, b.CPUMinMilli, b.CPUMaxMilli
	if hi <= 0 {
		return hold(g, "CPU has no max: not elastic")
	}
	if c, ok := p.outOfBounds(g, lo, hi, "CPU", milli); ok {
		s.Grant.CPUMilli, s.CPUChanged, s.CPULowSince, s.CPUPeak = c.To, now, time.Time{}, 0
		return c
	}
	quota := max(g, minCPUMilli)
	c := p.counted(w, s.CPUChanged, now, func(x Sample) bool { return x.CPUQuotaMilli == uint64(quota) })
	if len(c) < 2 {
		return hold(g, "CPU: too few samples under this grant")
	}
	first, last := c[0], c[len(c)-1]
	dt := last.At.Sub(first.At).Seconds()
	use := float64(sub(last.CPUUsageNanos, first.CPUUsageNanos)) / 1e6 / dt // millicores
	periods, throttled := sub(last.CPUPeriods, first.CPUPeriods), sub(last.CPUThrottled, first.CPUThrottled)
	psi := first.PSI && last.PSI
	stall := 0.0
	if psi {
		stall = float64(sub(last.CPUSomeUsec, first.CPUSomeUsec)) / 1e6 / dt
	}
	cooling := !s.CPUChanged.IsZero() && now.Sub(s.CPUChanged) < p.CPUCooldown

	binds := periods >= 2 && float64(throttled) >= p.CPUThrottledAt*float64(periods)
	var why string
	if binds && psi && stall >= p.CPUStallAt {
		why = fmt.Sprintf("throttled in %d of %d periods, waiting %s of the time", throttled, periods, pctf(stall))
	} else if binds && !psi && use >= p.CPUBusyAt*float64(quota) {
		why = fmt.Sprintf("throttled in %d of %d periods, using %s of grant", throttled, periods, pct(toInt(use), quota))
	}
	if why != "" {
		s.CPULowSince, s.CPUPeak = time.Time{}, 0
		switch {
		case g >= hi:
			return hold(g, why+", at max "+milli(hi))
		case cooling:
			return hold(g, why+", cooling down")
		}
		target := max(toInt(math.Ceil(float64(g)*p.CPUStep)), toInt(use+stall*1000))
		to := min(max(target, g+1), hi)
		s.Grant.CPUMilli, s.CPUChanged = to, now
		return Change{Action: Grow, From: g, To: to, Reason: why}
	}

	// Shrink: use well below the grant, unthrottled, for a while.
	if use >= p.CPUShrinkBelow*float64(g) || float64(throttled) > 0.1*float64(periods) || g <= lo {
		s.CPULowSince, s.CPUPeak = time.Time{}, 0
		return hold(g, fmt.Sprintf("CPU at %s of grant", pct(toInt(use), g)))
	}
	if s.CPULowSince.IsZero() {
		s.CPULowSince, s.CPUPeak = first.At, 0
	}
	s.CPUPeak = max(s.CPUPeak, toInt(math.Ceil(use)))
	low := now.Sub(s.CPULowSince)
	to := max(lo, toInt(math.Ceil(float64(s.CPUPeak)/p.CPUTarget)), minCPUMilli)
	if low < p.CPUShrinkAfter || cooling || to >= g {
		return hold(g, fmt.Sprintf("CPU idle at %s of grant for %v", pct(s.CPUPeak, g), low.Round(time.Second)))
	}
	ch := Change{Action: Shrink, From: g, To: to,
		Reason: fmt.Sprintf("CPU idle at %s of grant for %v", pct(s.CPUPeak, g), low.Round(time.Second))}
	s.Grant.CPUMilli, s.CPUChanged, s.CPULowSince, s.CPUPeak = to, now, time.Time{}, 0
	return ch
}

// ---- helpers

// outOfBounds moves a grant outside [lo, hi] to the nearest bound.
func (p Policy) outOfBounds(g, lo, hi int64, what string, unit func(int64) string) (Change, bool) {
	switch {
	case g < lo:
		return Change{Action: Grow, From: g, To: lo, Reason: fmt.Sprintf("%s grant %s below min %s", what, unit(g), unit(lo))}, true
	case g > hi:
		return Change{Action: Shrink, From: g, To: hi, Reason: fmt.Sprintf("%s grant %s above max %s", what, unit(g), unit(hi))}, true
	}
	return Change{}, false
}

// counted returns the samples of w that count as pressure against the
// grant changed at changed: taken at or after the change, and under its
// limit (inForce) or ApplyWait after the change.
func (p Policy) counted(w []Sample, changed, now time.Time, inForce func(Sample) bool) []Sample {
	i := len(w)
	for i > 0 {
		x := w[i-1]
		if x.At.Before(changed) || !inForce(x) && x.At.Sub(changed) < p.ApplyWait {
			break
		}
		i--
	}
	return w[i:]
}

// ordered returns the samples of w that come after their predecessor.
func ordered(w []Sample) []Sample {
	for i := 1; i < len(w); i++ {
		if !w[i].At.After(w[i-1].At) {
			out := append([]Sample(nil), w[:i]...)
			for _, x := range w[i:] {
				if x.At.After(out[len(out)-1].At) {
					out = append(out, x)
				}
			}
			return out
		}
	}
	return w
}

func hold(g int64, why string) Change { return Change{Action: Hold, From: g, To: g, Reason: why} }

// sub is a-b for counters, 0 if the counter went back (a new group).
func sub(a, b uint64) uint64 {
	if a < b {
		return 0
	}
	return a - b
}

func satAdd(a, b int64) int64 {
	if a > math.MaxInt64-b {
		return math.MaxInt64
	}
	return a + b
}

func roundUp(n, to int64) int64 {
	if n > math.MaxInt64-to {
		return n
	}
	return (n + to - 1) / to * to
}

// toInt converts f to an int64, saturating (Go leaves an out-of-range
// conversion to the platform).
func toInt(f float64) int64 {
	switch {
	case math.IsNaN(f) || f <= 0:
		return 0
	case f >= math.MaxInt64:
		return math.MaxInt64
	}
	return int64(f)
}

func clamp(v, lo, hi int64) int64 { return min(max(v, lo), hi) }

func pct(a, b int64) string {
	if b <= 0 {
		return "∞%"
	}
	return fmt.Sprintf("%.0f%%", 100*float64(a)/float64(b))
}

func pctf(f float64) string { return fmt.Sprintf("%.0f%%", 100*f) }

func mib(n int64) string {
	if n%(1<<20) == 0 || n >= 100<<20 {
		return fmt.Sprintf("%d MiB", (n+1<<19)>>20)
	}
	return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
}

func milli(n int64) string { return fmt.Sprintf("%dm", n) }

func plural(n int) string {
	if n == 1 {
		return ""
	}
	return "s"
}
