// Package e2e runs real shimd and shim binaries on loopback: real Raft on
// disk, real cgroups, real processes, with trust on as users run it (TLS
// everywhere, the CLI's token and CA from the bootstrap node's data dir,
// nodes joining with its join token). Tests need root and skip without it.
package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

var bin string // directory holding freshly built shimd, shim and shim-init

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "shim-e2e-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bin = dir
	for _, c := range []string{"shimd", "shim", "shim-init"} {
		build := exec.Command("go", "build", "-tags", "seccomp", "-o", filepath.Join(dir, c), "../../cmd/"+c)
		if c == "shim-init" {
			// PID 1 of every sandbox and the VM guests' init: static, as
			// `make build` makes it, next to shimd where shimd finds it.
			build = exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", filepath.Join(dir, c), "../../cmd/"+c)
			build.Env = append(os.Environ(), "CGO_ENABLED=0")
		}
		out, err := build.CombinedOutput()
		if err != nil {
			fmt.Fprintf(os.Stderr, "build %s: %v\n%s", c, err, out)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("end-to-end tests need root for cgroups and namespaces")
	}
}

// freePort returns a loopback port nobody listens on right now.
func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// daemon is one shimd process.
type daemon struct {
	name, api, raft, dir string
	dns                  string // its DNS server's address (--dns), if given one
	args                 []string
	cmd                  *exec.Cmd
	log                  *os.File
}

type cluster struct {
	t     *testing.T
	nodes []*daemon
}

// startCluster starts n servers on loopback; the first bootstraps.
func startCluster(t *testing.T, n int, extra ...string) *cluster {
	t.Helper()
	// Node names are unique per run, so cgroups left by one test never meet
	// another.
	return startClusterNamed(t, fmt.Sprintf("%se%d", os.Getenv("SHIM_E2E_PREFIX"), time.Now().UnixNano()%1e6), n, extra...)
}

// startClusterNamed starts n servers named prefix-1 … prefix-n.
func startClusterNamed(t *testing.T, prefix string, n int, extra ...string) *cluster {
	t.Helper()
	c := &cluster{t: t}
	for i := range n {
		d := &daemon{name: fmt.Sprintf("%s-%d", prefix, i+1), api: freePort(t), raft: freePort(t), dir: t.TempDir(), dns: freePort(t)}
		d.args = []string{"--name", d.name, "--data-dir", d.dir, "--api", d.api, "--raft", d.raft, "--dns", d.dns,
			// The nodes share one host's ports: a range each.
			"--port-range", fmt.Sprintf("%d-%d", 21000+1000*i, 21999+1000*i)}
		if i > 0 {
			d.args = append(d.args, c.joinArgs()...)
		}
		d.args = append(d.args, extra...)
		if os.Getenv("SHIM_E2E_DEBUG") != "" {
			d.args = append(d.args, "--log-level", "debug")
		}
		c.nodes = append(c.nodes, d)
		c.start(d)
		if i == 0 {
			c.waitTrust()
		}
	}
	t.Cleanup(c.cleanup)
	c.waitNodesUp(n, 15*time.Second)
	return c
}

