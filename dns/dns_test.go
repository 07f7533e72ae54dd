package dns

import (
	"slices"
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
