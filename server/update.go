package server

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/table"
)

// Rolling update (ShimService.Update), make-before-break as Nomad's update
// stanza: the service's spec changes (UpdateService), then, parallel at a
// time, a new copy of each replica starts with the same replica index
// (AddReplicas) and the old copy stops (Kill) only once the new one is
// healthy: its check passes, or, without a check, it has run min_healthy
// without restarting. A new copy that fails (exits, restarts, is replaced)
// or is not healthy by healthy_timeout fails the update: its batch's new
// copies stop, the old spec comes back, and the replicas already updated are
// rolled back the same way. The handler runs the update and streams its
// progress; the table holds every step, so a server that dies mid-update
// leaves a service with the new spec on some replicas and the old on others,
// each running (run the update again).

const (
	defaultHealthyTimeout = 60 * time.Second
	defaultMinHealthy     = 2 * time.Second
)

// updates holds the services an update runs for in this process: one at a
// time per service (two at once would replace each other's copies).
var updates = &running{names: map[string]bool{}}

type running struct {
	mu    sync.Mutex
	names map[string]bool
}

func (r *running) begin(name string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.names[name] {
		return false
	}
	r.names[name] = true
	return true
}

func (r *running) end(name string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.names, name)
}

// errUpdateFailed marks a new copy that did not get healthy.
var errUpdateFailed = errors.New("new replica not healthy")

func (h *shimAPI) Update(ctx context.Context, req *connect.Request[pb.UpdateRequest], stream *connect.ServerStream[pb.UpdateProgress]) error {
	s := h.s
	m := req.Msg
	if s.Table == nil {
		owner := firstOr(s.servers(), "")
		if owner == "" {
			return connect.NewError(connect.CodeUnavailable, errors.New("no server known"))
		}
		cs, err := s.peer(owner).shim.Update(ctx, connect.NewRequest(m))
		if err != nil {
			return err
		}
		defer cs.Close()
		for cs.Receive() {
			if err := stream.Send(cs.Msg()); err != nil {
				return err
			}
		}
		return cs.Err()
	}
	if err := s.linearize(ctx); err != nil {
		return err
	}
	svc := s.Table.Service(m.Name)
	if svc == nil {
		return connect.NewError(connect.CodeNotFound, fmt.Errorf("no service %q", m.Name))
	}
	if !updates.begin(m.Name) {
		return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("an update of %s is under way on this server", m.Name))
	}
	defer updates.end(m.Name)
	oldSpec := svc.Spec
	spec, err := updatedSpec(oldSpec, m)
	if err != nil {
		return err
	}
	if err := table.ValidateSpec(spec); err != nil {
		return apiError(err)
	}
	if err := checkSpawn(ctx, spec); err != nil {
		return err
	}
	say := func(format string, a ...any) {
		_ = stream.Send(&pb.UpdateProgress{Message: fmt.Sprintf(format, a...)})
	}
	o := rollOptions{parallel: max(int(m.Parallel), 1), timeout: durMS(m.HealthyTimeoutMillis, defaultHealthyTimeout),
		minHealthy: durMS(m.MinHealthyMillis, defaultMinHealthy)}
	if err := s.setServiceSpec(ctx, m.Name, spec); err != nil {
		return err
	}
	say("updating %s: %d replicas, %d at a time", m.Name, svc.Count, o.parallel)
	n, err := s.roll(ctx, m.Name, spec, o, say)
	if err == nil {
		say("updated %s: %d replicas replaced", m.Name, n)
		return nil
	}
	say("update of %s failed: %v; rolling back", m.Name, err)
	// Roll back even if the caller went away.
	bctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Minute)
	defer cancel()
	if serr := s.setServiceSpec(bctx, m.Name, oldSpec); serr != nil {
		return fmt.Errorf("update of %s failed (%v), and so did its rollback: %w", m.Name, err, serr)
	}
	back, rerr := s.roll(bctx, m.Name, oldSpec, o, say)
	if rerr != nil {
		return connect.NewError(connect.CodeAborted, fmt.Errorf("update of %s failed (%v); rollback failed too: %v", m.Name, err, rerr))
	}
	say("rolled back %s: %d replicas restored", m.Name, back)
	return connect.NewError(connect.CodeAborted, fmt.Errorf("update of %s failed and was rolled back: %v", m.Name, err))
}

// updatedSpec is old with the request's changes.
func updatedSpec(old *pb.ProcessSpec, m *pb.UpdateRequest) (*pb.ProcessSpec, error) {
	spec := proto.CloneOf(old)
	if len(m.Command) > 0 {
		spec.Command = append([]string(nil), m.Command...)
	}
	for _, e := range m.Env {
		k, _, ok := strings.Cut(e, "=")
		if !ok || k == "" {
			return nil, invalid("env %q is not KEY=VALUE", e)
		}
		kept := spec.Env[:0:0]
		for _, x := range spec.Env {
			if xk, _, _ := strings.Cut(x, "="); xk != k {
				kept = append(kept, x)
			}
		}
		spec.Env = append(kept, e)
	}
	if m.Resources != nil {
		r, err := mergeResources(spec.GetResources(), m.Resources, nil)
		if err != nil {
			return nil, err
		}
		spec.Resources = r
	}
	if proto.Equal(spec, old) {
		return nil, invalid("the update changes nothing (give a command, --env, --cpu or --mem)")
	}
	return spec, nil
}

