package server

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/proto/shimv1/shimv1connect"
)

func heapMB() float64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return float64(m.HeapAlloc) / (1 << 20)
}

// Each bad request is refused with one line, leaves the table as it was,
// and leaves the server's heap where it was.
func TestBadRequestsRefused(t *testing.T) {
	s, _ := testServer(t, "s1", true)
	hs := httptest.NewServer(s.Handler())
	defer hs.Close()
	register(t, s, "w1", "127.0.0.1:1", pb.NodeRole_NODE_ROLE_WORKER)
	ctx := context.Background()
	c := shimv1connect.NewShimServiceClient(NewHTTPClient(nil), hs.URL)
	index := s.Table.Index()
	heap := heapMB()
	post := func(body string, contentLength int64) (int, string) {
		t.Helper()
		req, err := http.NewRequest("POST", hs.URL+shimv1connect.ShimServiceSpawnProcedure, strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", "application/json")
		if contentLength >= 0 {
			req.ContentLength = contentLength
		} else {
			req.ContentLength = -1
			req.Body = io.NopCloser(strings.NewReader(body)) // chunked: no length to check up front
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	oneLine := func(what, msg string) {
		t.Helper()
		if strings.Contains(strings.TrimSpace(msg), "\n") || strings.TrimSpace(msg) == "" {
			t.Errorf("%s: want one line, got %q", what, msg)
		}
	}

	// An unknown JSON field.
	code, body := post(`{"spec":{"command":["/bin/true"]},"cuont":3}`, -2)
	if code != http.StatusBadRequest || !strings.Contains(body, "cuont") {
		t.Errorf("unknown field: %d %s, want 400 naming the field", code, body)
	}
	oneLine("unknown field", body)

	// Oversized bodies: with a length, and chunked.
	big := `{"spec":{"command":["/bin/true"],"env":["X=` + strings.Repeat("x", MaxRequestBytes+10) + `"]}}`
	for _, cl := range []int64{int64(len(big)), -1} {
		code, body := post(big, cl)
		if code != http.StatusRequestEntityTooLarge {
			t.Errorf("oversized body (length %d): %d %.200s, want 413", cl, code, body)
		}
		oneLine("oversized", body)
	}

	// One spawn that would make too much: count × spec size.
	spec := &pb.ProcessSpec{Command: []string{"/bin/true"}, Env: []string{"X=" + strings.Repeat("x", 900<<10)}}
	for range 5 {
		_, err := c.Spawn(ctx, connect.NewRequest(&pb.SpawnRequest{Spec: spec, Count: 100}))
		if connect.CodeOf(err) != connect.CodeInvalidArgument || !strings.Contains(err.Error(), "count 100") {
			t.Fatalf("a 100 × 0.9 MB spawn: %v, want refused naming the count", err)
		}
		oneLine("spawn size", err.Error())
	}

	// A huge wait_millis waits (it once overflowed into no wait at all).
	wctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	start := time.Now()
	_, err := c.List(wctx, connect.NewRequest(&pb.ListRequest{MinIndex: index + 1000, WaitMillis: math.MaxInt64}))
	cancel()
	if connect.CodeOf(err) != connect.CodeDeadlineExceeded && connect.CodeOf(err) != connect.CodeCanceled {
		t.Errorf("a blocking List with wait_millis MaxInt64 answered after %v: %v, want it to wait", time.Since(start), err)
	}
	if waitFor(math.MaxInt64) != MaxWait || waitFor(1) != time.Millisecond || waitFor(-5) != 30*time.Second {
		t.Errorf("waitFor: %v %v %v", waitFor(math.MaxInt64), waitFor(1), waitFor(-5))
	}

	// A bad page token.
	_, err = c.List(ctx, connect.NewRequest(&pb.ListRequest{PageToken: "nonsense"}))
	if connect.CodeOf(err) != connect.CodeInvalidArgument {
		t.Errorf("bad page token: %v", err)
	}

	if got := s.Table.Index(); got != index {
		t.Errorf("the table moved from index %d to %d", index, got)
	}
	if n := len(s.Table.Processes(true, "")); n != 0 {
		t.Errorf("the table has %d processes, want none", n)
	}
	if grown := heapMB() - heap; grown > 32 {
		t.Errorf("the heap grew by %.0f MB after the bad requests", grown)
	}
}

// A body that trickles in is cut off at the body deadline; a long poll
// whose body came at once is not.
func TestSlowBodyCutOff(t *testing.T) {
	s, _ := testServer(t, "s1", true)
	s.BodyTimeout = 500 * time.Millisecond
	hs := httptest.NewServer(s.Handler())
	defer hs.Close()
	conn, err := net.Dial("tcp", hs.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{", shimv1connect.ShimServiceListProcedure)
	start := time.Now()
	done := make(chan error, 1)
	go func() {
		// One byte every 100 ms: 10 s for the body, were it allowed.
		for range 100 {
			if _, err := conn.Write([]byte(" ")); err != nil {
				done <- err
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		done <- nil
	}()
	_ = conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Fatalf("a trickled body was answered 200")
		}
	}
	if el := time.Since(start); el > 8*time.Second {
		t.Fatalf("the slow body held its request for %v (body deadline 500 ms)", el)
	}
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("the whole trickled body was accepted")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the connection stayed open for the trickle")
	}

	// A long poll outlives the body deadline.
	c := shimv1connect.NewShimServiceClient(NewHTTPClient(nil), hs.URL, connect.WithProtoJSON())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start = time.Now()
	_, err = c.List(ctx, connect.NewRequest(&pb.ListRequest{MinIndex: s.Table.Index() + 100, WaitMillis: 1500}))
	if err != nil || time.Since(start) < 1400*time.Millisecond {
		t.Fatalf("a 1.5 s long poll (body deadline 500 ms) ended after %v: %v", time.Since(start), err)
	}
}

// List answers in pages that together hold every record once, in order;
// a page holds at most MaxPageBytes (one record at least).
func TestListPages(t *testing.T) {
	s, _ := testServer(t, "s1", true)
	hs := httptest.NewServer(s.Handler())
	defer hs.Close()
	register(t, s, "w1", "127.0.0.1:1", pb.NodeRole_NODE_ROLE_WORKER)
	ctx := context.Background()
	spawn := func(n int, spec *pb.ProcessSpec) {
		ids := make([]string, n)
		for i := range ids {
			ids[i] = NewID()
		}
		if _, err := s.apply(ctx, &pb.Command{Op: &pb.Command_Spawn{Spawn: &pb.Spawn{Ids: ids, Spec: spec}}}); err != nil {
			t.Fatal(err)
		}
	}
	for range 5 {
		spawn(500, &pb.ProcessSpec{Command: []string{"/bin/sleep", "1"}, Resources: &pb.Resources{}})
	}
	want := s.Table.Processes(false, "")
	for _, c := range []shimv1connect.ShimServiceClient{
		shimv1connect.NewShimServiceClient(NewHTTPClient(nil), hs.URL),
		shimv1connect.NewShimServiceClient(NewHTTPClient(nil), hs.URL, connect.WithProtoJSON()),
	} {
		for _, size := range []int32{0, 1, 7, 999, 5000} {
			var got []string
			tok, pages := "", 0
			for {
				resp, err := c.List(ctx, connect.NewRequest(&pb.ListRequest{PageSize: size, PageToken: tok}))
				if err != nil {
					t.Fatal(err)
				}
				pages++
				limit := int(size)
				if limit == 0 {
					limit = DefaultPageSize
				}
				if n := len(resp.Msg.Processes); n > limit || (n == 0 && resp.Msg.NextPageToken != "") {
					t.Fatalf("page size %d: a page of %d", size, n)
				}
				for _, r := range resp.Msg.Processes {
					got = append(got, r.Id)
				}
				if tok = resp.Msg.NextPageToken; tok == "" {
					break
				}
			}
			if len(got) != len(want) {
				t.Fatalf("page size %d: %d records in %d pages, want %d", size, len(got), pages, len(want))
			}
			for i := range want {
				if got[i] != want[i].Id {
					t.Fatalf("page size %d: record %d is %s, want %s", size, i, got[i], want[i].Id)
				}
			}
		}
	}
	// Big records: a page stops at MaxPageBytes.
	bigSpec := &pb.ProcessSpec{Command: []string{"/bin/sleep", "1"}, Env: []string{"X=" + strings.Repeat("x", 900<<10)}}
	for range 3 {
		spawn(4, bigSpec)
	}
	c := shimv1connect.NewShimServiceClient(NewHTTPClient(nil), hs.URL, connect.WithReadMaxBytes(64<<20))
	tok, n := "", 0
	for {
		resp, err := c.List(ctx, connect.NewRequest(&pb.ListRequest{PageSize: MaxPageSize, PageToken: tok}))
		if err != nil {
			t.Fatal(err)
		}
		size := 0
		for _, r := range resp.Msg.Processes {
			size += proto.Size(r)
		}
		if len(resp.Msg.Processes) > 1 && size > MaxPageBytes {
			t.Fatalf("a page of %d records holds %d bytes of env", len(resp.Msg.Processes), size)
		}
		n += len(resp.Msg.Processes)
		if tok = resp.Msg.NextPageToken; tok == "" {
			break
		}
	}
	if n != 2512 {
		t.Fatalf("listed %d records over the pages, want 2512", n)
	}
}
