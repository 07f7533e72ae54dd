package exec

import (
	"bytes"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// allModes are the isolation levels, each with shim-init as PID 1.
var allModes = []Isolation{IsolationProcess, IsolationContainer, IsolationHost}

// TestInitSignalEndsWorkload: SIGTERM to a workload without a handler
// (sleep) ends it at once: the init forwards it, and the workload, not
// being PID 1, dies of it. Without the init the kernel would drop it.
func TestInitSignalEndsWorkload(t *testing.T) {
	for _, iso := range allModes {
		t.Run(iso.String(), func(t *testing.T) {
			rt := newRuntime(t)
			p, err := rt.Start(Spec{ID: "sleeper", Isolation: iso, Argv: []string{"/bin/sleep", "1000"}})
			if err != nil {
				t.Fatal(err)
			}
			t0 := time.Now()
			if err := p.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			select {
			case <-p.Done():
			case <-time.After(5 * time.Second):
				_ = p.Kill()
				t.Fatalf("still running 5 s after SIGTERM")
			}
			d := time.Since(t0)
			t.Logf("%v: SIGTERM to exit in %v", iso, d)
			// An init that ignored SIGTERM would hit the 5 s limit above; a
			// loaded CI machine may take a while to schedule the exit.
			if d > 3*time.Second {
				t.Errorf("SIGTERM took %v to end sleep, want well under 3 s", d)
			}
			if e := p.Exit(); e.Code != -1 || e.Signal != "SIGTERM" || e.Reason != ReasonSignaled {
				t.Errorf("exit = %+v, want SIGTERM/signaled", e)
			}
			expectNoGroups(t, rt)
		})
	}
}

// TestInitExitStatus: the exit code and the signal that killed the
// workload come back faithfully, as the init reports them.
func TestInitExitStatus(t *testing.T) {
	for _, iso := range allModes {
		t.Run(iso.String(), func(t *testing.T) {
			rt := newRuntime(t)
			for i, tc := range []struct {
				script string
				want   Exit
			}{
				{"exit 7", Exit{Code: 7, Reason: ReasonExited}},
				{"exit 143", Exit{Code: 143, Reason: ReasonExited}}, // a code, not SIGTERM
				{"kill -TERM $$", Exit{Code: -1, Signal: "SIGTERM", Reason: ReasonSignaled}},
				{"kill -KILL $$", Exit{Code: -1, Signal: "SIGKILL", Reason: ReasonSignaled}},
				{"kill -SEGV $$", Exit{Code: -1, Signal: "SIGSEGV", Reason: ReasonSignaled}},
			} {
				e, out := runScript(t, rt, Spec{ID: "st", Incarnation: uint64(i), Isolation: iso}, tc.script)
				if e != tc.want {
					t.Errorf("%s: exit %+v, want %+v (output %q)", tc.script, e, tc.want, out)
				}
			}
			p, err := rt.Start(Spec{ID: "st", Incarnation: 99, Isolation: iso, Argv: []string{"/bin/sleep", "1000"}})
			if err != nil {
				t.Fatal(err)
			}
			if err := p.Kill(); err != nil {
				t.Fatal(err)
			}
			if e := wait(t, p); e != (Exit{Code: -1, Signal: "SIGKILL", Reason: ReasonKilled}) {
				t.Errorf("Kill: exit %+v", e)
			}
			expectNoGroups(t, rt)
		})
	}
}

// TestInitReapsZombies: an orphan of the workload is reparented to the
// init, PID 1 of the namespace, which reaps it when it exits: it does not
// linger as a zombie.
func TestInitReapsZombies(t *testing.T) {
	for _, iso := range allModes {
		t.Run(iso.String(), func(t *testing.T) {
			rt := newRuntime(t)
			p, err := rt.Start(Spec{ID: "zomb", Isolation: iso, Env: []string{"PATH=/usr/bin:/bin"},
				Argv: []string{"/bin/sh", "-c", `sh -c 'sleep 0.7 &'; exec sleep 1000`}})
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = p.Kill(); wait(t, p) }()
			// Find the orphan on the host, in the workload's group.
			orphan := 0
			eventually(t, "the orphan", func() bool {
				pids, _ := p.group.Procs()
				for _, pid := range pids {
					cmd, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
					if bytes.Equal(cmd, []byte("sleep\x000.7\x00")) {
						orphan = pid
						return true
					}
				}
				return false
			})
			// Once its parent (the inner sh) has exited, its parent is the
			// init; it exits 0.7 s after it started.
			eventually(t, "the orphan to be the init's", func() bool { return ppid(orphan) == p.PID() })
			eventually(t, "the orphan to be reaped", func() bool {
				_, err := os.Stat("/proc/" + strconv.Itoa(orphan))
				return err != nil // gone, not a zombie
			})
		})
	}
}

