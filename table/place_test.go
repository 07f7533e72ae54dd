package table

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"syscall"
	"testing"
	"time"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// placeOneByOne is how a spawn placed its replicas before placeReplicas:
// placeWith for each, seeing the ones before it.
func placeOneByOne(t *Table, spec *pb.ProcessSpec, need claim, n int) ([]int, error) {
	var extra []Alloc
	var out []int
	for range n {
		k, err := t.placeWith(spec, need, extra, "")
		if err != nil {
			return out, err
		}
		out = append(out, k)
		if extra == nil {
			extra = make([]Alloc, len(t.candidates()))
		}
		extra[k].add(need, 1)
		extra[k].Same++
	}
	return out, nil
}

// placeReplicas chooses the nodes, in order, and fails with the error, that
// placing the replicas one by one does: on random tables (nodes of mixed
// sizes, some down, draining or nearly full, memory overcommit) and random
// spawns (pinned or not, CPU and memory minima, up to a few hundred
// replicas, some more than fit).
func TestPlaceReplicasIsPlaceOneByOne(t *testing.T) {
	for seed := range uint64(300) {
		r := rand.New(rand.NewPCG(seed, 19))
		x := newTester(t)
		nodes := 1 + r.IntN(40)
		for i := range nodes {
			name := fmt.Sprintf("n%02d", i)
			cmd := nodeCmd(name, int64(1+r.IntN(8))*core, int64(1+r.IntN(16))*gib)
			if r.IntN(4) == 0 {
				cmd.GetRegisterNode().Node.OvercommitPercent = uint32(100 + r.IntN(200))
			}
			x.ok(cmd)
			switch r.IntN(8) {
			case 0:
				x.ok(downCmd(name))
			case 1:
				x.ok(drainCmd(name, true))
			}
		}
		randSpec := func() *pb.ProcessSpec {
			s := spec([]int64{0, 100, 250, 700, 1500}[r.IntN(5)])
			s.Resources.MemMinBytes = []int64{0, 64 * mib, 512 * mib, 3 * gib}[r.IntN(4)]
			if r.IntN(3) == 0 {
				s.Resources.MemMaxBytes = s.Resources.MemMinBytes + []int64{0, 256 * mib, 2 * gib}[r.IntN(3)]
			}
			if r.IntN(6) == 0 {
				s.Node = fmt.Sprintf("n%02d", r.IntN(nodes+1)) // sometimes a node that is not there
			}
			return s
		}
		// Load the nodes unevenly first.
		for i := range r.IntN(30) {
			ids := make([]string, 1+r.IntN(20))
			for j := range ids {
				ids[j] = fmt.Sprintf("pre%03d%03d", i, j)
			}
			x.do(spawnCmd(randSpec(), ids...))
		}
		for range 5 {
			s := randSpec()
			need := claimFor(s, minGrant(s.Resources))
			n := 2 + r.IntN(300)
			want, wantErr := placeOneByOne(x.tb, s, need, n)
			got, gotErr := x.tb.placeReplicas(s, need, n)
			if fmt.Sprint(gotErr) != fmt.Sprint(wantErr) {
				t.Fatalf("seed %d, %d replicas of %v: error %v, want %v", seed, n, s, gotErr, wantErr)
			}
			if wantErr == nil && !slices.Equal(got, want) {
				t.Fatalf("seed %d, %d replicas of %v: nodes %v, want %v", seed, n, s, got, want)
			}
			if wantErr != nil && len(got) != len(want) {
				t.Fatalf("seed %d, %d replicas of %v: failed at replica %d, want %d", seed, n, s, len(got)+1, len(want)+1)
			}
		}
	}
}

// benchTable is an empty table for a benchmark and a function that applies
// a command to it at the next index (a millisecond apart), failing b on an
// error.
func benchTable(b *testing.B) (*Table, func(*pb.Command)) {
	tb := New()
	var index uint64
	return tb, func(cmd *pb.Command) {
		index++
		cmd.NowUnixNano = int64(index) * 1_000_000
		if err := tb.ApplyCommand(index, cmd).Err; err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkSpawn1000 applies a spawn of 1,000 replicas on 10,000 nodes
// that already hold 100,000 processes.
func BenchmarkSpawn1000(b *testing.B) {
	_, apply := benchTable(b)
	for i := range 10_000 {
		apply(nodeCmd(fmt.Sprintf("n%05d", i), 64*core, 256*gib))
	}
	s := spec(1)
	s.Resources.MemMinBytes = mib
	n := 0
	spawn := func() {
		ids := make([]string, 1000)
		for j := range ids {
			ids[j] = fmt.Sprintf("%012x", (uint64(n)*0x9E3779B97F4A7C15)>>16) // scattered, as NewID's are
			n++
		}
		apply(spawnCmd(s, ids...))
	}
	for range 100 {
		spawn()
	}
	b.ResetTimer()
	cpu0 := cpuTime()
	for range b.N {
		spawn()
	}
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N), "cpu-ns/op")
}

// BenchmarkRestore300k restores a snapshot of 300,000 processes on 3,000
// nodes.
func BenchmarkRestore300k(b *testing.B) {
	tb, apply := benchTable(b)
	for i := range 3000 {
		apply(nodeCmd(fmt.Sprintf("n%05d", i), 64*core, 256*gib))
	}
	s := spec(1)
	for k := range 300 {
		ids := make([]string, 1000)
		for j := range ids {
			ids[j] = fmt.Sprintf("%06x%06x", (j*7919)%1000, k)
		}
		apply(spawnCmd(s, ids...))
	}
	var buf bytes.Buffer
	if err := tb.Snapshot().Persist(&buf); err != nil {
		b.Fatal(err)
	}
	runtime.GC()
	b.ResetTimer()
	cpu0 := cpuTime()
	for range b.N {
		if err := New().Restore(bytes.NewReader(buf.Bytes())); err != nil {
			b.Fatal(err)
		}
	}
	// On a shared machine the CPU time is steadier than the wall time.
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N), "cpu-ns/op")
}

// cpuTime is the CPU time this process has used, user and system.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