func (c *cluster) start(d *daemon) {
	c.t.Helper()
	f, err := os.OpenFile(filepath.Join(d.dir, "shimd.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		c.t.Fatal(err)
	}
	d.log = f
	d.cmd = exec.Command(filepath.Join(bin, "shimd"), d.args...)
	d.cmd.Stdout, d.cmd.Stderr = f, f
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := d.cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
}

// stop sends sig to shimd and waits for it to exit.
func (c *cluster) stop(d *daemon, sig syscall.Signal) {
	c.t.Helper()
	if d.cmd == nil {
		return
	}
	_ = d.cmd.Process.Signal(sig)
	done := make(chan struct{})
	go func() { _ = d.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = d.cmd.Process.Kill()
		<-done
		c.t.Errorf("%s did not stop on %s within 10s", d.name, sig)
	}
	d.cmd = nil
	d.log.Close()
}

// cleanup stops the daemons and kills every process they left behind.
func (c *cluster) cleanup() {
	var pids []int
	for _, p := range c.ps("-a") {
		if p.PID > 0 {
			pids = append(pids, p.PID)
		}
	}
	for _, d := range c.nodes {
		if d.cmd != nil {
			_ = d.cmd.Process.Signal(syscall.SIGCONT) // a test may have paused it
		}
		c.stop(d, syscall.SIGTERM)
		killGuard(d)
	}
	for _, pid := range pids {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	for _, d := range c.nodes {
		// Its VMs' state (their QEMUs go with their cgroups), and stale
		// incarnations the table no longer lists.
		vmDirs, _ := filepath.Glob(filepath.Join("/run/shim", "*", d.name)) // /run/shim/<cluster>/<node>
		for _, v := range vmDirs {
			_ = os.RemoveAll(v)
			_ = os.Remove(filepath.Dir(v))
		}
		killCgroups(d.name)
		if left := removeCgroups(d.name); len(left) > 0 {
			c.t.Errorf("%s: cgroups left behind: %v", d.name, left)
		}
	}
	if c.t.Failed() {
		keep := filepath.Join(os.TempDir(), "shim-e2e-"+c.t.Name())
		_ = os.MkdirAll(keep, 0o755)
		for _, d := range c.nodes {
			b, _ := os.ReadFile(filepath.Join(d.dir, "shimd.log"))
			_ = os.WriteFile(filepath.Join(keep, d.name+".log"), b, 0o644)
			c.t.Logf("---- %s log (tail) ----\n%s", d.name, tail(string(b), 3000))
		}
	}
}

// killGuard kills a node's guard (the process that fences the node's
// sandboxes should shimd die; see package guard), as a host's death would.
func killGuard(d *daemon) {
	b, err := os.ReadFile(filepath.Join(d.dir, "guard.pid"))
	if err != nil {
		return
	}
	var pid int
	if _, err := fmt.Sscan(string(b), &pid); err == nil && pid > 0 {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// joinArgs are the flags a new node joins the cluster with: the bootstrap
// node's address and the join token it wrote.
func (c *cluster) joinArgs() []string {
	return []string{"--join", c.nodes[0].api, "--join-token-file", filepath.Join(c.nodes[0].dir, "join.token")}
}

// waitTrust waits for the bootstrap node to write the cluster's CA and
// tokens, which the others join with.
func (c *cluster) waitTrust() {
	c.t.Helper()
	waitFor(c.t, 15*time.Second, "the bootstrap node's join token", func() bool {
		_, err := os.Stat(filepath.Join(c.dataDir(), "join.token"))
		return err == nil
	})
}

// dataDir holds the CLI's credentials: the bootstrap node's admin.token and
// ca.pem.
func (c *cluster) dataDir() string { return c.nodes[0].dir }

func (c *cluster) addrs() string {
	var a []string
	for _, d := range c.nodes {
		a = append(a, d.api)
	}
	return strings.Join(a, ",")
}

// result is one run of the shim CLI.
type result struct {
	stdout, stderr string
	code           int
}

// shimAt runs the CLI against the given address list, with the cluster's
// credentials found as a user's would be: in $SHIM_DATA_DIR.
func (c *cluster) shimAt(addr string, args ...string) result {
	c.t.Helper()
	return runCLI(c.t, []string{"SHIM_DATA_DIR=" + c.dataDir()}, append([]string{"--addr", addr}, args...)...)
}

// runCLI runs the CLI with env added to an environment that holds no
// credentials of its own.
func runCLI(t *testing.T, env []string, args ...string) result {
	t.Helper()
	cmd := exec.Command(filepath.Join(bin, "shim"), args...)
	for _, e := range os.Environ() {
		if !strings.HasPrefix(e, "SHIM_") {
			cmd.Env = append(cmd.Env, e)
		}
	}
	cmd.Env = append(cmd.Env, env...)
	cmd.Dir = t.TempDir() // no ./shim-data to fall back on
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run shim: %v", err)
	}
	return result{out.String(), errb.String(), code}
}

func (c *cluster) shim(args ...string) result {
	c.t.Helper()
	return c.shimAt(c.addrs(), args...)
}

// must runs the CLI and fails the test on a non-zero exit.
func (c *cluster) must(args ...string) string {
	c.t.Helper()
	r := c.shim(args...)
	if r.code != 0 {
		c.t.Fatalf("shim %s: exit %d: %s", strings.Join(args, " "), r.code, r.stderr)
	}
	return r.stdout
}

type proc struct {
	ID          string   `json:"id"`
	Name        string   `json:"name"`
	Node        string   `json:"node"`
	State       string   `json:"state"`
	PID         int      `json:"pid"`
	Incarnation uint64   `json:"incarnation"`
	Restarts    uint32   `json:"restarts"`
	ExitCode    int      `json:"exit_code"`
	Reason      string   `json:"reason"`
	Command     []string `json:"command"`
}

func (c *cluster) ps(args ...string) []proc {
	c.t.Helper()
	r := c.shim(append([]string{"ps", "-o", "json"}, args...)...)
	if r.code != 0 {
		return nil
	}
	return decodePS(c.t, r.stdout)
}

func decodePS(t *testing.T, s string) []proc {
	t.Helper()
	var out []proc
	if err := json.Unmarshal([]byte(s), &out); err != nil {
		t.Fatalf("ps json: %v\n%s", err, s)
	}
	return out
}

type nodeInfo struct {
	Name   string `json:"name"`
	Role   string `json:"role"`
	State  string `json:"state"`
	Leader bool   `json:"leader"`
}

func (c *cluster) nodesInfo() []nodeInfo {
	r := c.shim("nodes", "-o", "json")
	if r.code != 0 {
		return nil
	}
	var out []nodeInfo
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil {
		c.t.Fatalf("nodes json: %v\n%s", err, r.stdout)
	}
	return out
}

func (c *cluster) waitNodesUp(n int, d time.Duration) {
	c.t.Helper()
	waitFor(c.t, d, fmt.Sprintf("%d nodes up", n), func() bool {
		up := 0
		for _, ni := range c.nodesInfo() {
			if ni.State == "up" {
				up++
			}
		}
		return up == n
	})
}

// waitFor polls cond until it holds, failing the test after d. Options: a
// func() string says what was seen instead, a time.Duration replaces the
// poll interval (50 ms: most polls run the CLI, so keep them light).
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool, opts ...any) {
	t.Helper()
	every := 50 * time.Millisecond
	var why func() string
	for _, o := range opts {
		switch o := o.(type) {
		case func() string:
			why = o
		case time.Duration:
			every = o
		}
	}
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			seen := ""
			if why != nil {
				seen = "; saw " + why()
			}
			t.Fatalf("timed out after %s waiting for %s%s", d, what, seen)
		}
		time.Sleep(every)
	}
}

