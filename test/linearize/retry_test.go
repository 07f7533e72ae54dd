package linearize

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/test/report"
)

// TestSpawnRetryAcrossLeaderKill runs 60 concurrent `shim spawn`s, the
// leader first in their --addr, and kills the leader (-9) while they run:
// every one must come back with an ID (the CLI retries with its request id
// on the others), and every name must have exactly one process, the one its
// spawn printed. The issue saw 200 spawns committed and 78 answered.
func TestSpawnRetryAcrossLeaderKill(t *testing.T) {
	needCluster(t)
	c := startCluster(t, 3)
	lead := c.leader()
	addrs := []string{lead.api}
	for _, d := range c.nodes {
		if d != lead {
			addrs = append(addrs, d.api)
		}
	}
	const n = 60
	type run struct {
		out, errOut string
		err         error
		took        time.Duration
	}
	runs := make([]run, n)
	var done atomic.Int32
	var wg sync.WaitGroup
	start := time.Now()
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cmd := exec.Command(filepath.Join(bin, "shim"), "--addr", strings.Join(addrs, ","), "spawn",
				"--name", fmt.Sprintf("rx-%d", i), "--restart", "always", "--", "/bin/sleep", "600")
			cmd.Env = append(cleanEnv(), "SHIM_DATA_DIR="+c.nodes[0].dir)
			var out, errb bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &errb
			t0 := time.Now()
			err := cmd.Run()
			runs[i] = run{out.String(), errb.String(), err, time.Since(t0)}
			done.Add(1)
		}()
	}
	// Kill the leader once the first spawns are through.
	waitFor(t, 20*time.Second, "a first spawn", func() bool { return done.Load() > 0 })
	c.kill9(lead)
	killedAfter := done.Load()
	t.Logf("killed leader %s -9 after %d of %d spawns returned (%s)", lead.name, killedAfter, n, time.Since(start))
	wg.Wait()
	c.start(lead)

	printed := map[string]string{}
	var slowest time.Duration
	for i, r := range runs {
		if r.err != nil {
			t.Errorf("spawn rx-%d: %v: %s", i, r.err, r.errOut)
			continue
		}
		printed[fmt.Sprintf("rx-%d", i)] = strings.TrimSpace(r.out)
		slowest = max(slowest, r.took)
	}
	var recs []*pb.ProcessRecord
	waitFor(t, 20*time.Second, "a read", func() bool {
		for _, a := range addrs[1:] {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			resp, err := c.api(a).List(ctx, connect.NewRequest(&pb.ListRequest{All: true}))
			cancel()
			if err == nil {
				recs = resp.Msg.Processes
				return true
			}
		}
		return false
	})
	by := map[string][]string{}
	for _, r := range recs {
		by[r.Spec.GetName()] = append(by[r.Spec.GetName()], r.Id)
	}
	for i := range n {
		name := fmt.Sprintf("rx-%d", i)
		got := by[name]
		if len(got) > 1 {
			t.Errorf("%s: %d processes %v", name, len(got), got)
		} else if id, ok := printed[name]; ok && (len(got) != 1 || got[0] != id) {
			t.Errorf("%s: the CLI printed %q, the table holds %v", name, id, got)
		}
	}
	summary := fmt.Sprintf("exactly-once: %d concurrent `shim spawn`, leader killed -9 after %d returned: %d answered, "+
		"%d processes, none twice (slowest %s)", n, killedAfter, len(printed), len(recs), slowest.Round(time.Millisecond))
	t.Log(summary)
	report.Keep(t, "linearizability", summary)
}

// cleanEnv is the environment without the caller's SHIM_ settings.
func cleanEnv() []string {
	var out []string
	for _, e := range os.Environ() {
		if !strings.HasPrefix(e, "SHIM_") {
			out = append(out, e)
		}
	}
	return out
}
