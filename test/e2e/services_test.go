package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	mdns "github.com/miekg/dns"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/test/report"
)

type endpoint struct {
	ID      string            `json:"id"`
	Node    string            `json:"node"`
	Address string            `json:"address"`
	Replica uint32            `json:"replica"`
	Ports   map[string]uint32 `json:"ports"`
}

func (c *cluster) endpoints(name string) []endpoint {
	c.t.Helper()
	r := c.shim("endpoints", name, "-o", "json")
	if r.code != 0 {
		return nil
	}
	var out []endpoint
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil {
		c.t.Fatalf("endpoints json: %v\n%s", err, r.stdout)
	}
	return out
}

// srv asks the DNS server at addr for _port._tcp.name.shim. and returns
// "node:port" per answer, sorted ("" and the error if it did not answer).
func srv(addr, port, name string) ([]string, error) {
	m := new(mdns.Msg)
	m.SetQuestion("_"+port+"._tcp."+name+".shim.", mdns.TypeSRV)
	r, _, err := (&mdns.Client{Timeout: 2 * time.Second}).Exchange(m, addr)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, rr := range r.Answer {
		s := rr.(*mdns.SRV)
		out = append(out, fmt.Sprintf("%s:%d", strings.TrimSuffix(s.Target, ".node.shim."), s.Port))
	}
	sort.Strings(out)
	return out, nil
}

func epKeys(eps []endpoint, port string) []string {
	var out []string
	for _, e := range eps {
		out = append(out, fmt.Sprintf("%s:%d", strings.ToLower(e.Node), e.Ports[port]))
	}
	sort.Strings(out)
	return out
}

func distinct(eps []endpoint) int {
	seen := map[string]bool{}
	for _, e := range eps {
		seen[e.Node] = true
	}
	return len(seen)
}

// replicas returns the live replicas of name as ps -o json shows them.
func (c *cluster) liveReplicas(name string) []proc {
	var out []proc
	for _, p := range c.ps() {
		if p.Name == name && p.State == "running" {
			out = append(out, p)
		}
	}
	return out
}

