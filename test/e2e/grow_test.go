package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Processes that grow (issue 15), on real shimd nodes with trust on: the
// memory and CPU ramps, making room on a full node, the placement fix, and
// the event stream (issue 18). Node names start with "growint-" and the
// test's pid, so that cgroups never meet another run's.

// growProc is a process as `shim ps -o json` shows it, with its grant.
type growProc struct {
	ID          string `json:"id"`
	Node        string `json:"node"`
	State       string `json:"state"`
	PID         int    `json:"pid"`
	Incarnation uint64 `json:"incarnation"`
	Restarts    uint32 `json:"restarts"`
	Reason      string `json:"reason"`
	Grant       struct {
		CPU float64 `json:"cpu"`
		Mem int64   `json:"mem"`
	} `json:"grant"`
	WantReason string `json:"want_reason"`
}

func (c *cluster) growPS(args ...string) []growProc {
	c.t.Helper()
	r := c.shim(append([]string{"ps", "-o", "json"}, args...)...)
	if r.code != 0 {
		return nil
	}
	var out []growProc
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil {
		c.t.Fatalf("ps json: %v\n%s", err, r.stdout)
	}
	return out
}

func (c *cluster) growGet(id string) growProc {
	c.t.Helper()
	for _, p := range c.growPS(id) {
		if p.ID == id {
			return p
		}
	}
	return growProc{}
}

