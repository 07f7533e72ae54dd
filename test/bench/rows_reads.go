package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// ---- row 11: linearizable reads ----
//
// Reads are linearizable by default: the member asked confirms with the
// leader that its table holds every write acknowledged before the read (a
// ReadIndex: a round of Raft heartbeats on the leader, plus a call to it from
// a follower). --stale answers from the member's own copy. Both through a
// follower of a quiet 3-server cluster holding 20 processes, measured in
// alternation: `shim ps` and `shim ps ID` with the CLI, and List through the
// API (no CLI start-up, so the difference shows plainly). The goal: a
// linearizable read costs at most 1 ms more at p50 than a stale one.

func rowReads(e *env) []Result {
	n := pick(e, 150, 600)
	const warm = 5
	c := newCluster(e, "reads")
	defer c.close()
	if err := c.startServers(3); err != nil {
		return []Result{failed("11", "linearizable vs stale reads", "ms", "", err)}
	}
	ctx := context.Background()
	recs, err := c.spawn(ctx, sleepSpec(pb.Isolation_ISOLATION_PROCESS), 20)
	if err != nil {
		return []Result{failed("11", "linearizable vs stale reads", "ms", "", err)}
	}
	id := recs[0].Id
	lead, err := c.leader(ctx)
	if err != nil {
		return []Result{failed("11", "linearizable vs stale reads", "ms", "", err)}
	}
	var follower *daemon
	for _, d := range c.servers {
		if d != lead {
			follower = d
			break
		}
	}
	if _, err := c.waitProcs([]string{id}, 30*time.Second, func(rs []*pb.ProcessRecord) bool {
		return len(rs) == 1 && rs[0].State == pb.ProcessState_PROCESS_STATE_RUNNING
	}); err != nil {
		return []Result{failed("11", "linearizable vs stale reads", "ms", "", err)}
	}

	// The CLI: four commands in turn, so that load drifts over all alike.
	cmds := []struct {
		row, what string
		args      []string
	}{
		{"11a", "CLI `shim ps` through a follower, linearizable", []string{"ps"}},
		{"11b", "CLI `shim ps --stale` through a follower", []string{"--stale", "ps"}},
		{"11c", "CLI `shim ps ID` through a follower, linearizable", []string{"ps", id}},
		{"11d", "CLI `shim ps ID --stale` through a follower", []string{"--stale", "ps", id}},
	}
	got := make([][]float64, len(cmds))
	for i := range n + warm {
		for k, cm := range cmds {
			var out bytes.Buffer
			d, err := c.shimCLIAt(follower.api, &out, cm.args...)
			if err == nil && !strings.Contains(out.String(), id) {
				err = fmt.Errorf("shim %s does not list %s:\n%s", strings.Join(cm.args, " "), id, out.String())
			}
			if err != nil {
				return []Result{failed(cm.row, cm.what, "ms", "", err)}
			}
			if i >= warm {
				got[k] = append(got[k], ms(d))
			}
		}
	}
	var out []Result
	for k, cm := range cmds {
		r := Result{Row: cm.row, What: cm.what, Unit: "ms", Sample: got[k]}
		if k == 0 {
			r.Note = fmt.Sprintf("3 servers, 20 processes, --addr one follower (%s); the four CLI rows run in turn", follower.name)
		}
		out = append(out, r)
	}
	out = append(out,
		Result{Row: "11e", What: "added by linearizability to the CLI `shim ps` p50 (11a − 11b)", Unit: "ms",
			Sample: []float64{median(got[0]) - median(got[1])}, Goal: "≤ 1", Check: func(s Stats) bool { return s.Median <= 1 }},
		Result{Row: "11f", What: "added by linearizability to the CLI `shim ps ID` p50 (11c − 11d)", Unit: "ms",
			Sample: []float64{median(got[2]) - median(got[3])}, Goal: "≤ 1", Check: func(s Stats) bool { return s.Median <= 1 }})

	// The API: List through the follower, then through the leader.
	for _, at := range []struct {
		row, who string
		d        *daemon
	}{{"11g", "a follower", follower}, {"11i", "the leader", lead}} {
		api := c.api(at.d.api)
		var lin, stale []float64
		for i := range 4*n + warm {
			for _, cons := range []pb.Consistency{pb.Consistency_CONSISTENCY_LINEARIZABLE, pb.Consistency_CONSISTENCY_STALE} {
				cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				t0 := time.Now()
				resp, err := api.List(cctx, connect.NewRequest(&pb.ListRequest{Ids: []string{id}, Consistency: cons}))
				d := time.Since(t0)
				cancel()
				if err == nil && len(resp.Msg.Processes) != 1 {
					err = errors.New("List did not find the process")
				}
				if err != nil {
					return append(out, failed(at.row, "API List through "+at.who, "ms", "", err))
				}
				if i < warm {
					continue
				}
				if cons == pb.Consistency_CONSISTENCY_STALE {
					stale = append(stale, ms(d))
				} else {
					lin = append(lin, ms(d))
				}
			}
		}
		added := median(lin) - median(stale)
		out = append(out,
			Result{Row: at.row, What: "API List{ID} through " + at.who + ", linearizable", Unit: "ms", Sample: lin,
				Note: fmt.Sprintf("Go Connect client over HTTP/2 and TLS, alternating with the stale read; added at p50: %.3f ms", added)},
			Result{Row: string(at.row[:2]) + string(at.row[2]+1), What: "API List{ID} through " + at.who + ", stale", Unit: "ms", Sample: stale})
	}
	return out
}
