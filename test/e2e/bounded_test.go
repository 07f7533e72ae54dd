package e2e

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// TestBoundedRequests sends a real shimd the requests the issue found
// (through TLS, with the admin token): each is refused with one line, the
// table is unchanged, and shimd's RSS stays where it was; slow bodies are cut
// off, and a huge wait_millis waits.
func TestBoundedRequests(t *testing.T) {
	needRoot(t)
	c := startCluster(t, 1)
	d := c.nodes[0]
	tok, err := os.ReadFile(filepath.Join(c.dataDir(), "admin.token"))
	if err != nil {
		t.Fatal(err)
	}
	hc := c.httpClient()
	hc.Timeout = 30 * time.Second
	url := "https://" + d.api
	post := func(path, body string) (int, string) {
		t.Helper()
		req, _ := http.NewRequest("POST", url+path, strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, strings.TrimSpace(string(b))
	}
	api := c.api(d.api)
	ctx := context.Background()
	l, err := api.List(ctx, connect.NewRequest(&pb.ListRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	index := l.Msg.Index
	rss0 := rssBytes(t, d.cmd.Process.Pid)

	spawn := "/shim.v1.ShimService/Spawn"
	big := strings.Repeat("x", 900<<10)
	cases := []struct {
		what, body string
		code       int
	}{
		{"unknown field", `{"spec":{"command":["/bin/true"]},"cuont":2}`, http.StatusBadRequest},
		{"100 × 0.9 MB", `{"spec":{"command":["/bin/true"],"env":["X=` + big + `"]},"count":100}`, http.StatusBadRequest},
		{"oversized", `{"spec":{"command":["/bin/true"],"env":["X=` + big + big + `"]}}`, http.StatusRequestEntityTooLarge},
	}
	for range 5 {
		for _, tc := range cases {
			code, msg := post(spawn, tc.body)
			if code != tc.code || strings.Contains(msg, "\n") || msg == "" {
				t.Fatalf("%s: %d %.300q, want %d and one line", tc.what, code, msg, tc.code)
			}
		}
	}

	// Slow bodies: 50 clients send a byte a second; each is cut off within
	// the 10 s body deadline (plus slack), not held.
	var wg sync.WaitGroup
	held := make(chan string, 50)
	for i := range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conn, err := tls.Dial("tcp", d.api, &tls.Config{RootCAs: c.caPool(), MinVersion: tls.VersionTLS13, NextProtos: []string{"http/1.1"}})
			if err != nil {
				held <- err.Error()
				return
			}
			defer conn.Close()
			fmt.Fprintf(conn, "POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n",
				spawn, strings.TrimSpace(string(tok)))
			start := time.Now()
			for time.Since(start) < 40*time.Second {
				if _, err := conn.Write([]byte(" ")); err != nil {
					return // cut off
				}
				_ = conn.SetReadDeadline(time.Now().Add(time.Second))
				var b [512]byte
				if n, err := conn.Read(b[:]); n > 0 || (err != nil && !isTimeout(err)) {
					return // answered (and closed)
				}
			}
			held <- fmt.Sprintf("client %d held for 40 s", i)
		}()
	}
	wg.Wait()
	close(held)
	for msg := range held {
		t.Error("slow body:", msg)
	}

	// A huge wait_millis waits (it used to overflow into no wait).
	wctx, cancel := context.WithTimeout(ctx, time.Second)
	start := time.Now()
	_, err = api.List(wctx, connect.NewRequest(&pb.ListRequest{MinIndex: index + 1000, WaitMillis: 1 << 62}))
	cancel()
	if err == nil || time.Since(start) < 900*time.Millisecond {
		t.Errorf("a blocking List with a huge wait_millis returned after %s: %v", time.Since(start), err)
	}

	l, err = api.List(ctx, connect.NewRequest(&pb.ListRequest{All: true}))
	if err != nil {
		t.Fatal(err)
	}
	if len(l.Msg.Processes) != 0 {
		t.Errorf("the table holds %d processes after bad requests", len(l.Msg.Processes))
	}
	rss1 := rssBytes(t, d.cmd.Process.Pid)
	t.Logf("shimd RSS %.1f MiB before, %.1f MiB after the bad requests", float64(rss0)/(1<<20), float64(rss1)/(1<<20))
	if rss1 > rss0+64<<20 {
		t.Errorf("shimd's RSS grew from %d to %d bytes", rss0, rss1)
	}
}

func isTimeout(err error) bool {
	ne, ok := err.(interface{ Timeout() bool })
	return ok && ne.Timeout()
}
