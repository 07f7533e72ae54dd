package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/pprof"
	"strings"
	"time"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/table"
)

// ---- row 6: table scale ----

func rowScale(e *env) []Result {
	const nodes, procs = 1000, 100000
	psRuns := pick(e, 3, 20)
	var out []Result
	// A 5 s lease: this row is about the table, row 7 about heartbeats.
	c, err := simCluster(e, "scale", nodes, e.simsPer, "--lease", "5s")
	if err != nil {
		out = append(out, failed("6a", "`shim ps -o json`, 100k processes", "ms", "≤ 1000", err))
	} else {
		out = append(out, scaleCluster(e, c, nodes, procs, psRuns)...)
	}
	c.close()
	out = append(out, scaleSnapshot(e, nodes, procs, pick(e, 3, 10))...)
	return out
}

func rowTableOnly(e *env) []Result {
	return scaleSnapshot(e, 1000, 100000, pick(e, 3, 10))
}

func scaleCluster(e *env, c *cluster, nodes, procs, psRuns int) []Result {
	const psWhat, psGoal = "`shim ps -o json`, 100k processes on 1k simulated nodes", "≤ 1000"
	// Set-up: place the processes in chunks, each once the simulated
	// nodes have reported the last one running. Flat out, the nodes' work
	// (a start, a report and a long-poll answer per process, all on these
	// two cores) starves the servers and the nodes' heartbeats in turn.
	t0 := time.Now()
	stopPerf := func() {}
	if ld, err := c.leader(context.Background()); err == nil {
		stopPerf = e.perf("row6-spawn-leader", ld.pid())
	}
	chunk := procs / 10
	var problems []string
	var placed int64
	var placing time.Duration
	var running float64
	for placed < int64(procs) && len(problems) < 5 {
		t1 := time.Now()
		lr := spawnLoad(c, 8, 1000, 2*time.Minute, int64(min(chunk, procs-int(placed))))
		placing += time.Since(t1)
		placed += lr.placed
		if lr.errors > 0 || lr.placed == 0 {
			problems = append(problems, fmt.Sprintf("%d spawn errors (first: %v)", lr.errors, lr.firstErr))
		}
		// A few processes that do not get to running (their node lost its
		// lease meanwhile, say) are described and the set-up goes on:
		// what `shim ps` costs depends on how many records there are.
		deadline := time.Now().Add(pick(e, 30*time.Second, 2*time.Minute))
		for {
			running = -1
			if ld, err := c.leader(context.Background()); err == nil {
				if m, err := e.scrape(ld); err == nil {
					running = m[`shim_processes{state="running"}`]
				}
			}
			if running >= float64(placed) {
				break
			}
			if time.Now().After(deadline) {
				problems = append(problems, fmt.Sprintf("only %.0f of %d processes running after %s (%s)", running, placed,
					time.Since(t0).Round(time.Second), notRunning(c)))
				break
			}
			time.Sleep(500 * time.Millisecond)
		}
		e.debugf("row 6: %d placed (%s placing), %.0f running after %s", placed, placing.Round(100*time.Millisecond),
			running, time.Since(t0).Round(100*time.Millisecond))
	}
	stopPerf()
	if placed != int64(procs) {
		problems = append(problems, fmt.Sprintf("only %d of %d placed", placed, procs))
	}
	live := int(placed)
	runningIn := time.Since(t0)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	ld, err := c.leader(ctx)
	cancel()
	if err != nil {
		return []Result{failed("6a", psWhat, "ms", psGoal, fmt.Errorf("finding the leader after set-up: %w", err))}
	}
	rssBefore, _ := rssKiB(ld.pid())
	var psMS []float64
	var size int
	stopPerf = e.perf("row6-ps-leader", ld.pid())
	for range psRuns {
		// The leader first: that is the server whose RSS is measured too.
		// The output is counted, not kept: collecting 80 MB in a growing
		// buffer costs this process more than a terminal, file or jq
		// would, and it showed in the time.
		var out countWriter
		d, err := c.shimCLIAt(ld.api, &out, "ps", "-o", "json")
		if err != nil {
			return []Result{failed("6a", psWhat, "ms", psGoal, err)}
		}
		size = int(out)
		psMS = append(psMS, ms(d))
	}
	stopPerf()
	// The same listing through the API alone (Go client, protobuf): the
	// server and transport part of 6a, without the CLI's JSON.
	var apiMS []float64
	for range psRuns {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		t0 := time.Now()
		_, err := c.list(ctx, &pb.ListRequest{}) // every page
		d := time.Since(t0)
		cancel()
		if err != nil {
			apiMS = nil
			break
		}
		apiMS = append(apiMS, ms(d))
	}
	var rssAll []float64
	var rssNote []string
	for _, d := range c.servers {
		r, _ := rssKiB(d.pid())
		rssAll = append(rssAll, r/1024)
		rssNote = append(rssNote, fmt.Sprintf("%s %.0f MiB", short(d), r/1024))
	}
	rssLeader, _ := rssKiB(ld.pid())
	// Raft snapshots the real cluster took on its own (hclog lines).
	snaps := raftSnapshotTimes(c)
	out := []Result{
		{Row: "6a", What: psWhat, Unit: "ms", Sample: psMS, Goal: psGoal,
			Check: func(s Stats) bool { return s.Median <= 1000 && len(problems) == 0 },
			Note: fmt.Sprintf("against the leader; servers run --lease 5s (heartbeats are row 7); %.1f MB of JSON listing %d processes; set-up: %d placed in chunks of %d (8 clients × Spawn{Count:1000}; %.1f s spent placing), all reported running after %.1f s%s",
				float64(size)/1e6, live, placed, chunk, placing.Seconds(), runningIn.Seconds(), problemNote(problems))},
		{Row: "6f", What: "…of which: API List of all 100k (Go client, protobuf, no CLI)", Unit: "ms", Sample: apiMS},
		{Row: "6b", What: "leader shimd RSS with 100k processes", Unit: "MiB", Sample: []float64{rssLeader / 1024},
			Goal: "≤ 1024", Check: func(s Stats) bool { return s.Max <= 1024 },
			Note: fmt.Sprintf("after the ps runs; before them %.0f MiB; all servers: %s", rssBefore/1024, strings.Join(rssNote, ", "))},
	}
	if len(snaps) > 0 {
		out = append(out, Result{Row: "6c", What: "Raft snapshots taken by the servers during the run (log timestamps)", Unit: "ms",
			Sample: snaps, Note: "from hashicorp/raft's 'starting snapshot' → 'snapshot complete' lines; includes table Snapshot, Persist and file sync"})
	}
	return out
}

