package table

import (
	"fmt"
	"math"
	"math/bits"
	"slices"
	"sort"
	"strings"
	"sync"

	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Table is the process table. Apply is the only writer; the read methods may
// be called concurrently with it. Records handed out are immutable snapshots:
// every change stores a new record, so callers must not modify them.
type Table struct {
	mu        sync.RWMutex
	index     uint64
	applied   uint64 // the last log index applied, failed commands included
	procs     map[string]*pb.ProcessRecord
	nodes     map[string]*pb.NodeRecord
	nodeOrder []string                       // node names, sorted: placement walks them in this order
	servers   []string                       // names of the nodes with the server role, sorted (derived)
	byNode    map[string]map[string]struct{} // live (non-terminal) processes by node
	byName    map[string]map[string]struct{} // all processes by name
	pending   []string                       // PENDING process ids, oldest first
	alloc     map[string]*Alloc              // per node: sums over its live processes
	nodeIndex map[string]uint64              // per node: index of the last change to its assignments
	// left logs, per node, the processes that stopped being assigned to it,
	// so that an agent can be sent what changed rather than everything.
	// Derived state: it starts empty at reset and Restore (leftBase).
	left     map[string]*departures
	leftBase uint64
	// changes logs, per node, the processes whose record changed while
	// assigned to it, so that sending an agent what changed costs the
	// changes, not a sort of everything it runs. Derived like left, and
	// complete from leftBase on too.
	changes map[string]*departures
	// cands caches, in nodeOrder, what placement looks at for each node,
	// so that placing walks a slice rather than three maps per node.
	// Derived: every change to a node record or to which nodes hold an
	// Alloc clears candsOK.
	cands   []cand
	candsOK bool
	// states counts the records in each state (derived), for metrics.
	states map[pb.ProcessState]int
	// trust and tokens: the cluster CA and client tokens (trust.go).
	trust  *pb.Trust
	tokens map[string]*pb.TokenRecord
	// requests remembers client request ids (requests.go).
	requests requests
	// order holds every process id sorted by creation time, then id: the
	// order Processes lists them in, kept rather than sorted per call
	// (derived; a record's creation time never changes).
	order []string
}

// cand is one node as placement sees it.
type cand struct {
	name  string
	rec   *pb.NodeRecord
	alloc *Alloc // nil while the node holds nothing
}

// departures is one node's log of processes no longer assigned to it. It is
// complete for every index after since.
type departures struct {
	since uint64
	log   []departure
}

type departure struct {
	id      string
	index   uint64
	handoff bool // it left by a committed make-before-break move
}

// maxDepartures bounds each node's log; an agent further behind than the
// log reaches is sent its full assignments.
const maxDepartures = 1024

// Alloc sums the bounds of the live processes on one node.
type Alloc struct {
	CPUMin, CPUMax, MemMin, MemMax int64
	Count                          int
}

// Result is what Apply returns for one command.
type Result struct {
	Index   uint64
	IDs     []string // processes created or changed
	Nodes   []string // nodes whose assignments changed, sorted
	Err     error
	Results []Result // one per command of a Batch
}

// New returns an empty table.
func New() *Table {
	t := &Table{}
	t.reset()
	return t
}

func (t *Table) reset() {
	t.index = 0
	t.procs = map[string]*pb.ProcessRecord{}
	t.nodes = map[string]*pb.NodeRecord{}
	t.nodeOrder = nil
	t.servers = nil
	t.byNode = map[string]map[string]struct{}{}
	t.byName = map[string]map[string]struct{}{}
	t.pending = nil
	t.alloc = map[string]*Alloc{}
	t.nodeIndex = map[string]uint64{}
	t.left = map[string]*departures{}
	t.leftBase = 0
	t.changes = map[string]*departures{}
	t.cands, t.candsOK = nil, false
	t.states = map[pb.ProcessState]int{}
	t.order = nil
	t.trust = nil
	t.tokens = map[string]*pb.TokenRecord{}
	t.requests = newRequests()
	t.applied = 0
}

// depart logs that id is no longer assigned to node as of the table index.
func (t *Table) depart(node, id string) {
	d := t.left[node]
	if d == nil {
		d = &departures{since: t.leftBase}
		t.left[node] = d
	}
	if len(d.log) >= maxDepartures {
		drop := len(d.log) / 2
		d.since = d.log[drop-1].index
		d.log = slices.Delete(d.log, 0, drop)
	}
	d.log = append(d.log, departure{id: id, index: t.index})
}

// insertOrder adds a new record's id to order. Records usually arrive in
// creation order, so this is an append.
func (t *Table) insertOrder(rec *pb.ProcessRecord) {
	n := len(t.order)
	if n == 0 || t.orderLess(t.order[n-1], rec) {
		t.order = append(t.order, rec.Id)
		return
	}
	i := sort.Search(n, func(i int) bool { return !t.orderLess(t.order[i], rec) })
	t.order = slices.Insert(t.order, i, rec.Id)
}

// orderLess reports whether the record of id sorts before rec.
func (t *Table) orderLess(id string, rec *pb.ProcessRecord) bool {
	a := t.procs[id]
	if a.CreatedUnixNano != rec.CreatedUnixNano {
		return a.CreatedUnixNano < rec.CreatedUnixNano
	}
	return id < rec.Id
}

// logChange logs that id's record changed while assigned to node, as of the
// table index.
func (t *Table) logChange(node, id string) {
	d := t.changes[node]
	if d == nil {
		d = &departures{since: t.leftBase}
		t.changes[node] = d
	}
	if n := len(d.log); n > 0 && d.log[n-1].id == id && d.log[n-1].index == t.index {
		return
	}
	if len(d.log) >= maxDepartures {
		drop := len(d.log) / 2
		d.since = d.log[drop-1].index
		d.log = slices.Delete(d.log, 0, drop)
	}
	d.log = append(d.log, departure{id: id, index: t.index})
}

// Apply decodes and applies one Raft log entry. It returns a Result (never
// nil); a command that fails, or an entry that does not decode, leaves the
// table exactly as it was, index included.
func (t *Table) Apply(index uint64, data []byte) any {
	var cmd pb.Command
	if err := proto.Unmarshal(data, &cmd); err != nil {
		return Result{Index: t.Index(), Err: fmt.Errorf("%w: %v", ErrDecode, err)}
	}
	return t.ApplyCommand(index, &cmd)
}

// ApplyCommand applies a decoded command at the given log index. The table's
// index advances only when the command succeeds (a Batch always succeeds; its
// sub-commands succeed or fail one by one). The table never keeps a
// reference into cmd.
func (t *Table) ApplyCommand(index uint64, cmd *pb.Command) Result {
	t.mu.Lock()
	defer t.mu.Unlock()
	prev := t.index
	t.index = max(t.index, index)
	t.applied = max(t.applied, index)
	tx := &txn{t: t, touched: map[string]bool{}}
	res := tx.apply(cmd, 0)
	if res.Err != nil {
		// Every operation checks before it changes anything, so nothing
		// but the index needs undoing.
		t.index = prev
	}
	res.Index = t.index
	for n := range tx.touched {
		res.Nodes = append(res.Nodes, n)
		t.nodeIndex[n] = t.index
	}
	sort.Strings(res.Nodes)
	return res
}

// txn carries the state of one Apply call.
type txn struct {
	t       *Table
	now     int64
	touched map[string]bool
}

// apply applies one command. A command without a time (now_unix_nano 0)
// takes the time of the batch holding it.
func (x *txn) apply(cmd *pb.Command, now int64) Result {
	if t := cmd.GetNowUnixNano(); t != 0 {
		now = t
	}
	x.now = now
	var ids []string
	var err error
	switch op := cmd.GetOp().(type) {
	case *pb.Command_Batch:
		var res Result
		for _, c := range op.Batch.GetCommands() {
			r := x.apply(c, now)
			res.IDs = append(res.IDs, r.IDs...)
			res.Results = append(res.Results, r)
		}
		return res
	case *pb.Command_RegisterNode:
		ids, err = x.registerNode(op.RegisterNode.GetNode())
	case *pb.Command_SetNodeState:
		ids, err = x.setNodeState(op.SetNodeState.GetName(), op.SetNodeState.GetState())
	case *pb.Command_SetDraining:
		ids, err = x.setDraining(op.SetDraining.GetName(), op.SetDraining.GetDraining())
	case *pb.Command_RemoveNode:
		ids, err = x.removeNode(op.RemoveNode.GetName())
	case *pb.Command_Spawn:
		ids, err = x.spawnOnce(op.Spawn)
	case *pb.Command_Kill:
		ids, err = x.kill(op.Kill.GetIds(), op.Kill.GetSignal())
	case *pb.Command_Report:
		ids = x.report(op.Report)
	case *pb.Command_Resize:
		ids, err = x.resize(op.Resize.GetId(), op.Resize.GetResources(), op.Resize.GetMove())
	case *pb.Command_Hold:
		err = x.hold(op.Hold)
	case *pb.Command_Prune:
		ids = x.prune(op.Prune.GetBeforeUnixNano())
	case *pb.Command_SetTrust:
		err = x.setTrust(op.SetTrust.GetTrust())
	case *pb.Command_AddToken:
		err = x.addToken(op.AddToken.GetToken())
	case *pb.Command_RevokeToken:
		err = x.revokeToken(op.RevokeToken.GetId())
	default:
		err = fmt.Errorf("%w: empty command", ErrDecode)
	}
	return Result{IDs: ids, Err: err}
}

// put stores a new version of a record and keeps every index in step.
func (x *txn) put(rec *pb.ProcessRecord) {
	t := x.t
	rec.ModifyIndex = t.index
	rec.UpdatedUnixNano = x.now
	old := t.procs[rec.Id]
	if old != nil && live(old) {
		for _, n := range holders(old) {
			t.release(n, old)
			x.touched[n] = true
			if !live(rec) || !slices.Contains(holders(rec), n) {
				t.depart(n, rec.Id)
			}
		}
	}
	if old != nil && old.State == pb.ProcessState_PROCESS_STATE_PENDING && rec.State != old.State {
		t.pending = slices.DeleteFunc(t.pending, func(id string) bool { return id == rec.Id })
	}
	if (old == nil || old.State != pb.ProcessState_PROCESS_STATE_PENDING) && rec.State == pb.ProcessState_PROCESS_STATE_PENDING {
		t.pending = append(t.pending, rec.Id)
	}
	t.procs[rec.Id] = rec
	if old == nil {
		addIndex(t.byName, rec.Spec.GetName(), rec.Id)
		t.insertOrder(rec)
	} else {
		t.states[old.State]--
	}
	t.states[rec.State]++
	if live(rec) {
		for _, n := range holders(rec) {
			t.hold(n, rec)
			t.logChange(n, rec.Id)
			x.touched[n] = true
		}
	}
}

// holders are the nodes a live record reserves room on: its node, and during
// a make-before-break move also the node it moves to.
func holders(rec *pb.ProcessRecord) []string {
	switch {
	case rec.Node == "":
		return nil
	case rec.MoveTo != "":
		return []string{rec.Node, rec.MoveTo}
	}
	return []string{rec.Node}
}

func (t *Table) hold(node string, rec *pb.ProcessRecord) {
	addIndex(t.byNode, node, rec.Id)
	a := t.alloc[node]
	if a == nil {
		a = &Alloc{}
		t.alloc[node] = a
		t.candsOK = false
	}
	a.add(rec.Spec.GetResources(), 1)
}

func (t *Table) release(node string, rec *pb.ProcessRecord) {
	delIndex(t.byNode, node, rec.Id)
	if a := t.alloc[node]; a != nil {
		a.add(rec.Spec.GetResources(), -1)
		if a.Count == 0 {
			delete(t.alloc, node)
			t.candsOK = false
		}
	}
}

func (a *Alloc) add(r *pb.Resources, sign int64) {
	a.CPUMin += sign * r.GetCpuMinMilli()
	a.CPUMax += sign * r.GetCpuMaxMilli()
	a.MemMin += sign * r.GetMemMinBytes()
	a.MemMax += sign * r.GetMemMaxBytes()
	a.Count += int(sign)
}

func addIndex(m map[string]map[string]struct{}, key, id string) {
	s := m[key]
	if s == nil {
		s = map[string]struct{}{}
		m[key] = s
	}
	s[id] = struct{}{}
}

func delIndex(m map[string]map[string]struct{}, key, id string) {
	if s := m[key]; s != nil {
		delete(s, id)
		if len(s) == 0 {
			delete(m, key)
		}
	}
}

func live(rec *pb.ProcessRecord) bool { return !Terminal(rec.State) }

func sortedKeys(m map[string]struct{}) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// ---- nodes ----

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
	} else {
		rec.JoinedUnixNano = old.JoinedUnixNano
		rec.Draining = old.Draining
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
		return x.placePending(), nil
	}
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
		target, err := t.place(old.Spec)
		if err != nil {
			continue
		}
		rec := proto.CloneOf(old)
		rec.MoveTo = target
		x.put(rec)
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
	return x.evacuate(name, "node "+name+" removed"), nil
}

