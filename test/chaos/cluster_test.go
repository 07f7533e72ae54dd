package chaos

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"debug/elf"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

// The harness: build a static shimd and a FROM-scratch image around it, run
// five nodes with docker-compose (docker-compose.yml), and talk to them
// through the Go API client on their published 127.0.0.1 ports.

// node is one shimd container.
type node struct {
	svc       string // compose service: s1, s2, s3, w1, w2
	name      string // shimd --name
	server    bool
	ip        string // fixed address on the compose network
	port      int    // published API port on 127.0.0.1
	container string
	id        string // full container id
	api       shimv1connect.ShimServiceClient
}

type cluster struct {
	t       *testing.T
	project string // compose project, also the prefix of every container name
	image   string
	dir     string // host directory: data/<svc>, shared/beats.log
	subnet  string // first three octets of the compose network's /24
	network string // docker network name
	env     []string
	compose string // path to docker-compose.yml
	nodes   []*node
	beats   *beats
	frozen  []string // workload cgroups found frozen after a kill, and thawed
}

const (
	composeFile = "docker-compose.yml"
	beatsFile   = "beats.log"
)

// needDocker skips the test when there is no usable Docker engine,
// docker-compose or busybox-static, and fails it instead when
// SHIM_REQUIRE_DOCKER=1.
func needDocker(t *testing.T) (busybox string) {
	t.Helper()
	missing := func(format string, args ...any) {
		t.Helper()
		msg := fmt.Sprintf(format, args...)
		if os.Getenv("SHIM_REQUIRE_DOCKER") == "1" {
			t.Fatalf("SHIM_REQUIRE_DOCKER=1 but %s", msg)
		}
		t.Skipf("skipping the Docker chaos test: %s (set SHIM_REQUIRE_DOCKER=1 to make this a failure)", msg)
	}
	for _, b := range []string{"docker", "docker-compose"} {
		if _, err := exec.LookPath(b); err != nil {
			missing("no %s in PATH", b)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "docker", "info", "--format", "{{.ServerVersion}}").CombinedOutput(); err != nil {
		missing("no Docker engine answers (docker info: %v: %s)", err, strings.TrimSpace(string(out)))
	}
	busybox = "/bin/busybox"
	if p, err := exec.LookPath("busybox"); err == nil {
		if _, err := os.Stat(busybox); err != nil {
			busybox = p
		}
	}
	if err := checkStatic(busybox); err != nil {
		missing("the image needs a static busybox (Debian package busybox-static): %v", err)
	}
	return busybox
}

// checkStatic fails unless path is an ELF executable without an interpreter.
func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked", path)
		}
	}
	return nil
}

// buildShimd builds a static shimd into out, or copies SHIM_CHAOS_SHIMD.
func buildShimd(t *testing.T, out string) {
	t.Helper()
	if p := os.Getenv("SHIM_CHAOS_SHIMD"); p != "" {
		if err := checkStatic(p); err != nil {
			t.Fatalf("SHIM_CHAOS_SHIMD: %v", err)
		}
		copyFile(t, p, out, 0o755)
		t.Logf("using prebuilt shimd %s", p)
		return
	}
	build := func(tags string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "go", "build", "-tags", tags,
			"-ldflags", "-linkmode external -extldflags -static", "-o", out, "./cmd/shimd")
		cmd.Dir = filepath.Join("..", "..")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
		b, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("%v\n%s", err, b)
		}
		return checkStatic(out)
	}
	start := time.Now()
	err := build("seccomp netgo osusergo")
	if err != nil {
		t.Logf("static build with -tags seccomp failed; building without seccomp: %v", err)
		if err = build("netgo osusergo"); err != nil {
			t.Fatalf("static build of shimd: %v", err)
		}
	}
	t.Logf("built static shimd from %s in %s", sourceVersion(), time.Since(start).Round(100*time.Millisecond))
}

// buildInit builds shim-init (static, as `make build` does) into out, next
// to shimd, where shimd looks for it.
func buildInit(t *testing.T, out string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags", "-s -w", "-o", out, "./cmd/shim-init")
	cmd.Dir = filepath.Join("..", "..")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build shim-init: %v\n%s", err, b)
	}
}

// sourceVersion names the commit shimd was built from, and whether the
// working tree had changes.
func sourceVersion() string {
	root := filepath.Join("..", "..")
	head, err := run(10*time.Second, nil, "git", "-C", root, "rev-parse", "--short", "HEAD")
	if err != nil {
		return "an unknown commit"
	}
	v := strings.TrimSpace(head)
	if st, err := run(10*time.Second, nil, "git", "-C", root, "status", "--porcelain", "--untracked-files=no"); err == nil {
		if n := len(strings.Fields(st)) / 2; n > 0 {
			v += fmt.Sprintf(" with uncommitted changes in %d files", n)
		}
	}
	return v
}

