package agent

import (
	"context"
	"errors"
	"fmt"
	"time"

	"connectrpc.com/connect"

	"github.com/shim-run/shim/cgroup"
	"github.com/shim-run/shim/grow"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/table"
)

// Growth. An elastic process (spec grow ON or MOVE) has cgroup limits that
// follow its grant, the part of its bounds its node has promised it
// (table/grants.go): grow.Limits(bounds, grant). Wherever the agent applies
// limits (a start, a resize of its bounds, a new grant in its assignment)
// it applies those; a fixed process keeps its limits at its bounds.
//
// The growth loop (growLoop) samples every elastic process's pressure every
// GrowInterval (cgroup.PressureReader, after JoinPSI: the runtime's
// Pressure), keeps a window of the last growWindow samples, and asks
// grow.Decide. On a change:
//
//   - A growth is asked of the table (SetGrant, as this node), and its
//     limits are raised when the answer comes: what the node could grant at
//     once (the table grants what fits and makes room for the rest, which
//     a later assignment brings).
//   - A shrink lowers the limits first, then releases the grant: the node
//     never promises less than what is in force.
//   - One request per process is in flight; a newer decision replaces the
//     one waiting behind it (the latest wins). A refusal, or a growth that
//     waits for room, sets the decision's state back to the table's grant;
//     it is asked again after growRetry, or sooner (growRetryMore) if the
//     process wants more than it last asked: a working set that grows asks
//     at every sample.
//   - A grant changed elsewhere (the workload's own request, `shim grant`,
//     a resize) reaches the loop with the assignment, and becomes the
//     decision's state, with its change time.
//
// A VM (a Proc that is a Wanter) asks for itself: its guest's requests go
// through the same SetGrant, and its grant is applied with ResizeGrant
// (VM.Resize), not as cgroup limits.

// growWindow is how many samples a decision looks at: a second at 100 ms.
const growWindow = 10

// growRetry spaces requests after a refusal or a growth that waits;
// growRetryMore, requests for more than the last one asked.
const (
	growRetry     = time.Second
	growRetryMore = 200 * time.Millisecond
)

// growCall bounds one SetGrant call.
const growCall = 5 * time.Second

// PressureReader reads one process's pressure (a cgroup.PressureReader).
type PressureReader interface {
	Read() (cgroup.Pressure, error)
	Close() error
}

// PressureRuntime is a Runtime that can read its processes' pressure: the
// growth loop samples the elastic processes of a Runtime that is one.
type PressureRuntime interface {
	// Pressure opens a reader of the pressure of incarnation inc of
	// process id, running as p (joining its PSI group first).
	Pressure(id string, inc uint64, p Proc) (PressureReader, error)
}

// GrantResizer is a Proc that takes its grant rather than cgroup limits: a
// VM, whose grant is its guest's memory and CPUs (VM.Resize).
type GrantResizer interface {
	ResizeGrant(memBytes, cpuMilli int64) error
}

// Wanter is a Proc that asks for a bigger grant itself: a VM's guest
// (VM.OnWant). memBytes or cpuMilli 0 keeps that part.
type Wanter interface {
	OnWant(f func(memBytes, cpuMilli int64))
}

// growth is the growth loop's state for one incarnation of an elastic
// process. Guarded by Agent.mu, but for r and window, which only the loop
// touches.
type growth struct {
	id  string
	inc uint64
	l   *local

	r      PressureReader // nil: not opened yet, or none (noPressure)
	noPSI  bool           // the runtime cannot read its pressure: only its own requests
	window []grow.Sample

	state grow.State
	// granted is the newest record the agent has seen of the process's
	// grant: its assignment, or a SetGrant answer (by ModifyIndex).
	granted *pb.ProcessRecord
	// shrink holds the grant whose lower limits are in force ahead of the
	// table (a shrink in flight), nil when none.
	shrink *pb.Grant

	inflight bool
	next     *pb.SetGrantRequest // the latest request waiting behind the one in flight
	nextAt   time.Time           // when next was decided
	retryAt  time.Time           // no request before this
	asked    *pb.Grant           // the last growth asked for
	done     bool
}

