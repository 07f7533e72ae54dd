package agent

import (
	"net"
	"net/http"
	"slices"
	"strconv"
	"testing"
	"time"

	pb "github.com/shim-run/shim/proto/shimv1"
)

func TestVerdict(t *testing.T) {
	t0 := time.Unix(100, 0)
	v := verdict{unhealthy: t0}
	if ch, rs := v.observe(false, t0.Add(time.Second), 5*time.Second); !ch || rs {
		t.Fatalf("first failure: changed %v restart %v", ch, rs)
	}
	if ch, rs := v.observe(false, t0.Add(2*time.Second), 5*time.Second); ch || rs {
		t.Fatalf("second failure: changed %v restart %v", ch, rs)
	}
	if ch, _ := v.observe(true, t0.Add(3*time.Second), 5*time.Second); !ch || v.health != pb.Health_HEALTH_HEALTHY {
		t.Fatalf("healthy probe: changed %v health %v", ch, v.health)
	}
	// Unhealthy for 5 s after the last healthy probe: restart.
	if _, rs := v.observe(false, t0.Add(7*time.Second), 5*time.Second); rs {
		t.Fatal("restart 4 s after the last healthy probe")
	}
	if _, rs := v.observe(false, t0.Add(8*time.Second), 5*time.Second); !rs {
		t.Fatal("no restart 5 s after the last healthy probe")
	}
	if _, rs := v.observe(false, t0.Add(time.Hour), 0); rs {
		t.Fatal("restart with restarts off")
	}
}

func TestProbe(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/ok" {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	})}
	go func() { _ = srv.Serve(ln) }()
	defer srv.Close()
	port, _ := strconv.Atoi(ln.Addr().(*net.TCPAddr).AddrPort().String()[len("127.0.0.1:"):])
	rec := &pb.ProcessRecord{Id: "p", Spec: &pb.ProcessSpec{Ports: []*pb.PortSpec{{Name: "HTTP"}}}, Ports: map[string]uint32{"HTTP": uint32(port)}}
	a := &Agent{Node: &pb.NodeRecord{Name: "n1"}}
	for _, tc := range []struct {
		c  *pb.HealthCheck
		ok bool
	}{
		{&pb.HealthCheck{Kind: "http", Port: "HTTP", Path: "/ok"}, true},
		{&pb.HealthCheck{Kind: "http", Port: "HTTP", Path: "/bad"}, false},
		{&pb.HealthCheck{Kind: "tcp", Port: "HTTP"}, true},
		{&pb.HealthCheck{Kind: "tcp", Port: "NONE"}, false},
		{&pb.HealthCheck{Kind: "exec", Command: []string{"/bin/true"}}, true},
		{&pb.HealthCheck{Kind: "exec", Command: []string{"/bin/false"}}, false},
	} {
		if err := a.probe(rec, tc.c); (err == nil) != tc.ok {
			t.Errorf("%v: err %v, want ok %v", tc.c, err, tc.ok)
		}
	}
}

func TestServiceEnv(t *testing.T) {
	rec := &pb.ProcessRecord{Service: "web", Replica: 2, Spec: &pb.ProcessSpec{Ports: []*pb.PortSpec{{Name: "HTTP"}}},
		Ports: map[string]uint32{"HTTP": 20001}}
	got := serviceEnv(rec, "n1")
	want := []string{"SHIM_SERVICE=web", "SHIM_REPLICA=2", "SHIM_PORT_HTTP=20001"}
	if !slices.Equal(got, want) {
		t.Fatalf("env %v, want %v", got, want)
	}
}
