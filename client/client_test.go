package client

import (
	"context"
	"errors"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

var errRefused = &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}

// member is a fake member: down (every call refused), or answering with
// the first spawn it saw for a request id after losing the first `lose`
// answers.
type member struct {
	shimv1connect.UnimplementedShimServiceHandler
	down  bool
	lose  int
	calls int
	byReq map[string]*pb.SpawnResponse
	made  int
}

func (m *member) Spawn(_ context.Context, r *connect.Request[pb.SpawnRequest]) (*connect.Response[pb.SpawnResponse], error) {
	m.calls++
	if m.down {
		return nil, errRefused
	}
	resp := m.byReq[r.Msg.GetRequestId()]
	if resp == nil {
		m.made++
		resp = &pb.SpawnResponse{Processes: []*pb.ProcessRecord{{Id: "p" + r.Msg.GetRequestId()[:4]}}}
		m.byReq[r.Msg.GetRequestId()] = resp
	}
	if m.lose > 0 {
		m.lose--
		return nil, connect.NewError(connect.CodeDeadlineExceeded, errors.New("answer lost"))
	}
	return connect.NewResponse(resp), nil
}

func (m *member) Nodes(context.Context, *connect.Request[pb.NodesRequest]) (*connect.Response[pb.NodesResponse], error) {
	m.calls++
	if m.down {
		return nil, errRefused
	}
	return connect.NewResponse(&pb.NodesResponse{Index: 7}), nil
}

func (m *member) Drain(_ context.Context, r *connect.Request[pb.DrainRequest]) (*connect.Response[pb.DrainResponse], error) {
	m.calls++
	return nil, connect.NewError(connect.CodeNotFound, errors.New(`no node "`+r.Msg.GetNode()+`"`))
}

// fakeDial serves each base URL from its member, in process.
func fakeDial(ms map[string]*member) Dialer {
	return func(base string) (shimv1connect.ShimServiceClient, error) {
		m := ms[base]
		if m == nil {
			return nil, errors.New("unknown " + base)
		}
		return direct{m: m}, nil
	}
}

// direct calls a member's handler methods without HTTP.
type direct struct {
	shimv1connect.ShimServiceClient // nil: the calls the tests do not make
	m                               *member
}

func (d direct) Spawn(ctx context.Context, r *connect.Request[pb.SpawnRequest]) (*connect.Response[pb.SpawnResponse], error) {
	return d.m.Spawn(ctx, r)
}
func (d direct) Nodes(ctx context.Context, r *connect.Request[pb.NodesRequest]) (*connect.Response[pb.NodesResponse], error) {
	return d.m.Nodes(ctx, r)
}
func (d direct) Drain(ctx context.Context, r *connect.Request[pb.DrainRequest]) (*connect.Response[pb.DrainResponse], error) {
	return d.m.Drain(ctx, r)
}

func newFake(t *testing.T, ms map[string]*member, addrs ...string) *Client {
	t.Helper()
	for _, m := range ms {
		m.byReq = map[string]*pb.SpawnResponse{}
	}
	c, err := New(Config{Addrs: addrs, Timeout: 5 * time.Second, Dial: fakeDial(ms)})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestFailover(t *testing.T) {
	a, b := &member{down: true}, &member{}
	c := newFake(t, map[string]*member{"https://a:1": a, "http://b:2": b}, "a:1", "http://b:2")
	resp, err := c.Nodes(context.Background(), &pb.NodesRequest{})
	if err != nil || resp.GetIndex() != 7 {
		t.Fatalf("Nodes = %v, %v", resp, err)
	}
	if c.Member() != "b:2" || a.calls != 1 || b.calls != 1 {
		t.Errorf("member %s, calls a=%d b=%d", c.Member(), a.calls, b.calls)
	}
	// The next call starts with the member that answered.
	if _, err := c.Nodes(context.Background(), &pb.NodesRequest{}); err != nil || a.calls != 1 {
		t.Errorf("second call: %v, a called %d times", err, a.calls)
	}
	// A refusal is final: not tried elsewhere.
	_, err = c.Drain(context.Background(), "nope", false)
	if connect.CodeOf(err) != connect.CodeNotFound || a.calls != 1 {
		t.Errorf("Drain = %v (a called %d times), want not_found from b alone", err, a.calls)
	}
}

func TestUnreachable(t *testing.T) {
	a, b := &member{down: true}, &member{down: true}
	c := newFake(t, map[string]*member{"https://a:1": a, "https://b:2": b}, "a:1,b:2")
	_, err := c.Spawn(context.Background(), &pb.SpawnRequest{})
	var ue *UnreachableError
	if !errors.As(err, &ue) || err.Error() != "cannot reach shim at a:1,b:2: connection refused" {
		t.Fatalf("err = %v", err)
	}
}

// A spawn whose answers are lost is retried with the same request id and
// made once.
func TestSpawnRetryOnce(t *testing.T) {
	a := &member{lose: 2}
	c := newFake(t, map[string]*member{"https://a:1": a}, "a:1")
	req := &pb.SpawnRequest{}
	recs, err := c.Spawn(context.Background(), req)
	if err != nil || len(recs) != 1 {
		t.Fatalf("Spawn = %v, %v", recs, err)
	}
	if req.GetRequestId() == "" || a.calls != 3 || a.made != 1 {
		t.Errorf("request id %q, calls %d, made %d; want an id, 3 calls, 1 made", req.GetRequestId(), a.calls, a.made)
	}
}

func TestParseAddrs(t *testing.T) {
	got, err := ParseAddrs("a, http://b:1 ,https://[::1]:9,")
	if err != nil || strings.Join(got, " ") != "https://a:7070 http://b:1 https://[::1]:9" {
		t.Errorf("ParseAddrs = %q, %v", got, err)
	}
	for _, bad := range []string{"", " , ", "a:b:c", "a/b", "http://:1"} {
		var ae *AddrError
		if _, err := ParseAddrs(bad); !errors.As(err, &ae) {
			t.Errorf("ParseAddrs(%q) = %v, want an AddrError", bad, err)
		}
	}
	if _, err := New(Config{Addrs: []string{"a"}, Timeout: -1}); err == nil {
		t.Error("a negative timeout was taken")
	}
}
