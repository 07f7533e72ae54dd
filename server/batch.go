package server

import (
	"context"
	"errors"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/table"
)

// Proposal batching.
//
// Every write is one Raft entry, and an entry costs far more than the table's
// work on it: encoding, the leader's and each follower's log write, the
// replication round trip, and, on every server, decoding, applying and waking
// the watchers. Raft already writes concurrent entries to disk together, but
// each still pays the rest. So the leader commits concurrent commands as one
// entry: a Batch command holding them in the order they arrived.
//
// One batch is in flight at a time; commands that arrive meanwhile wait and
// go together in the next one (group commit). A command that arrives while
// nothing is in flight is proposed at once, on its own and unwrapped, so an
// idle cluster's log and latency are what they were without batching.
//
// Applying a Batch is deterministic like any entry. Each command in it keeps
// its own time and succeeds or fails on its own (table.Result.Results): a
// command that fails changes nothing, and the others apply as if it had not
// been there.
const (
	// maxBatchWeight and maxBatchBytes bound one batch. A command weighs
	// what the table does for it, roughly: a spawn of 1000 replicas places
	// 1000 processes (weight), and applying it costs every server
	// milliseconds at 1,000 nodes. Entries whose apply takes hundreds of
	// milliseconds on three servers sharing two cores starve Raft's own
	// heartbeats, so a batch stops at about a thousand placements.
	maxBatchWeight = 1024
	maxBatchBytes  = 1 << 20
	// batchTimeout bounds the commit of one batch; each caller also gives
	// up when its own context ends (the entry may then still commit).
	batchTimeout = 10 * time.Second
)

type proposal struct {
	cmd    *pb.Command
	size   int
	weight int
	start  time.Time
	done   chan proposed // buffered
}

type proposed struct {
	res table.Result
	err error // from Raft: the command may or may not have been committed
}

type batcher struct {
	mu       sync.Mutex
	queue    []*proposal
	inFlight bool
}

// commit commits cmd through Raft on this server, which must be the leader,
// batched with whatever else is being committed. The table's own verdict is
// in the Result's Err; the error is Raft's (not the leader, timed out).
func (s *Server) commit(ctx context.Context, cmd *pb.Command) (table.Result, error) {
	p := &proposal{cmd: cmd, size: proto.Size(cmd), weight: weight(cmd), start: time.Now(), done: make(chan proposed, 1)}
	b := &s.batch
	b.mu.Lock()
	b.queue = append(b.queue, p)
	lead := !b.inFlight
	b.inFlight = true
	b.mu.Unlock()
	if lead {
		go s.flush()
	}
	select {
	case r := <-p.done:
		if r.err == nil {
			s.Metrics.ApplyLatency.Observe(time.Since(p.start).Seconds())
		}
		return r.res, r.err
	case <-ctx.Done():
		return table.Result{}, ctx.Err()
	}
}

// weight estimates the table's work for a command: the processes it
// places or changes.
func weight(cmd *pb.Command) int {
	switch op := cmd.GetOp().(type) {
	case *pb.Command_Spawn:
		return max(len(op.Spawn.GetIds()), 1)
	case *pb.Command_Kill:
		return max(len(op.Kill.GetIds()), 1)
	case *pb.Command_Report:
		return max(len(op.Report.GetUpdates()), 1)
	case *pb.Command_Batch:
		w := 0
		for _, c := range op.Batch.GetCommands() {
			w += weight(c)
		}
		return max(w, 1)
	}
	return 1
}

// flush commits the queue, a batch at a time, until it is empty.
func (s *Server) flush() {
	b := &s.batch
	for {
		b.mu.Lock()
		n, bytes, w := 0, 0, 0
		for n < len(b.queue) && (n == 0 || (bytes+b.queue[n].size <= maxBatchBytes && w+b.queue[n].weight <= maxBatchWeight)) {
			bytes += b.queue[n].size
			w += b.queue[n].weight
			n++
		}
		if n == 0 {
			b.inFlight = false
			b.mu.Unlock()
			return
		}
		batch := b.queue[:n:n]
		b.queue = b.queue[n:]
		if len(b.queue) == 0 {
			b.queue = nil
		}
		b.mu.Unlock()
		s.propose(batch)
	}
}

// propose commits one batch and hands every caller its own result.
func (s *Server) propose(batch []*proposal) {
	cmd := batch[0].cmd
	if len(batch) > 1 {
		cmds := make([]*pb.Command, len(batch))
		for i, p := range batch {
			cmds[i] = p.cmd
		}
		cmd = &pb.Command{Op: &pb.Command_Batch{Batch: &pb.Batch{Commands: cmds}}}
	}
	s.Metrics.BatchSize.Observe(float64(len(batch)))
	data, err := proto.Marshal(cmd)
	var res table.Result
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), batchTimeout)
		var r any
		r, _, err = s.Raft.Apply(ctx, data)
		cancel()
		res, _ = r.(table.Result)
	}
	if err != nil {
		for _, p := range batch {
			p.done <- proposed{err: err}
		}
		return
	}
	if len(batch) == 1 {
		batch[0].done <- proposed{res: res}
		return
	}
	if res.Err != nil || len(res.Results) != len(batch) {
		// The entry did not decode as a batch: nothing was applied.
		err := res.Err
		if err == nil {
			err = errors.New("batch applied with a result per command missing")
		}
		for _, p := range batch {
			p.done <- proposed{res: table.Result{Index: res.Index, Err: err}}
		}
		return
	}
	for i, p := range batch {
		r := res.Results[i]
		r.Index = res.Index
		p.done <- proposed{res: r}
	}
}
