package server

import (
	"context"
	"time"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Pruning: the leader keeps the table's history bounded (table/prune.go).
// Every PruneEvery it asks the table for a cutoff (ended longer ago than
// Retain, or beyond the RetainMax newest ended) and, if there is one,
// commits a Prune with it. Followers do nothing: the command reaches them.

const (
	// DefaultRetain is how long an ended process stays listed.
	DefaultRetain = time.Hour
	// DefaultRetainMax caps the ended processes kept, as Kubernetes'
	// terminated-pod GC does (12,500).
	DefaultRetainMax = 12500
)

func (s *Server) retain() time.Duration {
	if s.Retain <= 0 {
		return DefaultRetain
	}
	return s.Retain
}

// pruneEvery is how often the leader looks: a tenth of the retention,
// between 250 ms and 1 min (each look reads the whole table).
func (s *Server) pruneEvery() time.Duration {
	return min(max(s.retain()/10, 250*time.Millisecond), time.Minute)
}

func (s *Server) runPrune(ctx context.Context) {
	t := time.NewTicker(s.pruneEvery())
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if s.Raft == nil || !s.Raft.IsLeader() {
			continue
		}
		if err := s.pruneOnce(ctx); err != nil && ctx.Err() == nil {
			s.Log.Warn("prune failed", "err", err)
		}
	}
}

// pruneOnce commits one Prune if anything is due.
func (s *Server) pruneOnce(ctx context.Context) error {
	keep := s.RetainMax
	if keep == 0 {
		keep = DefaultRetainMax
	}
	cut := s.Table.PruneCutoff(s.Now().Add(-s.retain()).UnixNano(), keep)
	if cut == 0 {
		return nil
	}
	res, err := s.apply(ctx, &pb.Command{Op: &pb.Command_Prune{Prune: &pb.Prune{BeforeUnixNano: cut}}})
	if err != nil {
		return err
	}
	if len(res.IDs) > 0 {
		s.Log.Debug("pruned ended processes", "count", len(res.IDs))
	}
	return nil
}
