// Package chaos runs a five-node shim cluster under Docker Compose and breaks
// it over and over: nodes are killed (docker kill: shimd and all its
// processes die at once, like a host losing power) and restarted, or cut off
// from the network and reconnected. A few hundred workloads append beats to a
// file shared by all containers, and after every round the test checks,
// through the API and the beats, that no process was lost and that no two
// incarnations of a process ever ran at the same time.
//
// It needs a Docker engine, docker-compose and busybox-static; without them
// it skips, unless SHIM_REQUIRE_DOCKER=1 (set by .ci/run). It also skips with
// -short. Knobs, all optional:
//
//	SHIM_CHAOS_DURATION  how long to keep injecting faults (default 3m)
//	SHIM_CHAOS_PROCS     number of workloads (default 300)
//	SHIM_CHAOS_SEED      seed of the fault schedule (default: random, printed)
//	SHIM_CHAOS_LEASE     shimd --lease (default 1s)
//	SHIM_CHAOS_SHIMD     a prebuilt static shimd to use instead of building one
package chaos

import (
	"fmt"
	"math/rand/v2"
	"os"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/table"
	"github.com/shim-run/shim/test/report"
)

// beatScript is the workload: it appends a beat to the shared file every
// 200 ms. It sleeps with the shell's own `read -t` on a private FIFO, so a
// beat costs no fork: a few hundred of them fit on a small machine.
const beatScript = `run=${EPOCHREALTIME#*.}$RANDOM f=/tmp/beat.$SHIM_PROCESS_ID.$SHIM_INCARNATION.$run
busybox mkfifo $f && exec 3<>$f && busybox rm -f $f || exit 1
while :; do
	echo "$SHIM_PROCESS_ID $SHIM_INCARNATION $EPOCHREALTIME $SHIM_NODE $run" >> /shared/` + beatsFile + ` || exit 1
	read -t 0.2 -u 3 _
done`

const (
	beatPeriod = 200 * time.Millisecond
	// A live incarnation must have beaten within this long.
	beatFresh = 3 * time.Second
	// Time limits. The whole test must stay under 6 minutes on a 2-core box.
	settleLimit   = 25 * time.Second // fault -> all running again; heal -> all running
	spawnLimit    = 90 * time.Second // for all the batches
	spawnBatch    = 60
	lastRoundFrom = 4 * time.Minute  // no new round after this (since the test began)
	finalLimit    = 20 * time.Second // after the last round: everything running again
)

type faultKind string

const (
	faultKill      faultKind = "kill"      // docker kill, later docker start
	faultPartition faultKind = "partition" // docker network disconnect, later connect
)

// round is what one chaos round did and measured.
type round struct {
	n          int
	kind       faultKind
	victim     *node
	wasLeader  bool
	onVictim   int           // processes on the victim when the fault hit
	moved      int           // processes with a new incarnation after the round
	collateral int           // of those, processes that were not on the victim
	downOthers []string      // other nodes the cluster marked down during the round
	recovered  bool          // every process ran again (API and beats) within settleLimit
	recovery   time.Duration // fault -> every process running again
	maxGap     time.Duration // longest time between a moved process's last old and first new beat
	healed     time.Duration // heal -> victim up and every process running
	overlaps   int           // new overlapping incarnation pairs found after the round
	stuck      int           // processes not running (or not beating) when the heal deadline passed
	lost       int           // processes that ended (failed) or left the table in the round: never coming back
}

func envInt(t *testing.T, key string, def int) int {
	v := os.Getenv(key)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		t.Fatalf("%s=%q: want a positive integer", key, v)
	}
	return n
}

func envDuration(t *testing.T, key string, def time.Duration) time.Duration {
	v := os.Getenv(key)
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		t.Fatalf("%s=%q: want a positive duration", key, v)
	}
	return d
}

