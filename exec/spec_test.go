package exec

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestWorkFolder: the work folder is made the workload's own (nobody by
// default, mode 0700), is its working directory and $HOME (at /work in a
// sandbox, in place with host isolation) unless Dir and Env say otherwise,
// and what it writes there is on the host. Its log is 0600 in a 0700
// folder the agent made.
func TestWorkFolder(t *testing.T) {
	for _, iso := range allModes {
		t.Run(iso.String(), func(t *testing.T) {
			rt := newRuntime(t)
			work := filepath.Join(workDir(t), "new") // Start makes it
			logDir := filepath.Join(t.TempDir(), "logs")
			log := filepath.Join(logDir, "w.log")
			p, err := rt.Start(Spec{ID: "w", Isolation: iso, WorkDir: work, Stdout: log, Stderr: log,
				Argv: []string{"/bin/sh", "-c", `echo home=$HOME cwd=$(pwd) id=$(id -u):$(id -g); echo data > f`}})
			if err != nil {
				t.Fatal(err)
			}
			if e := wait(t, p); e.Code != 0 {
				t.Fatalf("exit %+v", e)
			}
			want := "/work"
			if iso == IsolationHost {
				want = work
			}
			f := fields(readTrim(t, log))
			if f["home"] != want+" cwd="+want+" id=65534:65534" {
				t.Errorf("got home=%s, want %s for both, as nobody", f["home"], want)
			}
			if b, err := os.ReadFile(filepath.Join(work, "f")); err != nil || string(b) != "data\n" {
				t.Errorf("work folder on the host: %q, %v", b, err)
			}
			for path, mode := range map[string]os.FileMode{work: 0o700 | os.ModeDir, logDir: 0o700 | os.ModeDir, log: 0o600} {
				fi, err := os.Stat(path)
				if err != nil {
					t.Fatal(err)
				}
				st := fi.Sys().(*syscall.Stat_t)
				owner := uint32(0)
				if path == work {
					owner = 65534
				}
				if fi.Mode() != mode || st.Uid != owner {
					t.Errorf("%s: mode %v owner %d, want %v owner %d", path, fi.Mode(), st.Uid, mode, owner)
				}
			}
			// Dir and HOME from the Spec win.
			e, out := runScript(t, rt, Spec{ID: "w2", Isolation: iso, WorkDir: work, Dir: "/tmp", User: "1000:1000",
				Env: []string{"PATH=/usr/bin:/bin", "HOME=/home/x"}}, `echo home=$HOME cwd=$(pwd) id=$(id -u)`)
			if f := fields(out); e.Code != 0 || f["home"] != "/home/x cwd=/tmp id=1000" {
				t.Errorf("exit %+v, output %q", e, out)
			}
			if fi, err := os.Stat(work); err != nil || fi.Sys().(*syscall.Stat_t).Uid != 1000 {
				t.Errorf("the work folder was not given to user 1000")
			}
		})
	}
}

// TestMounts: declared host paths appear at their targets, read-only
// when asked, in a process sandbox and a container.
func TestMounts(t *testing.T) {
	for _, iso := range []Isolation{IsolationProcess, IsolationContainer} {
		t.Run(iso.String(), func(t *testing.T) {
			rt := newRuntime(t)
			ro, rw := workDir(t), workDir(t)
			if err := os.WriteFile(filepath.Join(ro, "in"), []byte("hello\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(rw, 0o777); err != nil {
				t.Fatal(err)
			}
			e, out := runScript(t, rt, Spec{ID: "m", Isolation: iso, Mounts: []Mount{
				{Source: ro, Target: "/srv/in", ReadOnly: true}, {Source: rw, Target: "/data"},
			}}, `echo in=$(cat /srv/in/in); echo x > /srv/in/x 2>/dev/null && echo ro=no || echo ro=yes; echo y > /data/y && echo rw=yes`)
			f := fields(out)
			if e.Code != 0 || f["in"] != "hello" || f["ro"] != "yes" || f["rw"] != "yes" {
				t.Errorf("exit %+v, output:\n%s", e, out)
			}
			if _, err := os.Stat(filepath.Join(rw, "y")); err != nil {
				t.Errorf("write to the read-write mount: %v", err)
			}
			if _, err := os.Stat(filepath.Join(ro, "x")); err == nil {
				t.Errorf("wrote through the read-only mount")
			}
		})
	}
}

// TestSpecRefused: bad Specs are refused before anything is made, with
// ErrInvalid and one line.
func TestSpecRefused(t *testing.T) {
	rt := newRuntime(t)
	for _, s := range []Spec{
		{Mounts: []Mount{{Source: "/tmp", Target: "data"}}},
		{Mounts: []Mount{{Source: "tmp", Target: "/data"}}},
		{Mounts: []Mount{{Source: "/tmp", Target: "/data/../etc"}}},
		{Mounts: []Mount{{Source: "/tmp", Target: "/"}}},
		{Mounts: []Mount{{Source: "/tmp", Target: "/proc/x"}}},
		{Mounts: []Mount{{Source: "/tmp", Target: "/usr"}}},
		{Mounts: []Mount{{Source: "/tmp", Target: "/work/in"}}},
		{Mounts: []Mount{{Source: "/tmp", Target: "/a"}, {Source: "/tmp", Target: "/a/b"}}},
		{Mounts: []Mount{{Source: "/tmp", Target: "/a/b"}, {Source: "/tmp", Target: "/a"}}},
		{Mounts: []Mount{{Source: "/tmp", Target: "/data"}}, Isolation: IsolationHost},
		{Dir: "relative"},
		{WorkDir: "relative"},
		{User: "nobody"},
		{Rootfs: "/", Isolation: IsolationHost},
		{Isolation: Isolation(7)},
	} {
		s.ID, s.Argv = "bad", []string{"/bin/true"}
		_, err := rt.Start(s)
		if !errors.Is(err, ErrInvalid) || strings.Contains(err.Error(), "\n") {
			t.Errorf("Start(%+v): %v, want one line wrapping ErrInvalid", s, err)
		}
	}
	if names, err := rt.Cgroups.List(); err != nil || len(names) != 0 {
		t.Errorf("groups after refused starts: %v, %v", names, err)
	}
}
