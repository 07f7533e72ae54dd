// Package linearize checks that shim's process table behaves as one copy
// would: clients record a history of spawns, kills and reads against the
// members of a real cluster, and the history is checked with porcupine
// (github.com/anishathalye/porcupine), a linearizability checker, against
// the model below. The cluster test (cluster_test.go) runs real shimd
// servers while their leader is killed and restarted.
package linearize

import (
	"fmt"
	"math"
	"sort"
	"strings"
	"time"

	"github.com/anishathalye/porcupine"
)

// The model.
//
// Each spawn names its process with a key of its own (a unique process name),
// so the table is a set of independent registers, one per key, each going
// absent → live (spawned) → killed. A read lists the whole table and is
// split into one observation per key; the history is linearizable per key
// (porcupine's partitions), which the checker can afford at thousands of
// operations. That is weaker than checking the whole set at once (a read
// could in principle mix keys from different moments), but catches every
// stale read the issue found: a process missing after its spawn returned,
// live after its kill returned, or gone on a member that had listed it.
//
// Only a kill stops a process in this model: the test's processes restart
// always, so that none ends by itself (a kill of a finished process changes
// nothing, and would look like a lost kill). A read that shows one finished
// but not killed, or two under one key, is never legal.
//
// A spawn or kill whose answer was lost after it may have been sent has an
// unknown outcome: it is pending until the end of the history, and may or
// may not have taken effect (a nondeterministic step). A read of a key that
// shows more than one process is never legal: spawns happen once.

// Kind is an operation's kind.
type Kind uint8

const (
	Spawn Kind = iota
	Kill
	Read
)

// State is one key's state, as the model holds it and as a read observes
// it.
type State uint8

const (
	Absent State = iota
	Live
	Killed
	Duplicate // observed only: two processes under one key
	Ended     // observed only: finished, not killed (the test's processes restart always)
)

func (s State) String() string {
	return [...]string{"absent", "live", "killed", "duplicate", "ended unkilled"}[s]
}

// Outcome is how a spawn or kill ended.
type Outcome uint8

const (
	OK      Outcome = iota // acknowledged
	Failed                 // refused: it took no effect
	Unknown                // its answer was lost: it may or may not have
)

// Input is what an operation on one key asked.
type Input struct {
	Kind Kind
	Key  string
}

// Output is what it was answered: an outcome (spawn, kill) or the state
// observed (read).
type Output struct {
	Outcome  Outcome
	Observed State
}

// Model is the per-key model: a key's register, partitioned by key.
var Model = porcupine.NondeterministicModel{
	Partition: func(h []porcupine.Operation) [][]porcupine.Operation {
		by := map[string][]porcupine.Operation{}
		var keys []string
		for _, op := range h {
			k := op.Input.(Input).Key
			if _, ok := by[k]; !ok {
				keys = append(keys, k)
			}
			by[k] = append(by[k], op)
		}
		sort.Strings(keys)
		out := make([][]porcupine.Operation, 0, len(keys))
		for _, k := range keys {
			out = append(out, by[k])
		}
		return out
	},
	Init: func() []any { return []any{Absent} },
	Step: func(state, input, output any) []any {
		s, in, out := state.(State), input.(Input), output.(Output)
		switch in.Kind {
		case Spawn:
			switch {
			case out.Outcome == Failed:
				return []any{s}
			case s != Absent:
				return nil // a key is spawned once
			case out.Outcome == OK:
				return []any{Live}
			}
			return []any{Absent, Live}
		case Kill:
			switch {
			case out.Outcome == Failed:
				return []any{s}
			case s == Absent:
				return nil
			case out.Outcome == OK:
				return []any{Killed}
			}
			return []any{s, Killed}
		case Read:
			if out.Observed == s {
				return []any{s}
			}
		}
		return nil
	},
	DescribeOperation: func(input, output any) string {
		in, out := input.(Input), output.(Output)
		switch in.Kind {
		case Spawn:
			return fmt.Sprintf("spawn(%s) %s", in.Key, outcomeName(out.Outcome))
		case Kill:
			return fmt.Sprintf("kill(%s) %s", in.Key, outcomeName(out.Outcome))
		}
		return fmt.Sprintf("read(%s) -> %s", in.Key, out.Observed)
	},
	DescribeState: func(state any) string { return state.(State).String() },
}

func outcomeName(o Outcome) string { return [...]string{"ok", "failed", "unknown"}[o] }

// History records operations from concurrent clients. Times are from one
// monotonic clock.
type History struct {
	start time.Time
	ops   []Op
}

