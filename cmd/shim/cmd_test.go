package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

// fakeServer is an in-memory ShimService; requests reach it through
// handlerClient, so the tests open no sockets.
type fakeServer struct {
	shimv1connect.UnimplementedShimServiceHandler
	mu       sync.Mutex
	procs    []*pb.ProcessRecord
	nodes    []*pb.NodeStatus
	logs     []string
	spawnReq *pb.SpawnRequest
	killReq  *pb.KillRequest
	resize   *pb.ResizeRequest
	drain    *pb.DrainRequest
	logsReq  *pb.LogsRequest
	listReqs []*pb.ListRequest
	// after spawn, List returns the spawned records in this state
	spawnState pb.ProcessState
	// tokens (creds_test.go)
	createReq *pb.CreateTokenRequest
	lastToken string
	tokens    []*pb.TokenRecord
	revoked   string
	// growth (grow_test.go)
	grantReq  *pb.SetGrantRequest
	eventsReq *pb.EventsRequest
}

func notFound(ref string) error {
	return connect.NewError(connect.CodeNotFound, fmt.Errorf("not found: no process %q", ref))
}

func (f *fakeServer) Spawn(_ context.Context, r *connect.Request[pb.SpawnRequest]) (*connect.Response[pb.SpawnResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.spawnReq = r.Msg
	resp := &pb.SpawnResponse{}
	for i := range max(r.Msg.Count, 1) {
		rec := &pb.ProcessRecord{Id: fmt.Sprintf("p%d", i+1), Spec: r.Msg.Spec, State: pb.ProcessState_PROCESS_STATE_STARTING}
		resp.Processes = append(resp.Processes, rec)
		done := proto.Clone(rec).(*pb.ProcessRecord)
		done.State, done.Reason, done.ExitCode = f.spawnState, "exec: no such file", 127
		f.procs = append(f.procs, done)
	}
	return connect.NewResponse(resp), nil
}

func (f *fakeServer) List(_ context.Context, r *connect.Request[pb.ListRequest]) (*connect.Response[pb.ListResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.listReqs = append(f.listReqs, r.Msg)
	var out []*pb.ProcessRecord
	for _, ref := range r.Msg.Ids {
		found := false
		for _, p := range f.procs {
			if p.Id == ref || p.Spec.GetName() == ref {
				out, found = append(out, p), true
			}
		}
		if !found {
			return nil, notFound(ref)
		}
	}
	if len(r.Msg.Ids) == 0 {
		out = f.procs
	}
	return connect.NewResponse(&pb.ListResponse{Processes: out, Index: uint64(len(f.listReqs))}), nil
}

func (f *fakeServer) Nodes(context.Context, *connect.Request[pb.NodesRequest]) (*connect.Response[pb.NodesResponse], error) {
	return connect.NewResponse(&pb.NodesResponse{Nodes: f.nodes}), nil
}

func (f *fakeServer) Kill(_ context.Context, r *connect.Request[pb.KillRequest]) (*connect.Response[pb.KillResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.killReq = r.Msg
	resp := &pb.KillResponse{}
	for _, id := range r.Msg.Ids {
		resp.Processes = append(resp.Processes, &pb.ProcessRecord{Id: id + "-full"})
	}
	return connect.NewResponse(resp), nil
}

func (f *fakeServer) Resize(_ context.Context, r *connect.Request[pb.ResizeRequest]) (*connect.Response[pb.ResizeResponse], error) {
	f.resize = r.Msg
	rec := &pb.ProcessRecord{Id: r.Msg.Id, Node: "n1", Spec: &pb.ProcessSpec{Resources: &pb.Resources{
		CpuMinMilli: 500, CpuMaxMilli: 2000, MemMaxBytes: 256 << 20}}}
	return connect.NewResponse(&pb.ResizeResponse{Process: rec}), nil
}

func (f *fakeServer) Drain(_ context.Context, r *connect.Request[pb.DrainRequest]) (*connect.Response[pb.DrainResponse], error) {
	f.drain = r.Msg
	n := &pb.NodeRecord{Name: r.Msg.Node, State: pb.NodeState_NODE_STATE_UP, Draining: !r.Msg.Undrain}
	return connect.NewResponse(&pb.DrainResponse{Node: n}), nil
}

func (f *fakeServer) Logs(_ context.Context, r *connect.Request[pb.LogsRequest], s *connect.ServerStream[pb.LogsChunk]) error {
	f.logsReq = r.Msg
	if r.Msg.Id != "p1" {
		return notFound(r.Msg.Id)
	}
	for _, l := range f.logs {
		if err := s.Send(&pb.LogsChunk{Data: []byte(l)}); err != nil {
			return err
		}
	}
	return nil
}

// handlerClient serves requests with an http.Handler in process.
type handlerClient struct{ h http.Handler }

func (c handlerClient) Do(req *http.Request) (*http.Response, error) {
	rec := httptest.NewRecorder()
	c.h.ServeHTTP(rec, req)
	return rec.Result(), nil
}

// downClient fails like a closed port.
type downClient struct{}

func (downClient) Do(req *http.Request) (*http.Response, error) {
	return nil, &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
}

type result struct {
	code        int
	out, errOut string
}

// runShim runs the CLI against f; addresses whose host is "down" refuse
// connections. dialed records the base URLs used.
func runShim(t *testing.T, f *fakeServer, env string, args ...string) (result, []string) {
	t.Helper()
	var out, errOut bytes.Buffer
	a := newApp(&out, &errOut)
	a.getenv = func(k string) string {
		if k == "SHIM_ADDR" {
			return env
		}
		return ""
	}
	a.now = func() time.Time { return t0.Add(time.Minute) }
	a.newRequestID = func() string { return "rid1" }
	var dialed []string
	_, h := shimv1connect.NewShimServiceHandler(f)
	a.dial = func(base string) (shimv1connect.ShimServiceClient, error) {
		dialed = append(dialed, base)
		var c connect.HTTPClient = handlerClient{h}
		if strings.Contains(base, "down") {
			c = downClient{}
		}
		return shimv1connect.NewShimServiceClient(c, base), nil
	}
	code := a.execute(context.Background(), args)
	if errOut.Len() > 0 && (strings.Count(errOut.String(), "\n") != 1 || !strings.HasPrefix(errOut.String(), "shim: ")) {
		t.Errorf("shim %q: stderr is not one 'shim: ' line: %q", args, errOut.String())
	}
	return result{code, out.String(), errOut.String()}, dialed
}

func TestUsageErrors(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"ps", "--bogus"}, "shim: unknown flag: --bogus\n"},
		{[]string{"spawn", "--"}, "shim: missing command (usage: shim spawn [flags] -- CMD [ARG...])\n"},
		{[]string{"spawn"}, "shim: missing command (usage: shim spawn [flags] -- CMD [ARG...])\n"},
		{[]string{"spawn", "--mem", "12X", "--", "sleep", "1"}, "shim: invalid --mem \"12X\": unknown unit \"X\" (use K, M, G or T)\n"},
		{[]string{"spawn", "--cpu", "-1", "--", "x"}, "shim: invalid --cpu \"-1\": negative value\n"},
		{[]string{"spawn", "--cpu", "2:1", "--", "x"}, "shim: invalid --cpu \"2:1\": min 2 exceeds max 1\n"},
		{[]string{"spawn", "--mem", "1G:1M", "--", "x"}, "shim: invalid --mem \"1G:1M\": min 1G exceeds max 1M\n"},
		{[]string{"spawn", "--cpu", "0.5::2", "--", "x"}, "shim: cpu burst needs a cpu max\n"},
		{[]string{"spawn", "--name", "a b", "--", "x"}, "shim: name \"a b\" may hold only letters, digits, '.', '_' and '-'\n"},
		{[]string{"spawn", "--restart", "maybe", "--", "x"}, "shim: invalid --restart \"maybe\": use always, on-failure or never\n"},
		{[]string{"spawn", "--count", "0", "--", "x"}, "shim: invalid --count \"0\": must be 1-10000\n"},
		{[]string{"spawn", "--pids", "-3", "--", "x"}, "shim: invalid --pids \"-3\": negative value\n"},
		{[]string{"spawn", "--dir", "/etc", "--", "x"}, "shim: working directory /etc is outside the sandbox's own folders (/work, /tmp) and its mounts\n"},
		{[]string{"spawn", "--dir", "../x", "--", "x"}, "shim: working directory \"../x\" must be an absolute, clean path (a process may run on another host than the CLI's)\n"},
		{[]string{"spawn", "--isolation", "container", "--rootfs", "/", "--", "x"}, "shim: root file system \"/\": want NAME[/SUB], a host path the node declares (shimd --host-path NAME=DIR) or a folder in it\n"},
		{[]string{"spawn", "--mount", "data", "--", "x"}, "shim: invalid --mount \"data\": use NAME:PATH[:ro], NAME a host path the node declares\n"},
		{[]string{"kill"}, "shim: shim kill needs at least one process ID (usage: shim kill [--signal SIG] ID...)\n"},
		{[]string{"kill", "--signal", "NOPE", "x"}, "shim: invalid --signal \"NOPE\": unknown signal (use a name like TERM, KILL, INT, HUP or a number)\n"},
		{[]string{"ps", "-o", "yaml"}, "shim: invalid --output \"yaml\": use table, json, wide\n"},
		{[]string{"resize", "x"}, "shim: nothing to change: give --cpu, --mem or --pids\n"},
		{[]string{"drain"}, "shim: shim drain needs one node name (usage: shim drain NODE)\n"},
		{[]string{"spwn"}, "shim: unknown command \"spwn\" for \"shim\" (did you mean spawn?)\n"},
		{[]string{"--timeout", "soon", "ps"}, "shim: invalid argument \"soon\" for \"--timeout\" flag: time: invalid duration \"soon\"\n"},
		{[]string{"--addr", "a:b:c", "ps"}, "shim: invalid --addr \"a:b:c\": use HOST:PORT\n"},
	} {
		f := &fakeServer{}
		r, dialed := runShim(t, f, "", c.args...)
		if r.code != 2 || r.errOut != c.want || r.out != "" {
			t.Errorf("shim %q = exit %d, stderr %q; want exit 2, %q", c.args, r.code, r.errOut, c.want)
		}
		if len(dialed) > 0 || f.spawnReq != nil {
			t.Errorf("shim %q contacted the server", c.args)
		}
	}
}