// TestServices runs three replicas of python3's http.server on their
// SHIM_PORT_HTTP with an http check: endpoints and each shimd's DNS list
// them, each answers 200, logs come prefixed per replica; scale 5 then 2;
// kill -9 of a node brings three healthy replicas back elsewhere; bad input
// is refused with one line.
func TestServices(t *testing.T) {
	needRoot(t)
	c := startCluster(t, 3)
	c.must("spawn", "--name", "web", "--count", "3", "--port", "http", "--check", "http:http:/",
		"--check-interval", "200ms", "--", "/bin/sh", "-c", "exec python3 -m http.server --bind 127.0.0.1 $SHIM_PORT_HTTP")
	var eps []endpoint
	waitFor(t, 60*time.Second, "3 healthy endpoints on 3 nodes", func() bool {
		eps = c.endpoints("web")
		return len(eps) == 3 && distinct(eps) == 3
	}, func() string { return fmt.Sprint(eps) }, 200*time.Millisecond)
	want := epKeys(eps, "HTTP")
	for _, d := range c.nodes {
		got, err := srv(d.dns, "http", "web")
		if err != nil || !slices.Equal(got, want) {
			t.Fatalf("SRV from %s: %v (%v), want %v", d.name, got, err, want)
		}
	}
	for _, e := range eps {
		resp, err := http.Get(fmt.Sprintf("http://%s:%d/", e.Address, e.Ports["HTTP"]))
		if err != nil {
			t.Fatalf("replica %d: %v", e.Replica, err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("replica %d: %s", e.Replica, resp.Status)
		}
	}
	// ps shows the replicas healthy; logs of the service, prefixed.
	if out := c.must("ps", "web"); strings.Count(out, "running,healthy") != 3 || !strings.Contains(out, "web[2]") {
		t.Errorf("ps web:\n%s", out)
	}
	waitFor(t, 20*time.Second, "every replica's request log in logs web", func() bool {
		out := c.shim("logs", "web").stdout
		for i := range 3 {
			if !strings.Contains(out, fmt.Sprintf("web.%d| ", i)) || !strings.Contains(out, "GET / ") {
				return false
			}
		}
		return true
	})

	// Scale to 5, then 2: spread over the nodes.
	c.must("scale", "web", "5")
	waitFor(t, 60*time.Second, "5 healthy replicas", func() bool { eps = c.endpoints("web"); return len(eps) == 5 },
		func() string { return fmt.Sprint(eps) }, 200*time.Millisecond)
	if distinct(eps) != 3 {
		t.Errorf("5 replicas on %d nodes: %v", distinct(eps), eps)
	}
	c.must("scale", "web", "2")
	waitFor(t, 30*time.Second, "2 running replicas", func() bool { return len(c.liveReplicas("web")) == 2 })
	eps = c.endpoints("web")
	if len(eps) != 2 || distinct(eps) != 2 {
		t.Fatalf("after scale 2: %v", eps)
	}
	c.must("scale", "web", "3")
	waitFor(t, 60*time.Second, "3 healthy endpoints on 3 nodes again", func() bool {
		eps = c.endpoints("web")
		return len(eps) == 3 && distinct(eps) == 3
	}, 200*time.Millisecond)

	// Bad input: one line, non-zero exit, nothing changed.
	before := len(c.ps("-a"))
	for _, bad := range [][]string{
		{"scale", "nope", "2"},
		{"scale", "web", "-1"},
		{"spawn", "--name", "x", "--port", "http", "--check", "http:admin:/", "--", "sleep", "1"},
	} {
		r := c.shim(bad...)
		if r.code == 0 || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
			t.Errorf("shim %v: exit %d, stderr %q: want one line and a failure", bad, r.code, r.stderr)
		}
	}
	c.must("spawn", "--name", "fixed", "--count", "3", "--port", "a:29999", "--", "sleep", "1000")
	before = len(c.ps("-a"))
	if r := c.shim("spawn", "--port", "b:29999", "--", "sleep", "1"); r.code == 0 || !strings.Contains(r.stderr, "29999") {
		t.Errorf("a port taken on every node: exit %d, %q", r.code, r.stderr)
	}
	if n := len(c.ps("-a")); n != before {
		t.Errorf("refused spawn changed the table: %d processes, then %d", before, n)
	}
	c.must("kill", "fixed")

	// Kill -9 the node of replica 0: three healthy replicas again, none
	// on the dead node, in endpoints and in every live shimd's DNS.
	var dead *daemon
	for _, d := range c.nodes[1:] {
		for _, e := range eps {
			if e.Node == d.name {
				dead = d
			}
		}
	}
	killedAt := time.Now()
	c.killNode(dead)
	live := slices.DeleteFunc(slices.Clone(c.nodes), func(d *daemon) bool { return d == dead })
	healthy := func() bool {
		eps = c.endpoints("web")
		if len(eps) != 3 {
			return false
		}
		for _, e := range eps {
			if e.Node == dead.name {
				return false
			}
		}
		return true
	}
	waitFor(t, 30*time.Second, "3 healthy replicas off the dead node", healthy, func() string { return fmt.Sprint(eps) }, 100*time.Millisecond)
	took := time.Since(killedAt)
	want = epKeys(eps, "HTTP")
	for _, d := range live {
		waitFor(t, 5*time.Second, "DNS of "+d.name+" in step", func() bool {
			got, err := srv(d.dns, "http", "web")
			return err == nil && slices.Equal(got, want)
		})
	}
	t.Logf("node death → 3 healthy replicas again after %s", took)
	report.Keep(t, "services", fmt.Sprintf("TestServices: kill -9 of a node with a replica → 3 healthy replicas again (endpoints) after %s (bound 30 s; goal 3 s)", took.Round(time.Millisecond)))

	// resize web resizes every replica in place.
	c.must("resize", "web", "--cpu", "0:1.5")
	out := c.must("ps", "-o", "json", "web")
	if n := strings.Count(out, `"cpu_max": 1.5`); n != 3 {
		t.Errorf("resize web: %d replicas with cpu max 1.5, want 3:\n%s", n, out)
	}

	// kill web stops every replica and forgets the service.
	c.must("kill", "web")
	if r := c.shim("endpoints", "web"); r.code == 0 {
		t.Errorf("endpoints of a killed service: %q", r.stdout)
	}
}

