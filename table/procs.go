package table

import (
	"fmt"
	"slices"
	"sort"
	"strings"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Process commands: spawn, kill, report, resize, prune.

func (x *txn) spawn(ids []string, spec *pb.ProcessSpec) ([]string, error) {
	t := x.t
	if len(ids) == 0 || len(ids) > MaxSpawnIDs {
		return nil, fmt.Errorf("%w: spawn needs 1 to %d ids", ErrInvalid, MaxSpawnIDs)
	}
	if err := ValidateSpec(spec); err != nil {
		return nil, err
	}
	if x.respawn(ids, spec) {
		return ids, nil
	}
	seen := make(map[string]bool, len(ids))
	for _, id := range ids {
		if err := ValidateID(id); err != nil {
			return nil, err
		}
		if t.procs[id] != nil || seen[id] {
			return nil, fmt.Errorf("%w: process %s", ErrExists, id)
		}
		seen[id] = true
	}
	// Place every replica before changing anything, so that a spawn is all or
	// nothing.
	need := claimFor(spec, minGrant(spec.Resources))
	ks, err := t.placeReplicas(spec, need, len(ids))
	if err != nil {
		if len(ids) > 1 {
			return nil, fmt.Errorf("replica %d of %d: %w", len(ks)+1, len(ids), err)
		}
		return nil, err
	}
	nodes := make([]string, len(ids))
	cs := t.candidates()
	for i, k := range ks {
		nodes[i] = cs[k].name
	}
	t.txPorts = nil
	spec = proto.CloneOf(spec) // shared by the replicas, never by the caller
	x.collecting = true
	defer x.sortNew()
	for i, id := range ids {
		rec := &pb.ProcessRecord{
			Id: id, Spec: spec, Node: nodes[i], State: pb.ProcessState_PROCESS_STATE_STARTING,
			Incarnation: 1, CreatedUnixNano: x.now, Grant: minGrant(spec.Resources),
		}
		if x.replicaOf != "" {
			rec.Service, rec.Replica = x.replicaOf, x.replicaIdx[i]
		}
		x.put(rec)
		x.event(EvPlaced, rec, nodes[i], "")
	}
	return ids, nil
}

// respawn reports whether this very spawn was applied already: a proposer
// that lost leadership while committing cannot tell whether its entry made
// it, so it proposes again, and the second copy must succeed and change
// nothing.
func (x *txn) respawn(ids []string, spec *pb.ProcessSpec) bool {
	for _, id := range ids {
		r := x.t.procs[id]
		if r == nil || r.CreatedUnixNano != x.now || !proto.Equal(r.Spec, spec) {
			return false
		}
	}
	return true
}

func (x *txn) kill(ids []string, signal int32) ([]string, error) {
	if err := x.checkKill(ids, signal); err != nil {
		return nil, err
	}
	changed := x.stop(ids, signal)
	x.afterKill(changed)
	return changed, nil
}

func (x *txn) checkKill(ids []string, signal int32) error {
	t := x.t
	if len(ids) == 0 {
		return fmt.Errorf("%w: kill needs at least one id", ErrInvalid)
	}
	if signal < 0 || signal > 64 {
		return fmt.Errorf("%w: signal %d", ErrInvalid, signal)
	}
	for _, id := range ids {
		if t.procs[id] == nil {
			return fmt.Errorf("%w: process %q", ErrNotFound, id)
		}
	}
	return nil
}

// stop asks live processes to stop (checked by checkKill).
func (x *txn) stop(ids []string, signal int32) []string {
	t := x.t
	var changed []string
	for _, id := range ids {
		old := t.procs[id]
		if !live(old) || (old.Stop && old.StopSignal == signal) {
			continue
		}
		rec := proto.CloneOf(old)
		rec.Stop, rec.StopSignal = true, signal
		if rec.State == pb.ProcessState_PROCESS_STATE_PENDING {
			rec.State, rec.Reason, rec.FinishedUnixNano = pb.ProcessState_PROCESS_STATE_KILLED, "killed before placement", x.now
			x.event(EvKilled, rec, "", rec.Reason)
		} else {
			x.event(EvStopping, rec, rec.Node, fmt.Sprintf("signal %d", signal))
		}
		x.put(rec)
		changed = append(changed, id)
	}
	return changed
}

func (x *txn) report(r *pb.Report) []string {
	t := x.t
	var changed []string
	freed := false
	for _, u := range r.GetUpdates() {
		if u == nil || !reportable(u.State) {
			continue
		}
		old := t.procs[u.Id]
		if old != nil && old.MoveTo != "" && old.MoveTo == r.GetNode() && u.Incarnation == old.Incarnation+1 && live(old) {
			rec := x.moveReport(old, u)
			x.put(rec)
			if rec.Node != old.Node {
				t.handedOff(old.Node, u.Id)
				x.event(EvMoved, rec, rec.Node, "from "+old.Node)
				if !sameGrant(GrantOf(rec), GrantOf(old)) {
					x.event(EvGrown, rec, rec.Node, change(GrantOf(old), GrantOf(rec))+": moved to "+rec.Node+" to grow")
				}
			} else {
				x.event(EvMoveFailed, rec, rec.Node, rec.Reason)
			}
			changed = append(changed, u.Id)
			continue
		}
		if old != nil && x.cutOffEnded(old, r.GetNode(), u) { // lost.go
			changed = append(changed, u.Id)
			continue
		}
		// Reports about an incarnation the table has moved elsewhere are
		// stale; the node learns from its assignments to stop that copy. A
		// queued process has no node, so nothing may report on it.
		if old == nil || old.Node == "" || old.Node != r.GetNode() || old.Incarnation != u.Incarnation || !live(old) {
			continue
		}
		state := u.State
		if Terminal(state) && old.Stop {
			state = pb.ProcessState_PROCESS_STATE_KILLED
		}
		if checkTransition(old.State, state) != nil {
			continue
		}
		if Terminal(state) && old.Service != "" {
			at := u.AtUnixNano
			if at == 0 {
				at = x.now
			}
			if rec := x.replace(old, state, u, at); rec != nil {
				x.put(rec)
				x.event(EvReplaced, rec, rec.Node, rec.Reason)
				changed = append(changed, u.Id)
				freed = true
				continue
			}
		}
		rec := shallowCopy(old) // only scalar fields change below
		rec.State = state
		rec.Restarts = u.Restarts
		at := u.AtUnixNano
		if at == 0 {
			at = x.now
		}
		switch state {
		case pb.ProcessState_PROCESS_STATE_RUNNING:
			// The same run reported again keeps its start time (else a
			// repeated report without a time would rewrite the record).
			if old.State != pb.ProcessState_PROCESS_STATE_RUNNING || old.Pid != u.Pid || old.StartTime != u.StartTime {
				rec.Pid, rec.StartTime, rec.StartedUnixNano = u.Pid, u.StartTime, at
				rec.Health = pb.Health_HEALTH_UNSPECIFIED
			}
			if u.Health != pb.Health_HEALTH_UNSPECIFIED {
				rec.Health = u.Health
			}
		case pb.ProcessState_PROCESS_STATE_BACKOFF:
			rec.ExitCode, rec.Reason = u.ExitCode, u.Reason
		default: // terminal
			rec.ExitCode, rec.Reason, rec.FinishedUnixNano = u.ExitCode, u.Reason, at
			if u.Pid != 0 {
				rec.Pid = u.Pid
			}
			freed = true
		}
		if sameReport(rec, old) {
			continue
		}
		x.put(rec)
		x.reportEvent(old, rec)
		changed = append(changed, u.Id)
	}
	if freed {
		changed = append(changed, x.placePending()...)
	}
	return changed
}

// shallowCopy copies a record's fields, sharing its messages and lists
// (the spec, the grant, the history) with it: the table never changes a
// stored record or what it holds, so only the copy's own scalar fields may
// be set. A report changes only those, and a deep copy of the spec was most
// of a report's cost.
func shallowCopy(r *pb.ProcessRecord) *pb.ProcessRecord {
	c := &pb.ProcessRecord{}
	src, dst := r.ProtoReflect(), c.ProtoReflect()
	src.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		dst.Set(fd, v)
		return true
	})
	if u := src.GetUnknown(); len(u) > 0 {
		dst.SetUnknown(u)
	}
	return c
}