func TestChaos(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos under Docker Compose takes minutes; skipped with -short")
	}
	began := time.Now()
	duration := envDuration(t, "SHIM_CHAOS_DURATION", 3*time.Minute)
	nprocs := envInt(t, "SHIM_CHAOS_PROCS", 300)
	lease := envDuration(t, "SHIM_CHAOS_LEASE", time.Second)
	seed := uint64(randInt(1 << 62))
	if v := os.Getenv("SHIM_CHAOS_SEED"); v != "" {
		s, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("SHIM_CHAOS_SEED=%q: %v", v, err)
		}
		seed = s
	}
	rng := rand.New(rand.NewPCG(seed, seed^0x5eed))
	t.Logf("chaos: seed %d (SHIM_CHAOS_SEED), %d processes, lease %s, faults for %s", seed, nprocs, lease, duration)

	c := startCluster(t, lease.String())
	if !poll(60*time.Second, 100*time.Millisecond, func() bool {
		st, err := c.read()
		return err == nil && st.leader != "" && c.allUp(st)
	}) {
		t.Fatal("the five nodes did not come up within 60s")
	}
	t.Logf("5 nodes up after %s", time.Since(began).Round(100*time.Millisecond))

	// The workloads, spawned in batches of spawnBatch, each running before
	// the next: the test is about faults, not about one burst of starts.
	// The beats go to a file shared by the containers: host isolation, as
	// root (the admin's).
	spec := &pb.ProcessSpec{Name: "beat", Command: []string{"/bin/sh", "-c", beatScript},
		Isolation: pb.Isolation_ISOLATION_HOST, User: "0"}
	spawned := time.Now()
	chk := &checker{c: c, seen: map[string]bool{}, lost: map[string]string{}}
	for len(chk.ids) < nprocs {
		n := min(spawnBatch, nprocs-len(chk.ids))
		recs, err := c.spawn(spec, n)
		if err != nil {
			t.Fatalf("spawn %d: %v", n, err)
		}
		if len(recs) != n {
			t.Fatalf("spawned %d processes, asked for %d", len(recs), n)
		}
		for _, r := range recs {
			chk.ids = append(chk.ids, r.Id)
		}
		limit := spawnLimit - time.Since(spawned)
		if ok, why := chk.waitSteady("", spawned, limit); !ok {
			chk.report(t, nil)
			t.Fatalf("%d of %d processes spawned, not all running and beating %s after the first spawn: %s",
				len(chk.ids), nprocs, spawnLimit, why)
		}
	}
	sort.Strings(chk.ids)
	t.Logf("%d processes running and beating %s after the spawn", nprocs, time.Since(spawned).Round(100*time.Millisecond))
	if ov := chk.newOverlaps(); len(ov) > 0 {
		t.Errorf("%d overlapping incarnation pairs already before the first fault:\n%s", len(ov), describe(ov, 10))
	}

	// The rounds.
	var rounds []*round
	unsettled := 0
	chaosStart := time.Now()
	for i := 1; time.Since(chaosStart) < duration && time.Since(began) < lastRoundFrom; i++ {
		r := chk.round(t, rng, i)
		if r == nil {
			break
		}
		rounds = append(rounds, r)
		t.Logf("round %2d: %s", i, r.line())
		if r.healed < 0 {
			unsettled++
		} else {
			unsettled = 0
		}
		if unsettled == 2 {
			t.Errorf("the cluster did not settle in two rounds in a row; stopping the chaos")
			break
		}
		time.Sleep(time.Second + time.Duration(rng.Int64N(int64(time.Second)))) // the schedule, not synchronisation
	}
	// Nothing lost: in the end every process runs, once.
	final := time.Now()
	if ok, why := chk.waitSteady("", final, finalLimit); !ok {
		st, _ := chk.steady("", final)
		chk.stranded = chk.countLost(st, final)
		t.Errorf("%s after the last round: %s", finalLimit, why)
	}
	chk.report(t, rounds)
	t.Logf("test took %s", time.Since(began).Round(time.Second))
}

func (c *cluster) allUp(st *state) bool {
	for _, n := range c.nodes {
		if st.nodes[n.name] != pb.NodeState_NODE_STATE_UP {
			return false
		}
	}
	return true
}

// checker holds the processes the test spawned and checks them.
type checker struct {
	c    *cluster
	ids  []string
	seen map[string]bool   // overlaps already reported
	lost map[string]string // processes that ended or vanished, and how
	// processes neither lost nor running when the test ended
	stranded int
}