// TestServiceUpdate: a rolling update to a command that exits at once stops
// after the first replica and rolls back, and says so; one to a good command
// replaces every replica with never fewer than N-1 healthy.
func TestServiceUpdate(t *testing.T) {
	needRoot(t)
	c := startCluster(t, 3)
	const n = 3
	server := "exec python3 -m http.server --bind 127.0.0.1 $SHIM_PORT_HTTP"
	c.must("spawn", "--name", "web", "--count", fmt.Sprint(n), "--port", "http", "--check", "http:http:/",
		"--check-interval", "200ms", "--", "/bin/sh", "-c", server)
	var eps []endpoint
	waitFor(t, 60*time.Second, "3 healthy endpoints", func() bool { eps = c.endpoints("web"); return len(eps) == n },
		func() string { return fmt.Sprint(eps) }, 200*time.Millisecond)
	ids := func() []string {
		var out []string
		for _, e := range c.endpoints("web") {
			out = append(out, e.ID)
		}
		sort.Strings(out)
		return out
	}
	before := ids()

	// A command that exits at once: the first new copy fails, the update
	// stops and rolls back; the old replicas never stopped.
	r := c.shim("update", "web", "--healthy-timeout", "30s", "--", "/bin/sh", "-c", "exit 3")
	if r.code == 0 || !strings.Contains(r.stderr, "rolled back") {
		t.Fatalf("bad update: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	if strings.Contains(r.stdout, "replaced by") {
		t.Errorf("bad update replaced a replica:\n%s", r.stdout)
	}
	waitFor(t, 30*time.Second, "the old replicas alone", func() bool { return slices.Equal(ids(), before) && len(c.liveReplicas("web")) == n })

	// A good command: every replica replaced, never fewer than n-1 healthy.
	stop := make(chan struct{})
	low := make(chan int, 1)
	go func() {
		least := n
		api := c.api(c.nodes[0].api)
		for {
			select {
			case <-stop:
				low <- least
				return
			default:
			}
			resp, err := api.Endpoints(context.Background(), connect.NewRequest(&pb.EndpointsRequest{Name: "web"}))
			if err == nil {
				least = min(least, len(resp.Msg.Endpoints))
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	r = c.shim("update", "web", "--env", "VERSION=2", "--", "/bin/sh", "-c", server)
	close(stop)
	least := <-low
	if r.code != 0 || strings.Count(r.stdout, "replaced by") != n {
		t.Fatalf("good update: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	if least < n-1 {
		t.Errorf("during the update only %d replicas were healthy (want at least %d)", least, n-1)
	}
	after := ids()
	if len(after) != n {
		t.Fatalf("after the update: %v", after)
	}
	for _, id := range after {
		if slices.Contains(before, id) {
			t.Errorf("replica %s was not replaced", id)
		}
	}
	out := c.must("ps", "-o", "json", "web")
	if strings.Count(out, "VERSION=2") < n {
		t.Errorf("new replicas lack the new env:\n%s", out)
	}
	// All at once (--parallel n): make-before-break still, every replica
	// replaced, keeping its index.
	r = c.shim("update", "web", "--parallel", fmt.Sprint(n), "--env", "VERSION=3")
	if r.code != 0 || strings.Count(r.stdout, "replaced by") != n {
		t.Fatalf("parallel update: exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	var idx []uint32
	for _, e := range c.endpoints("web") {
		idx = append(idx, e.Replica)
	}
	slices.Sort(idx)
	if !slices.Equal(idx, []uint32{0, 1, 2}) {
		t.Errorf("replica indexes after the updates: %v", idx)
	}
	if out := c.must("services"); !strings.Contains(out, "web") || !strings.Contains(out, fmt.Sprint(n)) {
		t.Errorf("shim services:\n%s", out)
	}
	// Nothing to change is refused.
	if r := c.shim("update", "web", "--env", "VERSION=3"); r.code == 0 || !strings.Contains(r.stderr, "changes nothing") {
		t.Errorf("an update that changes nothing: %+v", r)
	}
}

// TestExec runs commands inside a running process's sandbox: they see its
// PID namespace (PID 1 is the sandbox's), run as its user, in its cgroups,
// and their exit code comes back.
func TestExec(t *testing.T) {
	needRoot(t)
	c := startCluster(t, 2)
	c.must("spawn", "--name", "sl", "--count", "2", "--wait", "--", "/bin/sleep", "100000")
	out := c.must("exec", "sl", "--", "cat", "/proc/1/cmdline")
	// PID 1 is the sandbox's init, which shows the workload it runs:
	// shim-init --config-fd N -- /bin/sleep 100000.
	if !strings.Contains(out, "shim-init") || !strings.Contains(out, "/bin/sleep\x00100000") {
		t.Errorf("PID 1 in the sandbox: %q, want shim-init showing the workload", out)
	}
	t.Logf("/proc/1/cmdline in the sandbox: %q", out)
	if out := strings.TrimSpace(c.must("exec", "sl", "--", "id", "-u")); out != "65534" {
		t.Errorf("exec runs as uid %q, want the workload's 65534", out)
	}
	var id string
	for _, p := range c.ps() {
		if p.Name == "sl" {
			id = p.ID
		}
	}
	// In the sandbox's cgroup namespace too: its cgroups read as its PID 1's.
	self, init := c.must("exec", id, "--", "cat", "/proc/self/cgroup"), c.must("exec", id, "--", "cat", "/proc/1/cgroup")
	if self != init || self == "" {
		t.Errorf("exec's cgroups:\n%s\nthe sandbox's:\n%s", self, init)
	}
	if r := c.shim("exec", "sl", "--", "sh", "-c", "echo out; echo err >&2; exit 7"); r.code != 7 || r.stdout != "out\n" || r.stderr != "err\n" {
		t.Errorf("exit code and streams: %+v", r)
	}
	if out := c.must("exec", "-t", "sl", "--", "sh", "-c", "test -t 0 && test -t 1 && echo tty"); strings.TrimSpace(out) != "tty" {
		t.Errorf("exec -t: the command has no terminal: %q", out)
	}
	// Through every member, into every replica: the call reaches the
	// process's node from wherever it lands.
	for _, d := range c.nodes {
		for _, p := range c.ps() {
			if r := c.shimAt(d.api, "exec", p.ID, "--", "cat", "/proc/self/environ"); r.code != 0 || !strings.Contains(r.stdout, "SHIM_PROCESS_ID="+p.ID) {
				t.Errorf("exec %s through %s: %+v", p.ID, d.name, r)
			}
		}
	}
	// The operator role at least: a read token may not.
	tok := strings.Fields(c.must("token", "create", "--role", "read"))
	r := runCLI(t, []string{"SHIM_DATA_DIR=" + c.dataDir(), "SHIM_TOKEN=" + tok[len(tok)-1]}, "--addr", c.addrs(), "exec", "sl", "--", "true")
	if r.code == 0 || !strings.Contains(r.stderr, "may not") {
		t.Errorf("exec with a read token: %+v", r)
	}
	if r := c.shim("exec", "nope", "--", "true"); r.code == 0 || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 {
		t.Errorf("exec into an unknown process: %+v", r)
	}
}

// TestHealthRestart: a replica whose check never passes is unhealthy in ps,
// no endpoint, and is restarted once unhealthy for --check-restart.
func TestHealthRestart(t *testing.T) {
	needRoot(t)
	c := startCluster(t, 1)
	// It listens on nothing: the tcp check fails.
	c.must("spawn", "--name", "deaf", "--count", "1", "--port", "http", "--check", "tcp:http",
		"--check-interval", "100ms", "--check-restart", "1s", "--", "/bin/sleep", "100000")
	waitFor(t, 20*time.Second, "unhealthy in ps", func() bool {
		return strings.Contains(c.shim("ps", "deaf").stdout, "running,unhealthy")
	})
	if eps := c.endpoints("deaf"); len(eps) != 0 {
		t.Errorf("an unhealthy replica is an endpoint: %v", eps)
	}
	waitFor(t, 30*time.Second, "a restart of the unhealthy replica", func() bool {
		for _, p := range c.ps() {
			if p.Name == "deaf" && p.Restarts > 0 {
				return true
			}
		}
		return false
	})
}

// TestWorkerServices: a worker (no table) answers DNS from the servers,
// runs replicas, and takes exec and update calls.
func TestWorkerServices(t *testing.T) {
	needRoot(t)
	c := startCluster(t, 1)
	w := &daemon{name: c.nodes[0].name + "-sw", api: freePort(t), dir: t.TempDir(), dns: freePort(t)}
	w.args = append([]string{"--name", w.name, "--data-dir", w.dir, "--api", w.api, "--role", "worker",
		"--dns", w.dns, "--port-range", "29000-29999"}, c.joinArgs()...)
	c.nodes = append(c.nodes, w)
	c.start(w)
	c.waitNodesUp(2, 15*time.Second)
	c.must("spawn", "--name", "web", "--count", "2", "--port", "http", "--check", "http:http:/",
		"--check-interval", "200ms", "--", "/bin/sh", "-c", "exec python3 -m http.server --bind 127.0.0.1 $SHIM_PORT_HTTP")
	var eps []endpoint
	waitFor(t, 60*time.Second, "2 healthy endpoints on 2 nodes", func() bool {
		eps = c.endpoints("web")
		return len(eps) == 2 && distinct(eps) == 2
	}, func() string { return fmt.Sprint(eps) }, 200*time.Millisecond)
	want := epKeys(eps, "HTTP")
	waitFor(t, 5*time.Second, "the worker's DNS", func() bool {
		got, err := srv(w.dns, "http", "web")
		return err == nil && slices.Equal(got, want)
	})
	// Exec and update through the worker's API.
	for _, e := range eps {
		if r := c.shimAt(w.api, "exec", e.ID, "--", "cat", "/proc/self/environ"); r.code != 0 || !strings.Contains(r.stdout, "SHIM_PROCESS_ID="+e.ID) {
			t.Errorf("exec into %s (on %s) through the worker: %+v", e.ID, e.Node, r)
		}
	}
	if r := c.shimAt(w.api, "update", "web", "--env", "V=2"); r.code != 0 || strings.Count(r.stdout, "replaced by") != 2 {
		t.Errorf("update through the worker: %+v", r)
	}
	if r := c.shimAt(w.api, "scale", "web", "1"); r.code != 0 {
		t.Errorf("scale through the worker: %+v", r)
	}
}

// TestAutoscale: a service spawned with --count 1:2 whose replica sits at
// its maximum CPU grant is scaled out to 2 by the leader.
func TestAutoscale(t *testing.T) {
	needRoot(t)
	c := startCluster(t, 1)
	c.must("spawn", "--name", "hot", "--count", "1:2", "--grow", "--cpu", "0.05:0.2", "--",
		"/usr/bin/python3", "-c", "while True: pass")
	waitFor(t, 90*time.Second, "a second replica", func() bool { return len(c.liveReplicas("hot")) == 2 }, time.Second)
	if out := c.must("services"); !strings.Contains(out, "hot") || !strings.Contains(out, " 2 ") {
		t.Errorf("shim services:\n%s", out)
	}
	out := c.must("events", "--type", "service.")
	if !strings.Contains(out, "hot: 1→2") {
		t.Errorf("no scale-out event:\n%s", out)
	}
}
