package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/sys/unix"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
	"github.com/shim-run/shim/test/report"
)

// TestPartition runs five shimd servers, each in its own network namespace,
// joined by veth pairs to a bridge in a dedicated "switch" namespace. Nothing
// touches the host's network: the test reaches the APIs through sockets it
// opens inside the switch namespace, which has the only other address on the
// private /24.
//
// A partition moves the switch-side ends of some nodes' veths from the main
// bridge to an isolated one (so nodes cut off together can still talk to each
// other, but not to the rest). Thirty workloads append
// "id incarnation unix-nanos node" to one shared file on the host fs every
// 50 ms; that file is the evidence that no two incarnations of a process ever
// ran at the same time.
//
// Round 1 cuts one follower off; round 2 cuts the leader off together with a
// follower (a minority of two that can still reach each other). In both, the
// cut nodes' processes must be fenced (their PIDs die), replacements with
// incarnation+1 must run on the majority, the cut nodes must start nothing
// while cut off, and after the cut heals they must rejoin (up), hold nothing
// stale, and the table must show exactly one running incarnation per id.
func TestPartition(t *testing.T) {
	needRoot(t)
	if testing.Short() {
		t.Skip("long: network namespaces, five servers, two partitions")
	}
	for _, tool := range []string{"ip", "nsenter"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("partition test needs %s in PATH: %v", tool, err)
		}
	}
	if _, err := os.Stat("/bin/bash"); err != nil {
		t.Skip("partition test runs its workloads with /bin/bash: ", err)
	}
	if _, err := os.Stat("/sys/fs/cgroup/pids"); err != nil {
		t.Skip("partition test reads cgroup v1 (/sys/fs/cgroup/pids): ", err)
	}

	const nodes, workloads = 5, 30
	lab := newPartLab(t, nodes)
	lab.startNodes(t)
	lab.spawnBeats(t, workloads)

	ok := t.Run("follower", func(t *testing.T) {
		lab.round(t, true, func(leader *ptNode, count map[string]int) []*ptNode {
			// The follower with the most processes.
			var best *ptNode
			for _, n := range lab.nodes {
				if n != leader && (best == nil || count[n.name] > count[best.name]) {
					best = n
				}
			}
			return []*ptNode{best}
		})
	})
	if !ok {
		return
	}
	t.Run("leader-minority", func(t *testing.T) {
		// Not strict unless SHIM_E2E_STRICT_MAJORITY is set: nodes of the
		// majority may still fence themselves while it elects a new leader,
		// because a heartbeat forwarded to the unreachable old leader blocks
		// for half a lease (server/agent.go onLeader). Logged as a shim bug.
		lab.round(t, os.Getenv("SHIM_E2E_STRICT_MAJORITY") != "", func(leader *ptNode, count map[string]int) []*ptNode {
			// The leader and the follower with the most processes; they can
			// still reach each other but not the other three.
			var best *ptNode
			for _, n := range lab.nodes {
				if n != leader && (best == nil || count[n.name] > count[best.name]) {
					best = n
				}
			}
			return []*ptNode{leader, best}
		})
	})
	// The cleanup checks the beats of the whole run once more.
}

// ---- the lab: namespaces, links, daemons ----

const (
	ptNet   = "10.199.43" // a /24 that exists only inside the test's namespaces
	ptLease = time.Second
)

type ptNode struct {
	name string // shimd --name, also its cgroup directory
	ns   string // network namespace
	port string // the switch-side end of its veth
	ip   string
	api  string
	dir  string
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has been waited for
	log  *os.File
	shim shimv1connect.ShimServiceClient
}

type partLab struct {
	t          *testing.T
	tag        string
	sw         string // the switch namespace
	namespaces []string
	nodes      []*ptNode
	dir        string
	n          int    // workloads
	beats      string // the shared evidence file
	fifo       string // the workloads sleep by reading it with a timeout
	httpc      *http.Client
}

