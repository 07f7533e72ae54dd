package main

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"syscall"
	"time"
)

// ---- row 13: a million processes on one table ----

// rowMillion measures the table at the largest scale: 1,000,000
// processes on 10,000 nodes (-million-procs, -million-nodes to change). It
// is the in-process part, as row 6t is for row 6: table.Table driven with
// the commands a cluster would commit (10,000 RegisterNode, Spawn commands
// of 1,000 ids, one Report per node), timed per phase, then its heap, a
// snapshot to a file and a restore. It does not start 10,000 simulated
// nodes: the harness cannot yet bring up 5,000 on this machine (row 7), so
// Raft, the API and the nodes' work are not in these figures, and `shim ps`
// on this table is not measured here (row 6a measures it at 100,000).
func rowMillion(e *env) []Result {
	nodes, procs := e.millionNodes, e.millionProcs
	scale := fmt.Sprintf("%d processes on %d nodes", procs, nodes)
	runtime.GC()
	var m0 runtime.MemStats
	runtime.ReadMemStats(&m0)
	stop := e.cpuProfile("million-build")
	cpu0 := selfCPU()
	t0 := time.Now()
	t, ph, err := buildTableTimed(nodes, procs)
	build := time.Since(t0)
	buildCPU := selfCPU() - cpu0
	stop()
	if err != nil {
		return []Result{failed("13a", "placement, "+scale, "s", "≤ 60", err)}
	}
	runtime.GC()
	var m1 runtime.MemStats
	runtime.ReadMemStats(&m1)
	heapMiB := float64(m1.HeapInuse-min(m0.HeapInuse, m1.HeapInuse)) / (1 << 20)
	rss, _ := rssKiB(os.Getpid())
	reps := pick(e, 1, 3) // at this size each takes tens of seconds of CPU
	stop = e.cpuProfile("million-snapshot")
	cpu1 := selfCPU()
	snapMS, restMS, size, row, err := timeSnapshots(e, t, reps)
	snapCPU := (selfCPU() - cpu1) / time.Duration(reps)
	stop()
	if err != nil {
		return []Result{failed("13"+map[string]string{"d": "c", "e": "d"}[row], "snapshot and restore, "+scale, "ms", "≤ 10000", err)}
	}
	// On a shared machine the wall times above depend on the neighbours;
	// the CPU times less so.
	note := fmt.Sprintf("in-process table.Table (no Raft, API or nodes: see rowMillion); built in %.1f s (%.1f s of CPU): %d RegisterNode %.1f s, %d Spawn{1000 ids} %.1f s, %d Report %.1f s; snapshot file %.0f MB; a snapshot and a restore: %.1f s of CPU; GOMAXPROCS %d",
		build.Seconds(), buildCPU.Seconds(), nodes, ph.register.Seconds(), (procs+999)/1000, ph.place.Seconds(), nodes, ph.report.Seconds(),
		float64(size)/1e6, snapCPU.Seconds(), runtime.GOMAXPROCS(0))
	return []Result{
		{Row: "13a", What: "placement (Spawn apply), " + scale + ", in-process table", Unit: "s", Sample: []float64{ph.place.Seconds()},
			Goal: "≤ 60", Check: func(s Stats) bool { return s.Max <= 60 }, Note: note},
		{Row: "13b", What: "table heap after GC, " + scale, Unit: "MiB", Sample: []float64{heapMiB},
			Goal: "≤ 3072 (leader RSS)", Check: func(s Stats) bool { return s.Max <= 3072 },
			Note: fmt.Sprintf("the bench process's RSS then: %.0f MiB", rss/1024)},
		{Row: "13c", What: "table snapshot (Snapshot + Persist + fsync), " + scale, Unit: "ms", Sample: snapMS,
			Goal: "≤ 10000", Check: func(s Stats) bool { return s.Max <= 10000 }},
		{Row: "13d", What: "table restore from it, " + scale, Unit: "ms", Sample: restMS,
			Goal: "≤ 10000", Check: func(s Stats) bool { return s.Max <= 10000 }},
	}
}

// cpuProfile writes a CPU profile of this process to <-profile>/name.cpu.pprof
// until the returned function is called (nothing without -profile).
func (e *env) cpuProfile(name string) func() {
	if e.profileDir == "" {
		return func() {}
	}
	_ = os.MkdirAll(e.profileDir, 0o755)
	f, err := os.Create(filepath.Join(e.profileDir, name+".cpu.pprof"))
	if err != nil {
		return func() {}
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return func() {}
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}
}

// selfCPU is the CPU time this process has used, user and system.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
