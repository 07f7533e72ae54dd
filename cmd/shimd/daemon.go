package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	stdlog "log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	"github.com/shim-run/shim/agent"
	"github.com/shim-run/shim/auth"
	"github.com/shim-run/shim/guard"
	"github.com/shim-run/shim/metrics"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
	"github.com/shim-run/shim/raftlog"
	"github.com/shim-run/shim/server"
	"github.com/shim-run/shim/table"
	"github.com/shim-run/shim/ui"
)

type options struct {
	name, dataDir, api, raftAddr, role, join, logLevel string
	advertise, raftAdvertise                           string
	joinToken, joinTokenFile                           string
	metricsOpen, insecure                              bool
	lease, hold                                        time.Duration
	reserveCPU, reserveMem, cpuCap, memCap             string
	overcommit                                         uint32
	simulate                                           int
	initPath                                           string
	hostPaths                                          []string
	retain                                             time.Duration
	retainMax                                          int
	snapInterval                                       time.Duration
	snapThreshold                                      uint64
	grow                                               growOptions    // grow.go
	services                                           serviceOptions // services.go
}

func newCommand() *cobra.Command {
	host, _ := os.Hostname()
	o := &options{}
	cmd := &cobra.Command{
		Use:           "shimd",
		Short:         "shim node daemon: a member of the cluster's process table that runs its share of processes",
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE:          func(cmd *cobra.Command, _ []string) error { return run(cmd.Context(), o) },
	}
	f := cmd.Flags()
	f.StringVar(&o.name, "name", host, "node name (unique in the cluster)")
	f.StringVar(&o.dataDir, "data-dir", "./shim-data", "directory for Raft state, process state and logs")
	f.StringVar(&o.api, "api", "127.0.0.1:7070", "API listen address (HTTPS; also what other nodes dial, unless --advertise)")
	f.StringVar(&o.raftAddr, "raft", "127.0.0.1:7071", "Raft listen address (servers only)")
	f.StringVar(&o.advertise, "advertise", "", "API address other nodes and clients dial (default: --api); needed when --api listens on 0.0.0.0")
	f.StringVar(&o.raftAdvertise, "raft-advertise", "", "Raft address other servers dial (default: --raft); needed when --raft listens on 0.0.0.0")
	f.StringVar(&o.role, "role", "server", "server (Raft voter) or worker (runs processes, not in Raft)")
	f.StringVar(&o.join, "join", "", "API address of any member, comma-separated for several; empty bootstraps a new cluster")
	f.StringVar(&o.joinToken, "join-token", "", "join token for a new node (default $SHIM_JOIN_TOKEN); the bootstrap server wrote one to <data-dir>/join.token")
	f.StringVar(&o.joinTokenFile, "join-token-file", "", "read the join token from this file")
	f.BoolVar(&o.metricsOpen, "metrics-open", false, "serve /metrics without a token")
	f.BoolVar(&o.insecure, "insecure", false, "no TLS and no tokens: anyone who reaches a port owns every host (benchmarks only)")
	_ = f.MarkHidden("insecure")
	f.DurationVar(&o.lease, "lease", time.Second, "node lease: a node that cannot renew it for this long is fenced and replaced")
	f.DurationVar(&o.retain, "retain", server.DefaultRetain, "how long an ended process stays in the table (shim ps -a) before the leader prunes it")
	f.IntVar(&o.retainMax, "retain-max", server.DefaultRetainMax, "the most ended processes the table keeps (oldest pruned first); -1: no cap")
	f.DurationVar(&o.snapInterval, "snapshot-interval", 0, "how often Raft checks whether to snapshot (default 30s; tests)")
	f.Uint64Var(&o.snapThreshold, "snapshot-threshold", 0, "log entries since the last snapshot that make Raft take one (default 8192; tests)")
	_ = f.MarkHidden("snapshot-interval")
	_ = f.MarkHidden("snapshot-threshold")
	f.DurationVar(&o.hold, "shutdown-hold", 30*time.Second, "after a clean stop, how long the cluster waits for this shimd to return before moving its processes")
	f.StringVar(&o.reserveCPU, "reserve-cpu", "0", "CPU cores kept back for the system")
	f.StringVar(&o.reserveMem, "reserve-mem", "256M", "memory kept back for the system")
	f.StringVar(&o.cpuCap, "cpu", "", "CPU cores this node offers (default: detected)")
	f.StringVar(&o.memCap, "mem", "", "memory this node offers (default: detected)")
	f.Uint32Var(&o.overcommit, "overcommit", 200, "percent of memory capacity that the memory limits of the processes (fixed ones' maxima, elastic ones' grants) may reach (0 = unchecked)")
	f.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	f.StringVar(&o.initPath, "init", "", "shim-init, PID 1 of every sandbox and VM (default: next to shimd, then in PATH)")
	f.StringArrayVar(&o.hostPaths, "host-path", nil, "a host folder this node offers to sandboxes, `NAME=DIR[:ro]` (repeatable; spawn --mount NAME:PATH uses it)")
	f.IntVar(&o.simulate, "simulate", 0, "with --role worker: run this many simulated workers (pretend processes) for scale tests")
	_ = f.MarkHidden("simulate") // a benchmark tool (make bench), not for operators
	addGrowFlags(f, &o.grow)
	addServiceFlags(f, &o.services)
	cmd.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return err })
	cmd.AddCommand(guardCommand())
	return cmd
}