// evacuate moves every live process off a lost node under a new incarnation.
// Processes that were being killed are finished instead.
func (x *txn) evacuate(name, reason string) []string {
	t := x.t
	ids := sortedKeys(t.byNode[name])
	for _, id := range ids {
		rec := proto.CloneOf(t.procs[id])
		if rec.Node != name {
			// It was moving here: the move is off, it stays where it runs.
			rec.MoveTo = ""
			x.put(rec)
			continue
		}
		x.retire(rec, reason)
		if rec.Stop {
			rec.State = pb.ProcessState_PROCESS_STATE_KILLED
			rec.Reason = reason
			rec.FinishedUnixNano = x.now
			x.put(rec)
			continue
		}
		rec.Incarnation++
		rec.Pid, rec.StartTime, rec.StartedUnixNano = 0, 0, 0
		if rec.MoveTo != "" {
			// A move was under way: its next incarnation is already
			// starting on the target, so finish the move there.
			rec.Node, rec.MoveTo, rec.State = rec.MoveTo, "", pb.ProcessState_PROCESS_STATE_STARTING
			rec.Reason = "moved: " + reason
		} else if n, err := t.place(rec.Spec); err == nil {
			rec.Node, rec.State = n, pb.ProcessState_PROCESS_STATE_STARTING
			rec.Reason = "moved: " + reason
		} else {
			rec.Node, rec.State = "", pb.ProcessState_PROCESS_STATE_PENDING
			rec.Reason = "waiting for room: " + err.Error()
		}
		x.put(rec)
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
		n, err := t.place(rec.Spec)
		if err != nil {
			continue
		}
		rec = proto.CloneOf(rec)
		rec.Node, rec.State, rec.Reason = n, pb.ProcessState_PROCESS_STATE_STARTING, ""
		x.put(rec)
		placed = append(placed, id)
	}
	return placed
}

