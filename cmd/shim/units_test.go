package main

import (
	"testing"
	"time"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// errText is "" for a nil error.
func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func TestParseCores(t *testing.T) {
	for _, c := range []struct {
		in   string
		want int64
		err  string
	}{
		{"0.5", 500, ""}, {"2", 2000, ""}, {"0.25", 250, ""}, {".5", 500, ""}, {"1.", 1000, ""},
		{"0.001", 1, ""}, {"250m", 250, ""}, {"+1", 1000, ""}, {"0", 0, ""},
		{"0.0005", 0, "finer than 0.001 core"},
		{"-1", 0, "negative value"}, {"-0.5", 0, "negative value"},
		{"", 0, "missing number"}, {"m", 0, "missing number"},
		{"abc", 0, "not a number"}, {"1.2.3", 0, "not a number"}, {".", 0, "not a number"},
		{"1e3", 0, "not a number"}, {"inf", 0, "not a number"}, {"NaN", 0, "not a number"},
		{"0.5m", 0, "not a whole number"}, {"99999999999999999", 0, "too large"},
	} {
		got, err := parseCores(c.in)
		if got != c.want || errText(err) != c.err {
			t.Errorf("parseCores(%q) = %d, %q; want %d, %q", c.in, got, errText(err), c.want, c.err)
		}
	}
}

func TestParseBytes(t *testing.T) {
	for _, c := range []struct {
		in   string
		want int64
		err  string
	}{
		{"0", 0, ""}, {"100", 100, ""}, {"100B", 100, ""}, {"100b", 100, ""},
		{"64K", 64 << 10, ""}, {"64k", 64 << 10, ""}, {"64M", 64 << 20, ""}, {"64m", 64 << 20, ""},
		{"2G", 2 << 30, ""}, {"1T", 1 << 40, ""},
		{"64Mi", 64 << 20, ""}, {"64MiB", 64 << 20, ""}, {"64MB", 64 << 20, ""}, {"1Ki", 1024, ""},
		{"1Gi", 1 << 30, ""}, {"1.5G", 3 << 29, ""}, {"0.5K", 512, ""},
		{"12X", 0, `unknown unit "X" (use K, M, G or T)`},
		{"12KX", 0, `unknown unit "KX" (use K, M, G or T)`},
		{"12BB", 0, `unknown unit "BB" (use K, M, G or T)`},
		{"12iB", 0, `unknown unit "iB" (use K, M, G or T)`},
		{"1e3", 0, `unknown unit "e3" (use K, M, G or T)`},
		{"1.5", 0, "not a whole number of bytes"},
		{"-1M", 0, "negative value"}, {"", 0, "missing number"}, {"M", 0, "missing number"},
		{"1.2.3M", 0, "not a number"}, {"9000000T", 0, "too large"},
	} {
		got, err := parseBytes(c.in)
		if got != c.want || errText(err) != c.err {
			t.Errorf("parseBytes(%q) = %d, %q; want %d, %q", c.in, got, errText(err), c.want, c.err)
		}
	}
}

func TestParseCPU(t *testing.T) {
	for _, c := range []struct {
		in              string
		min, max, burst int64
		err             string
	}{
		{"0.5", 500, 500, 0, ""},
		{"0.5:", 500, 0, 0, ""},
		{"0.5:1", 500, 1000, 0, ""},
		{"0.5:1:2", 500, 1000, 2000, ""},
		{":2", 0, 2000, 0, ""},
		{"1:1", 1000, 1000, 0, ""},
		{"::1", 0, 0, 1000, ""},
		{"2:1", 0, 0, 0, "min 2 exceeds max 1"},
		{"1:2:3:4", 0, 0, 0, "too many parts (use MIN[:MAX[:BURST]])"},
		{"", 0, 0, 0, "empty value (use MIN[:MAX[:BURST]])"},
		{"::", 0, 0, 0, "empty value (use MIN[:MAX[:BURST]])"},
		{"-1", 0, 0, 0, "negative value"},
		{"1:-2", 0, 0, 0, "negative value"},
		{"x:1", 0, 0, 0, "not a number"},
	} {
		min, max, burst, err := parseCPU(c.in)
		if min != c.min || max != c.max || burst != c.burst || errText(err) != c.err {
			t.Errorf("parseCPU(%q) = %d, %d, %d, %q; want %d, %d, %d, %q",
				c.in, min, max, burst, errText(err), c.min, c.max, c.burst, c.err)
		}
	}
}

func TestParseMem(t *testing.T) {
	for _, c := range []struct {
		in       string
		min, max int64
		err      string
	}{
		{"64M", 64 << 20, 64 << 20, ""},
		{"64M:", 64 << 20, 0, ""},
		{"64M:128M", 64 << 20, 128 << 20, ""},
		{":1G", 0, 1 << 30, ""},
		{"1G:512M", 0, 0, "min 1G exceeds max 512M"},
		{"1:2:3", 0, 0, "too many parts (use MIN[:MAX])"},
		{":", 0, 0, "empty value (use MIN[:MAX])"},
		{"12X", 0, 0, `unknown unit "X" (use K, M, G or T)`},
		{"-64M", 0, 0, "negative value"},
	} {
		min, max, err := parseMem(c.in)
		if min != c.min || max != c.max || errText(err) != c.err {
			t.Errorf("parseMem(%q) = %d, %d, %q; want %d, %d, %q", c.in, min, max, errText(err), c.min, c.max, c.err)
		}
	}
}

func TestParsePids(t *testing.T) {
	for _, c := range []struct {
		in   string
		want int64
		err  string
	}{
		{"100", 100, ""}, {"0", 0, ""}, {"-1", 0, "negative value"}, {"1.5", 0, "not a whole number"},
		{"", 0, "missing number"}, {"ten", 0, "not a whole number"}, {"99999999999999999999", 0, "too large"},
	} {
		got, err := parsePids(c.in)
		if got != c.want || errText(err) != c.err {
			t.Errorf("parsePids(%q) = %d, %q; want %d, %q", c.in, got, errText(err), c.want, c.err)
		}
	}
}

func TestParseSignal(t *testing.T) {
	const unknown = "unknown signal (use a name like TERM, KILL, INT, HUP or a number)"
	for _, c := range []struct {
		in   string
		want int32
		err  string
	}{
		{"TERM", 15, ""}, {"SIGTERM", 15, ""}, {"term", 15, ""}, {"sigkill", 9, ""}, {"KILL", 9, ""},
		{"INT", 2, ""}, {"HUP", 1, ""}, {"QUIT", 3, ""}, {"USR1", 10, ""}, {"USR2", 12, ""},
		{"STOP", 19, ""}, {"CONT", 18, ""}, {"WINCH", 28, ""},
		{"9", 9, ""}, {"15", 15, ""}, {"64", 64, ""},
		{"0", 0, "signal number must be 1-64"}, {"65", 0, "signal number must be 1-64"},
		{"-9", 0, "signal number must be 1-64"}, {"9x", 0, "signal number must be 1-64"},
		{"FOO", 0, unknown}, {"SIG", 0, unknown}, {"", 0, "empty signal"},
	} {
		got, err := parseSignal(c.in)
		if got != c.want || errText(err) != c.err {
			t.Errorf("parseSignal(%q) = %d, %q; want %d, %q", c.in, got, errText(err), c.want, c.err)
		}
	}
}

func TestParseEnums(t *testing.T) {
	for _, c := range []struct {
		in   string
		want pb.RestartPolicy
		err  string
	}{
		{"always", pb.RestartPolicy_RESTART_POLICY_ALWAYS, ""},
		{"on-failure", pb.RestartPolicy_RESTART_POLICY_ON_FAILURE, ""},
		{"never", pb.RestartPolicy_RESTART_POLICY_NEVER, ""},
		{"sometimes", 0, "use always, on-failure or never"},
	} {
		got, err := parseRestart(c.in)
		if got != c.want || errText(err) != c.err {
			t.Errorf("parseRestart(%q) = %v, %q", c.in, got, errText(err))
		}
	}
	if v, err := parseIsolation("container"); v != pb.Isolation_ISOLATION_CONTAINER || err != nil {
		t.Errorf("parseIsolation(container) = %v, %v", v, err)
	}
	if v, err := parseIsolation("process"); v != pb.Isolation_ISOLATION_PROCESS || err != nil {
		t.Errorf("parseIsolation(process) = %v, %v", v, err)
	}
	if v, err := parseIsolation("vm"); v != pb.Isolation_ISOLATION_VM || err != nil {
		t.Errorf("parseIsolation(vm) = %v, %v", v, err)
	}
	if v, err := parseIsolation("host"); v != pb.Isolation_ISOLATION_HOST || err != nil {
		t.Errorf("parseIsolation(host) = %v, %v", v, err)
	}
	if _, err := parseIsolation("kvm"); errText(err) != "use process, container, vm or host" {
		t.Errorf("parseIsolation(kvm) error = %v", err)
	}
	if v, err := parseNetwork("none"); v != pb.Network_NETWORK_NONE || err != nil {
		t.Errorf("parseNetwork(none) = %v, %v", v, err)
	}
	if v, err := parseNetwork("host"); v != pb.Network_NETWORK_HOST || err != nil {
		t.Errorf("parseNetwork(host) = %v, %v", v, err)
	}
	if _, err := parseNetwork("bridge"); errText(err) != "use host or none" {
		t.Errorf("parseNetwork(bridge) error = %v", err)
	}
}

func TestParseUser(t *testing.T) {
	for _, c := range []struct {
		in string
		ok bool
	}{
		{"1000", true}, {"1000:1000", true}, {"0:0", true},
		{"", false}, {":1", false}, {"1:", false}, {"root", false}, {"-1", false}, {"4294967295", false}, {"1:2:3", false},
	} {
		_, err := parseUser(c.in)
		if (err == nil) != c.ok {
			t.Errorf("parseUser(%q) error = %v, want ok=%v", c.in, err, c.ok)
		}
		if err != nil && err.Error() != "use UID[:GID] with numeric ids" {
			t.Errorf("parseUser(%q) error = %q", c.in, err)
		}
	}
}

func TestParseInterval(t *testing.T) {
	for _, c := range []struct {
		in   string
		want time.Duration
		err  string
	}{
		{"2s", 2 * time.Second, ""}, {"500ms", 500 * time.Millisecond, ""}, {"1.5", 1500 * time.Millisecond, ""},
		{"1", time.Second, ""}, {"0", 0, "must be positive"}, {"-1s", 0, "must be positive"},
		{"soon", 0, "use a duration like 2s or 500ms"},
	} {
		got, err := parseInterval(c.in)
		if got != c.want || errText(err) != c.err {
			t.Errorf("parseInterval(%q) = %v, %q; want %v, %q", c.in, got, errText(err), c.want, c.err)
		}
	}
}

func TestParseAddrs(t *testing.T) {
	for _, c := range []struct {
		in   string
		want []string
		err  string
	}{
		{"127.0.0.1:7070", []string{"https://127.0.0.1:7070"}, ""},
		{"http://a:1,b:2", []string{"http://a:1", "https://b:2"}, ""},
		{"https://a:1/", []string{"https://a:1"}, ""},
		{"a, b:9", []string{"https://a:7070", "https://b:9"}, ""},
		{"[::1]:7070", []string{"https://[::1]:7070"}, ""},
		{"[::1]", []string{"https://[::1]:7070"}, ""},
		{"a:1:2", nil, `invalid --addr "a:1:2": use HOST:PORT`},
		{"a:1/x", nil, `invalid --addr "a:1/x": use HOST:PORT`},
		{":7070", nil, `invalid --addr ":7070": use HOST:PORT`},
		{",", nil, `invalid --addr ",": no address`},
	} {
		got, err := parseAddrs(c.in)
		if errText(err) != c.err || len(got) != len(c.want) {
			t.Errorf("parseAddrs(%q) = %q, %q; want %q, %q", c.in, got, errText(err), c.want, c.err)
			continue
		}
		for i := range got {
			if got[i] != c.want[i] {
				t.Errorf("parseAddrs(%q)[%d] = %q, want %q", c.in, i, got[i], c.want[i])
			}
		}
		if err != nil && exitCode(err) != 2 {
			t.Errorf("parseAddrs(%q) error exits %d, want 2", c.in, exitCode(err))
		}
	}
}

func TestFlagError(t *testing.T) {
	_, _, err := parseMem("12X")
	got := flagError("mem", "12X", err)
	want := `invalid --mem "12X": unknown unit "X" (use K, M, G or T)`
	if got.Error() != want || exitCode(got) != 2 {
		t.Errorf("flagError = %q (exit %d), want %q (exit 2)", got, exitCode(got), want)
	}
}

func TestParseMount(t *testing.T) {
	for _, c := range []struct {
		in   string
		want *pb.Mount
		err  string
	}{
		{"data:/data", &pb.Mount{Name: "data", Path: "/data"}, ""},
		{"data:/data:ro", &pb.Mount{Name: "data", Path: "/data", ReadOnly: true}, ""},
		{"data:/data:rw", &pb.Mount{Name: "data", Path: "/data"}, ""},
		{"data", nil, "use NAME:PATH[:ro], NAME a host path the node declares"},
		{":/data", nil, "use NAME:PATH[:ro], NAME a host path the node declares"},
		{"data:", nil, "use NAME:PATH[:ro], NAME a host path the node declares"},
	} {
		got, err := parseMount(c.in)
		if errText(err) != c.err || (c.want != nil && (got == nil || got.String() != c.want.String())) {
			t.Errorf("parseMount(%q) = %v, %q; want %v, %q", c.in, got, errText(err), c.want, c.err)
		}
	}
}
