package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// run spawns a one-shot process, waits for it to exit 0 and returns its
// output as "key=value" fields.
func (c *cluster) run(args ...string) (map[string]string, string) {
	c.t.Helper()
	id := c.spawn(append([]string{"--restart", "never"}, args...)...)
	p := c.waitProc(id, "to finish", 30*time.Second, func(p proc) bool {
		return p.State == "exited" || p.State == "failed" || p.State == "killed"
	})
	out := c.must("logs", id)
	if p.State != "exited" || p.ExitCode != 0 {
		c.t.Fatalf("%s ended %s (code %d, %q); output:\n%s", id, p.State, p.ExitCode, p.Reason, out)
	}
	f := map[string]string{}
	for _, l := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(l, "="); ok {
			f[k] = strings.TrimSpace(v)
		}
	}
	return f, out
}

// hostLinks lists the interfaces of the host's network namespace.
func hostLinks(t *testing.T) string {
	t.Helper()
	// /proc/net follows the main thread, which a test that entered another
	// network namespace on a locked goroutine may have left there (Go
	// wedges rather than ends the main thread); read this thread's view.
	runtime.LockOSThread()
	b, err := os.ReadFile("/proc/thread-self/net/dev")
	runtime.UnlockOSThread()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, l := range strings.Split(string(b), "\n")[2:] {
		if n, _, ok := strings.Cut(l, ":"); ok {
			names = append(names, strings.TrimSpace(n))
		}
	}
	return strings.Join(names, " ")
}

const probe = `echo pid=$$
echo pids=$(ls /proc | grep '^[0-9]' | sort -n | tr '\n' ' ')
touch /usr/shim-e2e-probe 2>/dev/null && echo usr=writable || echo usr=ro
echo tmp=$(t=$(mktemp) && echo ok > $t && cat $t && rm $t)
echo links=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ' ')
echo uid=$(id -u):$(id -g)
echo procsys=$(echo 1 > /proc/sys/vm/drop_caches 2>/dev/null && echo writable || echo ro)
echo firmware=$(ls /sys/firmware 2>/dev/null | wc -l)
grep -E '^(NoNewPrivs|Seccomp|CapEff):' /proc/self/status | tr -d '\t' | sed 's/:/=/'
echo unshare=$(unshare -U true 2>/dev/null && echo allowed || echo denied)
echo cgroup=$(grep memory /proc/self/cgroup | cut -d: -f3)`

// TestSandboxContainer checks what a container workload sees: PID 1 of its
// namespace, none of the host's processes, a read-only host /usr, only lo
// with --net none, the hardening, and its own cgroup.
func TestSandboxContainer(t *testing.T) {
	c := startNode(t)
	node := c.nodes[0].name // its cgroups: /shim/<cluster>/<node>/<id>.<incarnation>
	f, out := c.run("--isolation", "container", "--net", "none", "--user", "0", "--", "/bin/sh", "-c", probe)
	want := map[string]string{
		"usr": "ro", "tmp": "ok", "links": "lo", "uid": "0:0", "procsys": "ro", "firmware": "0",
		"NoNewPrivs": "1", "Seccomp": "2", "CapEff": "0000000020000420", "unshare": "denied",
	}
	for k, v := range want {
		if f[k] != v {
			t.Errorf("%s = %q, want %q", k, f[k], v)
		}
	}
	if !ownPid(f["pid"]) {
		t.Errorf("pid %q: want one of its own namespace's, below shim-init (PID 1)", f["pid"])
	}
	if pids := strings.Fields(f["pids"]); len(pids) == 0 || pids[0] != "1" || len(pids) > 10 {
		t.Errorf("sees processes %v: want only its own (the host has %d)", pids, countHostPids(t))
	}
	if _, err := os.Stat("/usr/shim-e2e-probe"); err == nil {
		os.Remove("/usr/shim-e2e-probe")
		t.Errorf("the container wrote to the host's /usr")
	}
	if p := strings.Split(f["cgroup"], "/"); len(p) != 5 || p[1] != "shim" || p[3] != node {
		t.Errorf("memory cgroup %q, want one below /shim/<cluster>/%s", f["cgroup"], node)
	}
	if t.Failed() {
		t.Logf("output:\n%s", out)
	}

	// Host network, another identity.
	f, out = c.run("--isolation", "container", "--user", "1000:1000", "--", "/bin/sh", "-c", probe)
	if f["links"] != hostLinks(t) || f["uid"] != "1000:1000" || f["CapEff"] != "0000000000000000" || !ownPid(f["pid"]) {
		t.Errorf("--net host --user 1000:1000: links %q (host %q), uid %q, CapEff %q; output:\n%s",
			f["links"], hostLinks(t), f["uid"], f["CapEff"], out)
	}
}