// ---- processes ----

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
	var extra []Alloc // by candidate: the replicas placed so far
	nodes := make([]string, len(ids))
	for i := range ids {
		k, err := t.placeWith(spec, extra)
		if err != nil {
			if len(ids) > 1 {
				return nil, fmt.Errorf("replica %d of %d: %w", i+1, len(ids), err)
			}
			return nil, err
		}
		cs := t.candidates()
		nodes[i] = cs[k].name
		if extra == nil {
			extra = make([]Alloc, len(cs))
		}
		extra[k].add(spec.Resources, 1)
	}
	spec = proto.CloneOf(spec) // shared by the replicas, never by the caller
	for i, id := range ids {
		x.put(&pb.ProcessRecord{
			Id: id, Spec: spec, Node: nodes[i], State: pb.ProcessState_PROCESS_STATE_STARTING,
			Incarnation: 1, CreatedUnixNano: x.now,
		})
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
	t := x.t
	if len(ids) == 0 {
		return nil, fmt.Errorf("%w: kill needs at least one id", ErrInvalid)
	}
	if signal < 0 || signal > 64 {
		return nil, fmt.Errorf("%w: signal %d", ErrInvalid, signal)
	}
	for _, id := range ids {
		if t.procs[id] == nil {
			return nil, fmt.Errorf("%w: process %q", ErrNotFound, id)
		}
	}
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
		}
		x.put(rec)
		changed = append(changed, id)
	}
	return changed, nil
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
			}
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
		rec := proto.CloneOf(old)
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
		if proto.Equal(rec, old) {
			continue
		}
		x.put(rec)
		changed = append(changed, u.Id)
	}
	if freed {
		changed = append(changed, x.placePending()...)
	}
	return changed
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
	for _, n := range holders(old) {
		a := t.allocOf(n)
		a.add(old.Spec.GetResources(), -1)
		err := fits(t.nodes[n], &a, r)
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
		target, perr := t.place(rec.Spec)
		if perr != nil {
			return nil, fmt.Errorf("node %s cannot hold it (%v), and no node can take it: %w", n, err, perr)
		}
		rec.MoveTo = target
	}
	x.put(rec)
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