func run(ctx context.Context, o *options) error {
	log, err := newLogger(o.logLevel)
	if err != nil {
		return err
	}
	if err := table.ValidateName(o.name); err != nil || o.name == "" {
		return fmt.Errorf("--name %q: use 1-63 letters, digits, '.', '_' or '-'", o.name)
	}
	role, err := parseRole(o.role)
	if err != nil {
		return err
	}
	if o.lease < 100*time.Millisecond {
		return fmt.Errorf("--lease %s is too short (at least 100ms)", o.lease)
	}
	if o.retain < time.Second {
		return fmt.Errorf("--retain %s is too short (at least 1s)", o.retain)
	}
	if o.retainMax == 0 || o.retainMax < -1 {
		return fmt.Errorf("--retain-max %d: use a positive count, or -1 for no cap", o.retainMax)
	}
	if _, err := o.grow.policy(); err != nil {
		return err
	}
	capacity, err := detectCapacity(o)
	if err != nil {
		return err
	}
	hostPaths, hostPathRecs, err := parseHostPaths(o.hostPaths)
	if err != nil {
		return err
	}
	portMin, portMax, err := parsePortRange(o.services.portRange)
	if err != nil {
		return err
	}
	if o.initPath, err = absInit(o.initPath); err != nil {
		return err
	}
	// Absolute from here on: sandboxes mount folders below it (work
	// folders), and the guard runs from another directory.
	if o.dataDir, err = filepath.Abs(o.dataDir); err != nil {
		return fmt.Errorf("--data-dir: %w", err)
	}
	if err := os.MkdirAll(o.dataDir, 0o755); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	unlock, err := lockDataDir(o.dataDir)
	if err != nil {
		return err
	}
	defer unlock()

	ctx, stop := signal.NotifyContext(ctx, syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	join := splitAddrs(o.join)
	apiAdv, err := advertised("api", o.api, o.advertise)
	if err != nil {
		return err
	}
	raftAdv := ""
	if role == pb.NodeRole_NODE_ROLE_SERVER {
		if raftAdv, err = advertised("raft", o.raftAddr, o.raftAdvertise); err != nil {
			return err
		}
	}
	if o.simulate > 0 {
		if role != pb.NodeRole_NODE_ROLE_WORKER || len(join) == 0 {
			return errors.New("--simulate needs --role worker and --join")
		}
		return simulate(ctx, o, o.simulate, join, capacity, log)
	}
	if role == pb.NodeRole_NODE_ROLE_WORKER && len(join) == 0 {
		return errors.New("--role worker needs --join with the API address of a server")
	}
	var creds *auth.Credentials
	var boot *bootstrap
	if o.insecure {
		log.Warn("--insecure: no TLS, no tokens; anyone who reaches this node's ports owns it")
	} else if creds, boot, err = trustSetup(ctx, o, role, join, certHosts(apiAdv, o.api, raftAdv, o.raftAddr), log); err != nil {
		return err
	}
	secure := creds != nil
	m := metrics.New(nil)
	srv := &server.Server{Name: o.name, Lease: o.lease, LogDir: filepath.Join(o.dataDir, "logs"), Log: log, Metrics: m,
		Auth: creds, MetricsOpen: o.metricsOpen, Retain: o.retain, RetainMax: o.retainMax}
	var rn *raftlog.Node
	if role == pb.NodeRole_NODE_ROLE_SERVER {
		t := table.New()
		w := server.NewWatcher()
		rc := raftlog.Config{
			ID: o.name, BindAddr: o.raftAddr, Advertise: o.raftAdvertise, DataDir: filepath.Join(o.dataDir, "raft"),
			Bootstrap: len(join) == 0, Logger: os.Stderr,
			// A new leader must answer heartbeats before any node's lease
			// (1 s, renewed every 200 ms) runs out, so elections must finish
			// well within 800 ms. hashicorp/raft's follower checks its last
			// contact on a timer of [HT, 2HT), so it notices a dead leader
			// HT to 3HT after the last contact: 200-600 ms here, and the
			// election ends when the last of a majority has noticed. A
			// deposed leader steps down after 200 ms without a quorum.
			HeartbeatTimeout: 200 * time.Millisecond, ElectionTimeout: 200 * time.Millisecond,
			LeaderLeaseTimeout: 200 * time.Millisecond,
			SnapshotInterval:   o.snapInterval, SnapshotThreshold: o.snapThreshold,
		}
		if secure {
			rc.ServerTLS, rc.ClientTLS = creds.TLS(auth.RaftServer), creds.TLS(auth.RaftClient)
		}
		rn, err = raftlog.Open(rc, &server.FSM{Table: t, Watch: w})
		if err != nil {
			return fmt.Errorf("raft: %w", err)
		}
		srv.Table, srv.Raft, srv.Watch = t, rn, w
	} else {
		srv.Peers = join
	}

	ln, err := net.Listen("tcp", o.api)
	if err != nil {
		return fmt.Errorf("api: %w", err)
	}
	dnsSrv := listenDNS(o.services, log) // services.go
	if dnsSrv != nil {
		defer dnsSrv.Close()
	}
	hs := &http.Server{Handler: ui.Mount(srv.Handler()), ReadHeaderTimeout: 10 * time.Second, ErrorLog: httpErrorLog(log)}
	if boot != nil {
		// Tokens must be good before anyone may use them.
		if err := finishBootstrap(ctx, srv, o.dataDir, boot); err != nil {
			ln.Close()
			return err
		}
	}
	go func() {
		var err error
		if secure {
			hs.TLSConfig = creds.TLS(auth.APIServer)
			err = hs.ServeTLS(ln, "", "")
		} else {
			err = hs.Serve(ln)
		}
		if err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("api server stopped", "err", err)
		}
	}()
	log.Info("shimd started", "role", o.role, "api", o.api, "advertise", apiAdv, "raft", raftAdv, "data", o.dataDir,
		"tls", secure, "cpu", table.Cores(capacity.CpuMaxMilli), "mem", table.Bytes(capacity.MemMaxBytes))

	// The agent talks to this node's own API on servers (which forwards to
	// the leader), and to the servers directly on workers. A server starts
	// with the members it joined through too: restarted, its own API
	// refuses until its table knows the leader again, and the agent must
	// not wait for that to rejoin.
	var addrsMu sync.Mutex
	addrs := []string{apiAdv}
	if role == pb.NodeRole_NODE_ROLE_WORKER {
		addrs = join
	} else {
		for _, j := range join {
			if j != apiAdv {
				addrs = append(addrs, j)
			}
		}
	}
	cluster, err := clusterID(creds, o.dataDir)
	if err != nil {
		return err
	}
	rt, err := newRuntime(cluster, o.name, o.initPath, log)
	if err != nil {
		return err
	}
	rt.keepDir = filepath.Join(o.dataDir, keepDirName)
	rt.prepare()
	// The guard fences this node's processes at the lease deadline the
	// agent publishes, should the agent be unable to: crashed or paused.
	deadline, err := guard.Open(filepath.Join(o.dataDir, guard.FileName), true)
	if err != nil {
		return err
	}
	defer deadline.Close()
	var clientTLS, streamTLS *tls.Config
	if secure {
		clientTLS, streamTLS = creds.TLS(auth.APIClient), creds.TLS(auth.StreamClient)
	}
	httpc := server.NewHTTPClient(clientTLS)
	clients := map[string]shimv1connect.AgentServiceClient{}
	ag := &agent.Agent{
		Node: &pb.NodeRecord{Name: o.name, Role: role, ApiAddr: apiAdv, RaftAddr: raftAdv,
			Capacity: capacity, OvercommitPercent: o.overcommit, HostPaths: hostPathRecs, VmUnavailable: rt.noVM,
			PortMin: portMin, PortMax: portMax},
		Addrs: func() []string {
			addrsMu.Lock()
			defer addrsMu.Unlock()
			return append([]string(nil), addrs...)
		},
		Client: func(addr string) shimv1connect.AgentServiceClient {
			addrsMu.Lock()
			defer addrsMu.Unlock()
			c := clients[addr]
			if c == nil {
				c = server.NewAgentClient(httpc, streamTLS, server.URL(addr, secure)) // heartbeats over a stream, as simulated workers
				clients[addr] = c
			}
			return c
		},
		OnServers: func(s []string) {
			if role == pb.NodeRole_NODE_ROLE_WORKER {
				addrsMu.Lock()
				addrs = s
				addrsMu.Unlock()
				srv.SetPeers(s)
			} else {
				addrsMu.Lock()
				addrs = []string{apiAdv}
				addrsMu.Unlock()
			}
		},
		Runtime:   rt,
		HostPaths: hostPaths,
		CA:        caPEM(creds),
		DataDir:   o.dataDir,
		Lease:     o.lease,
		Hold:      o.hold,
		Deadline:  deadline.SetTime,
		Resume:    resumeLease(deadline, max(o.lease, o.hold)),
		Log:       log,
		Metrics:   m,
	}
	if err := o.grow.wire(ag, shimClient(httpc, secure)); err != nil {
		return err
	}
	if err := startGuard(o.dataDir, cluster, o.name, log); err != nil {
		return err
	}
	if role == pb.NodeRole_NODE_ROLE_SERVER && !rn.HadState() && len(join) > 0 {
		// A new server must be a voter before its own API can answer.
		if err := joinRaft(ctx, httpc, secure, join, ag.Node); err != nil {
			return err
		}
	}

	srv.UsageOf = ag.Usage
	srv.ExecLocal = execLocal(ag) // exec.go
	rt.onWant = ag.Want
	serveDNS(dnsSrv, srv.Table, ag.Addrs, shimClient(httpc, secure)) // services.go
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); srv.Run(ctx) }()
	var agentErr error
	go func() { defer wg.Done(); agentErr = ag.Run(ctx) }()
	<-ctx.Done()
	log.Info("shutting down; processes keep running")
	wg.Wait()
	sctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if rn != nil && rn.IsLeader() {
		_ = rn.LeadershipTransfer()
	}
	_ = hs.Shutdown(sctx)
	if rn != nil {
		if err := rn.Shutdown(); err != nil {
			log.Warn("raft shutdown", "err", err)
		}
	}
	if agentErr != nil && !errors.Is(agentErr, context.Canceled) {
		return agentErr
	}
	return nil
}

