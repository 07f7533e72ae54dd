package pid1

import (
	"bufio"
	"errors"
	"os"
	osexec "os/exec"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const mainEnv = "SHIM_PID1_TEST_MAIN"

// TestMain lets the test binary run as shim-init (Main) for the tests that
// need a real process.
func TestMain(m *testing.M) {
	if os.Getenv(mainEnv) == "1" {
		os.Exit(Main(os.Args[1:]))
	}
	os.Exit(m.Run())
}

func TestConfigRoundTrip(t *testing.T) {
	for _, c := range []*Config{
		{Argv: []string{"/bin/true"}, StatusFD: -1},
		{Argv: []string{"sh", "-c", "x\x00y"}, Env: []string{"A=1", "B="}, Path: "/bin", Dir: "/work", Hostname: "h",
			UID: 65534, GID: 1<<32 - 2, StatusFD: 4},
		{Argv: []string{"x"}, StatusFD: 3, Sandbox: &Sandbox{
			Root: "/run/shim/sandbox", Binds: []Bind{{"/usr", "/usr", true, 0}, {"/w", "/work", false, 5}},
			Symlinks: []Symlink{{"/bin", "usr/bin"}}, Masked: []string{"/proc/kcore"}, ReadOnly: []string{"/proc/sys"},
			Caps: 1<<5 | 1<<29, Seccomp: []byte{1, 2, 3, 4, 5, 6, 7, 8},
		}},
	} {
		got, err := Unmarshal(c.Marshal())
		if err != nil {
			t.Fatalf("Unmarshal: %v", err)
		}
		if !reflect.DeepEqual(got, c) {
			t.Errorf("round trip:\n got %+v\nwant %+v", got, c)
		}
	}
}

// TestUnmarshalBad: every truncation and a few corruptions of a valid
// encoding are refused with ErrConfig, never a panic.
func TestUnmarshalBad(t *testing.T) {
	c := &Config{Argv: []string{"a", "b"}, Env: []string{"E=1"}, StatusFD: 4, Sandbox: &Sandbox{
		Root: "/r", Binds: []Bind{{"/a", "/b", true, 0}}, Symlinks: []Symlink{{"/l", "t"}}, Seccomp: []byte("12345678"),
	}}
	b := c.Marshal()
	for n := range len(b) {
		if _, err := Unmarshal(b[:n]); !errors.Is(err, ErrConfig) {
			t.Errorf("truncated to %d bytes: %v, want ErrConfig", n, err)
		}
	}
	for _, bad := range [][]byte{
		append(append([]byte{}, b...), 0),             // trailing bytes
		append([]byte{2}, b[1:]...),                   // another version
		{1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f}, // an absurd count
	} {
		if _, err := Unmarshal(bad); !errors.Is(err, ErrConfig) {
			t.Errorf("Unmarshal(%x): %v, want ErrConfig", bad, err)
		}
	}
}

func FuzzUnmarshal(f *testing.F) {
	f.Add((&Config{Argv: []string{"x"}, StatusFD: -1}).Marshal())
	f.Add((&Config{Argv: []string{"x"}, Sandbox: &Sandbox{Root: "/r", Binds: []Bind{{"/a", "/b", false, 7}}}}).Marshal())
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := Unmarshal(b)
		if err == nil {
			// What decodes survives a round trip.
			again, err := Unmarshal(c.Marshal())
			if err != nil || !reflect.DeepEqual(again, c) {
				t.Errorf("round trip of Unmarshal(%x) = %+v: %+v, %v", b, c, again, err)
			}
		}
	})
}

func TestReportRoundTrip(t *testing.T) {
	for _, r := range []Report{
		{Kind: Started},
		{Kind: Exited, Code: 7},
		{Kind: Signaled, Code: 15},
		{Kind: NotFound, Text: "no such"},
		{Kind: Failed, Errno: syscall.ENOENT, Text: "working directory \"/x\": no such file\nor directory"},
	} {
		got, err := ParseReport(r.Line())
		want := r
		want.Text = strings.ReplaceAll(r.Text, "\n", " ")
		if err != nil || got != want {
			t.Errorf("ParseReport(%q) = %+v, %v; want %+v", r.Line(), got, err, want)
		}
	}
	for _, bad := range []string{"", "started", "started 0 0", "bogus 0 0 x", "exited x 0 ", "failed 0 -1 x"} {
		if _, err := ParseReport([]byte(bad)); err == nil {
			t.Errorf("ParseReport(%q) succeeded", bad)
		}
	}
}

// initProc is this test binary run as shim-init.
type initProc struct {
	cmd    *osexec.Cmd
	status *bufio.Reader
	out    *lockedBuffer
}

