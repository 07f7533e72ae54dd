package table

// Data-driven transcripts, in the style of etcd-io/raft's testdata: each file
// in testdata/*.txt is a sequence of blocks
//
//	command args...
//	----
//	expected output
//
// separated by blank lines; lines starting with '#' are comments. Run
//
//	go test ./table/ -run TestTranscripts -rewrite
//
// to regenerate the expected output, then read the diff: the expected output
// is the spec.
//
// Commands (times are whole seconds of a logical clock that advances by one
// per write command; the log index advances by one per write command too):
//
//	node NAME [cpu=CORES] [mem=BYTES] [oc=PERCENT]   register a node
//	down|up|left NAME                                set a node's state
//	drain|undrain NAME
//	remove NAME
//	spawn ID... [name=N] [cpu=C] [cpumax=C] [burst=C] [mem=B] [memmax=B]
//	      [pids=N] [node=PIN] [restart=always|on-failure|never] [env=K=V]
//	      [grow=on|move] [prio=N] -- ARGV...
//	kill ID... [sig=N]
//	report NODE ID inc=N STATE [pid=N] [exit=N] [restarts=N] [reason=WORD] [at=T]
//	resize ID [move] [cpu=C] [cpumax=C] [burst=C] [mem=B] [memmax=B]
//	prune before=T
//	grant ID [cpu=C] [mem=B] [inc=N] [by=WHO]   set a grant (SetGrant)
//	tick T             advance the clock by T seconds (no command)
//	ps                 every process, oldest first, then the pending queue
//	events [since=N] [type=T]...   the event ring
//	nodes              every node with its allocation
//	show ID            one record in full, with its history
//	assign NODE        a node's assignments and their index
//
// Every write command prints "ok" and the processes it changed, or "error:"
// and the error. After each one the harness checks the table's invariants,
// that a failed command left the table exactly as it was, that a second table
// fed the same log is Equal, and that a snapshot round trip is Equal.

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	pb "github.com/shim-run/shim/proto/shimv1"
	"google.golang.org/protobuf/proto"
)

var rewrite = flag.Bool("rewrite", false, "rewrite the expected output of testdata/*.txt")

func TestTranscripts(t *testing.T) {
	files, err := filepath.Glob("testdata/*.txt")
	if err != nil || len(files) == 0 {
		t.Fatalf("no transcripts: %v", err)
	}
	for _, f := range files {
		t.Run(strings.TrimSuffix(filepath.Base(f), ".txt"), func(t *testing.T) { runTranscript(t, f) })
	}
}

