package server

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"github.com/shim-run/shim/auth"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

// Heartbeat streams.
//
// A unary Heartbeat costs an HTTP request: on this project's 2-core VM about
// 150 µs of the leader's CPU and as much again on the node, so 5,000 nodes
// renewing every 200 ms would need several cores for leases alone. A node may
// instead keep one connection to the leader for its heartbeats: an HTTP/1.1
// request upgraded (101 Switching Protocols) to a plain stream of
// length-prefixed protobuf messages, HeartbeatRequest in and
// HeartbeatResponse out, answered in order. A beat then costs one small read
// and one small write on each side.
//
// The lease semantics are the unary call's: the leader runs the very same
// code (heartbeat) for each message and renews the lease when the message
// arrives; the node counts its lease from before it wrote the message. A
// server that is not the leader does not forward stream beats: it answers
// with the leader's API address and the client moves its stream there (or,
// when it cannot reach the leader, falls back to a unary call that the
// server forwards).
//
// Frames, server to node: one kind byte, a uvarint length, the payload.
// Node to server: a uvarint length and a HeartbeatRequest.
const (
	// StreamPath is the heartbeat stream's HTTP path.
	StreamPath = auth.ProcHeartbeatStream
	// streamProto is the Upgrade token.
	streamProto = "shim-heartbeat/1"

	frameResponse = 0 // a HeartbeatResponse
	frameError    = 1 // a connect.Code byte, then the message text
	frameRedirect = 2 // not the leader: the leader's API address

	maxFrame = 64 << 10
	// streamIdle closes a stream that has carried nothing for this long.
	streamIdle = time.Minute
)

// ---- server side ----

// serveHeartbeatStream upgrades the connection and answers heartbeats on it
// until the node hangs up.
func (s *Server) serveHeartbeatStream(w http.ResponseWriter, r *http.Request) {
	if s.Table == nil {
		http.Error(w, "heartbeat streams are served by servers only", http.StatusNotFound)
		return
	}
	if !strings.EqualFold(r.Header.Get("Upgrade"), streamProto) {
		http.Error(w, "expected Upgrade: "+streamProto, http.StatusUpgradeRequired)
		return
	}
	// Only nodes beat; each beat is then checked against the node it names.
	if err := allow(r.Context(), StreamPath); err != nil {
		httpAuthError(w, err)
		return
	}
	s.streamsMu.Lock()
	closed := s.streamsClosed
	s.streamsMu.Unlock()
	if closed {
		http.Error(w, "shutting down", http.StatusServiceUnavailable)
		return
	}
	hj, ok := w.(http.Hijacker)
	if !ok {
		http.Error(w, "connection cannot be upgraded", http.StatusInternalServerError)
		return
	}
	conn, brw, err := hj.Hijack()
	if err != nil {
		return
	}
	defer conn.Close()
	if !s.trackStream(conn, true) {
		return // shutting down
	}
	defer s.trackStream(conn, false)
	_, err = brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: " + streamProto + "\r\n\r\n")
	if err == nil {
		err = brw.Flush()
	}
	if err != nil {
		return
	}
	_ = conn.SetDeadline(time.Time{})
	var in, out []byte
	var idleFrom time.Time
	for {
		if now := time.Now(); now.Sub(idleFrom) > streamIdle/4 {
			idleFrom = now
			_ = conn.SetReadDeadline(now.Add(streamIdle))
		}
		n, err := binary.ReadUvarint(brw.Reader)
		if err != nil || n > maxFrame {
			return
		}
		in = grow(in, int(n))
		if _, err := io.ReadFull(brw.Reader, in); err != nil {
			return
		}
		req := &pb.HeartbeatRequest{}
		out = out[:0]
		if err := proto.Unmarshal(in, req); err != nil {
			out = appendError(out, connect.CodeInvalidArgument, "heartbeat stream: "+err.Error())
		} else if err := auth.ActsFor(callerOf(r.Context()).id, req.Node); err != nil {
			out = appendError(out, connect.CodePermissionDenied, err.Error())
		} else {
			out = s.streamBeat(r.Context(), req, out)
		}
		if _, err := brw.Writer.Write(out); err != nil {
			return
		}
		if brw.Reader.Buffered() == 0 {
			// Answer now; beats already read in answer together.
			if err := brw.Writer.Flush(); err != nil {
				return
			}
		}
	}
}

