package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// TestPartitionPolicies cuts a follower off a 3-server cluster that runs
// beats of both policies (spawn --on-lost fence|keep), each beat appending
// "id incarnation time node" to its policy's file:
//   - fence (the default): the cut node stops its copies before the
//     cluster starts their replacements, so no two incarnations of one id
//     ever beat at the same time (the lab's cleanup checks the file);
//   - keep: the cut node keeps its copies running while their replacements
//     start on the majority, so the service never stops (no id goes a
//     second without a beat); the table shows the old copy as cut off
//     (unknown); and after the cut heals the old copy is stopped once the
//     new one runs, so each id ends with one copy.
func TestPartitionPolicies(t *testing.T) {
	needRoot(t)
	if testing.Short() {
		t.Skip("long: network namespaces and a partition")
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
	const perPolicy = 6
	lab := newPartLab(t, 3)
	lab.startNodes(t)
	lab.spawnBeats(t, perPolicy) // fence: the lab's beats file, checked for overlaps at cleanup

	keepBeats := filepath.Join(lab.dir, "keep-beats")
	if err := os.WriteFile(keepBeats, nil, 0o666); err != nil {
		t.Fatal(err)
	}
	spec := &pb.ProcessSpec{Name: "keepbeat", Command: []string{"/bin/bash", "-c", ptBeatScript, "beat", lab.fifo, keepBeats},
		Restart: pb.RestartPolicy_RESTART_POLICY_ALWAYS, Isolation: pb.Isolation_ISOLATION_HOST, User: "0",
		OnLost: pb.OnLost_ON_LOST_KEEP}
	leader := lab.waitLeader(t, lab.nodes, 15*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	_, err := leader.shim.Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec, Count: perPolicy, Wait: true}))
	cancel()
	if err != nil {
		t.Fatalf("spawn keep beats: %v", err)
	}
	keepOf := func(recs []*pb.ProcessRecord) map[string]*pb.ProcessRecord {
		out := map[string]*pb.ProcessRecord{}
		for _, r := range recs {
			if r.Spec.GetName() == "keepbeat" {
				out[r.Id] = r
			}
		}
		return out
	}
	var before map[string]*pb.ProcessRecord
	var why string
	ptWaitFor(t, 30*time.Second, "the keep beats running and beating", func() bool {
		recs, err := lab.listOf(leader)
		if err != nil {
			why = err.Error()
			return false
		}
		before = keepOf(recs)
		b, err := ptReadBeatsFile(keepBeats)
		if err != nil || len(before) != perPolicy {
			why = fmt.Sprintf("%d keep beats listed (%v)", len(before), err)
			return false
		}
		for _, r := range before {
			if r.State != pb.ProcessState_PROCESS_STATE_RUNNING || b.spans[r.Id][r.Incarnation] == nil {
				why = r.Id + " not running and beating yet"
				return false
			}
		}
		return true
	}, func() string { return why })

	// Cut off the follower with the most keep beats.
	count := map[string]int{}
	for _, r := range before {
		count[r.Node]++
	}
	var victim *ptNode
	for _, d := range lab.nodes {
		if d != leader && (victim == nil || count[d.name] > count[victim.name]) {
			victim = d
		}
	}
	var rest []*ptNode
	for _, d := range lab.nodes {
		if d != victim {
			rest = append(rest, d)
		}
	}
	lost := map[string]*pb.ProcessRecord{}
	for id, r := range before {
		if r.Node == victim.name {
			lost[id] = r
		}
	}
	if len(lost) == 0 {
		t.Fatalf("no keep beat runs on %s", victim.name)
	}
	t.Logf("cutting off %s with %d keep beats; load average %s", victim.name, len(lost), ptLoad())
	cutAt := time.Now()
	lab.cut(t, []*ptNode{victim})

	// The majority replaces them; the cut node's copies run on; the table
	// shows them cut off.
	ptWaitFor(t, 60*time.Second, "replacements running on the majority, the old copies cut off", func() bool {
		ld := lab.leaderAmong(rest)
		if ld == nil {
			why = "no leader in the majority"
			return false
		}
		recs, err := lab.listOf(ld)
		if err != nil {
			why = err.Error()
			return false
		}
		now := keepOf(recs)
		b, _ := ptReadBeatsFile(keepBeats)
		for id, old := range lost {
			r := now[id]
			switch {
			case r == nil:
				why = id + " gone"
				return false
			case r.Incarnation <= old.Incarnation || r.Node == victim.name || r.State != pb.ProcessState_PROCESS_STATE_RUNNING:
				why = fmt.Sprintf("%s is incarnation %d %s on %s", id, r.Incarnation, r.State, r.Node)
				return false
			case r.CutOff.GetIncarnation() != old.Incarnation || r.CutOff.GetNode() != victim.name:
				why = fmt.Sprintf("%s: cut off %v, want incarnation %d on %s", id, r.CutOff, old.Incarnation, victim.name)
				return false
			case b == nil || b.spans[id][r.Incarnation] == nil:
				why = id + " replacement has not beaten"
				return false
			}
		}
		return true
	}, func() string { return why })
	t.Logf("replaced on the majority %s after the cut", time.Since(cutAt).Round(time.Millisecond))
	for id, old := range lost {
		if !alive(int(old.Pid)) {
			t.Errorf("%s: the cut-off copy (pid %d) was stopped while cut off", id, old.Pid)
		}
	}

	lab.heal(t, []*ptNode{victim})
	healAt := time.Now()
	ptWaitFor(t, 60*time.Second, "the old copies stopped after the heal, one copy each", func() bool {
		ld := lab.leaderAmong(lab.nodes)
		if ld == nil {
			why = "no leader"
			return false
		}
		recs, err := lab.listOf(ld)
		if err != nil {
			why = err.Error()
			return false
		}
		now := keepOf(recs)
		for id, old := range lost {
			r := now[id]
			if r == nil || r.CutOff != nil || r.State != pb.ProcessState_PROCESS_STATE_RUNNING {
				why = fmt.Sprintf("%s: %v", id, r)
				return false
			}
			if alive(int(old.Pid)) {
				why = fmt.Sprintf("%s: the old copy (pid %d) still runs", id, old.Pid)
				return false
			}
			if !slices.ContainsFunc(r.History, func(h *pb.Incarnation) bool {
				return h.Incarnation == old.Incarnation && h.Node == victim.name
			}) {
				why = fmt.Sprintf("%s: history %v lacks the old copy", id, r.History)
				return false
			}
		}
		return true
	}, func() string { return why })
	t.Logf("old copies stopped %s after the heal", time.Since(healAt).Round(time.Millisecond))

	// The evidence: no id of the cut node went a second without a beat
	// from the cut to now, and only its newest incarnation beats at the end.
	time.Sleep(500 * time.Millisecond) // beats after the end, to look at
	b, err := ptReadBeatsFile(keepBeats)
	if err != nil {
		t.Fatal(err)
	}
	times := ptBeatTimes(keepBeats)
	end := time.Now().UnixNano()
	for id, old := range lost {
		ts := times[id]
		prev := cutAt.UnixNano()
		for _, x := range ts {
			if x < prev {
				continue
			}
			if gap := time.Duration(x - prev); gap > time.Second {
				t.Errorf("%s went %s without a beat at %s: service lost", id, gap, ptTS(prev))
			}
			prev = x
		}
		if gap := time.Duration(end - prev); gap > time.Second {
			t.Errorf("%s has not beaten for %s", id, gap)
		}
		if s := b.spans[id][old.Incarnation]; s == nil || s.last > end-int64(400*time.Millisecond) {
			t.Errorf("%s: the old incarnation %d still beats at the end", id, old.Incarnation)
		}
	}
}

// ptBeatTimes reads every beat time of a beats file, by id, sorted.
func ptBeatTimes(path string) map[string][]int64 {
	out := map[string][]int64{}
	b, err := os.ReadFile(path)
	if err != nil {
		return out
	}
	for _, line := range strings.Split(string(b), "\n") {
		var id, node string
		var inc uint64
		var ts int64
		if n, _ := fmt.Sscan(line, &id, &inc, &ts, &node); n == 4 {
			out[id] = append(out[id], ts)
		}
	}
	for id := range out {
		slices.Sort(out[id])
	}
	return out
}
