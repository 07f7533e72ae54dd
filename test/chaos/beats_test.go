package chaos

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// The workloads of TestChaos append one line per beat to a file shared by all
// containers:
//
//	<process id> <incarnation> <seconds.microseconds> <node> <run>
//
// The timestamp is busybox ash's $EPOCHREALTIME (busybox date has no %N).
// Every container reads the same host clock, so timestamps from different
// nodes are comparable. <run> is a random token each start of the workload
// picks, so two copies of one incarnation can be told apart.

// span is what the beats say about one incarnation of one process.
type span struct {
	first, last int64 // beat times, microseconds since the epoch
	node        string
	beats       int
	otherNodes  []string // nodes other than node that beat as this incarnation
	runs        map[string]*instance
}

// instance is one start of the workload: one shell from its first to its last beat.
type instance struct {
	first, last int64
	node        string
}

// beats reads the beats file incrementally and keeps, for every process, the
// first and last beat of each incarnation.
type beats struct {
	path string

	mu      sync.Mutex
	off     int64
	partial []byte
	procs   map[string]map[uint64]*span
	bad     []string // malformed lines (at most a few kept)
	nbad    int
	lines   int
}

func newBeats(path string) *beats {
	return &beats{path: path, procs: map[string]map[uint64]*span{}}
}

// update reads what was appended since the last call.
func (b *beats) update() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	f, err := os.Open(b.path)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.Seek(b.off, io.SeekStart); err != nil {
		return err
	}
	data, err := io.ReadAll(f)
	if err != nil {
		return err
	}
	b.off += int64(len(data))
	b.feedLocked(data)
	return nil
}

// feedLocked parses complete lines; an incomplete last line waits for more.
func (b *beats) feedLocked(data []byte) {
	if len(b.partial) > 0 {
		data = append(b.partial, data...)
		b.partial = nil
	}
	for len(data) > 0 {
		i := bytes.IndexByte(data, '\n')
		if i < 0 {
			b.partial = append([]byte(nil), data...)
			return
		}
		b.lineLocked(string(data[:i]))
		data = data[i+1:]
	}
}

func (b *beats) lineLocked(line string) {
	b.lines++
	id, inc, at, node, token, err := parseBeat(line)
	if err != nil {
		b.nbad++
		if len(b.bad) < 5 {
			b.bad = append(b.bad, fmt.Sprintf("%q: %v", line, err))
		}
		return
	}
	m := b.procs[id]
	if m == nil {
		m = map[uint64]*span{}
		b.procs[id] = m
	}
	s := m[inc]
	if s == nil {
		s = &span{first: at, last: at, node: node, runs: map[string]*instance{}}
		m[inc] = s
	}
	s.beats++
	s.first, s.last = min(s.first, at), max(s.last, at)
	if node != s.node && !contains(s.otherNodes, node) {
		s.otherNodes = append(s.otherNodes, node)
	}
	if r := s.runs[token]; r == nil {
		s.runs[token] = &instance{first: at, last: at, node: node}
	} else {
		r.first, r.last = min(r.first, at), max(r.last, at)
	}
}

func contains(xs []string, x string) bool {
	for _, y := range xs {
		if y == x {
			return true
		}
	}
	return false
}

// parseBeat parses "<id> <incarnation> <sec>.<usec> <node> <run>".
func parseBeat(line string) (id string, inc uint64, at int64, node, token string, err error) {
	f := strings.Fields(line)
	if len(f) != 5 {
		return "", 0, 0, "", "", fmt.Errorf("want 5 fields, got %d", len(f))
	}
	inc, err = strconv.ParseUint(f[1], 10, 64)
	if err != nil || inc == 0 {
		return "", 0, 0, "", "", fmt.Errorf("bad incarnation %q", f[1])
	}
	sec, frac, ok := strings.Cut(f[2], ".")
	if !ok || len(frac) == 0 || len(frac) > 6 {
		return "", 0, 0, "", "", fmt.Errorf("bad timestamp %q", f[2])
	}
	s, err1 := strconv.ParseInt(sec, 10, 64)
	u, err2 := strconv.ParseInt(frac+strings.Repeat("0", 6-len(frac)), 10, 64)
	if err1 != nil || err2 != nil || s <= 0 {
		return "", 0, 0, "", "", fmt.Errorf("bad timestamp %q", f[2])
	}
	return f[0], inc, s*1_000_000 + u, f[3], f[4], nil
}

// get returns a copy of what is known about incarnation inc of id.
func (b *beats) get(id string, inc uint64) (span, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.procs[id][inc]
	if s == nil {
		return span{}, false
	}
	return *s, true
}

