package raftlog

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
)

// Node is a running raft member. All methods are safe for concurrent use.
type Node struct {
	id       string
	addr     string
	raft     *raft.Raft
	bolt     *raftboltdb.BoltStore // nil in InMemory mode
	inmem    *inmemEntry           // nil unless InMemory
	logs     raft.LogStore         // what raft reads its entries from (read.go)
	hadState bool
	// office is the term in which this node, leading, last had a Barrier
	// applied: reads are served only in that term (read.go).
	office atomic.Uint64

	notifyCh  chan bool // raft -> forwarder
	leaderCh  chan bool // forwarder -> LeaderChanges
	stopFwd   chan struct{}
	fwdDone   chan struct{}
	closeOnce sync.Once
	closeErr  error
}

// Open starts a raft node. When DataDir already holds raft state, the FSM is
// restored from the latest snapshot and the rest of the log is replayed as it
// is (re)committed; Bootstrap is then ignored.
func Open(cfg Config, fsm FSM) (*Node, error) {
	if cfg.ID == "" {
		return nil, errors.New("raftlog: open: empty ID")
	}
	if fsm == nil {
		return nil, errors.New("raftlog: open: nil FSM")
	}
	if !cfg.InMemory && (cfg.BindAddr == "" || cfg.DataDir == "") {
		return nil, errors.New("raftlog: open: BindAddr and DataDir are required")
	}

	logOut := cfg.Logger
	if logOut == nil {
		logOut = os.Stderr
	}
	logger := hclog.New(&hclog.LoggerOptions{
		Name:   "raft." + cfg.ID,
		Level:  hclog.Info,
		Output: logOut,
	})

	rc := raftConfig(cfg, logger)
	if err := raft.ValidateConfig(rc); err != nil {
		return nil, fmt.Errorf("raftlog: open: %w", err)
	}

	n := &Node{
		id:       cfg.ID,
		notifyCh: make(chan bool, notifyBuffer),
		leaderCh: make(chan bool, notifyBuffer),
		stopFwd:  make(chan struct{}),
		fwdDone:  make(chan struct{}),
	}
	rc.NotifyCh = n.notifyCh

	var (
		logs   raft.LogStore
		stable raft.StableStore
		snaps  raft.SnapshotStore
		trans  raft.Transport
	)
	// cleanup releases what has been opened so far if Open fails.
	cleanup := func() {
		if t, ok := trans.(raft.WithClose); ok {
			t.Close()
		}
		if n.inmem != nil {
			n.inmem.unregister()
		}
		if n.bolt != nil {
			n.bolt.Close()
		}
	}

	if cfg.InMemory {
		store := raft.NewInmemStore()
		logs, stable, snaps = store, store, raft.NewInmemSnapshotStore()
		e, err := registerInmem(cfg.BindAddr)
		if err != nil {
			return nil, fmt.Errorf("raftlog: open: %w", err)
		}
		n.inmem, trans, n.addr = e, e.trans, string(e.addr)
	} else {
		if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
			return nil, fmt.Errorf("raftlog: open: data dir: %w", err)
		}
		bolt, err := raftboltdb.New(raftboltdb.Options{Path: filepath.Join(cfg.DataDir, "raft.db")})
		if err != nil {
			return nil, fmt.Errorf("raftlog: open: bolt store: %w", err)
		}
		n.bolt = bolt
		cache, err := raft.NewLogCache(logCacheSize, bolt)
		if err != nil {
			cleanup()
			return nil, fmt.Errorf("raftlog: open: log cache: %w", err)
		}
		logs, stable = cache, bolt
		fss, err := raft.NewFileSnapshotStoreWithLogger(cfg.DataDir, snapshotRetain, logger.Named("snapshot"))
		if err != nil {
			cleanup()
			return nil, fmt.Errorf("raftlog: open: snapshot store: %w", err)
		}
		snaps = fss

		var adv net.Addr
		if cfg.Advertise != "" {
			a, err := net.ResolveTCPAddr("tcp", cfg.Advertise)
			if err != nil {
				cleanup()
				return nil, fmt.Errorf("raftlog: open: advertise address: %w", err)
			}
			adv = a
		}
		if cfg.ServerTLS != nil || cfg.ClientTLS != nil {
			layer, err := newTLSLayer(cfg.BindAddr, adv, cfg.ServerTLS, cfg.ClientTLS)
			if err != nil {
				cleanup()
				return nil, fmt.Errorf("raftlog: open: transport: %w", err)
			}
			nt := raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
				Stream: layer, MaxPool: tcpMaxPool, Timeout: tcpTimeout, Logger: logger.Named("transport")})
			trans, n.addr = nt, string(nt.LocalAddr())
		} else {
			tcp, err := raft.NewTCPTransportWithLogger(cfg.BindAddr, adv, tcpMaxPool, tcpTimeout, logger.Named("transport"))
			if err != nil {
				cleanup()
				return nil, fmt.Errorf("raftlog: open: transport: %w", err)
			}
			trans, n.addr = tcp, string(tcp.LocalAddr())
		}
	}

	hadState, err := raft.HasExistingState(logs, stable, snaps)
	if err != nil {
		cleanup()
		return nil, fmt.Errorf("raftlog: open: check existing state: %w", err)
	}
	n.hadState = hadState
	n.logs = logs

	r, err := raft.NewRaft(rc, fsmAdapter{fsm}, logs, stable, snaps, trans)
	if err != nil {
		cleanup()
		return nil, fmt.Errorf("raftlog: open: %w", err)
	}
	n.raft = r
	go n.forwardLeadership()

	if cfg.Bootstrap && !hadState {
		boot := raft.Configuration{Servers: []raft.Server{{
			Suffrage: raft.Voter,
			ID:       raft.ServerID(cfg.ID),
			Address:  raft.ServerAddress(n.addr),
		}}}
		if err := r.BootstrapCluster(boot).Error(); err != nil {
			n.Shutdown()
			return nil, fmt.Errorf("raftlog: open: bootstrap: %w", err)
		}
	}
	return n, nil
}