// lockedBuffer is the init's output, written by os/exec's copying
// goroutine and read by the test.
type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// startInit runs shim-init with args; the status pipe is descriptor 3.
func startInit(t *testing.T, args ...string) *initProc {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := osexec.Command(self, append([]string{"--status-fd", "3"}, args...)...)
	cmd.Env = append(os.Environ(), mainEnv+"=1")
	out := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.ExtraFiles = []*os.File{w}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		r.Close()
	})
	return &initProc{cmd: cmd, status: bufio.NewReader(r), out: out}
}

// report reads the next report, failing the test after a deadline.
func (p *initProc) report(t *testing.T) Report {
	t.Helper()
	type res struct {
		line string
		err  error
	}
	c := make(chan res, 1)
	go func() {
		l, err := p.status.ReadString('\n')
		c <- res{l, err}
	}()
	select {
	case r := <-c:
		if r.err != nil {
			t.Fatalf("status: %v (output %q)", r.err, p.out.String())
		}
		rep, err := ParseReport([]byte(r.line))
		if err != nil {
			t.Fatal(err)
		}
		return rep
	case <-time.After(20 * time.Second):
		t.Fatalf("no report from the init (output %q)", p.out.String())
		return Report{}
	}
}

// exitCode waits for the init and returns its exit code.
func (p *initProc) exitCode(t *testing.T) int {
	t.Helper()
	err := p.cmd.Wait()
	var ee *osexec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatal(err)
	}
	return p.cmd.ProcessState.ExitCode()
}

func TestInitExitCodes(t *testing.T) {
	for _, tc := range []struct {
		script string
		want   Report
		code   int
	}{
		{"exit 0", Report{Kind: Exited, Code: 0}, 0},
		{"exit 7", Report{Kind: Exited, Code: 7}, 7},
		{"kill -KILL $$", Report{Kind: Signaled, Code: int(syscall.SIGKILL)}, 128 + 9},
		{"kill -SEGV $$", Report{Kind: Signaled, Code: int(syscall.SIGSEGV)}, 128 + 11},
		{"exit 137", Report{Kind: Exited, Code: 137}, 137}, // not a signal, though the code says so
	} {
		p := startInit(t, "--", "/bin/sh", "-c", tc.script)
		if r := p.report(t); r.Kind != Started {
			t.Fatalf("%s: first report %+v", tc.script, r)
		}
		if r := p.report(t); r != tc.want {
			t.Errorf("%s: report %+v, want %+v", tc.script, r, tc.want)
		}
		if code := p.exitCode(t); code != tc.code {
			t.Errorf("%s: init exit code %d, want %d", tc.script, code, tc.code)
		}
	}
}

// TestInitForwardsSignals: each forwarded signal reaches the workload,
// which dies of it (sleep has no handlers) at once.
func TestInitForwardsSignals(t *testing.T) {
	for _, sig := range Forwarded {
		sig := sig.(syscall.Signal)
		p := startInit(t, "--", "/bin/sleep", "1000")
		if r := p.report(t); r.Kind != Started {
			t.Fatalf("first report %+v", r)
		}
		t0 := time.Now()
		if err := p.cmd.Process.Signal(sig); err != nil {
			t.Fatal(err)
		}
		want := Report{Kind: Signaled, Code: int(sig)}
		if sig == syscall.SIGWINCH {
			// Ignored by default: the workload lives on; end it.
			time.Sleep(50 * time.Millisecond)
			_ = p.cmd.Process.Signal(syscall.SIGTERM)
			want.Code = int(syscall.SIGTERM)
		}
		if r := p.report(t); r != want {
			t.Errorf("%v: report %+v, want %+v", sig, r, want)
		}
		if d := time.Since(t0); d > 5*time.Second {
			t.Errorf("%v: took %v", sig, d)
		}
		p.exitCode(t)
	}
}

// TestInitReapsOrphans: an orphan of the workload is reaped by the init
// (a subreaper here, PID 1 in a sandbox) as soon as it exits.
func TestInitReapsOrphans(t *testing.T) {
	p := startInit(t, "--", "/bin/sh", "-c", `sh -c 'sleep 0.3 & echo orphan=$!'; exec sleep 1000`)
	if r := p.report(t); r.Kind != Started {
		t.Fatalf("first report %+v", r)
	}
	var orphan int
	deadline := time.Now().Add(10 * time.Second)
	for orphan == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("no orphan pid in %q", p.out.String())
		}
		time.Sleep(10 * time.Millisecond)
		if _, v, ok := strings.Cut(p.out.String(), "orphan="); ok {
			orphan, _ = strconv.Atoi(strings.TrimSpace(v))
		}
	}
	// Its parent is the init, then it is gone altogether: no zombie.
	ppid := func() (int, bool) {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(orphan) + "/stat")
		if err != nil {
			return 0, false
		}
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		n, _ := strconv.Atoi(f[1])
		return n, true
	}
	if pp, ok := ppid(); ok && pp != p.cmd.Process.Pid {
		t.Errorf("orphan's parent is %d, want the init %d", pp, p.cmd.Process.Pid)
	}
	for {
		if _, ok := ppid(); !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("orphan %d not reaped", orphan)
		}
		time.Sleep(10 * time.Millisecond)
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	if r := p.report(t); r.Kind != Signaled {
		t.Errorf("report %+v", r)
	}
}

