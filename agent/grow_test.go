package agent

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/shim-run/shim/cgroup"
	"github.com/shim-run/shim/grow"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

// growRuntime is SimRuntime whose processes record the limits they are
// given, and whose pressure is what the test sets.
type growRuntime struct {
	SimRuntime
	mu     sync.Mutex
	log    []string        // "start MEM", "resize MEM", "grant MEM": in order, with the fake table's
	limits []*pb.Resources // every limit applied, in order
	mem    atomic.Uint64   // the working set every process reports
	opened atomic.Int32
}

type recProc struct {
	Proc
	rt *growRuntime
}

func (r *growRuntime) note(s string, lim *pb.Resources) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.log = append(r.log, s)
	if lim != nil {
		r.limits = append(r.limits, lim)
	}
}

func (r *growRuntime) Start(s Spec) (Proc, error) {
	p, err := r.SimRuntime.Start(s)
	if err != nil {
		return nil, err
	}
	r.note(fmt.Sprintf("start %d", s.Resources.GetMemMaxBytes()>>20), s.Resources)
	return &recProc{Proc: p, rt: r}, nil
}

func (p *recProc) Resize(res *pb.Resources) error {
	p.rt.note(fmt.Sprintf("resize %d", res.GetMemMaxBytes()>>20), res)
	return nil
}

func (r *growRuntime) Pressure(id string, inc uint64, p Proc) (PressureReader, error) {
	r.opened.Add(1)
	return &fakePressure{rt: r}, nil
}

func (r *growRuntime) last() *pb.Resources {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.limits) == 0 {
		return nil
	}
	return r.limits[len(r.limits)-1]
}

func (r *growRuntime) events() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.log...)
}

type fakePressure struct{ rt *growRuntime }

func (f *fakePressure) Read() (cgroup.Pressure, error) {
	m := f.rt.mem.Load()
	var lim uint64
	if l := f.rt.last(); l != nil {
		lim = uint64(l.MemMaxBytes)
	}
	return cgroup.Pressure{MemBytes: m, MemLimitBytes: lim}, nil
}

func (f *fakePressure) Close() error { return nil }

// fakeGrants answers SetGrant as the table would, granting up to cap
// (or refusing everything while refuse is set).
type fakeGrants struct {
	shimv1connect.ShimServiceClient
	rt     *growRuntime
	mu     sync.Mutex
	cap    int64
	refuse bool
	index  uint64
	calls  int
	rec    *pb.ProcessRecord
}

