package guard

import (
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
)

// The guard never kills itself, whatever runs its executable, nor the pid
// in the pid file; an unrelated process it may kill.
func TestProtected(t *testing.T) {
	pidFile := filepath.Join(t.TempDir(), PIDFileName)
	sleep := exec.Command("sleep", "30")
	if err := sleep.Start(); err != nil {
		t.Skip("no sleep:", err)
	}
	defer func() { _ = sleep.Process.Kill(); _ = sleep.Wait() }()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	twin := exec.Command(self, "-test.run=^$") // this executable again: a "shimd"
	twin.Env = append(os.Environ(), "GUARD_TWIN=1")
	in, err := twin.StdinPipe() // the twin lives until this closes
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	p := NewProtector(pidFile)
	if !p.Protected(os.Getpid()) || !p.Protected(1) || !p.Protected(0) {
		t.Fatal("the guard itself (or pid 1) is not protected")
	}
	if p.Protected(sleep.Process.Pid) {
		t.Fatal("an unrelated process is protected")
	}
	if err := os.WriteFile(pidFile, []byte(strconv.Itoa(sleep.Process.Pid)+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if !p.Protected(sleep.Process.Pid) {
		t.Fatal("the pid in the pid file is not protected")
	}
	if err := twin.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = twin.Process.Kill(); _ = twin.Wait() }()
	if !p.Protected(twin.Process.Pid) {
		t.Fatal("a process running the guard's own executable is not protected")
	}
}

// TestMain makes the test binary TestProtected's second process when
// GUARD_TWIN is set: it waits for its stdin to close.
func TestMain(m *testing.M) {
	if os.Getenv("GUARD_TWIN") != "" {
		_, _ = io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}
	os.Exit(m.Run())
}