// steady reports whether every process is running on an up node other than
// exclude, with exactly one live incarnation in the table, and has beaten
// as that incarnation at or after since (and within beatFresh). It returns
// what it read, and why not.
func (k *checker) steady(exclude string, since time.Time) (*state, string) {
	c := k.c
	st, err := c.read()
	if err != nil {
		return nil, err.Error()
	}
	if err := c.beats.update(); err != nil {
		return st, "beats: " + err.Error()
	}
	byID := map[string]*pb.ProcessRecord{}
	var problems []problem
	for _, r := range st.procs.Processes {
		if byID[r.Id] != nil {
			problems = append(problems, problem{"listed twice", r.Id})
		}
		byID[r.Id] = r
	}
	now := time.Now()
	for _, id := range k.ids {
		if k.lost[id] != "" {
			continue // counted once; the rounds go on with the others
		}
		p := k.problem(byID[id], id, st, exclude, since, now)
		if p.kind == "" {
			continue
		}
		problems = append(problems, p)
		if r := byID[id]; (r == nil || table.Terminal(r.State)) && k.lost[id] == "" {
			// Gone from the table or finished: it will never run again.
			k.lost[id] = p.detail
			if len(k.lost) <= 10 {
				k.c.t.Errorf("lost: %s", p.detail)
			}
		}
	}
	if len(problems) > 0 {
		return st, summarize(problems)
	}
	return st, ""
}

// problem says what is wrong with process id (record r) if anything: kind
// groups alike problems ("" if none), detail names the process.
type problem struct{ kind, detail string }

var idPattern = regexp.MustCompile(`[0-9a-f]{12}(\.[0-9]+)?`)

func (k *checker) problem(r *pb.ProcessRecord, id string, st *state, exclude string, since, now time.Time) problem {
	svc := func(name string) string {
		if n := k.c.node(name); n != nil {
			return n.svc
		}
		return fmt.Sprintf("%q", name)
	}
	p := func(kind, format string, args ...any) problem {
		return problem{kind, id + ": " + fmt.Sprintf(format, args...)}
	}
	switch {
	case r == nil:
		return p("not in the table", "not in the table")
	case r.State != pb.ProcessState_PROCESS_STATE_RUNNING || r.Pid <= 0:
		state := strings.ToLower(strings.TrimPrefix(r.State.String(), "PROCESS_STATE_"))
		return p(fmt.Sprintf("%s on %s (%s)", state, svc(r.Node), idPattern.ReplaceAllString(r.Reason, "<id>")),
			"incarnation %d %s on %s (%s)", r.Incarnation, state, svc(r.Node), r.Reason)
	case r.Node == exclude:
		return p("still on the faulty node "+svc(r.Node), "incarnation %d still on %s", r.Incarnation, svc(r.Node))
	case st.nodes[r.Node] != pb.NodeState_NODE_STATE_UP:
		return p(fmt.Sprintf("running on %s, which is %s", svc(r.Node), st.nodes[r.Node]),
			"incarnation %d on %s, which is %s", r.Incarnation, svc(r.Node), st.nodes[r.Node])
	}
	for _, h := range r.History {
		if h.Incarnation >= r.Incarnation || (h.State != pb.ProcessState_PROCESS_STATE_KILLED &&
			h.State != pb.ProcessState_PROCESS_STATE_EXITED && h.State != pb.ProcessState_PROCESS_STATE_FAILED) {
			return p("two live incarnations in the table", "incarnation %d is current but history has incarnation %d %s on %s",
				r.Incarnation, h.Incarnation, h.State, svc(h.Node))
		}
	}
	s, ok := k.c.beats.get(id, r.Incarnation)
	switch {
	case !ok:
		return p("listed running on "+svc(r.Node)+", never beat", "incarnation %d on %s has not beaten yet", r.Incarnation, svc(r.Node))
	case s.node != r.Node:
		return p("beats on another node than listed", "incarnation %d beats on %s, the table says %s", r.Incarnation, svc(s.node), svc(r.Node))
	case s.last < since.UnixMicro() || s.last < now.Add(-beatFresh).UnixMicro():
		return p("listed running on "+svc(r.Node)+", stopped beating", "incarnation %d on %s last beat at %s",
			r.Incarnation, svc(r.Node), usecTime(s.last))
	}
	return problem{}
}