func (f *fakeGrants) SetGrant(_ context.Context, req *connect.Request[pb.SetGrantRequest]) (*connect.Response[pb.SetGrantResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	if f.refuse {
		f.rt.note("refused", nil)
		return nil, connect.NewError(connect.CodeResourceExhausted, errors.New("no room"))
	}
	g := req.Msg.Grant
	rec := &pb.ProcessRecord{Id: req.Msg.Id, Incarnation: req.Msg.Incarnation, Spec: f.rec.Spec, Node: "n1",
		State: pb.ProcessState_PROCESS_STATE_RUNNING}
	f.index++
	rec.ModifyIndex = 1000 + f.index
	rec.Grant = &pb.Grant{CpuMilli: g.CpuMilli, MemBytes: min(g.MemBytes, f.cap)}
	if g.MemBytes > f.cap {
		rec.Want, rec.WantReason = g, "waiting for room"
	}
	f.rt.note(fmt.Sprintf("grant %d", rec.Grant.MemBytes>>20), nil)
	return connect.NewResponse(&pb.SetGrantResponse{Process: rec}), nil
}

func (f *fakeGrants) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

func elasticRec(id string) *pb.ProcessRecord {
	r := assignment(id, 1, pb.ProcessState_PROCESS_STATE_RUNNING)
	r.Spec.Grow = pb.Grow_GROW_ON
	r.Spec.Resources = &pb.Resources{CpuMinMilli: 100, CpuMaxMilli: 1000, MemMinBytes: 32 << 20, MemMaxBytes: 512 << 20}
	r.Grant = &pb.Grant{CpuMilli: 100, MemBytes: 32 << 20}
	return r
}

func startGrowAgent(t *testing.T, cp *fakeCP, rt *growRuntime, fg *fakeGrants, pol grow.Policy) *Agent {
	return startAgent(t, cp, rt, func(a *Agent) {
		a.Shim = func(string) shimv1connect.ShimServiceClient { return fg }
		a.GrowInterval = 10 * time.Millisecond
		a.GrowPolicy = pol
	})
}

// An elastic process starts with the limits of its grant; as its working
// set rises its node asks for more and raises its memory limit in place;
// a fixed one keeps its bounds and asks nothing.
func TestGrowthFollowsTheWorkingSet(t *testing.T) {
	cp, rt := newFakeCP(), &growRuntime{}
	rec := elasticRec("e")
	fixed := assignment("f", 1, pb.ProcessState_PROCESS_STATE_STARTING)
	fixed.Spec.Resources = &pb.Resources{MemMinBytes: 16 << 20, MemMaxBytes: 64 << 20}
	fg := &fakeGrants{rt: rt, cap: 1 << 40, rec: rec}
	rec.State = pb.ProcessState_PROCESS_STATE_STARTING
	cp.set(1, rec)
	startGrowAgent(t, cp, rt, fg, grow.DefaultPolicy())
	waitUntil(t, 5*time.Second, "the start", func() bool { return rt.last() != nil })
	want := grow.Limits(toCgroup(rec.Spec.Resources), grow.Grant{CPUMilli: 100, MemBytes: 32 << 20})
	if got := rt.last(); got.MemMaxBytes != want.MemMaxBytes || got.CpuMaxMilli != want.CPUMaxMilli {
		t.Fatalf("started with limits %v, want the grant's %+v", got, want)
	}
	rt.mem.Store(31 << 20) // 97% of the grant
	waitUntil(t, 5*time.Second, "a growth", func() bool { return rt.last().MemMaxBytes > want.MemMaxBytes })
	if fg.count() == 0 {
		t.Fatal("the limit rose without a grant")
	}
	ev := rt.events()
	for i, e := range ev {
		if len(e) > 6 && e[:6] == "resize" && (i == 0 || ev[i-1][:5] != "grant") {
			t.Fatalf("limits raised before the grant: %v", ev)
		}
	}
	// A fixed process: its bounds, no requests.
	calls := fg.count()
	cp.set(2, rec, fixed)
	waitUntil(t, 5*time.Second, "the fixed start", func() bool {
		for _, e := range rt.events() {
			if e == "start 64" {
				return true
			}
		}
		return false
	})
	time.Sleep(100 * time.Millisecond)
	if c := fg.count(); c > calls+2 {
		t.Fatalf("%d more requests with nothing new", c-calls)
	}
}

// A refused growth is asked again no more than about once a second, and a
// growth that waits for room gets what the node could grant at once.
func TestGrowthRetriesAndWaits(t *testing.T) {
	cp, rt := newFakeCP(), &growRuntime{}
	rec := elasticRec("e")
	fg := &fakeGrants{rt: rt, cap: 40 << 20, rec: rec, refuse: true}
	cp.set(1, rec)
	rt.mem.Store(31 << 20)
	startGrowAgent(t, cp, rt, fg, grow.DefaultPolicy())
	waitUntil(t, 5*time.Second, "a request", func() bool { return fg.count() > 0 })
	time.Sleep(700 * time.Millisecond)
	if n := fg.count(); n > 2 {
		t.Fatalf("%d requests in 0.7 s after a refusal", n)
	}
	fg.mu.Lock()
	fg.refuse = false
	fg.mu.Unlock()
	// The working set keeps rising: the node gets 40M now (what fits).
	rt.mem.Store(38 << 20)
	waitUntil(t, 5*time.Second, "the partial grant in force", func() bool {
		return rt.last().MemMinBytes == 40<<20
	})
}

// A shrink lowers the limits first, then releases the grant; a grant
// changed elsewhere becomes the limits too.
func TestShrinkLowersLimitsFirst(t *testing.T) {
	cp, rt := newFakeCP(), &growRuntime{}
	rec := elasticRec("e")
	rec.Grant = &pb.Grant{CpuMilli: 100, MemBytes: 256 << 20}
	fg := &fakeGrants{rt: rt, cap: 1 << 40, rec: rec}
	cp.set(1, rec)
	pol := grow.DefaultPolicy()
	pol.MemShrinkAfter, pol.CPUShrinkAfter = 100*time.Millisecond, time.Hour
	rt.mem.Store(40 << 20)
	startGrowAgent(t, cp, rt, fg, pol)
	waitUntil(t, 5*time.Second, "a shrink", func() bool { return fg.count() > 0 })
	ev := rt.events()
	i := len(ev) - 1
	for ; i >= 0 && ev[i][:5] != "grant"; i-- {
	}
	if i < 1 || ev[i-1][:6] != "resize" {
		t.Fatalf("the grant was released before the limits were lowered: %v", ev)
	}
	// Elsewhere: `shim grant` sets 300M; the assignment brings it.
	r2 := elasticRec("e")
	r2.Grant, r2.ModifyIndex = &pb.Grant{CpuMilli: 100, MemBytes: 300 << 20}, 5000
	cp.set(2, r2)
	want := grow.Limits(toCgroup(r2.Spec.Resources), grow.Grant{CPUMilli: 100, MemBytes: 300 << 20})
	waitUntil(t, 5*time.Second, "the grant from elsewhere in force", func() bool {
		return rt.last().MemMaxBytes == want.MemMaxBytes
	})
}

// vmRuntime starts fake VMs: their grant is their size, and their guest
// asks for more itself.
type vmRuntime struct {
	SimRuntime
	mu      sync.Mutex
	resizes [][2]int64 // mem, cpu
	want    func(mem, cpu int64)
	started []Spec
}

type fakeVM struct {
	Proc
	rt *vmRuntime
}

func (r *vmRuntime) Start(s Spec) (Proc, error) {
	r.mu.Lock()
	r.started = append(r.started, s)
	r.mu.Unlock()
	p, err := r.SimRuntime.Start(s)
	return &fakeVM{Proc: p, rt: r}, err
}

func (v *fakeVM) ResizeGrant(mem, cpu int64) error {
	v.rt.mu.Lock()
	defer v.rt.mu.Unlock()
	v.rt.resizes = append(v.rt.resizes, [2]int64{mem, cpu})
	return nil
}

func (v *fakeVM) OnWant(f func(mem, cpu int64)) {
	v.rt.mu.Lock()
	defer v.rt.mu.Unlock()
	v.rt.want = f
}

// A VM's guest asks for more: the node asks the table (SetGrant), and the
// grant it gets becomes the VM's size (VM.Resize), not cgroup limits.
func TestVMWantsThroughSetGrant(t *testing.T) {
	cp, rt, gr := newFakeCP(), &vmRuntime{}, &growRuntime{}
	rec := assignment("v", 1, pb.ProcessState_PROCESS_STATE_STARTING)
	rec.Spec.Isolation, rec.Spec.Grow = pb.Isolation_ISOLATION_VM, pb.Grow_GROW_ON
	rec.Spec.Resources = &pb.Resources{CpuMinMilli: 1000, CpuMaxMilli: 2000, MemMinBytes: 256 << 20, MemMaxBytes: 1 << 30}
	rec.Grant = &pb.Grant{CpuMilli: 1000, MemBytes: 384 << 20}
	fg := &fakeGrants{rt: gr, cap: 1 << 40, rec: rec}
	cp.set(1, rec)
	startAgent(t, cp, rt, func(a *Agent) {
		a.Shim = func(string) shimv1connect.ShimServiceClient { return fg }
		a.GrowInterval = 10 * time.Millisecond
	})
	waitUntil(t, 5*time.Second, "the guest's OnWant wired", func() bool {
		rt.mu.Lock()
		defer rt.mu.Unlock()
		return rt.want != nil
	})
	rt.mu.Lock()
	want, started := rt.want, rt.started
	rt.mu.Unlock()
	// It booted at its grant, with its bounds as its ceiling.
	if len(started) != 1 || started[0].Grant.GetMemBytes() != 384<<20 || started[0].Grant.GetCpuMilli() != 1000 ||
		started[0].Resources.GetMemMaxBytes() != 1<<30 || started[0].Resources.GetCpuMaxMilli() != 2000 {
		t.Fatalf("started %+v, want the grant 1 core, 384M within the bounds", started)
	}
	want(640<<20, 0)
	waitUntil(t, 5*time.Second, "the VM resized to its new grant", func() bool {
		rt.mu.Lock()
		defer rt.mu.Unlock()
		return len(rt.resizes) > 0 && rt.resizes[len(rt.resizes)-1] == [2]int64{640 << 20, 1000}
	})
	if fg.count() != 1 {
		t.Fatalf("%d SetGrant calls, want 1", fg.count())
	}
}