// ---- placement ----

// place picks a node for spec: the pinned node if it has room, else the up,
// undrained node with room and the fewest processes (ties to the most free
// CPU, then the lowest name).
func (t *Table) place(spec *pb.ProcessSpec) (string, error) {
	k, err := t.placeWith(spec, nil)
	if err != nil {
		return "", err
	}
	return t.candidates()[k].name, nil
}

// candidates returns the placement cache, rebuilt if it is stale.
func (t *Table) candidates() []cand {
	if !t.candsOK {
		t.cands = t.cands[:0]
		for _, name := range t.nodeOrder {
			t.cands = append(t.cands, cand{name: name, rec: t.nodes[name], alloc: t.alloc[name]})
		}
		t.candsOK = true
	}
	return t.cands
}

// placeWith is place for one replica of several: extra, if not nil, holds
// by candidate the reservations not yet in the table. It returns the
// candidate's position.
func (t *Table) placeWith(spec *pb.ProcessSpec, extra []Alloc) (int, error) {
	cs := t.candidates()
	lo, hi := 0, len(cs)
	if spec.Node != "" {
		// Pinned: only that node is looked at, draining or not.
		i, ok := slices.BinarySearch(t.nodeOrder, spec.Node)
		if !ok {
			return -1, fmt.Errorf("%w: %q", ErrUnknownNode, spec.Node)
		}
		lo, hi = i, i+1
	}
	best, bestCount, bestFree := -1, 0, int64(0)
	bestNo := -1
	var bestNoFree [2]int64
	var bestNoErr, offerErr error // offerErr: the first node that lacks what spec needs (Offers)
	up := 0
	for k := lo; k < hi; k++ {
		c := &cs[k]
		n := c.rec
		if n.State != pb.NodeState_NODE_STATE_UP || (n.Draining && spec.Node == "") {
			continue
		}
		if err := Offers(n, spec); err != nil {
			if offerErr == nil {
				offerErr = err
			}
			continue
		}
		up++
		var a Alloc
		if c.alloc != nil {
			a = *c.alloc
		}
		if extra != nil {
			a.plus(&extra[k])
		}
		if err := fits(n, &a, spec.Resources); err != nil {
			fc, fm := n.Capacity.GetCpuMaxMilli()-a.CPUMin, n.Capacity.GetMemMaxBytes()-a.MemMin
			if bestNo < 0 || fc > bestNoFree[0] || (fc == bestNoFree[0] && fm > bestNoFree[1]) {
				bestNo, bestNoFree, bestNoErr = k, [2]int64{fc, fm}, err
			}
			continue
		}
		free := n.Capacity.GetCpuMaxMilli() - a.CPUMin
		if best < 0 || a.Count < bestCount || (a.Count == bestCount && free > bestFree) {
			best, bestCount, bestFree = k, a.Count, free
		}
	}
	if best >= 0 {
		return best, nil
	}
	want := fmt.Sprintf("cpu %s, memory %s", Cores(spec.Resources.GetCpuMinMilli()), Bytes(spec.Resources.GetMemMinBytes()))
	switch {
	case up == 0 && offerErr != nil && spec.Node != "":
		return -1, fmt.Errorf("%w: %v", ErrNoCapacity, offerErr)
	case up == 0 && offerErr != nil:
		return -1, fmt.Errorf("%w: no up node offers what it needs (%v)", ErrNoCapacity, offerErr)
	case spec.Node != "" && up == 0:
		return -1, fmt.Errorf("%w: node %s is %s", ErrNoCapacity, spec.Node, NodeStateName(t.nodes[spec.Node].State))
	case up == 0:
		return -1, fmt.Errorf("%w: no node is up and accepting work", ErrNoCapacity)
	}
	return -1, fmt.Errorf("%w for %s: the most free is cpu %s, memory %s on %s (%d nodes up): %v",
		ErrNoCapacity, want, Cores(max(bestNoFree[0], 0)), Bytes(max(bestNoFree[1], 0)), cs[bestNo].name, up, bestNoErr)
}

