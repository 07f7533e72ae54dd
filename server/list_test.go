package server

import (
	"context"
	"net/http/httptest"
	"testing"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

// A whole-table List answers binary clients from the encoded-record cache
// and JSON clients normally; both get every record, in order, and a record
// that changed is sent as it is now.
func TestListFromEncodedCache(t *testing.T) {
	s, _ := testServer(t, "s1", true)
	hs := httptest.NewServer(s.Handler())
	defer hs.Close()
	register(t, s, "w1", "127.0.0.1:1", pb.NodeRole_NODE_ROLE_WORKER)
	ctx := context.Background()
	spawn := func(n int) {
		ids := make([]string, n)
		for i := range ids {
			ids[i] = NewID()
		}
		if _, err := s.apply(ctx, &pb.Command{Op: &pb.Command_Spawn{Spawn: &pb.Spawn{Ids: ids,
			Spec: &pb.ProcessSpec{Name: "web", Command: []string{"/bin/sleep", "1"}, Resources: &pb.Resources{}}}}}); err != nil {
			t.Fatal(err)
		}
	}
	spawn(50)
	binary := shimv1connect.NewShimServiceClient(NewHTTPClient(nil), hs.URL)
	jsonc := shimv1connect.NewShimServiceClient(NewHTTPClient(nil), hs.URL, connect.WithProtoJSON())
	check := func(what string) {
		t.Helper()
		want := s.Table.Processes(false, "")
		for _, c := range []shimv1connect.ShimServiceClient{binary, jsonc} {
			resp, err := c.List(ctx, connect.NewRequest(&pb.ListRequest{}))
			if err != nil {
				t.Fatal(err)
			}
			got := resp.Msg.Processes
			if len(got) != len(want) || resp.Msg.Index != s.Table.Index() {
				t.Fatalf("%s: %d records at index %d, want %d at %d", what, len(got), resp.Msg.Index, len(want), s.Table.Index())
			}
			for i := range want {
				if !proto.Equal(got[i], want[i]) {
					t.Fatalf("%s: record %d is %v, want %v", what, i, got[i], want[i])
				}
			}
		}
	}
	check("first listing")
	check("from the cache")
	// Kill one and add some: changed and new records are encoded anew.
	id := s.Table.Processes(false, "")[3].Id
	if _, err := s.apply(ctx, &pb.Command{Op: &pb.Command_Kill{Kill: &pb.Kill{Ids: []string{id}, Signal: 9}}}); err != nil {
		t.Fatal(err)
	}
	spawn(5)
	check("after changes")
	if n := len(s.listCache.m); n != 55 {
		t.Fatalf("cache holds %d records, want 55", n)
	}
}
