package table

import (
	"bufio"
	"cmp"
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"

	"google.golang.org/protobuf/encoding/protodelim"
	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
)

const snapshotVersion = 1

// snapshotBuffer sizes the buffers of Persist and Restore. Each call
// allocates one, so it is kept modest: the sink or file behind them is
// buffered too.
const snapshotBuffer = 64 << 10

// Snapshot is a point-in-time capture of the table. Taking one copies only
// pointers (records are immutable), so it is cheap enough to do on the apply
// path; Persist does the encoding and I/O later.
type Snapshot struct {
	index   uint64
	nodes   []*pb.NodeRecord
	procs   []*pb.ProcessRecord
	pending []string
	trust   *pb.Trust
	tokens  []*pb.TokenRecord
	events  []*pb.Event
	evBase  uint64
	// requests, oldest first, and the applied index (requests.go)
	requests []*pb.RequestRecord
	applied  uint64
	services []*pb.ServiceRecord // sorted by name (services.go)
}

// Snapshot captures the table's state.
func (t *Table) Snapshot() *Snapshot {
	t.mu.RLock()
	defer t.mu.RUnlock()
	s := &Snapshot{
		index:   t.index,
		nodes:   make([]*pb.NodeRecord, 0, len(t.nodes)),
		procs:   make([]*pb.ProcessRecord, 0, len(t.procs)),
		pending: slices.Clone(t.pending),
		trust:   t.trust,
		tokens:  sortedTokens(t.tokens),
		events:  slices.Clone(t.events),
		evBase:  t.eventsBase,

		requests: t.requests.live(),
		applied:  t.applied,
		services: t.sortedServices(),
	}
	for _, name := range t.nodeOrder {
		s.nodes = append(s.nodes, t.nodes[name])
	}
	for _, r := range t.procs {
		s.procs = append(s.procs, r)
	}
	return s
}

// Persist writes the snapshot: a header, then every node and process record,
// each length-delimited. Records are sorted by id, so equal tables give equal
// bytes.
func (s *Snapshot) Persist(w io.Writer) error {
	slices.SortFunc(s.procs, func(a, b *pb.ProcessRecord) int { return strings.Compare(a.Id, b.Id) })
	bw := bufio.NewWriterSize(w, snapshotBuffer)
	hdr := &pb.SnapshotHeader{
		Version: snapshotVersion, Index: s.index, Pending: s.pending,
		NodeCount: uint64(len(s.nodes)), ProcessCount: uint64(len(s.procs)),
		Trust: s.trust, Tokens: s.tokens, Requests: s.requests, AppliedIndex: s.applied,
		Events: s.events, EventsBase: s.evBase, Services: s.services,
	}
	if _, err := protodelim.MarshalTo(bw, hdr); err != nil {
		return fmt.Errorf("persist header: %w", err)
	}
	for _, n := range s.nodes {
		if _, err := protodelim.MarshalTo(bw, n); err != nil {
			return fmt.Errorf("persist node %s: %w", n.Name, err)
		}
	}
	for _, p := range s.procs {
		if _, err := protodelim.MarshalTo(bw, p); err != nil {
			return fmt.Errorf("persist process %s: %w", p.Id, err)
		}
	}
	return bw.Flush()
}

// Release frees the snapshot.
func (s *Snapshot) Release() {}