// joinRaft asks a member to add this server as a voter, retrying until one
// answers; a refusal ends it.
func joinRaft(ctx context.Context, httpc *http.Client, secure bool, join []string, n *pb.NodeRecord) error {
	backoff := 100 * time.Millisecond
	for {
		var err error
		for _, addr := range join {
			c := shimv1connect.NewAgentServiceClient(httpc, server.URL(addr, secure))
			rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			_, err = c.Join(rctx, connect.NewRequest(&pb.JoinRequest{Node: n}))
			cancel()
			if err == nil {
				return nil
			}
			switch connect.CodeOf(err) {
			case connect.CodeInvalidArgument, connect.CodeUnauthenticated, connect.CodePermissionDenied:
				return fmt.Errorf("join %s: %s", addr, oneLine(err))
			}
		}
		slog.Warn("cannot join yet; retrying", "join", join, "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 2*time.Second)
	}
}

// advertised is the address others dial: adv, or the listen address, which
// then must be one (not 0.0.0.0).
func advertised(flag, listen, adv string) (string, error) {
	a, name := listen, "--"+flag
	if adv != "" {
		a, name = adv, map[string]string{"api": "--advertise", "raft": "--raft-advertise"}[flag]
	}
	host, port, err := net.SplitHostPort(a)
	if err != nil || port == "" {
		return "", fmt.Errorf("%s %q: use HOST:PORT", name, a)
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		if flag == "raft" {
			return "", fmt.Errorf("--raft %s listens on every address: pass --raft-advertise HOST:PORT, the address other servers dial", listen)
		}
		return "", fmt.Errorf("--api %s listens on every address: pass --advertise HOST:PORT, the address other nodes dial", listen)
	}
	return a, nil
}

// httpErrorLog sends net/http's own complaints (TLS handshakes that fail:
// scanners, plain HTTP on the TLS port) to the debug log, where they do not
// drown what matters.
func httpErrorLog(log *slog.Logger) *stdlog.Logger {
	return slog.NewLogLogger(log.Handler(), slog.LevelDebug)
}

func parseRole(s string) (pb.NodeRole, error) {
	switch s {
	case "server":
		return pb.NodeRole_NODE_ROLE_SERVER, nil
	case "worker":
		return pb.NodeRole_NODE_ROLE_WORKER, nil
	}
	return 0, fmt.Errorf("--role %q: use server or worker", s)
}

func splitAddrs(s string) []string {
	var out []string
	for _, a := range strings.Split(s, ",") {
		if a = strings.TrimSpace(a); a != "" {
			out = append(out, a)
		}
	}
	return out
}

func newLogger(level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: use debug, info, warn or error", level)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l}))
	slog.SetDefault(log)
	return log, nil
}

// lockDataDir makes sure only one shimd uses a data dir.
func lockDataDir(dir string) (func(), error) {
	f, err := os.OpenFile(filepath.Join(dir, "LOCK"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lock data dir: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("data dir %s is in use by another shimd", dir)
	}
	// The guard never kills the pid written here (guard.Protector).
	if err := os.WriteFile(filepath.Join(dir, guard.PIDFileName), []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
		f.Close()
		return nil, fmt.Errorf("data dir: %w", err)
	}
	return func() { f.Close() }, nil
}

// detectCapacity works out what this node offers: detected (or given) cores
// and memory, less the system reserve.
func detectCapacity(o *options) (*pb.Resources, error) {
	cpu := int64(runtime.NumCPU()) * 1000
	if o.cpuCap != "" {
		v, err := parseCores(o.cpuCap)
		if err != nil {
			return nil, fmt.Errorf("--cpu: %w", err)
		}
		cpu = v
	}
	mem, err := memTotal()
	if err != nil {
		return nil, err
	}
	if o.memCap != "" {
		if mem, err = parseBytes(o.memCap); err != nil {
			return nil, fmt.Errorf("--mem: %w", err)
		}
	}
	rc, err := parseCores(o.reserveCPU)
	if err != nil {
		return nil, fmt.Errorf("--reserve-cpu: %w", err)
	}
	rm, err := parseBytes(o.reserveMem)
	if err != nil {
		return nil, fmt.Errorf("--reserve-mem: %w", err)
	}
	return &pb.Resources{CpuMaxMilli: max(cpu-rc, 0), MemMaxBytes: max(mem-rm, 0)}, nil
}

func memTotal() (int64, error) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0, fmt.Errorf("detect memory: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "MemTotal:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("detect memory: %w", err)
			}
			return kb * 1024, nil
		}
	}
	return 0, errors.New("detect memory: no MemTotal in /proc/meminfo")
}

func parseCores(s string) (int64, error) {
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || f < 0 {
		return 0, fmt.Errorf("%q is not a number of cores", s)
	}
	return int64(f*1000 + 0.5), nil
}

func parseBytes(s string) (int64, error) {
	mult := int64(1)
	t := strings.TrimSuffix(strings.TrimSuffix(strings.ToUpper(s), "B"), "I")
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'K':
			mult, t = 1<<10, t[:n-1]
		case 'M':
			mult, t = 1<<20, t[:n-1]
		case 'G':
			mult, t = 1<<30, t[:n-1]
		case 'T':
			mult, t = 1<<40, t[:n-1]
		}
	}
	f, err := strconv.ParseFloat(t, 64)
	if err != nil || f < 0 {
		return 0, fmt.Errorf("%q is not a size (use K, M, G or T)", s)
	}
	return int64(f * float64(mult)), nil
}