// api returns an admin's API client of the member at addr: HTTPS with the
// cluster's CA, the admin token; opts add to it.
func (c *cluster) api(addr string, opts ...connect.ClientOption) shimv1connect.ShimServiceClient {
	c.t.Helper()
	tok, err := os.ReadFile(filepath.Join(c.dataDir(), "admin.token"))
	if err != nil {
		c.t.Fatal(err)
	}
	return shimv1connect.NewShimServiceClient(c.httpClient(), "https://"+addr,
		append(opts, withToken(strings.TrimSpace(string(tok))))...)
}

// httpClient is an HTTPS client that trusts the cluster's CA.
func (c *cluster) httpClient() *http.Client {
	c.t.Helper()
	pem, err := os.ReadFile(filepath.Join(c.dataDir(), "ca.pem"))
	if err != nil {
		c.t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		c.t.Fatal("ca.pem holds no certificate")
	}
	return &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}}}
}

// withToken sends tok as a bearer token with every call.
func withToken(tok string) connect.ClientOption {
	return connect.WithInterceptors(connect.UnaryInterceptorFunc(func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			if tok != "" {
				req.Header().Set("Authorization", "Bearer "+tok)
			}
			return next(ctx, req)
		}
	}))
}

// list asks the first of addrs that answers for the live processes through
// the API, and returns them with the time the answer arrived (nil if none
// answered).
func (c *cluster) list(addrs []string) ([]*pb.ProcessRecord, time.Time) {
	for _, a := range addrs {
		var out []*pb.ProcessRecord
		req := &pb.ListRequest{}
		for {
			r, err := c.api(a).List(context.Background(), connect.NewRequest(req))
			if err != nil {
				out = nil
				break
			}
			out = append(out, r.Msg.Processes...)
			if req.PageToken = r.Msg.NextPageToken; req.PageToken == "" {
				return out, time.Now()
			}
		}
	}
	return nil, time.Time{}
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i > 0 && i+2 < len(s) && s[i+2] != 'Z' && s[i+2] != 'X'
}

// cgroupOf returns pid's cgroup path in a v1 controller hierarchy.
func cgroupOf(t *testing.T, pid int, controller string) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		t.Fatalf("cgroup of %d: %v", pid, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) == 3 {
			for _, c := range strings.Split(parts[1], ",") {
				if c == controller {
					return parts[2]
				}
			}
		}
	}
	t.Fatalf("pid %d has no %s cgroup", pid, controller)
	return ""
}

func readInt(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return strings.TrimSpace(string(b))
}
