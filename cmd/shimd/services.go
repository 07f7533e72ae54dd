package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/pflag"

	"github.com/shim-run/shim/dns"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
	"github.com/shim-run/shim/server"
	"github.com/shim-run/shim/table"
)

// Services on this node: the port range it picks ports from, and its DNS
// server (package dns).

type serviceOptions struct {
	dns, portRange string
}

// DefaultDNS is where shimd answers DNS unless told otherwise (Consul's port).
const DefaultDNS = "127.0.0.1:8600"

func addServiceFlags(f *pflag.FlagSet, o *serviceOptions) {
	f.StringVar(&o.dns, "dns", DefaultDNS, "answer DNS for services (NAME.shim., _PORT._tcp.NAME.shim.) on `ADDR`, UDP and TCP; off: no DNS")
	f.StringVar(&o.portRange, "port-range", fmt.Sprintf("%d-%d", table.DefaultPortMin, table.DefaultPortMax),
		"the ports `LO-HI` this node gives processes that ask for one (spawn --port NAME)")
}

// parsePortRange reads LO-HI.
func parsePortRange(v string) (uint32, uint32, error) {
	los, his, ok := strings.Cut(v, "-")
	lo, err1 := strconv.ParseUint(los, 10, 16)
	hi, err2 := strconv.ParseUint(his, 10, 16)
	if !ok || err1 != nil || err2 != nil || lo == 0 || hi < lo {
		return 0, 0, fmt.Errorf("--port-range %q: want LO-HI with 1 <= LO <= HI <= 65535", v)
	}
	return uint32(lo), uint32(hi), nil
}

// listenDNS starts this node's DNS server early, before other sockets of
// this process take ephemeral ports; it knows no names until serveDNS. A
// busy address is logged, not fatal: the node runs without DNS (nil).
func listenDNS(o serviceOptions, log *slog.Logger) *dns.Server {
	if o.dns == "off" || o.dns == "" {
		return nil
	}
	s := &dns.Server{Addr: o.dns}
	if err := s.Start(); err != nil {
		log.Warn("dns: cannot listen; this node answers no DNS", "addr", o.dns, "err", err)
		return nil
	}
	log.Info("dns started", "addr", s.Addr)
	return s
}

// serveDNS makes s answer from t on a server, or from the servers on a
// worker (t nil).
func serveDNS(s *dns.Server, t *table.Table, addrs func() []string, client func(string) shimv1connect.ShimServiceClient) {
	if s == nil {
		return
	}
	if t != nil {
		s.SetSource((&localEndpoints{t: t, cache: map[string]*cached{}}).lookup, t.Index)
		return
	}
	s.SetSource((&remoteEndpoints{addrs: addrs, client: client, cache: map[string]*cached{}}).lookup, nil)
}

// remoteEndpoints answers a worker's DNS from the servers (stale reads),
// each name cached for remoteTTL.
type remoteEndpoints struct {
	addrs  func() []string
	client func(string) shimv1connect.ShimServiceClient
	mu     sync.Mutex
	cache  map[string]*cached
}

type cached struct {
	eps   []*pb.Endpoint
	known bool
	at    time.Time
	index uint64 // localEndpoints: the table index it was read at
}

// localEndpoints answers a server's DNS from its table, each name's
// answer kept until the table changes.
type localEndpoints struct {
	t     *table.Table
	mu    sync.Mutex
	cache map[string]*cached
}

func (l *localEndpoints) lookup(name string) ([]*pb.Endpoint, bool) {
	idx := l.t.Index()
	l.mu.Lock()
	c := l.cache[name]
	l.mu.Unlock()
	if c != nil && c.index == idx {
		return c.eps, c.known
	}
	c = &cached{index: idx}
	if l.t.Service(name) != nil {
		c.eps, c.known = server.Endpoints(l.t, name), true
	}
	l.mu.Lock()
	if len(l.cache) > 4096 {
		l.cache = map[string]*cached{}
	}
	l.cache[name] = c
	l.mu.Unlock()
	return c.eps, c.known
}

const remoteTTL = 250 * time.Millisecond

func (r *remoteEndpoints) lookup(name string) ([]*pb.Endpoint, bool) {
	r.mu.Lock()
	c := r.cache[name]
	r.mu.Unlock()
	if c != nil && time.Since(c.at) < remoteTTL {
		return c.eps, c.known
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	for _, addr := range r.addrs() {
		resp, err := r.client(addr).Endpoints(ctx, connect.NewRequest(&pb.EndpointsRequest{Name: name, Consistency: pb.Consistency_CONSISTENCY_STALE}))
		var ce *connect.Error
		switch {
		case err == nil:
			c = &cached{eps: resp.Msg.GetEndpoints(), known: true, at: time.Now()}
		case errors.As(err, &ce) && ce.Code() == connect.CodeNotFound:
			c = &cached{at: time.Now()}
		default:
			continue
		}
		r.mu.Lock()
		if len(r.cache) > 4096 {
			r.cache = map[string]*cached{}
		}
		r.cache[name] = c
		r.mu.Unlock()
		return c.eps, c.known
	}
	if c != nil {
		return c.eps, c.known // the servers are out of reach: the last answer
	}
	return nil, false
}
