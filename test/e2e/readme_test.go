package e2e

import (
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The README's runnable examples: the shell blocks after a line
// <!-- readme-test: NAME --> run here as written (those of one NAME as one
// script, in order), with bash -e, in a
// folder whose bin/ holds the freshly built binaries, but for what would
// collide with other tests on the machine: every 127.0.0.1 port becomes a
// free one, /tmp/ a test folder, and each shimd's --name gets a unique
// prefix (a shimd line without --name, --api or --raft gets them, and the
// CLI gets $SHIM_ADDR). Whatever the blocks start is stopped, and their cgroups
// removed, at the end.

var readmeMark = regexp.MustCompile(`(?m)^<!-- readme-test: ([a-z0-9-]+) -->\n` + "```sh\n" + `((?s:.*?))` + "```")

func readmeBlocks(t *testing.T) map[string]string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, m := range readmeMark.FindAllStringSubmatch(string(b), -1) {
		out[m[1]] += m[2] // blocks of one name are one script, in order
	}
	return out
}

// readmeRun is one block's run: its folder, test folder, names and ports.
type readmeRun struct {
	t      *testing.T
	dir    string // the block's working folder: bin/ -> the built binaries
	tmp    string // stands for /tmp
	prefix string
	ports  map[string]string // README port -> free port
	names  []string          // node names, prefixed
	api    string            // the single node's API address, if a line had none
}

var (
	readmePort = regexp.MustCompile(`127\.0\.0\.1:(\d+)`)
	readmeName = regexp.MustCompile(`--name (\S+)`)
)

// rewrite makes a block's script safe to run next to other tests.
func (r *readmeRun) rewrite(script string) string {
	var out []string
	for _, line := range strings.Split(script, "\n") {
		line = strings.ReplaceAll(line, "/tmp/", r.tmp+"/")
		line = readmePort.ReplaceAllStringFunc(line, func(m string) string {
			p := m[len("127.0.0.1:"):]
			if r.ports[p] == "" {
				r.ports[p] = freePort(r.t)
			}
			return r.ports[p]
		})
		if strings.HasPrefix(line, "bin/shimd") {
			line = readmeName.ReplaceAllStringFunc(line, func(m string) string {
				n := r.prefix + "-" + m[len("--name "):]
				r.names = append(r.names, n)
				return "--name " + n
			})
			code, comment, _ := strings.Cut(line, " #")
			code = strings.TrimSpace(code)
			bg := strings.HasSuffix(code, "&")
			code = strings.TrimSpace(strings.TrimSuffix(code, "&"))
			if !strings.Contains(code, "--name ") {
				r.names = append(r.names, r.prefix)
				code += " --name " + r.prefix
			}
			// shimd's defaults, 127.0.0.1:7070 and :7071, as the block's
			// later lines name them.
			if !strings.Contains(code, "--api ") {
				if r.ports["7070"] == "" {
					r.ports["7070"] = freePort(r.t)
				}
				r.api = r.ports["7070"]
				code += " --api " + r.api
			}
			if !strings.Contains(code, "--raft ") && !strings.Contains(code, "--role worker") {
				if r.ports["7071"] == "" {
					r.ports["7071"] = freePort(r.t)
				}
				code += " --raft " + r.ports["7071"]
			}
			if bg {
				code += " &"
			}
			line = code
			if comment != "" {
				line += " #" + comment
			}
		}
		out = append(out, line)
	}
	return strings.Join(out, "\n")
}

func TestReadme(t *testing.T) {
	needRoot(t)
	blocks := readmeBlocks(t)
	for _, want := range []string{"single", "three"} {
		if blocks[want] == "" {
			t.Fatalf("README.md has no block marked <!-- readme-test: %s -->", want)
		}
	}
	for name, script := range blocks {
		t.Run(name, func(t *testing.T) {
			r := &readmeRun{t: t, dir: t.TempDir(), tmp: t.TempDir(), ports: map[string]string{},
				prefix: fmt.Sprintf("rd%d%s", time.Now().UnixNano()%1e5, name[:1])}
			if err := os.Symlink(bin, filepath.Join(r.dir, "bin")); err != nil {
				t.Fatal(err)
			}
			r.run(r.rewrite(script))
		})
	}
}

func (r *readmeRun) env() []string {
	var env []string
	for _, e := range os.Environ() {
		if !strings.HasPrefix(e, "SHIM_") {
			env = append(env, e)
		}
	}
	if r.api != "" {
		env = append(env, "SHIM_ADDR="+r.api)
	}
	return env
}

func (r *readmeRun) run(script string) {
	t := r.t
	logf, err := os.Create(filepath.Join(r.dir, "out.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command("bash", "-euo", "pipefail", "-c", script)
	cmd.Dir, cmd.Env = r.dir, r.env()
	// A file, not a pipe: the shimds the block leaves running hold it.
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pgid := cmd.Process.Pid
	t.Cleanup(func() { r.cleanup(pgid) })
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
	case <-time.After(3 * time.Minute):
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		err = <-done
		t.Errorf("the block did not finish within 3 minutes")
	}
	out, _ := os.ReadFile(logf.Name())
	if err != nil {
		t.Fatalf("the README block failed: %v\n---- script ----\n%s\n---- output ----\n%s", err, script, out)
	}
	t.Logf("output:\n%s", out)
}

// cleanup stops what the block started: its processes (listed by the CLI
// while the cluster still answers), the shimds (SIGTERM to the block's
// process group), their guards, and the nodes' cgroups.
func (r *readmeRun) cleanup(pgid int) {
	t := r.t
	var pids []int
	for _, data := range r.dataDirs() {
		cmd := exec.Command(filepath.Join(bin, "shim"), "--timeout", "3s", "ps", "-a", "-o", "json")
		cmd.Env = append(r.env(), "SHIM_DATA_DIR="+data)
		if out, err := cmd.Output(); err == nil {
			var ps []proc
			if json.Unmarshal(out, &ps) == nil {
				for _, p := range ps {
					if p.PID > 0 {
						pids = append(pids, p.PID)
					}
				}
				break
			}
		}
	}
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	deadline := time.Now().Add(15 * time.Second)
	for groupAlive(pgid) && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	_ = filepath.WalkDir(r.dir, r.killGuards)
	_ = filepath.WalkDir(r.tmp, r.killGuards)
	for _, pid := range pids {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	for _, n := range r.names {
		_ = os.RemoveAll(filepath.Join("/run/shim", n))
		killCgroups(n)
		if left := removeCgroups(n); len(left) > 0 {
			t.Errorf("%s: cgroups left behind: %v", n, left)
		}
	}
}

// dataDirs are the folders holding an admin token: the CLI's credentials.
func (r *readmeRun) dataDirs() []string {
	var out []string
	for _, root := range []string{r.dir, r.tmp} {
		_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.Name() == "admin.token" {
				out = append(out, filepath.Dir(p))
			}
			if d != nil && d.IsDir() && d.Name() == "bin" {
				return filepath.SkipDir
			}
			return nil
		})
	}
	return out
}

func (r *readmeRun) killGuards(p string, d fs.DirEntry, err error) error {
	if err != nil {
		return nil
	}
	if d.IsDir() && d.Name() == "bin" {
		return filepath.SkipDir
	}
	if d.Name() == "guard.pid" {
		b, _ := os.ReadFile(p)
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 0 {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	return nil
}

// groupAlive reports whether any process is left in process group pgid.
func groupAlive(pgid int) bool {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if g, err := syscall.Getpgid(pid); err == nil && g == pgid && alive(pid) {
			return true
		}
	}
	return false
}