func (a *Alloc) plus(e *Alloc) {
	a.CPUMin += e.CPUMin
	a.CPUMax += e.CPUMax
	a.MemMin += e.MemMin
	a.MemMax += e.MemMax
	a.Count += e.Count
}

func (t *Table) allocOf(node string) Alloc {
	if p := t.alloc[node]; p != nil {
		return *p
	}
	return Alloc{}
}

// fits reports whether r fits on node n that already holds a. Capacity lives
// in the node's max fields; the sum of maxima may reach capacity times the
// node's overcommit percentage (0 = unchecked).
//
// Every quantity is non-negative and may be as large as MaxInt64, so the
// checks compare a request with what is left (limit - used) rather than
// adding to what is used, which could overflow.
func fits(n *pb.NodeRecord, a *Alloc, r *pb.Resources) error {
	c := n.GetCapacity()
	if need := r.GetCpuMinMilli(); need > 0 && !within(need, a.CPUMin, c.GetCpuMaxMilli()) {
		return fmt.Errorf("cpu min %s > free %s", Cores(need), Cores(max(c.GetCpuMaxMilli()-a.CPUMin, 0)))
	}
	if need := r.GetMemMinBytes(); need > 0 && !within(need, a.MemMin, c.GetMemMaxBytes()) {
		return fmt.Errorf("memory min %s > free %s", Bytes(need), Bytes(max(c.GetMemMaxBytes()-a.MemMin, 0)))
	}
	if oc := n.GetOvercommitPercent(); oc > 0 {
		if m := r.GetCpuMaxMilli(); m > 0 && !within(m, a.CPUMax, percent(c.GetCpuMaxMilli(), oc)) {
			return fmt.Errorf("cpu max would exceed %d%% of capacity", oc)
		}
		if m := r.GetMemMaxBytes(); m > 0 && !within(m, a.MemMax, percent(c.GetMemMaxBytes(), oc)) {
			return fmt.Errorf("memory max would exceed %d%% of capacity", oc)
		}
	}
	return nil
}

