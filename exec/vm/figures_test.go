package vm

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/shim-run/shim/cgroup"
)

// TestFigures measures what the package promises, three samples each, and
// prints them (go test -run TestFigures -v with SHIM_VM_FIGURES=1): boot to
// the workload's first line, memory hot-add to the guest's MemTotal, vCPU
// hot-add to online, and QEMU's RSS beyond the guest's memory.
func TestFigures(t *testing.T) {
	if os.Getenv("SHIM_VM_FIGURES") == "" {
		t.Skip("set SHIM_VM_FIGURES=1 to measure")
	}
	rt := newRuntime(t)
	n := 3
	if s, err := strconv.Atoi(os.Getenv("SHIM_VM_FIGURES")); err == nil && s > n {
		n = s
	}
	accel := rt.accel()
	if err := rt.Prepare(); err != nil { // the boot files, built once per cache
		t.Fatal(err)
	}
	var boot, memAdd, cpuAdd []time.Duration
	var overAnon, overAll []int64
	for i := range n {
		dir := t.TempDir()
		log := filepath.Join(dir, "out.log")
		t0 := time.Now()
		v := start(t, rt, Spec{ID: "fig", Incarnation: uint64(i), Dir: dir, Stdout: log, Stderr: log,
			Argv:      []string{"/bin/sh", "-c", "echo first; while :; do sleep 1; done"},
			Resources: cgroup.Resources{MemMaxBytes: 1 << 30, CPUMaxMilli: 2000}, GrantMemBytes: 256 << 20, GrantCPUMilli: 1000})
		waitLog(t, log, regexp.MustCompile(`^first$`), 60*time.Second, nil)
		boot = append(boot, time.Since(t0))

		g0, err := v.GuestStat(5 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t1 := time.Now()
		if err := v.Resize(512<<20, 1000); err != nil {
			t.Fatal(err)
		}
		for {
			g, err := v.GuestStat(5 * time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if g.MemTotal >= g0.MemTotal+250<<20 {
				break
			}
			if time.Since(t1) > 10*time.Second {
				t.Fatalf("MemTotal stuck at %d", g.MemTotal)
			}
		}
		memAdd = append(memAdd, time.Since(t1))

		t2 := time.Now()
		if err := v.Resize(512<<20, 2000); err != nil {
			select {
			case <-v.Done():
				t.Fatalf("%v; the VM ended: %+v", err, v.Exit())
			case <-time.After(time.Second):
			}
			t.Fatal(err)
		}
		for {
			g, err := v.GuestStat(5 * time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if g.CPUs >= 2 {
				break
			}
			if time.Since(t2) > 10*time.Second {
				t.Fatalf("vCPUs stuck at %d", g.CPUs)
			}
			time.Sleep(5 * time.Millisecond)
		}
		cpuAdd = append(cpuAdd, time.Since(t2))

		// QEMU's RSS less the resident part of the guest's RAM (the
		// mappings of the boot memory and the virtio-mem region).
		v.resizeMu.Lock()
		p := v.plan
		v.resizeMu.Unlock()
		m := qemuMemory(t, v.PID(), p)
		overAnon = append(overAnon, m.anon-m.guest)
		overAll = append(overAll, m.rss-m.guest)
		t.Logf("sample %d: RSS %d MiB = guest RAM %d + own anonymous %d + file-backed %d (kernel image %d)", i,
			m.rss>>20, m.guest>>20, (m.anon-m.guest)>>20, m.file>>20, m.kernel>>20)
		if err := v.Kill(); err != nil {
			t.Fatal(err)
		}
		<-v.Done()
	}
	ms := func(ds []time.Duration) []int64 {
		out := make([]int64, len(ds))
		for i, d := range ds {
			out[i] = d.Milliseconds()
		}
		return out
	}
	med := func(xs []int64) int64 { s := slices.Clone(xs); slices.Sort(s); return s[len(s)/2] }
	t.Logf("accelerator %s, %d samples", accel, n)
	t.Logf("boot to first workload line: %v ms (median %d)", ms(boot), med(ms(boot)))
	t.Logf("memory hot-add +256 MiB to guest MemTotal: %v ms (median %d)", ms(memAdd), med(ms(memAdd)))
	t.Logf("vCPU hot-add to online: %v ms (median %d)", ms(cpuAdd), med(ms(cpuAdd)))
	toMiB := func(xs []int64) []int64 {
		out := make([]int64, len(xs))
		for i, x := range xs {
			out[i] = x >> 20
		}
		return out
	}
	t.Logf("QEMU RSS beyond guest RAM, anonymous (its own): %v MiB (median %d)", toMiB(overAnon), med(toMiB(overAnon)))
	t.Logf("QEMU RSS beyond guest RAM, with file-backed pages shared between VMs: %v MiB (median %d)",
		toMiB(overAll), med(toMiB(overAll)))
}

// qemuMem is QEMU's resident memory by kind, in bytes.
type qemuMem struct{ rss, anon, file, guest, kernel int64 }

// qemuMemory reads /proc/PID/smaps: guest RAM is the anonymous mappings of
// exactly the boot memory's or the virtio-mem region's size.
func qemuMemory(t *testing.T, pid int, p plan) qemuMem {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/smaps")
	if err != nil {
		t.Fatal(err)
	}
	var m qemuMem
	var size int64
	var path string
	head := regexp.MustCompile(`^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$`)
	for _, l := range strings.Split(string(b), "\n") {
		if h := head.FindStringSubmatch(l); h != nil {
			lo, _ := strconv.ParseInt(h[1], 16, 64)
			hi, _ := strconv.ParseInt(h[2], 16, 64)
			size, path = hi-lo, h[3]
			continue
		}
		f := strings.Fields(l)
		if len(f) < 2 || f[0] != "Rss:" {
			continue
		}
		kb, _ := strconv.ParseInt(f[1], 10, 64)
		r := kb << 10
		m.rss += r
		switch {
		case strings.HasPrefix(path, "/"):
			m.file += r
			if strings.Contains(path, "vmlinux") {
				m.kernel += r
			}
		default:
			m.anon += r
			if path == "" && (size == p.BootMem || size == p.Region) {
				m.guest += r
			}
		}
	}
	return m
}

// rssBytes reads VmRSS of pid.
func rssBytes(pid int) int64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0
	}
	m := regexp.MustCompile(`VmRSS:\s+(\d+) kB`).FindSubmatch(b)
	if m == nil {
		return 0
	}
	n, _ := strconv.ParseInt(string(m[1]), 10, 64)
	return n << 10
}