func raftConfig(cfg Config, logger hclog.Logger) *raft.Config {
	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.ID)
	rc.Logger = logger
	rc.CommitTimeout = commitTimeout
	rc.MaxAppendEntries = maxAppendEntries
	rc.TrailingLogs = trailingLogs
	rc.SnapshotInterval = durOr(cfg.SnapshotInterval, snapshotInterval)

	rc.HeartbeatTimeout = durOr(cfg.HeartbeatTimeout, defaultHeartbeatTimeout)
	rc.ElectionTimeout = cfg.ElectionTimeout
	if rc.ElectionTimeout == 0 {
		rc.ElectionTimeout = max(defaultElectionTimeout, rc.HeartbeatTimeout)
	}
	rc.LeaderLeaseTimeout = cfg.LeaderLeaseTimeout
	if rc.LeaderLeaseTimeout == 0 {
		rc.LeaderLeaseTimeout = min(defaultLeaderLeaseTimeout, rc.HeartbeatTimeout)
	}
	rc.SnapshotThreshold = cfg.SnapshotThreshold
	if rc.SnapshotThreshold == 0 {
		rc.SnapshotThreshold = defaultSnapshotThreshold
	}
	return rc
}

func durOr(d, def time.Duration) time.Duration {
	if d == 0 {
		return def
	}
	return d
}

// forwardLeadership moves raft's leadership notifications to leaderCh without
// ever blocking raft: when leaderCh is full the oldest value is dropped, so the
// newest state is always the last one delivered.
func (n *Node) forwardLeadership() {
	defer close(n.fwdDone)
	push := func(v bool) {
		for {
			select {
			case n.leaderCh <- v:
				return
			default:
			}
			select {
			case <-n.leaderCh:
			default:
			}
		}
	}
	for {
		select {
		case v := <-n.notifyCh:
			push(v)
		case <-n.stopFwd:
			for {
				select {
				case v := <-n.notifyCh:
					push(v)
				default:
					close(n.leaderCh)
					return
				}
			}
		}
	}
}

// ID returns the node's raft server ID.
func (n *Node) ID() string { return n.id }

// Addr returns the raft address this node advertises (resolved when BindAddr
// used port 0).
func (n *Node) Addr() string { return n.addr }

// HadState reports whether raft state already existed when the node was opened
// (it resumed instead of bootstrapping).
func (n *Node) HadState() bool { return n.hadState }

