package main

import (
	"errors"
	"fmt"
	"math"
	"math/big"
	"strconv"
	"strings"
	"time"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/table"
)

// This file turns flag values into API values. The parsers return bare
// reasons ("negative value"); flagError adds the flag and value.

// parseCores parses a CPU amount in cores ("0.5", "2", ".25") or millicores
// ("250m") and returns millicores.
func parseCores(s string) (int64, error) {
	if strings.HasSuffix(s, "m") {
		n, err := parseCount(strings.TrimSuffix(s, "m"))
		if err != nil {
			return 0, err
		}
		return n, nil
	}
	r, err := parseDecimal(s)
	if err != nil {
		return 0, err
	}
	r.Mul(r, big.NewRat(1000, 1))
	if !r.IsInt() {
		return 0, errors.New("finer than 0.001 core")
	}
	return ratInt(r)
}

// parseBytes parses a byte count with an optional binary unit: K, M, G, T
// (also Ki/KiB/KB, lower case, and a bare B). "64M" is 64 MiB.
func parseBytes(s string) (int64, error) {
	i := strings.IndexFunc(s, func(c rune) bool { return !(c >= '0' && c <= '9' || c == '.' || c == '-' || c == '+') })
	num, unit := s, ""
	if i >= 0 {
		num, unit = s[:i], s[i:]
	}
	mult, ok := unitMultiplier(unit)
	if !ok {
		return 0, fmt.Errorf("unknown unit %q (use K, M, G or T)", unit)
	}
	r, err := parseDecimal(num)
	if err != nil {
		return 0, err
	}
	r.Mul(r, new(big.Rat).SetInt64(mult))
	if !r.IsInt() {
		return 0, errors.New("not a whole number of bytes")
	}
	return ratInt(r)
}

func unitMultiplier(unit string) (int64, bool) {
	u := strings.ToUpper(unit)
	if u != "B" {
		u = strings.TrimSuffix(u, "B")
	}
	u = strings.TrimSuffix(u, "I")
	switch u {
	case "", "B":
		return 1, unit == "" || strings.EqualFold(unit, "B")
	case "K":
		return 1 << 10, true
	case "M":
		return 1 << 20, true
	case "G":
		return 1 << 30, true
	case "T":
		return 1 << 40, true
	}
	return 0, false
}

// parseDecimal parses a non-negative decimal number ("12", "0.5", ".5")
// exactly.
func parseDecimal(s string) (*big.Rat, error) {
	if s == "" {
		return nil, errors.New("missing number")
	}
	if s[0] == '-' {
		return nil, errors.New("negative value")
	}
	s = strings.TrimPrefix(s, "+")
	digits := 0
	for i, c := range s {
		switch {
		case c >= '0' && c <= '9':
			digits++
		case c == '.' && !strings.Contains(s[i+1:], "."):
		default:
			return nil, errors.New("not a number")
		}
	}
	if digits == 0 || digits > 30 {
		return nil, errors.New("not a number")
	}
	r, ok := new(big.Rat).SetString(s)
	if !ok {
		return nil, errors.New("not a number")
	}
	return r, nil
}

func ratInt(r *big.Rat) (int64, error) {
	n := r.Num()
	if !n.IsInt64() {
		return 0, errors.New("too large")
	}
	return n.Int64(), nil
}

// parseCount parses a non-negative integer.
func parseCount(s string) (int64, error) {
	if s == "" {
		return 0, errors.New("missing number")
	}
	if strings.HasPrefix(s, "-") {
		return 0, errors.New("negative value")
	}
	n, err := strconv.ParseInt(strings.TrimPrefix(s, "+"), 10, 64)
	if err != nil {
		if errors.Is(err, strconv.ErrRange) {
			return 0, errors.New("too large")
		}
		return 0, errors.New("not a whole number")
	}
	return n, nil
}

// splitBounds splits "A[:B[:C]]" into at most n parts. Empty parts mean
// "not given"; at least one part must be non-empty.
func splitBounds(s string, n int, form string) ([]string, error) {
	parts := strings.Split(s, ":")
	if len(parts) > n {
		return nil, fmt.Errorf("too many parts (use %s)", form)
	}
	for _, p := range parts {
		if p != "" {
			return parts, nil
		}
	}
	return nil, fmt.Errorf("empty value (use %s)", form)
}

