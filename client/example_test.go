package client_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/shim-run/shim/client"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

// Spawn a process on a cluster and list it. The first address is down: the
// client fails over to the second. With a real cluster, Token is the
// bootstrap server's admin.token and the CA its ca.pem.
func Example() {
	addr, ca, stop := fakeCluster()
	defer stop()

	pool := x509.NewCertPool()
	pool.AddCert(ca)
	c, err := client.New(client.Config{
		Addrs:   []string{"127.0.0.1:1", addr}, // tried in turn
		Token:   "TOKEN",
		TLS:     &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13},
		Timeout: 10 * time.Second,
	})
	if err != nil {
		log.Fatal(err)
	}
	ctx := context.Background()
	recs, err := c.Spawn(ctx, &pb.SpawnRequest{Spec: &pb.ProcessSpec{
		Name:    "web",
		Command: []string{"/usr/bin/python3", "-m", "http.server", "8000"},
	}})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("spawned", recs[0].GetId())
	list, err := c.List(ctx, &pb.ListRequest{})
	if err != nil {
		log.Fatal(err)
	}
	for _, p := range list.GetProcesses() {
		fmt.Println(p.GetId(), p.GetSpec().GetName(), p.GetNode())
	}
	// Output:
	// spawned 0123456789ab
	// 0123456789ab web node-a
}

// fakeCluster is one member that knows one process, over TLS; it checks
// the token.
func fakeCluster() (addr string, ca *x509.Certificate, stop func()) {
	_, h := shimv1connect.NewShimServiceHandler(&fakeMember{})
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer TOKEN" {
			http.Error(w, "no token", http.StatusUnauthorized)
			return
		}
		h.ServeHTTP(w, r)
	}))
	srv.EnableHTTP2 = true
	srv.StartTLS()
	return strings.TrimPrefix(srv.URL, "https://"), srv.Certificate(), srv.Close
}

type fakeMember struct {
	shimv1connect.UnimplementedShimServiceHandler
	spawned *pb.ProcessRecord
}

func (f *fakeMember) Spawn(_ context.Context, r *connect.Request[pb.SpawnRequest]) (*connect.Response[pb.SpawnResponse], error) {
	f.spawned = &pb.ProcessRecord{Id: "0123456789ab", Spec: r.Msg.GetSpec(), Node: "node-a",
		State: pb.ProcessState_PROCESS_STATE_STARTING}
	return connect.NewResponse(&pb.SpawnResponse{Processes: []*pb.ProcessRecord{f.spawned}}), nil
}

func (f *fakeMember) List(context.Context, *connect.Request[pb.ListRequest]) (*connect.Response[pb.ListResponse], error) {
	return connect.NewResponse(&pb.ListResponse{Processes: []*pb.ProcessRecord{f.spawned}}), nil
}