// notRunning describes the live processes that are not running.
func notRunning(c *cluster) string {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	r, err := c.list(ctx, &pb.ListRequest{})
	if err != nil {
		return err.Error()
	}
	var rs []*pb.ProcessRecord
	for _, p := range r.Processes {
		if p.State != pb.ProcessState_PROCESS_STATE_RUNNING {
			rs = append(rs, p)
		}
	}
	return "not running: " + describe(rs)
}

func problemNote(ps []string) string {
	if len(ps) == 0 {
		return ""
	}
	return "; NOT AT FULL SCALE: " + strings.Join(ps, "; ")
}

var hclogTime = regexp.MustCompile(`^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[Z+-][0-9:]*)\s+\[INFO\]\s+raft[^:]*: (starting snapshot up to|snapshot complete up to)`)

// raftSnapshotTimes reads the servers' logs for snapshot start/end pairs.
func raftSnapshotTimes(c *cluster) []float64 {
	var out []float64
	for _, d := range c.servers {
		f, err := os.Open(filepath.Join(d.dir, "shimd.log"))
		if err != nil {
			continue
		}
		var start time.Time
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			m := hclogTime.FindStringSubmatch(sc.Text())
			if m == nil {
				continue
			}
			t, err := time.Parse("2006-01-02T15:04:05.000Z07:00", m[1])
			if err != nil {
				continue
			}
			if strings.HasPrefix(m[2], "starting") {
				start = t
			} else if !start.IsZero() {
				out = append(out, ms(t.Sub(start)))
				start = time.Time{}
			}
		}
		f.Close()
	}
	return out
}

// buildTable fills a table the way the cluster would: nodes register,
// spawns place processes, nodes report them running.
func buildTable(nodes, procs int) (*table.Table, error) {
	t, _, err := buildTableTimed(nodes, procs)
	return t, err
}

// buildPhases is how long each phase of buildTableTimed took.
type buildPhases struct{ register, place, report time.Duration }

