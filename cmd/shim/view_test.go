package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/shim-run/shim/client"
	pb "github.com/shim-run/shim/proto/shimv1"
)

var t0 = time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)

func sampleRecord() *pb.ProcessRecord {
	return &pb.ProcessRecord{
		Id: "p1a2b3", Node: "n1", State: pb.ProcessState_PROCESS_STATE_RUNNING, Pid: 4242,
		Incarnation: 2, Restarts: 1, CreatedUnixNano: t0.UnixNano(), StartedUnixNano: t0.Add(time.Second).UnixNano(),
		Spec: &pb.ProcessSpec{
			Name: "web", Command: []string{"python3", "-c", "print('a b')"}, Env: []string{"A=1"},
			Restart: pb.RestartPolicy_RESTART_POLICY_ALWAYS,
			Resources: &pb.Resources{CpuMinMilli: 500, CpuMaxMilli: 1000, CpuBurstMilli: 2000,
				MemMinBytes: 64 << 20, MemMaxBytes: 128 << 20, PidsMax: 100},
		},
		Usage: &pb.Usage{CpuMilli: 250, MemoryBytes: 10 << 20, CpuUsageNanos: 3e9},
		History: []*pb.Incarnation{{Incarnation: 1, Node: "n0", Pid: 7, State: pb.ProcessState_PROCESS_STATE_FAILED,
			ExitCode: 1, Reason: "node lost", StartedUnixNano: t0.UnixNano()}},
	}
}