func newPartLab(t *testing.T, n int) *partLab {
	t.Helper()
	l := &partLab{t: t, tag: fmt.Sprintf("shp%d", os.Getpid()%100000), dir: t.TempDir()}
	// Registered after TempDir, so it runs before the logs are removed.
	t.Cleanup(l.cleanup)
	l.sw = l.tag + "-sw"
	l.beats = filepath.Join(l.dir, "beats")
	l.fifo = filepath.Join(l.dir, "tick")
	if err := syscall.Mkfifo(l.fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(l.beats, nil, 0o666); err != nil {
		t.Fatal(err)
	}

	l.addNS(t, l.sw)
	l.ip(t, "-n", l.sw, "link", "set", "lo", "up")
	for _, br := range []string{"br0", "brcut"} {
		l.ip(t, "-n", l.sw, "link", "add", br, "type", "bridge")
		l.ip(t, "-n", l.sw, "link", "set", br, "up")
	}
	l.ip(t, "-n", l.sw, "addr", "add", ptNet+".254/24", "dev", "br0")
	for i := 1; i <= n; i++ {
		d := &ptNode{
			name: fmt.Sprintf("%s-n%d", l.tag, i),
			ns:   fmt.Sprintf("%s-n%d", l.tag, i),
			port: fmt.Sprintf("p%d", i),
			ip:   fmt.Sprintf("%s.%d", ptNet, i),
			dir:  filepath.Join(l.dir, fmt.Sprintf("n%d", i)),
		}
		d.api = d.ip + ":7070"
		l.addNS(t, d.ns)
		l.ip(t, "-n", d.ns, "link", "set", "lo", "up")
		l.ip(t, "-n", l.sw, "link", "add", d.port, "type", "veth", "peer", "name", "eth0", "netns", d.ns)
		l.ip(t, "-n", l.sw, "link", "set", d.port, "master", "br0")
		l.ip(t, "-n", l.sw, "link", "set", d.port, "up")
		l.ip(t, "-n", d.ns, "addr", "add", d.ip+"/24", "dev", "eth0")
		l.ip(t, "-n", d.ns, "link", "set", "eth0", "up")
		l.nodes = append(l.nodes, d)
	}
	return l
}

// connect makes the lab's API clients, once the first node has written the
// cluster's CA and admin token: HTTPS from the switch namespace, as an
// admin.
func (l *partLab) connect(t *testing.T) {
	t.Helper()
	dir := l.nodes[0].dir
	var pem, tok []byte
	waitFor(t, 20*time.Second, "the first node's CA and admin token", func() bool {
		var err1, err2 error
		pem, err1 = os.ReadFile(filepath.Join(dir, "ca.pem"))
		tok, err2 = os.ReadFile(filepath.Join(dir, "admin.token"))
		return err1 == nil && err2 == nil
	})
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		t.Fatal("ca.pem holds no certificate")
	}
	l.httpc = &http.Client{Transport: &http.Transport{
		DialContext:         nsDialer("/run/netns/" + l.sw),
		TLSClientConfig:     &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13},
		MaxIdleConnsPerHost: 8,
		IdleConnTimeout:     30 * time.Second,
	}}
	for _, d := range l.nodes {
		d.shim = shimv1connect.NewShimServiceClient(l.httpc, "https://"+d.api, withToken(strings.TrimSpace(string(tok))))
	}
}

func (l *partLab) addNS(t *testing.T, name string) {
	t.Helper()
	// A namespace left by an earlier, killed run with the same pid.
	_ = exec.Command("ip", "netns", "del", name).Run()
	l.ip(t, "netns", "add", name)
	l.namespaces = append(l.namespaces, name)
}

func (l *partLab) ip(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// nsDialer dials from inside the network namespace at nsPath: each dial runs
// on a fresh OS thread that enters the namespace and is never handed back to
// the Go scheduler (the goroutine ends locked, so the thread exits). The
// socket stays in the namespace it was created in.
func nsDialer(nsPath string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		type result struct {
			c   net.Conn
			err error
		}
		ch := make(chan result, 1)
		go func() {
			runtime.LockOSThread() // never unlocked: see above
			fd, err := unix.Open(nsPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				ch <- result{nil, fmt.Errorf("open %s: %w", nsPath, err)}
				return
			}
			err = unix.Setns(fd, unix.CLONE_NEWNET)
			unix.Close(fd)
			if err != nil {
				ch <- result{nil, fmt.Errorf("setns %s: %w", nsPath, err)}
				return
			}
			d := net.Dialer{Timeout: 2 * time.Second}
			c, err := d.DialContext(ctx, network, addr)
			ch <- result{c, err}
		}()
		r := <-ch
		return r.c, r.err
	}
}