// within reports whether used+need <= limit, without overflow. A negative
// used means the sum already wrapped (sums of maxima are not checked while a
// node has no overcommit limit): nothing more fits.
func within(need, used, limit int64) bool {
	return used >= 0 && limit >= used && need <= limit-used
}

// percent returns v*p/100 for v >= 0, saturating at MaxInt64.
func percent(v int64, p uint32) int64 {
	if v <= 0 {
		return 0
	}
	hi, lo := bits.Mul64(uint64(v), uint64(p))
	if hi >= 100 {
		return math.MaxInt64
	}
	q, _ := bits.Div64(hi, lo, 100)
	if q > math.MaxInt64 {
		return math.MaxInt64
	}
	return int64(q)
}

// ---- reads ----

// Index is the log index of the last applied command.
func (t *Table) Index() uint64 {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.index
}

// Applied is the log index of the last command applied, whether it
// succeeded or not (Index rolls back when a command fails).
func (t *Table) Applied() uint64 {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.applied
}

// Get returns a process record, or nil.
func (t *Table) Get(id string) *pb.ProcessRecord {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.procs[id]
}

// Resolve turns a reference into process ids: an exact id, a unique id
// prefix, or a name (every process with that name).
func (t *Table) Resolve(ref string) ([]string, error) {
	if ref == "" {
		// Unnamed processes share the empty name; "" must not mean all of
		// them.
		return nil, fmt.Errorf("%w: no process %q", ErrNotFound, ref)
	}
	t.mu.RLock()
	defer t.mu.RUnlock()
	if t.procs[ref] != nil {
		return []string{ref}, nil
	}
	if s := t.byName[ref]; len(s) > 0 {
		return sortedKeys(s), nil
	}
	var match []string
	if len(ref) >= 3 {
		for id := range t.procs {
			if strings.HasPrefix(id, ref) {
				match = append(match, id)
				if len(match) > 1 {
					return nil, fmt.Errorf("%w: %q matches more than one process", ErrInvalid, ref)
				}
			}
		}
	}
	if len(match) == 1 {
		return match, nil
	}
	return nil, fmt.Errorf("%w: no process %q", ErrNotFound, ref)
}

