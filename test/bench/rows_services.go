package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	mdns "github.com/miekg/dns"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"

	"connectrpc.com/connect"
)

// ---- row 15: services and DNS ----

// spawnService makes service name: count replicas of sleep with port HTTP.
func (c *cluster) spawnService(ctx context.Context, name string, count int) error {
	spec := sleepSpec(pb.Isolation_ISOLATION_PROCESS)
	spec.Name, spec.Ports = name, []*pb.PortSpec{{Name: "HTTP"}}
	_, err := anyServer(c, ctx, func(ctx context.Context, cl shimv1connect.ShimServiceClient) (*pb.SpawnResponse, error) {
		r, err := cl.Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec, Count: uint32(count), Service: true, Wait: true}))
		if err != nil {
			return nil, err
		}
		return r.Msg, nil
	})
	return err
}

// srvTargets asks addr for _http._tcp.name.shim. and returns the SRV targets.
func srvTargets(co *mdns.Conn, name string) ([]string, error) {
	m := new(mdns.Msg)
	m.SetQuestion("_http._tcp."+name+".shim.", mdns.TypeSRV)
	_ = co.SetDeadline(time.Now().Add(2 * time.Second))
	if err := co.WriteMsg(m); err != nil {
		return nil, err
	}
	r, err := co.ReadMsg()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, rr := range r.Answer {
		if s, ok := rr.(*mdns.SRV); ok {
			out = append(out, strings.TrimSuffix(s.Target, ".node.shim."))
		}
	}
	return out, nil
}

func rowDNSRate(e *env) []Result {
	const what, goal = "DNS SRV answers/s from one shimd (3 replicas, 16 UDP clients)", "≥ 20,000/s"
	c := newCluster(e, "dns")
	defer c.close()
	if err := c.startServers(3); err != nil {
		return []Result{failed("15a", what, "/s", goal, err)}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := c.spawnService(ctx, "web", 3); err != nil {
		return []Result{failed("15a", what, "/s", goal, err)}
	}
	target := c.servers[1] // a follower or the leader: every shimd answers from its own table
	var ok, bad atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	// The clients share the two cores with the server: they send a packed
	// query and read only the answer's header (its id and answer count),
	// so that most of the CPU goes to the server.
	q := new(mdns.Msg)
	q.SetQuestion("_http._tcp.web.shim.", mdns.TypeSRV)
	for i := range 16 {
		conn, err := net.Dial("udp", target.dns)
		if err != nil {
			return []Result{failed("15a", what, "/s", goal, err)}
		}
		q.Id = uint16(i + 1)
		wire, err := q.Pack()
		if err != nil {
			return []Result{failed("15a", what, "/s", goal, err)}
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer conn.Close()
			buf := make([]byte, 1500)
			for {
				select {
				case <-stop:
					return
				default:
				}
				_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
				if _, err := conn.Write(wire); err != nil {
					bad.Add(1)
					continue
				}
				n, err := conn.Read(buf)
				if err == nil && n >= 12 && buf[0] == wire[0] && buf[1] == wire[1] && binary.BigEndian.Uint16(buf[6:8]) == 3 {
					ok.Add(1)
				} else {
					bad.Add(1)
				}
			}
		}()
	}
	secs := pick(e, 5, 20)
	var rates []float64
	last := ok.Load()
	for range secs {
		time.Sleep(time.Second)
		n := ok.Load()
		rates = append(rates, float64(n-last))
		last = n
	}
	close(stop)
	wg.Wait()
	return []Result{{Row: "15a", What: what, Unit: "/s", Sample: rates, Goal: goal,
		Check: func(s Stats) bool { return s.Median >= 20000 },
		Note:  fmt.Sprintf("per-second counts over %d s from the second server's --dns; 16 UDP clients on the same 2 cores send packed queries and check only the reply's id and answer count (3); %d replies were missing or short", secs, bad.Load())}}
}

func rowDNSDeath(e *env) []Result {
	rounds := pick(e, 5, 20)
	const what, goal = "kill -9 a worker running a replica → a server's DNS no longer lists it", "p99 ≤ 2000"
	c := newCluster(e, "dnsdeath")
	defer c.close()
	if err := c.startServers(3); err != nil {
		return []Result{failed("15b", what, "ms", goal, err)}
	}
	co, err := mdns.Dial("udp", c.servers[0].dns)
	if err != nil {
		return []Result{failed("15b", what, "ms", goal, err)}
	}
	defer co.Close()
	var sample []float64
	var errs []string
	for r := range rounds {
		name := fmt.Sprintf("web%d", r)
		err := func() error {
			victim, err := c.addWorker(0)
			if err != nil {
				return err
			}
			if err := c.waitNodesUp(4, 30*time.Second); err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			if err := c.spawnService(ctx, name, 4); err != nil { // one per node
				return err
			}
			listed := func() (bool, error) {
				ts, err := srvTargets(co, name)
				if err != nil {
					return false, err
				}
				for _, t := range ts {
					if t == strings.ToLower(victim.name) {
						return true, nil
					}
				}
				return false, nil
			}
			deadline := time.Now().Add(30 * time.Second)
			for {
				if in, _ := listed(); in {
					break
				}
				if time.Now().After(deadline) {
					return fmt.Errorf("the victim's replica never showed in DNS")
				}
				time.Sleep(20 * time.Millisecond)
			}
			t0 := time.Now()
			c.kill9(victim)
			for _, p := range nodePids(victim.name) {
				_ = syscall.Kill(p, syscall.SIGKILL)
			}
			for {
				if in, err := listed(); err == nil && !in {
					break
				}
				if time.Since(t0) > 30*time.Second {
					return fmt.Errorf("DNS still lists %s 30 s after its death", victim.name)
				}
				time.Sleep(5 * time.Millisecond)
			}
			sample = append(sample, ms(time.Since(t0)))
			sweepCgroups(victim.name)
			c.workers = c.workers[:len(c.workers)-1]
			return nil
		}()
		if err != nil {
			errs = append(errs, fmt.Sprintf("round %d: %v", r+1, err))
		}
		c.killAll()
	}
	note := fmt.Sprintf("3 servers + 1 worker per round; service of 4 sleep replicas, one per node; polled every 5 ms over UDP; lease 1 s; %d rounds", rounds)
	if len(errs) > 0 {
		note += "; failed: " + strings.Join(errs, "; ")
	}
	return []Result{{Row: "15b", What: what, Unit: "ms", Sample: sample, Goal: goal,
		Check: func(s Stats) bool { return s.P99 <= 2000 && len(errs) == 0 }, Note: note}}
}
