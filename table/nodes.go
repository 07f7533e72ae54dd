package table

import (
	"fmt"
	"slices"

	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Node commands: register, state changes, drain, hold, removal, and what
// they do to the processes on a node (evacuate, move off, place pending).

func (x *txn) registerNode(n *pb.NodeRecord) ([]string, error) {
	if n == nil || n.Name == "" {
		return nil, fmt.Errorf("%w: node without a name", ErrInvalid)
	}
	if err := ValidateName(n.Name); err != nil {
		return nil, err
	}
	if err := ValidateResources(n.Capacity); err != nil {
		return nil, fmt.Errorf("node %s capacity: %w", n.Name, err)
	}
	t := x.t
	rec := proto.CloneOf(n)
	old := t.nodes[n.Name]
	if old == nil {
		i, _ := slices.BinarySearch(t.nodeOrder, n.Name)
		t.nodeOrder = slices.Insert(t.nodeOrder, i, n.Name)
		rec.JoinedUnixNano = x.now
		x.event(EvNodeJoined, nil, n.Name, fmt.Sprintf("%s, cpu %s, memory %s", RoleName(n.Role),
			Cores(n.Capacity.GetCpuMaxMilli()), Bytes(n.Capacity.GetMemMaxBytes())))
	} else {
		rec.JoinedUnixNano = old.JoinedUnixNano
		rec.Draining = old.Draining
		if old.State != pb.NodeState_NODE_STATE_UP {
			x.event(EvNodeUp, nil, n.Name, "rejoined")
		}
	}
	rec.State = pb.NodeState_NODE_STATE_UP
	rec.UpdatedUnixNano = x.now
	rec.ModifyIndex = t.index
	t.nodes[n.Name] = rec
	t.candsOK = false
	t.servers = setMember(t.servers, n.Name, rec.Role == pb.NodeRole_NODE_ROLE_SERVER)
	x.touched[n.Name] = true
	return x.placePending(), nil
}

// setMember adds name to (in) or removes it from the sorted list names.
func setMember(names []string, name string, in bool) []string {
	i, found := slices.BinarySearch(names, name)
	switch {
	case in && !found:
		return slices.Insert(names, i, name)
	case !in && found:
		return slices.Delete(names, i, i+1)
	}
	return names
}

func (x *txn) setNodeState(name string, s pb.NodeState) ([]string, error) {
	t := x.t
	old := t.nodes[name]
	if old == nil {
		return nil, fmt.Errorf("%w: %q", ErrUnknownNode, name)
	}
	if _, ok := pb.NodeState_name[int32(s)]; !ok || s == pb.NodeState_NODE_STATE_UNSPECIFIED {
		return nil, fmt.Errorf("%w: node state %d", ErrInvalid, s)
	}
	if old.State == s {
		return nil, nil
	}
	rec := proto.CloneOf(old)
	rec.State = s
	rec.UpdatedUnixNano = x.now
	rec.ModifyIndex = t.index
	t.nodes[name] = rec
	t.candsOK = false
	x.touched[name] = true
	switch s {
	case pb.NodeState_NODE_STATE_UP:
		x.event(EvNodeUp, nil, name, "")
	case pb.NodeState_NODE_STATE_DOWN:
		x.event(EvNodeDown, nil, name, "lease expired")
	default:
		x.event(EvNodeLeft, nil, name, "")
	}
	if s == pb.NodeState_NODE_STATE_UP {
		return x.placePending(), nil
	}
	return x.evacuate(name, "node "+name+" "+NodeStateName(s)), nil
}

func (x *txn) setDraining(name string, draining bool) ([]string, error) {
	t := x.t
	old := t.nodes[name]
	if old == nil {
		return nil, fmt.Errorf("%w: %q", ErrUnknownNode, name)
	}
	if old.Draining == draining {
		return nil, nil
	}
	rec := proto.CloneOf(old)
	rec.Draining = draining
	rec.UpdatedUnixNano = x.now
	rec.ModifyIndex = t.index
	t.nodes[name] = rec
	t.candsOK = false
	x.touched[name] = true
	if !draining {
		x.event(EvNodeUndrained, nil, name, "")
		return x.placePending(), nil
	}
	x.event(EvNodeDrained, nil, name, "")
	return x.moveOff(name), nil
}

// moveOff starts a make-before-break move for every live, unpinned process
// on a draining node: the process keeps running here while its next
// incarnation starts on the node chosen by placement, and the move commits
// only when that one reports running (see report). Processes with nowhere to
// go stay where they are.
func (x *txn) moveOff(name string) []string {
	t := x.t
	var moved []string
	for _, id := range sortedKeys(t.byNode[name]) {
		old := t.procs[id]
		if old.Node != name || old.MoveTo != "" || old.Stop || old.Spec.GetNode() == name {
			continue
		}
		target, err := t.place(old.Spec, moveClaim(old), name)
		if err != nil {
			continue
		}
		rec := proto.CloneOf(old)
		rec.MoveTo = target
		x.put(rec)
		x.event(EvMoving, old, name, "drain: to "+target)
		moved = append(moved, id)
	}
	return moved
}

// hold records that a node's shimd is restarting until the given time.
func (x *txn) hold(h *pb.Hold) error {
	t := x.t
	old := t.nodes[h.GetName()]
	if old == nil {
		return fmt.Errorf("%w: %q", ErrUnknownNode, h.GetName())
	}
	rec := proto.CloneOf(old)
	rec.HoldUntilUnixNano = h.UntilUnixNano
	rec.UpdatedUnixNano = x.now
	rec.ModifyIndex = t.index
	t.nodes[rec.Name] = rec
	t.candsOK = false
	return nil
}

func (x *txn) removeNode(name string) ([]string, error) {
	t := x.t
	if t.nodes[name] == nil {
		return nil, fmt.Errorf("%w: %q", ErrUnknownNode, name)
	}
	delete(t.nodes, name)
	t.candsOK = false
	if i, ok := slices.BinarySearch(t.nodeOrder, name); ok {
		t.nodeOrder = slices.Delete(t.nodeOrder, i, i+1)
	}
	t.servers = setMember(t.servers, name, false)
	x.touched[name] = true
	x.event(EvNodeRemoved, nil, name, "")
	return x.evacuate(name, "node "+name+" removed"), nil
}

// evacuate moves every live process off a lost node under a new incarnation.
// Processes that were being killed are finished instead.
func (x *txn) evacuate(name, reason string) []string {
	t := x.t
	ids := sortedKeys(t.byNode[name])
	for _, id := range ids {
		rec := proto.CloneOf(t.procs[id])
		if rec.Node != name && rec.MoveTo != name {
			// Its cut-off copy's node (lost.go), lost already; removed,
			// it will never say the copy stopped.
			if t.nodes[name] == nil {
				x.retireCutOff(rec, pb.ProcessState_PROCESS_STATE_KILLED, reason)
				x.put(rec)
			}
			continue
		}
		if rec.Node != name {
			// It was moving here: the move is off, it stays where it runs.
			rec.MoveTo = ""
			x.put(rec)
			x.event(EvMoveFailed, rec, rec.Node, "move to "+name+" failed: "+reason)
			continue
		}
		if keepOnLost(rec) {
			x.cutOff(rec, reason) // lost.go: it may run on there
		} else {
			x.retire(rec, reason)
		}
		if rec.Stop {
			rec.State = pb.ProcessState_PROCESS_STATE_KILLED
			rec.Reason = reason
			rec.FinishedUnixNano = x.now
			x.put(rec)
			x.event(EvKilled, rec, name, reason)
			continue
		}
		rec.Incarnation++
		rec.Pid, rec.StartTime, rec.StartedUnixNano = 0, 0, 0
		if rec.MoveTo != "" {
			// A move was under way: its next incarnation is already
			// starting on the target, so finish the move there.
			rec.Node, rec.MoveTo, rec.State = rec.MoveTo, "", pb.ProcessState_PROCESS_STATE_STARTING
			rec.Reason = "moved: " + reason
			land(rec)
		} else if n, err := t.place(rec.Spec, claimOn(rec, ""), ""); err == nil {
			rec.Want, rec.WantReason = nil, "" // the growth was for the lost run
			rec.Node, rec.State = n, pb.ProcessState_PROCESS_STATE_STARTING
			rec.Reason = "moved: " + reason
		} else {
			rec.Node, rec.State = "", pb.ProcessState_PROCESS_STATE_PENDING
			rec.Reason = "waiting for room: " + err.Error()
			rec.Want, rec.WantReason = nil, ""
		}
		x.put(rec)
		if rec.Node != "" {
			x.event(EvMoved, rec, rec.Node, "from "+name+": "+reason)
		} else {
			x.event(EvPending, rec, "", rec.Reason)
		}
	}
	return ids
}

// retire appends the record's current incarnation to its history.
func (x *txn) retire(rec *pb.ProcessRecord, reason string) {
	if rec.Node == "" {
		return
	}
	state := rec.State
	if !Terminal(state) {
		state = pb.ProcessState_PROCESS_STATE_KILLED
	}
	rec.History = append(rec.History, &pb.Incarnation{
		Incarnation: rec.Incarnation, Node: rec.Node, Pid: rec.Pid, State: state,
		ExitCode: rec.ExitCode, Reason: reason, StartedUnixNano: rec.StartedUnixNano, EndedUnixNano: x.now,
	})
	if len(rec.History) > historyLimit {
		rec.History = slices.Delete(rec.History, 0, len(rec.History)-historyLimit)
	}
}

// placePending places waiting processes, oldest first, where they now fit,
// and returns the ids it placed.
func (x *txn) placePending() []string {
	t := x.t
	var placed []string
	for _, id := range slices.Clone(t.pending) {
		rec := t.procs[id]
		n, err := t.place(rec.Spec, claimOn(rec, ""), "")
		if err != nil {
			continue
		}
		rec = proto.CloneOf(rec)
		rec.Node, rec.State, rec.Reason = n, pb.ProcessState_PROCESS_STATE_STARTING, ""
		x.put(rec)
		x.event(EvPlaced, rec, n, "room freed")
		placed = append(placed, id)
	}
	return placed
}