// elastic reports whether rec's grant follows its load.
func elastic(rec *pb.ProcessRecord) bool { return rec != nil && table.Elastic(rec.Spec) }

// growPolicy returns the policy the loop decides with.
func (a *Agent) growPolicy() grow.Policy {
	if a.GrowPolicy == (grow.Policy{}) {
		return grow.DefaultPolicy()
	}
	return a.GrowPolicy
}

// limitsOf returns the cgroup limits for rec with grant g: its bounds for a
// fixed process, grow.Limits for an elastic one.
func (a *Agent) limitsOf(rec *pb.ProcessRecord, g *pb.Grant) *pb.Resources {
	b := rec.GetSpec().GetResources()
	if !elastic(rec) {
		return b
	}
	l := a.growPolicy().Limits(toCgroup(b), grow.Grant{CPUMilli: g.GetCpuMilli(), MemBytes: g.GetMemBytes()})
	return &pb.Resources{CpuMinMilli: l.CPUMinMilli, CpuMaxMilli: l.CPUMaxMilli, CpuBurstMilli: l.CPUBurstMilli,
		MemMinBytes: l.MemMinBytes, MemMaxBytes: l.MemMaxBytes, PidsMax: l.PidsMax}
}

// startLimits are the limits a new run of rec starts with. A VM's are its
// bounds, its ceiling: its grant is its size (Spec.Grant).
func (a *Agent) startLimits(rec *pb.ProcessRecord) *pb.Resources {
	if rec.GetSpec().GetIsolation() == pb.Isolation_ISOLATION_VM {
		return rec.GetSpec().GetResources()
	}
	return a.limitsOf(rec, table.GrantOf(rec))
}

func toCgroup(r *pb.Resources) cgroup.Resources {
	return cgroup.Resources{
		CPUMinMilli: r.GetCpuMinMilli(), CPUMaxMilli: r.GetCpuMaxMilli(), CPUBurstMilli: r.GetCpuBurstMilli(),
		MemMinBytes: r.GetMemMinBytes(), MemMaxBytes: r.GetMemMaxBytes(), PidsMax: r.GetPidsMax(),
	}
}

// grantLocked is the grant in force for l: the newest the table has given
// it, lowered by a shrink in flight.
func (a *Agent) grantLocked(l *local) *pb.Grant {
	rec := l.rec
	g := a.growths[l.id]
	if g != nil && g.l == l && g.granted != nil && g.granted.ModifyIndex > rec.GetModifyIndex() &&
		g.granted.Incarnation == l.inc {
		rec = g.granted
	}
	gr := table.GrantOf(rec)
	if g != nil && g.l == l && g.shrink != nil {
		gr = &pb.Grant{CpuMilli: min(gr.CpuMilli, g.shrink.CpuMilli), MemBytes: min(gr.MemBytes, g.shrink.MemBytes)}
	}
	return gr
}

// applyGrantsLocked brings every elastic process's limits (and every VM's
// size) in line with its grant. reconcileLocked calls it after each change
// to the assignments.
func (a *Agent) applyGrantsLocked() {
	for _, l := range a.procs {
		if l.proc != nil && !l.winding() && followsGrant(l) && l.rec.Incarnation == l.inc {
			a.applyGrantLocked(l)
		}
	}
}

// followsGrant reports whether l's limits follow its grant: it is elastic,
// or a VM (whose size is its grant).
func followsGrant(l *local) bool {
	_, vm := l.proc.(GrantResizer)
	return elastic(l.rec) || vm
}

