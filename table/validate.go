package table

import (
	"fmt"
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
	if err := validateGrow(s); err != nil {
		return err
	}
	return ValidateResources(s.Resources)
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
