package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
)

func failed(row, what, unit, goal string, err error) Result {
	return Result{Row: row, What: what, Unit: unit, Goal: goal, Err: err}
}

func median(xs []float64) float64 { return summarize(xs).Median }

// ---- row 1: spawn latency ----

func rowSpawnLatency(e *env) []Result {
	n := pick(e, 100, 500)
	const warm = 3
	c := newCluster(e, "spawn")
	defer c.close()
	modes := []struct {
		row, iso, what string
		p50            float64
	}{
		{"1a", "process", "spawn --wait, --isolation process", 10},
		{"1b", "container", "spawn --wait, --isolation container", 15},
	}
	if err := c.startServers(3); err != nil {
		var out []Result
		for _, m := range modes {
			out = append(out, failed(m.row, m.what, "ms", "", err))
		}
		return out
	}
	var out []Result
	for _, m := range modes {
		if !e.part(m.row) {
			continue
		}
		goal := fmt.Sprintf("p50 ≤ %.0f, p99 ≤ 50", m.p50)
		before := e.scrapeAll(c.servers...)
		var total, toCreated, toStarted, toExit []float64
		ownRoot := 0
		var err error
		for i := range n + warm {
			var buf bytes.Buffer
			t0 := time.Now()
			var d time.Duration
			d, err = c.shimCLI(&buf, "spawn", "--wait", "--isolation", m.iso, "--", "/bin/sleep", "100000")
			t1 := time.Now()
			if err != nil {
				break
			}
			id := strings.TrimSpace(buf.String())
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			var r *pb.ListResponse
			r, err = c.list(ctx, &pb.ListRequest{Ids: []string{id}, All: true})
			cancel()
			if err != nil {
				break
			}
			if len(r.Processes) != 1 || r.Processes[0].State != pb.ProcessState_PROCESS_STATE_RUNNING {
				err = fmt.Errorf("process %s is not running after spawn --wait: %v", id, r.Processes)
				break
			}
			if i < warm {
				continue
			}
			p := r.Processes[0]
			if differentRoot(int(p.Pid)) {
				ownRoot++
			}
			created, started := time.Unix(0, p.CreatedUnixNano), time.Unix(0, p.StartedUnixNano)
			total = append(total, ms(d))
			toCreated = append(toCreated, ms(created.Sub(t0)))
			toStarted = append(toStarted, ms(started.Sub(created)))
			toExit = append(toExit, ms(t1.Sub(started)))
		}
		if err != nil {
			out = append(out, failed(m.row, m.what, "ms", goal, err))
			continue
		}
		delta := e.scrapeAll(c.servers...).sub(before)
		note := fmt.Sprintf("%d of %d processes had a root file system other than the host's. ", ownRoot, len(total))
		note += fmt.Sprintf("medians: CLI start→request received %.1f ms; commit+assignment+exec→running %.1f ms; report commit+wake-up+CLI exit %.1f ms. Node exec start: %s. Raft apply: %s",
			median(toCreated), median(toStarted), median(toExit),
			delta.histSummary("shim_process_start_seconds"), delta.histSummary("shim_raft_apply_seconds"))
		out = append(out, Result{Row: m.row, What: m.what, Unit: "ms", Sample: total, Goal: goal, Note: note,
			Check: func(s Stats) bool { return s.Median <= m.p50 && s.P99 <= 50 }})
	}
	// The same through the API (Go Connect client, Spawn{Wait: true}): the
	// server-side path without the CLI's process start-up.
	for _, m := range []struct {
		row, what string
		iso       pb.Isolation
		p50       float64
	}{
		{"1g", "API Spawn{Wait} → running, process isolation (no CLI)", pb.Isolation_ISOLATION_PROCESS, 10},
		{"1h", "API Spawn{Wait} → running, container isolation (no CLI)", pb.Isolation_ISOLATION_CONTAINER, 15},
	} {
		if !e.part(m.row) {
			continue
		}
		var xs []float64
		var err error
		cl := c.api(c.servers[0].api)
		for i := range pick(e, 50, 500) + warm {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			t0 := time.Now()
			var r *connect.Response[pb.SpawnResponse]
			r, err = cl.Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: sleepSpec(m.iso), Wait: true}))
			d := time.Since(t0)
			cancel()
			if err != nil {
				break
			}
			if len(r.Msg.Processes) != 1 || r.Msg.Processes[0].State != pb.ProcessState_PROCESS_STATE_RUNNING {
				err = fmt.Errorf("spawn returned %v", r.Msg.Processes)
				break
			}
			if i >= warm {
				xs = append(xs, ms(d))
			}
		}
		goal := fmt.Sprintf("(CLI goal: p50 ≤ %.0f, p99 ≤ 50)", m.p50)
		if err != nil {
			out = append(out, failed(m.row, m.what, "ms", goal, err))
			continue
		}
		out = append(out, Result{Row: m.row, What: m.what, Unit: "ms", Sample: xs, Goal: goal,
			Note: "sent to the first server (the bootstrap server, normally the leader)"})
	}
	// Baseline: the CLI alone (a read), to separate process start-up of the
	// CLI from the spawn path.
	if e.part("1c") {
		var ps []float64
		for range 20 {
			d, err := c.shimCLI(nil, "nodes")
			if err == nil {
				ps = append(ps, ms(d))
			}
		}
		out = append(out, Result{Row: "1c", What: "baseline: `shim nodes` (CLI start-up + one read)", Unit: "ms", Sample: ps})
	}
	if e.part("1d") || e.part("1e") || e.part("1f") {
		out = append(out, execBaselines(e)...)
	}
	return out
}