// Apply replicates data and applies it to the FSM, returning the FSM's result
// and the entry's log index. It must run on the leader; otherwise the error
// wraps ErrNotLeader. The ctx deadline bounds the whole call; when ctx ends
// first the entry may still be committed later. Concurrent callers are
// group-committed by raft (one disk write per batch).
func (n *Node) Apply(ctx context.Context, data []byte) (result any, index uint64, err error) {
	if err := ctx.Err(); err != nil {
		return nil, 0, fmt.Errorf("apply: %w", err)
	}
	if err := n.leaderOnly(); err != nil {
		return nil, 0, fmt.Errorf("apply: %w", err)
	}
	f := n.raft.Apply(data, timeoutOf(ctx))
	if err := wait(ctx, f); err != nil {
		return nil, 0, fmt.Errorf("apply: %w", n.mapErr(err))
	}
	return f.Response(), f.Index(), nil
}

// IsLeader reports whether this node currently believes it is the leader.
func (n *Node) IsLeader() bool { return n.raft.State() == raft.Leader }

// Leader returns the ID and raft address of the current leader, or empty
// strings if unknown.
func (n *Node) Leader() (id, addr string) {
	a, i := n.raft.LeaderWithID()
	return string(i), string(a)
}

// LeaderChanges delivers true when this node becomes leader and false when it
// loses leadership. The channel is buffered and never blocks raft: if the
// reader falls behind, the oldest notifications are dropped, and the last
// value received is always the latest state. It is closed by Shutdown.
func (n *Node) LeaderChanges() <-chan bool { return n.leaderCh }

// AddVoter adds (or promotes) a voting member. It is a no-op if a voter with
// the same id and addr is already present; an existing id with a different
// addr has its address replaced. Leader only.
func (n *Node) AddVoter(ctx context.Context, id, addr string) error {
	if err := n.leaderOnly(); err != nil {
		return fmt.Errorf("add voter %s: %w", id, err)
	}
	servers, err := n.Servers()
	if err != nil {
		return fmt.Errorf("add voter %s: %w", id, err)
	}
	for _, s := range servers {
		if s.ID == id && s.Addr == addr && s.Voter {
			return nil
		}
	}
	f := n.raft.AddVoter(raft.ServerID(id), raft.ServerAddress(addr), 0, timeoutOf(ctx))
	if err := wait(ctx, f); err != nil {
		return fmt.Errorf("add voter %s at %s: %w", id, addr, n.mapErr(err))
	}
	return nil
}

// RemoveServer removes a member; removing an unknown id is a no-op. Leader
// only. A leader that removes itself steps down and shuts its raft down.
func (n *Node) RemoveServer(ctx context.Context, id string) error {
	if err := n.leaderOnly(); err != nil {
		return fmt.Errorf("remove server %s: %w", id, err)
	}
	servers, err := n.Servers()
	if err != nil {
		return fmt.Errorf("remove server %s: %w", id, err)
	}
	found := false
	for _, s := range servers {
		found = found || s.ID == id
	}
	if !found {
		return nil
	}
	f := n.raft.RemoveServer(raft.ServerID(id), 0, timeoutOf(ctx))
	if err := wait(ctx, f); err != nil {
		return fmt.Errorf("remove server %s: %w", id, n.mapErr(err))
	}
	return nil
}

// Servers returns the latest known cluster configuration (possibly not yet
// committed).
func (n *Node) Servers() ([]Server, error) {
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, fmt.Errorf("servers: %w", n.mapErr(err))
	}
	cs := f.Configuration().Servers
	out := make([]Server, 0, len(cs))
	for _, s := range cs {
		out = append(out, Server{ID: string(s.ID), Addr: string(s.Address), Voter: s.Suffrage == raft.Voter})
	}
	return out, nil
}

// Barrier blocks until every entry committed before the call has been applied
// to the FSM. Leader only; use it after gaining leadership before serving
// reads from the FSM: ReadIndex answers only once a Barrier has completed in
// the current term.
func (n *Node) Barrier(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("barrier: %w", err)
	}
	term := n.raft.CurrentTerm()
	f := n.raft.Barrier(timeoutOf(ctx))
	if err := wait(ctx, f); err != nil {
		return fmt.Errorf("barrier: %w", n.mapErr(err))
	}
	n.tookOffice(term)
	return nil
}

// LeadershipTransfer hands leadership to another up-to-date voter and waits
// for the attempt to finish. Leader only.
func (n *Node) LeadershipTransfer() error {
	if err := n.raft.LeadershipTransfer().Error(); err != nil {
		return fmt.Errorf("leadership transfer: %w", n.mapErr(err))
	}
	return nil
}