// decode round-trips v through JSON into generic values.
func decode(t *testing.T, v any) any {
	t.Helper()
	var buf bytes.Buffer
	if err := writeJSON(&buf, v); err != nil {
		t.Fatal(err)
	}
	var out any
	if err := json.Unmarshal(buf.Bytes(), &out); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestProcessView(t *testing.T) {
	m := decode(t, processView(sampleRecord())).(map[string]any)
	want := map[string]any{
		"id": "p1a2b3", "name": "web", "node": "n1", "state": "running", "pid": 4242.0,
		"incarnation": 2.0, "restarts": 1.0, "exit_code": 0.0, "reason": "", "restart": "always",
		"created": "2025-01-02T03:04:05Z", "started": "2025-01-02T03:04:06Z", "finished": nil,
	}
	for k, v := range want {
		if m[k] != v {
			t.Errorf("%s = %#v, want %#v", k, m[k], v)
		}
	}
	if got := fmt.Sprint(m["command"]); got != "[python3 -c print('a b')]" {
		t.Errorf("command = %s", got)
	}
	res := m["resources"].(map[string]any)
	for k, v := range map[string]float64{"cpu_min": 0.5, "cpu_max": 1, "cpu_burst": 2,
		"mem_min": 64 << 20, "mem_max": 128 << 20, "pids": 100} {
		if res[k] != v {
			t.Errorf("resources.%s = %v, want %v", k, res[k], v)
		}
	}
	if u := m["usage"].(map[string]any); u["cpu"] != 0.25 || u["mem"] != float64(10<<20) || u["cpu_seconds"] != 3.0 {
		t.Errorf("usage = %v", u)
	}
	h := m["history"].([]any)
	if len(h) != 1 || h[0].(map[string]any)["state"] != "failed" || h[0].(map[string]any)["ended"] != nil {
		t.Errorf("history = %v", h)
	}

	// A bare record still has arrays, not nulls, and null times.
	m = decode(t, processView(&pb.ProcessRecord{Id: "x", State: pb.ProcessState_PROCESS_STATE_PENDING})).(map[string]any)
	if fmt.Sprint(m["command"], m["history"]) != "[] []" || m["created"] != nil || m["usage"] != nil || m["state"] != "pending" {
		t.Errorf("bare record view = %v", m)
	}
}

func TestNodeView(t *testing.T) {
	s := &pb.NodeStatus{
		Node: &pb.NodeRecord{Name: "n1", Role: pb.NodeRole_NODE_ROLE_WORKER, State: pb.NodeState_NODE_STATE_UP,
			ApiAddr: "10.0.0.1:7070", Draining: true,
			Capacity: &pb.Resources{CpuMaxMilli: 4000, MemMaxBytes: 8 << 30}},
		Leader: false, Voter: false, Processes: 3,
		Reserved: &pb.Resources{CpuMinMilli: 1500, MemMinBytes: 1 << 30},
		Granted:  &pb.Grant{CpuMilli: 1500, MemBytes: 1536 << 20},
	}
	m := decode(t, nodeView(s)).(map[string]any)
	for k, v := range map[string]any{"name": "n1", "role": "worker", "state": "up", "draining": true,
		"leader": false, "voter": false, "api": "10.0.0.1:7070", "processes": 3.0, "usage": nil} {
		if m[k] != v {
			t.Errorf("%s = %#v, want %#v", k, m[k], v)
		}
	}
	if c := m["capacity"].(map[string]any); c["cpu"] != 4.0 || c["mem"] != float64(8<<30) {
		t.Errorf("capacity = %v", c)
	}
	if r := m["reserved"].(map[string]any); r["cpu"] != 1.5 || r["mem"] != float64(1<<30) {
		t.Errorf("reserved = %v", r)
	}
	if g := m["granted"].(map[string]any); g["cpu"] != 1.5 || g["mem"] != float64(1536<<20) {
		t.Errorf("granted = %v", g)
	}
	if f := m["free"].(map[string]any); f["cpu"] != 2.5 || f["mem"] != float64(8<<30-1536<<20) {
		t.Errorf("free = %v", f)
	}

	var buf bytes.Buffer
	if err := writeNodeTable(&buf, []*pb.NodeStatus{s}); err != nil {
		t.Fatal(err)
	}
	want := "NAME  ROLE    STATE        LEADER  API            CPU(used/granted/free/cap)  MEM(used/granted/free/cap)  PROCS  VMS  HOSTPATHS\n" +
		"n1    worker  up,draining  false   10.0.0.1:7070  -/1.5/2.5/4                 -/1.5G/6.5G/8G              3      yes  -\n"
	if buf.String() != want {
		t.Errorf("node table:\n%s\nwant:\n%s", buf.String(), want)
	}
	// With the nodes' current use.
	s.Usage = &pb.Usage{CpuMilli: 250, MemoryBytes: 512 << 20}
	buf.Reset()
	if err := writeNodeTable(&buf, []*pb.NodeStatus{s}); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(buf.String(), "0.25/1.5/2.5/4") || !strings.Contains(buf.String(), "512M/1.5G/6.5G/8G") {
		t.Errorf("node table with usage:\n%s", buf.String())
	}
	// With host paths, and no QEMU.
	s.Node.HostPaths = []*pb.HostPath{{Name: "data"}, {Name: "images", ReadOnly: true}}
	s.Node.VmUnavailable = "no QEMU: qemu-system-x86_64 not found (install qemu-system-x86)"
	buf.Reset()
	if err := writeNodeTable(&buf, []*pb.NodeStatus{s}); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(buf.String(), " no  ") || !strings.Contains(buf.String(), "data,images:ro") {
		t.Errorf("node table with host paths:\n%s", buf.String())
	}
	m = decode(t, nodeView(s)).(map[string]any)
	if m["vms"] != "no: "+s.Node.VmUnavailable || fmt.Sprint(m["host_paths"]) != "[data images:ro]" {
		t.Errorf("vms %v, host_paths %v", m["vms"], m["host_paths"])
	}
}

func TestProcessTable(t *testing.T) {
	r := sampleRecord()
	done := &pb.ProcessRecord{Id: "q9", State: pb.ProcessState_PROCESS_STATE_EXITED, ExitCode: 3,
		Reason: "exit\tstatus 3\n", CreatedUnixNano: t0.Add(-72 * time.Hour).UnixNano(),
		Spec: &pb.ProcessSpec{Command: []string{"false"}}}
	now := t0.Add(90 * time.Second)

	var buf bytes.Buffer
	if err := writeProcessTable(&buf, []*pb.ProcessRecord{r, done}, false, false, now); err != nil {
		t.Fatal(err)
	}
	want := "ID      NAME  NODE  STATE    PID   INC  RESTARTS  EXIT  AGE  CPU%  MEM  COMMAND\n" +
		"p1a2b3  web   n1    running  4242  2    1         -     1m   25%   10M  python3 -c \"print('a b')\"\n" +
		"q9      -     -     exited   -     0    0         3     3d   -     -    false\n"
	if buf.String() != want {
		t.Errorf("table:\n%s\nwant:\n%s", buf.String(), want)
	}

	buf.Reset()
	if err := writeProcessTable(&buf, []*pb.ProcessRecord{r, done}, true, false, now); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 3 {
		t.Fatalf("wide table has %d lines:\n%s", len(lines), buf.String())
	}
	for _, s := range []string{"CPU(MIN/MAX/BURST)", "MEM(MIN/MAX)", "PIDS", "CPU%", "MEMUSED", "REASON"} {
		if !strings.Contains(lines[0], s) {
			t.Errorf("wide header lacks %s: %s", s, lines[0])
		}
	}
	for _, s := range []string{"0.5/1/2", "64M/128M", "100", "25%", "10M"} {
		if !strings.Contains(lines[1], s) {
			t.Errorf("wide row lacks %s: %s", s, lines[1])
		}
	}
	if !strings.Contains(lines[2], "-/-/-") || !strings.Contains(lines[2], "exit status 3") {
		t.Errorf("wide row 2: %s", lines[2])
	}
}

func TestProcessTableHistory(t *testing.T) {
	r := sampleRecord()
	r.History = []*pb.Incarnation{
		{Incarnation: 1, Node: "n0", Pid: 7, State: pb.ProcessState_PROCESS_STATE_KILLED, Reason: "node n0 down",
			EndedUnixNano: t0.Add(30 * time.Second).UnixNano()},
	}
	now := t0.Add(90 * time.Second)
	var buf bytes.Buffer
	if err := writeProcessTable(&buf, []*pb.ProcessRecord{r}, false, true, now); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimRight(buf.String(), "\n"), "\n")
	if len(lines) != 3 {
		t.Fatalf("table with history has %d lines, want 3:\n%s", len(lines), buf.String())
	}
	for _, want := range []string{"└─", "n0", "killed", "7", "ended 1m ago", "(node n0 down)"} {
		if !strings.Contains(lines[2], want) {
			t.Errorf("history row lacks %q: %s", want, lines[2])
		}
	}
	buf.Reset()
	if err := writeProcessTable(&buf, []*pb.ProcessRecord{r}, false, false, now); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(buf.String(), "└─") {
		t.Errorf("history shown without -a:\n%s", buf.String())
	}
}