func copyFile(t *testing.T, from, to string, mode os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, mode); err != nil {
		t.Fatal(err)
	}
}

// buildImage assembles the build context (Dockerfile, rootfs/) in dir and
// builds the image.
func buildImage(t *testing.T, dir, busybox, image string) {
	t.Helper()
	root := filepath.Join(dir, "rootfs")
	for _, d := range []string{"bin", "tmp", "data", "shared", "etc"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(filepath.Join(root, "tmp"), 0o1777); err != nil {
		t.Fatal(err)
	}
	buildShimd(t, filepath.Join(root, "bin", "shimd"))
	buildInit(t, filepath.Join(root, "bin", "shim-init"))
	copyFile(t, busybox, filepath.Join(root, "bin", "busybox"), 0o755)
	for _, applet := range []string{"sh", "mount", "mkfifo", "rm", "sleep", "cat", "ls", "ps", "date", "kill"} {
		if err := os.Symlink("busybox", filepath.Join(root, "bin", applet)); err != nil {
			t.Fatal(err)
		}
	}
	copyFile(t, "entrypoint.sh", filepath.Join(root, "entrypoint.sh"), 0o755)
	copyFile(t, "Dockerfile", filepath.Join(dir, "Dockerfile"), 0o644)
	start := time.Now()
	if out, err := run(3*time.Minute, []string{"DOCKER_BUILDKIT=0"}, "docker", "build", "-q", "-t", image, dir); err != nil {
		t.Fatalf("docker build: %v\n%s", err, out)
	}
	t.Logf("built image %s in %s", image, time.Since(start).Round(100*time.Millisecond))
}

// run runs a command with a timeout and returns its combined output.
func run(timeout time.Duration, env []string, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("%s %s: timed out after %s", name, strings.Join(args, " "), timeout)
	}
	return string(out), err
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func randInt(n int64) int64 {
	v, _ := rand.Int(rand.Reader, big.NewInt(n))
	return v.Int64()
}

// freePorts returns n distinct loopback ports nobody listens on right now,
// below the kernel's ephemeral range: docker binds a node's published port
// again at every restart, and a port in the ephemeral range may meanwhile be
// the source port of any outgoing connection on the host (the test's own
// API calls included), which fails the restart.
func freePorts(t *testing.T, n int) []int {
	t.Helper()
	lo := 32768 // the kernel's default start of the ephemeral range
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		fmt.Sscan(string(b), &lo)
	}
	const base = 10000
	if lo <= base+1000 {
		t.Fatalf("ephemeral ports start at %d: no room below for published ports", lo)
	}
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for try := 0; len(ports) < n; try++ {
		if try > 1000 {
			t.Fatalf("no free loopback port in [%d, %d)", base, lo)
		}
		port := base + int(randInt(int64(lo-base)))
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			continue // taken
		}
		ls = append(ls, l)
		ports = append(ports, port)
	}
	return ports
}

// hostRoutes returns the IPv4 destinations routed on this host.
func hostRoutes() []*net.IPNet {
	f, err := os.Open("/proc/net/route")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []*net.IPNet
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 8 || fs[0] == "Iface" {
			continue
		}
		d, err1 := strconv.ParseUint(fs[1], 16, 32)
		m, err2 := strconv.ParseUint(fs[7], 16, 32)
		if err1 != nil || err2 != nil || m == 0 {
			continue
		}
		ip, mask := make(net.IP, 4), make(net.IPMask, 4)
		binary.LittleEndian.PutUint32(ip, uint32(d))
		binary.LittleEndian.PutUint32(mask, uint32(m))
		out = append(out, &net.IPNet{IP: ip, Mask: mask})
	}
	return out
}

// pickSubnet picks a random 10.x.y.0/24 that no host route covers.
func pickSubnet() string {
	routes := hostRoutes()
	for {
		s := fmt.Sprintf("10.%d.%d", 200+randInt(55), randInt(256))
		ip := net.ParseIP(s + ".1")
		clash := false
		for _, r := range routes {
			if r.Contains(ip) {
				clash = true
			}
		}
		if !clash {
			return s
		}
	}
}

