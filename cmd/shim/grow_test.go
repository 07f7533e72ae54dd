package main

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
)

func (f *fakeServer) SetGrant(_ context.Context, r *connect.Request[pb.SetGrantRequest]) (*connect.Response[pb.SetGrantResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.grantReq = r.Msg
	if r.Msg.Id != "e1" {
		return nil, notFound(r.Msg.Id)
	}
	rec := &pb.ProcessRecord{Id: "e1", Node: "n1", Grant: &pb.Grant{CpuMilli: 500, MemBytes: 384 << 20},
		Want: r.Msg.Grant, WantReason: "waiting for room: moving f1 off n1"}
	return connect.NewResponse(&pb.SetGrantResponse{Process: rec}), nil
}

func (f *fakeServer) Events(_ context.Context, r *connect.Request[pb.EventsRequest], s *connect.ServerStream[pb.Event]) error {
	f.mu.Lock()
	f.eventsReq = r.Msg
	f.mu.Unlock()
	at := t0.UnixNano()
	for _, e := range []*pb.Event{
		{Index: 7, UnixNano: at, Type: "process.grown", Id: "e1", Node: "n1", Reason: "memory 64M→96M: at 93%"},
		{Index: 8, UnixNano: at, Type: "node.down", Node: "n2", Reason: "lease expired"},
	} {
		if e.Index > r.Msg.Since {
			if err := s.Send(e); err != nil {
				return err
			}
		}
	}
	return nil
}

func TestSpawnGrow(t *testing.T) {
	f := &fakeServer{}
	r, _ := runShim(t, f, "", "spawn", "--grow", "--mem", "32M:512M", "--priority", "100", "--", "ramp")
	if r.code != 0 || f.spawnReq.Spec.Grow != pb.Grow_GROW_ON || f.spawnReq.Spec.GetPriority() != 100 {
		t.Fatalf("spawn --grow = %+v, %v", r, f.spawnReq)
	}
	f = &fakeServer{}
	if r, _ = runShim(t, f, "", "spawn", "--grow=move", "--cpu", "0.1:1.5", "--", "spin"); r.code != 0 ||
		f.spawnReq.Spec.Grow != pb.Grow_GROW_MOVE || f.spawnReq.Spec.Priority != nil {
		t.Fatalf("spawn --grow=move = %+v, %v", r, f.spawnReq)
	}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"spawn", "--grow=maybe", "--mem", "1M:2M", "--", "x"}, "shim: invalid --grow \"maybe\": use on, move or off\n"},
		{[]string{"spawn", "--grow", "--mem", "64M:", "--", "x"}, "shim: grow needs a cpu or memory max to grow to\n"},
		{[]string{"spawn", "--grow", "--mem", "64M", "--", "x"}, "shim: grow needs a range to grow in: give --cpu or --mem as MIN:MAX (one value is a fixed size)\n"},
		{[]string{"spawn", "--priority", "1001", "--", "x"}, "shim: invalid --priority \"1001\": use a whole number 0-1000\n"},
		{[]string{"grant", "e1"}, "shim: nothing to grant: give --cpu, --mem or both\n"},
		{[]string{"grant", "e1", "--mem", "0"}, "shim: invalid --mem \"0\": must be more than 0\n"},
		{[]string{"grant"}, "shim: shim grant needs one process ID (usage: shim grant ID [--cpu CORES] [--mem BYTES])\n"},
		{[]string{"events", "--since", "x"}, "shim: invalid --since \"x\": use a table index, a whole number\n"},
		{[]string{"events", "-o", "yaml"}, "shim: invalid --output \"yaml\": use text, json\n"},
	} {
		f := &fakeServer{}
		if r, _ := runShim(t, f, "", c.args...); r.code != 2 || r.errOut != c.want {
			t.Errorf("shim %q = exit %d, %q; want %q", c.args, r.code, r.errOut, c.want)
		}
	}
}