// execBaselines times fork+exec+exit of /bin/true, a hello-world Go binary
// and `shim --help`: the floor under any CLI-driven latency on this machine.
func execBaselines(e *env) []Result {
	hello := filepath.Join(e.tmp, "hello")
	_ = os.MkdirAll(hello, 0o755)
	_ = os.WriteFile(filepath.Join(hello, "go.mod"), []byte("module hello\n\ngo 1.26\n"), 0o644)
	_ = os.WriteFile(filepath.Join(hello, "main.go"), []byte("package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(\"hi\") }\n"), 0o644)
	build := exec.Command("go", "build", "-o", "hello", ".")
	build.Dir = hello
	build.Env = append(os.Environ(), "GOWORK=off")
	helloErr := build.Run()
	run := func(argv ...string) ([]float64, error) {
		var xs []float64
		for range 30 {
			cmd := exec.Command(argv[0], argv[1:]...)
			t0 := time.Now()
			if err := cmd.Run(); err != nil {
				return nil, err
			}
			xs = append(xs, ms(time.Since(t0)))
		}
		return xs, nil
	}
	var out []Result
	for _, b := range []struct {
		row, what string
		argv      []string
	}{
		{"1d", "baseline: fork+exec+exit of /bin/true", []string{"/bin/true"}},
		{"1e", "baseline: fork+exec+exit of a hello-world Go binary", []string{filepath.Join(hello, "hello")}},
		{"1f", "baseline: `shim --help` (CLI start-up, no network)", []string{filepath.Join(e.bin, "shim"), "--help"}},
	} {
		if b.row == "1e" && helloErr != nil {
			out = append(out, failed(b.row, b.what, "ms", "", helloErr))
			continue
		}
		xs, err := run(b.argv...)
		if err != nil {
			out = append(out, failed(b.row, b.what, "ms", "", err))
			continue
		}
		out = append(out, Result{Row: b.row, What: b.what, Unit: "ms", Sample: xs})
	}
	return out
}

// ---- row 5: leader death ----

func rowLeaderDeath(e *env) []Result {
	rounds := pick(e, 5, 20)
	const what, goal = "kill -9 leader → first write accepted", "≤ 2000"
	c := newCluster(e, "leader")
	defer c.close()
	if err := c.startServers(3); err != nil {
		return []Result{failed("5", what, "ms", goal, err)}
	}
	var accept, elect []float64
	for i := range rounds {
		if err := c.waitNodesUp(3, 30*time.Second); err != nil {
			return []Result{failed("5", what, "ms", goal, err)}
		}
		time.Sleep(1500 * time.Millisecond) // every node holds a fresh lease
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		ld, err := c.leader(ctx)
		cancel()
		if err != nil {
			return []Result{failed("5", what, "ms", goal, err)}
		}
		var survivors []*daemon
		for _, d := range c.servers {
			if d != ld {
				survivors = append(survivors, d)
			}
		}
		t0 := time.Now()
		c.kill9(ld)
		// Watch for a new leader as the survivors see it.
		var electedAt time.Time
		var wg sync.WaitGroup
		wctx, wcancel := context.WithTimeout(context.Background(), 20*time.Second)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for wctx.Err() == nil {
				for _, s := range survivors {
					cctx, cancel := context.WithTimeout(wctx, 200*time.Millisecond)
					r, err := c.api(s.api).Nodes(cctx, connect.NewRequest(&pb.NodesRequest{}))
					cancel()
					if err != nil {
						continue
					}
					for _, n := range r.Msg.Nodes {
						if n.Leader && n.Node.Name != ld.name {
							electedAt = time.Now()
							return
						}
					}
				}
				time.Sleep(5 * time.Millisecond)
			}
		}()
		// Write until one is accepted: spawn a process that exits at once.
		spec := &pb.ProcessSpec{Command: []string{"/bin/true"}, Restart: pb.RestartPolicy_RESTART_POLICY_NEVER,
			Isolation: pb.Isolation_ISOLATION_PROCESS}
		var acceptedAt time.Time
		for j := 0; acceptedAt.IsZero() && time.Since(t0) < 20*time.Second; j++ {
			s := survivors[j%len(survivors)]
			cctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			_, err := c.api(s.api).Spawn(cctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec}))
			cancel()
			if err == nil {
				acceptedAt = time.Now()
				break
			}
			e.debugf("write %d: %v", j, err)
			time.Sleep(2 * time.Millisecond)
		}
		wg.Wait()
		wcancel()
		if acceptedAt.IsZero() {
			return []Result{failed("5", what, "ms", goal, errors.New("no write accepted within 20 s of the leader's death"))}
		}
		accept = append(accept, ms(acceptedAt.Sub(t0)))
		if !electedAt.IsZero() {
			elect = append(elect, ms(electedAt.Sub(t0)))
		}
		e.debugf("round %d: leader %s killed; new leader after %v, write accepted after %v", i, ld.name,
			electedAt.Sub(t0), acceptedAt.Sub(t0))
		if err := c.restart(ld); err != nil {
			return []Result{failed("5", what, "ms", goal, err)}
		}
	}
	return []Result{
		{Row: "5", What: what, Unit: "ms", Sample: accept, Goal: goal, Check: func(s Stats) bool { return s.Max <= 2000 },
			Note: fmt.Sprintf("3 servers, default timings; writes are spawns sent to the survivors in turn (3 s timeout each). %d rounds, the killed server restarted between rounds", rounds)},
		{Row: "5b", What: "kill -9 leader → a survivor reports a new leader", Unit: "ms", Sample: elect,
			Note: "polling Nodes on the survivors every 5 ms"},
	}
}