// summarize groups problems by kind, most frequent first, with an example.
func summarize(ps []problem) string {
	count := map[string]int{}
	example := map[string]string{}
	for _, p := range ps {
		if count[p.kind] == 0 {
			example[p.kind] = p.detail
		}
		count[p.kind]++
	}
	kinds := make([]string, 0, len(count))
	for k := range count {
		kinds = append(kinds, k)
	}
	sort.Slice(kinds, func(i, j int) bool {
		if count[kinds[i]] != count[kinds[j]] {
			return count[kinds[i]] > count[kinds[j]]
		}
		return kinds[i] < kinds[j]
	})
	var b strings.Builder
	fmt.Fprintf(&b, "%d processes not running as they should:", len(ps))
	for _, k := range kinds {
		fmt.Fprintf(&b, "\n    %4d %s (e.g. %s)", count[k], k, example[k])
	}
	return b.String()
}

// waitSteady polls steady until it holds or limit has passed.
func (k *checker) waitSteady(exclude string, since time.Time, limit time.Duration) (bool, string) {
	var why string
	ok := poll(limit, 100*time.Millisecond, func() bool {
		_, why = k.steady(exclude, since)
		return why == ""
	})
	return ok, why
}

// newOverlaps returns the overlapping incarnation pairs not reported before.
func (k *checker) newOverlaps() []overlap {
	_ = k.c.beats.update()
	var out []overlap
	for _, o := range k.c.beats.overlaps() {
		if !k.seen[o.key()] {
			k.seen[o.key()] = true
			out = append(out, o)
		}
	}
	return out
}

func describe(ov []overlap, n int) string {
	var b strings.Builder
	for i, o := range ov {
		if i == n {
			fmt.Fprintf(&b, "  ... and %d more\n", len(ov)-n)
			break
		}
		fmt.Fprintf(&b, "  %s\n", o)
	}
	return b.String()
}