// streamBeat answers one streamed heartbeat, appending the frame to out.
func (s *Server) streamBeat(ctx context.Context, req *pb.HeartbeatRequest, out []byte) []byte {
	if !s.Raft.IsLeader() {
		if addr := s.leaderAPI(); addr != "" {
			return appendFrame(out, frameRedirect, []byte(addr))
		}
		return appendError(out, connect.CodeUnavailable, ErrNoLeader.Error())
	}
	// No deadline here: heartbeat's Raft writes (rare) bring their own.
	resp, err := s.heartbeat(ctx, req)
	if err != nil {
		return appendError(out, connect.CodeOf(err), err.Error())
	}
	b, err := proto.Marshal(resp)
	if err != nil {
		return appendError(out, connect.CodeInternal, err.Error())
	}
	return appendFrame(out, frameResponse, b)
}

// trackStream adds (or removes) a hijacked connection, which http.Server's
// Shutdown does not close; closeStreams does. It refuses new ones after
// closeStreams.
func (s *Server) trackStream(c net.Conn, add bool) bool {
	s.streamsMu.Lock()
	defer s.streamsMu.Unlock()
	if !add {
		delete(s.streams, c)
		return true
	}
	if s.streamsClosed {
		return false
	}
	if s.streams == nil {
		s.streams = map[net.Conn]struct{}{}
	}
	s.streams[c] = struct{}{}
	return true
}

// closeStreams closes every heartbeat stream and refuses new ones.
func (s *Server) closeStreams() {
	s.streamsMu.Lock()
	defer s.streamsMu.Unlock()
	s.streamsClosed = true
	for c := range s.streams {
		c.Close()
	}
}

func grow(b []byte, n int) []byte {
	if cap(b) < n {
		return make([]byte, n)
	}
	return b[:n]
}

func appendFrame(out []byte, kind byte, payload []byte) []byte {
	out = append(out, kind)
	out = binary.AppendUvarint(out, uint64(len(payload)))
	return append(out, payload...)
}

func appendError(out []byte, code connect.Code, msg string) []byte {
	return appendFrame(out, frameError, append([]byte{byte(code)}, msg...))
}

// ---- client side ----

// Streams keeps one node's heartbeat streams: at most one per member address,
// shared by the node's clients, so that a call a follower redirects to the
// leader uses the stream the node already holds there.
type Streams struct {
	httpc *http.Client
	tls   *tls.Config // auth.StreamClient; nil: plain TCP (trust off)
	mu    sync.Mutex
	slots map[string]*streamSlot // by host:port
}

type streamSlot struct {
	conn        *beatConn
	dialing     chan struct{} // closed when the dial under way ends
	refusedTill time.Time     // the member refused a stream: unary calls until then
}

// NewStreams returns an empty set of streams whose clients make their
// other calls with httpc. Streams speak TLS with tlsConfig (auth's
// StreamClient: HTTP/1.1 only, since a stream is an HTTP/1.1 upgrade); nil
// means plain TCP, for http:// members.
func NewStreams(httpc *http.Client, tlsConfig *tls.Config) *Streams {
	return &Streams{httpc: httpc, tls: tlsConfig, slots: map[string]*streamSlot{}}
}

// NewAgentClient returns a client with streams of its own; see
// Streams.Client.
func NewAgentClient(httpc *http.Client, tlsConfig *tls.Config, baseURL string) shimv1connect.AgentServiceClient {
	return NewStreams(httpc, tlsConfig).Client(baseURL)
}

// Client returns an AgentService client for the member at baseURL
// (https://host:port, or http:// with trust off) whose Heartbeat calls go
// over a heartbeat stream; every other call is plain Connect. Where the
// member serves no streams, Heartbeat falls back to the unary call.
func (p *Streams) Client(baseURL string) shimv1connect.AgentServiceClient {
	return &agentClient{
		AgentServiceClient: shimv1connect.NewAgentServiceClient(p.httpc, baseURL),
		streams:            p,
		target:             p.hostOf(baseURL),
	}
}

