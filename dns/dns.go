// Package dns answers DNS queries for shim's services, as Consul's DNS
// interface does: NAME.shim. has an A record per node that runs a healthy
// replica of service NAME, _PORT._tcp.NAME.shim. an SRV record per healthy
// replica with its port PORT (and the node's A record in the additional
// section), and NODE.node.shim. the node's address. Every shimd runs one,
// answering from its own copy of the table (servers) or from what it last
// read from a server (workers).
package dns

import (
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"

	mdns "github.com/miekg/dns"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Domain is the zone the server answers for.
const Domain = "shim."

// TTL of every answer, in seconds: 0, so that resolvers ask again and a
// replica that moved is seen at once.
const TTL = 0

// Source looks up a service: its healthy endpoints, and whether a service
// of that name exists at all.
type Source func(name string) (eps []*pb.Endpoint, known bool)

// Server is a DNS server on one address, UDP and TCP. Its source may be
// set after Start with SetSource; until then every name is unknown.
type Server struct {
	Addr   string
	Source Source

	src atomic.Pointer[source]

	cacheMu sync.Mutex
	cacheAt uint64
	cache   map[cacheKey][]byte

	mu  sync.Mutex
	udp *mdns.Server
	tcp *mdns.Server
}

// Start listens on Addr (UDP and TCP) and serves in the background. It
// returns once both listen, or the first error.
func (s *Server) Start() error {
	pc, err := net.ListenPacket("udp", s.Addr)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", pc.LocalAddr().String())
	if err != nil {
		pc.Close()
		return err
	}
	if s.Source != nil {
		s.SetSource(s.Source, nil)
	}
	h := mdns.HandlerFunc(s.serve)
	s.mu.Lock()
	s.udp = &mdns.Server{PacketConn: pc, Handler: h}
	s.tcp = &mdns.Server{Listener: ln, Handler: h}
	s.Addr = pc.LocalAddr().String()
	s.mu.Unlock()
	go func() { _ = s.udp.ActivateAndServe() }()
	go func() { _ = s.tcp.ActivateAndServe() }()
	return nil
}

// Close stops the server.
func (s *Server) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.udp != nil {
		_ = s.udp.Shutdown()
		_ = s.tcp.Shutdown()
		s.udp, s.tcp = nil, nil
	}
}

type source struct {
	src     Source
	version func() uint64
}

// SetSource sets where the server's answers come from. version, if not
// nil, says when src's answers may have changed (the table's index):
// answers are then kept, packed, until it moves.
func (s *Server) SetSource(src Source, version func() uint64) {
	s.src.Store(&source{src, version})
}

func none(string) ([]*pb.Endpoint, bool) { return nil, false }

// cacheKey is what an answer depends on besides the source.
type cacheKey struct {
	name   string
	qtype  uint16
	rd     bool
	opcode int
}

// maxCached bounds the answer cache.
const maxCached = 4096

func (s *Server) serve(w mdns.ResponseWriter, req *mdns.Msg) {
	src, version := Source(none), (func() uint64)(nil)
	if p := s.src.Load(); p != nil {
		src, version = p.src, p.version
	}
	if version == nil || len(req.Question) != 1 || req.IsEdns0() != nil {
		_ = w.WriteMsg(Answer(req, src))
		return
	}
	k := cacheKey{req.Question[0].Name, req.Question[0].Qtype, req.RecursionDesired, req.Opcode}
	v := version()
	s.cacheMu.Lock()
	if s.cacheAt != v || s.cache == nil || len(s.cache) > maxCached {
		s.cache, s.cacheAt = map[cacheKey][]byte{}, v
	}
	b := s.cache[k]
	s.cacheMu.Unlock()
	if b == nil {
		packed, err := Answer(req, src).Pack()
		if err != nil {
			_ = w.WriteMsg(Answer(req, src))
			return
		}
		s.cacheMu.Lock()
		if s.cacheAt == v {
			s.cache[k] = packed
		}
		s.cacheMu.Unlock()
		b = packed
	}
	out := make([]byte, len(b))
	copy(out, b)
	out[0], out[1] = byte(req.Id>>8), byte(req.Id) // the asker's id
	_, _ = w.Write(out)
}

// Answer builds the reply to req from src.
func Answer(req *mdns.Msg, src Source) *mdns.Msg {
	m := new(mdns.Msg)
	m.SetReply(req)
	m.Authoritative = true
	m.RecursionAvailable = false
	if len(req.Question) != 1 {
		m.Rcode = mdns.RcodeFormatError
		return m
	}
	q := req.Question[0]
	name := strings.ToLower(q.Name)
	if !strings.HasSuffix(name, "."+Domain) {
		m.Rcode = mdns.RcodeRefused
		return m
	}
	labels := strings.Split(strings.TrimSuffix(name, "."+Domain), ".")
	switch {
	case len(labels) == 1:
		// NAME.shim.: A records of the nodes with healthy replicas.
		eps, known := src(labels[0])
		if !known {
			m.Rcode = mdns.RcodeNameError
			return m
		}
		if q.Qtype != mdns.TypeA && q.Qtype != mdns.TypeANY {
			return m
		}
		seen := map[string]bool{}
		for _, e := range eps {
			if seen[e.Address] {
				continue
			}
			seen[e.Address] = true
			if rr := aRecord(q.Name, e.Address); rr != nil {
				m.Answer = append(m.Answer, rr)
			}
		}
	case len(labels) == 3 && strings.HasPrefix(labels[0], "_") && labels[1] == "_tcp":
		// _PORT._tcp.NAME.shim.: SRV records of the healthy replicas.
		eps, known := src(labels[2])
		if !known {
			m.Rcode = mdns.RcodeNameError
			return m
		}
		if q.Qtype != mdns.TypeSRV && q.Qtype != mdns.TypeANY {
			return m
		}
		port := strings.ToUpper(labels[0][1:])
		added := map[string]bool{}
		for _, e := range eps {
			p, ok := e.Ports[port]
			if !ok {
				continue
			}
			target := strings.ToLower(e.Node) + ".node." + Domain
			m.Answer = append(m.Answer, &mdns.SRV{
				Hdr:      mdns.RR_Header{Name: q.Name, Rrtype: mdns.TypeSRV, Class: mdns.ClassINET, Ttl: TTL},
				Priority: 1, Weight: 1, Port: uint16(p), Target: target,
			})
			if !added[target] {
				added[target] = true
				if rr := aRecord(target, e.Address); rr != nil {
					m.Extra = append(m.Extra, rr)
				}
			}
		}
	case len(labels) == 2 && labels[1] == "node":
		// NODE.node.shim.: answered from the endpoints of no service; a
		// resolver following an SRV target finds it in the additional
		// section, so only say the name exists.
		return m
	default:
		m.Rcode = mdns.RcodeNameError
	}
	return m
}

// aRecord is an A record of name for addr, or nil if addr is no IPv4
// address (a host name: resolved here once).
func aRecord(name, addr string) mdns.RR {
	ip, err := netip.ParseAddr(addr)
	if err != nil {
		ips, lerr := net.LookupIP(addr)
		if lerr != nil || len(ips) == 0 {
			return nil
		}
		for _, x := range ips {
			if v4 := x.To4(); v4 != nil {
				ip, _ = netip.AddrFromSlice(v4)
				break
			}
		}
	}
	if !ip.Is4() {
		return nil
	}
	return &mdns.A{Hdr: mdns.RR_Header{Name: name, Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: TTL}, A: ip.AsSlice()}
}
