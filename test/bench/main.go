// Command bench measures shim against the figures in BENCHMARKS.md. It builds
// shimd and shim, starts real clusters on loopback (real Raft on disk, real
// cgroups and processes; workers may be simulated where the row says so),
// measures each row and prints a table of median, p99 and max.
//
//	go run -tags seccomp ./test/bench            # quick: every row, < 5 min
//	go run -tags seccomp ./test/bench -full      # longer runs, more rounds
//	go run -tags seccomp ./test/bench -only 4    # one row (or a list: 1,4,9)
//
// It needs root (cgroups, namespaces) and only uses 127.0.0.1.
package main

import (
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

type row struct {
	id, title string
	run       func(e *env) []Result
}

var rows = []row{
	{"1", "spawn latency (CLI to running, 3 servers)", rowSpawnLatency},
	{"2", "placement throughput (simulated workers)", rowPlacement},
	{"3", "process starts on one node", rowStarts},
	{"4", "node death to processes running elsewhere", rowNodeDeath},
	{"5", "leader death to writes accepted", rowLeaderDeath},
	{"6", "table scale: 100k processes on 1k nodes", rowScale},
	{"6t", "table snapshot and restore only (in-process part of row 6)", rowTableOnly},
	{"7", "heartbeats without false deaths", rowHeartbeats},
	{"8", "agent memory overhead", rowAgentMemory},
	{"9", "resize: CLI to cgroup file", rowResize},
	{"10", "the cost of trust: TLS and tokens on vs off", rowTrust},
	{"11", "linearizable vs stale reads through a follower", rowReads},
	{"12a", "growth with room on the node", rowGrowSameNode}, // rows_grow.go
	{"12b", "growth when others must move", rowGrowMove},
	{"12c", "slack over a varying load", rowGrowSlack},
	{"12d", "OOM kills during a 100 MiB/s ramp", rowGrowOOM},
	{"14", "bounded history: 100k short-lived processes", rowSoak}, // rows_soak.go
}

func main() {
	quick := flag.Bool("quick", true, "short runs (the default; the whole run takes < 5 min)")
	full := flag.Bool("full", false, "long runs: more samples, more nodes, longer windows")
	only := flag.String("only", "", "run only these rows, comma-separated (e.g. 4 or 1,9)")
	keep := flag.Bool("keep", false, "keep data dirs and logs (printed at the end)")
	verbose := flag.Bool("v", false, "verbose progress")
	out := flag.String("o", "", "also write the report (Markdown) to this file")
	perfDir := flag.String("perf", "", "record `perf` profiles of the leader shimd during load phases (rows 2, 6, 7) into this directory")
	simsPer := flag.Int("sims-per-process", 250, "simulated workers per `shimd --simulate` process")
	simNice := flag.Int("sim-nice", 10, "run simulator processes under `nice -n N` (0: not niced); they stand in for other machines")
	beatNodes := flag.Int("beat-nodes", 0, "row 7: this many simulated nodes instead of 1000 (-quick) or 5000 (-full)")
	beatWindow := flag.Duration("beat-window", 0, "row 7: watch for this long instead of 1m (-quick) or 5m (-full)")
	srcDir := flag.String("src", "", "build shimd and shim from this source tree (e.g. a patched copy) instead of the working tree")
	rev := flag.String("rev", "", "build shimd and shim from this git revision (git archive) instead of the working tree")
	profile := flag.String("profile", "", "write CPU profiles of the in-process measurements to this directory")
	flag.Parse()
	_ = quick
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "bench: needs root (cgroups and namespaces)")
		os.Exit(2)
	}
	want := map[string]bool{}
	for _, r := range strings.Split(*only, ",") {
		if r = strings.TrimSpace(r); r != "" {
			want[r] = true
		}
	}
	for id := range want {
		found := false
		for _, r := range rows {
			found = found || r.id == id
		}
		if !found {
			fmt.Fprintf(os.Stderr, "bench: -only %s: no such row (1-%d)\n", id, len(rows))
			os.Exit(2)
		}
	}

	root, err := repoRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
	tmp, err := os.MkdirTemp("", "shim-bench-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
	var id [2]byte
	_, _ = rand.Read(id[:])
	e := &env{bin: filepath.Join(tmp, "bin"), tmp: tmp, runID: hex.EncodeToString(id[:]), full: *full,
		keep: *keep, verbose: *verbose, profileDir: *profile, perfDir: *perfDir, simsPer: max(*simsPer, 1),
		beatNodes: *beatNodes, beatWindow: *beatWindow, simNice: *simNice,
		httpc: &http.Client{Transport: &http.Transport{MaxIdleConns: 1024, MaxIdleConnsPerHost: 512,
			IdleConnTimeout: 90 * time.Second}}}
	src := root
	if *srcDir != "" {
		src = *srcDir
	} else if *rev != "" {
		if src, err = exportRev(root, *rev, filepath.Join(tmp, "src")); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
	}
	facts := machineFacts(root, *rev)
	if *srcDir != "" {
		facts[0] = "source: " + *srcDir + " (not the repository)"
	}
	facts = append(facts, "mode: "+map[bool]string{false: "-quick", true: "-full"}[*full])
	loadBefore, psiBefore, cpuBefore := loadavg(), cpuPressure(), cpuTimes()
	facts = append(facts, fsyncFact(tmp), createFact(tmp))
	start := time.Now()
	e.logf("building shimd and shim")
	if err := buildBinaries(src, e.bin); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
	var results []Result
	for _, r := range rows {
		if (len(want) > 0 && !want[r.id]) || (len(want) == 0 && r.id == "6t") {
			continue
		}
		e.logf("row %s: %s (load %s)", r.id, r.title, loadavg())
		t0 := time.Now()
		res := r.run(e)
		for _, x := range res {
			if x.Err != nil {
				e.logf("row %s: %s: %v", x.Row, x.What, x.Err)
			}
		}
		results = append(results, res...)
		e.logf("row %s done in %s", r.id, time.Since(t0).Round(100*time.Millisecond))
	}
	var b strings.Builder
	fmt.Fprintln(&b, "## shim benchmarks")
	fmt.Fprintln(&b)
	for _, f := range facts {
		fmt.Fprintf(&b, "- %s\n", f)
	}
	fmt.Fprintf(&b, "- load average before: %s; after: %s\n", loadBefore, loadavg())
	fmt.Fprintf(&b, "- CPU pressure (PSI some avg60, %% of time a task waited for a CPU) before: %s; after: %s\n", psiBefore, cpuPressure())
	fmt.Fprintf(&b, "- CPU time stolen by the hypervisor during the run: %s\n", stealShare(cpuBefore, cpuTimes()))
	fmt.Fprintf(&b, "- wall time: %s\n", time.Since(start).Round(time.Second))
	fmt.Fprintln(&b)
	printTable(&b, results)
	fmt.Print(b.String())
	if *out != "" {
		if err := os.WriteFile(*out, []byte(b.String()), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
		}
	}
	if *keep {
		fmt.Fprintln(os.Stderr, "data dirs and logs kept in", tmp)
	} else {
		os.RemoveAll(tmp)
	}
}

