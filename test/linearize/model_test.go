package linearize

import (
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
)

const ms = time.Millisecond

func spawn(key string, call, ret time.Duration, o Outcome) Op {
	return Op{Kind: Spawn, Key: key, Outcome: o, Call: call, Ret: ret}
}

func kill(key string, call, ret time.Duration, o Outcome) Op {
	return Op{Kind: Kill, Key: key, Outcome: o, Call: call, Ret: ret}
}

func read(call, ret time.Duration, seen map[string]State) Op {
	return Op{Kind: Read, Observed: seen, Call: call, Ret: ret, Client: 1}
}

func check(t *testing.T, ops ...Op) porcupine.CheckResult {
	t.Helper()
	h := NewHistory()
	for _, op := range ops {
		h.Add(op)
	}
	return h.Check(10 * time.Second)
}

// The checker rejects what the issue saw and accepts what one copy allows.
func TestModel(t *testing.T) {
	cases := []struct {
		name string
		ops  []Op
		want porcupine.CheckResult
	}{
		{"spawn, read, kill, read", []Op{
			spawn("a", 0, 10*ms, OK), read(20*ms, 30*ms, map[string]State{"a": Live}),
			kill("a", 40*ms, 50*ms, OK), read(60*ms, 70*ms, map[string]State{"a": Killed}),
		}, porcupine.Ok},
		// A follower listing without a process after its spawn returned.
		{"stale read after a spawn", []Op{
			spawn("a", 0, 10*ms, OK), read(12*ms, 30*ms, map[string]State{}),
		}, porcupine.Illegal},
		// A follower showing a process live after its kill returned.
		{"stale read after a kill", []Op{
			spawn("a", 0, 10*ms, OK), kill("a", 20*ms, 30*ms, OK), read(32*ms, 40*ms, map[string]State{"a": Live}),
		}, porcupine.Illegal},
		// A restarted member answering from an empty table after another
		// had listed the process.
		{"read going back", []Op{
			spawn("a", 0, 100*ms, Unknown), read(20*ms, 30*ms, map[string]State{"a": Live}),
			read(40*ms, 50*ms, map[string]State{}),
		}, porcupine.Illegal},
		{"reads concurrent with a spawn", []Op{
			spawn("a", 0, 100*ms, OK), read(10*ms, 20*ms, map[string]State{}),
			read(30*ms, 40*ms, map[string]State{"a": Live}),
		}, porcupine.Ok},
		{"a lost spawn that happened", []Op{
			spawn("a", 0, -1, Unknown), read(500*ms, 510*ms, map[string]State{"a": Live}),
		}, porcupine.Ok},
		{"a lost spawn that did not", []Op{
			spawn("a", 0, -1, Unknown), read(500*ms, 510*ms, map[string]State{}),
		}, porcupine.Ok},
		{"a refused spawn", []Op{
			spawn("a", 0, 10*ms, Failed), read(20*ms, 30*ms, map[string]State{"a": Live}),
		}, porcupine.Illegal},
		{"a spawn made twice", []Op{
			spawn("a", 0, 10*ms, OK), read(20*ms, 30*ms, map[string]State{"a": Duplicate}),
		}, porcupine.Illegal},
		{"a process nobody spawned", []Op{
			read(20*ms, 30*ms, map[string]State{"b": Live}),
		}, porcupine.Illegal},
		{"a lost kill", []Op{
			spawn("a", 0, 10*ms, OK), kill("a", 20*ms, -1, Unknown),
			read(30*ms, 40*ms, map[string]State{"a": Killed}), read(50*ms, 60*ms, map[string]State{"a": Killed}),
		}, porcupine.Ok},
		{"a lost kill undone", []Op{
			spawn("a", 0, 10*ms, OK), kill("a", 20*ms, -1, Unknown),
			read(30*ms, 40*ms, map[string]State{"a": Killed}), read(50*ms, 60*ms, map[string]State{"a": Live}),
		}, porcupine.Illegal},
		// Keys are independent: a stale read of one key is caught among
		// good ones.
		{"one stale key of two", []Op{
			spawn("a", 0, 10*ms, OK), spawn("b", 0, 10*ms, OK),
			read(20*ms, 30*ms, map[string]State{"a": Live, "b": Live}),
			kill("b", 40*ms, 50*ms, OK),
			read(60*ms, 70*ms, map[string]State{"a": Live, "b": Live}),
		}, porcupine.Illegal},
	}
	for _, c := range cases {
		if got := check(t, c.ops...); got != c.want {
			t.Errorf("%s: %v, want %v", c.name, got, c.want)
		}
	}
}

// Reads that cannot tell anything about a key are left out of its partition.
func TestOperationsPrune(t *testing.T) {
	h := NewHistory()
	h.Add(read(0, 5*ms, map[string]State{}))
	h.Add(spawn("a", 10*ms, 20*ms, OK))
	h.Add(kill("a", 30*ms, 40*ms, OK))
	h.Add(read(50*ms, 60*ms, map[string]State{"a": Killed}))
	h.Add(read(25*ms, 26*ms, map[string]State{"a": Live}))
	if n := len(h.Operations()); n != 3 {
		t.Fatalf("%d operations, want 3 (spawn, kill, the read between)", n)
	}
	if s, k, r := h.Len(); s != 1 || k != 1 || r != 3 {
		t.Fatalf("Len = %d %d %d", s, k, r)
	}
}