// startCluster builds everything and starts the five nodes. Cleanup removes
// every container, the network, the image and the host directory, also when
// the test fails.
func startCluster(t *testing.T, lease string) *cluster {
	t.Helper()
	busybox := needDocker(t)
	compose, err := filepath.Abs(composeFile)
	if err != nil {
		t.Fatal(err)
	}
	id := randHex(4)
	c := &cluster{t: t, project: "shimchaos" + id, image: "shim-chaos:" + id, compose: compose}
	c.network = c.project + "_chaos"
	c.dir, err = os.MkdirTemp("", "shim-chaos-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.cleanup)
	buildImage(t, filepath.Join(c.dir, "build"), busybox, c.image)
	for _, d := range []string{"shared", "data/s1", "data/s2", "data/s3", "data/w1", "data/w2"} {
		if err := os.MkdirAll(filepath.Join(c.dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	c.beats = newBeats(filepath.Join(c.dir, "shared", beatsFile))

	ports := freePorts(t, 5)
	prefix := "c" + id
	for i, svc := range []string{"s1", "s2", "s3", "w1", "w2"} {
		c.nodes = append(c.nodes, &node{
			svc: svc, name: prefix + "-" + svc, server: svc[0] == 's', port: ports[i],
			container: c.project + "-" + svc,
		})
	}
	// The subnet is random; if Docker refuses it (it overlaps a network of
	// another project), take another.
	for attempt := 1; ; attempt++ {
		c.subnet = pickSubnet()
		c.env = []string{
			"CHAOS_IMAGE=" + c.image, "CHAOS_PROJECT=" + c.project, "CHAOS_PREFIX=" + prefix,
			"CHAOS_DIR=" + c.dir, "CHAOS_NET=" + c.subnet, "CHAOS_LEASE=" + lease,
		}
		for i, n := range c.nodes {
			n.ip = fmt.Sprintf("%s.%d", c.subnet, 11+i)
			c.env = append(c.env, fmt.Sprintf("CHAOS_PORT_%s=%d", strings.ToUpper(n.svc), n.port))
		}
		// s1 first: it makes the cluster's CA and tokens, which the
		// others join with.
		out, err := c.composeCmd(3*time.Minute, "up", "-d", "--no-build", "s1")
		if err == nil {
			break
		}
		if attempt == 3 || !strings.Contains(strings.ToLower(out), "overlap") {
			t.Fatalf("docker-compose up: %v\n%s", err, out)
		}
		t.Logf("subnet %s.0/24 is taken; trying another", c.subnet)
		_, _ = c.composeCmd(2*time.Minute, "down", "-v", "--remove-orphans", "-t", "1")
	}
	c.trust()
	if out, err := c.composeCmd(3*time.Minute, "up", "-d", "--no-build"); err != nil {
		t.Fatalf("docker-compose up: %v\n%s", err, out)
	}
	for _, n := range c.nodes {
		out, err := run(time.Minute, nil, "docker", "inspect", "-f", "{{.Id}}", n.container)
		if err != nil {
			t.Fatalf("docker inspect %s: %v: %s", n.container, err, out)
		}
		n.id = strings.TrimSpace(out)
	}
	t.Logf("compose project %s: network %s (%s.0/24), image %s, data in %s", c.project, c.network, c.subnet, c.image, c.dir)
	return c
}

// trust waits for s1 to write the cluster's CA and tokens, hands the join
// token to the other nodes (in /shared) and makes the test's API clients:
// HTTPS that trusts s1's CA, with its admin token.
func (c *cluster) trust() {
	t := c.t
	t.Helper()
	dir := filepath.Join(c.dir, "data", "s1")
	var caPEM, admin, join []byte
	if !poll(60*time.Second, 100*time.Millisecond, func() bool {
		var e1, e2, e3 error
		caPEM, e1 = os.ReadFile(filepath.Join(dir, "ca.pem"))
		admin, e2 = os.ReadFile(filepath.Join(dir, "admin.token"))
		join, e3 = os.ReadFile(filepath.Join(dir, "join.token"))
		return e1 == nil && e2 == nil && e3 == nil
	}) {
		t.Fatalf("s1 wrote no CA and tokens to %s within 60s", dir)
	}
	if err := os.WriteFile(filepath.Join(c.dir, "shared", "join.token"), join, 0o600); err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		t.Fatalf("%s/ca.pem holds no certificate", dir)
	}
	httpc := &http.Client{Transport: &http.Transport{
		DialContext:         (&net.Dialer{Timeout: time.Second}).DialContext,
		TLSClientConfig:     &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13},
		MaxIdleConnsPerHost: 4,
		IdleConnTimeout:     10 * time.Second,
	}}
	tok := strings.TrimSpace(string(admin))
	bearer := connect.WithInterceptors(connect.UnaryInterceptorFunc(func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			req.Header().Set("Authorization", "Bearer "+tok)
			return next(ctx, req)
		}
	}))
	for _, n := range c.nodes {
		n.api = shimv1connect.NewShimServiceClient(httpc, fmt.Sprintf("https://127.0.0.1:%d", n.port), bearer)
	}
}