// overlap is a pair of incarnations of one process whose beats interleave:
// the older one beat at or after the first beat of the newer one.
type overlap struct {
	id         string
	old, new   uint64
	oldSpan    span
	newSpan    span
	overlapped time.Duration // old.last - new.first
}

func (o overlap) key() string { return fmt.Sprintf("%s/%d/%d", o.id, o.old, o.new) }

func (o overlap) String() string {
	return fmt.Sprintf("%s: incarnation %d on %s beat until %s, but incarnation %d on %s beat from %s (overlap %s)",
		o.id, o.old, o.oldSpan.node, usecTime(o.oldSpan.last), o.new, o.newSpan.node, usecTime(o.newSpan.first),
		o.overlapped.Round(time.Millisecond))
}

func usecTime(us int64) string { return time.UnixMicro(us).UTC().Format("15:04:05.000000") }

// overlaps lists every pair of incarnations of a process that ran at the same
// time: for incarnations a < b, the last beat of a must come before the first
// beat of b.
func (b *beats) overlaps() []overlap {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []overlap
	for id, m := range b.procs {
		incs := make([]uint64, 0, len(m))
		for inc := range m {
			incs = append(incs, inc)
		}
		sort.Slice(incs, func(i, j int) bool { return incs[i] < incs[j] })
		for i := range incs {
			for j := i + 1; j < len(incs); j++ {
				a, c := m[incs[i]], m[incs[j]]
				if a.last >= c.first {
					out = append(out, overlap{id: id, old: incs[i], new: incs[j], oldSpan: *a, newSpan: *c,
						overlapped: time.Duration(a.last-c.first) * time.Microsecond})
				}
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].key() < out[j].key() })
	return out
}

// doubles lists incarnations that beat on more than one node, or whose runs
// (starts of the workload) overlapped in time: one incarnation running twice.
func (b *beats) doubles() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []string
	for id, m := range b.procs {
		for inc, s := range m {
			if len(s.otherNodes) > 0 {
				out = append(out, fmt.Sprintf("%s: incarnation %d beat on %s and %s", id, inc, s.node,
					strings.Join(s.otherNodes, ", ")))
			}
			runs := make([]*instance, 0, len(s.runs))
			for _, r := range s.runs {
				runs = append(runs, r)
			}
			sort.Slice(runs, func(i, j int) bool { return runs[i].first < runs[j].first })
			for i := 1; i < len(runs); i++ {
				if p := runs[i-1]; p.last >= runs[i].first {
					out = append(out, fmt.Sprintf("%s: incarnation %d ran twice at once: on %s until %s and on %s from %s",
						id, inc, p.node, usecTime(p.last), runs[i].node, usecTime(runs[i].first)))
				}
			}
		}
	}
	sort.Strings(out)
	return out
}

func (b *beats) stats() (lines, nbad int, bad []string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.lines, b.nbad, append([]string(nil), b.bad...)
}

func TestBeatsParser(t *testing.T) {
	b := newBeats("")
	b.feedLocked([]byte("a 1 1700000000.000100 n1 x\na 1 1700000000.200100 n1 x\na 2 1700000000.3 n2 y\n"))
	b.feedLocked([]byte("a 2 1700000000.600000 n2 y\nb 1 17000"))
	b.feedLocked([]byte("00000.100000 n1 z\nb 1 1700000000.300000 n3 z\nb 2 1700000000.250000 n2 w\ngarbage\n"))
	// c/1 restarted in place (runs u then v, one after the other): fine.
	// d/1 ran twice at once (runs p and q interleave).
	b.feedLocked([]byte("c 1 1700000001.0 n1 u\nc 1 1700000001.2 n1 u\nc 1 1700000001.5 n1 v\n"))
	b.feedLocked([]byte("d 1 1700000001.0 n1 p\nd 1 1700000001.1 n1 q\nd 1 1700000001.2 n1 p\n"))
	if s, ok := b.get("a", 2); !ok || s.first != 1700000000_300000 || s.last != 1700000000_600000 || s.beats != 2 {
		t.Fatalf("a/2 = %+v, %v", s, ok)
	}
	if lines, nbad, _ := b.stats(); lines != 14 || nbad != 1 {
		t.Fatalf("lines %d, bad %d", lines, nbad)
	}
	ov := b.overlaps()
	if len(ov) != 1 || ov[0].id != "b" || ov[0].old != 1 || ov[0].new != 2 || ov[0].overlapped != 50*time.Millisecond {
		t.Fatalf("overlaps = %v", ov)
	}
	d := b.doubles()
	if len(d) != 2 || !strings.Contains(d[0], "b: incarnation 1 beat on n1 and n3") ||
		!strings.Contains(d[1], "d: incarnation 1 ran twice at once") {
		t.Fatalf("doubles = %q", d)
	}
}