func TestInitNotFoundAndBadArgs(t *testing.T) {
	p := startInit(t, "--", "/no/such/program")
	if r := p.report(t); r != (Report{Kind: NotFound, Text: "/no/such/program"}) {
		t.Errorf("report %+v", r)
	}
	if code := p.exitCode(t); code != 127 {
		t.Errorf("exit code %d, want 127", code)
	}
	p = startInit(t, "--dir", "/no/such/dir", "--", "/bin/true")
	if r := p.report(t); r.Kind != Failed || r.Errno != syscall.ENOENT || !strings.Contains(r.Text, "/no/such/dir") {
		t.Errorf("report %+v", r)
	}
	self, _ := os.Executable()
	for _, args := range [][]string{{}, {"--"}, {"--bogus"}, {"--status-fd", "x", "--", "true"},
		{"--status-fd", "1", "--", "true"}, {"--config-fd"}, {"--config-fd", "3", "extra"}, {"--config-fd", "0"},
		{"--template"}, {"--template", "--", "true"}} {
		cmd := osexec.Command(self, args...)
		cmd.Env = append(os.Environ(), mainEnv+"=1")
		out, err := cmd.CombinedOutput()
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		if cmd.ProcessState.ExitCode() != 2 || len(lines) != 2 || !strings.HasPrefix(lines[0], "shim-init: ") || !strings.HasPrefix(lines[1], "usage:") {
			t.Errorf("args %q: %v, output %q; want exit 2, an error line and the usage", args, err, out)
		}
	}
	// A configuration descriptor that holds garbage.
	f, err := os.CreateTemp(t.TempDir(), "cfg")
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("garbage")
	cmd := osexec.Command(self, "--config-fd", "3")
	cmd.Env = append(os.Environ(), mainEnv+"=1")
	cmd.ExtraFiles = []*os.File{f}
	out, _ := cmd.CombinedOutput()
	if cmd.ProcessState.ExitCode() != 2 || !strings.Contains(string(out), "malformed init configuration") {
		t.Errorf("garbage configuration: exit %d, output %q", cmd.ProcessState.ExitCode(), out)
	}
}

// TestInitStdio: --stdout-fd and --stderr-fd give the workload (and the
// init's own messages) those descriptors as stdout and stderr.
func TestInitStdio(t *testing.T) {
	dir := t.TempDir()
	out, err := os.Create(dir + "/out")
	if err != nil {
		t.Fatal(err)
	}
	errf, err := os.Create(dir + "/err")
	if err != nil {
		t.Fatal(err)
	}
	self, _ := os.Executable()
	cmd := osexec.Command(self, "--stdout-fd", "3", "--stderr-fd", "4", "--", "/bin/sh", "-c", "echo to-out; echo to-err >&2; ls /proc/self/fd >&2")
	cmd.Env = append(os.Environ(), mainEnv+"=1")
	cmd.ExtraFiles = []*os.File{out, errf}
	if b, err := cmd.CombinedOutput(); err != nil || len(b) != 0 {
		t.Fatalf("%v, output on the original stdio %q", err, b)
	}
	o, _ := os.ReadFile(dir + "/out")
	e, _ := os.ReadFile(dir + "/err")
	if string(o) != "to-out\n" || !strings.HasPrefix(string(e), "to-err\n0\n1\n2\n3\n") || strings.Count(string(e), "\n") != 5 {
		t.Errorf("stdout %q, stderr %q (want the descriptors 0-2, and 3 for ls's listing)", o, e)
	}
	cmd = osexec.Command(self, "--stdout-fd", "9", "--", "/bin/true")
	cmd.Env = append(os.Environ(), mainEnv+"=1")
	if b, _ := cmd.CombinedOutput(); cmd.ProcessState.ExitCode() != 2 || !strings.Contains(string(b), "--stdout-fd 9: bad file descriptor") {
		t.Errorf("--stdout-fd of a closed descriptor: exit %d, %q", cmd.ProcessState.ExitCode(), b)
	}
}
