package client

import (
	"context"
	"errors"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

// streamer is a member that sends the events after the asked index, up to
// stopAt (then fails unavailable, as a member going away), and records the
// since of each call.
type streamer struct {
	shimv1connect.UnimplementedShimServiceHandler
	upTo   uint64
	stopAt uint64 // 0: end the stream normally
	asked  []uint64
}

func (s *streamer) Events(_ context.Context, r *connect.Request[pb.EventsRequest], st *connect.ServerStream[pb.Event]) error {
	s.asked = append(s.asked, r.Msg.GetSince())
	for i := r.Msg.GetSince() + 1; i <= s.upTo; i++ {
		if s.stopAt != 0 && i > s.stopAt {
			return connect.NewError(connect.CodeUnavailable, errors.New("going away"))
		}
		if err := st.Send(&pb.Event{Index: i, Type: "process.placed"}); err != nil {
			return err
		}
	}
	return nil
}

// TestEventsResume: a stream broken by a member going away goes on, on the
// next member, after the last event seen.
func TestEventsResume(t *testing.T) {
	a := &streamer{upTo: 5, stopAt: 2}
	b := &streamer{upTo: 5}
	var addrs []string
	for _, m := range []*streamer{a, b} {
		_, h := shimv1connect.NewShimServiceHandler(m)
		srv := httptest.NewServer(h)
		defer srv.Close()
		addrs = append(addrs, "http://"+strings.TrimPrefix(srv.URL, "http://"))
	}
	c, err := New(Config{Addrs: addrs, Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	var got []uint64
	err = c.Events(context.Background(), &pb.EventsRequest{}, func(e *pb.Event) error {
		got = append(got, e.GetIndex())
		return nil
	})
	if err != nil || !slices.Equal(got, []uint64{1, 2, 3, 4, 5}) {
		t.Fatalf("Events = %v, %v; want 1-5", got, err)
	}
	if !slices.Equal(a.asked, []uint64{0}) || !slices.Equal(b.asked, []uint64{2}) {
		t.Errorf("asked a %v, b %v; want a from 0, b after 2", a.asked, b.asked)
	}
	// fn's error ends it, as is.
	stop := errors.New("enough")
	if err := c.Events(context.Background(), &pb.EventsRequest{}, func(*pb.Event) error { return stop }); err != stop {
		t.Errorf("Events with a failing fn = %v, want %v", err, stop)
	}
}
