package table

import (
	"strings"
	"testing"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// A new spawn pinned to a drained node is refused, naming the node and the
// way out, and changes nothing; with force it is placed there. Unpinned
// spawns go elsewhere, and undrained the node takes pinned work again.
func TestDrainedNodeRefusesPinnedSpawn(t *testing.T) {
	x := threeNodes(t)
	x.ok(drainCmd("n1", true))
	pinned := spec(100)
	pinned.Node = "n1"
	index := x.tb.Index()
	err := x.fail(spawnCmd(pinned, "a"), ErrDrained)
	if !strings.Contains(err.Error(), "n1") || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("refusal %q: want the node and --force named", err)
	}
	if x.tb.Get("a") != nil || x.tb.Index() != index {
		t.Fatal("a refused spawn changed the table")
	}
	x.ok(&pb.Command{Op: &pb.Command_Spawn{Spawn: &pb.Spawn{Ids: []string{"a"}, Spec: pinned, Force: true}}})
	if got := x.get("a").Node; got != "n1" {
		t.Fatalf("forced onto n1, placed on %q", got)
	}
	x.ok(spawnCmd(spec(100), "b"))
	if got := x.get("b").Node; got == "n1" {
		t.Fatal("an unpinned spawn was placed on the drained node")
	}
	x.ok(drainCmd("n1", false))
	x.ok(spawnCmd(pinned, "c"))
	if got := x.get("c").Node; got != "n1" {
		t.Fatalf("undrained, pinned to n1, placed on %q", got)
	}
}
