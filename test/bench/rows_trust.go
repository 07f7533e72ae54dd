package main

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"time"
)

// ---- row 10: the cost of trust ----
//
// The same measurements with trust on (TLS 1.3 on every port, tokens, node
// certificates: how shim runs) and off (shimd's hidden --insecure, plain
// HTTP and TCP), on clusters that run side by side and are measured in
// alternation, so that the machine's load drifts over both alike. The
// goals: at most 1 ms more on the CLI's spawn p50, at most 10 % fewer
// placements a second.

func rowTrust(e *env) []Result {
	var out []Result
	n := pick(e, 60, 300)
	const warm = 3
	on, off := newCluster(e, "trust"), newInsecureCluster(e, "plain")
	defer on.close()
	defer off.close()
	for _, c := range []*cluster{on, off} {
		if err := c.startServers(3); err != nil {
			return []Result{failed("10", "the cost of trust", "ms", "", err)}
		}
	}
	type sample struct{ spawn, read []float64 }
	got := map[*cluster]*sample{on: {}, off: {}}
	var err error
	for i := range n + warm {
		for _, c := range []*cluster{on, off} {
			var buf bytes.Buffer
			var d, r time.Duration
			if d, err = c.shimCLI(&buf, "spawn", "--wait", "--", "/bin/sleep", "100000"); err != nil {
				break
			}
			if r, err = c.shimCLI(nil, "nodes"); err != nil {
				break
			}
			if id := strings.TrimSpace(buf.String()); id == "" {
				err = fmt.Errorf("spawn printed nothing")
				break
			}
			if i >= warm {
				got[c].spawn = append(got[c].spawn, ms(d))
				got[c].read = append(got[c].read, ms(r))
			}
		}
		if err != nil {
			break
		}
	}
	if err != nil {
		out = append(out, failed("10a", "CLI spawn --wait, trust on vs off", "ms", "", err))
	} else {
		added := median(got[on].spawn) - median(got[off].spawn)
		out = append(out,
			Result{Row: "10a", What: "CLI spawn --wait (process isolation), trust on", Unit: "ms", Sample: got[on].spawn,
				Note: "3 servers; TLS 1.3 (ECDSA P-256), bearer token; measured in alternation with 10b"},
			Result{Row: "10b", What: "CLI spawn --wait (process isolation), trust off (--insecure)", Unit: "ms", Sample: got[off].spawn},
			Result{Row: "10c", What: "added by trust to the CLI spawn p50 (10a − 10b)", Unit: "ms", Sample: []float64{added},
				Goal: "≤ 1", Check: func(s Stats) bool { return s.Median <= 1 }},
			Result{Row: "10d", What: "CLI `shim nodes`, trust on", Unit: "ms", Sample: got[on].read,
				Note: "one read: CLI start-up, credentials, TLS handshake, one call"},
			Result{Row: "10e", What: "CLI `shim nodes`, trust off", Unit: "ms", Sample: got[off].read,
				Note: fmt.Sprintf("added by trust to the p50: %.2f ms", median(got[on].read)-median(got[off].read))})
	}
	on.close()
	off.close()

	// Placements: the simulated cluster of row 2, 64 clients × Count:1
	// (the most requests a second, so the most TLS and token checks), on
	// and off in turn.
	nodes := pick(e, 100, 1000)
	dur := pick(e, 5*time.Second, 30*time.Second)
	rounds := pick(e, 2, 3)
	rates := map[bool][]float64{}
	perSec := map[bool][]float64{}
	cpuPer := map[bool][]float64{} // per round: servers' and simulators' CPU µs per placement
	for r := range rounds {
		for _, insecure := range []bool{false, true} {
			c := newCluster(e, "tplace")
			if insecure {
				c = newInsecureCluster(e, "pplace")
			}
			c, err := startSims(c, nodes, e.simsPer)
			if err != nil {
				c.close()
				return append(out, failed("10f", "placements/s, trust on vs off", "/s", "", err))
			}
			daemons := append(append([]*daemon(nil), c.servers...), c.workers...)
			cpu0 := map[*daemon]float64{}
			for _, d := range daemons {
				cpu0[d] = cpuSeconds(d.pid())
			}
			var stopPerf func()
			if ld, err := c.leader(context.Background()); err == nil {
				stopPerf = e.perf(fmt.Sprintf("row10-%s-r%d-leader", map[bool]string{false: "on", true: "off"}[insecure], r+1), ld.pid())
			}
			lr := spawnLoad(c, 64, 1, dur, 0)
			if stopPerf != nil {
				stopPerf()
			}
			var srvCPU, simCPU float64
			for _, d := range daemons {
				used := cpuSeconds(d.pid()) - cpu0[d]
				if d.role == "server" {
					srvCPU += used
				} else {
					simCPU += used
				}
			}
			c.close()
			if lr.placed > 0 {
				cpuPer[insecure] = append(cpuPer[insecure], 1e6*srvCPU/float64(lr.placed), 1e6*simCPU/float64(lr.placed))
			}
			if lr.firstErr != nil && lr.placed == 0 {
				return append(out, failed("10f", "placements/s, trust on vs off", "/s", "", lr.firstErr))
			}
			rates[insecure] = append(rates[insecure], float64(lr.placed)/lr.elapsed.Seconds())
			perSec[insecure] = append(perSec[insecure], lr.perSec...)
			e.debugf("row 10 placements round %d insecure=%v: %.0f/s", r+1, insecure, rates[insecure][len(rates[insecure])-1])
		}
	}
	onRate, offRate := median(rates[false]), median(rates[true])
	loss := 100 * (offRate - onRate) / offRate
	note := fmt.Sprintf("%d simulated nodes, 64 clients × Spawn{Count:1}, %d rounds of %s each, on and off in turn; overall rates on %v, off %v; CPU µs per placement (servers, simulators) per round: on %v, off %v",
		nodes, rounds, dur, roundAll(rates[false]), roundAll(rates[true]), roundAll(cpuPer[false]), roundAll(cpuPer[true]))
	out = append(out,
		Result{Row: "10f", What: "placements committed/s, trust on", Unit: "/s", Sample: perSec[false], Note: note},
		Result{Row: "10g", What: "placements committed/s, trust off", Unit: "/s", Sample: perSec[true]},
		Result{Row: "10h", What: "placements/s lost to trust (median overall rate, off → on)", Unit: "%", Sample: []float64{loss},
			Goal: "≤ 10", Check: func(s Stats) bool { return s.Median <= 10 }})
	return out
}

func roundAll(xs []float64) []float64 {
	out := make([]float64, len(xs))
	for i, x := range xs {
		out[i] = float64(int(x + 0.5))
	}
	return out
}
