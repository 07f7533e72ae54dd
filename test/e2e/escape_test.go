package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// escapeScript is what a hostile workload tries against shimd's API on
// $SHIM_ADDR (with curl, as any workload could), printing the HTTP status
// of each attempt (000: not even connected), and against the node's files.
// $NB is a neighbour's id, $DATA the node's data dir.
const escapeScript = `api() { # api PROCEDURE JSON [TOKEN]
  curl -s -o /dev/null -w '%{http_code}' --max-time 5 --cacert "$SHIM_CA" -H 'Content-Type: application/json' \
    ${3:+-H "Authorization: Bearer $3"} -d "$2" "https://$SHIM_ADDR/shim.v1.ShimService/$1"
}
echo token=$(test -n "$SHIM_TOKEN" && echo yes || echo no)
echo spawn_notoken=$(api Spawn '{"spec":{"command":["/bin/true"]}}')
echo spawn_self=$(api Spawn '{"spec":{"command":["/bin/true"]}}' "$SHIM_TOKEN")
echo resize_neighbour=$(api Resize '{"id":"'$NB'","resources":{"memMinBytes":"2097152"}}' "$SHIM_TOKEN")
echo list_neighbour=$(api List '{"ids":["'$NB'"]}' "$SHIM_TOKEN")
echo kill_neighbour=$(api Kill '{"ids":["'$NB'"]}' "$SHIM_TOKEN")
echo resize_self=$(api Resize '{"id":"'$SHIM_PROCESS_ID'","resources":{"memMinBytes":"8388608"}}' "$SHIM_TOKEN")
echo nblog=$(cat "$DATA/logs/$NB.log" >/dev/null 2>&1 && echo read || echo denied)
echo datadir=$(test -e "$DATA/LOCK" || test -e "$DATA/raft" && echo seen || echo denied)
echo end=1
exec sleep 100000`

// TestEscapeAPI is the API half of the escape suite (issue 12; the
// kernel's half is exec's): from inside real workloads, in every isolation
// a user gets (process, container, vm), with trust on, a workload reaches
// shimd's API on $SHIM_ADDR and can do nothing there but read its own
// record and resize itself within its bounds; it cannot read a neighbour's
// log or the data dir. Then the API's own refusals: paths outside the
// sandbox, root and host isolation for an operator, logs of a path on a
// worker; each one line, and the table unchanged.
func TestEscapeAPI(t *testing.T) {
	c := startNode(t)
	data := c.nodes[0].dir
	nb := c.spawn("--name", "neighbour", "--mem", "1M:64M", "--", "/bin/sleep", "100000")
	c.waitRunning(nb)
	modes := []string{"process", "container"}
	if c.nodeVMs() == "yes" {
		modes = append(modes, "vm")
	} else {
		t.Logf("no vm case: the node says %q", c.nodeVMs())
	}
	for _, mode := range modes {
		args := []string{"--name", "escape-" + mode, "--isolation", mode, "--mem", "1M:512M", "--restart", "never",
			"--env", "NB=" + nb, "--env", "DATA=" + data}
		if mode == "vm" {
			args = append(args, "--cpu", "1:1", "--mem", "256M:512M")
		}
		id := c.spawn(append(args, "--", "/bin/sh", "-c", escapeScript)...)
		var out string
		waitFor(t, 60*time.Second, mode+" workload's attempts", func() bool {
			out = c.shim("logs", id).stdout
			return strings.Contains(out, "end=1")
		}, func() string { return out })
		f := fields(out)
		want := map[string]string{
			"token": "yes", "spawn_notoken": "401", "spawn_self": "403", "resize_neighbour": "403",
			"list_neighbour": "403", "kill_neighbour": "403", "resize_self": "200", "nblog": "denied", "datadir": "denied",
		}
		if mode == "vm" {
			// The guest has no network at all (lo only): nothing reaches
			// the API.
			for _, k := range []string{"spawn_notoken", "spawn_self", "resize_neighbour", "list_neighbour", "kill_neighbour", "resize_self"} {
				want[k] = "000"
			}
		}
		for k, v := range want {
			if f[k] != v {
				t.Errorf("%s: %s = %q, want %q", mode, k, f[k], v)
			}
		}
		if mode != "vm" {
			// Its own resize took: the record and the cgroup's soft limit.
			p := c.waitProc(id, "resized", 10*time.Second, func(proc) bool { return c.memMin(id) == 8<<20 })
			soft := readInt(t, filepath.Join(cgFile(t, p.PID, "memory", ""), "memory.soft_limit_in_bytes"))
			if soft != fmt.Sprint(8<<20) {
				t.Errorf("%s: soft limit %s after resizing itself, want %d", mode, soft, 8<<20)
			}
		}
		if t.Failed() || testing.Verbose() {
			t.Logf("%s output:\n%s", mode, out)
		}
		c.must("kill", "--signal", "KILL", id)
	}
	if got := c.memMin(nb); got != 1<<20 {
		t.Errorf("the neighbour's minimum is %d after the attempts, want %d", got, 1<<20)
	}
	if p, _ := c.get(nb); p.State != "running" {
		t.Errorf("the neighbour is %s", p.State)
	}
}

