package linearize

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/anishathalye/porcupine"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/table"
	"github.com/shim-run/shim/test/report"
)

const (
	clients     = 6
	leaderKills = 3
	keyPrefix   = "lin-"
)

// TestLinearizable runs 6 clients against random members of a real 3-server
// cluster, spawning, killing and listing processes, while the leader is
// killed (SIGKILL) and restarted three times; the history must be
// linearizable (model.go), and no spawn may have made two processes.
//
// SHIM_LINEARIZE_STALE=1 makes the clients read with consistency STALE,
// as every read was before linearizable reads: the test then fails.
func TestLinearizable(t *testing.T) {
	needCluster(t)
	c := startCluster(t, 3)
	h := NewHistory()
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	var wg sync.WaitGroup
	cls := make([]*client, clients)
	for i := range cls {
		cls[i] = &client{id: i, c: c, h: h.Fork(), rng: mrand.New(mrand.NewPCG(uint64(time.Now().UnixNano()), uint64(i))),
			spawned: map[string]string{}, stale: os.Getenv("SHIM_LINEARIZE_STALE") != ""}
		wg.Add(1)
		go func() { defer wg.Done(); cls[i].run(ctx) }()
	}
	for range leaderKills {
		time.Sleep(3 * time.Second)
		lead := c.leader()
		c.kill9(lead)
		down := time.Duration(200+mrand.IntN(600)) * time.Millisecond
		t.Logf("killed leader %s (-9); restarting it after %s", lead.name, down)
		time.Sleep(down)
		c.start(lead)
	}
	time.Sleep(3 * time.Second)
	stop()
	wg.Wait()

	spawned := map[string]string{} // key -> id, acknowledged spawns
	unknown := map[string]bool{}
	var refused, retried, failed int
	var errs []string
	for _, cl := range cls {
		h.Merge(cl.h)
		for k, id := range cl.spawned {
			spawned[k] = id
		}
		for k := range cl.unknown {
			unknown[k] = true
		}
		refused += cl.refused
		retried += cl.retried
		failed += cl.failed
		errs = append(errs, cl.errs...)
	}
	spawns, kills, reads := h.Len()
	start := time.Now()
	res := h.Check(60 * time.Second)
	verdict := map[porcupine.CheckResult]string{porcupine.Ok: "linearizable", porcupine.Illegal: "NOT linearizable",
		porcupine.Unknown: "unknown (checker timed out)"}[res]
	summary := fmt.Sprintf("linearizability: %d operations (%d spawns, %d kills, %d reads; %d spawns retried after a lost "+
		"answer, %d given up; %d reads refused as unavailable) from %d clients on 3 servers, leader killed -9 %d times: %s "+
		"(checked in %s)", spawns+kills+reads, spawns, kills, reads, retried, len(unknown), refused, clients, leaderKills,
		verdict, time.Since(start).Round(time.Millisecond))
	t.Log(summary)
	report.Keep(t, "linearizability", summary)
	if failed > 0 {
		t.Errorf("%d operations refused for reasons other than a lost answer: %s", failed, strings.Join(errs, "; "))
	}
	if res != porcupine.Ok {
		t.Fatalf("history is %s\n%s", verdict, h.Explain(10*time.Second))
	}

	// Exactly once: every acknowledged spawn made one process, the one it
	// answered with; a spawn whose answer was lost made at most one.
	var recs []*pb.ProcessRecord
	waitFor(t, 20*time.Second, "a final read", func() bool {
		for _, a := range c.addrs() {
			rctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			resp, err := c.api(a).List(rctx, connect.NewRequest(&pb.ListRequest{All: true}))
			cancel()
			if err == nil {
				recs = resp.Msg.Processes
				return true
			}
		}
		return false
	})
	byKey := map[string][]string{}
	for _, r := range recs {
		byKey[r.Spec.GetName()] = append(byKey[r.Spec.GetName()], r.Id)
	}
	for k, id := range spawned {
		if got := byKey[k]; len(got) != 1 || got[0] != id {
			t.Errorf("spawn %s answered %s; the table holds %v", k, id, got)
		}
	}
	for k := range unknown {
		if got := byKey[k]; len(got) > 1 {
			t.Errorf("spawn %s (answer lost) made %d processes: %v", k, len(got), got)
		}
	}
}

// client is one of the test's clients: it spawns, kills and lists against
// random members and records what it asked and was answered.
type client struct {
	id      int
	c       *cluster
	h       *History
	rng     *mrand.Rand
	n       int
	live    []target          // its processes spawned and not killed
	spawned map[string]string // key -> id, acknowledged
	unknown map[string]bool   // keys whose spawn's answer was lost
	refused int               // reads answered unavailable
	retried int               // spawns that made it after a lost answer
	stale   bool              // read with consistency STALE (to see the test fail)
	failed  int
	errs    []string
}

type target struct{ key, id string }

