package main

import (
	"fmt"
	"io"
	"testing"

	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// BenchmarkPsJSON100k times `ps -o json` of 100,000 records after the wire:
// protobuf decoding, views and JSON.
func BenchmarkPsJSON100k(b *testing.B) {
	var recs []*pb.ProcessRecord
	for i := range 100000 {
		recs = append(recs, &pb.ProcessRecord{Id: fmt.Sprintf("p%07x", i), Node: fmt.Sprintf("sim-%04d", i%1000),
			State: pb.ProcessState_PROCESS_STATE_RUNNING, Pid: int64(1000 + i), Incarnation: 1,
			CreatedUnixNano: 1700000000000000000 + int64(i), StartedUnixNano: 1700000000000000000 + int64(i),
			UpdatedUnixNano: 1700000000000000000 + int64(i),
			Spec: &pb.ProcessSpec{Name: fmt.Sprintf("w%d", i), Command: []string{"/bin/sleep", "100000"},
				Resources: &pb.Resources{CpuMinMilli: 10, MemMinBytes: 1 << 20}}})
	}
	resp := &pb.ListResponse{Processes: recs}
	raw, _ := proto.Marshal(resp)
	b.Logf("proto %d bytes", len(raw))
	a := &app{}
	b.ResetTimer()
	for range b.N {
		var r pb.ListResponse
		if err := proto.Unmarshal(raw, &r); err != nil {
			b.Fatal(err)
		}
		if err := a.printProcesses(io.Discard, r.Processes, "json", false); err != nil {
			b.Fatal(err)
		}
	}
}