// ---- row 9: resize ----

func rowResize(e *env) []Result {
	n := pick(e, 50, 200)
	const what, goal = "`shim resize --mem` → memory limit file changed", "≤ 50"
	c := newCluster(e, "resize")
	defer c.close()
	if err := c.startServers(3); err != nil {
		return []Result{failed("9", what, "ms", goal, err)}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	spec := sleepSpec(pb.Isolation_ISOLATION_PROCESS)
	spec.Resources = &pb.Resources{MemMinBytes: 16 << 20, MemMaxBytes: 128 << 20}
	recs, err := c.spawn(ctx, spec, 1)
	if err != nil {
		return []Result{failed("9", what, "ms", goal, err)}
	}
	recs, err = c.waitProcs(idsOf(recs), 30*time.Second, allRunning(1))
	if err != nil {
		return []Result{failed("9", what, "ms", goal, err)}
	}
	id, pid := recs[0].Id, int(recs[0].Pid)
	file, err := memLimitFile(pid)
	if err != nil {
		return []Result{failed("9", what, "ms", goal, err)}
	}
	var lat, cli []float64
	for i := range n + 2 {
		v := int64(129+i) << 20
		want := strconv.FormatInt(v, 10)
		changed := make(chan time.Time, 1)
		stop := make(chan struct{})
		go func() {
			for {
				b, err := os.ReadFile(file)
				if err == nil && strings.TrimSpace(string(b)) == want {
					changed <- time.Now()
					return
				}
				select {
				case <-stop:
					return
				case <-time.After(200 * time.Microsecond):
				}
			}
		}()
		t0 := time.Now()
		d, err := c.shimCLI(nil, "resize", id, "--mem", fmt.Sprintf("16M:%dM", 129+i))
		if err != nil {
			close(stop)
			return []Result{failed("9", what, "ms", goal, err)}
		}
		var at time.Time
		select {
		case at = <-changed:
		case <-time.After(10 * time.Second):
			close(stop)
			return []Result{failed("9", what, "ms", goal, fmt.Errorf("%s did not become %s", file, want))}
		}
		if i < 2 {
			continue
		}
		lat = append(lat, ms(at.Sub(t0)))
		cli = append(cli, ms(d))
	}
	return []Result{
		{Row: "9", What: what, Unit: "ms", Sample: lat, Goal: goal, Check: func(s Stats) bool { return s.P99 <= 50 },
			Note: fmt.Sprintf("3 servers; file %s polled every 0.2 ms; goal read as p99", cgroupFileKind())},
		{Row: "9b", What: "`shim resize` CLI wall time", Unit: "ms", Sample: cli},
	}
}

// differentRoot reports whether pid's root directory is not the host's.
func differentRoot(pid int) bool {
	var a, b syscall.Stat_t
	if syscall.Stat("/", &a) != nil || syscall.Stat(fmt.Sprintf("/proc/%d/root/", pid), &b) != nil {
		return false
	}
	return a.Dev != b.Dev || a.Ino != b.Ino
}

func cgroupFileKind() string {
	if cgroupMode() == "v2" {
		return "memory.max"
	}
	return "memory.limit_in_bytes"
}
