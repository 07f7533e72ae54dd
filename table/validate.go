package table

import (
	"fmt"
	"path"
	"strings"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// Limits on what a spec may hold. The API also caps a request at 1 MiB.
const (
	MaxArgs      = 4096
	MaxNameLen   = 63
	MaxIDLen     = 64
	MaxSpawnIDs  = 10000
	historyLimit = 8
)

// ValidateSpec checks a process spec without looking at the table. Errors wrap
// ErrInvalid and name the offending field.
func ValidateSpec(s *pb.ProcessSpec) error {
	if s == nil || len(s.Command) == 0 || s.Command[0] == "" {
		return fmt.Errorf("%w: empty command", ErrInvalid)
	}
	if len(s.Command)+len(s.Env) > MaxArgs {
		return fmt.Errorf("%w: more than %d arguments and environment entries", ErrInvalid, MaxArgs)
	}
	if err := ValidateName(s.Name); err != nil {
		return err
	}
	for _, e := range s.Env {
		k, _, ok := strings.Cut(e, "=")
		if !ok || k == "" || strings.ContainsRune(k, 0) {
			return fmt.Errorf("%w: env %q is not KEY=VALUE", ErrInvalid, e)
		}
	}
	if s.Node != "" {
		if err := ValidateName(s.Node); err != nil {
			return fmt.Errorf("%w: node: %q", ErrInvalid, s.Node)
		}
	}
	if _, ok := pb.RestartPolicy_name[int32(s.Restart)]; !ok {
		return fmt.Errorf("%w: unknown restart policy %d", ErrInvalid, s.Restart)
	}
	if _, ok := pb.Isolation_name[int32(s.Isolation)]; !ok {
		return fmt.Errorf("%w: unknown isolation %d", ErrInvalid, s.Isolation)
	}
	if _, ok := pb.Network_name[int32(s.Network)]; !ok {
		return fmt.Errorf("%w: unknown network %d", ErrInvalid, s.Network)
	}
	if err := validateSandbox(s); err != nil {
		return err
	}
	if err := validateGrow(s); err != nil {
		return err
	}
	if err := ValidatePorts(s); err != nil {
		return err
	}
	return ValidateResources(s.Resources)
}

// MaxMounts bounds a spec's mounts.
const MaxMounts = 32

// SandboxDirs are a sandbox's own writable folders: a working directory
// must be one of them, inside one, or inside a mount.
var SandboxDirs = []string{"/work", "/tmp"}

// reservedTargets are the sandbox's own mount points and the host system
// folders it sees read-only (exec's): a mount may neither be one nor lie
// above or below one.
var reservedTargets = []string{"/proc", "/dev", "/sys", "/tmp", "/work",
	"/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"}

// validateSandbox checks the paths of a spec, which name places inside its
// sandbox or host paths its node declared, never the node's own files: the
// working directory is absolute and clean, and inside the sandbox's own
// folders (/work, /tmp) or a mount (any absolute path with host isolation;
// none in a VM, which starts in its work folder); mounts name a declared
// host path (NAME) and an absolute, clean target that overlaps neither
// another nor the sandbox's own; a root file system (containers only) is a
// declared host path or a folder in one: NAME[/SUB].
func validateSandbox(s *pb.ProcessSpec) error {
	iso := s.Isolation
	if u := s.User; u != "" {
		uid, gid, hasGID := strings.Cut(u, ":")
		if !numeric(uid) || (hasGID && !numeric(gid)) {
			return fmt.Errorf("%w: user %q: want UID[:GID], numbers", ErrInvalid, u)
		}
	}
	if len(s.Mounts) > MaxMounts {
		return fmt.Errorf("%w: more than %d mounts", ErrInvalid, MaxMounts)
	}
	if len(s.Mounts) > 0 && (iso == pb.Isolation_ISOLATION_HOST || iso == pb.Isolation_ISOLATION_VM) {
		return fmt.Errorf("%w: mounts need a process or container sandbox (host isolation sees the host's files; a VM takes none yet)", ErrInvalid)
	}
	var targets []string
	for _, m := range s.Mounts {
		if m.GetName() == "" || ValidateName(m.GetName()) != nil {
			return fmt.Errorf("%w: mount %q: the host path's name is 1-63 letters, digits, '.', '_' or '-'", ErrInvalid, m.GetName())
		}
		t := m.GetPath()
		if !cleanAbs(t) || t == "/" {
			return fmt.Errorf("%w: mount %s:%s: the target must be an absolute, clean path other than /", ErrInvalid, m.GetName(), t)
		}
		for _, o := range append(targets, reservedTargets...) {
			if t == o || strings.HasPrefix(t, o+"/") || strings.HasPrefix(o, t+"/") {
				return fmt.Errorf("%w: mount target %s overlaps %s", ErrInvalid, t, o)
			}
		}
		targets = append(targets, t)
	}
	if r := s.Rootfs; r != "" {
		if iso != pb.Isolation_ISOLATION_CONTAINER {
			return fmt.Errorf("%w: a root file system (--rootfs) needs container isolation", ErrInvalid)
		}
		if _, _, err := SplitHostPath(r); err != nil {
			return err
		}
	}
	d := s.Dir
	switch {
	case d == "":
		return nil
	case !cleanAbs(d):
		return fmt.Errorf("%w: working directory %q must be an absolute, clean path (a process may run on another host than the CLI's)", ErrInvalid, d)
	case iso == pb.Isolation_ISOLATION_HOST:
		return nil
	case iso == pb.Isolation_ISOLATION_VM:
		return fmt.Errorf("%w: working directory %s: a VM starts in its work folder (leave --dir out)", ErrInvalid, d)
	}
	for _, in := range append(targets, SandboxDirs...) {
		if d == in || strings.HasPrefix(d, in+"/") {
			return nil
		}
	}
	return fmt.Errorf("%w: working directory %s is outside the sandbox's own folders (/work, /tmp) and its mounts", ErrInvalid, d)
}

// numeric reports whether s is a decimal uid or gid (0 to 2^32-2).
func numeric(s string) bool {
	if s == "" || len(s) > 10 {
		return false
	}
	var n uint64
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
		n = n*10 + uint64(c-'0')
	}
	return n < 1<<32-1
}

