package agent

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func reopen(t *testing.T, dir string) *stateLog {
	t.Helper()
	s, err := openStateLog(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.f.Close() })
	return s
}

func lineCount(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(b), "\n")
}

func TestStateLog(t *testing.T) {
	dir := t.TempDir()
	s := reopen(t, dir)
	a, b := state{Incarnation: 1, PID: 10, StartTime: 99, Resources: []byte{8, 1}}, state{Incarnation: 2, PID: 20}
	for _, err := range []error{s.put("aaaaaaaaaaaa", a), s.put("bbbbbbbbbbbb", b), s.drop("aaaaaaaaaaaa"), s.drop("cccccccccccc")} {
		if err != nil {
			t.Fatal(err)
		}
	}
	b.Restarts = 3
	if err := s.put("bbbbbbbbbbbb", b); err != nil {
		t.Fatal(err)
	}
	want := map[string]state{"bbbbbbbbbbbb": b}
	if got := reopen(t, dir).all(); !reflect.DeepEqual(got, want) {
		t.Fatalf("after reopening: %+v, want %+v", got, want)
	}
	// Reopening rewrote it to the live entries; a torn last line (shimd
	// killed mid-write) is skipped.
	path := filepath.Join(dir, "state.log")
	if n := lineCount(t, path); n != 1 {
		t.Errorf("%d lines after reopening, want 1", n)
	}
	f, _ := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString(`{"id":"dddddddddddd","incarnation":`)
	f.Close()
	if got := reopen(t, dir).all(); !reflect.DeepEqual(got, want) {
		t.Fatalf("with a torn line: %+v, want %+v", got, want)
	}
}

// TestStateLogCompacts checks that churn does not grow the file without
// bound: starting and ending many processes leaves it O(live).
func TestStateLogCompacts(t *testing.T) {
	dir := t.TempDir()
	s := reopen(t, dir)
	if err := s.put("keepkeepkeep", state{Incarnation: 7}); err != nil {
		t.Fatal(err)
	}
	for i := range 5000 {
		id := "p" + fmt.Sprintf("%011d", i)
		if err := s.put(id, state{Incarnation: 1}); err != nil {
			t.Fatal(err)
		}
		if err := s.drop(id); err != nil {
			t.Fatal(err)
		}
	}
	if n := lineCount(t, filepath.Join(dir, "state.log")); n > 4*1+256+1 {
		t.Errorf("%d lines for 1 live process after 5000 starts and ends", n)
	}
	if got := reopen(t, dir).all(); len(got) != 1 || got["keepkeepkeep"].Incarnation != 7 {
		t.Errorf("after churn: %+v", got)
	}
}

// TestStateLogLegacy checks that an upgrade from a shimd that kept one file
// per process (state/ID.json) adopts its processes.
func TestStateLogLegacy(t *testing.T) {
	dir := t.TempDir()
	old := state{Incarnation: 4, PID: 123, StartTime: 456, Restarts: 1}
	b, _ := json.Marshal(old)
	os.MkdirAll(filepath.Join(dir, "state"), 0o755)
	os.WriteFile(filepath.Join(dir, "state", "eeeeeeeeeeee.json"), b, 0o644)
	os.WriteFile(filepath.Join(dir, "state", "not-an-id!.json"), b, 0o644)
	if got := reopen(t, dir).all(); !reflect.DeepEqual(got, map[string]state{"eeeeeeeeeeee": old}) {
		t.Fatalf("legacy state: %+v", got)
	}
	if _, err := os.Stat(filepath.Join(dir, "state")); !os.IsNotExist(err) {
		t.Errorf("legacy state dir left behind: %v", err)
	}
	if got := reopen(t, dir).all(); !reflect.DeepEqual(got["eeeeeeeeeeee"], old) {
		t.Fatalf("legacy state after a second open: %+v", got)
	}
}