// Op is one client operation. A read observes many keys: Observed.
type Op struct {
	Client    int
	Kind      Kind
	Key       string // spawn, kill
	Outcome   Outcome
	Observed  map[string]State // read: the keys it saw; the others are absent
	Call, Ret time.Duration    // since the history's start; Ret < 0: never answered
}

// NewHistory starts a history now.
func NewHistory() *History { return &History{start: time.Now()} }

// Now is the time since the history started.
func (h *History) Now() time.Duration { return time.Since(h.start) }

// Add records an operation (not safe for concurrent use: clients keep their
// own and Merge them).
func (h *History) Add(op Op) { h.ops = append(h.ops, op) }

// Merge adds another history's operations (recorded with the same start).
func (h *History) Merge(o *History) { h.ops = append(h.ops, o.ops...) }

// Fork returns an empty history sharing h's clock.
func (h *History) Fork() *History { return &History{start: h.start} }

// Len counts the operations by kind.
func (h *History) Len() (spawns, kills, reads int) {
	for _, op := range h.ops {
		switch op.Kind {
		case Spawn:
			spawns++
		case Kill:
			kills++
		case Read:
			reads++
		}
	}
	return
}

// Operations turns the history into porcupine's per-key operations. A read
// becomes one observation per key it could tell anything about: reads that
// saw a key absent before its spawn was called, or killed after its kill
// returned, are legal whatever else happened and are left out, which keeps
// the partitions small.
func (h *History) Operations() []porcupine.Operation {
	type span struct{ spawnCall, killRet time.Duration }
	keys := map[string]*span{}
	for _, op := range h.ops {
		if op.Kind == Read {
			continue
		}
		sp := keys[op.Key]
		if sp == nil {
			sp = &span{spawnCall: math.MaxInt64, killRet: math.MaxInt64}
			keys[op.Key] = sp
		}
		if op.Kind == Spawn {
			sp.spawnCall = min(sp.spawnCall, op.Call)
		}
		if op.Kind == Kill && op.Outcome == OK && op.Ret >= 0 {
			sp.killRet = op.Ret
		}
	}
	never := int64(math.MaxInt64 / 2)
	ret := func(op Op) int64 {
		if op.Ret < 0 {
			return never
		}
		return int64(op.Ret)
	}
	var out []porcupine.Operation
	for _, op := range h.ops {
		if op.Kind != Read {
			out = append(out, porcupine.Operation{ClientId: op.Client, Input: Input{op.Kind, op.Key},
				Call: int64(op.Call), Output: Output{Outcome: op.Outcome}, Return: ret(op)})
			continue
		}
		for k, sp := range keys {
			s := op.Observed[k]
			if s == Absent && op.Ret < sp.spawnCall || s == Killed && op.Call > sp.killRet {
				continue
			}
			out = append(out, porcupine.Operation{ClientId: op.Client, Input: Input{Read, k},
				Call: int64(op.Call), Output: Output{Observed: s}, Return: ret(op)})
		}
		for k, s := range op.Observed { // keys nobody spawned
			if keys[k] == nil {
				out = append(out, porcupine.Operation{ClientId: op.Client, Input: Input{Read, k},
					Call: int64(op.Call), Output: Output{Observed: s}, Return: ret(op)})
			}
		}
	}
	return out
}

// Check checks the history within timeout.
func (h *History) Check(timeout time.Duration) porcupine.CheckResult {
	return porcupine.CheckOperationsTimeout(Model.ToModel(), h.Operations(), timeout)
}

// Explain describes the operations on the first key whose history is not
// linearizable, in call order, or "" if there is none.
func (h *History) Explain(timeout time.Duration) string {
	m := Model.ToModel()
	for _, part := range Model.Partition(h.Operations()) {
		if porcupine.CheckOperationsTimeout(m, part, timeout) != porcupine.Illegal {
			continue
		}
		sort.Slice(part, func(i, j int) bool { return part[i].Call < part[j].Call })
		var b strings.Builder
		fmt.Fprintf(&b, "key %s:", part[0].Input.(Input).Key)
		for _, op := range part {
			ret := "never"
			if op.Return < math.MaxInt64/2 {
				ret = time.Duration(op.Return).String()
			}
			fmt.Fprintf(&b, "\n  client %d [%s, %s] %s", op.ClientId, time.Duration(op.Call), ret,
				Model.DescribeOperation(op.Input, op.Output))
		}
		return b.String()
	}
	return ""
}
