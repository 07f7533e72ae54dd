package table

import (
	"fmt"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Drain means drain: a drained node takes no new work. Placement already
// skips it for unpinned processes; a new spawn pinned to it (spec.node) is
// refused too, unless the spawn says force. Processes already pinned there
// stay and restart there (they have nowhere else to go).

// spawnPinned applies a Spawn command, refusing a new process pinned to a
// drained node unless forced.
func (x *txn) spawnPinned(s *pb.Spawn) ([]string, error) {
	spec := s.GetSpec()
	if node := spec.GetNode(); node != "" && !s.GetForce() && !x.respawn(s.GetIds(), spec) {
		if n := x.t.nodes[node]; n != nil && n.Draining {
			return nil, fmt.Errorf("%w: node %s takes no new work (shim undrain %s, or spawn --force to pin it there anyway)",
				ErrDrained, node, node)
		}
	}
	return x.spawn(s.GetIds(), spec)
}
