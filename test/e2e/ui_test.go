package e2e

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// uiNode is one node box on the map as the page shows it.
type uiNode struct {
	Node  string   `json:"node"`
	State string   `json:"state"`
	IDs   []string `json:"ids"`
	Chips []string `json:"chips"` // each chip's state
}

// readMap is the map the page shows: its node boxes and the chips in them.
const readMap = `JSON.stringify([...document.querySelectorAll('#map .node')].map(b => ({
	node: b.dataset.node, state: b.dataset.state,
	ids: [...b.querySelectorAll('.chip')].map(c => c.dataset.id),
	chips: [...b.querySelectorAll('.chip')].map(c => c.dataset.state)})))`

// chromium finds Debian's headless browser.
func chromium() string {
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	return ""
}

// TestUIMap opens shimd's /ui in headless chromium against a real 3-node
// cluster: every node and process is on the map; a node killed as a host
// dies turns red and its processes appear on the other nodes; the page's
// kill, resize and drain buttons work.
func TestUIMap(t *testing.T) {
	needRoot(t)
	browser := chromium()
	if browser == "" {
		if os.Getenv("SHIM_REQUIRE_UI") != "" {
			t.Fatal("SHIM_REQUIRE_UI is set and no chromium is installed (apt-get install chromium)")
		}
		t.Skip("no chromium (apt-get install chromium; SHIM_REQUIRE_UI=1 makes this a failure)")
	}
	c := startCluster(t, 3)
	c.must("spawn", "--name", "web", "--count", "6", "--cpu", "0.01:", "--mem", "1M:16M", "--", "/bin/sleep", "100000")
	waitFor(t, 30*time.Second, "6 running", func() bool { return countRunning(c.ps()) == 6 })
	tok, err := os.ReadFile(filepath.Join(c.dataDir(), "admin.token"))
	if err != nil {
		t.Fatal(err)
	}

	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(browser), chromedp.NoSandbox, chromedp.DisableGPU,
		chromedp.Flag("ignore-certificate-errors", true), // the cluster's own CA
		chromedp.WindowSize(1500, 1000))
	actx, cancel := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancel()
	ctx, cancel := chromedp.NewContext(actx)
	defer cancel()
	ctx, cancel = context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	page := c.nodes[0]
	if err := chromedp.Do(ctx, chromedp.Navigate("https://"+page.api+"/ui/#token="+strings.TrimSpace(string(tok)))); err != nil {
		t.Fatalf("open the page: %v", err)
	}
	var shown []uiNode
	read := func() bool {
		s, err := chromedp.Run(ctx, chromedp.Evaluate[string](readMap))
		if err != nil {
			t.Fatalf("read the map: %v", err)
		}
		shown = nil
		return json.Unmarshal([]byte(s), &shown) == nil
	}
	seen := func() string { b, _ := json.Marshal(shown); return string(b) }
	// where reports the node box each process's chip is in, and whether
	// every node box shows the given state.
	where := func() map[string]uiNode {
		m := map[string]uiNode{}
		for _, n := range shown {
			for _, id := range n.IDs {
				m[id] = n
			}
		}
		return m
	}

	// Every node, up, and every process in its node's box.
	procs := c.ps()
	waitFor(t, 30*time.Second, "the map to show 3 nodes up and every process on its node", func() bool {
		if !read() {
			return false
		}
		up := 0
		for _, n := range shown {
			if n.State == "up" {
				up++
			}
		}
		at := where()
		for _, p := range procs {
			if at[p.ID].Node != p.Node {
				return false
			}
		}
		return up == 3
	}, seen, 200*time.Millisecond)

	// Kill a node that is not the page's and holds processes.
	var victim *daemon
	for _, d := range c.nodes[1:] {
		for _, p := range procs {
			if p.Node == d.name && victim == nil {
				victim = d
			}
		}
	}
	if victim == nil {
		t.Fatalf("no process on %s or %s: %v", c.nodes[1].name, c.nodes[2].name, procs)
	}
	var lost []string
	for _, p := range procs {
		if p.Node == victim.name {
			lost = append(lost, p.ID)
		}
	}
	c.killNode(victim)
	waitFor(t, 30*time.Second, victim.name+" red and its processes running on other nodes", func() bool {
		if !read() {
			return false
		}
		red := false
		for _, n := range shown {
			red = red || n.Node == victim.name && n.State == "down"
		}
		at := where()
		for _, id := range lost {
			n := at[id]
			if n.Node == "" || n.Node == victim.name || n.State != "up" {
				return false
			}
		}
		return red
	}, seen, 200*time.Millisecond)

	// The timeline shows the node's death.
	timeline, err := chromedp.Run(ctx, chromedp.Evaluate[string](`document.getElementById('timeline').innerText`))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(timeline, "node.down") {
		t.Errorf("the timeline lacks node.down:\n%s", timeline)
	}

	// The map after the node's death, for the report.
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	dir := os.Getenv("SHIM_REPORT_DIR")
	if dir == "" {
		dir = filepath.Join("..", "..", "test-reports")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "ui.png"), png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: %s", filepath.Join(dir, "ui.png"))

	// The buttons: kill a process, resize one, drain the page's node.
	click := func(js string) {
		t.Helper()
		ok, err := chromedp.Run(ctx, chromedp.Evaluate[bool](js))
		if err != nil || !ok {
			t.Fatalf("on the page: %s: %v, %v", js, ok, err)
		}
	}
	victimID, resizeID := lost[0], ""
	for _, p := range procs {
		if p.ID != victimID {
			resizeID = p.ID
		}
	}
	click(`(() => { const b = document.querySelector('.chip[data-id="` + victimID + `"] button.kill'); if (!b) return false; b.click(); return true })()`)
	c.waitProc(victimID, "killed from the page", 20*time.Second, func(p proc) bool { return p.State == "killed" })
	click(`(() => { const b = document.querySelector('.chip[data-id="` + resizeID + `"] button.resize'); if (!b) return false; b.click();
		document.getElementById('resize-mem').value = '2M:24M'; document.getElementById('resize-ok').click(); return true })()`)
	waitFor(t, 20*time.Second, "the resize from the page", func() bool {
		r := c.shim("ps", "-o", "json", resizeID)
		var ps []struct {
			Resources struct {
				MemMax int64 `json:"mem_max"`
			} `json:"resources"`
		}
		return r.code == 0 && json.Unmarshal([]byte(r.stdout), &ps) == nil && len(ps) == 1 && ps[0].Resources.MemMax == 24<<20
	}, 200*time.Millisecond)
	click(`(() => { const b = document.querySelector('.node[data-node="` + page.name + `"] button.drain'); if (!b) return false; b.click(); return true })()`)
	waitFor(t, 20*time.Second, page.name+" drained from the page", func() bool {
		r := c.shim("nodes", "-o", "json")
		return r.code == 0 && strings.Contains(r.stdout, `"draining": true`)
	}, 200*time.Millisecond)
	waitFor(t, 20*time.Second, "the map to show the drain", func() bool {
		if !read() {
			return false
		}
		s, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`document.querySelector('.node[data-node="`+page.name+`"]').className`))
		return strings.Contains(s, "draining")
	}, seen, 200*time.Millisecond)

	// A bad token: the login box, with the server's refusal.
	if err := chromedp.Do(ctx, chromedp.Navigate("https://"+page.api+"/ui/#token=bad.token")); err != nil {
		t.Fatal(err)
	}
	var why string
	waitFor(t, 20*time.Second, "the login box to show the refusal", func() bool {
		why, _ = chromedp.Run(ctx, chromedp.Evaluate[string](
			`document.getElementById('login').hidden ? '' : document.getElementById('login-error').textContent`))
		return why != ""
	}, func() string { return why }, 200*time.Millisecond)
	if !strings.Contains(why, "refused") {
		t.Errorf("login box says %q", why)
	}

}