// TestSpawnFixedSize: one value is a fixed size (min = max), and spawn
// says so.
func TestSpawnFixedSize(t *testing.T) {
	for _, c := range []struct {
		args           []string
		cpuMin, cpuMax int64
		memMin, memMax int64
		said           string
	}{
		{[]string{"--cpu", "1", "--mem", "64M"}, 1000, 1000, 64 << 20, 64 << 20,
			"shim: spawn set cpu 1 (fixed: min = max); memory 64M (fixed: min = max)\n"},
		{[]string{"--cpu", "0.5:", "--mem", ":1G"}, 500, 0, 0, 1 << 30,
			"shim: spawn set cpu min 0.5, no max; memory max 1G, no min\n"},
		{nil, 0, 0, 0, 0, ""},
	} {
		f := &fakeServer{}
		r, _ := runShim(t, f, "", append(append([]string{"spawn"}, c.args...), "--", "sleep", "1")...)
		res := f.spawnReq.GetSpec().GetResources()
		if r.code != 0 || r.errOut != c.said || res.GetCpuMinMilli() != c.cpuMin || res.GetCpuMaxMilli() != c.cpuMax ||
			res.GetMemMinBytes() != c.memMin || res.GetMemMaxBytes() != c.memMax {
			t.Errorf("spawn %q = %+v, resources %v", c.args, r, res)
		}
	}
}