// cleanAbs reports whether p is an absolute path in canonical form: no
// "..", ".", doubled or trailing slashes.
func cleanAbs(p string) bool {
	return strings.HasPrefix(p, "/") && path.Clean(p) == p && !strings.ContainsRune(p, 0)
}

// SplitHostPath splits a root file system NAME[/SUB] into the declared host
// path's name and the folder inside it ("" for the host path itself).
func SplitHostPath(r string) (name, sub string, err error) {
	name, sub, _ = strings.Cut(r, "/")
	if name == "" || ValidateName(name) != nil {
		return "", "", fmt.Errorf("%w: root file system %q: want NAME[/SUB], a host path the node declares (shimd --host-path NAME=DIR) or a folder in it", ErrInvalid, r)
	}
	if sub != "" && (path.Clean(sub) != sub || sub == ".." || strings.HasPrefix(sub, "../") || strings.HasPrefix(sub, "/") || strings.ContainsRune(sub, 0)) {
		return "", "", fmt.Errorf("%w: root file system %q: the folder inside %s must be a clean relative path", ErrInvalid, r, name)
	}
	return name, sub, nil
}

// Offers reports why node n cannot run spec, or nil: a VM on a node
// without QEMU, or a host path (a mount or the root file system) the node
// does not declare, or declares read-only for a read-write mount.
// Placement skips such nodes; a spec pinned to one is refused.
func Offers(n *pb.NodeRecord, spec *pb.ProcessSpec) error {
	if spec.GetIsolation() == pb.Isolation_ISOLATION_VM && n.GetVmUnavailable() != "" {
		return fmt.Errorf("node %s cannot run VMs: %s", n.GetName(), n.GetVmUnavailable())
	}
	if len(spec.GetMounts()) == 0 && spec.GetRootfs() == "" {
		return nil
	}
	offered := func(name string) *pb.HostPath {
		for _, h := range n.GetHostPaths() {
			if h.GetName() == name {
				return h
			}
		}
		return nil
	}
	for _, m := range spec.GetMounts() {
		h := offered(m.GetName())
		if h == nil {
			return fmt.Errorf("node %s does not offer host path %s", n.GetName(), m.GetName())
		}
		if h.GetReadOnly() && !m.GetReadOnly() {
			return fmt.Errorf("node %s offers host path %s read-only (mount it with :ro)", n.GetName(), m.GetName())
		}
	}
	if r := spec.GetRootfs(); r != "" {
		name, _, _ := SplitHostPath(r)
		if offered(name) == nil {
			return fmt.Errorf("node %s does not offer host path %s (the root file system)", n.GetName(), name)
		}
	}
	return nil
}

