package table

import (
	"fmt"
	"strings"
	"testing"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Moves to make room are rate-limited cluster-wide: RoomMoves in any
// RoomWindow, counted from the records, so that every replica agrees.
func TestRoomMovesRateLimited(t *testing.T) {
	x := newTester(t)
	x.ok(nodeCmd("a", 100*core, (RoomMoves+6)*gib)) // full with the fillers and g
	var ids []string
	for i := range RoomMoves + 5 {
		ids = append(ids, fmt.Sprintf("f%02d", i))
	}
	s := spec(0)
	s.Resources.MemMinBytes, s.Resources.MemMaxBytes = gib, gib
	x.ok(spawnCmd(s, ids...))
	for _, id := range ids {
		x.ok(reportCmd("a", upd(id, 1, pb.ProcessState_PROCESS_STATE_RUNNING)))
	}
	g := pinned(spec(0), "a")
	g.Resources.MemMinBytes, g.Resources.MemMaxBytes, g.Grow = gib, 64*gib, pb.Grow_GROW_ON
	x.ok(spawnCmd(g, "g"))
	x.ok(reportCmd("a", upd("g", 1, pb.ProcessState_PROCESS_STATE_RUNNING)))
	x.ok(nodeCmd("b", 100*core, 64*gib))
	// a is full: every gigabyte more moves a filler, until the rate stops
	// it. The commands come 100 ms apart.
	moved := 0
	now := x.now
	at := func(c *pb.Command) *pb.Command {
		now += second / 10
		c.NowUnixNano = now
		return c
	}
	for i := 1; ; i++ {
		res := x.ok(at(&pb.Command{Op: &pb.Command_SetGrant{SetGrant: &pb.SetGrant{Id: "g",
			Grant: &pb.Grant{MemBytes: int64(1+i) * gib}}}}))
		if len(res.IDs) == 1 {
			if r := x.get("g"); !strings.Contains(r.WantReason, "the most allowed") {
				t.Fatalf("after %d moves the growth waits for %q", moved, r.WantReason)
			}
			break
		}
		moved += len(res.IDs) - 1
		for _, id := range res.IDs[1:] {
			x.ok(at(reportCmd("b", upd(id, 2, pb.ProcessState_PROCESS_STATE_RUNNING))))
		}
	}
	if moved != RoomMoves {
		t.Fatalf("%d moves before the limit, want %d", moved, RoomMoves)
	}
}

// Moves to make room go only to nodes that offer what the mover needs
// (Offers): its host paths, VMs. With no such node the growth waits.
func TestRoomMovesWhereOffered(t *testing.T) {
	x := newTester(t)
	x.ok(hostPathNode("a", "", &pb.HostPath{Name: "data"})) // 4G
	f := spec(0)
	f.Resources.MemMinBytes, f.Resources.MemMaxBytes = 3*gib, 3*gib
	f.Mounts = []*pb.Mount{{Name: "data", Path: "/data"}}
	x.ok(spawnCmd(f, "f"))
	x.ok(reportCmd("a", upd("f", 1, pb.ProcessState_PROCESS_STATE_RUNNING)))
	g := pinned(spec(0), "a")
	g.Resources.MemMinBytes, g.Resources.MemMaxBytes, g.Grow = gib/2, 4*gib, pb.Grow_GROW_ON
	x.ok(spawnCmd(g, "g"))
	x.ok(reportCmd("a", upd("g", 1, pb.ProcessState_PROCESS_STATE_RUNNING)))
	x.ok(hostPathNode("b", "")) // room, but no data
	grow := &pb.Command{Op: &pb.Command_SetGrant{SetGrant: &pb.SetGrant{Id: "g", Grant: &pb.Grant{MemBytes: 2 * gib}}}}
	x.ok(grow)
	if r := x.get("f"); r.MoveTo != "" {
		t.Fatalf("f moves to %s, which does not offer data", r.MoveTo)
	}
	if r := x.get("g"); r.Want == nil || r.WantReason == "" {
		t.Fatalf("g's growth does not wait: grant %v, want %v (%q)", r.Grant, r.Want, r.WantReason)
	}
	x.ok(hostPathNode("c", "", &pb.HostPath{Name: "data"}))
	x.ok(grow)
	if r := x.get("f"); r.MoveTo != "c" {
		t.Fatalf("f moves to %q, want c, the node that offers data", r.MoveTo)
	}
}