func (c *cluster) composeCmd(timeout time.Duration, args ...string) (string, error) {
	return run(timeout, c.env, "docker-compose", append([]string{"-p", c.project, "-f", c.compose}, args...)...)
}

func (c *cluster) docker(args ...string) error {
	out, err := run(time.Minute, nil, "docker", args...)
	if err != nil {
		return fmt.Errorf("docker %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(out))
	}
	return nil
}

// cleanup keeps the logs of a failed run, then removes everything the test
// created.
func (c *cluster) cleanup() {
	t := c.t
	if t.Failed() && len(c.nodes) > 0 {
		c.saveLogs()
	}
	if c.env != nil {
		// SIGKILL every node at once, like a power cut, before removing them:
		// a graceful stop makes every node lose the leader and fence all its
		// processes, and a shimd killed in the middle of a fence can leave a
		// workload cgroup frozen (see thawLeftovers).
		_, _ = c.composeCmd(2*time.Minute, "kill")
		for _, n := range c.nodes {
			if !c.waitStopped(n, 5*time.Second) {
				t.Logf("%s still running 5s after docker kill", n.container)
			}
		}
		if out, err := c.composeCmd(2*time.Minute, "down", "-v", "--remove-orphans", "-t", "1"); err != nil {
			t.Logf("docker-compose down: %v\n%s", err, out)
			for _, n := range c.nodes {
				_, _ = run(time.Minute, nil, "docker", "rm", "-f", "-v", n.container)
			}
			_, _ = run(time.Minute, nil, "docker", "network", "rm", c.network)
		}
	}
	if out, err := run(time.Minute, nil, "docker", "rmi", "-f", c.image); err != nil && !strings.Contains(out, "No such image") {
		t.Logf("docker rmi %s: %v: %s", c.image, err, out)
	}
	if err := os.RemoveAll(c.dir); err != nil {
		t.Logf("remove %s: %v", c.dir, err)
	}
}

// waitStopped waits until n's container has stopped. A container whose
// workloads sit in a frozen cgroup cannot stop: its init waits for them
// forever (zap_pid_ns_processes). If it has not stopped within d, waitStopped
// thaws such leftovers, reports them, and waits as long again.
func (c *cluster) waitStopped(n *node, d time.Duration) bool {
	stopped := func() bool {
		out, err := run(10*time.Second, nil, "docker", "inspect", "-f", "{{.State.Running}}", n.container)
		return err != nil || strings.TrimSpace(out) == "false"
	}
	if poll(d, 100*time.Millisecond, stopped) {
		return true
	}
	if thawed := c.thawLeftovers(n); len(thawed) > 0 {
		c.frozen = append(c.frozen, thawed...)
		c.t.Logf("WARNING: %s did not stop after docker kill: %d workload cgroups were left frozen by a shimd killed "+
			"in the middle of a cgroup v1 kill (freeze, SIGKILL, thaw); thawed them: %s",
			n.svc, len(thawed), strings.Join(thawed, ", "))
	}
	return poll(d, 100*time.Millisecond, stopped)
}

// thawLeftovers thaws every frozen freezer cgroup below n's container (cgroup
// v1, cgroupfs or systemd driver) and returns the groups it thawed.
func (c *cluster) thawLeftovers(n *node) []string {
	if n.id == "" {
		return nil
	}
	var thawed []string
	for _, root := range []string{
		filepath.Join("/sys/fs/cgroup/freezer/docker", n.id),
		filepath.Join("/sys/fs/cgroup/freezer/system.slice", "docker-"+n.id+".scope"),
	} {
		_ = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err != nil || d.IsDir() || d.Name() != "freezer.state" {
				return nil
			}
			b, err := os.ReadFile(p)
			if err != nil || strings.TrimSpace(string(b)) == "THAWED" {
				return nil
			}
			if os.WriteFile(p, []byte("THAWED"), 0) == nil {
				rel, _ := filepath.Rel(root, filepath.Dir(p))
				thawed = append(thawed, rel)
			}
			return nil
		})
	}
	return thawed
}

