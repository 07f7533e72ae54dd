package table

import (
	"fmt"
	"slices"
	"sort"
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
	// wants holds the live processes whose growth waits for room
	// (ProcessRecord.want; derived, grants.go).
	wants map[string]struct{}
	// events is the ring of recent events, oldest first, and eventsBase
	// the index of the newest event dropped from it (events.go).
	events     []*pb.Event
	eventsBase uint64
	// services by name (services.go), and the ports one command has
	// handed out but not yet stored (cleared after every command).
	services map[string]*pb.ServiceRecord
	txPorts  map[string]map[uint32]bool
	spread   string // the service a spawn under way makes: placement spreads it
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

// Alloc sums what the live processes on one node hold (see claim).
type Alloc struct {
	CPUGrant, MemGrant int64 // grants: what placement counts against capacity
	CPUMin, MemMin     int64 // minima
	CPUMax, MemMax     int64 // maxima (0 = unbounded counts 0)
	// MemLimit sums the memory the processes may use without asking: the
	// grants of elastic ones, the maxima of fixed ones (--overcommit
	// bounds it).
	MemLimit int64
	Count    int
	// Same counts, for placement only, the replicas of the service being
	// placed (services.go): never part of a node's sums.
	Same int
}

// Result is what Apply returns for one command.
type Result struct {
	Index   uint64
	IDs     []string // processes created or changed
	Nodes   []string // nodes whose assignments changed, sorted
	Err     error
	Results []Result // one per command of a Batch
	// Events are the events the command added to the ring (events.go).
	Events []*pb.Event
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
	t.wants = map[string]struct{}{}
	t.events, t.eventsBase = nil, 0
	t.services = map[string]*pb.ServiceRecord{}
	t.txPorts = nil
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
	t.txPorts = nil
	if res.Err != nil {
		// Every operation checks before it changes anything, so nothing
		// but the index needs undoing.
		t.index = prev
	} else {
		// Room freed by this command goes to the growths waiting for it.
		res.IDs = append(res.IDs, tx.grantWants()...)
		res.Events = tx.publish()
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
	events  []*pb.Event // to publish if the command succeeds (events.go)
	// replicaOf and replicaIdx: the service and replica indexes the spawn
	// under way makes (services.go).
	replicaOf  string
	replicaIdx []uint32
	// newRecs, while collecting, holds the new records put, which go into
	// the creation order together (sortNew) instead of one by one.
	newRecs    []*pb.ProcessRecord
	collecting bool
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
	mark := len(x.events)
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
	case *pb.Command_Scale:
		ids, err = x.scale(op.Scale)
	case *pb.Command_UpdateService:
		err = x.updateService(op.UpdateService)
	case *pb.Command_AddReplicas:
		ids, err = x.addReplicas(op.AddReplicas)
	case *pb.Command_Kill:
		ids, err = x.kill(op.Kill.GetIds(), op.Kill.GetSignal())
	case *pb.Command_Report:
		ids = x.report(op.Report)
	case *pb.Command_Resize:
		ids, err = x.resize(op.Resize.GetId(), op.Resize.GetResources(), op.Resize.GetMove())
	case *pb.Command_Hold:
		err = x.hold(op.Hold)
	case *pb.Command_SetGrant:
		ids, err = x.setGrant(op.SetGrant)
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
	if err != nil {
		x.events = x.events[:mark] // a failed command changed nothing
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
	if rec.State != pb.ProcessState_PROCESS_STATE_RUNNING || (old != nil && old.Incarnation != rec.Incarnation) {
		rec.Health = pb.Health_HEALTH_UNSPECIFIED
	}
	t.assignPorts(old, rec)
	t.procs[rec.Id] = rec
	if old == nil {
		addIndex(t.byName, rec.Spec.GetName(), rec.Id)
		if x.collecting {
			x.newRecs = append(x.newRecs, rec)
		} else {
			t.insertOrder(rec)
		}
	} else {
		t.states[old.State]--
	}
	t.states[rec.State]++
	if live(rec) && rec.Want != nil {
		t.wants[rec.Id] = struct{}{}
	} else {
		delete(t.wants, rec.Id)
	}
	if live(rec) {
		for _, n := range holders(rec) {
			t.hold(n, rec)
			t.logChange(n, rec.Id)
			x.touched[n] = true
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
