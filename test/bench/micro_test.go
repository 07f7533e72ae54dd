package main

// In-process micro-benchmarks behind the explanations in BENCHMARKS.md. They
// need no root and no cluster:
//
//	go test -tags seccomp -run - -bench . -benchtime 2s ./test/bench
//	go test -tags seccomp -run - -bench Place -cpuprofile /tmp/place.pprof ./test/bench
//	go tool pprof -top /tmp/place.pprof

import (
	"bytes"
	"compress/gzip"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"testing"

	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/table"
)

func newIDs(n int) []string {
	ids := make([]string, n)
	for i := range ids {
		var b [6]byte
		_, _ = rand.Read(b[:])
		ids[i] = hex.EncodeToString(b[:])
	}
	return ids
}

// tableWith registers nodes (and servers of them as servers).
func tableWith(b *testing.B, nodes, servers int) *table.Table {
	b.Helper()
	t := table.New()
	for i := range nodes {
		role := pb.NodeRole_NODE_ROLE_WORKER
		if i < servers {
			role = pb.NodeRole_NODE_ROLE_SERVER
		}
		res := t.ApplyCommand(uint64(i+1), &pb.Command{NowUnixNano: 1, Op: &pb.Command_RegisterNode{RegisterNode: &pb.RegisterNode{
			Node: &pb.NodeRecord{Name: fmt.Sprintf("n%05d", i), Role: role, ApiAddr: "127.0.0.1:1",
				Capacity: &pb.Resources{CpuMaxMilli: 2000, MemMaxBytes: 24 << 30}, OvercommitPercent: 200}}}})
		if res.Err != nil {
			b.Fatal(res.Err)
		}
	}
	return t
}

// BenchmarkPlace measures the table's apply of one Spawn{Count: 1000}: the
// placement scan is O(nodes) per replica. Reported per placed process.
func BenchmarkPlace(b *testing.B) {
	for _, nodes := range []int{100, 1000, 5000} {
		b.Run(fmt.Sprintf("nodes=%d", nodes), func(b *testing.B) {
			t := tableWith(b, nodes, 0)
			spec := &pb.ProcessSpec{Command: []string{"/bin/sleep", "1"}, Resources: &pb.Resources{}}
			idx := uint64(nodes + 1)
			b.ResetTimer()
			for b.Loop() {
				idx++
				res := t.ApplyCommand(idx, &pb.Command{NowUnixNano: 2, Op: &pb.Command_Spawn{Spawn: &pb.Spawn{Ids: newIDs(1000), Spec: spec}}})
				if res.Err != nil {
					b.Fatal(res.Err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/1000/1000, "µs/placement")
		})
	}
}

// BenchmarkTableNodes is what every Heartbeat pays on the leader to list the
// server addresses (server.(*Server).serverAPIs walks Table.Nodes).
func BenchmarkTableNodes(b *testing.B) {
	for _, nodes := range []int{100, 1000, 5000} {
		b.Run(fmt.Sprintf("nodes=%d", nodes), func(b *testing.B) {
			t := tableWith(b, nodes, 3)
			b.ReportAllocs()
			for b.Loop() {
				var out []string
				for _, v := range t.Nodes() {
					if v.Node.Role == pb.NodeRole_NODE_ROLE_SERVER && v.Node.State == pb.NodeState_NODE_STATE_UP {
						out = append(out, v.Node.ApiAddr)
					}
				}
				if len(out) != 3 {
					b.Fatal(out)
				}
			}
		})
	}
}

// BenchmarkGzipSmall is what Connect spends per response when it gzips a
// small message (its default: compress every message when the client
// accepts gzip, which Connect clients always advertise).
func BenchmarkGzipSmall(b *testing.B) {
	msg, _ := proto.Marshal(&pb.HeartbeatResponse{LeaseMillis: 1000, Known: true, State: pb.NodeState_NODE_STATE_UP,
		Index: 123456, Servers: []string{"127.0.0.1:7070", "127.0.0.1:7080", "127.0.0.1:7090"}})
	var buf bytes.Buffer
	w := gzip.NewWriter(&buf)
	b.ReportAllocs()
	for b.Loop() {
		buf.Reset()
		w.Reset(&buf) // Connect pools writers and resets one per message
		_, _ = w.Write(msg)
		_ = w.Close()
	}
	b.ReportMetric(float64(len(msg)), "bytes-in")
	b.ReportMetric(float64(buf.Len()), "bytes-out")
}

// BenchmarkEvacuate measures marking a node with 1000 processes down (its
// processes are cloned and re-placed).
func BenchmarkEvacuate(b *testing.B) {
	t := tableWith(b, 100, 0)
	spec := &pb.ProcessSpec{Command: []string{"/bin/sleep", "1"}, Resources: &pb.Resources{}}
	idx := uint64(1000)
	for range 100 {
		idx++
		if res := t.ApplyCommand(idx, &pb.Command{NowUnixNano: 2, Op: &pb.Command_Spawn{Spawn: &pb.Spawn{Ids: newIDs(1000), Spec: spec}}}); res.Err != nil {
			b.Fatal(res.Err)
		}
	}
	i := 0
	for b.Loop() {
		name := fmt.Sprintf("n%05d", i%100)
		i++
		for _, st := range []pb.NodeState{pb.NodeState_NODE_STATE_DOWN, pb.NodeState_NODE_STATE_UP} {
			idx++
			if res := t.ApplyCommand(idx, &pb.Command{NowUnixNano: 3, Op: &pb.Command_SetNodeState{SetNodeState: &pb.SetNodeState{
				Name: name, State: st}}}); res.Err != nil {
				b.Fatal(res.Err)
			}
		}
	}
}

// BenchmarkList100k measures what the server does for `shim ps` over a table
// of 100,000 processes on 1,000 nodes: collect and sort the records
// (Table.Processes), then encode the answer.
func BenchmarkList100k(b *testing.B) {
	t, err := buildTable(1000, 100000)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("processes", func(b *testing.B) {
		for b.Loop() {
			if n := len(t.Processes(false, "")); n != 100000 {
				b.Fatal(n)
			}
		}
	})
	recs := t.Processes(false, "")
	b.Run("marshal", func(b *testing.B) {
		var size int
		for b.Loop() {
			out, err := proto.Marshal(&pb.ListResponse{Processes: recs})
			if err != nil {
				b.Fatal(err)
			}
			size = len(out)
		}
		b.ReportMetric(float64(size)/1e6, "MB")
	})
}