// applyGrantLocked applies l's grant as limits, if they differ from those
// in force, and reports whether it did. A VM's grant is its size.
func (a *Agent) applyGrantLocked(l *local) bool {
	gr := a.grantLocked(l)
	if r, ok := l.proc.(GrantResizer); ok {
		return a.resizeVMLocked(l, r, gr)
	}
	want := a.limitsOf(l.rec, gr)
	if l.limits != nil && sameLimits(l.limits, want) {
		return false
	}
	if err := l.proc.Resize(want); err != nil {
		a.Log.Warn("grant: applying limits failed", "id", l.id, "err", err)
		return false
	}
	l.limits = want
	a.Log.Debug("limits follow the grant", "id", l.id, "cpu", table.Cores(gr.CpuMilli), "mem", table.Bytes(gr.MemBytes),
		"mem_limit", table.Bytes(want.MemMaxBytes), "cpu_quota", table.Cores(want.CpuMaxMilli))
	return true
}

// startedLocked notes what a run just started holds: a VM boots at its
// grant.
func (a *Agent) startedLocked(l *local, rec *pb.ProcessRecord) {
	if _, ok := l.proc.(GrantResizer); ok {
		l.vmGrant = table.GrantOf(rec)
	}
}

// resizeVMLocked resizes a VM to grant gr if it changed since the last
// one: a run just started or adopted booted at its grant. A zero part
// keeps what the VM has. The resize runs outside the lock (a shrink waits
// for the guest, up to seconds), one at a time per VM.
func (a *Agent) resizeVMLocked(l *local, r GrantResizer, gr *pb.Grant) bool {
	if l.vmGrant == nil {
		l.vmGrant = gr
		return false
	}
	if sameGrant(l.vmGrant, gr) {
		return false
	}
	mem, cpu := gr.MemBytes, gr.CpuMilli
	if mem == 0 {
		mem = l.vmGrant.MemBytes
	}
	if cpu == 0 {
		cpu = l.vmGrant.CpuMilli
	}
	l.vmGrant = gr
	go func() {
		l.vmMu.Lock()
		defer l.vmMu.Unlock()
		if err := r.ResizeGrant(mem, cpu); err != nil {
			a.Log.Warn("grant: resizing the VM failed", "id", l.id, "err", err)
		}
	}()
	return true
}

func sameGrant(a, b *pb.Grant) bool {
	return a.GetCpuMilli() == b.GetCpuMilli() && a.GetMemBytes() == b.GetMemBytes()
}

func sameLimits(a, b *pb.Resources) bool {
	return a.GetCpuMinMilli() == b.GetCpuMinMilli() && a.GetCpuMaxMilli() == b.GetCpuMaxMilli() &&
		a.GetCpuBurstMilli() == b.GetCpuBurstMilli() && a.GetMemMinBytes() == b.GetMemMinBytes() &&
		a.GetMemMaxBytes() == b.GetMemMaxBytes() && a.GetPidsMax() == b.GetPidsMax()
}

// growLoop samples and decides every GrowInterval until ctx ends.
func (a *Agent) growLoop(ctx context.Context) {
	rt, _ := a.Runtime.(PressureRuntime)
	for {
		select {
		case <-ctx.Done():
			a.mu.Lock()
			for _, g := range a.growths {
				a.dropGrowthLocked(g)
			}
			a.mu.Unlock()
			a.closeDropped()
			return
		case <-a.Clock.After(a.GrowInterval):
		}
		a.closeDropped()
		for _, g := range a.growing() {
			a.sampleGrowth(ctx, rt, g)
		}
	}
}

// growing returns the growths to sample, after bringing the set in line
// with the elastic processes that run.
func (a *Agent) growing() []*growth {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, l := range a.procs {
		if l.proc == nil || l.winding() || !followsGrant(l) || l.rec.Incarnation != l.inc {
			continue
		}
		if g := a.growths[l.id]; g == nil || g.l != l {
			a.growthLocked(l)
		}
	}
	out := make([]*growth, 0, len(a.growths))
	for id, g := range a.growths {
		l := g.l
		if a.procs[id] != l || l.proc == nil || l.winding() || g.done {
			a.dropGrowthLocked(g)
			continue
		}
		if !g.noPSI {
			out = append(out, g)
		}
	}
	return out
}