func TestSpawn(t *testing.T) {
	f := &fakeServer{}
	r, _ := runShim(t, f, "", "spawn", "--name", "web", "--cpu", "0.5:1:2", "--mem", "64M:128Mi", "--pids", "50",
		"--restart", "never", "-e", "A=1,2", "--env", "B=x", "--node", "n1", "--count", "2", "--isolation", "container",
		"--net", "none", "--user", "1000:1000", "--rootfs", "images/root", "--dir", "/tmp", "--mount", "data:/data:ro",
		"--mount", "scratch:/scratch", "--", "sleep", "10", "--name")
	if r.code != 0 || r.out != "p1\np2\n" || r.errOut != "shim: spawn set cpu 0.5 to 1, burst 2; memory 64M to 128M\n" {
		t.Fatalf("spawn = %+v", r)
	}
	want := &pb.SpawnRequest{Count: 2, Spec: &pb.ProcessSpec{
		Name: "web", Command: []string{"sleep", "10", "--name"}, Env: []string{"A=1,2", "B=x"},
		Resources: &pb.Resources{CpuMinMilli: 500, CpuMaxMilli: 1000, CpuBurstMilli: 2000,
			MemMinBytes: 64 << 20, MemMaxBytes: 128 << 20, PidsMax: 50},
		Restart: pb.RestartPolicy_RESTART_POLICY_NEVER, Node: "n1", Dir: "/tmp",
		Isolation: pb.Isolation_ISOLATION_CONTAINER, Network: pb.Network_NETWORK_NONE,
		User: "1000:1000", Rootfs: "images/root",
		Mounts: []*pb.Mount{{Name: "data", Path: "/data", ReadOnly: true}, {Name: "scratch", Path: "/scratch"}},
	}, RequestId: "rid1", Service: true} // --name with --count: a service
	if !proto.Equal(f.spawnReq, want) {
		t.Errorf("spawn request\n got %v\nwant %v", f.spawnReq, want)
	}

	// Without --, everything after the command belongs to it.
	f = &fakeServer{}
	r, _ = runShim(t, f, "", "spawn", "ls", "-la")
	if r.code != 0 || fmt.Sprint(f.spawnReq.Spec.Command) != "[ls -la]" || f.spawnReq.Spec.Resources.CpuMinMilli != 0 {
		t.Errorf("spawn ls -la = %+v, %v", r, f.spawnReq)
	}
}

