package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

// env is what every row shares: the built binaries and the run's settings.
type env struct {
	bin     string // holds shimd and shim
	tmp     string // every data dir lives below it
	runID   string // makes node (and so cgroup) names unique per run
	full    bool
	keep    bool
	verbose bool
	// profileDir receives CPU profiles of the in-process parts ("" = none).
	profileDir                 string
	simsPer                    int             // simulated workers per shimd --simulate process
	simNice                    int             // nice value of simulator processes (0 = not niced)
	beatNodes                  int             // row 7: simulated nodes (0 = the mode's default)
	beatWindow                 time.Duration   // row 7: how long to watch (0 = the mode's default)
	perfDir                    string          // perf record of shimd during load phases ("" = none)
	millionProcs, millionNodes int             // row 13's scale
	only                       map[string]bool // -only: rows and parts of rows to run (empty: all)
	httpc                      *http.Client
	seq                        int
	mu                         sync.Mutex
}

func (e *env) logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s  %s\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, args...))
}

func (e *env) debugf(format string, args ...any) {
	if e.verbose {
		e.logf(format, args...)
	}
}

func (e *env) logLevel() string {
	if e.verbose {
		return "info"
	}
	return "warn"
}

// perf starts `perf record -g` on pid when -perf is set; call the returned
// function to stop it.
func (e *env) perf(tag string, pid int) func() {
	if e.perfDir == "" || pid == 0 {
		return func() {}
	}
	_ = os.MkdirAll(e.perfDir, 0o755)
	out := filepath.Join(e.perfDir, tag+".perf.data")
	cmd := exec.Command("perf", "record", "-F", "499", "-g", "-p", strconv.Itoa(pid), "-o", out)
	cmd.Stdout, cmd.Stderr = nil, nil
	if err := cmd.Start(); err != nil {
		e.logf("perf: %v", err)
		return func() {}
	}
	return func() {
		_ = cmd.Process.Signal(syscall.SIGINT)
		_ = cmd.Wait()
		e.logf("perf profile of pid %d: %s (perf report -i %s --no-children)", pid, out, out)
	}
}

// pick returns the quick or the full value.
func pick[T any](e *env, quick, full T) T {
	if e.full {
		return full
	}
	return quick
}

func (e *env) nextName(tag string) string {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.seq++
	return fmt.Sprintf("b%s-%s%d", e.runID, tag, e.seq)
}

// buildBinaries builds shimd and shim into dir, and shim-init (static, as
// `make build` does) next to them, where shimd looks for it.
func buildBinaries(root, dir string) error {
	cmd := exec.Command("go", "build", "-tags", "seccomp", "-o", dir+"/", "./cmd/shimd", "./cmd/shim")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("go build: %v\n%s", err, out)
	}
	cmd = exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", dir+"/", "./cmd/shim-init")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build shim-init: %v\n%s", err, out)
	}
	return nil
}

func freePort() string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// daemon is one shimd process.
type daemon struct {
	cl                         *cluster
	name, role, api, raft, dir string
	dns                        string // its DNS server (--dns), given one by start
	sims                       int    // --simulate N
	args                       []string
	cmd                        *exec.Cmd
	logf                       *os.File
	done                       chan struct{}
}

// short is the name without the run prefix: s1, w4, sim5.
func short(d *daemon) string {
	if i := strings.LastIndexByte(d.name, '-'); i >= 0 {
		return d.name[i+1:]
	}
	return d.name
}

func (d *daemon) pid() int {
	if d.cmd == nil || d.cmd.Process == nil {
		return 0
	}
	return d.cmd.Process.Pid
}

func (d *daemon) alive() bool {
	if d.done == nil {
		return false
	}
	select {
	case <-d.done:
		return false
	default:
		return true
	}
}

// cluster is a set of shimd processes on loopback. Trust is on, as users
// run shim: the first server makes the CA and tokens, the others join with
// its join token, and the harness's clients and CLI runs use its CA and
// admin token. An insecure cluster (shimd's hidden --insecure: plain HTTP
// and TCP, no tokens) exists only to measure what trust costs (row 10).
type cluster struct {
	e        *env
	tag      string
	insecure bool
	servers  []*daemon
	workers  []*daemon // real workers and simulators
	clients  map[string]shimv1connect.ShimServiceClient
	httpc    *http.Client // trusts the cluster's CA
	token    string       // the admin token
	mu       sync.Mutex
}