type agentClient struct {
	shimv1connect.AgentServiceClient
	streams *Streams
	target  string // host:port of the member; "" when streams cannot be used

	mu        sync.Mutex
	cur       string    // where beats go: the target, or the leader it named
	avoid     string    // a leader that could not be reached...
	avoidTill time.Time // ...is not used until then
}

// hostOf returns host:port of a member whose streams this set can dial.
func (p *Streams) hostOf(baseURL string) string {
	u, err := url.Parse(baseURL)
	want := "http"
	if p.tls != nil {
		want = "https"
	}
	if err != nil || u.Scheme != want || u.Host == "" {
		return ""
	}
	return u.Host
}

// errRefused means the member answered the upgrade with something else.
var errRefused = errors.New("heartbeat stream refused")

// avoidFor is how long a leader that could not be reached is not used.
const avoidFor = 5 * time.Second

// staleAfter is how long a stream may leave a beat unanswered before it is
// given up for a new one. A call that times out does not close its stream:
// its answer is dropped when it comes, and the stream carries on. Closing
// would turn one slow moment of the leader's into a storm of reconnections
// from every node at once.
const staleAfter = time.Second

// Heartbeat renews the lease over the stream. A server that is not the
// leader names the leader, and beats go there. When the leader it names
// cannot be reached (a partition between this node and the leader only), the
// call goes to the target as a unary call, which the target forwards, and
// the leader is avoided for a while.
func (c *agentClient) Heartbeat(ctx context.Context, req *connect.Request[pb.HeartbeatRequest]) (*connect.Response[pb.HeartbeatResponse], error) {
	unary := func() (*connect.Response[pb.HeartbeatResponse], error) {
		return c.AgentServiceClient.Heartbeat(ctx, req)
	}
	if c.target == "" {
		return unary()
	}
	msg, err := proto.Marshal(req.Msg)
	if err != nil {
		return nil, connect.NewError(connect.CodeInternal, err)
	}
	for hop := 0; ; hop++ {
		addr := c.where()
		sctx, cancel := ctx, context.CancelFunc(func() {})
		if addr != c.target {
			// Leave the fallback half of the time left.
			if dl, ok := ctx.Deadline(); ok {
				sctx, cancel = context.WithDeadline(ctx, time.Now().Add(time.Until(dl)/2))
			}
		}
		f, err := c.streams.call(sctx, addr, msg)
		cancel()
		switch {
		case err == nil:
		case ctx.Err() != nil:
			return nil, asConnect(ctx.Err())
		case addr != c.target:
			c.avoidLeader(addr)
			return unary()
		case errors.Is(err, errRefused):
			return unary()
		default:
			return nil, connect.NewError(connect.CodeUnavailable, fmt.Errorf("heartbeat stream to %s: %w", addr, err))
		}
		switch f.kind {
		case frameResponse:
			out := &pb.HeartbeatResponse{}
			if err := proto.Unmarshal(f.payload, out); err != nil {
				return nil, connect.NewError(connect.CodeInternal, err)
			}
			return connect.NewResponse(out), nil
		case frameError:
			if len(f.payload) == 0 {
				return nil, connect.NewError(connect.CodeUnknown, errors.New("heartbeat stream: empty error frame"))
			}
			return nil, connect.NewError(connect.Code(f.payload[0]), errors.New(string(f.payload[1:])))
		case frameRedirect:
			leader := string(f.payload)
			if hop > 0 || leader == addr || c.avoided(leader) {
				// Servers disagree about the leader (an election is
				// under way), or it cannot be reached from here: the
				// target forwards this one.
				c.setCur(c.target)
				return unary()
			}
			c.setCur(leader)
		default:
			return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("heartbeat stream: frame kind %d", f.kind))
		}
	}
}

func asConnect(err error) error {
	if errors.Is(err, context.DeadlineExceeded) {
		return connect.NewError(connect.CodeDeadlineExceeded, err)
	}
	return connect.NewError(connect.CodeCanceled, err)
}

