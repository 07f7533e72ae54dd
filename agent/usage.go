package agent

import (
	"context"
	"time"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Usage: every sampleEvery the agent reads its processes' cgroup counters,
// so that CPU use can be given as a rate; Usage answers the servers' queries
// from the last samples, or from the cgroups read now.

// sampleEvery is how often the agent reads its processes' cgroup stats.
const sampleEvery = 2 * time.Second

// sample reads every running process's usage periodically, so that CPU use
// can be given as a rate.
func (a *Agent) sample(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.Clock.After(sampleEvery):
		}
		a.mu.Lock()
		procs := make([]*local, 0, len(a.procs))
		for _, l := range a.procs {
			if l.proc != nil {
				procs = append(procs, l)
			}
		}
		a.mu.Unlock()
		for _, l := range procs {
			a.sampleOne(l)
		}
	}
}

func (a *Agent) sampleOne(l *local) {
	a.mu.Lock()
	p := l.proc
	a.mu.Unlock()
	if p == nil {
		return
	}
	u, err := p.Stats()
	if err != nil {
		return
	}
	now := a.Clock.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	if prev := l.usage; prev != nil && u.CpuUsageNanos >= prev.CpuUsageNanos {
		if dt := now.Sub(l.sampledAt); dt > 0 {
			u.CpuMilli = int64(float64(u.CpuUsageNanos-prev.CpuUsageNanos) / float64(dt.Nanoseconds()) * 1000)
		}
	}
	l.usage, l.sampledAt = u, now
}

// Usage returns the use of the given processes (all when ids is empty):
// their last sample, or, with fresh, their cgroups read now (the CPU rate
// still comes from the last two samples).
func (a *Agent) Usage(ids []string, fresh bool) map[string]*pb.Usage {
	a.mu.Lock()
	var want []*local
	if len(ids) == 0 {
		for _, l := range a.procs {
			want = append(want, l)
		}
	} else {
		for _, id := range ids {
			if l := a.procs[id]; l != nil {
				want = append(want, l)
			}
		}
	}
	out := make(map[string]*pb.Usage, len(want))
	if !fresh {
		for _, l := range want {
			if l.proc != nil && l.usage != nil {
				out[l.id] = l.usage
			}
		}
		a.mu.Unlock()
		return out
	}
	a.mu.Unlock()
	for _, l := range want {
		a.mu.Lock()
		p, last := l.proc, l.usage
		a.mu.Unlock()
		if p == nil {
			continue
		}
		u, err := p.Stats()
		if err != nil {
			continue
		}
		if last != nil {
			u.CpuMilli = last.CpuMilli
		}
		out[l.id] = u
	}
	return out
}