// sameReport reports whether rec, a copy of old with a report's fields set,
// equals old: whether those fields are unchanged.
func sameReport(rec, old *pb.ProcessRecord) bool {
	return rec.State == old.State && rec.Restarts == old.Restarts && rec.Pid == old.Pid &&
		rec.StartTime == old.StartTime && rec.StartedUnixNano == old.StartedUnixNano &&
		rec.ExitCode == old.ExitCode && rec.Reason == old.Reason && rec.FinishedUnixNano == old.FinishedUnixNano &&
		rec.Health == old.Health
}

// reportEvent notes the event of a report that changed old into rec.
func (x *txn) reportEvent(old, rec *pb.ProcessRecord) {
	switch rec.State {
	case pb.ProcessState_PROCESS_STATE_RUNNING:
		if old.State != rec.State || old.Pid != rec.Pid {
			x.event(EvRunning, rec, rec.Node, fmt.Sprintf("pid %d", rec.Pid))
		}
	case pb.ProcessState_PROCESS_STATE_BACKOFF:
		if old.State != rec.State {
			x.event(EvBackoff, rec, rec.Node, rec.Reason)
		}
	case pb.ProcessState_PROCESS_STATE_EXITED:
		x.event(EvExited, rec, rec.Node, exitWhy(rec))
	case pb.ProcessState_PROCESS_STATE_FAILED:
		x.event(EvFailed, rec, rec.Node, exitWhy(rec))
	case pb.ProcessState_PROCESS_STATE_KILLED:
		x.event(EvKilled, rec, rec.Node, exitWhy(rec))
	}
}