func durMS(ms int64, def time.Duration) time.Duration {
	if ms <= 0 {
		return def
	}
	return time.Duration(ms) * time.Millisecond
}

func (s *Server) setServiceSpec(ctx context.Context, name string, spec *pb.ProcessSpec) error {
	res, err := s.apply(ctx, &pb.Command{Op: &pb.Command_UpdateService{UpdateService: &pb.UpdateService{Name: name, Spec: spec}}})
	if err != nil {
		return err
	}
	return s.waitIndex(ctx, res.Index)
}

type rollOptions struct {
	parallel            int
	timeout, minHealthy time.Duration
}

// roll replaces, parallel at a time, the replicas of name whose spec is not
// spec, and returns how many it replaced.
func (s *Server) roll(ctx context.Context, name string, spec *pb.ProcessSpec, o rollOptions, say func(string, ...any)) (int, error) {
	done := 0
	for {
		var todo []*pb.ProcessRecord
		for _, r := range s.Table.Replicas(name) {
			if !r.Stop && !proto.Equal(r.Spec, spec) {
				todo = append(todo, r)
			}
		}
		if len(todo) == 0 {
			return done, nil
		}
		if s.Table.Service(name) == nil {
			return done, fmt.Errorf("service %s was removed", name)
		}
		batch := todo[:min(o.parallel, len(todo))]
		ids := make([]string, len(batch))
		idx := make([]uint32, len(batch))
		for i, r := range batch {
			ids[i], idx[i] = s.NewID(), r.Replica
		}
		res, err := s.apply(ctx, &pb.Command{Op: &pb.Command_AddReplicas{AddReplicas: &pb.AddReplicas{Name: name, Ids: ids, Replicas: idx}}})
		if err != nil {
			return done, err
		}
		if err := s.waitIndex(ctx, res.Index); err != nil {
			return done, err
		}
		if err := s.waitHealthy(ctx, ids, o); err != nil {
			// The batch's new copies go; its old ones stay.
			_ = s.stopIDs(context.WithoutCancel(ctx), ids)
			return done, err
		}
		if err := s.stopIDs(ctx, idsOf(batch)); err != nil {
			return done, err
		}
		for i, r := range batch {
			say("replica %d: %s replaced by %s on %s", r.Replica, r.Id, ids[i], nodeOf(s.Table.Get(ids[i])))
		}
		done += len(batch)
	}
}

func idsOf(rs []*pb.ProcessRecord) []string {
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = r.Id
	}
	return out
}

func nodeOf(r *pb.ProcessRecord) string {
	if r == nil || r.Node == "" {
		return "no node yet"
	}
	return r.Node
}

func (s *Server) stopIDs(ctx context.Context, ids []string) error {
	res, err := s.apply(ctx, &pb.Command{Op: &pb.Command_Kill{Kill: &pb.Kill{Ids: ids, Signal: 15}}})
	if err != nil {
		return err
	}
	return s.waitIndex(ctx, res.Index)
}

// waitHealthy waits until every new copy is healthy, and fails as soon as
// one fails or the timeout passes.
func (s *Server) waitHealthy(ctx context.Context, ids []string, o rollOptions) error {
	deadline := time.Now().Add(o.timeout)
	for {
		ch := s.Watch.Any()
		now := time.Now()
		ready := 0
		var next time.Duration = time.Second
		for _, id := range ids {
			r := s.Table.Get(id)
			if r == nil {
				return fmt.Errorf("%w: %s is gone", errUpdateFailed, id)
			}
			if why := failedCopy(r); why != "" {
				return fmt.Errorf("%w: replica %d (%s) %s", errUpdateFailed, r.Replica, id, why)
			}
			if !table.Healthy(r) {
				continue
			}
			if r.Spec.GetCheck() != nil {
				ready++
				continue
			}
			ran := now.Sub(time.Unix(0, r.StartedUnixNano))
			if ran >= o.minHealthy {
				ready++
			} else {
				next = min(next, o.minHealthy-ran)
			}
		}
		if ready == len(ids) {
			return nil
		}
		if now.After(deadline) {
			return fmt.Errorf("%w: not healthy within %s", errUpdateFailed, o.timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-ch:
		case <-time.After(min(next, time.Until(deadline)+time.Millisecond)):
		}
	}
}

// failedCopy says why a new copy failed, or "".
func failedCopy(r *pb.ProcessRecord) string {
	switch {
	case table.Terminal(r.State):
		return "ended: " + table.StateName(r.State) + reasonSuffix(r.Reason)
	case r.State == pb.ProcessState_PROCESS_STATE_BACKOFF:
		return fmt.Sprintf("exited (code %d) and waits to restart%s", r.ExitCode, reasonSuffix(r.Reason))
	case r.Restarts > 0:
		return fmt.Sprintf("restarted %d times", r.Restarts)
	case r.Incarnation > 1:
		return "was replaced" + reasonSuffix(r.Reason)
	}
	return ""
}

func reasonSuffix(s string) string {
	if s == "" {
		return ""
	}
	return ": " + s
}
