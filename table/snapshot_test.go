package table

import (
	"bufio"
	"bytes"
	"fmt"
	"testing"

	"google.golang.org/protobuf/encoding/protodelim"
	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// A snapshot is length-delimited protobuf (protodelim) record by record,
// whichever way Persist and Restore encode it; a cut-off one fails to
// restore and leaves the table as it was.
func TestSnapshotFormat(t *testing.T) {
	x := newTester(t)
	x.ok(nodeCmd("n1", 4*core, 8*gib))
	for i := range 5 {
		x.ok(spawnCmd(spec(10), fmt.Sprintf("aaaaaa%06d", i)))
	}
	var b bytes.Buffer
	if err := x.tb.Snapshot().Persist(&b); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(bytes.NewReader(b.Bytes()))
	var hdr pb.SnapshotHeader
	if err := protodelim.UnmarshalFrom(r, &hdr); err != nil || hdr.ProcessCount != 5 || hdr.NodeCount != 1 {
		t.Fatalf("header %v: %v", &hdr, err)
	}
	if err := protodelim.UnmarshalFrom(r, &pb.NodeRecord{}); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		var p pb.ProcessRecord
		if err := protodelim.UnmarshalFrom(r, &p); err != nil || !proto.Equal(&p, x.get(p.Id)) {
			t.Fatalf("process %d: %v: %v", i, &p, err)
		}
	}
	if _, err := r.ReadByte(); err == nil {
		t.Fatal("bytes after the last record")
	}
	before := clone(t, x.tb)
	for _, n := range []int{b.Len() - 1, b.Len() - 7} {
		if err := x.tb.Restore(bytes.NewReader(b.Bytes()[:n])); err == nil {
			t.Fatalf("restored a snapshot cut to %d of %d bytes", n, b.Len())
		}
		if !Equal(before, x.tb) {
			t.Fatal("a failed restore changed the table")
		}
	}
}

// BenchmarkPersist300k writes a snapshot of 300,000 processes on 3,000
// nodes.
func BenchmarkPersist300k(b *testing.B) {
	tb := New()
	var index uint64
	for i := range 3000 {
		index++
		tb.ApplyCommand(index, nodeCmd(fmt.Sprintf("n%05d", i), 64*core, 256*gib))
	}
	for k := range 300 {
		ids := make([]string, 1000)
		for j := range ids {
			ids[j] = fmt.Sprintf("%06x%06x", (j*7919)%1000, k)
		}
		index++
		cmd := spawnCmd(spec(1), ids...)
		cmd.NowUnixNano = int64(index)
		if err := tb.ApplyCommand(index, cmd).Err; err != nil {
			b.Fatal(err)
		}
	}
	var buf bytes.Buffer
	b.ResetTimer()
	cpu0 := cpuTime()
	for range b.N {
		buf.Reset()
		if err := tb.Snapshot().Persist(&buf); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N), "cpu-ns/op")
}
