package main

import (
	"testing"

	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
)

func TestParsePortAndCheck(t *testing.T) {
	for _, c := range []struct {
		in   string
		want *pb.PortSpec
		bad  bool
	}{
		{"http", &pb.PortSpec{Name: "HTTP"}, false},
		{"admin:9000", &pb.PortSpec{Name: "ADMIN", Port: 9000}, false},
		{"x:0", nil, true},
		{"x:70000", nil, true},
		{"x:abc", nil, true},
	} {
		got, err := parsePort(c.in)
		if (err != nil) != c.bad || (!c.bad && !proto.Equal(got, c.want)) {
			t.Errorf("parsePort(%q) = %v, %v", c.in, got, err)
		}
	}
	for _, c := range []struct {
		in   string
		want *pb.HealthCheck
		bad  bool
	}{
		{"http:http:/healthz", &pb.HealthCheck{Kind: "http", Port: "HTTP", Path: "/healthz"}, false},
		{"tcp:db", &pb.HealthCheck{Kind: "tcp", Port: "DB"}, false},
		{"exec:test -f /tmp/ok", &pb.HealthCheck{Kind: "exec", Command: []string{"test", "-f", "/tmp/ok"}}, false},
		{"http:http", nil, true},
		{"tcp:", nil, true},
		{"exec:", nil, true},
		{"grpc:x", nil, true},
	} {
		got, err := parseCheck(c.in)
		if (err != nil) != c.bad || (!c.bad && !proto.Equal(got, c.want)) {
			t.Errorf("parseCheck(%q) = %v, %v", c.in, got, err)
		}
	}
}

func TestGroupReplicas(t *testing.T) {
	recs := []*pb.ProcessRecord{
		{Id: "a", Service: "web", Replica: 2}, {Id: "b"}, {Id: "c", Service: "web", Replica: 0},
		{Id: "d", Service: "db", Replica: 1}, {Id: "e", Service: "web", Replica: 1}, {Id: "f", Service: "db", Replica: 0},
	}
	var got []string
	for _, r := range groupReplicas(recs) {
		got = append(got, r.Id)
	}
	want := []string{"c", "e", "a", "b", "f", "d"}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("order %v, want %v", got, want)
		}
	}
	if s := nameText(recs[0]); s != "web[2]" {
		t.Errorf("name %q", s)
	}
}

func TestParseCount(t *testing.T) {
	for _, c := range []struct {
		in, name  string
		n, lo, hi int
		bad       bool
	}{
		{"3", "", 3, 0, 0, false},
		{"2:5", "web", 2, 2, 5, false},
		{"2:5", "", 0, 0, 0, true},
		{"5:2", "web", 0, 0, 0, true},
		{"0", "web", 0, 0, 0, true},
		{"x", "web", 0, 0, 0, true},
	} {
		o := &spawnOptions{countS: c.in, name: c.name}
		err := o.parseCount()
		if (err != nil) != c.bad || (!c.bad && (o.count != c.n || int(o.min) != c.lo || int(o.max) != c.hi)) {
			t.Errorf("--count %s: %+v, %v", c.in, o, err)
		}
	}
}