// repoRoot finds the module root from the working directory.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && strings.Contains(string(b), "module github.com/shim-run/shim") {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("run from inside the shim repository")
		}
		dir = parent
	}
}

// cpuPressure returns the "some avg60" of /proc/pressure/cpu.
func cpuPressure() string {
	b, err := os.ReadFile("/proc/pressure/cpu")
	if err != nil {
		return "?"
	}
	for _, f := range strings.Fields(string(b)) {
		if v, ok := strings.CutPrefix(f, "avg60="); ok {
			return v + "%"
		}
	}
	return "?"
}

// fsyncFact measures this disk's write+fdatasync latency in dir, the floor
// of every Raft commit.
func fsyncFact(dir string) string {
	f, err := os.CreateTemp(dir, "fsync")
	if err != nil {
		return "fsync: ?"
	}
	defer os.Remove(f.Name())
	defer f.Close()
	buf := make([]byte, 4096)
	var ds []float64
	for i := range 200 {
		t0 := time.Now()
		if _, err := f.WriteAt(buf, int64(i)*4096); err != nil {
			return "fsync: ?"
		}
		if err := syscall.Fdatasync(int(f.Fd())); err != nil {
			return "fsync: ?"
		}
		ds = append(ds, ms(time.Since(t0)))
	}
	s := summarize(ds)
	return fmt.Sprintf("disk (temp dir): 4 KiB write + fdatasync median %.2f ms, p99 %.2f ms (n=200)", s.Median, s.P99)
}