func (cl *client) run(ctx context.Context) {
	cl.unknown = map[string]bool{}
	for ctx.Err() == nil {
		r := cl.rng.Float64()
		switch {
		case len(cl.live) > 0 && (r < 0.25 || len(cl.live) >= 6):
			cl.kill()
		case r < 0.5:
			cl.spawn()
		default:
			cl.read()
		}
		time.Sleep(time.Duration(2+cl.rng.IntN(4)) * time.Millisecond)
	}
}

func (cl *client) member() string {
	a := cl.c.addrs()
	return a[cl.rng.IntN(len(a))]
}

// lostAnswer reports whether an error leaves the outcome unknown: the call
// may have been made (or not), and retrying with the same request is safe.
func lostAnswer(err error) bool {
	switch connect.CodeOf(err) {
	case connect.CodeInvalidArgument, connect.CodeNotFound, connect.CodeAlreadyExists, connect.CodePermissionDenied,
		connect.CodeUnauthenticated, connect.CodeResourceExhausted, connect.CodeFailedPrecondition, connect.CodeUnimplemented:
		return false
	}
	return true
}

// attempt retries call against random members while answers are lost, for
// at most 10 s; each attempt gets 2 s.
func (cl *client) attempt(call func(ctx context.Context, addr string) error) (Outcome, error) {
	lost := false
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		err := call(ctx, cl.member())
		cancel()
		switch {
		case err == nil && lost:
			cl.retried++
			return OK, nil
		case err == nil:
			return OK, nil
		case !lostAnswer(err) && !lost:
			return Failed, err
		case !lostAnswer(err) || time.Now().After(deadline):
			return Unknown, err
		}
		lost = true
		time.Sleep(20 * time.Millisecond)
	}
}

func (cl *client) spawn() {
	key := fmt.Sprintf("%s%d-%d", keyPrefix, cl.id, cl.n)
	cl.n++
	var rid [16]byte
	_, _ = rand.Read(rid[:])
	req := &pb.SpawnRequest{RequestId: hex.EncodeToString(rid[:]), Spec: &pb.ProcessSpec{
		Name: key, Command: []string{"/bin/sleep", "600"}, Restart: pb.RestartPolicy_RESTART_POLICY_ALWAYS}}
	op := Op{Client: cl.id, Kind: Spawn, Key: key, Call: cl.h.Now()}
	var id string
	out, err := cl.attempt(func(ctx context.Context, addr string) error {
		resp, err := cl.c.api(addr).Spawn(ctx, connect.NewRequest(req))
		if err == nil {
			id = resp.Msg.Processes[0].Id
		}
		return err
	})
	op.Outcome, op.Ret = out, cl.h.Now()
	switch out {
	case OK:
		cl.spawned[key] = id
		cl.live = append(cl.live, target{key, id})
	case Unknown:
		op.Ret = -1
		cl.unknown[key] = true
	case Failed:
		cl.failed++
		cl.errs = append(cl.errs, fmt.Sprintf("spawn %s: %v", key, err))
	}
	cl.h.Add(op)
}

func (cl *client) kill() {
	i := cl.rng.IntN(len(cl.live))
	tg := cl.live[i]
	cl.live = append(cl.live[:i], cl.live[i+1:]...)
	op := Op{Client: cl.id, Kind: Kill, Key: tg.key, Call: cl.h.Now()}
	out, err := cl.attempt(func(ctx context.Context, addr string) error {
		_, err := cl.c.api(addr).Kill(ctx, connect.NewRequest(&pb.KillRequest{Ids: []string{tg.id}}))
		return err
	})
	op.Outcome, op.Ret = out, cl.h.Now()
	switch out {
	case Unknown:
		op.Ret = -1
	case Failed:
		cl.failed++
		cl.errs = append(cl.errs, fmt.Sprintf("kill %s: %v", tg.key, err))
	}
	cl.h.Add(op)
}

func (cl *client) read() {
	op := Op{Client: cl.id, Kind: Read, Call: cl.h.Now()}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	req := &pb.ListRequest{All: true}
	if cl.stale {
		req.Consistency = pb.Consistency_CONSISTENCY_STALE
	}
	resp, err := cl.c.api(cl.member()).List(ctx, connect.NewRequest(req))
	cancel()
	if err != nil {
		if connect.CodeOf(err) == connect.CodeUnavailable {
			cl.refused++
		}
		return // a read that failed tells nothing
	}
	op.Ret = cl.h.Now()
	op.Observed = map[string]State{}
	for _, r := range resp.Msg.Processes {
		k := r.Spec.GetName()
		if !strings.HasPrefix(k, keyPrefix) {
			continue
		}
		switch {
		case op.Observed[k] != Absent:
			op.Observed[k] = Duplicate
		case r.Stop:
			op.Observed[k] = Killed
		case table.Terminal(r.State):
			op.Observed[k] = Ended // restart=always: it may not end unkilled
		default:
			op.Observed[k] = Live
		}
	}
	cl.h.Add(op)
}
