package server

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"strings"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
	"github.com/shim-run/shim/table"
)

// NewHTTPClient returns the HTTP client used between nodes. tlsConfig
// (auth.APIClient) makes it speak HTTPS over HTTP/2; nil, plain HTTP/1.1
// (trust off).
//
// HTTP/2, because a TLS connection costs a handshake (about half a
// millisecond of CPU on each side here) and HTTP/1.1 loses its connection
// whenever a call is given up: an agent that restarts its long poll, a
// heartbeat attempt that timed out, and the follower's forwarded copies of
// both. Over HTTP/1.1 those reconnections took a tenth of the leader's CPU
// under a placement load; over HTTP/2 a call given up resets one stream, and
// the connection, multiplexing every call between two nodes, stays.
//
// A connection that stays must not outlive its peer unnoticed (a host that
// died sends no reset): one that has received nothing for 5 s is pinged,
// and closed if the ping is not answered within 5 s, so that later calls
// dial afresh rather than wait out their deadlines on it. (Calls do not wait
// for that: the agent and the servers bound each attempt and try another
// member.)
func NewHTTPClient(tlsConfig *tls.Config) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:     tlsConfig,
		TLSHandshakeTimeout: 5 * time.Second,
		ForceAttemptHTTP2:   tlsConfig != nil,
		HTTP2:               &http.HTTP2Config{SendPingTimeout: 5 * time.Second, PingTimeout: 5 * time.Second},
		MaxIdleConns:        0, // no limit over all hosts (HTTP/1.1)
		MaxIdleConnsPerHost: 4096,
		IdleConnTimeout:     90 * time.Second,
	}}
}

// URL turns host:port into an https URL, or an http one when secure is
// false (trust off).
func URL(addr string, secure bool) string {
	if strings.Contains(addr, "://") {
		return addr
	}
	if secure {
		return "https://" + addr
	}
	return "http://" + addr
}

type peer struct {
	shim  shimv1connect.ShimServiceClient
	agent shimv1connect.AgentServiceClient
}

func (s *Server) peer(addr string) *peer {
	s.peersMu.Lock()
	defer s.peersMu.Unlock()
	p := s.clients[addr]
	if p == nil {
		u := URL(addr, s.secure())
		opt := connect.WithInterceptors(authInterceptor{}) // passes tokens on (auth.go)
		p = &peer{
			shim:  shimv1connect.NewShimServiceClient(s.httpc, u, opt),
			agent: shimv1connect.NewAgentServiceClient(s.httpc, u, opt),
		}
		s.clients[addr] = p
	}
	return p
}

// leaderAPI returns the API address of the current leader, or "". The table
// maps Raft's leader to its node, by name or else by Raft address; a server
// that has not caught up since it restarted may know neither yet (callers
// then answer unavailable at once: leaderUnknown).
func (s *Server) leaderAPI() string {
	id, raftAddr := s.Raft.Leader()
	if id == "" {
		return ""
	}
	if n := s.Table.Node(id); n != nil {
		return n.ApiAddr
	}
	for _, n := range s.Table.ServerRecords() {
		if raftAddr != "" && n.RaftAddr == raftAddr {
			return n.ApiAddr
		}
	}
	return ""
}

// retryable reports whether a failed call to another node should be retried
// elsewhere or later: the node was unreachable or not the leader.
func retryable(err error) bool {
	switch connect.CodeOf(err) {
	case connect.CodeUnavailable, connect.CodeUnknown:
		return true
	}
	return false
}

// apply commits a command through Raft, forwarding it to the leader when this
// server is a follower, and retrying while there is no leader. On the leader
// it is committed together with other concurrent commands (batch.go). The
// table's answer comes back as the error (a Connect error) or the Result.
func (s *Server) apply(ctx context.Context, cmd *pb.Command) (table.Result, error) {
	if cmd.NowUnixNano == 0 {
		cmd.NowUnixNano = s.Now().UnixNano()
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
	}
	backoff := 5 * time.Millisecond
	for {
		if s.Raft.IsLeader() {
			res, err := s.commit(ctx, cmd)
			if err == nil {
				return res, apiError(res.Err)
			}
			if !retryable(apiError(err)) {
				return table.Result{}, apiError(err)
			}
		} else if addr := s.leaderAPI(); addr != "" {
			resp, err := s.peer(addr).agent.Apply(ctx, connect.NewRequest(&pb.ApplyRequest{Command: cmd}))
			if err == nil {
				return table.Result{IDs: resp.Msg.Ids, Index: resp.Msg.Index}, nil
			}
			if !retryable(err) {
				return table.Result{}, err
			}
		} else if id, _ := s.Raft.Leader(); id != "" {
			return table.Result{}, s.leaderUnknown(id)
		}
		select {
		case <-ctx.Done():
			return table.Result{}, apiError(errors.Join(ErrNoLeader, ctx.Err()))
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 200*time.Millisecond)
	}
}

// waitIndex blocks until the local table has applied index, so a write made
// through the leader can be read back here.
func (s *Server) waitIndex(ctx context.Context, index uint64) error {
	for {
		ch := s.Watch.Any()
		if s.Table.Index() >= index {
			return nil
		}
		select {
		case <-ctx.Done():
			return apiError(ctx.Err())
		case <-ch:
		}
	}
}

// forward runs call against the servers in s.Peers, in order, until one
// answers. Workers use it for every table read and write.
func forward[T any](ctx context.Context, s *Server, call func(p *peer) (T, error)) (T, error) {
	var zero T
	var last error = connect.NewError(connect.CodeUnavailable, errors.New("no servers known"))
	for _, addr := range s.servers() {
		v, err := call(s.peer(addr))
		if err == nil || !retryable(err) {
			return v, err
		}
		last = err
	}
	return zero, last
}

func (s *Server) servers() []string {
	s.peersMu.Lock()
	defer s.peersMu.Unlock()
	return append([]string(nil), s.Peers...)
}

// SetPeers replaces the servers a worker talks to.
func (s *Server) SetPeers(addrs []string) {
	s.peersMu.Lock()
	defer s.peersMu.Unlock()
	s.Peers = append([]string(nil), addrs...)
}