// buildTableTimed is buildTable, timing its phases: the nodes registering,
// the spawns (Spawn{1000 ids} commands) placing, and each node's report
// that its processes run.
func buildTableTimed(nodes, procs int) (*table.Table, buildPhases, error) {
	var ph buildPhases
	t := table.New()
	var idx uint64
	now := time.Now().UnixNano()
	apply := func(cmd *pb.Command) error {
		idx++
		now += 1000
		cmd.NowUnixNano = now
		return t.ApplyCommand(idx, cmd).Err
	}
	t0 := time.Now()
	for i := range nodes {
		err := apply(&pb.Command{Op: &pb.Command_RegisterNode{RegisterNode: &pb.RegisterNode{Node: &pb.NodeRecord{
			Name: fmt.Sprintf("sim-%d", i), Role: pb.NodeRole_NODE_ROLE_WORKER, ApiAddr: "127.0.0.1:1",
			Capacity: &pb.Resources{CpuMaxMilli: 2000, MemMaxBytes: 24 << 30}, OvercommitPercent: 200}}}})
		if err != nil {
			return nil, ph, err
		}
	}
	ph.register = time.Since(t0)
	spec := sleepSpec(pb.Isolation_ISOLATION_UNSPECIFIED)
	var place time.Duration
	for left := procs; left > 0; left -= 1000 {
		ids := make([]string, min(left, 1000))
		for i := range ids {
			var b [6]byte
			_, _ = rand.Read(b[:])
			ids[i] = hex.EncodeToString(b[:])
		}
		t1 := time.Now()
		err := apply(&pb.Command{Op: &pb.Command_Spawn{Spawn: &pb.Spawn{Ids: ids, Spec: spec}}})
		place += time.Since(t1)
		if err != nil {
			return nil, ph, err
		}
	}
	ph.place = place
	t2 := time.Now()
	pid := int64(1000)
	for i := range nodes {
		name := fmt.Sprintf("sim-%d", i)
		recs, _ := t.Assignments(name)
		rep := &pb.Report{Node: name}
		for _, r := range recs {
			pid++
			rep.Updates = append(rep.Updates, &pb.StatusUpdate{Id: r.Id, Incarnation: r.Incarnation,
				State: pb.ProcessState_PROCESS_STATE_RUNNING, Pid: pid, StartTime: 1, AtUnixNano: now})
		}
		if err := apply(&pb.Command{Op: &pb.Command_Report{Report: rep}}); err != nil {
			return nil, ph, err
		}
	}
	ph.report = time.Since(t2)
	return t, ph, nil
}

// scaleSnapshot times table snapshots and restores in-process.
func scaleSnapshot(e *env, nodes, procs, reps int) []Result {
	const goal = "≤ 2000"
	build0 := time.Now()
	var bprof *os.File
	if e.profileDir != "" {
		_ = os.MkdirAll(e.profileDir, 0o755)
		bprof, _ = os.Create(filepath.Join(e.profileDir, "build.cpu.pprof"))
		if bprof != nil {
			_ = pprof.StartCPUProfile(bprof)
		}
	}
	t, err := buildTable(nodes, procs)
	if bprof != nil {
		pprof.StopCPUProfile()
		bprof.Close()
	}
	if err != nil {
		return []Result{failed("6d", "table snapshot (Snapshot + Persist + fsync)", "ms", goal, err)}
	}
	build := time.Since(build0)
	if n := t.Len(); n != procs {
		return []Result{failed("6d", "table snapshot", "ms", goal, fmt.Errorf("table holds %d processes", n))}
	}
	var prof *os.File
	if e.profileDir != "" {
		prof, _ = os.Create(filepath.Join(e.profileDir, "snapshot.cpu.pprof"))
		if prof != nil {
			_ = pprof.StartCPUProfile(prof)
		}
	}
	snapMS, restMS, size, row, err := timeSnapshots(e, t, reps)
	if prof != nil {
		pprof.StopCPUProfile()
		prof.Close()
	}
	if err != nil {
		return []Result{failed("6"+row, "table snapshot and restore", "ms", goal, err)}
	}
	var heap runtime.MemStats
	runtime.ReadMemStats(&heap)
	note := fmt.Sprintf("in-process table.Table, %d processes on %d nodes built with ApplyCommand in %.1f s; snapshot file %.1f MB; GOMAXPROCS %d",
		procs, nodes, build.Seconds(), float64(size)/1e6, runtime.GOMAXPROCS(0))
	return []Result{
		{Row: "6d", What: "table snapshot: Snapshot + Persist to a file + fsync", Unit: "ms", Sample: snapMS, Goal: goal,
			Check: func(s Stats) bool { return s.Max <= 2000 }, Note: note},
		{Row: "6e", What: "table restore from that file", Unit: "ms", Sample: restMS, Goal: goal,
			Check: func(s Stats) bool { return s.Max <= 2000 }},
	}
}