func (c *agentClient) where() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cur == "" {
		c.cur = c.target
	}
	return c.cur
}

func (c *agentClient) setCur(addr string) {
	c.mu.Lock()
	c.cur = addr
	c.mu.Unlock()
}

// avoidLeader sends beats back to the target and remembers, for a while,
// that the leader addr could not be reached.
func (c *agentClient) avoidLeader(addr string) {
	c.mu.Lock()
	c.cur, c.avoid, c.avoidTill = c.target, addr, time.Now().Add(avoidFor)
	c.mu.Unlock()
}

func (c *agentClient) avoided(addr string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return addr == c.avoid && time.Now().Before(c.avoidTill)
}

// call sends msg on the stream to addr, dialling one if need be, and waits
// for the answer. A stream that turns out to be dead (the server closed it,
// idle or restarting) is replaced once, as an HTTP client retries a request
// on a kept-alive connection the server had closed.
func (p *Streams) call(ctx context.Context, addr string, msg []byte) (frame, error) {
	for try := 0; ; try++ {
		bc, fresh, err := p.stream(ctx, addr)
		if err != nil {
			return frame{}, err
		}
		f, err := bc.call(ctx, msg)
		if err == nil || ctx.Err() != nil {
			return f, err
		}
		p.drop(addr, bc)
		if fresh || try > 0 {
			return f, err
		}
	}
}

// stream returns the open stream to addr, dialling one if there is none (or
// the one there is has gone stale). One dial runs at a time per address.
func (p *Streams) stream(ctx context.Context, addr string) (bc *beatConn, fresh bool, err error) {
	for {
		p.mu.Lock()
		sl := p.slots[addr]
		if sl == nil {
			sl = &streamSlot{}
			p.slots[addr] = sl
		}
		now := time.Now()
		if now.Before(sl.refusedTill) {
			p.mu.Unlock()
			return nil, false, errRefused
		}
		if bc := sl.conn; bc != nil {
			if !bc.isClosed() && !bc.stale(now) {
				p.mu.Unlock()
				return bc, false, nil
			}
			bc.close(errors.New("heartbeat stream: no answer for " + staleAfter.String()))
			sl.conn = nil
		}
		if wait := sl.dialing; wait != nil {
			p.mu.Unlock()
			select {
			case <-wait:
				continue
			case <-ctx.Done():
				return nil, false, ctx.Err()
			}
		}
		done := make(chan struct{})
		sl.dialing = done
		p.mu.Unlock()
		bc, err = dialBeat(ctx, addr, p.tls)
		p.mu.Lock()
		sl.dialing = nil
		close(done)
		switch {
		case err == nil:
			sl.conn = bc
		case errors.Is(err, errRefused):
			sl.refusedTill = time.Now().Add(time.Minute)
		}
		p.mu.Unlock()
		return bc, true, err
	}
}

// drop closes a stream that failed and forgets it.
func (p *Streams) drop(addr string, bc *beatConn) {
	bc.close(errors.New("heartbeat stream dropped"))
	p.mu.Lock()
	if sl := p.slots[addr]; sl != nil && sl.conn == bc {
		sl.conn = nil
	}
	p.mu.Unlock()
}

// beatConn is one heartbeat stream. Answers come in the order the requests
// were written, so each call waits its turn in a queue; a call that gives up
// leaves its place, and its answer is dropped.
type beatConn struct {
	conn net.Conn
	wmu  sync.Mutex // orders writes with the queue
	mu   sync.Mutex
	q    []waiter
	err  error
	done chan struct{}
}

type waiter struct {
	ch   chan frame // buffered: the reader never blocks on it
	sent time.Time
}

type frame struct {
	kind    byte
	payload []byte
	err     error
}