// parseCPU parses MIN[:MAX[:BURST]] in cores into millicores. Any part may be
// left empty (":2" sets only the max, "1:" only the min); zero means "not
// set". A single value ("1") is a fixed size: min = max.
func parseCPU(s string) (min, max, burst int64, err error) {
	parts, err := splitBounds(s, 3, "MIN[:MAX[:BURST]]")
	if err != nil {
		return 0, 0, 0, err
	}
	var v [3]int64
	for i, p := range parts {
		if p == "" {
			continue
		}
		if v[i], err = parseCores(p); err != nil {
			return 0, 0, 0, err
		}
	}
	if len(parts) == 1 { // one value is a fixed size, as docker --cpus reads it
		v[1] = v[0]
	}
	if v[1] > 0 && v[0] > v[1] {
		return 0, 0, 0, fmt.Errorf("min %s exceeds max %s", table.Cores(v[0]), table.Cores(v[1]))
	}
	return v[0], v[1], v[2], nil
}

// parseMem parses MIN[:MAX] byte counts. Either part may be left empty
// ("64M:" sets only the min). A single value ("64M") is a fixed size: min =
// max.
func parseMem(s string) (min, max int64, err error) {
	parts, err := splitBounds(s, 2, "MIN[:MAX]")
	if err != nil {
		return 0, 0, err
	}
	var v [2]int64
	for i, p := range parts {
		if p == "" {
			continue
		}
		if v[i], err = parseBytes(p); err != nil {
			return 0, 0, err
		}
	}
	if len(parts) == 1 { // one value is a fixed size, as docker --memory reads it
		v[1] = v[0]
	}
	if v[1] > 0 && v[0] > v[1] {
		return 0, 0, fmt.Errorf("min %s exceeds max %s", table.Bytes(v[0]), table.Bytes(v[1]))
	}
	return v[0], v[1], nil
}

// parsePids parses a process-count limit.
func parsePids(s string) (int64, error) { return parseCount(s) }

// signals maps Linux signal names (without "SIG") to numbers. Processes run
// on Linux nodes, so the numbers are Linux's whatever the client's OS.
var signals = map[string]int32{
	"HUP": 1, "INT": 2, "QUIT": 3, "ILL": 4, "TRAP": 5, "ABRT": 6, "IOT": 6,
	"BUS": 7, "FPE": 8, "KILL": 9, "USR1": 10, "SEGV": 11, "USR2": 12,
	"PIPE": 13, "ALRM": 14, "TERM": 15, "STKFLT": 16, "CHLD": 17, "CONT": 18,
	"STOP": 19, "TSTP": 20, "TTIN": 21, "TTOU": 22, "URG": 23, "XCPU": 24,
	"XFSZ": 25, "VTALRM": 26, "PROF": 27, "WINCH": 28, "IO": 29, "POLL": 29,
	"PWR": 30, "SYS": 31,
}

// parseSignal parses a signal name (TERM, SIGTERM, term) or number (1-64).
func parseSignal(s string) (int32, error) {
	if s == "" {
		return 0, errors.New("empty signal")
	}
	if s[0] >= '0' && s[0] <= '9' || s[0] == '-' {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > 64 {
			return 0, errors.New("signal number must be 1-64")
		}
		return int32(n), nil
	}
	name := strings.TrimPrefix(strings.ToUpper(s), "SIG")
	if n, ok := signals[name]; ok {
		return n, nil
	}
	return 0, errors.New("unknown signal (use a name like TERM, KILL, INT, HUP or a number)")
}

// parseRestart parses a restart policy name.
func parseRestart(s string) (pb.RestartPolicy, error) {
	switch strings.ToLower(s) {
	case "always":
		return pb.RestartPolicy_RESTART_POLICY_ALWAYS, nil
	case "on-failure", "on_failure":
		return pb.RestartPolicy_RESTART_POLICY_ON_FAILURE, nil
	case "never", "no":
		return pb.RestartPolicy_RESTART_POLICY_NEVER, nil
	}
	return 0, errors.New("use always, on-failure or never")
}