// timeSnapshots snapshots t to a file (Snapshot, Persist, fsync) and
// restores a new table from it, reps times each. On an error, row is "d"
// (snapshot) or "e" (restore).
func timeSnapshots(e *env, t *table.Table, reps int) (snapMS, restMS []float64, size int64, row string, err error) {
	dir, err := os.MkdirTemp(e.tmp, "snap")
	if err != nil {
		return nil, nil, 0, "d", err
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "state.bin")
	for range reps {
		runtime.GC()
		t0 := time.Now()
		s := t.Snapshot()
		f, err := os.Create(path)
		if err == nil {
			err = s.Persist(f)
		}
		if err == nil {
			err = f.Sync()
		}
		if err == nil {
			err = f.Close()
		}
		s.Release()
		if err != nil {
			return nil, nil, 0, "d", err
		}
		snapMS = append(snapMS, ms(time.Since(t0)))
		if fi, err := os.Stat(path); err == nil {
			size = fi.Size()
		}
		runtime.GC()
		t1 := time.Now()
		nt := table.New()
		f, err = os.Open(path)
		if err == nil {
			err = nt.Restore(f)
			f.Close()
		}
		if err != nil {
			return nil, nil, 0, "e", err
		}
		restMS = append(restMS, ms(time.Since(t1)))
		if nt.Len() != t.Len() {
			return nil, nil, 0, "e", fmt.Errorf("restored %d processes of %d", nt.Len(), t.Len())
		}
	}
	return snapMS, restMS, size, "", nil
}

// ---- row 7: heartbeats ----

