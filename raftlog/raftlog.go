// Package raftlog wires shim's process table into hashicorp/raft: BoltDB log
// and stable store, file snapshots, a TLS (or TCP) transport, bootstrap,
// membership and leadership.
//
// It is the only package in shim that imports hashicorp/raft; its API exposes
// no raft types.
package raftlog

import (
	"crypto/tls"
	"errors"
	"io"
	"time"
)

// FSM is the replicated state machine (shim's process table). Raft calls its
// methods from a single goroutine, never concurrently with each other, except
// that Snapshot.Persist runs concurrently with later Apply calls.
type FSM interface {
	// Apply applies a committed entry. The result is returned to the
	// Node.Apply caller on the leader.
	Apply(index uint64, data []byte) any
	// Snapshot captures a point-in-time view of the state. It must be fast
	// and do no I/O; the heavy lifting belongs in Snapshot.Persist.
	Snapshot() (Snapshot, error)
	// Restore replaces all state with the contents written by a Persist.
	Restore(r io.Reader) error
}

// Snapshot is a point-in-time capture produced by FSM.Snapshot.
type Snapshot interface {
	// Persist writes the snapshot to w. It may run concurrently with Apply.
	Persist(w io.Writer) error
	// Release is called when raft is done with the snapshot.
	Release()
}

// Server is a member of the raft configuration.
type Server struct {
	ID    string
	Addr  string
	Voter bool
}

// Config configures a Node. Zero timing fields take the defaults noted.
type Config struct {
	ID        string // node name, used as the raft server ID
	BindAddr  string // raft TCP listen address, e.g. 127.0.0.1:7071 (port 0 picks a free port, see Node.Addr)
	Advertise string // address others dial; default: the bound address
	DataDir   string // holds raft.db (BoltDB log + stable store) and snapshots/
	// Bootstrap bootstraps a single-voter cluster of this node if DataDir
	// holds no raft state. It is ignored when state exists, so restarting
	// with the same Config is harmless.
	Bootstrap bool

	HeartbeatTimeout   time.Duration // default 500ms
	ElectionTimeout    time.Duration // default 500ms (at least HeartbeatTimeout)
	LeaderLeaseTimeout time.Duration // default 250ms (at most HeartbeatTimeout)
	SnapshotThreshold  uint64        // default 8192 entries since the last snapshot
	SnapshotInterval   time.Duration // how often to check the threshold; default 30 s

	Logger io.Writer // raft log output (hclog, level INFO); default os.Stderr

	// ServerTLS and ClientTLS, both set, make the transport speak TLS
	// (tls.go): ServerTLS for the connections it accepts, ClientTLS for
	// those it dials (auth.Config's RaftServer and RaftClient). With
	// neither, it is plain TCP: for tests and benchmarks only.
	ServerTLS, ClientTLS *tls.Config

	// InMemory is for unit tests only: in-memory log, stable and snapshot
	// stores and raft's in-memory transport. BindAddr is then just a name
	// (generated if empty); every in-memory node of the process is connected
	// to every other one. DataDir is ignored.
	InMemory bool
}

// Fixed tuning; the timing defaults are chosen for fast failover on a LAN.
const (
	defaultHeartbeatTimeout   = 500 * time.Millisecond
	defaultElectionTimeout    = 500 * time.Millisecond
	defaultLeaderLeaseTimeout = 250 * time.Millisecond
	defaultSnapshotThreshold  = 8192
	commitTimeout             = 5 * time.Millisecond
	maxAppendEntries          = 512
	trailingLogs              = 10240
	snapshotInterval          = 30 * time.Second
	snapshotRetain            = 2
	logCacheSize              = 512
	tcpMaxPool                = 3
	tcpTimeout                = 2 * time.Second
	notifyBuffer              = 64
)

var (
	// ErrNotLeader is returned (wrapped) by operations that must run on the
	// leader when this node is not, or stops being, the leader.
	ErrNotLeader = errors.New("not the leader")
	// ErrLeadershipLost is returned (wrapped, together with ErrNotLeader) when
	// leadership was lost while an entry was in flight: the entry may or may
	// not have been committed.
	ErrLeadershipLost = errors.New("leadership lost while committing")
	// ErrShutdown is returned (wrapped) after the node has been shut down.
	ErrShutdown = errors.New("raft node is shut down")
)
