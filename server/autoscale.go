package server

import (
	"context"
	"time"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/table"
)

// Autoscale: the leader looks at every service spawned with --count
// MIN:MAX each autoscaleEvery, and scales it out by one replica after
// outAfter verdicts in a row that every replica sits at its maximum grant,
// in by one after inAfter verdicts that every one is back at its minimum
// (table.AutoscaleVerdict). The grants come from the growth loop of each
// replica's node (agent/grow.go), so autoscaling builds on elastic
// processes (--grow).

const (
	autoscaleEvery = 5 * time.Second
	outAfter       = 2 // 10 s at max
	inAfter        = 6 // 30 s at min
)

func (s *Server) autoscale(ctx context.Context) {
	streak := map[string]int{}
	t := time.NewTicker(autoscaleEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if !s.Raft.IsLeader() {
			clear(streak)
			continue
		}
		for _, svc := range s.Table.Services() {
			if svc.Max == 0 {
				continue
			}
			n, ok := autoscaleStep(streak, svc, table.AutoscaleVerdict(svc, s.Table.Replicas(svc.Name)))
			if !ok {
				continue
			}
			ids := make([]string, n)
			for i := range ids {
				ids[i] = s.NewID()
			}
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			_, err := s.apply(cctx, &pb.Command{Op: &pb.Command_Scale{Scale: &pb.Scale{Name: svc.Name, Count: n, Ids: ids}}})
			cancel()
			if err != nil {
				s.Log.Warn("autoscale failed", "service", svc.Name, "count", n, "err", err)
				continue
			}
			s.Log.Info("autoscaled", "service", svc.Name, "from", svc.Count, "to", n)
		}
	}
}

// autoscaleStep folds one verdict into the service's streak and returns
// the new count once the streak is long enough.
func autoscaleStep(streak map[string]int, svc *pb.ServiceRecord, v int) (uint32, bool) {
	k := svc.Name
	switch {
	case v == table.ScaleOut:
		streak[k] = max(streak[k], 0) + 1
	case v == table.ScaleIn:
		streak[k] = min(streak[k], 0) - 1
	default:
		delete(streak, k)
		return 0, false
	}
	switch {
	case streak[k] >= outAfter && svc.Count < svc.Max:
		delete(streak, k)
		return svc.Count + 1, true
	case streak[k] <= -inAfter && svc.Count > svc.Min:
		delete(streak, k)
		return svc.Count - 1, true
	}
	return 0, false
}