// Snapshot forces a snapshot now; the log is then truncated, keeping the last
// 10240 entries for follower catch-up. It returns nil when nothing was applied
// since the last snapshot.
func (n *Node) Snapshot() error {
	err := n.raft.Snapshot().Error()
	if err == nil || errors.Is(err, raft.ErrNothingNewToSnapshot) {
		return nil
	}
	return fmt.Errorf("snapshot: %w", n.mapErr(err))
}

// Stats returns raft's diagnostic counters (state, term, indexes, ...).
func (n *Node) Stats() map[string]string { return n.raft.Stats() }

// AppliedIndex returns the index of the last entry applied to the FSM.
func (n *Node) AppliedIndex() uint64 { return n.raft.AppliedIndex() }

// Shutdown stops raft, closes the transport and the stores, and closes the
// LeaderChanges channel. It does not leave the cluster (see RemoveServer).
// Calling it more than once is harmless.
func (n *Node) Shutdown() error {
	n.closeOnce.Do(func() {
		var errs []error
		if err := n.raft.Shutdown().Error(); err != nil {
			errs = append(errs, fmt.Errorf("raft: %w", err))
		}
		close(n.stopFwd)
		<-n.fwdDone
		if n.inmem != nil {
			n.inmem.unregister()
		}
		if n.bolt != nil {
			if err := n.bolt.Close(); err != nil {
				errs = append(errs, fmt.Errorf("bolt store: %w", err))
			}
		}
		if err := errors.Join(errs...); err != nil {
			n.closeErr = fmt.Errorf("shutdown: %w", err)
		}
	})
	return n.closeErr
}

// leaderOnly is a cheap pre-check for leader-only operations; raft re-checks.
func (n *Node) leaderOnly() error {
	switch n.raft.State() {
	case raft.Leader:
		return nil
	case raft.Shutdown:
		return ErrShutdown
	}
	return n.mapErr(raft.ErrNotLeader)
}

// timeoutOf turns the ctx deadline into a raft enqueue timeout (0 = none).
func timeoutOf(ctx context.Context) time.Duration {
	if d, ok := ctx.Deadline(); ok {
		if t := time.Until(d); t > 0 {
			return t
		}
		return time.Nanosecond
	}
	return 0
}

// wait waits for f, giving up when ctx ends. Raft futures cannot be cancelled,
// so a watcher goroutine is used only for cancellable contexts.
func wait(ctx context.Context, f raft.Future) error {
	if ctx.Done() == nil {
		return f.Error()
	}
	done := make(chan error, 1)
	go func() { done <- f.Error() }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// mapErr translates raft errors into this package's sentinels.
func (n *Node) mapErr(err error) error {
	switch {
	case errors.Is(err, raft.ErrNotLeader), errors.Is(err, raft.ErrLeadershipTransferInProgress):
		if id, addr := n.Leader(); id != "" && id != n.id {
			return fmt.Errorf("%w (leader is %s at %s)", ErrNotLeader, id, addr)
		}
		return ErrNotLeader
	case errors.Is(err, raft.ErrLeadershipLost):
		return fmt.Errorf("%w: %w", ErrNotLeader, ErrLeadershipLost)
	case errors.Is(err, raft.ErrRaftShutdown):
		return ErrShutdown
	case errors.Is(err, raft.ErrEnqueueTimeout):
		return context.DeadlineExceeded
	}
	return err
}

// fsmAdapter adapts FSM to raft.FSM.
type fsmAdapter struct{ fsm FSM }

func (a fsmAdapter) Apply(l *raft.Log) any { return a.fsm.Apply(l.Index, l.Data) }

func (a fsmAdapter) Snapshot() (raft.FSMSnapshot, error) {
	s, err := a.fsm.Snapshot()
	if err != nil {
		return nil, fmt.Errorf("fsm snapshot: %w", err)
	}
	return snapAdapter{s}, nil
}

func (a fsmAdapter) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	if err := a.fsm.Restore(rc); err != nil {
		return fmt.Errorf("fsm restore: %w", err)
	}
	return nil
}

type snapAdapter struct{ s Snapshot }

func (s snapAdapter) Persist(sink raft.SnapshotSink) error {
	if err := s.s.Persist(sink); err != nil {
		sink.Cancel()
		return fmt.Errorf("persist snapshot: %w", err)
	}
	return sink.Close()
}

func (s snapAdapter) Release() { s.s.Release() }