// ownPid reports whether a workload's $$ is a pid of its own namespace:
// small, past shim-init (PID 1) and its threads.
func ownPid(s string) bool {
	n, err := strconv.Atoi(s)
	return err == nil && n > 1 && n < 64
}

func countHostPids(t *testing.T) int {
	ents, _ := os.ReadDir("/proc")
	n := 0
	for _, e := range ents {
		if e.Name()[0] >= '0' && e.Name()[0] <= '9' {
			n++
		}
	}
	return n
}

// TestSandboxProcess checks the direct-clone isolation's --net none and
// --user.
func TestSandboxProcess(t *testing.T) {
	c := startNode(t)
	self, _ := os.Readlink("/proc/self/ns/net")
	f, out := c.run("--isolation", "process", "--net", "none", "--user", "65534:65534", "--", "/bin/sh", "-c",
		probe+"\necho netns=$(readlink /proc/self/ns/net)")
	if !ownPid(f["pid"]) || f["links"] != "lo" || f["uid"] != "65534:65534" || f["netns"] == self {
		t.Errorf("process isolation: %v; output:\n%s", f, out)
	}
}

// TestSandboxRootfs runs a container on a busybox root file system, in a
// host path the node declares.
func TestSandboxRootfs(t *testing.T) {
	bb, err := exec.LookPath("busybox")
	if err != nil {
		t.Skip("busybox (static) not installed")
	}
	images := t.TempDir()
	if err := os.Chmod(images, 0o755); err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(images, "busybox")
	for _, d := range []string{"bin", "work"} { // work: the work folder's mount point
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(bb)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "bin", "busybox"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, l := range []string{"sh", "ls", "id", "touch", "cat"} {
		if err := os.Symlink("busybox", filepath.Join(root, "bin", l)); err != nil {
			t.Fatal(err)
		}
	}
	c := startNode(t, "--host-path", "images="+images+":ro")
	f, out := c.run("--isolation", "container", "--rootfs", "images/busybox", "--env", "PATH=/bin", "--", "/bin/sh", "-c",
		`echo bin=$(ls /bin | tr '\n' ' '); touch /x 2>/dev/null && echo root=writable || echo root=ro; echo pid=$$`)
	if f["bin"] != "busybox cat id ls sh touch" || f["root"] != "ro" || !ownPid(f["pid"]) {
		t.Errorf("rootfs view: %v; output:\n%s", f, out)
	}
}

// TestSandboxOutlivesShimd: a container keeps running while shimd is down,
// and the restarted shimd re-adopts it (same PID) and can still kill it.
func TestSandboxOutlivesShimd(t *testing.T) {
	c := startNode(t)
	id := c.spawn("--isolation", "container", "--mem", "1M:64M", "--", "/bin/sleep", "100000")
	p := c.waitRunning(id)
	group := cgFile(t, p.PID, "memory", "")
	c.stop(c.nodes[0], syscall.SIGTERM)
	if !alive(p.PID) {
		t.Fatalf("container (pid %d) died with shimd", p.PID)
	}
	c.start(c.nodes[0])
	c.waitNodesUp(1, 20*time.Second)
	q := c.waitRunning(id)
	if q.PID != p.PID || q.Incarnation != p.Incarnation || q.Restarts != p.Restarts {
		t.Fatalf("after restart %+v, want pid %d re-adopted", q, p.PID)
	}
	c.must("kill", id)
	c.waitProc(id, "killed", 15*time.Second, func(p proc) bool { return p.State == "killed" })
	waitFor(t, 10*time.Second, "pid and cgroup gone", func() bool {
		_, err := os.Stat(group)
		return !alive(p.PID) && os.IsNotExist(err)
	})
	// Nothing is left in the hierarchies libcontainer also joined.
	for _, ctl := range []string{"cpuset", "devices", "blkio", "systemd", "unified"} {
		d := filepath.Join("/sys/fs/cgroup", ctl, "shim", c.nodes[0].name, fmt.Sprintf("%s.%d", id, p.Incarnation))
		if _, err := os.Stat(d); err == nil {
			t.Errorf("%s left behind", d)
		}
	}
}