// growthLocked starts the growth state of l (replacing an older one).
func (a *Agent) growthLocked(l *local) *growth {
	if old := a.growths[l.id]; old != nil {
		a.dropGrowthLocked(old)
	}
	gr := table.GrantOf(l.rec)
	g := &growth{id: l.id, inc: l.inc, l: l, granted: l.rec,
		state: grow.State{Grant: grow.Grant{CPUMilli: gr.CpuMilli, MemBytes: gr.MemBytes}}}
	if _, ok := l.proc.(GrantResizer); ok {
		g.noPSI = true // a VM's guest says what it wants
	}
	if w, ok := l.proc.(Wanter); ok {
		w.OnWant(func(memBytes, cpuMilli int64) { a.guestWants(l, memBytes, cpuMilli) })
	}
	a.growths[l.id] = g
	return g
}

// dropGrowthLocked ends g. Its reader is closed by the loop (closeDropped),
// the only goroutine that reads it, so never while a Read is under way.
func (a *Agent) dropGrowthLocked(g *growth) {
	g.done = true
	if a.growths[g.id] == g {
		delete(a.growths, g.id)
	}
	if g.r != nil {
		a.growClose = append(a.growClose, g.r)
		g.r = nil
	}
}

// closeDropped closes the readers of the growths ended since its last call.
func (a *Agent) closeDropped() {
	a.mu.Lock()
	rs := a.growClose
	a.growClose = nil
	a.mu.Unlock()
	for _, r := range rs {
		_ = r.Close()
	}
}

// sampleGrowth reads g's pressure, decides, and acts on a change.
func (a *Agent) sampleGrowth(ctx context.Context, rt PressureRuntime, g *growth) {
	a.mu.Lock()
	r, p, done := g.r, g.l.proc, g.done
	a.mu.Unlock()
	if done || p == nil {
		return
	}
	if r == nil {
		if rt == nil {
			a.mu.Lock()
			g.noPSI = true
			a.mu.Unlock()
			return
		}
		nr, err := rt.Pressure(g.id, g.inc, p)
		a.mu.Lock()
		if err != nil || g.done {
			if err != nil {
				a.Log.Warn("growth: cannot read pressure; only asked grants apply", "id", g.id, "err", err)
				g.noPSI = true
			}
			a.mu.Unlock()
			if nr != nil {
				_ = nr.Close()
			}
			return
		}
		g.r, r = nr, nr
		a.mu.Unlock()
	}
	pr, err := r.Read()
	now := a.Clock.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	if g.done {
		return
	}
	if err != nil {
		if errors.Is(err, cgroup.ErrNotFound) {
			a.dropGrowthLocked(g) // the group is gone: the process ended
		}
		return
	}
	g.window = append(g.window, grow.Sample{At: now, Pressure: pr})
	if len(g.window) > growWindow {
		g.window = append(g.window[:0], g.window[len(g.window)-growWindow:]...)
	}
	a.syncStateLocked(g, now)
	pol := a.growPolicy()
	d := pol.Decide(g.window, toCgroup(g.l.rec.Spec.GetResources()), g.state, now)
	if !d.Changed() {
		g.state = d.State
		return
	}
	to := &pb.Grant{CpuMilli: d.Grant.CPUMilli, MemBytes: d.Grant.MemBytes}
	growing := d.CPU.Action == grow.Grow || d.Mem.Action == grow.Grow
	if growing && !a.mayAskLocked(g, to, now) {
		// Too soon after a refusal or a wait: decide again next time.
		return
	}
	g.state = d.State
	for _, c := range []struct {
		res string
		ch  grow.Change
	}{{"cpu", d.CPU}, {"memory", d.Mem}} {
		if c.ch.Action != grow.Hold {
			a.Metrics.GrowRequests.WithLabelValues(c.res, c.ch.Action.String()).Inc()
		}
	}
	a.Log.Info("growth: "+decision(d), "id", g.id, "cpu", table.Cores(to.CpuMilli), "mem", table.Bytes(to.MemBytes),
		"reason", d.Reason())
	cur := a.grantLocked(g.l)
	if to.CpuMilli < cur.CpuMilli || to.MemBytes < cur.MemBytes {
		// Lower the limits first, then release the grant.
		g.shrink = &pb.Grant{CpuMilli: min(to.CpuMilli, cur.CpuMilli), MemBytes: min(to.MemBytes, cur.MemBytes)}
		a.applyGrantLocked(g.l)
	}
	if growing {
		g.asked = to
	}
	a.askLocked(ctx, g, &pb.SetGrantRequest{Id: g.id, Incarnation: g.inc, Grant: to, Reason: d.Reason()}, now)
}