// ppid returns pid's parent (0 if it is gone).
func ppid(pid int) int {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	i := bytes.LastIndexByte(b, ')')
	f := bytes.Fields(b[i+1:])
	if len(f) < 2 {
		return 0
	}
	n, _ := strconv.Atoi(string(f[1]))
	return n
}

// TestWorkloadDescriptors: the workload holds stdin, stdout and stderr
// only: neither the init's configuration nor its status pipe, nor anything
// the agent holds; and its log's descriptor names no host path.
func TestWorkloadDescriptors(t *testing.T) {
	for _, iso := range allModes {
		t.Run(iso.String(), func(t *testing.T) {
			rt := newRuntime(t)
			// The shell's own, and 3: the directory its glob read.
			e, out := runScript(t, rt, Spec{ID: "fds", Isolation: iso},
				`cd /proc/self/fd && for f in *; do echo "$f=$(readlink $f)"; done`)
			f := fields(out)
			if e.Code != 0 || len(f) != 4 || f["0"] != "/dev/null" || f["1"] != "/out" || f["2"] != "/out" {
				t.Errorf("exit %+v, descriptors:\n%s\nwant 0, 1 and 2 (/out, the log by its name only), and the listing's", e, out)
			}
		})
	}
}

// TestTemplate: a process sandbox without Mounts is cloned from the
// template (shim-init is there, read-only, and only the sandbox's own file
// systems are mounted on top); one with Mounts builds its whole root. Both
// see the same system.
func TestTemplate(t *testing.T) {
	rt := newRuntime(t)
	if err := rt.Prepare(); err != nil {
		t.Fatalf("Prepare: %v", err)
	}
	script := `echo init=$(test -x /.shim/shim-init && echo yes || echo no)
echo mounts=$(wc -l < /proc/self/mountinfo)
echo usr=$(touch /usr/x 2>/dev/null && echo rw || echo ro) shim=$(touch /.shim/x 2>/dev/null && echo rw || echo ro)
echo work=$(echo w > /work/w && cat /work/w) tmp=$(echo t > /tmp/t && cat /tmp/t)
echo shadow=$(wc -c < /etc/shadow) timer_list=$(wc -c < /proc/timer_list)`
	data := t.TempDir()
	for _, tc := range []struct {
		name   string
		mounts []Mount
		init   string
	}{
		{"template", nil, "yes"},
		{"full", []Mount{{Source: data, Target: "/data"}}, "no"},
	} {
		e, out := runScript(t, rt, Spec{ID: tc.name, WorkDir: workDir(t), Mounts: tc.mounts}, script)
		f := fields(out)
		mounts, _ := strconv.Atoi(f["mounts"])
		if e.Code != 0 || f["init"] != tc.init || f["usr"] != "ro shim=ro" || f["work"] != "w tmp=t" ||
			f["shadow"] != "0 timer_list=0" || mounts == 0 || mounts > 30 {
			t.Errorf("%s: exit %+v, output:\n%s", tc.name, e, out)
		}
	}
}