// createFact measures creating (and closing) an empty file in dir, which
// every process start does for its log. On ext4 without a journal it can
// cost a hundred times what it does elsewhere: allocating an inode scans
// past every inode freed in the last 12 hours (recently_deleted).
func createFact(dir string) string {
	sub, err := os.MkdirTemp(dir, "create")
	if err != nil {
		return "file create: ?"
	}
	defer os.RemoveAll(sub)
	var ds []float64
	for i := range 200 {
		t0 := time.Now()
		f, err := os.OpenFile(filepath.Join(sub, strconv.Itoa(i)), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return "file create: ?"
		}
		f.Close()
		ds = append(ds, ms(time.Since(t0))*1000)
	}
	s := summarize(ds)
	return fmt.Sprintf("file create (temp dir, where the data dirs are): median %.0f µs, p99 %.0f µs (n=200)", s.Median, s.P99)
}

// cpuTimes returns the "cpu" line of /proc/stat: user nice system idle
// iowait irq softirq steal ..., in clock ticks.
func cpuTimes() []uint64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return nil
	}
	line, _, _ := strings.Cut(string(b), "\n")
	var out []uint64
	for _, f := range strings.Fields(line)[1:] {
		v, _ := strconv.ParseUint(f, 10, 64)
		out = append(out, v)
	}
	return out
}

// stealShare is the share of CPU time between two cpuTimes readings that
// the hypervisor gave to other guests: time this machine's figures lost.
func stealShare(before, after []uint64) string {
	if len(before) < 8 || len(after) < 8 {
		return "?"
	}
	var total uint64
	for i := range 8 {
		total += after[i] - before[i]
	}
	if total == 0 {
		return "?"
	}
	return fmt.Sprintf("%.1f%%", 100*float64(after[7]-before[7])/float64(total))
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// exportRev writes the tree of a git revision to dir.
func exportRev(root, rev, dir string) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	cmd := exec.Command("sh", "-c", `git -C "$1" archive "$2" | tar -x -C "$3"`, "sh", root, rev, dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("git archive %s: %v: %s", rev, err, out)
	}
	return dir, nil
}

func machineFacts(root, rev string) []string {
	commit := "unknown"
	which := rev
	if which == "" {
		which = "HEAD"
	}
	if out, err := exec.Command("git", "-C", root, "rev-parse", "--short", which).Output(); err == nil {
		commit = strings.TrimSpace(string(out))
		if rev != "" {
			commit += " (built from git archive " + rev + ")"
		} else if st, err := exec.Command("git", "-C", root, "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(strings.TrimSpace(string(st))) > 0 {
			commit += " (working tree with uncommitted changes)"
		}
	}
	kernel := "?"
	if out, err := exec.Command("uname", "-r").Output(); err == nil {
		kernel = strings.TrimSpace(string(out))
	}
	mem := "?"
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if rest, ok := strings.CutPrefix(l, "MemTotal:"); ok {
				var kb float64
				fmt.Sscan(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), &kb)
				mem = fmt.Sprintf("%.1f GiB", kb/(1<<20))
			}
		}
	}
	cpu := "?"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if rest, ok := strings.CutPrefix(l, "model name"); ok {
				cpu = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(rest), ":"))
				break
			}
		}
	}
	return []string{
		"commit: " + commit,
		fmt.Sprintf("nproc: %d (%s)", runtime.NumCPU(), cpu),
		"memory: " + mem,
		"kernel: " + kernel,
		"cgroups: " + cgroupMode(),
		"go: " + runtime.Version(),
		"date: " + time.Now().UTC().Format(time.RFC3339),
	}
}