// TestEscapeAPIRefusals: what the API refuses whoever runs the CLI (paths
// outside the sandbox) and what it refuses an operator (root, no sandbox),
// and logs of a path asked of a worker: one line each, through the CLI and
// the API, and the table unchanged.
func TestEscapeAPIRefusals(t *testing.T) {
	c := startCluster(t, 1)
	w := c.addWorker()
	before := c.must("ps", "-a", "-o", "json")
	opTok := strings.TrimSpace(lastLine(c.must("token", "create", "--role", "operator")))
	for _, k := range []struct {
		what, want string
		args       []string
		token      string
	}{
		{"--dir /etc", "outside the sandbox's own folders", []string{"--dir", "/etc"}, ""},
		{"--dir ../x", "absolute, clean", []string{"--dir", "../x"}, ""},
		{"--rootfs /", "want NAME[/SUB]", []string{"--isolation", "container", "--rootfs", "/"}, ""},
		{"--user 0 by an operator", "permission denied", []string{"--user", "0"}, opTok},
		{"--user 0:0 by an operator", "permission denied", []string{"--user", "00:0"}, opTok},
		{"--isolation host by an operator", "permission denied", []string{"--isolation", "host"}, opTok},
		{"--mount by an operator", "permission denied", []string{"--mount", "data:/data"}, opTok},
		{"--mount of a host path nobody offers", "no up node offers", []string{"--mount", "data:/data"}, ""},
	} {
		args := append([]string{"spawn"}, k.args...)
		args = append(args, "--", "/bin/true")
		if k.token != "" {
			args = append([]string{"--token", k.token}, args...)
		}
		r := c.shim(args...)
		if r.code == 0 || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 || !strings.Contains(r.stderr, k.want) {
			t.Errorf("CLI %s: exit %d, stderr %q; want one line with %q", k.what, r.code, r.stderr, k.want)
		}
	}
	// The same through the API, past the CLI's own checks.
	ctx := context.Background()
	api := c.api(c.nodes[0].api)
	op := c.userAPI(c.nodes[0].api, opTok)
	for _, k := range []struct {
		what   string
		spec   *pb.ProcessSpec
		client interface {
			Spawn(context.Context, *connect.Request[pb.SpawnRequest]) (*connect.Response[pb.SpawnResponse], error)
		}
		code connect.Code
	}{
		{"--dir /etc", &pb.ProcessSpec{Dir: "/etc"}, api, connect.CodeInvalidArgument},
		{"--dir ../x", &pb.ProcessSpec{Dir: "../x"}, api, connect.CodeInvalidArgument},
		{"--rootfs /", &pb.ProcessSpec{Rootfs: "/", Isolation: pb.Isolation_ISOLATION_CONTAINER}, api, connect.CodeInvalidArgument},
		{"--user 0", &pb.ProcessSpec{User: "0"}, op, connect.CodePermissionDenied},
		{"--isolation host", &pb.ProcessSpec{Isolation: pb.Isolation_ISOLATION_HOST}, op, connect.CodePermissionDenied},
	} {
		k.spec.Command = []string{"/bin/true"}
		_, err := k.client.Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: k.spec}))
		if connect.CodeOf(err) != k.code || strings.Contains(err.Error(), "\n") {
			t.Errorf("API %s: %v, want one line of %s", k.what, err, k.code)
		}
	}
	// Logs of a path, asked of a worker (which once served any *.log).
	for _, ref := range []string{"../../../../var/log/dpkg", "../../x"} {
		r := c.shimAt(w.api, "logs", ref)
		if r.code == 0 || r.stdout != "" || strings.Count(strings.TrimSpace(r.stderr), "\n") != 0 || !strings.Contains(r.stderr, "not a process id") {
			t.Errorf("logs %s on a worker: exit %d, stdout %q, stderr %q", ref, r.code, tail(r.stdout, 200), r.stderr)
		}
	}
	if after := c.must("ps", "-a", "-o", "json"); after != before {
		t.Errorf("refused calls changed the table:\n%s\n%s", before, after)
	}
}

// fields reads a workload's "key=value" lines.
func fields(out string) map[string]string {
	f := map[string]string{}
	for _, l := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(l, "="); ok {
			f[k] = strings.TrimSpace(v)
		}
	}
	return f
}

// memMin is the memory minimum the table holds for id.
func (c *cluster) memMin(id string) int64 {
	c.t.Helper()
	r, err := c.api(c.nodes[0].api).List(context.Background(), connect.NewRequest(&pb.ListRequest{Ids: []string{id}, All: true}))
	if err != nil || len(r.Msg.Processes) != 1 {
		c.t.Fatalf("list %s: %v", id, err)
	}
	return r.Msg.Processes[0].Spec.GetResources().GetMemMinBytes()
}

// nodeVMs says whether the first node runs VMs: "yes", or why not.
func (c *cluster) nodeVMs() string {
	c.t.Helper()
	out := c.must("nodes", "-o", "json")
	i := strings.Index(out, `"vms": "`)
	if i < 0 {
		c.t.Fatalf("nodes: no vms field:\n%s", out)
	}
	rest := out[i+len(`"vms": "`):]
	return rest[:strings.IndexByte(rest, '"')]
}

// addWorker starts a worker that joins the cluster and waits for it.
func (c *cluster) addWorker() *daemon {
	c.t.Helper()
	d := &daemon{name: c.nodes[0].name + "-w", api: freePort(c.t), dir: c.t.TempDir()}
	d.args = append([]string{"--name", d.name, "--data-dir", d.dir, "--api", d.api, "--role", "worker"}, c.joinArgs()...)
	c.nodes = append(c.nodes, d)
	c.start(d)
	c.waitNodesUp(len(c.nodes), 15*time.Second)
	return d
}