func (l *partLab) startNode(t *testing.T, d *ptNode, join string) {
	t.Helper()
	if err := os.MkdirAll(d.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(filepath.Join(d.dir, "shimd.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	args := []string{"--net=/run/netns/" + d.ns, "--", filepath.Join(bin, "shimd"),
		"--name", d.name, "--data-dir", d.dir, "--api", d.api, "--raft", d.ip + ":7071",
		"--lease", ptLease.String()}
	if join != "" {
		args = append(args, "--join", join, "--join-token-file", filepath.Join(l.nodes[0].dir, "join.token"))
	}
	// nsenter enters only the network namespace and execs shimd (no fork),
	// so /sys/fs/cgroup stays the host's and cmd.Process is shimd itself.
	d.cmd = exec.Command("nsenter", args...)
	d.cmd.Stdout, d.cmd.Stderr = f, f
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	d.log = f
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { _ = cmd.Wait(); close(done) }(d.cmd, d.done)
}

func (l *partLab) startNodes(t *testing.T) {
	t.Helper()
	l.startNode(t, l.nodes[0], "")
	l.connect(t)
	waitFor(t, 20*time.Second, "the first node to lead", func() bool {
		r, err := l.nodesOf(l.nodes[0])
		return err == nil && len(r.Nodes) == 1 && r.Nodes[0].Leader
	})
	for _, d := range l.nodes[1:] {
		l.startNode(t, d, l.nodes[0].api)
	}
	waitFor(t, 40*time.Second, fmt.Sprintf("%d nodes up and voting", len(l.nodes)), func() bool {
		r, err := l.nodesOf(l.nodes[0])
		if err != nil {
			return false
		}
		up := 0
		for _, s := range r.Nodes {
			if s.Node.State == pb.NodeState_NODE_STATE_UP && s.Voter {
				up++
			}
		}
		return up == len(l.nodes)
	})
}

// cleanup kills the daemons and every workload, removes their cgroups and the
// namespaces (which takes the veths and bridges with them).
func (l *partLab) cleanup() {
	// The evidence of the whole run, even when a check failed early: no
	// two incarnations of an id ever beat at the same time.
	if b, err := ptReadBeatsFile(l.beats); err == nil {
		ov := b.overlaps()
		ptErrors(l.t, ov)
		incs := 0
		for _, m := range b.spans {
			incs += len(m)
		}
		summary := fmt.Sprintf("%s: %d beat lines (%d malformed) from %d ids, %d incarnations; overlapping incarnations: %d",
			l.t.Name(), b.lines, b.bad, len(b.spans), incs, len(ov))
		l.t.Log(summary)
		report.Keep(l.t, "partition", summary)
	}
	for _, d := range l.nodes {
		if d.cmd != nil {
			_ = d.cmd.Process.Kill()
			select {
			case <-d.done:
			case <-time.After(10 * time.Second):
				l.t.Errorf("%s: shimd did not die on SIGKILL", d.name)
			}
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, d := range l.nodes {
		for {
			// A workload may be left frozen by a shimd killed in the middle
			// of a cgroup kill (freeze, kill, thaw); SIGKILL waits for a thaw.
			ptThaw(d.name)
			killCgroups(d.name)
			if len(ptLiveGroups(d.name)) == 0 || time.Now().After(deadline) {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if left := removeCgroups(d.name); len(left) > 0 {
			l.t.Errorf("%s: cgroups left behind: %v", d.name, left)
		}
	}
	if l.t.Failed() {
		for _, d := range l.nodes {
			b, _ := os.ReadFile(filepath.Join(d.dir, "shimd.log"))
			l.t.Logf("---- %s (%s) log (tail) ----\n%s", d.name, d.ip, tail(string(b), 6000))
		}
		// Keep the logs and the beats: t.TempDir goes away.
		if keep, err := os.MkdirTemp("", "shim-partition-"); err == nil {
			if err := exec.Command("cp", "-a", l.dir+"/.", keep).Run(); err == nil {
				l.t.Logf("logs and beats kept in %s", keep)
			}
		}
	}
	for _, d := range l.nodes {
		if d.log != nil {
			d.log.Close()
		}
	}
	if l.httpc != nil {
		l.httpc.CloseIdleConnections()
	}
	for i := len(l.namespaces) - 1; i >= 0; i-- {
		if out, err := exec.Command("ip", "netns", "del", l.namespaces[i]).CombinedOutput(); err != nil {
			l.t.Errorf("ip netns del %s: %v: %s", l.namespaces[i], err, out)
		}
	}
}

// cut moves the group's switch ports to the isolated bridge: they can reach
// each other, but neither the rest nor the test.
func (l *partLab) cut(t *testing.T, group []*ptNode) {
	t.Helper()
	for _, d := range group {
		l.ip(t, "-n", l.sw, "link", "set", d.port, "master", "brcut")
	}
}

func (l *partLab) heal(t *testing.T, group []*ptNode) {
	t.Helper()
	for _, d := range group {
		l.ip(t, "-n", l.sw, "link", "set", d.port, "master", "br0")
	}
}

// ---- API, from inside the switch namespace ----

func (l *partLab) nodesOf(d *ptNode) (*pb.NodesResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	r, err := d.shim.Nodes(ctx, connect.NewRequest(&pb.NodesRequest{}))
	if err != nil {
		return nil, err
	}
	return r.Msg, nil
}

func (l *partLab) listOf(d *ptNode) ([]*pb.ProcessRecord, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	r, err := d.shim.List(ctx, connect.NewRequest(&pb.ListRequest{}))
	if err != nil {
		return nil, err
	}
	return r.Msg.Processes, nil
}

// leaderAmong returns the node of among that says it is the leader, or nil.
func (l *partLab) leaderAmong(among []*ptNode) *ptNode {
	for _, d := range among {
		r, err := l.nodesOf(d)
		if err != nil {
			continue
		}
		for _, s := range r.Nodes {
			if s.Leader && s.Node.Name == d.name {
				return d
			}
		}
	}
	return nil
}

func (l *partLab) waitLeader(t *testing.T, among []*ptNode, d time.Duration) *ptNode {
	t.Helper()
	var ld *ptNode
	waitFor(t, d, "a leader among "+ptNames(among), func() bool {
		ld = l.leaderAmong(among)
		return ld != nil
	})
	return ld
}

func ptNames(ds []*ptNode) string {
	var s []string
	for _, d := range ds {
		s = append(s, d.name)
	}
	return strings.Join(s, ",")
}

// ---- workloads and their evidence ----

// The workload from the issue, with bash builtins instead of date(1) and
// sleep(1) (EPOCHREALTIME has microseconds; "000" makes them nanoseconds):
// thirty copies of the fork-per-beat version need several cores, which a
// two-core box does not have to spare for shimd's heartbeats.
const ptBeatScript = `exec 9<>"$1"
while :; do
  echo "$SHIM_PROCESS_ID $SHIM_INCARNATION ${EPOCHREALTIME/./}000 $SHIM_NODE" >> "$2"
  read -t 0.05 -u 9
done`

// spawnBeats spawns n beats in batches of one per node, so that no node has
// to start many processes at once: on a loaded box a burst of starts can
// delay the node's lease renewals.
//
// A Spawn that fails may still have been committed (shimd retries a Spawn
// whose Raft apply lost leadership, and the retry then fails with
// already_exists), so the table, not the answer, says how many there are.
func (l *partLab) spawnBeats(t *testing.T, n int) {
	t.Helper()
	// The beats go to a host file: host isolation, as root (the admin's).
	spec := &pb.ProcessSpec{Name: "beat", Command: []string{"/bin/bash", "-c", ptBeatScript, "beat", l.fifo, l.beats},
		Restart: pb.RestartPolicy_RESTART_POLICY_ALWAYS, Isolation: pb.Isolation_ISOLATION_HOST, User: "0"}
	for failures := 0; l.n < n; {
		k := min(len(l.nodes), n-l.n)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		_, err := l.nodes[0].shim.Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec, Count: uint32(k), Wait: true}))
		cancel()
		want := l.n + k
		if err != nil {
			if failures++; failures > 3 {
				t.Fatalf("spawn %d beats: %v", k, err)
			}
			t.Logf("spawn %d beats: %v (shim bug if already_exists: a retried Spawn after a leader change)", k, err)
			// Committed after all? Give it a moment to show.
			waitUntil := time.Now().Add(5 * time.Second)
			for time.Now().Before(waitUntil) {
				if ld := l.leaderAmong(l.nodes); ld != nil {
					if recs, err := l.listOf(ld); err == nil && len(recs) >= want {
						break
					}
				}
				time.Sleep(100 * time.Millisecond)
			}
			ld := l.waitLeader(t, l.nodes, 15*time.Second)
			recs, err := l.listOf(ld)
			if err != nil {
				t.Fatalf("list: %v", err)
			}
			want = len(recs)
		}
		l.n = want
		l.settle(t, l.n)
	}
	per := map[string]int{}
	for _, r := range l.settle(t, l.n) {
		per[r.Node]++
	}
	t.Logf("%d beats running: %v", l.n, per)
}

// settle waits until every node is up and the leader's table shows n
// processes, all running with live PIDs that have beaten.
func (l *partLab) settle(t *testing.T, n int) []*pb.ProcessRecord {
	t.Helper()
	var recs []*pb.ProcessRecord
	var why string
	ptWaitFor(t, 30*time.Second, fmt.Sprintf("all nodes up, %d beats running and beating", n), func() bool {
		ld := l.leaderAmong(l.nodes)
		if ld == nil {
			why = "no leader"
			return false
		}
		r, err := l.nodesOf(ld)
		if err != nil {
			why = err.Error()
			return false
		}
		for _, s := range r.Nodes {
			if s.Node.State != pb.NodeState_NODE_STATE_UP {
				why = s.Node.Name + " is " + s.Node.State.String()
				return false
			}
		}
		if recs, err = l.listOf(ld); err != nil {
			why = err.Error()
			return false
		}
		if why = ptOnePerID(recs, n); why != "" {
			return false
		}
		b := l.readBeats(t)
		for _, r := range recs {
			if b.spans[r.Id][r.Incarnation] == nil {
				why = fmt.Sprintf("%s incarnation %d has not beaten yet", r.Id, r.Incarnation)
				return false
			}
		}
		return true
	}, func() string { return why })
	return recs
}

type ptSpan struct {
	first, last int64 // unix nanos of the first and last beat
	n           int
	nodes       map[string]bool
}

type ptBeats struct {
	lines, bad int
	spans      map[string]map[uint64]*ptSpan // id -> incarnation -> span
}

func (l *partLab) readBeats(t *testing.T) *ptBeats {
	t.Helper()
	b, err := ptReadBeatsFile(l.beats)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func ptReadBeatsFile(path string) (*ptBeats, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b := &ptBeats{spans: map[string]map[uint64]*ptSpan{}}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) != 4 {
			b.bad++ // the last line may be half written
			continue
		}
		inc, err1 := strconv.ParseUint(fs[1], 10, 64)
		ts, err2 := strconv.ParseInt(fs[2], 10, 64)
		if err1 != nil || err2 != nil {
			b.bad++
			continue
		}
		b.lines++
		m := b.spans[fs[0]]
		if m == nil {
			m = map[uint64]*ptSpan{}
			b.spans[fs[0]] = m
		}
		s := m[inc]
		if s == nil {
			s = &ptSpan{first: ts, last: ts, nodes: map[string]bool{}}
			m[inc] = s
		}
		s.first, s.last = min(s.first, ts), max(s.last, ts)
		s.n++
		s.nodes[fs[3]] = true
	}
	return b, sc.Err()
}

// overlaps describes every pair of incarnations of one id whose
// [first, last] beat intervals overlap or are out of incarnation order, and
// every incarnation that beat on more than one node.
func (b *ptBeats) overlaps() []string {
	var out []string
	for id, m := range b.spans {
		incs := make([]uint64, 0, len(m))
		for inc, s := range m {
			incs = append(incs, inc)
			if len(s.nodes) > 1 {
				out = append(out, fmt.Sprintf("%s incarnation %d beat on several nodes: %v", id, inc, s.nodes))
			}
		}
		slices.Sort(incs)
		for i, a := range incs {
			for _, c := range incs[i+1:] {
				x, y := m[a], m[c]
				if x.first <= y.last && y.first <= x.last {
					out = append(out, fmt.Sprintf("%s: incarnation %d [%s, %s] overlaps incarnation %d [%s, %s] by %s",
						id, a, ptTS(x.first), ptTS(x.last), c, ptTS(y.first), ptTS(y.last),
						time.Duration(min(x.last, y.last)-max(x.first, y.first))))
				} else if y.last < x.first {
					out = append(out, fmt.Sprintf("%s: incarnation %d ran before incarnation %d", id, c, a))
				}
			}
		}
	}
	sort.Strings(out)
	return out
}

func ptTS(ns int64) string { return time.Unix(0, ns).Format("15:04:05.000000") }

// ---- cgroups ----

// ptLiveGroups maps "id.incarnation" to the PIDs in that cgroup of node, for
// every cgroup that holds at least one process.
func ptLiveGroups(node string) map[string][]int {
	out := map[string][]int{}
	for name, pids := range ptGroups(node) {
		if len(pids) > 0 {
			out[name] = pids
		}
	}
	return out
}

// ptGroups maps every workload cgroup of node, empty or not, to its PIDs.
func ptGroups(node string) map[string][]int {
	out := map[string][]int{}
	files, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup/pids/shim", "*", node, "*", "cgroup.procs"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // removed meanwhile
		}
		var pids []int
		for _, s := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(s); err == nil {
				pids = append(pids, pid)
			}
		}
		out[filepath.Base(filepath.Dir(f))] = pids
	}
	return out
}

