package table

import (
	"fmt"
	"slices"
	"strings"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Ports: a process asks for named ports (ProcessSpec.ports), fixed or picked
// from its node's range (NodeRecord.port_min, port_max); they are chosen
// when it is placed (put calls assignPorts), kept in its record, and a
// fixed one is a placement constraint (placeWith calls pickPorts).

// Default port range of a node that declares none.
const (
	DefaultPortMin = 20000
	DefaultPortMax = 32000
)

func portRange(n *pb.NodeRecord) (uint32, uint32) {
	if n.GetPortMin() == 0 || n.GetPortMax() < n.GetPortMin() {
		return DefaultPortMin, DefaultPortMax
	}
	return n.GetPortMin(), n.GetPortMax()
}

// usedPorts returns the ports the live processes on node hold, and those
// this command has handed out there already.
func (t *Table) usedPorts(node string) map[uint32]bool {
	used := map[uint32]bool{}
	for id := range t.byNode[node] {
		r := t.procs[id]
		ps := r.Ports
		if r.Node != node {
			if r.MoveTo != node {
				continue
			}
			ps = r.MovePorts // moving here: its next incarnation's
		}
		for _, p := range ps {
			used[p] = true
		}
	}
	for p := range t.txPorts[node] {
		used[p] = true
	}
	return used
}

// pickPorts chooses the ports of a process with spec on node: fixed ones
// as asked, the others from the node's range (keeping prev's where free).
func (t *Table) pickPorts(spec *pb.ProcessSpec, node string, prev map[string]uint32) (map[string]uint32, error) {
	if len(spec.GetPorts()) == 0 {
		return nil, nil
	}
	used := t.usedPorts(node)
	lo, hi := portRange(t.nodes[node])
	out := make(map[string]uint32, len(spec.Ports))
	for _, p := range spec.Ports {
		if p.Port != 0 {
			if used[p.Port] {
				return nil, fmt.Errorf("port %d is taken on %s", p.Port, node)
			}
			out[p.Name], used[p.Port] = p.Port, true
		}
	}
	next := lo
	for _, p := range spec.Ports {
		if p.Port != 0 {
			continue
		}
		if q := prev[p.Name]; q >= lo && q <= hi && !used[q] {
			out[p.Name], used[q] = q, true
			continue
		}
		for next <= hi && used[next] {
			next++
		}
		if next > hi {
			return nil, fmt.Errorf("no free port in %d-%d on %s", lo, hi, node)
		}
		out[p.Name], used[next] = next, true
	}
	return out, nil
}

// holdPorts notes ports handed out by this command but not yet in a
// stored record (the replicas of one spawn).
func (t *Table) holdPorts(node string, ports map[string]uint32) {
	if len(ports) == 0 {
		return
	}
	if t.txPorts == nil {
		t.txPorts = map[string]map[uint32]bool{}
	}
	m := t.txPorts[node]
	if m == nil {
		m = map[uint32]bool{}
		t.txPorts[node] = m
	}
	for _, p := range ports {
		m[p] = true
	}
}

// assignPorts gives rec the ports of its node, if it asks for any and has
// none there yet (called by put).
func (t *Table) assignPorts(old, rec *pb.ProcessRecord) {
	if len(rec.Spec.GetPorts()) == 0 {
		return
	}
	if !live(rec) || rec.Node == "" {
		rec.Ports, rec.MovePorts = nil, nil
		return
	}
	switch {
	case old != nil && old.MoveTo != "" && old.MoveTo == rec.Node && old.Node != rec.Node && len(old.MovePorts) > 0:
		// The move landed: its new incarnation started with these.
		rec.Ports = old.MovePorts
	case old != nil && old.Node == rec.Node && len(rec.Ports) == len(rec.Spec.Ports):
	default:
		if ps, err := t.pickPorts(rec.Spec, rec.Node, rec.Ports); err == nil {
			rec.Ports = ps
		}
	}
	switch {
	case rec.MoveTo == "":
		rec.MovePorts = nil
	case old == nil || old.MoveTo != rec.MoveTo || len(rec.MovePorts) != len(rec.Spec.Ports):
		// Moving make-before-break: the next incarnation starts there
		// before this one stops, with ports free there (these if it can).
		if ps, err := t.pickPorts(rec.Spec, rec.MoveTo, rec.Ports); err == nil {
			rec.MovePorts = ps
		}
	}
}

// PortsOn returns rec's ports on node: its move's while it moves there.
func PortsOn(rec *pb.ProcessRecord, node string) map[string]uint32 {
	if rec.MoveTo != "" && rec.MoveTo == node && rec.MovePorts != nil {
		return rec.MovePorts
	}
	return rec.Ports
}

// ValidatePorts checks a spec's ports and health check.
func ValidatePorts(s *pb.ProcessSpec) error {
	if len(s.GetPorts()) > 16 {
		return fmt.Errorf("%w: more than 16 ports", ErrInvalid)
	}
	if len(s.GetPorts()) > 0 || (s.GetCheck() != nil && s.GetCheck().GetKind() != "exec") {
		switch {
		case s.GetIsolation() == pb.Isolation_ISOLATION_VM:
			return fmt.Errorf("%w: a VM has no network: no ports or http/tcp checks", ErrInvalid)
		case s.GetNetwork() == pb.Network_NETWORK_NONE:
			return fmt.Errorf("%w: --net none has no network the node reaches: no ports or http/tcp checks", ErrInvalid)
		}
	}
	seen := map[string]bool{}
	for _, p := range s.GetPorts() {
		if p.GetName() == "" || len(p.Name) > 32 {
			return fmt.Errorf("%w: port name %q must be 1-32 characters", ErrInvalid, p.GetName())
		}
		for _, c := range p.Name {
			if !(c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_') {
				return fmt.Errorf("%w: port name %q may hold only A-Z, 0-9 and '_'", ErrInvalid, p.Name)
			}
		}
		if seen[p.Name] {
			return fmt.Errorf("%w: port %s asked twice", ErrInvalid, p.Name)
		}
		seen[p.Name] = true
		if p.Port > 65535 {
			return fmt.Errorf("%w: port %d is not 1-65535", ErrInvalid, p.Port)
		}
	}
	c := s.GetCheck()
	if c == nil {
		return nil
	}
	switch c.Kind {
	case "http", "tcp":
		if !seen[c.Port] {
			return fmt.Errorf("%w: check %s:%s names no port of the process (ports: %s)", ErrInvalid, c.Kind, c.Port, portNames(s))
		}
		if c.Kind == "http" && !strings.HasPrefix(c.Path, "/") {
			return fmt.Errorf("%w: check http path %q must start with /", ErrInvalid, c.Path)
		}
	case "exec":
		if len(c.Command) == 0 || c.Command[0] == "" {
			return fmt.Errorf("%w: check exec needs a command", ErrInvalid)
		}
	default:
		return fmt.Errorf("%w: check kind %q (want http, tcp or exec)", ErrInvalid, c.Kind)
	}
	if c.IntervalMillis < 0 || c.TimeoutMillis < 0 {
		return fmt.Errorf("%w: negative check interval or timeout", ErrInvalid)
	}
	return nil
}

func portNames(s *pb.ProcessSpec) string {
	var names []string
	for _, p := range s.GetPorts() {
		names = append(names, p.Name)
	}
	if len(names) == 0 {
		return "none"
	}
	slices.Sort(names)
	return strings.Join(names, ", ")
}