func TestSpawnWait(t *testing.T) {
	f := &fakeServer{spawnState: pb.ProcessState_PROCESS_STATE_FAILED}
	r, _ := runShim(t, f, "", "spawn", "--wait", "--", "nosuch")
	if r.code != 1 || r.out != "p1\n" || r.errOut != "shim: process p1 failed: exec: no such file\n" {
		t.Errorf("spawn --wait (failed) = %+v", r)
	}
	f = &fakeServer{spawnState: pb.ProcessState_PROCESS_STATE_RUNNING}
	r, _ = runShim(t, f, "", "spawn", "--wait", "--count", "2", "--", "sleep", "1")
	if r.code != 0 || r.out != "p1\np2\n" || len(f.listReqs) != 1 || !f.listReqs[0].All {
		t.Errorf("spawn --wait (running) = %+v, lists %v", r, f.listReqs)
	}
	f = &fakeServer{spawnState: pb.ProcessState_PROCESS_STATE_EXITED}
	r, _ = runShim(t, f, "", "spawn", "--wait", "--", "false")
	if r.code != 1 || r.errOut != "shim: process p1 exited with code 127: exec: no such file\n" {
		t.Errorf("spawn --wait (exited) = %+v", r)
	}
}

func TestPs(t *testing.T) {
	f := &fakeServer{}
	r, _ := runShim(t, f, "", "ps", "-o", "json")
	if r.code != 0 || r.out != "[]\n" {
		t.Errorf("ps -o json (empty) = %+v", r)
	}
	f.procs = []*pb.ProcessRecord{sampleRecord()}
	r, _ = runShim(t, f, "", "ps", "-o", "json", "web")
	var got []map[string]any
	if err := json.Unmarshal([]byte(r.out), &got); err != nil || len(got) != 1 || got[0]["id"] != "p1a2b3" {
		t.Errorf("ps -o json web = %+v (%v)", r, err)
	}
	if last := f.listReqs[len(f.listReqs)-1]; !last.All || fmt.Sprint(last.Ids) != "[web]" {
		t.Errorf("ps web sent %v", last)
	}
	r, _ = runShim(t, f, "", "ps")
	if r.code != 0 || !strings.HasPrefix(r.out, "ID ") || !strings.Contains(r.out, "p1a2b3  web") {
		t.Errorf("ps = %+v", r)
	}
	r, _ = runShim(t, f, "", "ps", "xyz")
	if r.code != 1 || r.errOut != "shim: no process \"xyz\"\n" || r.out != "" {
		t.Errorf("ps xyz = %+v", r)
	}
}

