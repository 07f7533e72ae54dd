// Package server serves shim's API on one HTTPS port (HTTP/2 and HTTP/1.1):
// the user-facing ShimService and the node-facing AgentService (Connect, so
// gRPC, gRPC-Web and JSON over HTTP all work). Servers answer reads from
// their replica of the table once it is as new as the leader's (read.go),
// and send writes to the Raft leader; workers hold no table and pass every
// call to a server. The leader also keeps node leases in memory. Who may
// call what is decided at the edge (auth.go).
package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/shim-run/shim/auth"
	"github.com/shim-run/shim/metrics"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
	"github.com/shim-run/shim/raftlog"
	"github.com/shim-run/shim/table"
)

// MaxRequestBytes caps the size of one API request.
const MaxRequestBytes = 1 << 20

// Raft is the part of raftlog.Node the server uses.
type Raft interface {
	Apply(ctx context.Context, data []byte) (any, uint64, error)
	IsLeader() bool
	Leader() (id, addr string)
	LeaderChanges() <-chan bool
	AddVoter(ctx context.Context, id, addr string) error
	RemoveServer(ctx context.Context, id string) error
	Servers() ([]raftlog.Server, error)
	Barrier(ctx context.Context) error
	// Linearizable reads (read.go).
	ReadIndex(ctx context.Context) (uint64, error)
	AppliedThrough(fsmIndex uint64) uint64
	CommitIndex() uint64
	LastContact() time.Time
}

// Server implements the API. Fields are dependencies; set them before Start.
type Server struct {
	Name    string        // this node's name
	Table   *table.Table  // nil on workers
	Raft    Raft          // nil on workers
	Watch   *Watcher      // fed by the FSM; nil on workers
	Peers   []string      // workers: API addresses of servers to use
	Lease   time.Duration // node lease; default 1s
	LogDir  string        // where this node's process logs live
	Now     func() time.Time
	NewID   func() string
	Log     *slog.Logger
	Metrics *metrics.Metrics
	// UsageOf returns this node's processes' use (the agent's Usage): the
	// last sample, or read now when fresh is set.
	UsageOf func(ids []string, fresh bool) map[string]*pb.Usage
	// Auth is this node's certificate and the cluster CA: callers must
	// then prove who they are (auth.go), and this server calls other nodes
	// over TLS with it. Nil turns trust off: every caller may do
	// anything, over plain HTTP (tests and benchmarks only).
	Auth *auth.Credentials
	// MetricsOpen serves /metrics without a token.
	MetricsOpen bool
	// ProbeRaft checks, before a server joins as a voter, that its Raft
	// address answers as that server. Default (nil): a TLS dial with this
	// node's certificate (trust.go), or nothing with trust off.
	ProbeRaft func(ctx context.Context, name, addr string) error

	closed  chan struct{} // closed when Run returns
	peersMu sync.Mutex
	clients map[string]*peer
	leases  *leases
	httpc   *http.Client

	batch     batcher     // proposals waiting to be committed together (batch.go)
	reads     reads       // linearizable reads waiting for a read index (read.go)
	listCache recordCache // encoded records for List (listcache.go)
	whoami    whoamiCache // workers: what servers said of tokens (auth.go)

	streamsMu     sync.Mutex
	streams       map[net.Conn]struct{} // open heartbeat streams (stream.go)
	streamsClosed bool
}

func (s *Server) init() {
	if s.Lease <= 0 {
		s.Lease = time.Second
	}
	if s.Now == nil {
		s.Now = time.Now
	}
	if s.NewID == nil {
		s.NewID = NewID
	}
	if s.Log == nil {
		s.Log = slog.Default()
	}
	if s.Metrics == nil {
		s.Metrics = metrics.New(nil)
	}
	if s.Table != nil {
		t := s.Table
		s.Metrics.TableStates(func() map[string]int {
			out := map[string]int{}
			for st, n := range t.StateCounts() {
				out[table.StateName(st)] = n
			}
			return out
		})
	}
	s.clients = map[string]*peer{}
	s.httpc = NewHTTPClient(s.tlsFor(auth.APIClient))
	s.leases = newLeases()
	s.closed = make(chan struct{})
}

// NewID returns a random 12-character process id.
func NewID() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Handler returns the HTTP handler for the API, /metrics and /healthz.
func (s *Server) Handler() http.Handler {
	s.init()
	// No gzip: members talk over a LAN, where compressing every blocking
	// query's answer cost more CPU than anything else the agent did.
	opts := []connect.HandlerOption{connect.WithReadMaxBytes(MaxRequestBytes), connect.WithCompression("gzip", nil, nil),
		connect.WithInterceptors(authInterceptor{})}
	mux := http.NewServeMux()
	mux.Handle(shimv1connect.NewShimServiceHandler(&shimAPI{s: s}, opts...))
	mux.Handle(shimv1connect.NewAgentServiceHandler(&agentAPI{s: s}, opts...))
	mux.HandleFunc(StreamPath, s.serveHeartbeatStream)
	mux.Handle("/metrics", s.metricsGate(s.Metrics.Handler()))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	return http.MaxBytesHandler(s.authenticate(mux), MaxRequestBytes+4096)
}

// Run runs the leader duties (lease checks) until ctx ends, then closes the
// heartbeat streams (which http.Server.Shutdown does not).
func (s *Server) Run(ctx context.Context) {
	defer close(s.closed) // ends the long polls this server holds
	defer s.closeStreams()
	if s.Raft == nil {
		<-ctx.Done()
		return
	}
	go s.countEvents(ctx) // events.go
	s.runLeases(ctx)
}