func exitWhy(rec *pb.ProcessRecord) string {
	if rec.Reason != "" {
		return rec.Reason
	}
	return fmt.Sprintf("exit code %d", rec.ExitCode)
}

// FormatBounds formats bounds as "cpu 0.5:1:2, memory 64M:256M, pids 100",
// leaving out what is unset.
func FormatBounds(r *pb.Resources) string {
	var parts []string
	if r.GetCpuMinMilli() != 0 || r.GetCpuMaxMilli() != 0 || r.GetCpuBurstMilli() != 0 {
		c := "cpu " + Cores(r.GetCpuMinMilli())
		if r.GetCpuMaxMilli() != 0 || r.GetCpuBurstMilli() != 0 {
			c += ":" + Cores(r.GetCpuMaxMilli())
		}
		if r.GetCpuBurstMilli() != 0 {
			c += ":" + Cores(r.GetCpuBurstMilli())
		}
		parts = append(parts, c)
	}
	if r.GetMemMinBytes() != 0 || r.GetMemMaxBytes() != 0 {
		m := "memory " + Bytes(r.GetMemMinBytes())
		if r.GetMemMaxBytes() != 0 {
			m += ":" + Bytes(r.GetMemMaxBytes())
		}
		parts = append(parts, m)
	}
	if r.GetPidsMax() != 0 {
		parts = append(parts, fmt.Sprintf("pids %d", r.GetPidsMax()))
	}
	if len(parts) == 0 {
		return "unbounded"
	}
	return strings.Join(parts, ", ")
}

// reportable reports whether a node may report state s. PENDING and STARTING
// are the table's to set: a node cannot queue or re-place a process.
func reportable(s pb.ProcessState) bool {
	switch s {
	case pb.ProcessState_PROCESS_STATE_RUNNING, pb.ProcessState_PROCESS_STATE_BACKOFF:
		return true
	}
	return Terminal(s)
}

// moveReport handles a report from the node a process is moving to: running
// commits the move (the old node then stops its copy), anything else calls
// the move off and the old incarnation keeps running.
func (x *txn) moveReport(old *pb.ProcessRecord, u *pb.StatusUpdate) *pb.ProcessRecord {
	rec := proto.CloneOf(old)
	target := rec.MoveTo
	rec.MoveTo = ""
	if u.State != pb.ProcessState_PROCESS_STATE_RUNNING {
		rec.Reason = fmt.Sprintf("move to %s failed: %s", target, u.Reason)
		return rec
	}
	x.retire(rec, "moved to "+target)
	at := u.AtUnixNano
	if at == 0 {
		at = x.now
	}
	rec.Node, rec.Incarnation, rec.State = target, u.Incarnation, pb.ProcessState_PROCESS_STATE_RUNNING
	rec.Pid, rec.StartTime, rec.StartedUnixNano, rec.Restarts = u.Pid, u.StartTime, at, u.Restarts
	rec.Reason = "moved from " + old.Node
	land(rec)
	return rec
}