func decision(d grow.Decision) string {
	switch {
	case d.CPU.Action == grow.Grow || d.Mem.Action == grow.Grow:
		return "grow"
	}
	return "shrink"
}

// mayAskLocked reports whether g may ask for growth to now: not within
// growRetry of a refusal or a wait, unless it asks for more than before
// (then not within growRetryMore).
func (a *Agent) mayAskLocked(g *growth, to *pb.Grant, now time.Time) bool {
	if g.retryAt.IsZero() || !now.Before(g.retryAt) {
		return true
	}
	more := g.asked == nil || to.CpuMilli > g.asked.CpuMilli || to.MemBytes > g.asked.MemBytes
	return more && !now.Before(g.retryAt.Add(growRetryMore-growRetry))
}

// syncStateLocked takes a grant changed elsewhere into the decision's
// state: the table's grant, when it is not what the loop last decided.
func (a *Agent) syncStateLocked(g *growth, now time.Time) {
	if g.inflight || g.shrink != nil {
		return // the answer will tell
	}
	gr := a.grantLocked(g.l)
	s := &g.state
	if gr.CpuMilli != s.Grant.CPUMilli {
		s.Grant.CPUMilli, s.CPUChanged, s.CPULowSince, s.CPUPeak = gr.CpuMilli, now, time.Time{}, 0
	}
	if gr.MemBytes != s.Grant.MemBytes {
		s.Grant.MemBytes, s.MemChanged, s.MemLowSince, s.MemPeak = gr.MemBytes, now, time.Time{}, 0
	}
}

// Want asks for a grant for incarnation inc of process id on behalf of
// the process itself: a VM's guest that wants more (memBytes, cpuMilli; 0
// keeps that part). It goes through SetGrant as the growth loop's requests
// do, and the answer is applied as they are (ResizeGrant for a VM). A
// runtime that hears its guests itself calls it; a Proc that is a Wanter
// is wired to it by the agent.
func (a *Agent) Want(id string, inc uint64, memBytes, cpuMilli int64) {
	a.mu.Lock()
	l := a.procs[id]
	a.mu.Unlock()
	if l != nil && l.inc == inc {
		a.guestWants(l, memBytes, cpuMilli)
	}
}

// guestWants asks for the grant a VM's guest wants.
func (a *Agent) guestWants(l *local, memBytes, cpuMilli int64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.procs[l.id] != l || l.proc == nil || l.winding() {
		return
	}
	g := a.growths[l.id]
	if g == nil || g.l != l || g.done {
		g = a.growthLocked(l)
	}
	cur := a.grantLocked(l)
	to := &pb.Grant{CpuMilli: cur.CpuMilli, MemBytes: cur.MemBytes}
	if memBytes > 0 {
		to.MemBytes = memBytes
	}
	if cpuMilli > 0 {
		to.CpuMilli = cpuMilli
	}
	if b := l.rec.Spec.GetResources(); b.GetMemMaxBytes() > 0 {
		to.MemBytes = min(to.MemBytes, b.GetMemMaxBytes())
	}
	if b := l.rec.Spec.GetResources(); b.GetCpuMaxMilli() > 0 {
		to.CpuMilli = min(to.CpuMilli, b.GetCpuMaxMilli())
	}
	g.asked = to
	a.askLocked(context.Background(), g, &pb.SetGrantRequest{Id: l.id, Incarnation: l.inc, Grant: to, Reason: "the guest asks"},
		a.Clock.Now())
}