func rowHeartbeats(e *env) []Result {
	nodes := pick(e, 1000, 5000)
	if e.beatNodes > 0 {
		nodes = e.beatNodes
	}
	window := pick(e, 60*time.Second, 5*time.Minute)
	if e.beatWindow > 0 {
		window = e.beatWindow
	}
	what := fmt.Sprintf("false node deaths (lease expirations), %d simulated nodes, 1 s lease, %s", nodes, window)
	const goal = "0"
	c, err := simCluster(e, "beats", nodes, e.simsPer)
	defer c.close()
	if err != nil {
		return []Result{failed("7", what, "count", goal, err)}
	}
	time.Sleep(3 * time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	ld, err := c.leader(ctx)
	cancel()
	if err != nil {
		return []Result{failed("7", what, "count", goal, err)}
	}
	stopPerf := e.perf("row7-leader", ld.pid())
	before := e.scrapeAll(c.servers...)
	cpu0 := map[*daemon]float64{}
	for _, d := range append(append([]*daemon(nil), c.servers...), c.workers...) {
		cpu0[d] = cpuSeconds(d.pid())
	}
	t0 := time.Now()
	maxDown, leaders := 0, map[string]bool{ld.name: true}
	for time.Since(t0) < window {
		time.Sleep(min(5*time.Second, window-time.Since(t0)))
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		r, err := c.nodes(ctx)
		cancel()
		if err != nil {
			continue
		}
		down := 0
		for _, n := range r.Nodes {
			if n.Node.State != pb.NodeState_NODE_STATE_UP {
				down++
			}
			if n.Leader {
				leaders[n.Node.Name] = true
			}
		}
		maxDown = max(maxDown, down)
	}
	el := time.Since(t0).Seconds()
	stopPerf()
	delta := e.scrapeAll(c.servers...).sub(before)
	exp := delta["shim_lease_expirations_total"]
	beats := delta["shim_heartbeats_total"]
	var cpu []string
	leaderCPU := 0.0
	for _, d := range c.servers {
		tag := short(d)
		used := (cpuSeconds(d.pid()) - cpu0[d]) / el
		if d == ld {
			tag += " (leader)"
			leaderCPU = used
		}
		cpu = append(cpu, fmt.Sprintf("%s %.2f", tag, used))
	}
	simCPU := 0.0
	for _, d := range c.workers {
		simCPU += (cpuSeconds(d.pid()) - cpu0[d]) / el
	}
	rss, _ := rssKiB(ld.pid())
	perBeat := func(cores float64) float64 { return cores * el / max(beats, 1) * 1e6 }
	return []Result{{Row: "7", What: what, Unit: "count", Sample: []float64{exp}, Goal: goal,
		Check: func(s Stats) bool { return s.Max == 0 },
		Note: fmt.Sprintf("shim_lease_expirations_total Δ on all servers; most nodes seen down at once %d; leaders seen %d; heartbeats granted %.0f/s (%d nodes × 5/s = %d/s expected); CPU cores: %s, simulators %.2f (%d processes); CPU per heartbeat: leader %.0f µs, simulators %.0f µs; leader RSS %.0f MiB",
			maxDown, len(leaders), beats/el, nodes, nodes*5, strings.Join(cpu, ", "), simCPU, len(c.workers),
			perBeat(leaderCPU), perBeat(simCPU), rss/1024)}}
}

// ---- row 8: agent memory ----

func rowAgentMemory(e *env) []Result {
	procs := pick(e, 300, 1000)
	c := newCluster(e, "mem")
	defer c.close()
	if err := c.startServers(1); err != nil {
		return []Result{failed("8a", "idle worker shimd RSS", "MiB", "≤ 40", err)}
	}
	w, err := c.addWorker(0)
	if err == nil {
		err = c.waitNodesUp(2, 30*time.Second)
	}
	if err != nil {
		return []Result{failed("8a", "idle worker shimd RSS", "MiB", "≤ 40", err)}
	}
	sample := func(d *daemon) []float64 {
		var xs []float64
		for range 5 {
			r, _ := rssKiB(d.pid())
			xs = append(xs, r)
			time.Sleep(500 * time.Millisecond)
		}
		return xs
	}
	time.Sleep(3 * time.Second)
	idleW := sample(w)
	idleS := sample(c.servers[0])
	m0, _ := e.scrape(w)
	spec := sleepSpec(pb.Isolation_ISOLATION_PROCESS)
	spec.Node = w.name
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	recs, err := c.spawn(ctx, spec, procs)
	cancel()
	if err == nil {
		_, err = c.waitProcs(idsOf(recs), 3*time.Minute, allRunning(procs))
	}
	if err != nil {
		return []Result{failed("8c", "shimd memory per managed process", "KiB", "≤ 100", err)}
	}
	time.Sleep(5 * time.Second) // a sampling round (2 s) and GC
	busyW := sample(w)
	m1, _ := e.scrape(w)
	per := (median(busyW) - median(idleW)) / float64(procs)
	heapPer := (m1["go_memstats_heap_inuse_bytes"] - m0["go_memstats_heap_inuse_bytes"]) / 1024 / float64(procs)
	toMiB := func(xs []float64) []float64 {
		out := make([]float64, len(xs))
		for i, x := range xs {
			out[i] = x / 1024
		}
		return out
	}
	return []Result{
		{Row: "8a", What: "idle worker shimd RSS (joined, no processes)", Unit: "MiB", Sample: toMiB(idleW), Goal: "≤ 40",
			Check: func(s Stats) bool { return s.Median <= 40 }, Note: "5 samples 0.5 s apart"},
		{Row: "8b", What: "idle single-server shimd RSS (Raft + API + agent)", Unit: "MiB", Sample: toMiB(idleS), Goal: "≤ 40",
			Check: func(s Stats) bool { return s.Median <= 40 }},
		{Row: "8c", What: fmt.Sprintf("worker shimd RSS per managed process (0 → %d /bin/sleep)", procs), Unit: "KiB",
			Sample: []float64{per}, Goal: "≤ 100", Check: func(s Stats) bool { return s.Max <= 100 },
			Note: fmt.Sprintf("RSS %.1f → %.1f MiB (medians); Go heap in use %.1f → %.1f MiB (%.1f KiB/process); goroutines %.0f → %.0f",
				median(idleW)/1024, median(busyW)/1024, m0["go_memstats_heap_inuse_bytes"]/(1<<20),
				m1["go_memstats_heap_inuse_bytes"]/(1<<20), heapPer, m0["go_goroutines"], m1["go_goroutines"])},
	}
}

// countWriter counts the bytes written to it and drops them.
type countWriter int64

func (w *countWriter) Write(p []byte) (int, error) { *w += countWriter(len(p)); return len(p), nil }