// Processes returns records sorted by creation time, then id. all includes
// terminal records; node, if set, keeps only that node's live processes.
func (t *Table) Processes(all bool, node string) []*pb.ProcessRecord {
	t.mu.RLock()
	if node == "" {
		out := make([]*pb.ProcessRecord, 0, len(t.procs))
		for _, id := range t.order {
			if r := t.procs[id]; all || live(r) {
				out = append(out, r)
			}
		}
		t.mu.RUnlock()
		return out
	}
	var out []*pb.ProcessRecord
	for id := range t.byNode[node] {
		out = append(out, t.procs[id])
	}
	t.mu.RUnlock()
	sort.Slice(out, func(i, j int) bool {
		if out[i].CreatedUnixNano != out[j].CreatedUnixNano {
			return out[i].CreatedUnixNano < out[j].CreatedUnixNano
		}
		return out[i].Id < out[j].Id
	})
	return out
}

// Assignments returns a node's live processes, sorted by id, and the index
// of the last change to them.
func (t *Table) Assignments(node string) ([]*pb.ProcessRecord, uint64) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	out := make([]*pb.ProcessRecord, 0, len(t.byNode[node]))
	for _, id := range sortedKeys(t.byNode[node]) {
		out = append(out, t.procs[id])
	}
	return out, t.nodeIndex[node]
}

// AssignmentsSince returns what changed in a node's assignments after index
// since: the processes assigned now that changed, and the ids no longer
// assigned. When since is 0 or older than the table can tell, full is set
// and changed holds every assigned process (removed is then empty).
func (t *Table) AssignmentsSince(node string, since uint64) (changed []*pb.ProcessRecord, removed []string, full bool, index uint64) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	d := t.left[node]
	base := t.leftBase
	if d != nil {
		base = d.since
	}
	full = since == 0 || since < base
	if c := t.changes[node]; !full && (c == nil || c.since <= since) {
		// Only what the change log names, not every assigned process.
		var ids []string
		if c != nil {
			i, _ := slices.BinarySearchFunc(c.log, since+1, func(e departure, idx uint64) int {
				return cmpUint(e.index, idx)
			})
			for _, e := range c.log[i:] {
				if _, ok := t.byNode[node][e.id]; ok {
					ids = append(ids, e.id)
				}
			}
		}
		slices.Sort(ids)
		for _, id := range slices.Compact(ids) {
			changed = append(changed, t.procs[id])
		}
	} else {
		for _, id := range sortedKeys(t.byNode[node]) {
			if r := t.procs[id]; full || r.ModifyIndex > since {
				changed = append(changed, r)
			}
		}
	}
	if !full && d != nil {
		i, _ := slices.BinarySearchFunc(d.log, since+1, func(e departure, idx uint64) int {
			return cmpUint(e.index, idx)
		})
		seen := map[string]bool{}
		for _, e := range d.log[i:] {
			if _, back := t.byNode[node][e.id]; !back && !seen[e.id] {
				seen[e.id] = true
				removed = append(removed, e.id)
			}
		}
	}
	return changed, removed, full, t.nodeIndex[node]
}

