package server

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	"github.com/shim-run/shim/auth"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/table"
)

// Sandboxes and self tokens at the API.
//
// What a spec may ask for depends on who asks (checkSpawn): running as root
// (user or group 0), host isolation (no sandbox), and host paths (mounts, a
// root file system) need an admin token; everyone else runs as the user
// given, nobody by default, in a sandbox. Which paths a spec may name at
// all is the table's rule (table.ValidateSpec), whoever asks.
//
// A workload's self token (auth's self.go) is checked here, where the table
// is: its MAC against the cluster's CA key, and that it names the record's
// current incarnation of a process that has not ended (or the next one, of
// a process moving make-before-break). It lets the workload list its own
// record and change its own minimum within its maximum (selfList,
// checkSelfResize), and SetGrant its own grant; auth.Allow refuses it
// everything else. Servers hand a node the tokens of the processes it runs
// with their assignments (selfTokens).

// checkSpawn refuses a spec that would run as root or reach into the host
// unless the caller is an admin (or trust is off): user or group 0, host
// isolation, mounts of host paths and a root file system from one.
func checkSpawn(ctx context.Context, spec *pb.ProcessSpec) error {
	id := callerOf(ctx).id
	if id.Kind == auth.KindSelf || (id.Kind == auth.KindToken && id.Role == auth.RoleAdmin && !id.Unchecked) {
		return nil
	}
	deny := func(what string) error {
		return connect.NewError(connect.CodePermissionDenied, fmt.Errorf("%w: %s may not %s (an admin token may)",
			auth.ErrPermissionDenied, id, what))
	}
	uid, gid, _ := strings.Cut(spec.GetUser(), ":")
	switch {
	case spec.GetUser() != "" && (strings.TrimLeft(uid, "0") == "" || (gid != "" && strings.TrimLeft(gid, "0") == "")):
		return deny("spawn with user or group 0 (root)")
	case spec.GetIsolation() == pb.Isolation_ISOLATION_HOST:
		return deny("spawn with isolation host (no sandbox)")
	case len(spec.GetMounts()) > 0:
		return deny("mount host paths (--mount)")
	case spec.GetRootfs() != "":
		return deny("use a host path as root file system (--rootfs)")
	}
	return nil
}

// checkSelfToken checks a workload's self token. A worker holds no table:
// it passes the token on unchecked, and the server it forwards to decides.
func (s *Server) checkSelfToken(raw string) (auth.Identity, error) {
	tok, err := auth.ParseSelfToken(raw)
	if err != nil {
		return auth.Identity{}, fmt.Errorf("%w: %v", auth.ErrUnauthenticated, err)
	}
	id := auth.Identity{Kind: auth.KindWorkload, Role: auth.RoleSelf, Process: tok.Process, Incarnation: tok.Incarnation}
	if s.Table == nil {
		id.Unchecked = true
		return id, nil
	}
	tr := s.Table.Trust()
	if tr == nil || len(tr.CaKey) == 0 {
		return auth.Identity{}, fmt.Errorf("%w: the cluster's trust is not set up yet", auth.ErrUnauthenticated)
	}
	if !tok.Check(auth.SelfSecret(tr.CaKey), tr.ClusterId) {
		return auth.Identity{}, fmt.Errorf("%w: self token of process %s is not valid", auth.ErrUnauthenticated, tok.Process)
	}
	if !selfTokenLive(s.Table.Get(tok.Process), tok.Incarnation) {
		return auth.Identity{}, fmt.Errorf("%w: self token of process %s incarnation %d is no longer valid: that run ended or moved",
			auth.ErrUnauthenticated, tok.Process, tok.Incarnation)
	}
	return id, nil
}

// selfTokenLive reports whether the self token of incarnation inc of rec
// is good: the process has not ended, and inc is its incarnation (or the
// next, which a make-before-break move is starting).
func selfTokenLive(rec *pb.ProcessRecord, inc uint64) bool {
	if rec == nil || table.Terminal(rec.State) {
		return false
	}
	return inc == rec.Incarnation || (rec.MoveTo != "" && inc == rec.Incarnation+1)
}

