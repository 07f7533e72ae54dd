package dns

import (
	"fmt"
	"slices"
	"sync"
	"testing"

	mdns "github.com/miekg/dns"

	pb "github.com/shim-run/shim/proto/shimv1"
)

func testSource(name string) ([]*pb.Endpoint, bool) {
	switch name {
	case "web":
		return []*pb.Endpoint{
			{Id: "a", Node: "n1", Address: "127.0.0.1", Ports: map[string]uint32{"HTTP": 20000}},
			{Id: "b", Node: "n2", Address: "127.0.0.2", Ports: map[string]uint32{"HTTP": 20001}},
			{Id: "c", Node: "n3", Address: "127.0.0.2", Ports: map[string]uint32{"HTTP": 20002}},
		}, true
	case "idle":
		return nil, true
	}
	return nil, false
}

func query(t *testing.T, addr, name string, typ uint16, net string) *mdns.Msg {
	t.Helper()
	c := &mdns.Client{Net: net}
	m := new(mdns.Msg)
	m.SetQuestion(name, typ)
	r, _, err := c.Exchange(m, addr)
	if err != nil {
		t.Fatalf("query %s: %v", name, err)
	}
	return r
}

func TestServer(t *testing.T) {
	s := &Server{Addr: "127.0.0.1:0", Source: testSource}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, network := range []string{"udp", "tcp"} {
		r := query(t, s.Addr, "web.shim.", mdns.TypeA, network)
		var ips []string
		for _, rr := range r.Answer {
			ips = append(ips, rr.(*mdns.A).A.String())
		}
		slices.Sort(ips)
		if r.Rcode != mdns.RcodeSuccess || !slices.Equal(ips, []string{"127.0.0.1", "127.0.0.2"}) {
			t.Fatalf("%s: A web.shim.: rcode %d, %v", network, r.Rcode, ips)
		}
		r = query(t, s.Addr, "_http._tcp.WEB.shim.", mdns.TypeSRV, network)
		var ports []int
		for _, rr := range r.Answer {
			ports = append(ports, int(rr.(*mdns.SRV).Port))
		}
		slices.Sort(ports)
		if !slices.Equal(ports, []int{20000, 20001, 20002}) || len(r.Extra) != 3 {
			t.Fatalf("%s: SRV: ports %v, extra %v", network, ports, r.Extra)
		}
	}
	if r := query(t, s.Addr, "nope.shim.", mdns.TypeA, "udp"); r.Rcode != mdns.RcodeNameError {
		t.Errorf("unknown service: rcode %d, want NXDOMAIN", r.Rcode)
	}
	if r := query(t, s.Addr, "idle.shim.", mdns.TypeA, "udp"); r.Rcode != mdns.RcodeSuccess || len(r.Answer) != 0 {
		t.Errorf("service without endpoints: rcode %d, %v", r.Rcode, r.Answer)
	}
	if r := query(t, s.Addr, "_admin._tcp.web.shim.", mdns.TypeSRV, "udp"); len(r.Answer) != 0 {
		t.Errorf("unknown port: %v", r.Answer)
	}
	if r := query(t, s.Addr, "example.com.", mdns.TypeA, "udp"); r.Rcode != mdns.RcodeRefused {
		t.Errorf("outside the zone: rcode %d, want REFUSED", r.Rcode)
	}
}

func BenchmarkAnswer(b *testing.B) {
	m := new(mdns.Msg)
	m.SetQuestion("_http._tcp.web.shim.", mdns.TypeSRV)
	for b.Loop() {
		Answer(m, testSource)
	}
}

// TestCachedAnswers: with a version, answers are kept until it moves, and
// each carries the asker's id.
func TestCachedAnswers(t *testing.T) {
	var version uint64 = 1
	var mu sync.Mutex
	n := 1
	src := func(name string) ([]*pb.Endpoint, bool) {
		mu.Lock()
		defer mu.Unlock()
		var eps []*pb.Endpoint
		for i := range n {
			eps = append(eps, &pb.Endpoint{Node: fmt.Sprintf("n%d", i), Address: "127.0.0.1", Ports: map[string]uint32{"HTTP": uint32(20000 + i)}})
		}
		return eps, true
	}
	s := &Server{Addr: "127.0.0.1:0"}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.SetSource(src, func() uint64 { mu.Lock(); defer mu.Unlock(); return version })
	count := func() int {
		r := query(t, s.Addr, "_http._tcp.web.shim.", mdns.TypeSRV, "udp")
		return len(r.Answer)
	}
	if got := count(); got != 1 {
		t.Fatalf("%d answers, want 1", got)
	}
	mu.Lock()
	n = 3
	mu.Unlock()
	if got := count(); got != 1 {
		t.Fatalf("the same version answered anew: %d", got)
	}
	mu.Lock()
	version++
	mu.Unlock()
	if got := count(); got != 3 {
		t.Fatalf("after the version moved: %d answers, want 3", got)
	}
	for _, network := range []string{"udp", "tcp"} {
		m := new(mdns.Msg)
		m.SetQuestion("_http._tcp.web.shim.", mdns.TypeSRV)
		m.Id = 4242
		r, _, err := (&mdns.Client{Net: network}).Exchange(m, s.Addr)
		if err != nil || r.Id != 4242 || len(r.Answer) != 3 {
			t.Fatalf("%s: id %d, %d answers, %v", network, r.Id, len(r.Answer), err)
		}
	}
}
