package table

import (
	"fmt"
	"testing"

	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// A report copies the record shallowly and compares only the fields a
// report sets: the copy equals the record, each of those fields tells a
// change, and the record itself is left as it was.
func TestReportCopy(t *testing.T) {
	x := newTester(t)
	x.ok(nodeCmd("n1", 4*core, 8*gib))
	s := spec(100)
	s.Env = []string{"A=1"}
	s.Name = "web"
	x.ok(spawnCmd(s, "aaaaaa000001"))
	x.ok(reportCmd("n1", upd("aaaaaa000001", 1, pb.ProcessState_PROCESS_STATE_RUNNING)))
	old := x.get("aaaaaa000001")
	keep := proto.CloneOf(old)
	c := shallowCopy(old)
	if !proto.Equal(c, old) || !sameReport(c, old) {
		t.Fatalf("copy %v differs from %v", c, old)
	}
	for i, set := range []func(r *pb.ProcessRecord){
		func(r *pb.ProcessRecord) { r.State = pb.ProcessState_PROCESS_STATE_BACKOFF },
		func(r *pb.ProcessRecord) { r.Restarts++ },
		func(r *pb.ProcessRecord) { r.Pid++ },
		func(r *pb.ProcessRecord) { r.StartTime++ },
		func(r *pb.ProcessRecord) { r.StartedUnixNano++ },
		func(r *pb.ProcessRecord) { r.ExitCode++ },
		func(r *pb.ProcessRecord) { r.Reason = "x" },
		func(r *pb.ProcessRecord) { r.FinishedUnixNano++ },
	} {
		c := shallowCopy(old)
		set(c)
		if sameReport(c, old) || proto.Equal(c, old) {
			t.Errorf("field %d: a change not seen", i)
		}
	}
	if !proto.Equal(old, keep) {
		t.Fatalf("copies changed the record: %v, was %v", old, keep)
	}
}

// BenchmarkReport applies reports of 100 processes each that change every
// record (a new pid), on 1,000 nodes holding 100,000 processes.
func BenchmarkReport(b *testing.B) {
	tb, apply := benchTable(b)
	for i := range 1000 {
		apply(nodeCmd(fmt.Sprintf("n%04d", i), 64*core, 256*gib))
	}
	s := spec(1)
	s.Command = []string{"/bin/sleep", "100000", "--some", "arguments", "as", "a", "service", "has"}
	s.Env = []string{"HOME=/", "PATH=/usr/bin:/bin", "MODE=production"}
	for k := range 100 {
		ids := make([]string, 1000)
		for j := range ids {
			ids[j] = fmt.Sprintf("%06x%06x", k, j)
		}
		apply(spawnCmd(s, ids...))
	}
	reports := make([]*pb.Report, 1000)
	for i := range reports {
		name := fmt.Sprintf("n%04d", i)
		recs, _ := tb.Assignments(name)
		reports[i] = &pb.Report{Node: name}
		for _, r := range recs {
			reports[i].Updates = append(reports[i].Updates, &pb.StatusUpdate{Id: r.Id, Incarnation: 1, State: pb.ProcessState_PROCESS_STATE_RUNNING})
		}
	}
	b.ResetTimer()
	cpu0 := cpuTime()
	for i := range b.N {
		rep := reports[i%len(reports)]
		for _, u := range rep.Updates {
			u.Pid++
		}
		apply(&pb.Command{Op: &pb.Command_Report{Report: rep}})
	}
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N), "cpu-ns/op")
}
