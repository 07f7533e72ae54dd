package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	pb "github.com/shim-run/shim/proto/shimv1"
)

func up(id string, inc uint64, state pb.ProcessState) *pb.StatusUpdate {
	return &pb.StatusUpdate{Id: id, Incarnation: inc, State: state}
}

const (
	running = pb.ProcessState_PROCESS_STATE_RUNNING
	exited  = pb.ProcessState_PROCESS_STATE_EXITED
	failed  = pb.ProcessState_PROCESS_STATE_FAILED
)

func TestReporterKeepsTheLatestPerIncarnation(t *testing.T) {
	type step struct {
		put   *pb.StatusUpdate
		batch int  // take a batch of this many (0: none)
		ack   bool // and acknowledge it
	}
	for _, c := range []struct {
		name  string
		steps []step
		want  []string // what waits at the end, oldest first: id/inc/state
	}{
		{name: "latest wins", steps: []step{{put: up("a", 1, running)}, {put: up("a", 1, exited)}},
			want: []string{"a/1/PROCESS_STATE_EXITED"}},
		{name: "incarnations apart", steps: []step{{put: up("a", 1, failed)}, {put: up("a", 2, running)}},
			want: []string{"a/1/PROCESS_STATE_FAILED", "a/2/PROCESS_STATE_RUNNING"}},
		{name: "oldest first", steps: []step{{put: up("b", 1, running)}, {put: up("a", 1, running)}, {put: up("b", 1, exited)}},
			want: []string{"a/1/PROCESS_STATE_RUNNING", "b/1/PROCESS_STATE_EXITED"}},
		{name: "acknowledged goes", steps: []step{{put: up("a", 1, running)}, {put: up("b", 1, running)}, {batch: 1, ack: true}},
			want: []string{"b/1/PROCESS_STATE_RUNNING"}},
		{name: "unacknowledged stays", steps: []step{{put: up("a", 1, running)}, {batch: 5}},
			want: []string{"a/1/PROCESS_STATE_RUNNING"}},
		{name: "newer during the send stays", steps: []step{{put: up("a", 1, running)}, {batch: 5}, {put: up("a", 1, failed)}, {ack: true}},
			want: []string{"a/1/PROCESS_STATE_FAILED"}},
	} {
		r := newReporter(nil, SystemClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
		var b []pendingReport
		for _, s := range c.steps {
			if s.put != nil {
				r.put(s.put)
			}
			if s.batch > 0 {
				b = r.batch(s.batch)
			}
			if s.ack {
				r.acked(b)
			}
		}
		var got []string
		for _, p := range r.batch(100) {
			got = append(got, fmt.Sprintf("%s/%d/%s", p.u.Id, p.u.Incarnation, p.u.State))
		}
		if len(got) != len(c.want) || r.waiting() != len(c.want) {
			t.Errorf("%s: waiting %v, want %v", c.name, got, c.want)
			continue
		}
		for i := range got {
			if got[i] != c.want[i] {
				t.Errorf("%s: waiting %v, want %v", c.name, got, c.want)
				break
			}
		}
	}
}

// A failed send keeps every update; the next one sends them, in batches.
func TestReporterRetriesFailedSends(t *testing.T) {
	var mu sync.Mutex
	fail, failures := true, 0
	var sent [][]*pb.StatusUpdate
	send := func(_ context.Context, b []*pb.StatusUpdate) error {
		mu.Lock()
		defer mu.Unlock()
		if fail {
			failures++
			return errors.New("no server")
		}
		sent = append(sent, b)
		return nil
	}
	r := newReporter(send, SystemClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	n := reportBatch + 10
	for i := range n {
		r.put(up(fmt.Sprintf("p%05d", i), 1, exited))
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); r.run(ctx) }()
	defer func() { cancel(); <-done }()
	waitUntil(t, 5*time.Second, "three failed sends", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return failures >= 3
	})
	if w := r.waiting(); w != n {
		t.Fatalf("%d waiting after failed sends, want all %d", w, n)
	}
	mu.Lock()
	fail = false
	mu.Unlock()
	waitUntil(t, 5*time.Second, "every update sent", func() bool { return r.waiting() == 0 })
	mu.Lock()
	defer mu.Unlock()
	if len(sent) != 2 || len(sent[0]) != reportBatch || len(sent[1]) != 10 {
		t.Fatalf("sent batches of %d, want %d then 10", lens(sent), reportBatch)
	}
}

func lens(b [][]*pb.StatusUpdate) []int {
	out := make([]int, len(b))
	for i := range b {
		out[i] = len(b[i])
	}
	return out
}

// A clean stop sends what waits, once, before the reporter returns.
func TestReporterFlushesOnStop(t *testing.T) {
	var sent []*pb.StatusUpdate
	r := newReporter(func(_ context.Context, b []*pb.StatusUpdate) error {
		sent = append(sent, b...)
		return nil
	}, SystemClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	r.put(up("a", 1, exited))
	<-r.kick // the stop comes before the sender has seen the update
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	r.run(ctx)
	if len(sent) != 1 || r.waiting() != 0 {
		t.Fatalf("sent %v on stop, %d still waiting; want the exit sent", sent, r.waiting())
	}
}
