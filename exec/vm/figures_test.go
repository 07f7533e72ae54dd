package vm

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
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
	var boot, memAdd, cpuAdd, rss []time.Duration
	var over []int64
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

		// QEMU's RSS less the guest memory it touched: the guest's
		// MemTotal less its MemFree is an upper bound of what it touched.
		g, _ := v.GuestStat(5 * time.Second)
		rssB := rssBytes(v.PID())
		over = append(over, rssB-(g.MemTotal-g.MemAvailable))
		_ = rss
		t.Logf("sample %d: RSS %d MiB, guest MemTotal %d MiB, MemAvailable %d MiB", i, rssB>>20, g.MemTotal>>20, g.MemAvailable>>20)
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
	mib := make([]int64, len(over))
	for i, o := range over {
		mib[i] = o >> 20
	}
	t.Logf("QEMU RSS beyond guest memory in use: %v MiB (median %d)", mib, med(mib))
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