func dialBeat(ctx context.Context, addr string, tlsConfig *tls.Config) (*beatConn, error) {
	d := net.Dialer{Timeout: 2 * time.Second, KeepAlive: 15 * time.Second}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	if tlsConfig != nil {
		c := tlsConfig.Clone()
		if host, _, err := net.SplitHostPort(addr); err == nil {
			c.ServerName = host
		}
		tc := tls.Client(conn, c)
		if err := tc.HandshakeContext(ctx); err != nil {
			conn.Close()
			return nil, err
		}
		conn = tc
	}
	br := bufio.NewReaderSize(conn, 512)
	_, err = io.WriteString(conn, "GET "+StreamPath+" HTTP/1.1\r\nHost: "+addr+
		"\r\nConnection: Upgrade\r\nUpgrade: "+streamProto+"\r\n\r\n")
	var resp *http.Response
	if err == nil {
		resp, err = http.ReadResponse(br, nil)
	}
	if err != nil {
		conn.Close()
		return nil, err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusSwitchingProtocols {
		conn.Close()
		return nil, fmt.Errorf("%w: %s", errRefused, resp.Status)
	}
	_ = conn.SetDeadline(time.Time{})
	bc := &beatConn{conn: conn, done: make(chan struct{})}
	go bc.read(br)
	return bc, nil
}

// call writes one request and waits for its answer or the end of ctx.
func (bc *beatConn) call(ctx context.Context, msg []byte) (frame, error) {
	w := waiter{ch: make(chan frame, 1), sent: time.Now()}
	buf := binary.AppendUvarint(make([]byte, 0, len(msg)+binary.MaxVarintLen64), uint64(len(msg)))
	buf = append(buf, msg...)
	bc.wmu.Lock()
	bc.mu.Lock()
	if bc.err != nil {
		err := bc.err
		bc.mu.Unlock()
		bc.wmu.Unlock()
		return frame{}, err
	}
	bc.q = append(bc.q, w)
	bc.mu.Unlock()
	// A write cut short would leave half a frame: the stream is lost then.
	_ = bc.conn.SetWriteDeadline(time.Now().Add(staleAfter))
	_, err := bc.conn.Write(buf)
	bc.wmu.Unlock()
	if err != nil {
		bc.close(err)
		return frame{}, err
	}
	select {
	case f := <-w.ch:
		return f, f.err
	case <-ctx.Done():
		return frame{}, ctx.Err()
	}
}

// stale reports whether the oldest unanswered call has waited too long.
func (bc *beatConn) stale(now time.Time) bool {
	bc.mu.Lock()
	defer bc.mu.Unlock()
	return len(bc.q) > 0 && now.Sub(bc.q[0].sent) > staleAfter
}

// read delivers answers to the queue in order until the stream fails.
func (bc *beatConn) read(br *bufio.Reader) {
	for {
		f, err := readFrame(br)
		if err != nil {
			bc.close(err)
			return
		}
		bc.mu.Lock()
		if len(bc.q) == 0 {
			bc.mu.Unlock()
			bc.close(errors.New("heartbeat stream: answer to no request"))
			return
		}
		w := bc.q[0]
		bc.q = bc.q[1:]
		bc.mu.Unlock()
		w.ch <- f
	}
}

func readFrame(br *bufio.Reader) (frame, error) {
	kind, err := br.ReadByte()
	if err != nil {
		return frame{}, err
	}
	n, err := binary.ReadUvarint(br)
	if err != nil {
		return frame{}, err
	}
	if n > maxFrame {
		return frame{}, fmt.Errorf("heartbeat stream: frame of %d bytes", n)
	}
	p := make([]byte, n)
	if _, err := io.ReadFull(br, p); err != nil {
		return frame{}, err
	}
	return frame{kind: kind, payload: p}, nil
}

// close fails every waiting call and closes the connection. Idempotent.
func (bc *beatConn) close(err error) {
	bc.mu.Lock()
	if bc.err != nil {
		bc.mu.Unlock()
		return
	}
	bc.err = err
	q := bc.q
	bc.q = nil
	close(bc.done)
	bc.mu.Unlock()
	bc.conn.Close()
	for _, w := range q {
		w.ch <- frame{err: err}
	}
}

func (bc *beatConn) isClosed() bool {
	select {
	case <-bc.done:
		return true
	default:
		return false
	}
}
