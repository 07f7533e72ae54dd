package agent

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/shim-run/shim/auth"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

// tokenCP is fakeCP that hands out self tokens with the assignments.
type tokenCP struct {
	*fakeCP
	tokens map[string]string
}

func (cp *tokenCP) Assignments(ctx context.Context, req *connect.Request[pb.AssignmentsRequest]) (*connect.Response[pb.AssignmentsResponse], error) {
	resp, err := cp.fakeCP.Assignments(ctx, req)
	if err == nil {
		resp.Msg.SelfTokens = cp.tokens
	}
	return resp, err
}

// specRuntime is SimRuntime that keeps the specs it was asked to start.
type specRuntime struct {
	SimRuntime
	mu    sync.Mutex
	specs map[string]Spec
}

func (r *specRuntime) Start(s Spec) (Proc, error) {
	r.mu.Lock()
	if r.specs == nil {
		r.specs = map[string]Spec{}
	}
	r.specs[s.ID] = s
	r.mu.Unlock()
	return r.SimRuntime.Start(s)
}

func (r *specRuntime) spec(id string) (Spec, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s, ok := r.specs[id]
	return s, ok
}

// TestSandboxSpec: a workload gets its host paths resolved against the
// node's, its work folder, and the way back: SHIM_ADDR, its own SHIM_TOKEN
// and SHIM_CA; a host path the node does not offer fails the start.
func TestSandboxSpec(t *testing.T) {
	data := t.TempDir()
	tok := auth.NewSelfToken(auth.SelfSecret([]byte("k")), "c", "p1", 1).String()
	cp := &tokenCP{fakeCP: newFakeCP(), tokens: map[string]string{"p1": tok, "p3": "self.p3.7." + strings.Repeat("0", 64)}}
	rt := &specRuntime{}
	a := startAgent(t, cp.fakeCP, rt, func(a *Agent) {
		a.Client = func(string) shimv1connect.AgentServiceClient { return cp }
		a.Node.ApiAddr = "127.0.0.1:7070"
		a.HostPaths = map[string]HostPath{"data": {Path: data}, "images": {Path: "/srv/images", ReadOnly: true}}
		a.CA = []byte("-----BEGIN CERTIFICATE-----\n")
	})
	p1 := assignment("p1", 1, pb.ProcessState_PROCESS_STATE_STARTING)
	p1.Spec.Isolation, p1.Spec.Rootfs = pb.Isolation_ISOLATION_CONTAINER, "images/alpine"
	p1.Spec.Mounts = []*pb.Mount{{Name: "data", Path: "/data", ReadOnly: true}, {Name: "images", Path: "/img"}}
	p2 := assignment("p2", 1, pb.ProcessState_PROCESS_STATE_STARTING)
	p2.Spec.Mounts = []*pb.Mount{{Name: "logs", Path: "/logs"}}
	p3 := assignment("p3", 1, pb.ProcessState_PROCESS_STATE_STARTING) // its token names incarnation 7
	p3.Spec.Isolation = pb.Isolation_ISOLATION_HOST
	cp.set(1, p1, p2, p3)
	waitUntil(t, 5*time.Second, "p1 and p3 started, p2 failed", func() bool {
		_, ok1 := rt.spec("p1")
		_, ok3 := rt.spec("p3")
		return ok1 && ok3 && slices.ContainsFunc(cp.reported(), func(u *pb.StatusUpdate) bool {
			return u.Id == "p2" && u.State == pb.ProcessState_PROCESS_STATE_FAILED
		})
	})
	s, _ := rt.spec("p1")
	wantMounts := []Mount{{Source: data, Target: "/data", ReadOnly: true}, {Source: "/srv/images", Target: "/img", ReadOnly: true}}
	if !slices.Equal(s.Mounts, wantMounts) || s.Rootfs != "/srv/images/alpine" || s.WorkDir != WorkPath(a.DataDir, "p1") ||
		string(s.CA) != string(a.CA) {
		t.Errorf("p1's spec: mounts %v, rootfs %q, work %q, CA %q", s.Mounts, s.Rootfs, s.WorkDir, s.CA)
	}
	for _, kv := range []string{"SHIM_ADDR=127.0.0.1:7070", "SHIM_TOKEN=" + tok, "SHIM_CA=/work/" + CAFile, "SHIM_PROCESS_ID=p1"} {
		if !slices.Contains(s.Env, kv) {
			t.Errorf("p1's environment lacks %s: %v", kv, s.Env)
		}
	}
	s3, _ := rt.spec("p3")
	if slices.ContainsFunc(s3.Env, func(kv string) bool { return strings.HasPrefix(kv, "SHIM_TOKEN=") }) ||
		!slices.Contains(s3.Env, "SHIM_CA="+filepath.Join(WorkPath(a.DataDir, "p3"), CAFile)) {
		t.Errorf("p3 (host isolation, a token of another incarnation): %v", s3.Env)
	}
	for _, u := range cp.reported() {
		if u.Id == "p2" && !strings.Contains(u.Reason, "host path logs: node n1 does not offer it") {
			t.Errorf("p2 failed for %q", u.Reason)
		}
	}
}

// TestSweepWork: a work folder stays while its process is assigned or runs
// here, and goes once it is neither.
func TestSweepWork(t *testing.T) {
	cp := newFakeCP()
	a := startAgent(t, cp, &SimRuntime{})
	keep := assignment("keep", 1, pb.ProcessState_PROCESS_STATE_STARTING)
	gone := assignment("gone", 1, pb.ProcessState_PROCESS_STATE_STARTING)
	cp.set(1, keep, gone)
	for _, id := range []string{"keep", "gone", "stray"} {
		if err := os.MkdirAll(filepath.Join(WorkPath(a.DataDir, id), "sub"), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	waitUntil(t, 5*time.Second, "both running", func() bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		return a.procs["keep"] != nil && a.procs["keep"].proc != nil && a.procs["gone"] != nil && a.procs["gone"].proc != nil
	})
	exists := func(id string) bool { _, err := os.Stat(WorkPath(a.DataDir, id)); return err == nil }
	a.sweepWorkOnce()
	if !exists("keep") || !exists("gone") || exists("stray") {
		t.Fatalf("after the first sweep: keep %v, gone %v, stray %v", exists("keep"), exists("gone"), exists("stray"))
	}
	cp.set(2, keep) // "gone" is no longer assigned here: stopped, then forgotten
	waitUntil(t, 5*time.Second, "gone forgotten", func() bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		return a.procs["gone"] == nil
	})
	a.sweepWorkOnce()
	if !exists("keep") || exists("gone") {
		t.Fatalf("after the second sweep: keep %v, gone %v", exists("keep"), exists("gone"))
	}
	if ents, _ := os.ReadDir(filepath.Join(a.DataDir, "work")); len(ents) != 1 {
		t.Errorf("work folders left: %v", ents)
	}
}
