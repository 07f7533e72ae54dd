package guest

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestMsgRoundTrip(t *testing.T) {
	for _, m := range []Msg{
		{Kind: KindSignal, A: 15},
		{Kind: KindStat},
		{Kind: KindStarted, A: 42},
		{Kind: KindExit, A: 3},
		{Kind: KindExit, A: 9, Signal: true},
		{Kind: KindExit, A: 9, Signal: true, OOM: true},
		{Kind: KindFail, Text: `exec "/x": not found`},
		{Kind: KindWant, A: 512 << 20, B: 2000},
		{Kind: KindMem, A: 1 << 30, B: 1 << 29, C: 2},
	} {
		got, err := ParseMsg(m.String())
		if err != nil || got != m {
			t.Errorf("ParseMsg(%q) = %+v, %v; want %+v", m.String(), got, err, m)
		}
	}
}

func TestParseMsgRejects(t *testing.T) {
	for _, l := range []string{"", "hello", "signal", "signal -1", "signal x", "exit code", "exit nope 3",
		"exit code 3 oom", "want mem 1", "want cpu 1 mem 2", "mem 1 2", "mem 1 2 3 4", "stat now",
		"signal 99999999999999999999"} {
		if m, err := ParseMsg(l); !errors.Is(err, ErrBadMessage) {
			t.Errorf("ParseMsg(%q) = %+v, %v; want ErrBadMessage", l, m, err)
		}
	}
}

func TestFailTextIsOneBoundedLine(t *testing.T) {
	s := Msg{Kind: KindFail, Text: "a\nb" + strings.Repeat("x", 2*MaxLine)}.String()
	if strings.ContainsAny(s, "\n\r") || len(s)+1 > MaxLine {
		t.Errorf("fail line %d bytes, newline %v", len(s), strings.Contains(s, "\n"))
	}
}

func TestWantMem(t *testing.T) {
	const M = 1 << 20
	for _, c := range []struct{ total, avail, want uint64 }{
		{1024 * M, 800 * M, 0},         // plenty
		{1024 * M, 400 * M, 0},         // 39% available
		{1024 * M, 200 * M, 1280 * M},  // used 824: +412 -> 1236, rounded; at least total+128
		{200 * M, 90 * M, 328 * M},     // below 96 MiB: used 110 + 128 = 238 < total+128
		{200 * M, 300 * M, 0},          // odd input: more available than total
		{1000*M + 1, 10 * M, 1486 * M}, // rounded up to 2 MiB
	} {
		got := wantMem(c.total, c.avail)
		if c.want == 0 && got != 0 || c.want != 0 && got < c.total+wantStep {
			t.Errorf("wantMem(%d, %d) = %d MiB", c.total/M, c.avail/M, got/M)
		}
		if c.want != 0 && (got%(2*M) != 0 || got <= c.total) {
			t.Errorf("wantMem(%d, %d) = %d: not a 2 MiB multiple above total", c.total/M, c.avail/M, got)
		}
	}
	if got := wantMem(1024*M, 200*M); got != 1236*M {
		t.Errorf("wantMem(1024, 200) = %d MiB, want 1236", got/M)
	}
}

func TestWantCPU(t *testing.T) {
	if got := wantCPU(2, [2]float64{0.95, 0.99}); got != 3000 {
		t.Errorf("busy: %d", got)
	}
	if got := wantCPU(2, [2]float64{0.5, 0.99}); got != 0 {
		t.Errorf("one busy sample: %d", got)
	}
	if got := wantCPU(0, [2]float64{1, 1}); got != 0 {
		t.Errorf("no cpus: %d", got)
	}
}

func TestCountList(t *testing.T) {
	for s, n := range map[string]int{"0": 1, "0-3": 4, "0-2,4": 4, "0,2,5-6": 4, "": 0, "x": 0, "3-1": 0} {
		if got := countList(s); got != n {
			t.Errorf("countList(%q) = %d, want %d", s, got, n)
		}
	}
}

func TestParseUevent(t *testing.T) {
	b := []byte("add@/devices/system/cpu/cpu2\x00ACTION=add\x00DEVPATH=/devices/system/cpu/cpu2\x00SUBSYSTEM=cpu\x00SEQNUM=7\x00")
	a, d, s := parseUevent(b)
	if a != "add" || d != "/devices/system/cpu/cpu2" || s != "cpu" {
		t.Errorf("parseUevent = %q %q %q", a, d, s)
	}
}

func TestChanged(t *testing.T) {
	base := Msg{Kind: KindMem, A: 1 << 30, B: 512 << 20, C: 1}
	for _, c := range []struct {
		m    Msg
		want bool
	}{
		{base, false},
		{Msg{Kind: KindMem, A: 1 << 30, B: 512<<20 - 1<<20, C: 1}, false}, // 1 MiB less available
		{Msg{Kind: KindMem, A: 1 << 30, B: 400 << 20, C: 1}, true},
		{Msg{Kind: KindMem, A: 2 << 30, B: 512 << 20, C: 1}, true},
		{Msg{Kind: KindMem, A: 1 << 30, B: 512 << 20, C: 2}, true},
	} {
		if got := changed(base, c.m); got != c.want {
			t.Errorf("changed(%+v) = %v", c.m, got)
		}
	}
}

func TestLookPath(t *testing.T) {
	dir := t.TempDir()
	exe := filepath.Join(dir, "prog")
	if err := os.WriteFile(exe, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "data"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if p, err := lookPath("prog", []string{"PATH=/nonexistent:" + dir}, ""); err != nil || p != exe {
		t.Errorf("lookPath via PATH = %q, %v", p, err)
	}
	if p, err := lookPath("./prog", nil, dir); err != nil || p != "./prog" {
		t.Errorf("lookPath relative to dir = %q, %v", p, err)
	}
	if _, err := lookPath("data", []string{"PATH=" + dir}, ""); err == nil {
		t.Errorf("lookPath found a file that is not executable")
	}
	if _, err := lookPath("no-such-program-here", []string{"PATH=" + dir}, ""); err == nil {
		t.Errorf("lookPath found a missing program")
	}
}