func runTranscript(t *testing.T, path string) {
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	h := &harness{t: t, a: New(), b: New()}
	var out strings.Builder
	for i := 0; i < len(lines); {
		line := lines[i]
		if strings.TrimSpace(line) == "" || strings.HasPrefix(line, "#") {
			out.WriteString(line + "\n")
			i++
			continue
		}
		cmdLine := line
		pos := fmt.Sprintf("%s:%d", path, i+1)
		i++
		if i >= len(lines) || lines[i] != "----" {
			t.Fatalf("%s: command %q is not followed by ----", pos, cmdLine)
		}
		i++
		var want []string
		for ; i < len(lines) && lines[i] != ""; i++ {
			want = append(want, lines[i])
		}
		got, err := h.run(cmdLine)
		if err != nil {
			t.Fatalf("%s: %s: %v", pos, cmdLine, err)
		}
		if strings.Contains(got, "\n\n") {
			t.Fatalf("%s: output holds a blank line", pos)
		}
		out.WriteString(cmdLine + "\n----\n")
		if got != "" {
			out.WriteString(got + "\n")
		}
		if !*rewrite && got != strings.Join(want, "\n") {
			t.Errorf("%s: %s\n--- got:\n%s\n--- want:\n%s", pos, cmdLine, got, strings.Join(want, "\n"))
		}
	}
	if *rewrite {
		if err := os.WriteFile(path, []byte(out.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// harness drives table a, and table b in lockstep to check determinism.
type harness struct {
	t     *testing.T
	a, b  *Table
	index uint64
	clock int64 // seconds
}

const second = int64(1_000_000_000)

func (h *harness) run(line string) (string, error) {
	f := strings.Fields(line)
	args := f[1:]
	switch f[0] {
	case "ps":
		return h.ps(), nil
	case "nodes":
		return h.nodes(), nil
	case "tick":
		if len(args) != 1 {
			return "", fmt.Errorf("usage: tick SECONDS")
		}
		n, err := strconv.ParseInt(args[0], 10, 64)
		if err != nil {
			return "", err
		}
		h.clock += n
		return fmt.Sprintf("t%d", h.clock), nil
	case "events":
		var since uint64
		var types []string
		for _, a := range args {
			if v, ok := strings.CutPrefix(a, "since="); ok {
				n, err := strconv.ParseUint(v, 10, 64)
				if err != nil {
					return "", err
				}
				since = n
			} else if v, ok := strings.CutPrefix(a, "type="); ok {
				types = append(types, v)
			} else {
				return "", fmt.Errorf("usage: events [since=N] [type=T]...")
			}
		}
		evs, base, _ := h.a.Events(since, types)
		lines := []string{fmt.Sprintf("base=%d", base)}
		for _, e := range evs {
			l := fmt.Sprintf("%d %s %s", e.Index, clockTime(e.UnixNano), e.Type)
			if e.Id != "" {
				l += " " + e.Id
			}
			if e.Node != "" {
				l += " @" + e.Node
			}
			if e.Reason != "" {
				l += fmt.Sprintf(" %q", e.Reason)
			}
			lines = append(lines, l)
		}
		return strings.Join(lines, "\n"), nil
	case "show":
		if len(args) != 1 {
			return "", fmt.Errorf("usage: show ID")
		}
		r := h.a.Get(args[0])
		if r == nil {
			return "no process " + args[0], nil
		}
		return showRecord(r), nil
	case "assign":
		if len(args) != 1 {
			return "", fmt.Errorf("usage: assign NODE")
		}
		rs, idx := h.a.Assignments(args[0])
		s := fmt.Sprintf("index=%d", idx)
		for _, r := range rs {
			s += "\n" + psLine(r)
		}
		return s, nil
	}
	cmd, err := parseCommand(f[0], args)
	if err != nil {
		return "", err
	}
	return h.write(cmd), nil
}

// write applies cmd to both tables and checks everything it can.
func (h *harness) write(cmd *pb.Command) string {
	t := h.t
	t.Helper()
	h.index++
	h.clock++
	if cmd.NowUnixNano == 0 {
		cmd.NowUnixNano = h.clock * second
	}
	data, err := proto.Marshal(cmd)
	if err != nil {
		t.Fatal(err)
	}
	before := clone(t, h.a)
	res := h.a.Apply(h.index, data).(Result)
	h.b.Apply(h.index, data)
	if !Equal(h.a, h.b) {
		t.Fatalf("two tables fed the same log differ after %s", brief(cmd))
	}
	if res.Err != nil && !Equal(before, h.a) {
		t.Fatalf("failed command %s changed the table", brief(cmd))
	}
	if err := checkInvariants(h.a); err != nil {
		t.Fatalf("after %s: %v", brief(cmd), err)
	}
	if !Equal(h.a, clone(t, h.a)) {
		t.Fatalf("snapshot round trip differs after %s", brief(cmd))
	}
	if res.Err != nil {
		return "error: " + res.Err.Error()
	}
	s := "ok"
	if len(res.Nodes) > 0 {
		s += " (nodes " + strings.Join(res.Nodes, " ") + ")"
	}
	for _, id := range res.IDs {
		if r := h.a.Get(id); r != nil {
			s += "\n" + psLine(r)
		} else {
			s += "\n" + id + " pruned"
		}
	}
	return s
}

func (h *harness) ps() string {
	var lines []string
	for _, r := range h.a.Processes(true, "") {
		lines = append(lines, psLine(r))
	}
	h.a.mu.RLock()
	if len(h.a.pending) > 0 {
		lines = append(lines, "pending: "+strings.Join(h.a.pending, " "))
	}
	h.a.mu.RUnlock()
	if len(lines) == 0 {
		return "no processes"
	}
	return strings.Join(lines, "\n")
}

func psLine(r *pb.ProcessRecord) string {
	node := r.Node
	if node == "" {
		node = "-"
	}
	s := fmt.Sprintf("%s %s %s inc=%d", r.Id, node, StateName(r.State), r.Incarnation)
	if r.Pid != 0 {
		s += fmt.Sprintf(" pid=%d", r.Pid)
	}
	if r.MoveTo != "" {
		s += " moveto=" + r.MoveTo
	}
	if g := GrantOf(r); Elastic(r.Spec) || !sameGrant(g, minGrant(r.Spec.GetResources())) {
		s += " grant=" + Cores(g.CpuMilli) + "/" + Bytes(g.MemBytes)
	}
	if w := r.Want; w != nil {
		s += " want=" + Cores(w.CpuMilli) + "/" + Bytes(w.MemBytes)
	}
	if r.Stop {
		s += fmt.Sprintf(" stop=%d", r.StopSignal)
	}
	if r.Reason != "" {
		s += fmt.Sprintf(" reason=%q", r.Reason)
	}
	return s
}

func (h *harness) nodes() string {
	var lines []string
	for _, v := range h.a.Nodes() {
		n, a := v.Node, v.Alloc
		s := fmt.Sprintf("%s %s", n.Name, NodeStateName(n.State))
		if n.Draining {
			s += " draining"
		}
		s += fmt.Sprintf(" cpu=%s/%s mem=%s/%s procs=%d", Cores(a.CPUGrant), Cores(n.Capacity.GetCpuMaxMilli()),
			Bytes(a.MemGrant), Bytes(n.Capacity.GetMemMaxBytes()), a.Count)
		if n.OvercommitPercent > 0 {
			s += fmt.Sprintf(" oc=%d%% memlimits=%s", n.OvercommitPercent, Bytes(a.MemLimit))
		}
		lines = append(lines, s)
	}
	if len(lines) == 0 {
		return "no nodes"
	}
	return strings.Join(lines, "\n")
}

func showRecord(r *pb.ProcessRecord) string {
	var b strings.Builder
	b.WriteString(psLine(r))
	fmt.Fprintf(&b, "\n  created=%s started=%s finished=%s updated=%s index=%d",
		clockTime(r.CreatedUnixNano), clockTime(r.StartedUnixNano), clockTime(r.FinishedUnixNano),
		clockTime(r.UpdatedUnixNano), r.ModifyIndex)
	if r.ExitCode != 0 || r.Restarts != 0 {
		fmt.Fprintf(&b, " exit=%d restarts=%d", r.ExitCode, r.Restarts)
	}
	s := r.Spec
	fmt.Fprintf(&b, "\n  spec:")
	if s.Name != "" {
		fmt.Fprintf(&b, " name=%s", s.Name)
	}
	if s.Node != "" {
		fmt.Fprintf(&b, " node=%s", s.Node)
	}
	if res := s.Resources; res != nil {
		for _, f := range []struct {
			k string
			v int64
			f func(int64) string
		}{
			{"cpu", res.CpuMinMilli, Cores}, {"cpumax", res.CpuMaxMilli, Cores}, {"burst", res.CpuBurstMilli, Cores},
			{"mem", res.MemMinBytes, Bytes}, {"memmax", res.MemMaxBytes, Bytes},
		} {
			if f.v != 0 {
				fmt.Fprintf(&b, " %s=%s", f.k, f.f(f.v))
			}
		}
	}
	if s.Grow != pb.Grow_GROW_OFF {
		fmt.Fprintf(&b, " grow=%s", strings.ToLower(strings.TrimPrefix(s.Grow.String(), "GROW_")))
	}
	if s.Priority != nil {
		fmt.Fprintf(&b, " prio=%d", *s.Priority)
	}
	fmt.Fprintf(&b, " -- %s", strings.Join(s.Command, " "))
	if r.WantReason != "" {
		fmt.Fprintf(&b, "\n  want: %q", r.WantReason)
	}
	if r.MovedUnixNano != 0 {
		fmt.Fprintf(&b, "\n  moved to make room: %s", clockTime(r.MovedUnixNano))
	}
	for _, i := range r.History {
		fmt.Fprintf(&b, "\n  history: inc=%d %s %s pid=%d exit=%d %s..%s reason=%q", i.Incarnation, i.Node,
			StateName(i.State), i.Pid, i.ExitCode, clockTime(i.StartedUnixNano), clockTime(i.EndedUnixNano), i.Reason)
	}
	return b.String()
}

func clockTime(ns int64) string {
	if ns == 0 {
		return "-"
	}
	if ns%second == 0 {
		return fmt.Sprintf("t%d", ns/second)
	}
	return fmt.Sprintf("%dns", ns)
}

// ---- parsing ----

func parseCommand(verb string, args []string) (*pb.Command, error) {
	need := func(n int) error {
		if len(args) < n {
			return fmt.Errorf("%s needs %d arguments", verb, n)
		}
		return nil
	}
	switch verb {
	case "node":
		if err := need(1); err != nil {
			return nil, err
		}
		n := &pb.NodeRecord{Name: args[0], Capacity: &pb.Resources{}}
		for _, kv := range args[1:] {
			k, v, _ := strings.Cut(kv, "=")
			var err error
			switch k {
			case "cpu":
				n.Capacity.CpuMaxMilli, err = parseCores(v)
			case "mem":
				n.Capacity.MemMaxBytes, err = parseBytes(v)
			case "oc":
				var p uint64
				p, err = strconv.ParseUint(v, 10, 32)
				n.OvercommitPercent = uint32(p)
			default:
				err = fmt.Errorf("unknown node option %q", kv)
			}
			if err != nil {
				return nil, err
			}
		}
		return &pb.Command{Op: &pb.Command_RegisterNode{RegisterNode: &pb.RegisterNode{Node: n}}}, nil
	case "down", "up", "left":
		if err := need(1); err != nil {
			return nil, err
		}
		s := map[string]pb.NodeState{"down": pb.NodeState_NODE_STATE_DOWN, "up": pb.NodeState_NODE_STATE_UP,
			"left": pb.NodeState_NODE_STATE_LEFT}[verb]
		return stateCmd(args[0], s), nil
	case "drain", "undrain":
		if err := need(1); err != nil {
			return nil, err
		}
		return drainCmd(args[0], verb == "drain"), nil
	case "remove":
		if err := need(1); err != nil {
			return nil, err
		}
		return removeCmd(args[0]), nil
	case "spawn":
		return parseSpawn(args)
	case "kill":
		k := &pb.Kill{Signal: 15}
		for _, a := range args {
			if v, ok := strings.CutPrefix(a, "sig="); ok {
				n, err := strconv.ParseInt(v, 10, 32)
				if err != nil {
					return nil, err
				}
				k.Signal = int32(n)
			} else {
				k.Ids = append(k.Ids, a)
			}
		}
		return &pb.Command{Op: &pb.Command_Kill{Kill: k}}, nil
	case "report":
		return parseReport(args)
	case "resize":
		if err := need(1); err != nil {
			return nil, err
		}
		r := &pb.Resources{}
		move := false
		for _, kv := range args[1:] {
			if kv == "move" {
				move = true
				continue
			}
			if err := setResource(r, kv); err != nil {
				return nil, err
			}
		}
		if move {
			return resizeMoveCmd(args[0], r), nil
		}
		return resizeCmd(args[0], r), nil
	case "grant":
		if err := need(1); err != nil {
			return nil, err
		}
		g := &pb.SetGrant{Id: args[0], Grant: &pb.Grant{}}
		for _, kv := range args[1:] {
			k, v, _ := strings.Cut(kv, "=")
			var err error
			switch k {
			case "cpu":
				g.Grant.CpuMilli, err = parseCores(v)
			case "mem":
				g.Grant.MemBytes, err = parseBytes(v)
			case "inc":
				g.Incarnation, err = strconv.ParseUint(v, 10, 64)
			case "by":
				g.By = v
			case "reason":
				g.Reason = v
			default:
				err = fmt.Errorf("unknown grant option %q", kv)
			}
			if err != nil {
				return nil, err
			}
		}
		return &pb.Command{Op: &pb.Command_SetGrant{SetGrant: g}}, nil
	case "prune":
		if err := need(1); err != nil {
			return nil, err
		}
		v, ok := strings.CutPrefix(args[0], "before=")
		if !ok {
			return nil, fmt.Errorf("usage: prune before=T")
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return nil, err
		}
		return pruneCmd(n * second), nil
	}
	return nil, fmt.Errorf("unknown command %q", verb)
}

func parseSpawn(args []string) (*pb.Command, error) {
	s := &pb.ProcessSpec{Resources: &pb.Resources{}}
	var ids []string
	force := false
	for i, a := range args {
		if a == "force" {
			force = true
			continue
		}
		if a == "--" {
			s.Command = args[i+1:]
			break
		}
		k, v, ok := strings.Cut(a, "=")
		if !ok {
			ids = append(ids, a)
			continue
		}
		switch k {
		case "name":
			s.Name = v
		case "node":
			s.Node = v
		case "env":
			s.Env = append(s.Env, v)
		case "grow":
			g, ok := map[string]pb.Grow{"off": pb.Grow_GROW_OFF, "on": pb.Grow_GROW_ON, "move": pb.Grow_GROW_MOVE}[v]
			if !ok {
				return nil, fmt.Errorf("unknown grow mode %q", v)
			}
			s.Grow = g
		case "prio":
			n, err := strconv.ParseInt(v, 10, 32)
			if err != nil {
				return nil, err
			}
			p := int32(n)
			s.Priority = &p
		case "restart":
			p, ok := map[string]pb.RestartPolicy{"always": pb.RestartPolicy_RESTART_POLICY_ALWAYS,
				"on-failure": pb.RestartPolicy_RESTART_POLICY_ON_FAILURE, "never": pb.RestartPolicy_RESTART_POLICY_NEVER}[v]
			if !ok {
				return nil, fmt.Errorf("unknown restart policy %q", v)
			}
			s.Restart = p
		default:
			if err := setResource(s.Resources, a); err != nil {
				return nil, err
			}
		}
	}
	cmd := spawnCmd(s, ids...)
	cmd.GetSpawn().Force = force
	return cmd, nil
}

func setResource(r *pb.Resources, kv string) error {
	k, v, _ := strings.Cut(kv, "=")
	var err error
	switch k {
	case "cpu":
		r.CpuMinMilli, err = parseCores(v)
	case "cpumax":
		r.CpuMaxMilli, err = parseCores(v)
	case "burst":
		r.CpuBurstMilli, err = parseCores(v)
	case "mem":
		r.MemMinBytes, err = parseBytes(v)
	case "memmax":
		r.MemMaxBytes, err = parseBytes(v)
	case "pids":
		r.PidsMax, err = strconv.ParseInt(v, 10, 64)
	default:
		err = fmt.Errorf("unknown resource %q", kv)
	}
	return err
}

var reportStates = map[string]pb.ProcessState{
	"pending": pending, "starting": starting, "running": running, "backoff": backoff,
	"exited": exited, "failed": failed, "killed": killed,
}

func parseReport(args []string) (*pb.Command, error) {
	if len(args) < 3 {
		return nil, fmt.Errorf("usage: report NODE ID inc=N STATE ...")
	}
	u := &pb.StatusUpdate{Id: args[1]}
	for _, a := range args[2:] {
		if s, ok := reportStates[a]; ok {
			u.State = s
			continue
		}
		k, v, ok := strings.Cut(a, "=")
		if !ok {
			return nil, fmt.Errorf("bad report argument %q", a)
		}
		if k == "reason" {
			u.Reason = v
			continue
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("%s: %v", a, err)
		}
		switch k {
		case "inc":
			u.Incarnation = uint64(n)
		case "pid":
			u.Pid = n
		case "exit":
			u.ExitCode = int32(n)
		case "restarts":
			u.Restarts = uint32(n)
		case "at":
			u.AtUnixNano = n * second
		default:
			return nil, fmt.Errorf("bad report argument %q", a)
		}
	}
	return reportCmd(args[0], u), nil
}

// parseCores reads "0.5" or "2" cores (or "-1") as millicores.
func parseCores(v string) (int64, error) {
	f, err := strconv.ParseFloat(v, 64)
	if err != nil {
		return 0, err
	}
	return int64(f*1000 + 0.5*sign(f)), nil
}

func sign(f float64) float64 {
	if f < 0 {
		return -1
	}
	return 1
}

// parseBytes reads "512", "64M", "1.5G".
func parseBytes(v string) (int64, error) {
	mult := int64(1)
	if n := len(v); n > 0 {
		if i := strings.IndexByte("KMGT", v[n-1]); i >= 0 {
			mult = int64(1) << (10 * (i + 1))
			v = v[:n-1]
		}
	}
	f, err := strconv.ParseFloat(v, 64)
	if err != nil {
		return 0, err
	}
	return int64(f * float64(mult)), nil
}