// round injects one fault, measures the recovery, heals the fault and checks
// the invariants. It returns nil if the cluster cannot even be read.
func (k *checker) round(t *testing.T, rng *rand.Rand, i int) *round {
	c := k.c
	r := &round{n: i, kind: faultKill, healed: -1}
	lostBefore := len(k.lost)
	defer func() { r.lost = len(k.lost) - lostBefore }()
	if rng.IntN(2) == 1 {
		r.kind = faultPartition
	}
	before, err := c.read()
	if err != nil {
		t.Errorf("round %d: cannot read the cluster before the fault: %v", i, err)
		return nil
	}
	// A third of the rounds hit the leader, the rest a node that runs
	// processes (a node comes back empty after a fault: nothing moves back).
	var busy []*node
	for _, n := range c.nodes {
		for _, p := range before.procs.Processes {
			if p.Node == n.name && !table.Terminal(p.State) {
				busy = append(busy, n)
				break
			}
		}
	}
	if len(busy) == 0 {
		busy = c.nodes
	}
	r.victim = busy[rng.IntN(len(busy))]
	if rng.IntN(3) == 0 && c.node(before.leader) != nil {
		r.victim = c.node(before.leader)
	}
	r.wasLeader = r.victim.name == before.leader
	old := map[string]*pb.ProcessRecord{}
	for _, p := range before.procs.Processes {
		old[p.Id] = p
		if p.Node == r.victim.name {
			r.onVictim++
		}
	}

	// The fault. Recovery is timed from the moment it is certainly in
	// effect: docker kill or docker network disconnect has returned.
	if r.kind == faultKill {
		err = c.kill(r.victim)
	} else {
		err = c.disconnect(r.victim)
	}
	t0 := time.Now()
	if err != nil {
		t.Errorf("round %d: %v", i, err)
		return r
	}
	down := map[string]bool{}
	watchDown := func(st *state) {
		if st == nil {
			return
		}
		for name, s := range st.nodes {
			if name != r.victim.name && s == pb.NodeState_NODE_STATE_DOWN {
				down[name] = true
			}
		}
	}
	var why string
	r.recovered = poll(settleLimit, 100*time.Millisecond, func() bool {
		var st *state
		st, why = k.steady(r.victim.name, t0)
		watchDown(st)
		return why == ""
	})
	r.recovery = time.Since(t0)
	if !r.recovered {
		t.Errorf("round %d (%s %s): not every process running again %s after the fault: %s", i, r.kind, r.victim.svc, settleLimit, why)
	}

	// Hold the fault a little longer, then heal it.
	time.Sleep(500*time.Millisecond + time.Duration(rng.Int64N(int64(2*time.Second)))) // the schedule
	if r.kind == faultKill {
		err = c.start(r.victim)
	} else {
		err = c.connect(r.victim)
	}
	th := time.Now()
	if err != nil {
		t.Errorf("round %d: heal: %v", i, err)
		return r
	}
	var after *state
	ok := poll(settleLimit, 100*time.Millisecond, func() bool {
		after, why = k.steady("", th)
		watchDown(after)
		if why == "" && after.nodes[r.victim.name] != pb.NodeState_NODE_STATE_UP {
			why = fmt.Sprintf("%s is %s", r.victim.svc, after.nodes[r.victim.name])
		}
		return why == ""
	})
	if ok {
		r.healed = time.Since(th)
	} else {
		t.Errorf("round %d (%s %s): %s after the heal the cluster is not whole: %s", i, r.kind, r.victim.svc, settleLimit, why)
		r.stuck = k.countLost(after, th)
	}
	for name := range down {
		if n := c.node(name); n != nil {
			name = n.svc
		}
		r.downOthers = append(r.downOthers, name)
	}
	sort.Strings(r.downOthers)

	// What moved, and the longest a moved process went without a beat.
	if after != nil {
		for _, p := range after.procs.Processes {
			o := old[p.Id]
			if o == nil || o.Incarnation == p.Incarnation {
				continue
			}
			r.moved++
			if o.Node != r.victim.name {
				r.collateral++
			}
			prev, ok1 := c.beats.get(p.Id, o.Incarnation)
			next, ok2 := c.beats.get(p.Id, p.Incarnation)
			if ok1 && ok2 {
				r.maxGap = max(r.maxGap, time.Duration(next.first-prev.last)*time.Microsecond)
			}
		}
	}
	if ov := k.newOverlaps(); len(ov) > 0 {
		r.overlaps = len(ov)
		t.Errorf("round %d (%s %s): %d pairs of incarnations ran at the same time:\n%s", i, r.kind, r.victim.svc, len(ov), describe(ov, 10))
	}
	return r
}

// countLost counts the processes that are not running and beating.
func (k *checker) countLost(st *state, since time.Time) int {
	if st == nil {
		return len(k.ids)
	}
	byID := map[string]*pb.ProcessRecord{}
	for _, r := range st.procs.Processes {
		byID[r.Id] = r
	}
	n := 0
	now := time.Now()
	for _, id := range k.ids {
		if k.lost[id] == "" && k.problem(byID[id], id, st, "", since, now).kind != "" {
			n++
		}
	}
	return n
}

func (r *round) line() string {
	leader := ""
	if r.wasLeader {
		leader = " (leader)"
	}
	rec := "NOT RECOVERED"
	if r.recovered {
		rec = r.recovery.Round(10 * time.Millisecond).String()
	}
	healed := "not healed"
	if r.healed >= 0 {
		healed = r.healed.Round(10 * time.Millisecond).String()
	}
	others := "-"
	if len(r.downOthers) > 0 {
		others = strings.Join(r.downOthers, ",")
	}
	return fmt.Sprintf("%-9s %s%-9s on it %3d, moved %3d (collateral %3d, also down: %s), recovery %s, max gap %s, healed in %s, overlaps %d, stuck %d, lost %d",
		r.kind, r.victim.svc, leader, r.onVictim, r.moved, r.collateral, others, rec, r.maxGap.Round(10*time.Millisecond), healed, r.overlaps, r.stuck, r.lost)
}