func cmpUint(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// handedOff marks id's departure from node, just logged, as a committed
// make-before-break move: the node may stop its copy gracefully.
func (t *Table) handedOff(node, id string) {
	if d := t.left[node]; d != nil && len(d.log) > 0 && d.log[len(d.log)-1].id == id {
		d.log[len(d.log)-1].handoff = true
	}
}

// HandedOff returns which of the ids AssignmentsSince(node, since) reports
// removed left by a committed make-before-break move: their next
// incarnation already runs elsewhere, so the node may stop its copy
// gracefully rather than kill it at once. It is empty when AssignmentsSince
// would answer with a full list.
func (t *Table) HandedOff(node string, since uint64) []string {
	t.mu.RLock()
	defer t.mu.RUnlock()
	d := t.left[node]
	if d == nil || since == 0 || since < d.since {
		return nil
	}
	i, _ := slices.BinarySearchFunc(d.log, since+1, func(e departure, idx uint64) int { return cmpUint(e.index, idx) })
	var out []string
	for _, e := range d.log[i:] {
		if _, back := t.byNode[node][e.id]; e.handoff && !back && !slices.Contains(out, e.id) {
			out = append(out, e.id)
		}
	}
	return out
}

// NodeIndex returns the index of the last change to a node's assignments.
func (t *Table) NodeIndex(node string) uint64 {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.nodeIndex[node]
}

// NodeView is a node record with its current allocation.
type NodeView struct {
	Node  *pb.NodeRecord
	Alloc Alloc
}

// Nodes returns every node, sorted by name.
func (t *Table) Nodes() []NodeView {
	t.mu.RLock()
	defer t.mu.RUnlock()
	out := make([]NodeView, 0, len(t.nodeOrder))
	for _, name := range t.nodeOrder {
		out = append(out, NodeView{Node: t.nodes[name], Alloc: t.allocOf(name)})
	}
	return out
}

// NodeRecords returns every node record, sorted by name, without the
// allocation sums Nodes adds.
func (t *Table) NodeRecords() []*pb.NodeRecord {
	t.mu.RLock()
	defer t.mu.RUnlock()
	out := make([]*pb.NodeRecord, 0, len(t.nodeOrder))
	for _, name := range t.nodeOrder {
		out = append(out, t.nodes[name])
	}
	return out
}

// ServerRecords returns the records of the nodes with the server role,
// sorted by name. It costs O(servers), not O(nodes): every heartbeat answer
// lists the servers.
func (t *Table) ServerRecords() []*pb.NodeRecord {
	t.mu.RLock()
	defer t.mu.RUnlock()
	out := make([]*pb.NodeRecord, 0, len(t.servers))
	for _, name := range t.servers {
		out = append(out, t.nodes[name])
	}
	return out
}

// Node returns one node record, or nil.
func (t *Table) Node(name string) *pb.NodeRecord {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.nodes[name]
}

// StateCounts returns how many process records are in each state.
func (t *Table) StateCounts() map[pb.ProcessState]int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	out := make(map[pb.ProcessState]int, len(t.states))
	for st, n := range t.states {
		if n != 0 {
			out[st] = n
		}
	}
	return out
}

// Len returns the number of process records.
func (t *Table) Len() int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return len(t.procs)
}
