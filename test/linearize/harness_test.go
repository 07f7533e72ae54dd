package linearize

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

// The harness: real shimd servers on loopback, trust on (TLS, tokens), as
// test/e2e runs them. Node names start with "truth" so that their cgroups
// never meet another test's.

var bin string // directory holding freshly built shimd and shim

func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() || os.Geteuid() != 0 {
		os.Exit(m.Run()) // the cluster tests skip
	}
	dir, err := os.MkdirTemp("", "truth-linearize-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bin = dir
	for _, c := range []string{"shimd", "shim", "shim-init"} {
		cmd := exec.Command("go", "build", "-tags", "seccomp", "-o", filepath.Join(dir, c), "../../cmd/"+c)
		if c == "shim-init" { // the sandbox's init, found next to shimd
			cmd = exec.Command("go", "build", "-trimpath", "-o", filepath.Join(dir, c), "../../cmd/"+c)
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		}
		out, err := cmd.CombinedOutput()
		if err != nil {
			fmt.Fprintf(os.Stderr, "build %s: %v\n%s", c, err, out)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func needCluster(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("starts a cluster of real shimd servers")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root for cgroups")
	}
}

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

type daemon struct {
	name, api, dir string
	args           []string
	cmd            *exec.Cmd
	log            *os.File
}

type cluster struct {
	t     *testing.T
	root  string // holds the nodes' data dirs; removed last
	nodes []*daemon
	token string
	httpc *http.Client
	mu    sync.Mutex
	apis  map[string]shimv1connect.ShimServiceClient
}

// startCluster starts n servers; the first bootstraps.
func startCluster(t *testing.T, n int) *cluster {
	t.Helper()
	c := &cluster{t: t, apis: map[string]shimv1connect.ShimServiceClient{}}
	prefix := fmt.Sprintf("truth%d", time.Now().UnixNano()%1e6)
	root, err := os.MkdirTemp("", prefix+"-")
	if err != nil {
		t.Fatal(err)
	}
	c.root = root
	t.Cleanup(c.cleanup)
	for i := range n {
		d := &daemon{name: fmt.Sprintf("%s-%d", prefix, i+1), api: freePort(t), dir: filepath.Join(root, fmt.Sprint(i+1))}
		d.args = []string{"--name", d.name, "--data-dir", d.dir, "--api", d.api, "--raft", freePort(t)}
		if i > 0 {
			d.args = append(d.args, "--join", c.nodes[0].api, "--join-token-file", filepath.Join(c.nodes[0].dir, "join.token"))
		}
		c.nodes = append(c.nodes, d)
		c.start(d)
		if i == 0 {
			waitFor(t, 20*time.Second, "the bootstrap node's join token", func() bool {
				_, err := os.Stat(filepath.Join(d.dir, "join.token"))
				return err == nil
			})
			c.credentials()
		}
	}
	waitFor(t, 30*time.Second, fmt.Sprintf("%d nodes up", n), func() bool {
		resp, err := c.api(c.nodes[0].api).Nodes(context.Background(), connect.NewRequest(&pb.NodesRequest{}))
		if err != nil {
			return false
		}
		up := 0
		for _, ns := range resp.Msg.Nodes {
			if ns.Node.State == pb.NodeState_NODE_STATE_UP {
				up++
			}
		}
		return up == n
	})
	return c
}

func (c *cluster) start(d *daemon) {
	c.t.Helper()
	if err := os.MkdirAll(d.dir, 0o700); err != nil {
		c.t.Fatal(err)
	}
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

// kill9 kills a shimd with SIGKILL (its guard and processes stay).
func (c *cluster) kill9(d *daemon) {
	if d.cmd == nil {
		return
	}
	_ = d.cmd.Process.Signal(syscall.SIGKILL)
	_ = d.cmd.Wait()
	d.cmd = nil
	d.log.Close()
}

// credentials reads the admin token and CA the bootstrap node wrote.
func (c *cluster) credentials() {
	c.t.Helper()
	dir := c.nodes[0].dir
	tok, err := os.ReadFile(filepath.Join(dir, "admin.token"))
	if err != nil {
		c.t.Fatal(err)
	}
	c.token = strings.TrimSpace(string(tok))
	pem, err := os.ReadFile(filepath.Join(dir, "ca.pem"))
	if err != nil {
		c.t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		c.t.Fatal("ca.pem holds no certificate")
	}
	c.httpc = &http.Client{Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}, ForceAttemptHTTP2: true,
		DialContext: (&net.Dialer{Timeout: time.Second}).DialContext, MaxIdleConnsPerHost: 16}}
}

// api is an admin's client of the member at addr.
func (c *cluster) api(addr string) shimv1connect.ShimServiceClient {
	c.mu.Lock()
	defer c.mu.Unlock()
	if a := c.apis[addr]; a != nil {
		return a
	}
	tok := c.token
	a := shimv1connect.NewShimServiceClient(c.httpc, "https://"+addr, connect.WithInterceptors(
		connect.UnaryInterceptorFunc(func(next connect.UnaryFunc) connect.UnaryFunc {
			return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
				req.Header().Set("Authorization", "Bearer "+tok)
				return next(ctx, req)
			}
		})))
	c.apis[addr] = a
	return a
}