// resize sets a live process's resources. A placed process must fit them
// on its node, and while it moves, on the node it moves to (both reserve
// them). If its node cannot hold them and move is set, the process moves
// make-before-break instead, as a drain moves it (see moveOff): the new
// resources and the target, picked by the usual placement rules, are set
// in this one command; the new incarnation starts there with them, and the
// old one keeps running (its agent applies the new bounds in place) until
// the new one reports running. The old node reserves the new minimum
// meanwhile, beyond its capacity; if the move fails (see moveReport) the
// process stays there with the new bounds until it is resized again. A
// pinned process, one being killed and one already moving cannot move. On
// any error the table is unchanged.
func (x *txn) resize(id string, r *pb.Resources, move bool) ([]string, error) {
	t := x.t
	old := t.procs[id]
	if old == nil {
		return nil, fmt.Errorf("%w: process %q", ErrNotFound, id)
	}
	if !live(old) {
		return nil, fmt.Errorf("%w: process %s has %s", ErrInvalid, id, StateName(old.State))
	}
	if err := ValidateResources(r); err != nil {
		return nil, err
	}
	rec := proto.CloneOf(old)
	rec.Spec = proto.CloneOf(rec.Spec)
	if rec.Spec == nil {
		rec.Spec = &pb.ProcessSpec{}
	}
	rec.Spec.Resources = proto.CloneOf(r)
	rec.Grant = boundGrant(rec.Spec, GrantOf(old), r)
	if old.Want != nil {
		w := maxGrant(boundGrant(rec.Spec, old.Want, r), rec.Grant)
		if !Elastic(rec.Spec) || sameGrant(w, rec.Grant) {
			rec.Want, rec.WantReason = nil, ""
		} else {
			rec.Want = w
		}
	}
	for _, n := range holders(old) {
		a := t.allocOf(n)
		a.add(claimOn(old, n), -1)
		err := fits(t.nodes[n], &a, claimOn(rec, n))
		if err == nil {
			continue
		}
		if n != old.Node || !move {
			return nil, fmt.Errorf("%w: node %s cannot hold it: %v", ErrNoCapacity, n, err)
		}
		switch {
		case old.MoveTo != "":
			return nil, fmt.Errorf("%w: node %s cannot hold it (%v) and it is already moving to %s", ErrNoCapacity, n, err, old.MoveTo)
		case old.Stop:
			return nil, fmt.Errorf("%w: node %s cannot hold it (%v) and it is being stopped", ErrNoCapacity, n, err)
		case old.Spec.GetNode() != "":
			return nil, fmt.Errorf("%w: node %s cannot hold it (%v) and it is pinned there", ErrNoCapacity, n, err)
		}
		// Placement never picks this node: it cannot hold r even without
		// the process's current reservation, let alone with it.
		target, perr := t.place(rec.Spec, moveClaim(rec), "")
		if perr != nil {
			return nil, fmt.Errorf("node %s cannot hold it (%v), and no node can take it: %w", n, err, perr)
		}
		rec.MoveTo = target
	}
	x.put(rec)
	x.serviceResized(rec)
	x.event(EvResized, rec, rec.Node, FormatBounds(r))
	if rec.MoveTo != "" && old.MoveTo == "" {
		x.event(EvMoving, rec, rec.Node, "resize: to "+rec.MoveTo)
	}
	// The process may have shrunk, or be queued and now fit somewhere.
	changed := []string{id}
	for _, p := range x.placePending() {
		if p != id {
			changed = append(changed, p)
		}
	}
	return changed, nil
}

func (x *txn) prune(before int64) []string {
	t := x.t
	var ids []string
	for id, rec := range t.procs {
		if !live(rec) && rec.FinishedUnixNano < before {
			ids = append(ids, id)
		}
	}
	sort.Strings(ids)
	if len(ids) > 0 {
		gone := make(map[string]bool, len(ids))
		for _, id := range ids {
			gone[id] = true
		}
		t.order = slices.DeleteFunc(t.order, func(id string) bool { return gone[id] })
	}
	for _, id := range ids {
		delIndex(t.byName, t.procs[id].Spec.GetName(), id)
		t.states[t.procs[id].State]--
		delete(t.procs, id)
	}
	return ids
}