func newCluster(e *env, tag string) *cluster {
	return &cluster{e: e, tag: tag, clients: map[string]shimv1connect.ShimServiceClient{}, httpc: e.httpc}
}

// newInsecureCluster is newCluster with trust off.
func newInsecureCluster(e *env, tag string) *cluster {
	c := newCluster(e, tag)
	c.insecure = true
	return c
}

// trustArgs are the flags every node but the first starts with.
func (c *cluster) trustArgs() []string {
	if c.insecure {
		return []string{"--insecure"}
	}
	return []string{"--join-token-file", filepath.Join(c.servers[0].dir, "join.token")}
}

// loadTrust waits for the first server's CA and admin token and makes the
// harness's client from them.
func (c *cluster) loadTrust() error {
	if c.insecure {
		return nil
	}
	dir := c.servers[0].dir
	deadline := time.Now().Add(30 * time.Second)
	for {
		caPEM, err1 := os.ReadFile(filepath.Join(dir, "ca.pem"))
		tok, err2 := os.ReadFile(filepath.Join(dir, "admin.token"))
		_, err3 := os.Stat(filepath.Join(dir, "join.token"))
		if err := errors.Join(err1, err2, err3); err == nil {
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(caPEM) {
				return fmt.Errorf("%s/ca.pem holds no certificate", dir)
			}
			tr := c.e.httpc.Transport.(*http.Transport).Clone()
			tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}
			c.httpc, c.token = &http.Client{Transport: tr}, strings.TrimSpace(string(tok))
			return nil
		} else if time.Now().After(deadline) {
			return fmt.Errorf("the first server wrote no CA and tokens within 30s: %w", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// url is the base URL of a member's API.
func (c *cluster) url(addr string) string {
	if c.insecure {
		return "http://" + addr
	}
	return "https://" + addr
}

// startServers starts n servers (the first bootstraps) and waits for them.
func (c *cluster) startServers(n int, extra ...string) error {
	for i := range n {
		d := &daemon{name: c.e.nextName("s"), role: "server", api: freePort(), raft: freePort()}
		d.dir = filepath.Join(c.e.tmp, d.name)
		d.args = []string{"--name", d.name, "--data-dir", d.dir, "--api", d.api, "--raft", d.raft, "--log-level", c.e.logLevel()}
		if i > 0 {
			d.args = append(d.args, "--join", c.servers[0].api)
			d.args = append(d.args, c.trustArgs()...)
		} else if c.insecure {
			d.args = append(d.args, "--insecure")
		}
		d.args = append(d.args, extra...)
		if err := c.start(d); err != nil {
			return err
		}
		c.servers = append(c.servers, d)
		if i == 0 {
			if err := c.loadTrust(); err != nil {
				return err
			}
			if err := c.waitNodesUp(1, 30*time.Second); err != nil {
				return err
			}
		}
	}
	return c.waitNodesUp(n, 30*time.Second)
}

// addWorker starts a real worker; with sims > 0 a simulator of that many
// workers instead. It does not wait.
func (c *cluster) addWorker(sims int, extra ...string) (*daemon, error) {
	tag := "w"
	if sims > 0 {
		tag = "sim"
	}
	d := &daemon{name: c.e.nextName(tag), role: "worker", api: freePort(), sims: sims}
	d.dir = filepath.Join(c.e.tmp, d.name)
	d.args = []string{"--name", d.name, "--data-dir", d.dir, "--api", d.api, "--role", "worker",
		"--join", c.serverAddrs(), "--log-level", c.e.logLevel()}
	d.args = append(d.args, c.trustArgs()...)
	if sims > 0 {
		d.args = append(d.args, "--simulate", strconv.Itoa(sims))
	}
	d.args = append(d.args, extra...)
	if err := c.start(d); err != nil {
		return nil, err
	}
	c.workers = append(c.workers, d)
	return d, nil
}

func (c *cluster) start(d *daemon) error {
	d.cl = c
	if err := os.MkdirAll(d.dir, 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(d.dir, "shimd.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	d.logf = f
	if d.dns == "" && d.sims == 0 {
		// Each its own DNS port: the default one is shared by every
		// shimd on this host (rows_services.go).
		d.dns = freePort()
		d.args = append(d.args, "--dns", d.dns)
	}
	d.cmd = exec.Command(filepath.Join(c.e.bin, "shimd"), d.args...)
	if d.sims > 0 && c.e.simNice > 0 {
		// Simulated workers stand in for other machines, whose agents
		// would not take CPU from the servers. Niced, they still take
		// every cycle the servers leave, but do not delay the servers'
		// Raft heartbeats by hundreds of milliseconds when the two cores
		// are busy (which cost the leader its office dozens of times
		// while 100,000 processes were placed).
		d.cmd = exec.Command("nice", append([]string{"-n", strconv.Itoa(c.e.simNice), filepath.Join(c.e.bin, "shimd")}, d.args...)...)
	}
	d.cmd.Stdout, d.cmd.Stderr = f, f
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := d.cmd.Start(); err != nil {
		f.Close()
		return fmt.Errorf("start %s: %w", d.name, err)
	}
	d.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { _ = cmd.Wait(); close(done) }(d.cmd, d.done)
	c.e.debugf("started %s %s (pid %d) api %s", d.role, d.name, d.pid(), d.api)
	return nil
}

// restart starts a stopped daemon again with the same flags.
func (c *cluster) restart(d *daemon) error {
	if d.alive() {
		return fmt.Errorf("%s is still running", d.name)
	}
	if d.logf != nil {
		d.logf.Close()
	}
	return c.start(d)
}

// kill9 SIGKILLs shimd and waits for it to be gone.
func (c *cluster) kill9(d *daemon) {
	if !d.alive() {
		return
	}
	_ = d.cmd.Process.Signal(syscall.SIGKILL)
	<-d.done
}

// killGuard kills the guard shimd started for d (cmd/shimd/guard.go), which
// outlives shimd on purpose, and waits for it to be gone.
func killGuard(d *daemon) {
	b, err := os.ReadFile(filepath.Join(d.dir, "guard.pid"))
	if err != nil {
		return
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !bytes.Contains(cmdline, []byte("guard")) || !bytes.Contains(cmdline, []byte(d.dir)) {
		return
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	for range 100 {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err != nil {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// close kills every daemon and every process they ran, and removes the
// cgroups and (unless -keep) the data dirs.
func (c *cluster) close() {
	var names []string
	for _, d := range append(append([]*daemon(nil), c.servers...), c.workers...) {
		c.kill9(d)
		killGuard(d)
		if d.logf != nil {
			d.logf.Close()
		}
		if d.sims == 0 {
			names = append(names, d.name)
		} else {
			// Where a simulator keeps its workers' state files
			// (cmd/shimd/simulate.go): gone with it only on a clean exit.
			_ = os.RemoveAll(filepath.Join("/dev/shm", "shim-sim-"+d.name))
		}
	}
	for _, n := range names {
		sweepCgroups(n)
	}
	if !c.e.keep {
		for _, d := range append(append([]*daemon(nil), c.servers...), c.workers...) {
			_ = os.RemoveAll(d.dir)
		}
	}
}

func (c *cluster) serverAddrs() string {
	var a []string
	for _, d := range c.servers {
		a = append(a, d.api)
	}
	return strings.Join(a, ",")
}

func (c *cluster) liveServers() []*daemon {
	var out []*daemon
	for _, d := range c.servers {
		if d.alive() {
			out = append(out, d)
		}
	}
	return out
}

func (c *cluster) api(addr string) shimv1connect.ShimServiceClient {
	c.mu.Lock()
	defer c.mu.Unlock()
	cl := c.clients[addr]
	if cl == nil {
		cl = shimv1connect.NewShimServiceClient(c.httpc, c.url(addr), bearer(c.token))
		c.clients[addr] = cl
	}
	return cl
}

// anyServer calls f on each live server in turn until one answers.
func anyServer[T any](c *cluster, ctx context.Context, f func(ctx context.Context, cl shimv1connect.ShimServiceClient) (T, error)) (T, error) {
	var zero T
	err := errors.New("no live server")
	for _, d := range c.liveServers() {
		var v T
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		v, err = f(cctx, c.api(d.api))
		cancel()
		if err == nil {
			return v, nil
		}
		if ctx.Err() != nil {
			return zero, err
		}
	}
	return zero, err
}

func (c *cluster) nodes(ctx context.Context) (*pb.NodesResponse, error) {
	return anyServer(c, ctx, func(ctx context.Context, cl shimv1connect.ShimServiceClient) (*pb.NodesResponse, error) {
		r, err := cl.Nodes(ctx, connect.NewRequest(&pb.NodesRequest{}))
		if err != nil {
			return nil, err
		}
		return r.Msg, nil
	})
}

// waitNodesUp waits until at least n nodes are up.
func (c *cluster) waitNodesUp(n int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	last := -1
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		r, err := c.nodes(ctx)
		cancel()
		if err == nil {
			up := 0
			for _, s := range r.Nodes {
				if s.Node.State == pb.NodeState_NODE_STATE_UP {
					up++
				}
			}
			if up >= n {
				return nil
			}
			last = up
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: timed out after %s waiting for %d nodes up (saw %d; last err %v)", c.tag, timeout, n, last, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// leader returns the server the cluster reports as leader.
func (c *cluster) leader(ctx context.Context) (*daemon, error) {
	r, err := c.nodes(ctx)
	if err != nil {
		return nil, err
	}
	for _, s := range r.Nodes {
		if s.Leader {
			for _, d := range c.servers {
				if d.name == s.Node.Name {
					return d, nil
				}
			}
		}
	}
	return nil, errors.New("no leader")
}

// drain (or undrain) nodes.
func (c *cluster) drain(ctx context.Context, undrain bool, names ...string) error {
	for _, n := range names {
		_, err := anyServer(c, ctx, func(ctx context.Context, cl shimv1connect.ShimServiceClient) (*pb.DrainResponse, error) {
			r, err := cl.Drain(ctx, connect.NewRequest(&pb.DrainRequest{Node: n, Undrain: undrain}))
			if err != nil {
				return nil, err
			}
			return r.Msg, nil
		})
		if err != nil {
			return fmt.Errorf("drain %s: %w", n, err)
		}
	}
	return nil
}

func (c *cluster) spawn(ctx context.Context, spec *pb.ProcessSpec, count int) ([]*pb.ProcessRecord, error) {
	return anyServer(c, ctx, func(ctx context.Context, cl shimv1connect.ShimServiceClient) ([]*pb.ProcessRecord, error) {
		r, err := cl.Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec, Count: uint32(count)}))
		if err != nil {
			return nil, err
		}
		return r.Msg.Processes, nil
	})
}

func (c *cluster) killProcs(ctx context.Context, ids []string) error {
	for len(ids) > 0 {
		n := min(len(ids), 1000)
		batch := ids[:n]
		ids = ids[n:]
		_, err := anyServer(c, ctx, func(ctx context.Context, cl shimv1connect.ShimServiceClient) (*pb.KillResponse, error) {
			r, err := cl.Kill(ctx, connect.NewRequest(&pb.KillRequest{Ids: batch, Signal: 9}))
			if err != nil {
				return nil, err
			}
			return r.Msg, nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// killAll kills every live process in the table and waits (up to a minute)
// until they have all finished.
func (c *cluster) killAll() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	r, err := c.list(ctx, &pb.ListRequest{})
	if err != nil || len(r.Processes) == 0 {
		return
	}
	ids := idsOf(r.Processes)
	if err := c.killProcs(ctx, ids); err != nil {
		c.e.logf("%s: kill all: %v", c.tag, err)
		return
	}
	if _, err := c.waitProcs(ids, time.Minute, allTerminal); err != nil {
		c.e.logf("%s: kill all: %v", c.tag, err)
	}
}

func (c *cluster) list(ctx context.Context, req *pb.ListRequest) (*pb.ListResponse, error) {
	return anyServer(c, ctx, func(ctx context.Context, cl shimv1connect.ShimServiceClient) (*pb.ListResponse, error) {
		r, err := cl.List(ctx, connect.NewRequest(req))
		if err != nil {
			return nil, err
		}
		for tok := r.Msg.NextPageToken; tok != ""; { // every page; only the first waits
			next := proto.Clone(req).(*pb.ListRequest)
			next.PageToken, next.MinIndex, next.WaitMillis = tok, 0, 0
			more, err := cl.List(ctx, connect.NewRequest(next))
			if err != nil {
				return nil, err
			}
			r.Msg.Processes = append(r.Msg.Processes, more.Msg.Processes...)
			tok = more.Msg.NextPageToken
		}
		r.Msg.NextPageToken = ""
		return r.Msg, nil
	})
}

// waitProcs long-polls the given processes (all live ones when ids is
// empty) until done says so, and returns the last records seen.
func (c *cluster) waitProcs(ids []string, timeout time.Duration, done func([]*pb.ProcessRecord) bool) ([]*pb.ProcessRecord, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var index uint64
	var last []*pb.ProcessRecord
	for {
		wait := int64(1000)
		if index == 0 {
			wait = 0
		}
		r, err := c.list(ctx, &pb.ListRequest{Ids: ids, All: len(ids) > 0, MinIndex: index, WaitMillis: wait})
		if err == nil {
			last = r.Processes
			if done(last) {
				return last, nil
			}
			index = r.Index
		} else {
			index = 0
			select {
			case <-ctx.Done():
			case <-time.After(20 * time.Millisecond):
			}
		}
		if ctx.Err() != nil {
			return last, fmt.Errorf("timed out after %s; last seen: %s", timeout, describe(last))
		}
	}
}

// describe counts records by state, node and incarnation.
func describe(rs []*pb.ProcessRecord) string {
	count := map[string]int{}
	for _, r := range rs {
		count[fmt.Sprintf("%s on %q inc %d", strings.TrimPrefix(r.State.String(), "PROCESS_STATE_"), r.Node, r.Incarnation)]++
	}
	var parts []string
	for k, v := range count {
		parts = append(parts, fmt.Sprintf("%d %s", v, k))
	}
	sort.Strings(parts)
	if len(parts) > 8 {
		parts = append(parts[:8], "…")
	}
	return fmt.Sprintf("%d records: %s", len(rs), strings.Join(parts, ", "))
}

func allRunning(n int) func([]*pb.ProcessRecord) bool {
	return func(rs []*pb.ProcessRecord) bool {
		if len(rs) < n {
			return false
		}
		for _, r := range rs {
			if r.State != pb.ProcessState_PROCESS_STATE_RUNNING {
				return false
			}
		}
		return true
	}
}

// allSettled: every process is running or finished.
func allSettled(rs []*pb.ProcessRecord) bool {
	for _, r := range rs {
		switch r.State {
		case pb.ProcessState_PROCESS_STATE_PENDING, pb.ProcessState_PROCESS_STATE_STARTING:
			return false
		}
	}
	return true
}

func allTerminal(rs []*pb.ProcessRecord) bool {
	for _, r := range rs {
		switch r.State {
		case pb.ProcessState_PROCESS_STATE_EXITED, pb.ProcessState_PROCESS_STATE_FAILED, pb.ProcessState_PROCESS_STATE_KILLED:
		default:
			return false
		}
	}
	return true
}

func idsOf(rs []*pb.ProcessRecord) []string {
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = r.Id
	}
	return out
}

func names(ds ...*daemon) []string {
	var out []string
	for _, d := range ds {
		out = append(out, d.name)
	}
	return out
}

// shimCLI runs the shim CLI against the cluster and returns its wall time.
func (c *cluster) shimCLI(stdout io.Writer, args ...string) (time.Duration, error) {
	return c.shimCLIAt(c.serverAddrs(), stdout, args...)
}

func (c *cluster) shimCLIAt(addrs string, stdout io.Writer, args ...string) (time.Duration, error) {
	if c.insecure {
		var urls []string
		for _, a := range strings.Split(addrs, ",") {
			urls = append(urls, c.url(a))
		}
		addrs = strings.Join(urls, ",")
	}
	cmd := exec.Command(filepath.Join(c.e.bin, "shim"), append([]string{"--addr", addrs}, args...)...)
	// As a user next to the first server would: its data dir holds the
	// admin token and the CA.
	cmd.Env = append(os.Environ(), "SHIM_DATA_DIR="+c.servers[0].dir)
	var errb bytes.Buffer
	if stdout != nil {
		cmd.Stdout = stdout
	}
	cmd.Stderr = &errb
	start := time.Now()
	err := cmd.Run()
	d := time.Since(start)
	if err != nil {
		return d, fmt.Errorf("shim %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return d, nil
}

// bearer sends tok ("" for none) with every call.
func bearer(tok string) connect.ClientOption {
	return connect.WithInterceptors(connect.UnaryInterceptorFunc(func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			if tok != "" {
				req.Header().Set("Authorization", "Bearer "+tok)
			}
			return next(ctx, req)
		}
	}))
}

// ---- metrics ----

// metrics is one scrape of /metrics: series (name plus labels) to value.
type metrics map[string]float64

func (e *env) scrape(d *daemon) (metrics, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := d.cl
	req, _ := http.NewRequestWithContext(ctx, "GET", c.url(d.api)+"/metrics", nil)
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.httpc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	m := metrics{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		m[line[:i]] = v
	}
	return m, sc.Err()
}

// scrapeAll sums the scrapes of several daemons (missing ones are skipped).
func (e *env) scrapeAll(ds ...*daemon) metrics {
	sum := metrics{}
	for _, d := range ds {
		if !d.alive() {
			continue
		}
		m, err := e.scrape(d)
		if err != nil {
			continue
		}
		for k, v := range m {
			sum[k] += v
		}
	}
	return sum
}

// sub returns a - b for every series.
func (a metrics) sub(b metrics) metrics {
	out := metrics{}
	for k, v := range a {
		out[k] = v - b[k]
	}
	return out
}

type bucket struct{ le, count float64 }

// histogram returns a histogram's cumulative buckets, sum and count.
func (m metrics) histogram(name string) (bs []bucket, sum, count float64) {
	prefix := name + `_bucket{le="`
	for k, v := range m {
		if rest, ok := strings.CutPrefix(k, prefix); ok {
			le, err := strconv.ParseFloat(strings.TrimSuffix(rest, `"}`), 64)
			if err != nil {
				le = math.Inf(1)
			}
			bs = append(bs, bucket{le, v})
		}
	}
	sort.Slice(bs, func(i, j int) bool { return bs[i].le < bs[j].le })
	return bs, m[name+"_sum"], m[name+"_count"]
}

// histQuantile estimates a quantile from cumulative buckets by linear
// interpolation, as Prometheus's histogram_quantile does.
func histQuantile(bs []bucket, q float64) float64 {
	if len(bs) == 0 || bs[len(bs)-1].count == 0 {
		return math.NaN()
	}
	rank := q * bs[len(bs)-1].count
	prevLE, prevC := 0.0, 0.0
	for _, b := range bs {
		if b.count >= rank {
			if math.IsInf(b.le, 1) {
				return prevLE
			}
			if b.count == prevC {
				return b.le
			}
			return prevLE + (b.le-prevLE)*(rank-prevC)/(b.count-prevC)
		}
		prevLE, prevC = b.le, b.count
	}
	return prevLE
}

// histSummary describes a histogram delta in milliseconds.
func (m metrics) histSummary(name string) string {
	bs, sum, count := m.histogram(name)
	if count == 0 {
		return "no samples"
	}
	return fmt.Sprintf("n=%.0f mean %.2f ms, p50≈%.2f ms, p99≈%.2f ms", count, sum/count*1000,
		histQuantile(bs, 0.5)*1000, histQuantile(bs, 0.99)*1000)
}

// countSummary is histSummary for a histogram of counts, not seconds.
func (m metrics) countSummary(name string) string {
	_, sum, count := m.histogram(name)
	if count == 0 {
		return "no samples"
	}
	return fmt.Sprintf("n=%.0f mean %.1f", count, sum/count)
}

// ---- processes ----

// rssKiB reads VmRSS of a process.
func rssKiB(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				return strconv.ParseFloat(f[0], 64)
			}
		}
	}
	return 0, errors.New("no VmRSS")
}

// cpuSeconds reads utime+stime of a process.
func cpuSeconds(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	f := strings.Fields(s[i+2:])
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100 // USER_HZ
}

// cgroupRoots lists where a node's groups live in every hierarchy.
func cgroupRoots(node string) []string {
	if cgroupMode() == "v2" {
		out, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup/shim", "*", node)) // shim/<cluster>/<node>
		return out
	}
	ents, _ := os.ReadDir("/sys/fs/cgroup")
	var out []string
	for _, e := range ents {
		ps, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", e.Name(), "shim", "*", node))
		for _, p := range ps {
			if fi, err := os.Stat(p); err == nil && fi.IsDir() {
				out = append(out, p)
			}
		}
	}
	return out
}

// nodePids lists every pid in a node's process cgroups.
func nodePids(node string) []int {
	roots, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup/pids/shim", "*", node))
	if cgroupMode() == "v2" {
		roots, _ = filepath.Glob(filepath.Join("/sys/fs/cgroup/shim", "*", node))
	}
	var pids []int
	for _, root := range roots {
		_ = filepath.WalkDir(root, func(p string, de os.DirEntry, err error) error {
			if err != nil || de.IsDir() || de.Name() != "cgroup.procs" {
				return nil
			}
			b, _ := os.ReadFile(p)
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil {
					pids = append(pids, pid)
				}
			}
			return nil
		})
	}
	return pids
}

// sweepCgroups kills everything left in a node's cgroups and removes them.
func sweepCgroups(node string) {
	for range 20 {
		pids := nodePids(node)
		for _, p := range pids {
			_ = syscall.Kill(p, syscall.SIGKILL)
		}
		if len(pids) == 0 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, root := range cgroupRoots(node) {
		for range 20 {
			var dirs []string
			_ = filepath.WalkDir(root, func(p string, de os.DirEntry, err error) error {
				if err == nil && de.IsDir() {
					dirs = append(dirs, p)
				}
				return nil
			})
			sort.Slice(dirs, func(i, j int) bool { return len(dirs[i]) > len(dirs[j]) })
			failed := false
			for _, d := range dirs {
				if err := syscall.Rmdir(d); err != nil && !errors.Is(err, syscall.ENOENT) {
					failed = true
				}
			}
			if !failed {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		_ = syscall.Rmdir(filepath.Dir(root))               // shim/<cluster>/, once no node uses it
		_ = syscall.Rmdir(filepath.Dir(filepath.Dir(root))) // shim/
	}
}

var cgMode string

// cgroupMode is v1, v2 or hybrid.
func cgroupMode() string {
	if cgMode != "" {
		return cgMode
	}
	var st syscall.Statfs_t
	const cgroup2Magic = 0x63677270
	if syscall.Statfs("/sys/fs/cgroup", &st) == nil && st.Type == cgroup2Magic {
		cgMode = "v2"
	} else {
		cgMode = "v1"
	}
	return cgMode
}

// memLimitFile returns the memory limit file of pid's cgroup.
func memLimitFile(pid int) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		if cgroupMode() == "v2" && parts[0] == "0" {
			return filepath.Join("/sys/fs/cgroup", parts[2], "memory.max"), nil
		}
		for _, ctl := range strings.Split(parts[1], ",") {
			if ctl == "memory" {
				return filepath.Join("/sys/fs/cgroup/memory", parts[2], "memory.limit_in_bytes"), nil
			}
		}
	}
	return "", fmt.Errorf("pid %d has no memory cgroup", pid)
}

func sleepSpec(iso pb.Isolation) *pb.ProcessSpec {
	return &pb.ProcessSpec{Command: []string{"/bin/sleep", "100000"}, Isolation: iso, Resources: &pb.Resources{}}
}