// parseIsolation parses an isolation mode name.
func parseIsolation(s string) (pb.Isolation, error) {
	switch strings.ToLower(s) {
	case "process":
		return pb.Isolation_ISOLATION_PROCESS, nil
	case "container":
		return pb.Isolation_ISOLATION_CONTAINER, nil
	case "vm":
		return pb.Isolation_ISOLATION_VM, nil
	case "host":
		return pb.Isolation_ISOLATION_HOST, nil
	}
	return 0, errors.New("use process, container, vm or host")
}

// parseMount parses NAME:PATH[:ro] (or :rw): a host path the node declares,
// where it appears in the sandbox.
func parseMount(s string) (*pb.Mount, error) {
	name, path, ok := strings.Cut(s, ":")
	if !ok || name == "" || path == "" {
		return nil, errors.New("use NAME:PATH[:ro], NAME a host path the node declares")
	}
	m := &pb.Mount{Name: name, Path: path}
	if p, found := strings.CutSuffix(path, ":ro"); found {
		m.Path, m.ReadOnly = p, true
	} else if p, found := strings.CutSuffix(path, ":rw"); found {
		m.Path = p
	}
	return m, nil
}

// parseNetwork parses a network mode name.
func parseNetwork(s string) (pb.Network, error) {
	switch strings.ToLower(s) {
	case "host":
		return pb.Network_NETWORK_HOST, nil
	case "none":
		return pb.Network_NETWORK_NONE, nil
	}
	return 0, errors.New("use host or none")
}

// parseUser checks a numeric UID[:GID].
func parseUser(s string) (string, error) {
	isID := func(p string) bool {
		n, err := strconv.ParseUint(p, 10, 32)
		return err == nil && n != math.MaxUint32
	}
	uid, gid, hasGID := strings.Cut(s, ":")
	if !isID(uid) || hasGID && !isID(gid) {
		return "", errors.New("use UID[:GID] with numeric ids")
	}
	return s, nil
}

// parseInterval parses a refresh interval: a Go duration ("500ms", "2s") or a
// number of seconds ("1.5").
func parseInterval(s string) (time.Duration, error) {
	d, err := time.ParseDuration(s)
	if err != nil {
		f, ferr := strconv.ParseFloat(s, 64)
		if ferr != nil || math.IsNaN(f) || math.IsInf(f, 0) {
			return 0, errors.New("use a duration like 2s or 500ms")
		}
		d = time.Duration(f * float64(time.Second))
	}
	if d <= 0 {
		return 0, errors.New("must be positive")
	}
	return d, nil
}

// parseOnLost parses what a cut-off node does with a process.
func parseOnLost(s string) (pb.OnLost, error) {
	switch strings.ToLower(s) {
	case "fence":
		return pb.OnLost_ON_LOST_FENCE, nil
	case "keep":
		return pb.OnLost_ON_LOST_KEEP, nil
	}
	return 0, errors.New("use fence or keep")
}

// boundsText says what a spawn or resize set, for the user to check:
// "cpu 1 (fixed), memory 64M:256M".
func boundsText(r *pb.Resources, cpu, mem bool) string {
	part := func(what string, min, max int64, f func(int64) string) string {
		switch {
		case min > 0 && min == max:
			return what + " " + f(min) + " (fixed: min = max)"
		case max == 0:
			return what + " min " + f(min) + ", no max"
		case min == 0:
			return what + " max " + f(max) + ", no min"
		}
		return what + " " + f(min) + " to " + f(max)
	}
	var out []string
	if cpu {
		c := part("cpu", r.GetCpuMinMilli(), r.GetCpuMaxMilli(), table.Cores)
		if b := r.GetCpuBurstMilli(); b > 0 {
			c += ", burst " + table.Cores(b)
		}
		out = append(out, c)
	}
	if mem {
		out = append(out, part("memory", r.GetMemMinBytes(), r.GetMemMaxBytes(), table.Bytes))
	}
	return strings.Join(out, "; ")
}