func TestFailover(t *testing.T) {
	f := &fakeServer{}
	r, dialed := runShim(t, f, "down:1,http://up:2", "ps")
	if r.code != 0 || fmt.Sprint(dialed) != "[https://down:1 http://up:2]" {
		t.Errorf("failover = %+v, dialed %v", r, dialed)
	}
	r, _ = runShim(t, f, "down:7070", "ps")
	if r.code != 1 || r.errOut != "shim: cannot reach shim at down:7070: connection refused\n" {
		t.Errorf("all down = %+v", r)
	}
	// --addr wins over $SHIM_ADDR.
	r, dialed = runShim(t, f, "down:1", "--addr", "up:3", "nodes")
	if r.code != 0 || fmt.Sprint(dialed) != "[https://up:3]" {
		t.Errorf("--addr = %+v, dialed %v", r, dialed)
	}
}

func TestKillResizeDrainNodes(t *testing.T) {
	f := &fakeServer{}
	r, _ := runShim(t, f, "", "kill", "-s", "SIGKILL", "a", "b")
	if r.code != 0 || r.out != "a-full\nb-full\n" || f.killReq.Signal != 9 || fmt.Sprint(f.killReq.Ids) != "[a b]" {
		t.Errorf("kill = %+v, %v", r, f.killReq)
	}
	r, _ = runShim(t, f, "", "kill", "a")
	if r.code != 0 || f.killReq.Signal != 0 {
		t.Errorf("kill default signal = %v", f.killReq)
	}

	r, _ = runShim(t, f, "", "resize", "p1", "--cpu", ":2", "--mem", ":256M", "--move")
	want := &pb.ResizeRequest{Id: "p1", Move: true, Resources: &pb.Resources{CpuMaxMilli: 2000, MemMaxBytes: 256 << 20}}
	if r.code != 0 || !proto.Equal(f.resize, want) || r.out != "p1 cpu=0.5:2:- mem=-:256M pids=- node=n1\n" {
		t.Errorf("resize = %+v, %v", r, f.resize)
	}

	r, _ = runShim(t, f, "", "drain", "n1")
	if r.code != 0 || r.out != "n1 up,draining\n" || f.drain.Undrain {
		t.Errorf("drain = %+v", r)
	}
	r, _ = runShim(t, f, "", "undrain", "n1")
	if r.code != 0 || r.out != "n1 up\n" || !f.drain.Undrain {
		t.Errorf("undrain = %+v", r)
	}

	r, _ = runShim(t, f, "", "nodes", "-o", "json")
	if r.code != 0 || r.out != "[]\n" {
		t.Errorf("nodes -o json = %+v", r)
	}
	f.nodes = []*pb.NodeStatus{{Node: &pb.NodeRecord{Name: "n1", Role: pb.NodeRole_NODE_ROLE_SERVER,
		State: pb.NodeState_NODE_STATE_UP}, Leader: true, Voter: true}}
	r, _ = runShim(t, f, "", "nodes")
	if r.code != 0 || !strings.Contains(r.out, "n1    server  up     true") {
		t.Errorf("nodes = %+v", r)
	}
}

func TestLogs(t *testing.T) {
	f := &fakeServer{logs: []string{"hello\n", "world\n"}}
	r, _ := runShim(t, f, "down:1,up:2", "logs", "--tail", "1K", "p1")
	if r.code != 0 || r.out != "hello\nworld\n" || f.logsReq.TailBytes != 1024 {
		t.Errorf("logs = %+v, %v", r, f.logsReq)
	}
	r, _ = runShim(t, f, "", "logs", "nope")
	if r.code != 1 || r.errOut != "shim: no process \"nope\"\n" {
		t.Errorf("logs nope = %+v", r)
	}
}

func TestTopOnce(t *testing.T) {
	f := &fakeServer{procs: []*pb.ProcessRecord{sampleRecord()}}
	r, _ := runShim(t, f, "", "top", "--once")
	if r.code != 0 || !strings.HasPrefix(r.out, "shim top - ") || !strings.Contains(r.out, "1 (1 running)") ||
		!strings.Contains(r.out, "25%") {
		t.Errorf("top --once = %+v", r)
	}
}

func TestServerErrorIsOneLine(t *testing.T) {
	err := srvErr(connect.NewError(connect.CodeFailedPrecondition, errors.New("no node has room\nfor cpu 2")))
	if got := errorLine(err); got != "no node has room for cpu 2" {
		t.Errorf("errorLine = %q", got)
	}
}