// Restore replaces the whole table with the snapshot read from r. On error
// the table is left unchanged.
func (t *Table) Restore(r io.Reader) error {
	br := bufio.NewReaderSize(r, snapshotBuffer)
	opts := protodelim.UnmarshalOptions{MaxSize: 64 << 20}
	var hdr pb.SnapshotHeader
	if err := opts.UnmarshalFrom(br, &hdr); err != nil {
		return fmt.Errorf("restore header: %w", err)
	}
	if hdr.Version != snapshotVersion {
		return fmt.Errorf("restore: snapshot version %d, want %d", hdr.Version, snapshotVersion)
	}
	nt := New()
	nt.index = hdr.Index
	nt.applied = max(hdr.AppliedIndex, hdr.Index)
	nt.requests.restore(hdr.Requests)
	for i := uint64(0); i < hdr.NodeCount; i++ {
		n := &pb.NodeRecord{}
		if err := opts.UnmarshalFrom(br, n); err != nil {
			return fmt.Errorf("restore node %d: %w", i, err)
		}
		nt.nodes[n.Name] = n
		nt.nodeOrder = append(nt.nodeOrder, n.Name)
		if n.Role == pb.NodeRole_NODE_ROLE_SERVER {
			nt.servers = append(nt.servers, n.Name)
		}
	}
	sort.Strings(nt.nodeOrder)
	sort.Strings(nt.servers)
	// The counts come from the file: they size what is allocated up front
	// only as far as the records are there to fill it.
	nprocs := int(min(hdr.ProcessCount, 1<<24))
	nt.procs = make(map[string]*pb.ProcessRecord, nprocs)
	recs := make([]*pb.ProcessRecord, 0, nprocs)
	for i := uint64(0); i < hdr.ProcessCount; i++ {
		p := &pb.ProcessRecord{}
		if err := opts.UnmarshalFrom(br, p); err != nil {
			return fmt.Errorf("restore process %d: %w", i, err)
		}
		recs = append(recs, p)
		nt.procs[p.Id] = p
		nt.states[p.State]++
		addIndex(nt.byName, p.Spec.GetName(), p.Id)
		if live(p) && p.Want != nil {
			nt.wants[p.Id] = struct{}{}
		}
		if live(p) {
			for _, n := range holders(p) {
				nt.hold(n, p)
			}
		}
	}
	// Creation order (orderLess), sorting the records themselves: a
	// comparison that looked each up by id cost a third of a restore.
	slices.SortFunc(recs, func(a, b *pb.ProcessRecord) int {
		if c := cmp.Compare(a.CreatedUnixNano, b.CreatedUnixNano); c != 0 {
			return c
		}
		return strings.Compare(a.Id, b.Id)
	})
	nt.order = make([]string, 0, len(nt.procs))
	for _, p := range recs {
		if nt.procs[p.Id] == p { // an id twice in a file: the last record read counts
			nt.order = append(nt.order, p.Id)
		}
	}
	// Every node's assignment index becomes the snapshot index: no agent can
	// hold a newer one, so none waits for a change it has already seen.
	for _, n := range nt.nodes {
		nt.nodeIndex[n.Name] = hdr.Index
	}
	for _, sv := range hdr.Services {
		nt.services[sv.Name] = sv
	}
	nt.pending = hdr.Pending
	nt.trust = hdr.Trust
	for _, tk := range hdr.Tokens {
		nt.tokens[tk.Id] = tk
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.index, t.procs, t.nodes, t.nodeOrder, t.servers = nt.index, nt.procs, nt.nodes, nt.nodeOrder, nt.servers
	t.byNode, t.byName, t.pending, t.alloc, t.nodeIndex = nt.byNode, nt.byName, nt.pending, nt.alloc, nt.nodeIndex
	t.left, t.leftBase, t.changes = map[string]*departures{}, hdr.Index, map[string]*departures{}
	t.cands, t.candsOK, t.states, t.order = nil, false, nt.states, nt.order
	t.trust, t.tokens = nt.trust, nt.tokens
	t.requests, t.applied = nt.requests, nt.applied
	t.wants, t.events, t.eventsBase = nt.wants, hdr.Events, hdr.EventsBase
	t.services = nt.services
	return nil
}

// Equal reports whether two tables hold the same records, events and request ids
// (for tests); their applied indexes may differ.
func Equal(a, b *Table) bool {
	sa, sb := a.Snapshot(), b.Snapshot()
	if sa.index != sb.index || len(sa.requests) != len(sb.requests) ||
		len(sa.nodes) != len(sb.nodes) || len(sa.procs) != len(sb.procs) ||
		!slices.Equal(sa.pending, sb.pending) || !proto.Equal(sa.trust, sb.trust) || len(sa.tokens) != len(sb.tokens) ||
		len(sa.events) != len(sb.events) || sa.evBase != sb.evBase || len(sa.services) != len(sb.services) {
		return false
	}
	for i := range sa.services {
		if !proto.Equal(sa.services[i], sb.services[i]) {
			return false
		}
	}
	for i := range sa.events {
		if !proto.Equal(sa.events[i], sb.events[i]) {
			return false
		}
	}
	for i := range sa.tokens {
		if !proto.Equal(sa.tokens[i], sb.tokens[i]) {
			return false
		}
	}
	for i := range sa.requests {
		if !proto.Equal(sa.requests[i], sb.requests[i]) {
			return false
		}
	}
	for i := range sa.nodes {
		if !proto.Equal(sa.nodes[i], sb.nodes[i]) {
			return false
		}
	}
	sort.Slice(sa.procs, func(i, j int) bool { return sa.procs[i].Id < sa.procs[j].Id })
	sort.Slice(sb.procs, func(i, j int) bool { return sb.procs[i].Id < sb.procs[j].Id })
	for i := range sa.procs {
		if !proto.Equal(sa.procs[i], sb.procs[i]) {
			return false
		}
	}
	return true
}