func TestGrant(t *testing.T) {
	f := &fakeServer{}
	r, _ := runShim(t, f, "", "grant", "e1", "--mem", "700M")
	want := "e1 grant=0.5/384M node=n1 want=0/700M (waiting for room: moving f1 off n1)\n"
	if r.code != 0 || r.out != want || f.grantReq.Grant.MemBytes != 700<<20 || f.grantReq.Grant.CpuMilli != 0 {
		t.Fatalf("grant = %+v (%v), want %q", r, f.grantReq, want)
	}
	if r, _ := runShim(t, f, "", "grant", "nope", "--cpu", "1"); r.code != 1 || r.errOut != "shim: no process \"nope\"\n" {
		t.Errorf("grant of an unknown id: %+v", r)
	}
}

func TestEvents(t *testing.T) {
	f := &fakeServer{}
	r, _ := runShim(t, f, "", "events", "--since", "7", "--type", "node.")
	if r.code != 0 || f.eventsReq.Since != 7 || len(f.eventsReq.Types) != 1 || f.eventsReq.Types[0] != "node." {
		t.Fatalf("events = %+v, %v", r, f.eventsReq)
	}
	want := "8 " + t0.UTC().Format("2006-01-02T15:04:05.000Z") + " node.down - n2 lease expired\n"
	if r.out != want {
		t.Errorf("events text:\n%q\nwant\n%q", r.out, want)
	}
	r, _ = runShim(t, f, "", "events", "-o", "json")
	lines := strings.Split(strings.TrimSpace(r.out), "\n")
	if r.code != 0 || len(lines) != 2 {
		t.Fatalf("events -o json = %+v", r)
	}
	var e eventJSON
	if err := json.Unmarshal([]byte(lines[0]), &e); err != nil || e.Index != 7 || e.Type != "process.grown" || e.ID != "e1" ||
		e.Node != "n1" || e.Time != t0.UTC().Format(time.RFC3339Nano) {
		t.Errorf("event %s: %+v %v", lines[0], e, err)
	}
}

func TestPsGrant(t *testing.T) {
	rec := &pb.ProcessRecord{Id: "e1", Node: "n1", State: pb.ProcessState_PROCESS_STATE_RUNNING, Incarnation: 1,
		Spec: &pb.ProcessSpec{Command: []string{"ramp"}, Grow: pb.Grow_GROW_ON,
			Resources: &pb.Resources{MemMinBytes: 32 << 20, MemMaxBytes: 512 << 20}},
		Grant: &pb.Grant{CpuMilli: 500, MemBytes: 384 << 20}, Want: &pb.Grant{CpuMilli: 500, MemBytes: 448 << 20},
		WantReason: "waiting for room: moving f1 off n1", Usage: &pb.Usage{MemoryBytes: 300 << 20, CpuMilli: 100}}
	f := &fakeServer{procs: []*pb.ProcessRecord{rec}}
	r, _ := runShim(t, f, "", "ps", "-o", "json")
	var v []map[string]any
	if err := json.Unmarshal([]byte(r.out), &v); err != nil || len(v) != 1 {
		t.Fatalf("ps -o json: %v\n%s", err, r.out)
	}
	g, _ := v[0]["grant"].(map[string]any)
	w, _ := v[0]["want"].(map[string]any)
	if g["cpu"] != 0.5 || g["mem"] != float64(384<<20) || w["mem"] != float64(448<<20) || v[0]["grow"] != "on" ||
		v[0]["priority"] != 500.0 || v[0]["want_reason"] != rec.WantReason {
		t.Errorf("ps -o json: %v", v[0])
	}
	r, _ = runShim(t, f, "", "ps", "-o", "wide")
	if !strings.Contains(r.out, "GRANT(CPU/MEM)") || !strings.Contains(r.out, "0.5/384M→0.5/448M") ||
		!strings.Contains(r.out, "growth waits: waiting for room") || !strings.Contains(r.out, "300M") {
		t.Errorf("ps -o wide:\n%s", r.out)
	}
}