func TestEmptyJSON(t *testing.T) {
	a := newApp(nil, nil)
	var buf bytes.Buffer
	if err := a.printProcesses(&buf, nil, "json", false); err != nil {
		t.Fatal(err)
	}
	if buf.String() != "[]\n" {
		t.Errorf("empty json = %q", buf.String())
	}
}

func TestAgeAndCommandLine(t *testing.T) {
	for d, want := range map[time.Duration]string{
		-time.Second: "0s", 5 * time.Second: "5s", 3 * time.Minute: "3m", 5 * time.Hour: "5h",
		47 * time.Hour: "47h", 72 * time.Hour: "3d",
	} {
		if got := age(d); got != want {
			t.Errorf("age(%v) = %q, want %q", d, got, want)
		}
	}
	if got := commandLine([]string{"sh", "-c", "echo $HOME", ""}); got != `sh -c "echo $HOME" ""` {
		t.Errorf("commandLine = %s", got)
	}
	if got := truncate(strings.Repeat("x", 50), 40); len(got) != 40 || !strings.HasSuffix(got, "...") {
		t.Errorf("truncate = %q", got)
	}
}

func TestErrorLine(t *testing.T) {
	for _, c := range []struct {
		err  error
		want string
		code int
	}{
		{connect.NewError(connect.CodeNotFound, errors.New(`not found: no process "xyz"`)), `no process "xyz"`, 1},
		{connect.NewError(connect.CodeInvalidArgument, errors.New("invalid request: cpu min 2 exceeds max 1")),
			"invalid request: cpu min 2 exceeds max 1", 1},
		{connect.NewError(connect.CodeInternal, errors.New("line one\nline two\n\tthree")), "line one line two three", 1},
		{errors.New("multi\nline"), "multi line", 1},
		{usagef("bad\nusage"), "bad usage", 2},
		{&client.UnreachableError{Addrs: []string{"http://127.0.0.1:7070"},
			Err: connect.NewError(connect.CodeUnavailable, errors.New("no leader"))},
			"cannot reach shim at 127.0.0.1:7070: no leader", 1},
	} {
		got := errorLine(c.err)
		if got != c.want || exitCode(c.err) != c.code {
			t.Errorf("errorLine(%v) = %q exit %d, want %q exit %d", c.err, got, exitCode(c.err), c.want, c.code)
		}
		if strings.ContainsAny(got, "\n\t") {
			t.Errorf("errorLine(%v) is not one line: %q", c.err, got)
		}
	}
}

