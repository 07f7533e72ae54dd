package server

import (
	"bytes"
	"testing"

	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/table"
)

// The watermark moves with every entry the FSM applies, failed commands
// included, and with a restore; the table's index rolls back on failure.
func TestFSMWatermark(t *testing.T) {
	f := &FSM{Table: table.New(), Watch: NewWatcher()}
	enc := func(c *pb.Command) []byte {
		b, err := proto.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	node := &pb.Command{NowUnixNano: 1, Op: &pb.Command_RegisterNode{RegisterNode: &pb.RegisterNode{Node: &pb.NodeRecord{
		Name: "n1", Capacity: &pb.Resources{CpuMaxMilli: 1000, MemMaxBytes: 1 << 30}}}}}
	if r := f.Apply(3, enc(node)).(table.Result); r.Err != nil {
		t.Fatal(r.Err)
	}
	ch := f.Watch.Any()
	tooBig := &pb.Command{NowUnixNano: 2, Op: &pb.Command_Spawn{Spawn: &pb.Spawn{Ids: []string{"p1"},
		Spec: &pb.ProcessSpec{Command: []string{"/bin/true"}, Resources: &pb.Resources{CpuMinMilli: 5000}}}}}
	if r := f.Apply(7, enc(tooBig)).(table.Result); r.Err == nil {
		t.Fatal("a spawn bigger than the cluster succeeded")
	}
	if got := f.Watch.applied.load(); got != 7 || f.Table.Index() != 3 {
		t.Fatalf("after a failed command at 7: watermark %d, table index %d; want 7 and 3", got, f.Table.Index())
	}
	select {
	case <-ch:
	default:
		t.Fatal("a failed command woke no watcher")
	}

	var buf bytes.Buffer
	if err := f.Table.Snapshot().Persist(&buf); err != nil {
		t.Fatal(err)
	}
	g := &FSM{Table: table.New(), Watch: NewWatcher()}
	if err := g.Restore(&buf); err != nil {
		t.Fatal(err)
	}
	if got := g.Watch.applied.load(); got != 7 {
		t.Fatalf("restored watermark %d, want 7", got)
	}
	g.Watch.applied.raise(5)
	if got := g.Watch.applied.load(); got != 7 {
		t.Fatalf("watermark moved back to %d", got)
	}
}
