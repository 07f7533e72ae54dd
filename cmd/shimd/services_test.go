package main

import (
	"context"
	"errors"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

type fakeEndpoints struct {
	shimv1connect.ShimServiceClient
	calls int
	down  bool
}

func (f *fakeEndpoints) Endpoints(_ context.Context, req *connect.Request[pb.EndpointsRequest]) (*connect.Response[pb.EndpointsResponse], error) {
	f.calls++
	if f.down {
		return nil, connect.NewError(connect.CodeUnavailable, errors.New("down"))
	}
	if req.Msg.Name != "web" {
		return nil, connect.NewError(connect.CodeNotFound, errors.New("no service"))
	}
	if req.Msg.Consistency != pb.Consistency_CONSISTENCY_STALE {
		return nil, errors.New("a worker's DNS should read stale")
	}
	return connect.NewResponse(&pb.EndpointsResponse{Endpoints: []*pb.Endpoint{{Id: "a", Node: "n1", Address: "127.0.0.1"}}}), nil
}

func TestRemoteEndpoints(t *testing.T) {
	f := &fakeEndpoints{}
	r := &remoteEndpoints{addrs: func() []string { return []string{"s1"} },
		client: func(string) shimv1connect.ShimServiceClient { return f }, cache: map[string]*cached{}}
	if eps, known := r.lookup("web"); !known || len(eps) != 1 {
		t.Fatalf("web: %v %v", eps, known)
	}
	if _, known := r.lookup("nope"); known {
		t.Fatal("an unknown service is known")
	}
	calls := f.calls
	r.lookup("web") // cached
	if f.calls != calls {
		t.Errorf("asked the servers again within %s", remoteTTL)
	}
	// Servers out of reach: the last answer stands.
	f.down = true
	r.cache["web"].at = time.Now().Add(-time.Minute)
	if eps, known := r.lookup("web"); !known || len(eps) != 1 {
		t.Fatalf("servers down: %v %v", eps, known)
	}
}

func TestParsePortRange(t *testing.T) {
	if lo, hi, err := parsePortRange("20000-20010"); err != nil || lo != 20000 || hi != 20010 {
		t.Fatalf("%d %d %v", lo, hi, err)
	}
	for _, bad := range []string{"", "20000", "20-10", "0-10", "1-70000", "a-b"} {
		if _, _, err := parsePortRange(bad); err == nil {
			t.Errorf("--port-range %q accepted", bad)
		}
	}
}
