package guest

import (
	"bytes"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Memory policy of the guest (see wantMem).
const (
	// wantLowFraction: ask for more once MemAvailable is below this
	// fraction of MemTotal...
	wantLowFraction = 0.30
	// wantLowBytes: ...or below this many bytes, whichever is larger.
	wantLowBytes = 96 << 20
	// wantStep: ask for at least this much more than is in use.
	wantStep = 128 << 20
	// wantRepeat: the same request is repeated after this long.
	wantRepeat = time.Second
	// cpuBusy: ask for one more vCPU once every vCPU has been this busy
	// over two one-second samples in a row.
	cpuBusy = 0.90
)

// Poll periods of the watcher: fast while memory is short, slow otherwise.
const (
	pollFast   = 20 * time.Millisecond
	pollSlow   = 200 * time.Millisecond
	reportIdle = 2 * time.Second // a "mem" line at least this often
)

// wantMem returns the MemTotal to ask the host for given the current
// MemTotal and MemAvailable, or 0 if there is enough: when less than
// max(wantLowFraction of total, wantLowBytes) is available, ask for what is
// in use plus half of it again, at least wantStep more, rounded up to 2 MiB.
func wantMem(total, avail uint64) uint64 {
	low := max(uint64(float64(total)*wantLowFraction), wantLowBytes)
	if avail >= low {
		return 0
	}
	used := total - min(avail, total)
	want := used + max(used/2, wantStep)
	want = max(want, total+wantStep)
	const block = 2 << 20
	return (want + block - 1) / block * block
}

// wantCPU returns the millicores to ask for: one vCPU more than online
// when the last two busy fractions (0..1 of all online vCPUs) were both at
// least cpuBusy; else 0.
func wantCPU(online int, busy [2]float64) int64 {
	if online > 0 && busy[0] >= cpuBusy && busy[1] >= cpuBusy {
		return int64(online+1) * 1000
	}
	return 0
}

// watcher reports the guest's memory and asks for more when short.
type watcher struct {
	ctl   *control
	hp    *hotplug
	kickc chan struct{}
	stopc chan struct{}
}

func newWatcher(ctl *control, hp *hotplug) *watcher {
	return &watcher{ctl: ctl, hp: hp, kickc: make(chan struct{}, 1), stopc: make(chan struct{})}
}

// kick makes the watcher report now.
func (w *watcher) kick() {
	select {
	case w.kickc <- struct{}{}:
	default:
	}
}

func (w *watcher) stop() { close(w.stopc) }

func (w *watcher) run() {
	psi := psiTrigger()
	var (
		last       Msg
		lastReport time.Time
		lastWant   uint64
		lastAsk    time.Time
		busy       [2]float64
		lastStat   cpuTimes
		lastCPU    time.Time
	)
	lastStat, _ = readCPUTimes()
	lastCPU = time.Now()
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		forced := false
		select {
		case <-w.stopc:
			return
		case <-w.kickc:
			forced = true
		case <-w.hp.changed:
			forced = true
		case <-psi:
		case <-t.C:
		}
		now := time.Now()
		total, avail, err := readMeminfo()
		if err != nil {
			t.Reset(pollSlow)
			continue
		}
		cpus := onlineCPUs()
		m := Msg{Kind: KindMem, A: int64(total), B: int64(avail), C: int64(cpus)}
		if forced || changed(last, m) || now.Sub(lastReport) >= reportIdle {
			w.ctl.send(m)
			last, lastReport = m, now
		}
		var wantCPUMilli int64
		if now.Sub(lastCPU) >= time.Second {
			if st, err := readCPUTimes(); err == nil {
				busy = [2]float64{busy[1], st.busySince(lastStat)}
				lastStat, lastCPU = st, now
				wantCPUMilli = wantCPU(cpus, busy)
			}
		}
		want := wantMem(total, avail)
		if (want > 0 && (want > lastWant || now.Sub(lastAsk) >= wantRepeat)) || wantCPUMilli > 0 {
			w.ctl.send(Msg{Kind: KindWant, A: int64(want), B: wantCPUMilli})
			lastWant, lastAsk = want, now
		}
		if want > 0 || avail < total/2 {
			t.Reset(pollFast)
		} else {
			t.Reset(pollSlow)
		}
	}
}

// changed reports whether the memory view moved enough to report.
func changed(a, b Msg) bool {
	d := a.B - b.B
	if d < 0 {
		d = -d
	}
	return a.A != b.A || a.C != b.C || d > max(4<<20, b.A/50)
}

// readMeminfo returns MemTotal and MemAvailable in bytes.
func readMeminfo() (total, avail uint64, err error) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, 0, err
	}
	for _, line := range bytes.Split(b, []byte{'\n'}) {
		k, v, ok := strings.Cut(string(line), ":")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) == 0 {
			continue
		}
		n, _ := strconv.ParseUint(f[0], 10, 64)
		switch k {
		case "MemTotal":
			total = n << 10
		case "MemAvailable":
			avail = n << 10
			return total, avail, nil
		}
	}
	return total, avail, nil
}

// onlineCPUs counts the online CPUs ("0-2,4" in .../cpu/online).
func onlineCPUs() int {
	b, err := os.ReadFile(cpuDir + "/online")
	if err != nil {
		return 0
	}
	return countList(strings.TrimSpace(string(b)))
}

// countList counts the members of a kernel cpu list such as "0-2,4".
func countList(s string) int {
	n := 0
	for _, r := range strings.Split(s, ",") {
		lo, hi, isRange := strings.Cut(r, "-")
		a, err := strconv.Atoi(lo)
		if err != nil {
			continue
		}
		b := a
		if isRange {
			if b, err = strconv.Atoi(hi); err != nil || b < a {
				continue
			}
		}
		n += b - a + 1
	}
	return n
}

// cpuTimes is the first line of /proc/stat: busy and total jiffies.
type cpuTimes struct{ busy, total uint64 }

func readCPUTimes() (cpuTimes, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return cpuTimes{}, err
	}
	line, _, _ := bytes.Cut(b, []byte{'\n'})
	f := strings.Fields(string(line))
	var t cpuTimes
	for i, s := range f[1:] {
		n, _ := strconv.ParseUint(s, 10, 64)
		if i >= 8 { // guest, guest_nice are already in user, nice
			break
		}
		t.total += n
		if i != 3 && i != 4 { // idle, iowait
			t.busy += n
		}
	}
	return t, nil
}

// busySince is the busy fraction of all CPUs since prev.
func (t cpuTimes) busySince(prev cpuTimes) float64 {
	if t.total <= prev.total {
		return 0
	}
	return float64(t.busy-prev.busy) / float64(t.total-prev.total)
}

// psiTrigger returns a channel that receives when the guest's memory stalls
// for 50 ms within 500 ms (a PSI trigger), or nil if PSI is unavailable.
func psiTrigger() <-chan struct{} {
	fd, err := unix.Open("/proc/pressure/memory", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil
	}
	if _, err := unix.Write(fd, []byte("some 50000 500000\x00")); err != nil {
		unix.Close(fd)
		return nil
	}
	c := make(chan struct{}, 1)
	go func() {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLPRI}}
		for {
			n, err := unix.Poll(fds, -1)
			if err == unix.EINTR {
				continue
			}
			if err != nil || fds[0].Revents&unix.POLLERR != 0 {
				return
			}
			if n > 0 {
				select {
				case c <- struct{}{}:
				default:
				}
			}
		}
	}()
	return c
}