// askLocked sends req, or, with a request in flight, keeps it to send
// next (replacing any kept before).
func (a *Agent) askLocked(ctx context.Context, g *growth, req *pb.SetGrantRequest, at time.Time) {
	if g.inflight {
		g.next, g.nextAt = req, at
		return
	}
	g.inflight = true
	go a.sendGrant(ctx, g, req, at)
}

// sendGrant calls SetGrant and takes its answer in.
func (a *Agent) sendGrant(ctx context.Context, g *growth, req *pb.SetGrantRequest, decided time.Time) {
	cctx, cancel := context.WithTimeout(ctx, growCall)
	resp, err := a.setGrant(cctx, req)
	cancel()
	a.mu.Lock()
	defer a.mu.Unlock()
	g.inflight = false
	now := a.Clock.Now()
	if g.done {
		return
	}
	if err != nil {
		a.Log.Warn("growth: grant refused", "id", g.id, "grant", table.FormatGrant(req.Grant), "err", err)
		g.retryAt = now.Add(growRetry)
		if g.shrink != nil {
			g.shrink = nil // the limits go back to the grant the table holds
			a.applyGrantLocked(g.l)
		}
		a.resetStateLocked(g, now)
	} else {
		rec := resp.Process
		if rec.Incarnation == g.inc && (g.granted == nil || rec.ModifyIndex >= g.granted.ModifyIndex) {
			g.granted = rec
		}
		got := table.GrantOf(rec)
		if g.shrink != nil && got.CpuMilli <= g.shrink.CpuMilli && got.MemBytes <= g.shrink.MemBytes {
			g.shrink = nil
		}
		if a.applyGrantLocked(g.l) && (got.CpuMilli > 0 || got.MemBytes > 0) {
			a.Metrics.GrowLatency.Observe(now.Sub(decided).Seconds())
		}
		if rec.Want != nil || got.CpuMilli < req.Grant.CpuMilli || got.MemBytes < req.Grant.MemBytes {
			// The growth waits for room, in part or in whole.
			g.retryAt = now.Add(growRetry)
			a.Log.Info("growth: waiting for room", "id", g.id, "grant", table.FormatGrant(got), "reason", rec.WantReason)
			a.resetStateLocked(g, now)
		}
	}
	if n := g.next; n != nil {
		g.next = nil
		g.inflight = true
		go a.sendGrant(ctx, g, n, g.nextAt)
	}
}

// resetStateLocked sets the decision's grant back to the grant in force,
// keeping the change times (the cooldown spaces the retries).
func (a *Agent) resetStateLocked(g *growth, now time.Time) {
	gr := a.grantLocked(g.l)
	g.state.Grant = grow.Grant{CPUMilli: gr.CpuMilli, MemBytes: gr.MemBytes}
}

// setGrant calls SetGrant on the servers in turn, as call does.
func (a *Agent) setGrant(ctx context.Context, req *pb.SetGrantRequest) (*pb.SetGrantResponse, error) {
	if a.Shim == nil {
		return nil, fmt.Errorf("set grant: no API client")
	}
	err := errors.New("no API address")
	for _, addr := range a.book.order(a.Addrs()) {
		var resp *connect.Response[pb.SetGrantResponse]
		resp, err = a.Shim(addr).SetGrant(ctx, connect.NewRequest(req))
		if err == nil {
			return resp.Msg, nil
		}
		if c := connect.CodeOf(err); c != connect.CodeUnavailable && c != connect.CodeUnknown && c != connect.CodeDeadlineExceeded {
			return nil, err
		}
		if ctx.Err() != nil {
			break
		}
	}
	return nil, err
}