// selfTokens are the self tokens of the incarnations node runs of recs:
// the record's own, or the next one for a process moving there. Nil when
// trust is off.
func (s *Server) selfTokens(node string, recs []*pb.ProcessRecord) map[string]string {
	tr := s.Table.Trust()
	if !s.secure() || tr == nil || len(tr.CaKey) == 0 || len(recs) == 0 {
		return nil
	}
	secret := auth.SelfSecret(tr.CaKey)
	out := make(map[string]string, len(recs))
	for _, r := range recs {
		inc := r.Incarnation
		switch {
		case table.Terminal(r.State):
			continue
		case r.MoveTo == node && r.Node != node:
			inc++
		}
		out[r.Id] = auth.NewSelfToken(secret, tr.ClusterId, r.Id, inc).String()
	}
	return out
}

// ownOnly refuses a workload's self token acting on another process.
func ownOnly(ctx context.Context, id string) error {
	return authError(auth.OwnProcess(callerOf(ctx).id, id))
}

// selfList narrows a workload's List to its own record: no ids means its
// own; any other id (even a name or prefix of its own) is refused.
func selfList(ctx context.Context, m *pb.ListRequest) (*pb.ListRequest, error) {
	id := callerOf(ctx).id
	if id.Kind != auth.KindWorkload {
		return m, nil
	}
	for _, ref := range m.Ids {
		if err := ownOnly(ctx, ref); err != nil {
			return nil, err
		}
	}
	m = proto.CloneOf(m)
	m.Ids, m.Node = []string{id.Process}, ""
	return m, nil
}

// checkSelfResize lets a workload's self token change only its own minimum
// (CPU and memory), within its maximum: nothing else, no move, and no
// raise of a minimum that has no maximum above it.
func checkSelfResize(ctx context.Context, m *pb.ResizeRequest, cur, r *pb.Resources) error {
	id := callerOf(ctx).id
	if id.Kind != auth.KindWorkload {
		return nil
	}
	deny := func(what string) error {
		return connect.NewError(connect.CodePermissionDenied, fmt.Errorf("%w: %s may not %s",
			auth.ErrPermissionDenied, id, what))
	}
	u := m.GetResources()
	switch {
	case m.Move:
		return deny("move itself (--move)")
	case u.GetCpuMaxMilli() != 0 || u.GetCpuBurstMilli() != 0 || u.GetMemMaxBytes() != 0 || u.GetPidsMax() != 0:
		return deny("change its own maximum, burst or pids: only its minimum, within its maximum")
	case slices.ContainsFunc(m.Clear, func(f string) bool { return f != "cpu_min" && f != "mem_min" }):
		return deny("clear a bound other than its minimum")
	case r.GetCpuMinMilli() > cur.GetCpuMinMilli() && cur.GetCpuMaxMilli() == 0:
		return deny("raise its CPU minimum: it has no CPU maximum to grow within")
	case r.GetMemMinBytes() > cur.GetMemMinBytes() && cur.GetMemMaxBytes() == 0:
		return deny("raise its memory minimum: it has no memory maximum to grow within")
	}
	return nil
}

// checkVMResize refuses what a running VM cannot do: its ceiling (maxmem,
// maxcpus) is fixed when it boots, so its maxima may not rise, and a
// minimum with no maximum (the VM's fixed size) may not either.
func checkVMResize(cur *pb.ProcessRecord, r *pb.Resources) error {
	if cur.GetSpec().GetIsolation() != pb.Isolation_ISOLATION_VM {
		return nil
	}
	old := cur.GetSpec().GetResources()
	fixed := func(what string, oldMax, newMax, oldMin, newMin int64, f func(int64) string) error {
		switch {
		case oldMax == 0 && (newMax != 0 || newMin > oldMin):
			return invalid("a VM's %s is fixed when it boots (it has no maximum): spawn it with a maximum to let it grow", what)
		case oldMax != 0 && (newMax == 0 || newMax > oldMax):
			return invalid("a VM's %s maximum is fixed when it boots (%s); spawn it again to raise it", what, f(oldMax))
		}
		return nil
	}
	if err := fixed("memory", old.GetMemMaxBytes(), r.GetMemMaxBytes(), old.GetMemMinBytes(), r.GetMemMinBytes(), table.Bytes); err != nil {
		return err
	}
	return fixed("CPU", old.GetCpuMaxMilli(), r.GetCpuMaxMilli(), old.GetCpuMinMilli(), r.GetCpuMinMilli(), table.Cores)
}

// validLogRef checks a logs request's process reference before anything
// makes a path of it: an id, id prefix or name, never a path.
func validLogRef(ref string) error {
	if ref == "" || ref == "." || ref == ".." || strings.ContainsAny(ref, "/\\\x00") || len(ref) > table.MaxIDLen {
		return invalid("logs: %q is not a process id or name", ref)
	}
	return nil
}