// saveLogs copies every node's log and the beats file to a directory that
// outlives the test, and prints the tail of each log.
func (c *cluster) saveLogs() {
	t := c.t
	dir, err := os.MkdirTemp("", "shim-chaos-logs-")
	if err != nil {
		t.Logf("save logs: %v", err)
		return
	}
	for _, n := range c.nodes {
		out, _ := run(time.Minute, nil, "docker", "logs", "--timestamps", n.container)
		_ = os.WriteFile(filepath.Join(dir, n.svc+".log"), []byte(out), 0o644)
		lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
		t.Logf("---- %s (%s) log, last 15 of %d lines ----\n%s", n.svc, n.name, len(lines),
			strings.Join(lines[max(0, len(lines)-15):], "\n"))
	}
	if src, err := os.Open(c.beats.path); err == nil {
		if dst, err := os.Create(filepath.Join(dir, beatsFile)); err == nil {
			_, _ = io.Copy(dst, src)
			dst.Close()
		}
		src.Close()
	}
	t.Logf("node logs and %s of the failed run kept in %s", beatsFile, dir)
}

// ---- faults ----

// kill kills n's container, shimd and workloads at once, and waits until it
// has stopped.
func (c *cluster) kill(n *node) error {
	if err := c.docker("kill", n.container); err != nil {
		return err
	}
	if !c.waitStopped(n, 5*time.Second) {
		return fmt.Errorf("%s still running 10s after docker kill", n.container)
	}
	return nil
}

func (c *cluster) start(n *node) error { return c.docker("start", n.container) }
func (c *cluster) disconnect(n *node) error {
	return c.docker("network", "disconnect", c.network, n.container)
}

// connect reattaches n with its fixed address: other nodes know it by it.
func (c *cluster) connect(n *node) error {
	return c.docker("network", "connect", "--ip", n.ip, c.network, n.container)
}

// ---- API ----

func (c *cluster) node(name string) *node {
	for _, n := range c.nodes {
		if n.name == name {
			return n
		}
	}
	return nil
}

func (c *cluster) servers() []*node {
	var out []*node
	for _, n := range c.nodes {
		if n.server {
			out = append(out, n)
		}
	}
	return out
}

const callTimeout = 2 * time.Second

// bestOf calls every server at once and keeps the answer from the most
// up-to-date replica (the highest table index): a server cut off from the
// others answers from a stale table.
func bestOf[T any](c *cluster, call func(ctx context.Context, n *node) (*T, uint64, error)) (*T, *node, error) {
	type answer struct {
		v   *T
		idx uint64
		n   *node
		err error
	}
	srv := c.servers()
	ch := make(chan answer, len(srv))
	for _, n := range srv {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
			defer cancel()
			v, idx, err := call(ctx, n)
			ch <- answer{v, idx, n, err}
		}()
	}
	var best answer
	var errs []error
	for range srv {
		a := <-ch
		if a.err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", a.n.svc, a.err))
			continue
		}
		if best.v == nil || a.idx > best.idx {
			best = a
		}
	}
	if best.v == nil {
		return nil, nil, errors.Join(errs...)
	}
	return best.v, best.n, nil
}

// state is one consistent-enough read of the cluster: the membership as the
// most up-to-date server sees it, then every process record (terminal ones
// included) from that same server.
type state struct {
	nodes  map[string]pb.NodeState
	leader string // node name, "" if unknown
	procs  *pb.ListResponse
	from   *node
}

func (c *cluster) read() (*state, error) {
	v, from, err := bestOf(c, func(ctx context.Context, n *node) (*pb.NodesResponse, uint64, error) {
		r, err := n.api.Nodes(ctx, connect.NewRequest(&pb.NodesRequest{}))
		if err != nil {
			return nil, 0, err
		}
		return r.Msg, r.Msg.Index, nil
	})
	if err != nil {
		return nil, fmt.Errorf("nodes: %w", err)
	}
	s := &state{nodes: map[string]pb.NodeState{}, from: from}
	for _, ns := range v.Nodes {
		s.nodes[ns.Node.GetName()] = ns.Node.GetState()
		if ns.Leader {
			s.leader = ns.Node.GetName()
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	l, err := from.api.List(ctx, connect.NewRequest(&pb.ListRequest{All: true}))
	if err != nil {
		return nil, fmt.Errorf("list from %s: %w", from.svc, err)
	}
	s.procs = l.Msg
	return s, nil
}

// spawn asks any server that answers to spawn count replicas of spec.
func (c *cluster) spawn(spec *pb.ProcessSpec, count int) ([]*pb.ProcessRecord, error) {
	var errs []error
	for _, n := range c.servers() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		r, err := n.api.Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec, Count: uint32(count)}))
		cancel()
		if err == nil {
			return r.Msg.Processes, nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", n.svc, err))
	}
	return nil, errors.Join(errs...)
}

// ---- small helpers ----

// poll calls cond every interval until it returns true or d has passed.
func poll(d, interval time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(interval)
	}
}