// TestWriteProcessesJSON holds the hand-written JSON of `ps -o json` to
// what encoding/json prints for the same views, over awkward values.
func TestWriteProcessesJSON(t *testing.T) {
	odd := []string{"", "plain", "q\"b\\s/", "\x00\x01\b\f\n\r\t\x1f\x7f", "<&>", "\u2028\u2029 é 日本", "bad \xff\xfe utf8", "\xe2\x80"}
	var recs []*pb.ProcessRecord
	for i, s := range odd {
		r := sampleRecord()
		r.Id, r.Reason, r.Spec.Name, r.Spec.Env = s, s, s, []string{s, "K=" + s}
		r.Spec.Command = []string{s}
		r.Pid, r.ExitCode, r.ModifyIndex = int64(-i), int32(-i*1000), uint64(1)<<63+uint64(i)
		r.Spec.Resources.CpuMinMilli = []int64{0, 1, 7, 333, 1e9, 1 << 62, 10, 5}[i]
		r.Spec.Resources.CpuBurstMilli = int64(i) * 123457
		if i%2 == 0 {
			r.Usage, r.History = nil, nil
			r.Spec.Command, r.Spec.Env = nil, nil
		} else {
			r.Usage.CpuUsageNanos = uint64(i) * 1
			r.History = append(r.History, &pb.Incarnation{Incarnation: 9, Node: s, Reason: s, EndedUnixNano: 1})
			r.CutOff = &pb.Incarnation{Incarnation: 8, Node: s, Pid: 77, Reason: s, StartedUnixNano: 2}
		}
		recs = append(recs, r)
	}
	for _, recs := range [][]*pb.ProcessRecord{nil, recs[:1], recs} {
		views := []processJSON{}
		for _, r := range recs {
			views = append(views, processView(r))
		}
		var want, got bytes.Buffer
		if err := writeJSON(&want, views); err != nil {
			t.Fatal(err)
		}
		if err := writeProcessesJSON(&got, recs); err != nil {
			t.Fatal(err)
		}
		if got.String() != want.String() {
			t.Errorf("%d records:\ngot  %s\nwant %s", len(recs), got.String(), want.String())
		}
	}
	for _, f := range []float64{0, 1e-7, -2.5e-9, 1e21, 123456789.125, 0.001, -0.5, 1e20} {
		want, _ := json.Marshal(f)
		if got := appendJSONFloat(nil, f); string(got) != string(want) {
			t.Errorf("float %v: got %s, want %s", f, got, want)
		}
	}
}