// report prints the summary and the final checks over the whole run.
func (k *checker) report(t *testing.T, rounds []*round) {
	c := k.c
	var b strings.Builder
	fmt.Fprintf(&b, "\n==== chaos report ====\n")
	fmt.Fprintf(&b, "cluster: 3 servers + 2 workers, %d processes, beat every %s\n", len(k.ids), beatPeriod)
	var recs []time.Duration
	kinds := map[faultKind]int{}
	leaderHits, notRecovered, collateral := 0, 0, 0
	fmt.Fprintf(&b, "%-5s %-9s %-8s %6s %6s %10s %-12s %10s %9s %9s %8s %5s %4s\n", "round", "fault", "victim", "on it", "moved",
		"collateral", "also down", "recovery", "max gap", "healed", "overlaps", "stuck", "lost")
	for _, r := range rounds {
		kinds[r.kind]++
		if r.wasLeader {
			leaderHits++
		}
		v := r.victim.svc
		if r.wasLeader {
			v += "(L)"
		}
		others := "-"
		if len(r.downOthers) > 0 {
			others = strings.Join(r.downOthers, ",")
		}
		rec, healed := "-", "-"
		if r.recovered {
			recs = append(recs, r.recovery)
			rec = r.recovery.Round(10 * time.Millisecond).String()
		} else {
			notRecovered++
		}
		if r.healed >= 0 {
			healed = r.healed.Round(10 * time.Millisecond).String()
		}
		collateral += r.collateral
		fmt.Fprintf(&b, "%-5d %-9s %-8s %6d %6d %10d %-12s %10s %9s %9s %8d %5d %4d\n", r.n, r.kind, v, r.onVictim, r.moved,
			r.collateral, others, rec, r.maxGap.Round(10*time.Millisecond), healed, r.overlaps, r.stuck, r.lost)
	}
	slices.Sort(recs)
	p50, pmax := "-", "-"
	if len(recs) > 0 {
		p50 = recs[len(recs)/2].Round(10 * time.Millisecond).String()
		pmax = recs[len(recs)-1].Round(10 * time.Millisecond).String()
	}
	fmt.Fprintf(&b, "rounds %d (faults: %d kill, %d partition; %d hit the leader); not recovered %d\n",
		len(rounds), kinds[faultKill], kinds[faultPartition], leaderHits, notRecovered)
	fmt.Fprintf(&b, "recovery (fault -> every process running and beating): p50 %s, max %s\n", p50, pmax)
	fmt.Fprintf(&b, "collateral moves (processes moved off nodes that were not hit): %d\n", collateral)

	// Over the whole run: every overlap, and incarnations on two nodes.
	if ov := k.newOverlaps(); len(ov) > 0 {
		t.Errorf("%d pairs of incarnations ran at the same time:\n%s", len(ov), describe(ov, 10))
	}
	all := c.beats.overlaps()
	if len(all) > 0 {
		var worst overlap
		for _, o := range all {
			if o.overlapped > worst.overlapped {
				worst = o
			}
		}
		fmt.Fprintf(&b, "overlapping incarnation pairs: %d in %d processes; worst: %s\n", len(all), countIDs(all), worst)
	}
	doubles := c.beats.doubles()
	for i, d := range doubles {
		if i == 10 {
			t.Errorf("... and %d more incarnations that ran twice", len(doubles)-10)
			break
		}
		t.Errorf("one incarnation ran twice: %s", d)
	}
	if len(c.frozen) > 0 {
		fmt.Fprintf(&b, "workload cgroups left frozen by a killed shimd (thawed by the test): %d\n", len(c.frozen))
	}
	lines, nbad, bad := c.beats.stats()
	fmt.Fprintf(&b, "beats: %d lines, %d malformed %v\n", lines, nbad, bad)
	fmt.Fprintf(&b, "overlaps found: %d; incarnations that ran twice: %d; lost found: %d (ended or vanished from the table: %d; "+
		"not running %s after the last round: %d)\n", len(all), len(doubles), len(k.lost)+k.stranded, len(k.lost), finalLimit, k.stranded)
	t.Log(b.String())
	report.Keep(t, "chaos", b.String())
}

func countIDs(ov []overlap) int {
	m := map[string]bool{}
	for _, o := range ov {
		m[o.id] = true
	}
	return len(m)
}
