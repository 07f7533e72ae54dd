package table

import (
	"fmt"
	"sort"

	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Services: a name with a desired count of replicas. The table keeps the
// count itself, so that every decision is in the log: a spawn with
// Spawn.service records the service and its replicas (ProcessRecord.service
// and .replica); Scale adds replicas (with ids the proposer chose) or stops
// the highest ones; a replica that ends without being killed is placed again
// under a new incarnation (report), its id and replica index kept; a kill
// of replicas lowers the count by as many, and a service with no replica
// left is forgotten.
//
// Placement spreads a service's replicas: among the nodes with room, those
// holding the fewest of its replicas come first (placeWith).

// Service event types.
const (
	EvServiceScaled  = "service.scaled"   // its desired count changed (reason: from→to)
	EvServiceRemoved = "service.removed"  // forgotten: killed, or its last replica stopped
	EvReplaced       = "process.replaced" // a replica ended and was placed again (reason: why)
	EvServiceUpdated = "service.updated"  // its spec changed (a rolling update began or rolled back)
)

// Replacement throttle: a replica that ends after running less than
// stableRun is replaced at most maxReplacements times in a row; then it
// stays ended (the service says why) until the service is scaled again.
const (
	maxReplacements = 5
	stableRun       = int64(10e9)
)

// Service returns the service named name, or nil.
func (t *Table) Service(name string) *pb.ServiceRecord {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.services[name]
}

// Services returns every service, sorted by name.
func (t *Table) Services() []*pb.ServiceRecord {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.sortedServices()
}

func (t *Table) sortedServices() []*pb.ServiceRecord {
	out := make([]*pb.ServiceRecord, 0, len(t.services))
	for _, s := range t.services {
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Replicas returns the live replicas of service name, by replica index
// (stopping ones included).
func (t *Table) Replicas(name string) []*pb.ProcessRecord {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.replicas(name, true)
}

func (t *Table) replicas(name string, stopping bool) []*pb.ProcessRecord {
	var out []*pb.ProcessRecord
	for id := range t.byName[name] {
		r := t.procs[id]
		if r.Service == name && live(r) && (stopping || !r.Stop) {
			out = append(out, r)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Replica != out[j].Replica {
			return out[i].Replica < out[j].Replica
		}
		return out[i].Id < out[j].Id
	})
	return out
}

// Healthy reports whether a replica counts as an endpoint: running, and
// healthy by its check (or without a check).
func Healthy(r *pb.ProcessRecord) bool {
	if r.State != pb.ProcessState_PROCESS_STATE_RUNNING || r.Stop {
		return false
	}
	if r.Spec.GetCheck() == nil {
		return true
	}
	return r.Health == pb.Health_HEALTH_HEALTHY
}

// HealthName is the short name of a replica's health: healthy, unhealthy,
// "-" (no check) or "unknown" (no verdict yet).
func HealthName(r *pb.ProcessRecord) string {
	switch {
	case r.Spec.GetCheck() == nil:
		return "-"
	case r.Health == pb.Health_HEALTH_HEALTHY:
		return "healthy"
	case r.Health == pb.Health_HEALTH_UNHEALTHY:
		return "unhealthy"
	}
	return "unknown"
}

// spawnService records a new service and spawns its replicas 0..n-1.
func (x *txn) spawnService(s *pb.Spawn) ([]string, error) {
	t := x.t
	spec := s.GetSpec()
	if spec.GetName() == "" {
		return nil, fmt.Errorf("%w: a service needs a name", ErrInvalid)
	}
	if err := ValidateSpec(spec); err != nil {
		return nil, err
	}
	if x.respawn(s.GetIds(), spec) {
		return s.GetIds(), nil
	}
	if old := t.services[spec.Name]; old != nil {
		return nil, fmt.Errorf("%w: service %s (scale it, or kill it first)", ErrExists, spec.Name)
	}
	for id := range t.byName[spec.Name] {
		if r := t.procs[id]; live(r) && !r.Stop {
			return nil, fmt.Errorf("%w: processes named %s run already", ErrExists, spec.Name)
		}
	}
	if err := validateServiceBounds(uint32(len(s.GetIds())), s.GetMin(), s.GetMax()); err != nil {
		return nil, err
	}
	if s.GetMax() > 0 && !Elastic(spec) {
		return nil, fmt.Errorf("%w: autoscaling (--count MIN:MAX) follows the replicas' grants: it needs --grow", ErrInvalid)
	}
	idx := make([]uint32, len(s.GetIds()))
	for i := range idx {
		idx[i] = uint32(i)
	}
	spec = proto.CloneOf(spec)
	ids, err := x.spawnReplicas(s.GetIds(), spec, spec.Name, idx)
	if err != nil {
		return nil, err
	}
	x.putService(&pb.ServiceRecord{Name: spec.Name, Spec: spec, Count: uint32(len(ids)),
		CreatedUnixNano: x.now, Min: s.GetMin(), Max: s.GetMax()})
	x.event(EvServiceScaled, nil, "", fmt.Sprintf("%s: 0→%d", spec.Name, len(ids)))
	return ids, nil
}

func validateServiceBounds(n, lo, hi uint32) error {
	if lo == 0 && hi == 0 {
		return nil
	}
	if lo < 1 || hi < lo || hi > MaxSpawnIDs || n < lo || n > hi {
		return fmt.Errorf("%w: autoscale bounds %d:%d with %d replicas", ErrInvalid, lo, hi, n)
	}
	return nil
}

func (x *txn) putService(s *pb.ServiceRecord) {
	s.ModifyIndex = x.t.index
	x.t.services[s.Name] = s
}

// scale sets a service's desired count: it stops the replicas with the
// highest indexes, or spawns the lowest missing indexes with ids from c.
func (x *txn) scale(c *pb.Scale) ([]string, error) {
	t := x.t
	old := t.services[c.GetName()]
	if old == nil {
		return nil, fmt.Errorf("%w: no service %q", ErrNotFound, c.GetName())
	}
	if c.GetRemove() {
		return x.removeService(old, "killed"), nil
	}
	n := c.GetCount()
	if n > MaxSpawnIDs {
		return nil, fmt.Errorf("%w: count %d is more than %d", ErrInvalid, n, MaxSpawnIDs)
	}
	if n == 0 {
		return x.removeService(old, "scaled to 0"), nil
	}
	cur := t.replicas(old.Name, false)
	var changed []string
	if len(cur) > int(n) {
		var stop []string
		for _, r := range cur[n:] {
			stop = append(stop, r.Id)
		}
		changed = x.stop(stop, 15)
	} else if len(cur) < int(n) {
		used := map[uint32]bool{}
		for _, r := range cur {
			used[r.Replica] = true
		}
		var idx []uint32
		for i := uint32(0); len(idx) < int(n)-len(cur); i++ {
			if !used[i] {
				idx = append(idx, i)
			}
		}
		if len(c.GetIds()) < len(idx) {
			return nil, fmt.Errorf("%w: scale needs %d new ids, has %d", ErrInvalid, len(idx), len(c.GetIds()))
		}
		ids, err := x.spawnReplicas(c.GetIds()[:len(idx)], old.Spec, old.Name, idx)
		if err != nil {
			return nil, err
		}
		changed = ids
	}
	svc := proto.CloneOf(old)
	svc.Count, svc.Reason = n, ""
	if svc.Min != 0 {
		svc.Min, svc.Max = min(svc.Min, n), max(svc.Max, n)
	}
	x.putService(svc)
	if old.Count != n {
		x.event(EvServiceScaled, nil, "", fmt.Sprintf("%s: %d→%d", old.Name, old.Count, n))
	}
	return changed, nil
}

// removeService stops every replica and forgets the service.
func (x *txn) removeService(s *pb.ServiceRecord, why string) []string {
	var ids []string
	for _, r := range x.t.replicas(s.Name, true) {
		ids = append(ids, r.Id)
	}
	changed := x.stop(ids, 15)
	delete(x.t.services, s.Name)
	x.event(EvServiceRemoved, nil, "", s.Name+": "+why)
	return changed
}

// spawnReplicas spawns replicas idx of service svc (every replica placed,
// or none).
func (x *txn) spawnReplicas(ids []string, spec *pb.ProcessSpec, svc string, idx []uint32) ([]string, error) {
	x.replicaOf, x.replicaIdx, x.t.spread = svc, idx, svc
	defer func() { x.replicaOf, x.replicaIdx, x.t.spread = "", nil, "" }()
	return x.spawn(ids, spec)
}

// afterKill lowers the count of the services whose replicas a kill
// stopped, and forgets those left with none.
func (x *txn) afterKill(ids []string) {
	t := x.t
	seen := map[string]bool{}
	for _, id := range ids {
		r := t.procs[id]
		if r == nil || r.Service == "" || seen[r.Service] {
			continue
		}
		seen[r.Service] = true
		old := t.services[r.Service]
		if old == nil {
			continue
		}
		n := uint32(len(t.replicas(old.Name, false)))
		if n == 0 {
			delete(t.services, old.Name)
			x.event(EvServiceRemoved, nil, "", old.Name+": every replica killed")
			continue
		}
		if n < old.Count {
			svc := proto.CloneOf(old)
			svc.Count = n
			if svc.Min > n {
				svc.Min = n
			}
			x.putService(svc)
			x.event(EvServiceScaled, nil, "", fmt.Sprintf("%s: %d→%d (replicas killed)", old.Name, old.Count, n))
		}
	}
}

// replace decides, for a replica whose run ended for good (u, not killed),
// whether it is placed again; if so it returns the new record.
func (x *txn) replace(old *pb.ProcessRecord, state pb.ProcessState, u *pb.StatusUpdate, at int64) *pb.ProcessRecord {
	t := x.t
	svc := t.services[old.Service]
	if svc == nil || old.Stop || old.Spec.GetRestart() == pb.RestartPolicy_RESTART_POLICY_NEVER {
		return nil
	}
	n := old.Replacements + 1
	if old.StartedUnixNano != 0 && at-old.StartedUnixNano >= stableRun {
		n = 1
	}
	why := u.Reason
	if why == "" {
		why = fmt.Sprintf("exit code %d", u.ExitCode)
	}
	if n > maxReplacements {
		s := proto.CloneOf(svc)
		s.Reason = fmt.Sprintf("replica %d ended %d times in a row after short runs (%s): not replaced", old.Replica, n-1, why)
		x.putService(s)
		return nil
	}
	rec := proto.CloneOf(old)
	rec.State, rec.ExitCode, rec.Reason = state, u.ExitCode, u.Reason
	x.retire(rec, StateName(state)+": "+why)
	rec.Incarnation++
	rec.Pid, rec.StartTime, rec.StartedUnixNano, rec.ExitCode = 0, 0, 0, 0
	rec.Health, rec.Replacements, rec.Want, rec.WantReason, rec.MoveTo = pb.Health_HEALTH_UNSPECIFIED, n, nil, "", ""
	rec.Grant = minGrant(rec.Spec.GetResources())
	node, err := t.place(rec.Spec, claimOn(rec, ""), old.Node)
	if err != nil {
		node, err = t.place(rec.Spec, claimOn(rec, ""), "")
	}
	if err != nil {
		rec.Node, rec.State, rec.Reason = "", pb.ProcessState_PROCESS_STATE_PENDING, "waiting for room: "+err.Error()
	} else {
		rec.Node, rec.State, rec.Reason = node, pb.ProcessState_PROCESS_STATE_STARTING, "replaced: "+why
	}
	return rec
}

// siblings counts, by node, the live replicas of the service spec makes
// (nil if spec is no service's).
func (t *Table) siblings(spec *pb.ProcessSpec) map[string]int {
	name := spec.GetName()
	if name == "" || (t.services[name] == nil && t.spread != name) {
		return nil
	}
	m := map[string]int{}
	for id := range t.byName[name] {
		if r := t.procs[id]; r.Service == name && live(r) && r.Node != "" {
			m[r.Node]++
		}
	}
	return m
}

// serviceResized gives a resized replica's bounds to its service, for the
// replicas it makes next.
func (x *txn) serviceResized(rec *pb.ProcessRecord) {
	old := x.t.services[rec.Service]
	if rec.Service == "" || old == nil {
		return
	}
	svc := proto.CloneOf(old)
	svc.Spec = proto.CloneOf(svc.Spec)
	svc.Spec.Resources = proto.CloneOf(rec.Spec.GetResources())
	x.putService(svc)
}

// updateService sets the spec a service's new replicas get.
func (x *txn) updateService(c *pb.UpdateService) error {
	old := x.t.services[c.GetName()]
	if old == nil {
		return fmt.Errorf("%w: no service %q", ErrNotFound, c.GetName())
	}
	spec := c.GetSpec()
	if err := ValidateSpec(spec); err != nil {
		return err
	}
	if spec.GetName() != old.Name {
		return fmt.Errorf("%w: service %s cannot be renamed %q", ErrInvalid, old.Name, spec.GetName())
	}
	svc := proto.CloneOf(old)
	svc.Spec, svc.Reason = proto.CloneOf(spec), ""
	x.putService(svc)
	x.event(EvServiceUpdated, nil, "", old.Name)
	return nil
}

// addReplicas spawns replicas with the given indexes and the service's
// spec, beyond its count (a rolling update's new copies).
func (x *txn) addReplicas(c *pb.AddReplicas) ([]string, error) {
	svc := x.t.services[c.GetName()]
	if svc == nil {
		return nil, fmt.Errorf("%w: no service %q", ErrNotFound, c.GetName())
	}
	if len(c.GetIds()) != len(c.GetReplicas()) {
		return nil, fmt.Errorf("%w: %d ids for %d replicas", ErrInvalid, len(c.GetIds()), len(c.GetReplicas()))
	}
	for _, r := range c.GetReplicas() {
		if r >= MaxSpawnIDs {
			return nil, fmt.Errorf("%w: replica index %d", ErrInvalid, r)
		}
	}
	return x.spawnReplicas(c.GetIds(), svc.Spec, svc.Name, c.GetReplicas())
}

// Autoscale verdicts (AutoscaleVerdict).
const (
	ScaleIn  = -1
	ScaleOut = 1
)

// AutoscaleVerdict says whether service svc, autoscaled (min:max), should
// grow or shrink given its live replicas: out when every running replica
// sits at its maximum grant (or waits for room to grow), in when every one
// is back at its minimum (idle: elastic grants shrink after their idle
// time), else 0. Replicas not running yet make it wait (0).
func AutoscaleVerdict(svc *pb.ServiceRecord, reps []*pb.ProcessRecord) int {
	if svc.GetMax() == 0 {
		return 0
	}
	atMax, atMin, running := 0, 0, 0
	for _, r := range reps {
		if r.Stop {
			continue
		}
		if r.State != pb.ProcessState_PROCESS_STATE_RUNNING {
			return 0
		}
		running++
		g, b := GrantOf(r), r.Spec.GetResources()
		if r.Want != nil || (b.GetCpuMaxMilli() > 0 && g.GetCpuMilli() >= b.GetCpuMaxMilli()) ||
			(b.GetMemMaxBytes() > 0 && g.GetMemBytes() >= b.GetMemMaxBytes()) {
			atMax++
		}
		if sameGrant(g, minGrant(b)) {
			atMin++
		}
	}
	switch {
	case running == 0:
		return 0
	case atMax == running && uint32(running) < svc.Max:
		return ScaleOut
	case atMin == running && uint32(running) > svc.Min:
		return ScaleIn
	}
	return 0
}