// ptThaw thaws node's freezer cgroups.
func ptThaw(node string) {
	files, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup/freezer/shim", "*", node, "*", "freezer.state"))
	for _, f := range files {
		_ = os.WriteFile(f, []byte("THAWED"), 0o644)
	}
}

// ptWatch records every cgroup that appears on a node and was not in allowed:
// a process started there.
type ptWatch struct {
	mu    sync.Mutex
	seen  map[string]time.Time // "node/id.inc" -> first seen
	stop  chan struct{}
	ended chan struct{}
	once  sync.Once
}

func ptWatchGroups(nodes []*ptNode, allowed map[string]bool) *ptWatch {
	w := &ptWatch{seen: map[string]time.Time{}, stop: make(chan struct{}), ended: make(chan struct{})}
	go func() {
		defer close(w.ended)
		for {
			for _, d := range nodes {
				for g := range ptGroups(d.name) {
					k := d.name + "/" + g
					w.mu.Lock()
					if _, ok := w.seen[k]; !ok && !allowed[k] {
						w.seen[k] = time.Now()
					}
					w.mu.Unlock()
				}
			}
			select {
			case <-w.stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	return w
}

func (w *ptWatch) end() map[string]time.Time {
	w.once.Do(func() { close(w.stop) })
	<-w.ended
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.seen
}

// ptDeaths records when each PID was first seen dead (or a zombie).
func ptDeaths(pids []int) (wait func() map[int]time.Time, stop func()) {
	out := map[int]time.Time{}
	quit, ended := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(ended)
		for len(out) < len(pids) {
			for _, p := range pids {
				if _, ok := out[p]; !ok && !alive(p) {
					out[p] = time.Now()
				}
			}
			select {
			case <-quit:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	var once sync.Once
	stop = func() { once.Do(func() { close(quit) }); <-ended }
	return func() map[int]time.Time { <-ended; return out }, stop
}

// ---- one partition round ----

// round cuts the nodes that pick chooses off from the rest and checks
// fencing, replacement, the beats, the rejoin and the table.
//
// Safety is always checked strictly: fenced PIDs die, no two incarnations of
// an id beat at the same time, a cut node starts nothing, one running
// incarnation per id after the heal. Collateral churn on the majority
// (processes restarted or moved that ran on nodes that were never cut off)
// fails the round only if strict; otherwise it is logged as a shim bug.
func (l *partLab) round(t *testing.T, strict bool, pick func(leader *ptNode, count map[string]int) []*ptNode) {
	before := l.settle(t, l.n)
	leader := l.waitLeader(t, l.nodes, 15*time.Second)
	count := map[string]int{}
	for _, r := range before {
		count[r.Node]++
	}
	group := pick(leader, count)
	inGroup := map[string]bool{}
	for _, d := range group {
		inGroup[d.name] = true
	}
	var rest []*ptNode
	for _, d := range l.nodes {
		if !inGroup[d.name] {
			rest = append(rest, d)
		}
	}
	// What runs where before the cut, in the table and in the cgroups.
	lost := map[string]*pb.ProcessRecord{}
	var lostPIDs []int
	stayed := map[string]*pb.ProcessRecord{}
	for _, r := range before {
		if inGroup[r.Node] {
			lost[r.Id] = r
			lostPIDs = append(lostPIDs, int(r.Pid))
		} else {
			stayed[r.Id] = r
		}
	}
	if len(lost) == 0 {
		t.Fatalf("nothing runs on %s; nothing to fence", ptNames(group))
	}
	allowed := map[string]bool{}
	for _, d := range group {
		for g := range ptGroups(d.name) {
			allowed[d.name+"/"+g] = true
		}
	}
	for _, r := range lost {
		if !allowed[fmt.Sprintf("%s/%s.%d", r.Node, r.Id, r.Incarnation)] {
			t.Fatalf("%s incarnation %d is on %s in the table but has no cgroup there", r.Id, r.Incarnation, r.Node)
		}
	}
	var churn []string // collateral damage on the majority
	watch := ptWatchGroups(group, allowed)
	defer watch.end()
	deaths, stopDeaths := ptDeaths(lostPIDs)
	defer stopDeaths()
	wasLeader := inGroup[leader.name]
	t.Logf("cutting off %s (leader: %v) with %d of %d processes; leader before: %s; load average %s",
		ptNames(group), wasLeader, len(lost), len(before), leader.name, ptLoad())

	cutAt := time.Now()
	l.cut(t, group)

	// The majority has (or elects) a leader.
	if wasLeader {
		leader = l.waitLeader(t, rest, 15*time.Second)
		t.Logf("new leader %s elected %s after the cut", leader.name, time.Since(cutAt).Round(time.Millisecond))
	}

	// Fenced, marked down, replaced: record when each happens.
	var fencedAt, downAt, movedAt time.Time
	var after []*pb.ProcessRecord
	deadline := time.Now().Add(20 * time.Second)
	for fencedAt.IsZero() || downAt.IsZero() || movedAt.IsZero() {
		if fencedAt.IsZero() && ptAllDead(lostPIDs) {
			fencedAt = time.Now()
		}
		if ld := l.leaderAmong(append([]*ptNode{leader}, rest...)); ld != nil {
			leader = ld
			if downAt.IsZero() {
				if r, err := l.nodesOf(ld); err == nil {
					down := 0
					for _, s := range r.Nodes {
						if inGroup[s.Node.Name] && s.Node.State == pb.NodeState_NODE_STATE_DOWN {
							down++
						}
					}
					if down == len(group) {
						downAt = time.Now()
					}
				}
			}
			if movedAt.IsZero() {
				if recs, err := l.listOf(ld); err == nil && ptReplaced(recs, lost, stayed, inGroup) {
					movedAt, after = time.Now(), recs
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s: fenced=%v marked down=%v replacements running=%v (lost PIDs alive: %v)",
				time.Since(cutAt).Round(time.Millisecond), !fencedAt.IsZero(), !downAt.IsZero(), !movedAt.IsZero(), ptAlive(lostPIDs))
		}
		time.Sleep(50 * time.Millisecond)
	}
	var lastDeath time.Time
	for _, at := range deaths() {
		if at.After(lastDeath) {
			lastDeath = at
		}
	}
	for _, r := range after {
		if old := lost[r.Id]; old != nil && r.Incarnation != old.Incarnation+1 {
			churn = append(churn, fmt.Sprintf("%s was placed %d times while %s was cut off: incarnation %d -> %d",
				r.Id, r.Incarnation-old.Incarnation, ptNames(group), old.Incarnation, r.Incarnation))
		}
	}
	// The cut nodes' cgroups empty out and go away.
	waitFor(t, 10*time.Second, "the cut nodes' cgroups to be removed", func() bool {
		for _, d := range group {
			if len(ptGroups(d.name)) > 0 {
				return false
			}
		}
		return true
	})

	// Hold the cut for three more leases, checking that the cut nodes stay
	// empty and nothing of theirs comes back to life.
	holdUntil := time.Now().Add(3 * ptLease)
	for time.Now().Before(holdUntil) {
		for _, d := range group {
			if g := ptLiveGroups(d.name); len(g) > 0 {
				t.Fatalf("%s runs %v while cut off", d.name, g)
			}
		}
		if a := ptAlive(lostPIDs); len(a) > 0 {
			t.Fatalf("fenced PIDs alive again: %v", a)
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, d := range group {
		if !ptRunning(d) {
			t.Fatalf("%s: shimd exited while cut off", d.name)
		}
	}

	// Heal. The cut nodes come back up, holding nothing stale.
	healAt := time.Now()
	l.heal(t, group)
	var upAt time.Time
	waitFor(t, 30*time.Second, ptNames(group)+" up again", func() bool {
		ld := l.leaderAmong(l.nodes)
		if ld == nil {
			return false
		}
		leader = ld
		r, err := l.nodesOf(ld)
		if err != nil {
			return false
		}
		up := 0
		for _, s := range r.Nodes {
			if inGroup[s.Node.Name] && s.Node.State == pb.NodeState_NODE_STATE_UP {
				up++
			}
		}
		if up == len(group) {
			upAt = time.Now()
			return true
		}
		return false
	})
	// Exactly one running incarnation per id, in the table of every replica
	// (the rejoined ones included) and in the hosts' cgroups.
	var final []*pb.ProcessRecord
	var why string
	ptWaitFor(t, 20*time.Second, "one running incarnation per id, everywhere", func() bool {
		ld := l.leaderAmong(l.nodes)
		if ld == nil {
			why = "no leader"
			return false
		}
		recs, err := l.listOf(ld)
		if err != nil {
			why = err.Error()
			return false
		}
		if why = ptOnePerID(recs, len(before)); why != "" {
			return false
		}
		want := map[string]string{} // node/id.inc -> pid
		for _, r := range recs {
			want[fmt.Sprintf("%s/%s.%d", r.Node, r.Id, r.Incarnation)] = fmt.Sprint(r.Pid)
		}
		for _, d := range l.nodes {
			live := ptLiveGroups(d.name)
			for g, pids := range live {
				k := d.name + "/" + g
				if want[k] == "" {
					why = fmt.Sprintf("%s has live processes %v in %s, which the table does not run there", d.name, pids, g)
					return false
				}
				if !slices.Contains(pids, atoiOr(want[k])) {
					why = fmt.Sprintf("cgroup %s holds %v, not the table's pid %s", k, pids, want[k])
					return false
				}
			}
			for _, r := range recs {
				if r.Node == d.name && len(live[fmt.Sprintf("%s.%d", r.Id, r.Incarnation)]) == 0 {
					why = fmt.Sprintf("%s: the table runs %s.%d there, its cgroup holds nothing", d.name, r.Id, r.Incarnation)
					return false
				}
			}
			// The replica on d agrees with the leader's.
			theirs, err := l.listOf(d)
			if err != nil {
				why = fmt.Sprintf("list from %s: %v", d.name, err)
				return false
			}
			if len(theirs) != len(recs) {
				why = fmt.Sprintf("%s lists %d processes, the leader %d", d.name, len(theirs), len(recs))
				return false
			}
			for _, r := range theirs {
				if want[fmt.Sprintf("%s/%s.%d", r.Node, r.Id, r.Incarnation)] != fmt.Sprint(r.Pid) {
					why = fmt.Sprintf("%s's replica has %s.%d on %s pid %d; the leader's differs", d.name, r.Id, r.Incarnation, r.Node, r.Pid)
					return false
				}
			}
		}
		final = recs
		return true
	}, func() string { return why })
	settledAt := time.Now()
	for _, d := range group {
		for g := range ptGroups(d.name) {
			id, _, _ := strings.Cut(g, ".")
			if lost[id] != nil {
				t.Errorf("%s still has a cgroup for %s after rejoining", d.name, g)
			}
		}
	}
	// Processes on the majority were not disturbed; the replacements were
	// not disturbed by the heal.
	moved := map[string]*pb.ProcessRecord{}
	for _, r := range after {
		moved[r.Id] = r
	}
	for _, r := range final {
		if s := stayed[r.Id]; s != nil && (s.Pid != r.Pid || s.Incarnation != r.Incarnation || s.Node != r.Node) {
			churn = append(churn, fmt.Sprintf("%s on the majority was disturbed: %s/%d pid %d -> %s/%d pid %d",
				r.Id, s.Node, s.Incarnation, s.Pid, r.Node, r.Incarnation, r.Pid))
		}
		if m := moved[r.Id]; lost[r.Id] != nil && (m.Pid != r.Pid || m.Incarnation != r.Incarnation) {
			churn = append(churn, fmt.Sprintf("%s's replacement was disturbed: %s/%d pid %d -> %s/%d pid %d",
				r.Id, m.Node, m.Incarnation, m.Pid, r.Node, r.Incarnation, r.Pid))
		}
	}
	for _, d := range rest {
		for _, line := range ptLogLines(d, cutAt, "lease expired: fenced every local process") {
			churn = append(churn, fmt.Sprintf("%s, never cut off, fenced itself: %s", d.name, line))
		}
	}

	// Every current incarnation beats after the cluster settled.
	var b *ptBeats
	waitFor(t, 10*time.Second, "every current incarnation to beat after the heal", func() bool {
		b = l.readBeats(t)
		for _, r := range final {
			s := b.spans[r.Id][r.Incarnation]
			if s == nil || s.last <= settledAt.UnixNano() {
				return false
			}
		}
		return true
	})
	// Nothing started on a cut node while it was cut off: no new cgroup,
	// no beats from an incarnation it did not hold before.
	for k, at := range watch.end() {
		if at.Before(healAt) {
			t.Errorf("cut node started %s while cut off (%s after the cut)", k, at.Sub(cutAt).Round(time.Millisecond))
		} else {
			t.Logf("rejoined node started %s %s after the heal", k, at.Sub(healAt).Round(time.Millisecond))
		}
	}
	for id, m := range b.spans {
		for inc, s := range m {
			for node := range s.nodes {
				if inGroup[node] && !allowed[fmt.Sprintf("%s/%s.%d", node, id, inc)] && s.first >= cutAt.UnixNano() && s.first <= healAt.UnixNano() {
					t.Errorf("%s incarnation %d began beating on cut node %s at %s, while cut off (%s to %s)",
						id, inc, node, ptTS(s.first), ptTS(cutAt.UnixNano()), ptTS(healAt.UnixNano()))
				}
			}
		}
	}

	// The evidence: fenced before replaced.
	ov := b.overlaps()
	ptErrors(t, ov)
	var lastOld, firstNew int64
	var gaps []time.Duration
	for id, old := range lost {
		o := b.spans[id][old.Incarnation]
		var next *ptSpan
		for inc, s := range b.spans[id] {
			if inc > old.Incarnation && (next == nil || s.first < next.first) {
				next = s
			}
		}
		if o == nil || next == nil {
			t.Errorf("%s: no beats from incarnation %d (%v) or from a later one (%v)", id, old.Incarnation, o != nil, next != nil)
			continue
		}
		lastOld, firstNew = max(lastOld, o.last), ptMinNZ(firstNew, next.first)
		gaps = append(gaps, time.Duration(next.first-o.last))
	}
	for _, c := range churn {
		if strict {
			t.Error(c)
		} else {
			t.Log("shim bug (collateral churn on the majority): " + c)
		}
	}
	slices.Sort(gaps)
	ms := func(d time.Duration) string { return d.Round(time.Millisecond).String() }
	t.Logf("cut at %s: all %d fenced PIDs dead after %s (last beat of a fenced incarnation %s after the cut); "+
		"marked down after %s; all replacements running after %s (first beat of a replacement %s after the cut)",
		ptTS(cutAt.UnixNano()), len(lostPIDs), ms(lastDeath.Sub(cutAt)), ms(time.Duration(lastOld-cutAt.UnixNano())),
		ms(downAt.Sub(cutAt)), ms(movedAt.Sub(cutAt)), ms(time.Duration(firstNew-cutAt.UnixNano())))
	if len(gaps) > 0 {
		t.Logf("per-id gap between the last beat of the fenced and the first of the replacement: min %s, median %s, max %s",
			ms(gaps[0]), ms(gaps[len(gaps)/2]), ms(gaps[len(gaps)-1]))
	}
	t.Logf("healed after a %s cut: up again after %s, one incarnation per id everywhere after %s; "+
		"%d beat lines so far, %d overlapping incarnations; %d churn events on the majority",
		ms(healAt.Sub(cutAt)), ms(upAt.Sub(healAt)), ms(settledAt.Sub(healAt)), b.lines, len(ov), len(churn))
	for _, d := range group {
		for _, line := range ptLogLines(d, cutAt, "fenced every local process", "lease regained") {
			t.Logf("%s: %s", d.name, line)
		}
	}
	for _, d := range l.nodes {
		if !ptRunning(d) {
			t.Errorf("%s: shimd is not running", d.name)
		}
	}
}

// ptReplaced reports whether every lost process runs on the majority with a
// newer incarnation and a live PID, and the others are still there.
func ptReplaced(recs []*pb.ProcessRecord, lost, stayed map[string]*pb.ProcessRecord, inGroup map[string]bool) bool {
	if len(recs) != len(lost)+len(stayed) {
		return false
	}
	for _, r := range recs {
		if old := lost[r.Id]; old != nil {
			if inGroup[r.Node] || r.Incarnation <= old.Incarnation || r.State != pb.ProcessState_PROCESS_STATE_RUNNING ||
				r.Pid <= 0 || !alive(int(r.Pid)) {
				return false
			}
		} else if stayed[r.Id] == nil {
			return false
		}
	}
	return true
}

// ptOnePerID explains why recs is not exactly n running processes with one
// live incarnation each, or returns "".
func ptOnePerID(recs []*pb.ProcessRecord, n int) string {
	seen := map[string]bool{}
	for _, r := range recs {
		if seen[r.Id] {
			return r.Id + " listed twice"
		}
		seen[r.Id] = true
		if r.State != pb.ProcessState_PROCESS_STATE_RUNNING || r.Pid <= 0 || !alive(int(r.Pid)) {
			return fmt.Sprintf("%s is %s on %s, pid %d", r.Id, r.State, r.Node, r.Pid)
		}
	}
	if len(seen) != n {
		return fmt.Sprintf("%d processes, want %d", len(seen), n)
	}
	return ""
}

// ptLoad is the 1-minute load average: the timings depend on it.
func ptLoad() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return "?"
	}
	return f[0]
}

func ptAllDead(pids []int) bool { return len(ptAlive(pids)) == 0 }

func ptAlive(pids []int) []int {
	var out []int
	for _, p := range pids {
		if alive(p) {
			out = append(out, p)
		}
	}
	return out
}

func ptRunning(d *ptNode) bool {
	select {
	case <-d.done:
		return false
	default:
		return true
	}
}

func ptMinNZ(a, b int64) int64 {
	if a == 0 {
		return b
	}
	return min(a, b)
}

func atoiOr(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}

// ptLogLines returns the node's log lines after since that contain any of
// the given strings.
func ptLogLines(d *ptNode, since time.Time, subs ...string) []string {
	b, err := os.ReadFile(filepath.Join(d.dir, "shimd.log"))
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		ts, ok := strings.CutPrefix(line, "time=")
		if !ok {
			continue
		}
		ts, _, _ = strings.Cut(ts, " ")
		at, err := time.Parse(time.RFC3339Nano, ts)
		if err != nil || at.Before(since) {
			continue
		}
		for _, s := range subs {
			if strings.Contains(line, s) {
				out = append(out, line)
				break
			}
		}
	}
	return out
}

// ptErrors reports the first 20 of msgs as errors, and how many there were.
func ptErrors(t *testing.T, msgs []string) {
	t.Helper()
	for i, m := range msgs {
		if i == 20 {
			t.Errorf("... and %d more", len(msgs)-i)
			break
		}
		t.Error(m)
	}
}

// ptWaitFor is waitFor that also says why the condition last failed.
func ptWaitFor(t *testing.T, d time.Duration, what string, cond func() bool, why func() string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s: %s", d, what, why())
		}
		time.Sleep(20 * time.Millisecond)
	}
}
