package agent

import "time"

// Clock is the agent's one source of time: the time now, and the timers
// that fire by it. Every deadline the agent keeps (the lease and its fence,
// heartbeat and retry pauses, restart backoffs, stop grace periods, the
// hand-off delay) is measured with it, so that a test can advance it. Only
// the timeouts of calls to the servers are left to their contexts.
type Clock interface {
	Now() time.Time
	// After sends the time on the returned channel once d has passed.
	After(d time.Duration) <-chan time.Time
	// AfterFunc calls f in its own goroutine once d has passed.
	AfterFunc(d time.Duration, f func()) Timer
}

// Timer is a timer made by a Clock's AfterFunc.
type Timer interface {
	// Stop prevents the timer from firing; it reports whether it did.
	Stop() bool
	// Reset makes the timer fire d from now (again).
	Reset(d time.Duration) bool
}

// SystemClock is the Clock of package time.
type SystemClock struct{}

// Now returns time.Now().
func (SystemClock) Now() time.Time { return time.Now() }

// After returns time.After(d).
func (SystemClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// AfterFunc returns time.AfterFunc(d, f).
func (SystemClock) AfterFunc(d time.Duration, f func()) Timer { return time.AfterFunc(d, f) }