func (c *cluster) addrs() []string {
	var out []string
	for _, d := range c.nodes {
		out = append(out, d.api)
	}
	return out
}

// leader returns the member every live member names as leader.
func (c *cluster) leader() *daemon {
	c.t.Helper()
	var lead *daemon
	waitFor(c.t, 20*time.Second, "a leader", func() bool {
		lead = nil
		for _, d := range c.nodes {
			if d.cmd == nil {
				continue
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			resp, err := c.api(d.api).Nodes(ctx, connect.NewRequest(&pb.NodesRequest{Consistency: pb.Consistency_CONSISTENCY_STALE}))
			cancel()
			if err != nil {
				return false
			}
			for _, ns := range resp.Msg.Nodes {
				if ns.Leader {
					for _, dd := range c.nodes {
						if dd.name == ns.Node.Name && (lead == nil || lead == dd) {
							lead = dd
						} else if dd.name == ns.Node.Name {
							return false
						}
					}
				}
			}
		}
		return lead != nil
	})
	return lead
}

// cleanup stops everything the cluster started: its processes, its shimds
// and guards, its cgroups.
func (c *cluster) cleanup() {
	for _, d := range c.nodes {
		if d.cmd != nil {
			_ = d.cmd.Process.Signal(syscall.SIGTERM)
			done := make(chan struct{})
			go func() { _ = d.cmd.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				_ = d.cmd.Process.Kill()
				<-done
			}
			d.cmd = nil
			d.log.Close()
		}
		if b, err := os.ReadFile(filepath.Join(d.dir, "guard.pid")); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 0 {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	for _, d := range c.nodes {
		files, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup/pids/shim", "*", d.name, "*", "cgroup.procs"))
		for _, f := range files {
			b, _ := os.ReadFile(f)
			for _, s := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(s); err == nil {
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
			}
		}
	}
	for _, d := range c.nodes {
		if left := removeCgroups(d.name); len(left) > 0 {
			c.t.Errorf("%s: cgroups left behind: %v", d.name, left)
		}
	}
	if c.t.Failed() {
		for _, d := range c.nodes {
			b, _ := os.ReadFile(filepath.Join(d.dir, "shimd.log"))
			s := string(b)
			if len(s) > 3000 {
				s = s[len(s)-3000:]
			}
			c.t.Logf("---- %s log (tail) ----\n%s", d.name, s)
		}
	}
	_ = os.RemoveAll(c.root)
}

// removeCgroups removes a node's cgroup directories in every hierarchy,
// deepest first, and returns those it could not remove within 5 s.
func removeCgroups(node string) []string {
	roots, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", "shim", "*", node)) // shim/<cluster>/<node>
	if v2s, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "shim", "*", node)); len(v2s) > 0 {
		roots = append(roots, v2s...)
	}
	if v2 := filepath.Join("/sys/fs/cgroup", "shim", node); exists(v2) {
		roots = append(roots, v2)
	}
	deadline := time.Now().Add(5 * time.Second)
	var left []string
	for _, root := range roots {
		var dirs []string
		_ = filepath.WalkDir(root, func(p string, e fs.DirEntry, err error) error {
			if err == nil && e.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			for {
				err := syscall.Rmdir(dirs[i])
				if err == nil || err == syscall.ENOENT {
					break
				}
				if err != syscall.EBUSY || time.Now().After(deadline) {
					left = append(left, dirs[i])
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
		}
		_ = syscall.Rmdir(filepath.Dir(root))               // shim/<cluster>/, if no other node uses it
		_ = syscall.Rmdir(filepath.Dir(filepath.Dir(root))) // shim/
	}
	return left
}

func exists(p string) bool { _, err := os.Stat(p); return err == nil }

// waitFor polls cond every 50 ms until it holds, failing the test after d.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