// startGrowNodes starts n servers named growint-<pid>-<i>, each with the
// flags of extra[i] (or of extra[0] if it has only one), the first
// bootstrapping.
func startGrowNodes(t *testing.T, n int, extra ...[]string) *cluster {
	t.Helper()
	needRoot(t)
	if _, err := os.Stat("/sys/fs/cgroup/memory/memory.limit_in_bytes"); err != nil {
		t.Skip("the growth tests read cgroup v1 files: ", err)
	}
	c := &cluster{t: t}
	// The nodes' data dirs outlive the cluster's cleanup, which reads
	// their logs (t.TempDir would be removed first: cleanups run last
	// registered first).
	base, err := os.MkdirTemp("", "growint-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	growBase.Store(c, base)
	t.Cleanup(func() { growBase.Delete(c) })
	t.Cleanup(c.cleanup)
	for i := range n {
		var args []string
		if len(extra) == 1 {
			args = extra[0]
		} else if i < len(extra) {
			args = extra[i]
		}
		c.addNode(args...)
	}
	c.waitNodesUp(n, 20*time.Second)
	return c
}

// addNode starts one more server, joining the cluster unless it is the
// first.
func (c *cluster) addNode(extra ...string) *daemon {
	c.t.Helper()
	if err := os.MkdirAll(c.nodeDir(len(c.nodes)), 0o755); err != nil {
		c.t.Fatal(err)
	}
	c.t.Helper()
	i := len(c.nodes)
	base, _ := growBase.Load(c)
	name := fmt.Sprintf("%sgrowint-%d-%d", os.Getenv("SHIM_E2E_PREFIX"), os.Getpid()%100000, i+1)
	d := &daemon{name: name, api: freePort(c.t), raft: freePort(c.t), dir: filepath.Join(base.(string), name)}
	d.args = []string{"--name", d.name, "--data-dir", d.dir, "--api", d.api, "--raft", d.raft}
	if i > 0 {
		d.args = append(d.args, c.joinArgs()...)
	}
	d.args = append(d.args, extra...)
	c.nodes = append(c.nodes, d)
	c.start(d)
	if i == 0 {
		c.waitTrust()
	}
	return d
}

// growBase holds each cluster's folder of data dirs.
var growBase sync.Map

func (c *cluster) nodeDir(i int) string {
	base, _ := growBase.Load(c)
	return filepath.Join(base.(string), fmt.Sprintf("%sgrowint-%d-%d", os.Getenv("SHIM_E2E_PREFIX"), os.Getpid()%100000, i+1))
}

// ramp is a workload that touches step MiB every 100 ms up to total MiB,
// holds it for hold seconds, frees it and sleeps. It prints "held" and
// "freed". glibc's fixed mmap threshold makes each chunk its own mapping,
// returned to the kernel when freed.
func ramp(step, total, hold int) []string {
	script := fmt.Sprintf(`import time
chunks = []
for i in range(%d):
    chunks.append(b'\x01' * (%d << 20))
    time.sleep(0.1)
print("held", flush=True)
time.sleep(%d)
chunks.clear()
print("freed", flush=True)
while True:
    time.sleep(3600)
`, total/step, step, hold)
	return []string{"--env", "MALLOC_MMAP_THRESHOLD_=131072", "--", "/usr/bin/python3", "-c", script}
}

// memWatch samples a process's memory cgroup until stopped: the limit's
// highest value, and whether the OOM killer ever struck.
type memWatch struct {
	stop   chan struct{}
	done   chan struct{}
	limits []uint64 // distinct limit values, in order
	ooms   uint64
	err    string
}

func watchMem(t *testing.T, pid int) *memWatch {
	w := &memWatch{stop: make(chan struct{}), done: make(chan struct{})}
	dir := filepath.Join("/sys/fs/cgroup/memory", cgroupOf(t, pid, "memory"))
	go func() {
		defer close(w.done)
		for {
			b, err := os.ReadFile(filepath.Join(dir, "memory.limit_in_bytes"))
			if err != nil {
				w.err = err.Error()
				return
			}
			v, _ := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
			if n := len(w.limits); n == 0 || w.limits[n-1] != v {
				w.limits = append(w.limits, v)
			}
			if b, err := os.ReadFile(filepath.Join(dir, "memory.oom_control")); err == nil {
				for _, l := range strings.Split(string(b), "\n") {
					if k, v, ok := strings.Cut(l, " "); ok && k == "oom_kill" {
						w.ooms, _ = strconv.ParseUint(v, 10, 64)
					}
				}
			}
			select {
			case <-w.stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	return w
}

func (w *memWatch) end() { close(w.stop); <-w.done }

// memUse is a process's memory charge less its inactive page cache.
func memUse(t *testing.T, pid int) int64 {
	dir := filepath.Join("/sys/fs/cgroup/memory", cgroupOf(t, pid, "memory"))
	return int64(readUint(t, filepath.Join(dir, "memory.usage_in_bytes"))) -
		int64(readKeyed(t, filepath.Join(dir, "memory.stat"), "total_inactive_file"))
}

func mib(n int64) string { return fmt.Sprintf("%.0f MiB", float64(n)/(1<<20)) }

// TestGrowMemoryRamp: an elastic process that allocates 8 MiB every 100 ms
// up to 384 MiB is never OOM-killed, keeps its PID, and its memory limit
// rises with it; then its grant is at least its use and at most 1.3 times
// it; once it frees the memory its grant is back below 128 MiB within 30 s
// (the shrink delay set to 5 s for the test).
func TestGrowMemoryRamp(t *testing.T) {
	c := startGrowNodes(t, 1, []string{"--grow-mem-shrink-after", "5s"})
	id := c.spawn(append([]string{"--grow", "--restart", "never", "--mem", "32M:512M"}, ramp(8, 384, 10)...)...)
	p := c.waitRunning(id)
	w := watchMem(t, p.PID)
	defer w.end()
	waitFor(t, 30*time.Second, "the ramp to hold 384 MiB", func() bool {
		return strings.Contains(c.shim("logs", id).stdout, "held")
	}, 200*time.Millisecond)
	// Growth settles within a second or two of the ramp's end.
	time.Sleep(2 * time.Second)
	use := memUse(t, p.PID)
	g := c.growGet(id)
	t.Logf("held: use %s, grant %s, limits seen %d (%s..%s)", mib(use), mib(g.Grant.Mem), len(w.limits),
		mib(int64(w.limits[0])), mib(int64(w.limits[len(w.limits)-1])))
	if g.PID != p.PID || g.State != "running" || g.Incarnation != 1 || g.Restarts != 0 {
		t.Fatalf("the grower did not keep running as it was: %+v (was pid %d)", g, p.PID)
	}
	if w.ooms != 0 {
		t.Fatalf("the OOM killer struck %d times", w.ooms)
	}
	if len(w.limits) < 3 || w.limits[len(w.limits)-1] <= w.limits[0] {
		t.Fatalf("the memory limit did not rise with the ramp: %v", w.limits)
	}
	if g.Grant.Mem < use || float64(g.Grant.Mem) > 1.3*float64(use) {
		t.Errorf("grant %s for a use of %s: want use <= grant <= 1.3 x use", mib(g.Grant.Mem), mib(use))
	}
	waitFor(t, 30*time.Second, "the ramp to free its memory", func() bool {
		return strings.Contains(c.shim("logs", id).stdout, "freed")
	}, 200*time.Millisecond)
	freed := time.Now()
	waitFor(t, 30*time.Second, "the grant back below 128 MiB", func() bool {
		return c.growGet(id).Grant.Mem < 128<<20
	}, 250*time.Millisecond, func() string { return mib(c.growGet(id).Grant.Mem) })
	t.Logf("grant below 128 MiB %.1f s after the free", time.Since(freed).Seconds())
	if g := c.growGet(id); g.PID != p.PID || w.ooms != 0 {
		t.Fatalf("after the shrink: %+v, %d OOM kills", g, w.ooms)
	}
}

// TestGrowCPURamp: a CPU-bound elastic process at 0.1 core has its quota
// at 1.2 cores or more within 3 s.
func TestGrowCPURamp(t *testing.T) {
	c := startGrowNodes(t, 1)
	id := c.spawn("--grow", "--cpu", "0.1:1.5", "--", "/bin/sh", "-c", "(while :; do :; done) & while :; do :; done")
	p := c.waitRunning(id)
	dir := filepath.Join("/sys/fs/cgroup/cpu", cgroupOf(t, p.PID, "cpu"))
	quota := func() float64 {
		q, _ := strconv.ParseInt(readInt(t, filepath.Join(dir, "cpu.cfs_quota_us")), 10, 64)
		per, _ := strconv.ParseInt(readInt(t, filepath.Join(dir, "cpu.cfs_period_us")), 10, 64)
		return float64(q) / float64(per)
	}
	start := time.Now()
	if q := quota(); q > 0.2 {
		t.Fatalf("started with a quota of %.2f cores, want its grant's 0.1", q)
	}
	idle := hostIdleCores(t)
	stat := filepath.Join(dir, "cpu.stat")
	periods, throttled := readKeyed(t, stat, "nr_periods"), readKeyed(t, stat, "nr_throttled")
	for quota() < 1.2 && time.Since(start) < 3*time.Second {
		time.Sleep(20 * time.Millisecond)
	}
	if q := quota(); q < 1.2 {
		// A quota that did not bind (the host's cores were taken by
		// other load) is no reason to grow: only fail if it did.
		dp, dt := readKeyed(t, stat, "nr_periods")-periods, readKeyed(t, stat, "nr_throttled")-throttled
		spare := idle()
		if float64(dt) < 0.5*float64(dp) || spare < 0.5 {
			t.Skipf("quota %.2f cores after 3 s, throttled in %d of %d periods, host idle %.2f cores: the host had no CPU to give",
				q, dt, dp, spare)
		}
		t.Fatalf("quota %.2f cores after 3 s, although throttled in %d of %d periods and %.2f cores idle", q, dt, dp, spare)
	}
	t.Logf("quota %.2f cores %d ms after the start", quota(), time.Since(start).Milliseconds())
	if g := c.growGet(id); g.PID != p.PID || g.Grant.CPU < 1.2 {
		t.Fatalf("after the ramp: %+v", g)
	}
}

// TestGrowMakesRoom: on a full node, a pinned grower ramping to 700 MiB
// moves movable fillers to the other node make-before-break: it is never
// OOM-killed and keeps its PID; at least three fillers move, each new copy
// running before its old one stops; nothing that did not move is killed.
func TestGrowMakesRoom(t *testing.T) {
	node := []string{"--mem", "1G", "--reserve-mem", "0"}
	c := startGrowNodes(t, 1, node)
	n1 := c.nodes[0].name
	var fillers []string
	for range 5 {
		fillers = append(fillers, c.spawn("--mem", "128M:128M", "--", "/bin/sleep", "100000"))
	}
	grower := c.spawn(append([]string{"--grow", "--restart", "never", "--node", n1, "--mem", "64M:900M"},
		ramp(8, 700, 100000)...)...)
	old := map[string]int{}
	for _, f := range fillers {
		old[f] = c.waitRunning(f).PID
	}
	gp := c.waitRunning(grower)
	w := watchMem(t, gp.PID)
	defer w.end()
	d2 := c.addNode(node...)
	c.waitNodesUp(2, 20*time.Second)

	// Watch the fillers: when a new copy first shows running on n2, its
	// old copy must still be alive.
	moved := map[string]bool{}
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		for _, p := range c.growPS() {
			if !slices.Contains(fillers, p.ID) || moved[p.ID] {
				continue
			}
			if p.Node == d2.name && p.State == "running" && p.Incarnation == 2 {
				moved[p.ID] = true
				if !alive(old[p.ID]) {
					t.Errorf("%s: its old copy (pid %d) was gone when the new one was seen running", p.ID, old[p.ID])
				}
			}
		}
		if strings.Contains(c.shim("logs", grower).stdout, "held") {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(2 * time.Second) // the last growth settles
	g := c.growGet(grower)
	t.Logf("grower: grant %s, use %s, %q; %d fillers moved; limits %d values, last %s", mib(g.Grant.Mem),
		mib(memUse(t, gp.PID)), g.WantReason, len(moved), len(w.limits), mib(int64(w.limits[len(w.limits)-1])))
	if g.PID != gp.PID || g.State != "running" || g.Restarts != 0 || w.ooms != 0 {
		t.Fatalf("the grower did not survive as it was: %+v (pid was %d), %d OOM kills", g, gp.PID, w.ooms)
	}
	if len(moved) < 3 {
		t.Fatalf("%d fillers moved, want at least 3", len(moved))
	}
	for _, f := range fillers {
		p := c.growGet(f)
		switch {
		case moved[f]:
			if p.Incarnation != 2 || p.Node != d2.name || p.State != "running" {
				t.Errorf("moved filler %s: %+v", f, p)
			}
			waitFor(t, 10*time.Second, f+"'s old copy to stop", func() bool { return !alive(old[f]) })
		case p.Incarnation != 1 || p.PID != old[f] || p.State != "running" || !alive(old[f]):
			t.Errorf("filler %s did not move but changed: %+v (pid was %d)", f, p, old[f])
		}
	}
	// Every move to make room is an event with its reason.
	t.Logf("growth events:\n%s", c.must("events", "--type", "process.grown", "--type", "process.waiting",
		"--type", "process.room", "--type", "process.moved"))
	var room int
	for _, l := range strings.Split(c.must("events", "--type", "process.room"), "\n") {
		if strings.Contains(l, "to make room for "+grower) {
			room++
		}
	}
	if room < len(moved) {
		t.Errorf("%d room events for %d moves", room, len(moved))
	}
}

// TestPlacementCountsGrants: 30 processes of --cpu 0.01:0.5 on three 2-core
// nodes all run: CPU maxima (15 cores of them) do not decide placement.
func TestPlacementCountsGrants(t *testing.T) {
	c := startGrowNodes(t, 3, []string{"--cpu", "2"})
	out := c.must("spawn", "--count", "30", "--cpu", "0.01:0.5", "--", "/bin/sleep", "100000")
	if n := len(strings.Fields(out)); n != 30 {
		t.Fatalf("spawned %d, want 30:\n%s", n, out)
	}
	waitFor(t, 60*time.Second, "30 processes running", func() bool {
		n := 0
		for _, p := range c.growPS() {
			if p.State == "running" {
				n++
			}
		}
		return n == 30
	}, 250*time.Millisecond)
}

// event is one line of `shim events -o json`.
type event struct {
	Index  uint64 `json:"index"`
	Type   string `json:"type"`
	ID     string `json:"id"`
	Node   string `json:"node"`
	Reason string `json:"reason"`
}

func (c *cluster) events(args ...string) []event {
	c.t.Helper()
	out := c.must(append([]string{"events", "-o", "json"}, args...)...)
	var evs []event
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if l == "" {
			continue
		}
		var e event
		if err := json.Unmarshal([]byte(l), &e); err != nil {
			c.t.Fatalf("events: %v: %q", err, l)
		}
		evs = append(evs, e)
	}
	return evs
}

// TestEvents: a spawn, a kill and a node's death give the expected events
// in order, and the stream resumes from an index.
func TestEvents(t *testing.T) {
	c := startGrowNodes(t, 3)
	n1, n2, n3 := c.nodes[0].name, c.nodes[1].name, c.nodes[2].name
	// a goes to n3: the others are drained meanwhile.
	c.must("drain", n1)
	c.must("drain", n2)
	a := c.spawn("--", "/bin/sleep", "100000")
	c.waitRunning(a)
	c.must("undrain", n1)
	c.must("undrain", n2)
	b := c.spawn("--node", n1, "--", "/bin/sleep", "100000")
	c.waitRunning(b)
	c.must("kill", b)
	c.waitProc(b, "killed", 20*time.Second, func(p proc) bool { return p.State == "killed" })
	// n3 dies as a host does: shimd and its guard at once.
	c.stop(c.nodes[2], syscall.SIGKILL)
	killGuard(c.nodes[2])
	moved := c.waitProc(a, "moved", 20*time.Second, func(p proc) bool { return p.Node != n3 && p.State == "running" })

	evs := c.events()
	seq := func(pick func(event) bool) []string {
		var out []string
		for _, e := range evs {
			if pick(e) {
				out = append(out, e.Type+"@"+e.Node)
			}
		}
		return out
	}
	for _, want := range []struct {
		what string
		pick func(event) bool
		seq  []string
	}{
		{"a", func(e event) bool { return e.ID == a }, []string{"process.placed@" + n3, "process.running@" + n3,
			"process.moved@" + moved.Node, "process.running@" + moved.Node}},
		{"b", func(e event) bool { return e.ID == b }, []string{"process.placed@" + n1, "process.running@" + n1,
			"process.stopping@" + n1, "process.killed@" + n1}},
		{"the nodes", func(e event) bool {
			return strings.HasPrefix(e.Type, "node.") && e.Type != "node.joined" && e.Type != "node.up"
		},
			[]string{"node.drained@" + n1, "node.drained@" + n2, "node.undrained@" + n1, "node.undrained@" + n2, "node.down@" + n3}},
	} {
		if got := want.pick; !slices.Equal(seq(got), want.seq) {
			t.Errorf("events of %s: %v, want %v", want.what, seq(got), want.seq)
		}
	}
	// Resumable: after node.down's index, only what followed it.
	var down uint64
	for _, e := range evs {
		if e.Type == "node.down" && e.Node == n3 {
			down = e.Index
		}
	}
	after := c.events("--since", strconv.FormatUint(down, 10))
	if len(after) == 0 {
		t.Fatal("nothing after node.down")
	}
	for _, e := range after {
		if e.Index <= down {
			t.Fatalf("--since %d gave %+v", down, e)
		}
	}
	if after[0].ID != a || after[0].Type != "process.running" {
		t.Errorf("first event after node.down's index: %+v, want a running again", after[0])
	}
	// By type.
	for _, e := range c.events("--type", "node.") {
		if !strings.HasPrefix(e.Type, "node.") {
			t.Fatalf("--type node. gave %+v", e)
		}
	}
}

// TestGrowSelfRequest: a workload grows its own grant with its self token
// ($SHIM_TOKEN, through $SHIM_ADDR with $SHIM_CA: examples/grow-self.sh,
// before a 600 MiB allocation), and the same token can neither grow nor
// resize a neighbour.
func TestGrowSelfRequest(t *testing.T) {
	c := startGrowNodes(t, 1)
	neighbour := c.spawn("--grow", "--mem", "32M:256M", "--", "/bin/sleep", "100000")
	example, err := os.ReadFile("../../examples/grow-self.sh")
	if err != nil {
		t.Fatal(err)
	}
	probe := `[ -n "$SHIM_TOKEN" ] && [ -n "$SHIM_ADDR" ] && [ -r "$SHIM_CA" ] || { echo "no self token"; exec sleep 100000; }
code() { curl -s -o /dev/null -w '%{http_code}' --cacert "$SHIM_CA" -H "Authorization: Bearer $SHIM_TOKEN" \
  -H 'Content-Type: application/json' -d "$2" "https://$SHIM_ADDR/shim.v1.ShimService/$1"; }
echo "neighbour-grant $(code SetGrant "{\"id\":\"$NEIGHBOUR\",\"grant\":{\"memBytes\":\"134217728\"}}")"
echo "neighbour-resize $(code Resize "{\"id\":\"$NEIGHBOUR\",\"resources\":{\"memMaxBytes\":\"268435456\"}}")"
`
	id := c.spawn("--grow", "--restart", "never", "--mem", "64M:1G", "--env", "NEIGHBOUR="+neighbour, "--",
		"/bin/sh", "-c", probe+string(example))
	p := c.waitRunning(id)
	var log string
	waitFor(t, 30*time.Second, "the workload to load its index", func() bool {
		log = c.shim("logs", id).stdout
		return strings.Contains(log, "loaded") || strings.Contains(log, "no self token")
	}, 200*time.Millisecond, func() string { return log })
	if strings.Contains(log, "no self token") {
		t.Fatalf("the workload has no $SHIM_TOKEN, $SHIM_ADDR or readable $SHIM_CA:\n%s", log)
	}
	for _, want := range []string{"neighbour-grant 403", "neighbour-resize 403"} {
		if !strings.Contains(log, want) {
			t.Errorf("the self token reached a neighbour: want %q in\n%s", want, log)
		}
	}
	g := c.growGet(id)
	if g.PID != p.PID || g.State != "running" || g.Grant.Mem < 600<<20 {
		t.Errorf("after its own request: %+v", g)
	}
	if n := c.growGet(neighbour); n.Grant.Mem != 32<<20 {
		t.Errorf("the neighbour's grant changed: %+v", n)
	}
	// The grant came from its own request, not only from its node's loop.
	var self bool
	for _, e := range c.events("--type", "process.grown") {
		self = self || (e.ID == id && strings.Contains(e.Reason, "640M") && strings.Contains(e.Reason, "asked by self"))
	}
	if !self {
		t.Errorf("no process.grown event to 640M asked by the workload itself: %+v", c.events("--type", "process.grown"))
	}
}