// ValidateResources checks that bounds are non-negative and ordered.
func ValidateResources(r *pb.Resources) error {
	if r == nil {
		return nil
	}
	for _, f := range []struct {
		name string
		v    int64
	}{
		{"cpu min", r.CpuMinMilli}, {"cpu max", r.CpuMaxMilli}, {"cpu burst", r.CpuBurstMilli},
		{"memory min", r.MemMinBytes}, {"memory max", r.MemMaxBytes}, {"pids", r.PidsMax},
	} {
		if f.v < 0 {
			return fmt.Errorf("%w: %s is negative", ErrInvalid, f.name)
		}
	}
	if r.CpuMaxMilli > 0 && r.CpuMinMilli > r.CpuMaxMilli {
		return fmt.Errorf("%w: cpu min %s exceeds max %s", ErrInvalid, Cores(r.CpuMinMilli), Cores(r.CpuMaxMilli))
	}
	if r.CpuBurstMilli > 0 && r.CpuMaxMilli == 0 {
		return fmt.Errorf("%w: cpu burst needs a cpu max", ErrInvalid)
	}
	if r.MemMaxBytes > 0 && r.MemMinBytes > r.MemMaxBytes {
		return fmt.Errorf("%w: memory min %s exceeds max %s", ErrInvalid, Bytes(r.MemMinBytes), Bytes(r.MemMaxBytes))
	}
	return nil
}

// ValidateName checks a process or node name: 1-63 characters of letters,
// digits, '.', '_' and '-'. The empty name is allowed (it means "none").
func ValidateName(n string) error {
	if len(n) > MaxNameLen {
		return fmt.Errorf("%w: name %.20q... is longer than %d characters", ErrInvalid, n, MaxNameLen)
	}
	for _, c := range n {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("%w: name %q may hold only letters, digits, '.', '_' and '-'", ErrInvalid, n)
		}
	}
	return nil
}

// ValidateID checks a process ID: 1-64 lower-case letters, digits and '-'.
func ValidateID(id string) error {
	if id == "" || len(id) > MaxIDLen {
		return fmt.Errorf("%w: process id %.20q must be 1-%d characters", ErrInvalid, id, MaxIDLen)
	}
	for _, c := range id {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return fmt.Errorf("%w: process id %q may hold only a-z, 0-9 and '-'", ErrInvalid, id)
		}
	}
	return nil
}

// Cores formats millicores as cores ("0.5", "2", "-1.25").
func Cores(milli int64) string {
	sign, u := "", uint64(milli)
	if milli < 0 {
		sign, u = "-", -u // two's complement: right for MinInt64 too
	}
	if u%1000 == 0 {
		return fmt.Sprintf("%s%d", sign, u/1000)
	}
	return sign + strings.TrimRight(fmt.Sprintf("%d.%03d", u/1000, u%1000), "0")
}

// Bytes formats a byte count with a binary suffix ("64M", "1.5G").
func Bytes(b int64) string {
	const unit = 1024
	if b < unit {
		return fmt.Sprintf("%d", b)
	}
	suffixes := "KMGTPE"
	v, i := float64(b)/unit, 0
	// Step up a unit when v would round to 1024 ("1M", not "1024K").
	for v >= unit-0.05 && i < len(suffixes)-1 {
		v /= unit
		i++
	}
	s := fmt.Sprintf("%.1f", v)
	s = strings.TrimSuffix(s, ".0")
	return s + string(suffixes[i])
}

// validateGrow checks a spec's grow mode and priority.
func validateGrow(s *pb.ProcessSpec) error {
	if _, ok := pb.Grow_name[int32(s.Grow)]; !ok {
		return fmt.Errorf("%w: unknown grow mode %d", ErrInvalid, s.Grow)
	}
	if s.Grow != pb.Grow_GROW_OFF && s.Resources.GetCpuMaxMilli() == 0 && s.Resources.GetMemMaxBytes() == 0 {
		return fmt.Errorf("%w: grow needs a cpu or memory max to grow to", ErrInvalid)
	}
	if p := Priority(s); p < 0 || p > MaxPriority {
		return fmt.Errorf("%w: priority %d is outside 0-%d", ErrInvalid, p, MaxPriority)
	}
	return nil
}
