package cgroup

// Pressure: how hard a group presses against its limits, read cheaply.
//
// An agent samples every elastic process every 100-250 ms, so a sample reads
// only the files that carry a growth signal, through descriptors a
// PressureReader keeps open (pread at offset 0 makes the kernel render the
// file anew), into one reused buffer, parsed without allocating:
//
//	                 cgroup v1 (hybrid)                 cgroup v2
//	memory use       memory.usage_in_bytes              memory.current
//	memory limit     memory.limit_in_bytes              memory.max
//	limit hits       memory.failcnt                     memory.events max
//	page cache,      memory.stat total_inactive_file,   memory.stat inactive_file,
//	refaults         total_workingset_refault_{anon,file}  workingset_refault_{anon,file}
//	CPU time         cpuacct.usage                      cpu.stat usage_usec
//	CPU quota        cpu.cfs_quota_us                   cpu.max
//	throttling       cpu.stat nr_periods, nr_throttled, cpu.stat nr_periods, nr_throttled,
//	                 throttled_time                     throttled_usec
//	PSI              unified group's memory.pressure,   memory.pressure, cpu.pressure
//	                 cpu.pressure
//
// On v1 PSI comes from the group of the same path in the hybrid unified
// hierarchy, which accounts pressure but has no controllers. A process is
// there only if something put it there: JoinPSI does. Without it (or on a
// kernel without PSI) the PSI fields read as zero and Pressure.PSI is false.
//
// Counters are cumulative, as the kernel keeps them: the decision takes
// deltas between samples.
//
// Cost (BenchmarkPressure, v1 hybrid, 9 files): a Read takes about 8 us and
// allocates nothing; opening the files each time (Pressure) about 40 us.
// memory.stat is a third of a Read. containerd/cgroups' Stat reads every
// statistic, and on a hybrid host gives no memory PSI (v3.1.3).

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/containerd/cgroups/v3/cgroup1"
	"golang.org/x/sys/unix"
)

// Pressure is one sample of a group's use of and pressure against its memory
// and CPU limits. Counters (failures, refaults, times) are cumulative since
// the group was made.
type Pressure struct {
	MemBytes        uint64 // memory charged, page cache included
	MemInactiveFile uint64 // inactive page cache, the part reclaim takes first
	MemLimitBytes   uint64 // the hard limit now in force; 0 = unlimited
	MemFailcnt      uint64 // times a charge hit the limit (v1 memory.failcnt; v2 memory.events "max")
	RefaultAnon     uint64 // evicted anonymous pages faulted back in (workingset_refault_anon)
	RefaultFile     uint64 // evicted file pages faulted back in (workingset_refault_file)
	MemSomeUsec     uint64 // memory PSI some total: time at least one task stalled on memory
	MemFullUsec     uint64 // memory PSI full total: time all non-idle tasks stalled on memory
	CPUUsageNanos   uint64 // CPU time consumed
	CPUQuotaMilli   uint64 // the CPU quota now in force, in millicores; 0 = unlimited (v1: per CFSPeriodUs)
	CPUPeriods      uint64 // CFS periods with runnable tasks (nr_periods)
	CPUThrottled    uint64 // periods in which the quota ran out (nr_throttled)
	CPUThrottledNs  uint64 // time spent throttled
	CPUSomeUsec     uint64 // CPU PSI some total: time at least one runnable task waited
	PSI             bool   // the PSI fields were read (false: no PSI for this group)
}

// WorkingSet is the memory the group needs to keep: its charge minus the
// inactive page cache, which reclaim takes without a stall (kubelet's
// working set).
func (p Pressure) WorkingSet() uint64 {
	if p.MemInactiveFile >= p.MemBytes {
		return 0
	}
	return p.MemBytes - p.MemInactiveFile
}

// pfile is one control file a PressureReader reads, and how to parse it.
type pfile struct {
	dir, name string
	fd        int // -1: not open
	optional  bool
	psi       bool // one of the PSI files (all or none are read)
	parse     func(b []byte, p *Pressure, v2 bool) error
}

// PressureReader reads a group's Pressure through descriptors it keeps
// open. It is not safe for concurrent use; one per sampling loop. Close it
// when the group is done with (an open descriptor does not keep a deleted
// group, but it is a descriptor).
type PressureReader struct {
	g     *Group
	files []pfile
	buf   []byte
	p     Pressure // parsed into here: through a func value, a local escapes
	reads uint     // Reads so far: missing PSI files are looked for every 16th
}

// pressureMax is what v1 reads for "no limit" (the page-aligned
// PAGE_COUNTER_MAX); anything at or above 2^62 is treated as unlimited.
const pressureMax = 1 << 62

// PressureReader opens the control files Pressure reads. Files of
// controllers the group is not in are left out (their fields read zero);
// the PSI files are looked for again every 16th Read until they exist
// (JoinPSI may come later). It fails with ErrNotFound if the group is gone.
func (g *Group) PressureReader() (*PressureReader, error) {
	r := &PressureReader{g: g, buf: make([]byte, 4096)}
	if g.m.v2 {
		d := g.dir
		r.files = []pfile{
			{dir: d, name: "memory.current", parse: parseMemCurrent},
			{dir: d, name: "memory.max", parse: parseMemMax},
			{dir: d, name: "memory.events", optional: true, parse: parseMemEvents},
			{dir: d, name: "memory.stat", optional: true, parse: parseMemStat},
			{dir: d, name: "cpu.stat", parse: parseCPUStat},
			{dir: d, name: "cpu.max", parse: parseCPUMax},
			{dir: d, name: "memory.pressure", optional: true, psi: true, parse: parseMemPSI},
			{dir: d, name: "cpu.pressure", optional: true, psi: true, parse: parseCPUPSI},
		}
	} else {
		if d, ok := g.ctlDir(cgroup1.Memory); ok {
			r.files = append(r.files,
				pfile{dir: d, name: "memory.usage_in_bytes", parse: parseMemCurrent},
				pfile{dir: d, name: "memory.limit_in_bytes", parse: parseMemMax},
				pfile{dir: d, name: "memory.failcnt", parse: parseFailcnt},
				pfile{dir: d, name: "memory.stat", parse: parseMemStat})
		}
		if d, ok := g.ctlDir(cgroup1.Cpu); ok {
			r.files = append(r.files, pfile{dir: d, name: "cpu.stat", parse: parseCPUStat},
				pfile{dir: d, name: "cpu.cfs_quota_us", parse: parseCFSQuota})
		}
		if d, ok := g.ctlDir(cgroup1.Cpuacct); ok {
			r.files = append(r.files, pfile{dir: d, name: "cpuacct.usage", parse: parseCPUAcct})
		}
		if u, ok := g.m.unifiedMount(); ok {
			d := filepath.Join(u, g.rel)
			r.files = append(r.files,
				pfile{dir: d, name: "memory.pressure", optional: true, psi: true, parse: parseMemPSI},
				pfile{dir: d, name: "cpu.pressure", optional: true, psi: true, parse: parseCPUPSI})
		}
		if len(r.files) == 0 {
			return nil, fmt.Errorf("pressure of cgroup %s: %w", g.name, ErrNotFound)
		}
	}
	for i := range r.files {
		r.files[i].fd = -1
		if err := r.open(&r.files[i]); err != nil {
			r.Close()
			return nil, fmt.Errorf("pressure of cgroup %s: %w", g.name, err)
		}
	}
	return r, nil
}

// open opens f unless it is open; a missing optional file is no error.
func (r *PressureReader) open(f *pfile) error {
	if f.fd >= 0 {
		return nil
	}
	fd, err := unix.Open(filepath.Join(f.dir, f.name), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		if f.optional && errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return notFound(&fs.PathError{Op: "open", Path: filepath.Join(f.dir, f.name), Err: err})
	}
	f.fd = fd
	return nil
}

// Read returns a fresh sample. It fails with ErrNotFound once the group is
// deleted.
func (r *PressureReader) Read() (Pressure, error) {
	r.p = Pressure{}
	p := &r.p
	psi := 0
	r.reads++
	for i := range r.files {
		f := &r.files[i]
		if f.fd < 0 {
			if !f.psi || r.reads%16 != 1 {
				continue // an optional file this group does not have
			}
			if err := r.open(f); err != nil || f.fd < 0 {
				continue
			}
		}
		b, err := r.pread(f.fd)
		if err != nil {
			if f.psi && !r.g.m.v2 && errors.Is(err, syscall.ENODEV) {
				// The unified group alone went away (v1); the
				// others tell whether the group is gone.
				unix.Close(f.fd)
				f.fd = -1
				continue
			}
			return Pressure{}, r.fail(f, err)
		}
		if err := f.parse(b, p, r.g.m.v2); err != nil {
			return Pressure{}, fmt.Errorf("pressure of cgroup %s: %s: %w", r.g.name, f.name, err)
		}
		if f.psi {
			psi++
		}
	}
	p.PSI = psi == 2
	if !p.PSI {
		p.MemSomeUsec, p.MemFullUsec, p.CPUSomeUsec = 0, 0, 0
	}
	return *p, nil
}

func (r *PressureReader) fail(f *pfile, err error) error {
	if errors.Is(err, syscall.ENODEV) {
		err = fmt.Errorf("%w: %w", ErrNotFound, err) // kernfs: the group was removed
	}
	return fmt.Errorf("pressure of cgroup %s: read %s: %w", r.g.name, f.name, notFound(err))
}

// pread reads the whole file at fd from offset 0 into r.buf, growing it if
// the file does not fit.
func (r *PressureReader) pread(fd int) ([]byte, error) {
	for {
		n, err := unix.Pread(fd, r.buf, 0)
		if err != nil {
			return nil, err
		}
		if n < len(r.buf) {
			return r.buf[:n], nil
		}
		if len(r.buf) >= 1<<20 {
			return nil, fmt.Errorf("larger than %d bytes: %w", len(r.buf), ErrInvalid)
		}
		r.buf = make([]byte, 2*len(r.buf))
	}
}

// Close closes the descriptors. The reader is unusable afterwards.
func (r *PressureReader) Close() error {
	for i := range r.files {
		if r.files[i].fd >= 0 {
			unix.Close(r.files[i].fd)
			r.files[i].fd = -1
		}
	}
	r.files = nil
	return nil
}

// Pressure reads one sample, opening and closing the files. A loop that
// samples often keeps a PressureReader instead.
func (g *Group) Pressure() (Pressure, error) {
	r, err := g.PressureReader()
	if err != nil {
		return Pressure{}, err
	}
	defer r.Close()
	return r.Read()
}

// JoinPSI makes the group's memory and CPU pressure visible to Pressure for
// the process pid (one of the group's): on cgroup v1 with a hybrid unified
// hierarchy it creates the group's directory there (PSI, no controllers)
// and moves pid into it. Threads and children pid makes afterwards follow
// it; those it made before stay where they were. On v2 the group is its own
// unified group already, and on v1 without a unified mount there is no
// per-group PSI: both are no-ops. Delete removes the directory with the
// group's others.
func (g *Group) JoinPSI(pid int) error {
	if pid <= 0 {
		return fmt.Errorf("join PSI group of cgroup %s: pid %d: %w", g.name, pid, ErrInvalid)
	}
	if g.m.v2 {
		return nil
	}
	u, ok := g.m.unifiedMount()
	if !ok {
		return nil
	}
	if err := g.exists(); err != nil {
		return fmt.Errorf("join PSI group of cgroup %s: %w", g.name, err)
	}
	d := filepath.Join(u, g.rel)
	g.m.mu.Lock() // against Delete removing empty parents meanwhile
	err := os.MkdirAll(d, 0o755)
	g.m.mu.Unlock()
	if err == nil {
		err = writeFile(d, "cgroup.procs", strconv.Itoa(pid))
	}
	if err != nil {
		return fmt.Errorf("join PSI group of cgroup %s: %w", g.name, err)
	}
	return nil
}

// unifiedMount returns the mount point of a hybrid setup's unified
// hierarchy (v1 only), recognized among the other mounted hierarchies by
// its cgroup.controllers file.
func (m *Manager) unifiedMount() (string, bool) {
	for _, x := range m.extra {
		if _, err := os.Stat(filepath.Join(x, "cgroup.controllers")); err == nil {
			return x, true
		}
	}
	return "", false
}

// ---- parsers: one per file kind, no allocations on the way

func parseMemCurrent(b []byte, p *Pressure, _ bool) (err error) {
	p.MemBytes, err = parseUintBytes(b)
	return err
}

func parseMemMax(b []byte, p *Pressure, _ bool) error {
	b = bytes.TrimSpace(b)
	if string(b) == "max" {
		p.MemLimitBytes = 0
		return nil
	}
	n, err := parseUintBytes(b)
	if n >= pressureMax {
		n = 0
	}
	p.MemLimitBytes = n
	return err
}

func parseFailcnt(b []byte, p *Pressure, _ bool) (err error) {
	p.MemFailcnt, err = parseUintBytes(b)
	return err
}

func parseMemEvents(b []byte, p *Pressure, _ bool) error {
	p.MemFailcnt = kv(b, "max")
	return nil
}

func parseMemStat(b []byte, p *Pressure, v2 bool) error {
	if v2 {
		p.MemInactiveFile = kv(b, "inactive_file")
		p.RefaultAnon = kv(b, "workingset_refault_anon")
		p.RefaultFile = kv(b, "workingset_refault_file")
		return nil
	}
	// The total_ fields include the groups a workload made below its own,
	// as memory.usage_in_bytes does.
	p.MemInactiveFile = kv(b, "total_inactive_file")
	p.RefaultAnon = kv(b, "total_workingset_refault_anon")
	p.RefaultFile = kv(b, "total_workingset_refault_file")
	return nil
}

func parseCPUStat(b []byte, p *Pressure, v2 bool) error {
	p.CPUPeriods = kv(b, "nr_periods")
	p.CPUThrottled = kv(b, "nr_throttled")
	if v2 {
		p.CPUUsageNanos = kv(b, "usage_usec") * 1000
		p.CPUThrottledNs = kv(b, "throttled_usec") * 1000
	} else {
		p.CPUThrottledNs = kv(b, "throttled_time")
	}
	return nil
}

// parseCFSQuota reads v1 cpu.cfs_quota_us ("-1" or microseconds), per
// CFSPeriodUs, the period every group of a Manager has.
func parseCFSQuota(b []byte, p *Pressure, _ bool) error {
	b = bytes.TrimSpace(b)
	if string(b) == "-1" {
		p.CPUQuotaMilli = 0
		return nil
	}
	q, err := parseUintBytes(b)
	p.CPUQuotaMilli = q * 1000 / CFSPeriodUs
	return err
}

// parseCPUMax reads v2 cpu.max: "max 100000" or "50000 100000".
func parseCPUMax(b []byte, p *Pressure, _ bool) error {
	quota, period, _ := bytes.Cut(bytes.TrimSpace(b), []byte(" "))
	if string(quota) == "max" {
		p.CPUQuotaMilli = 0
		return nil
	}
	q, err := parseUintBytes(quota)
	if err != nil {
		return err
	}
	per, err := parseUintBytes(period)
	if err != nil || per == 0 {
		return fmt.Errorf("cpu.max %q: %w", b, ErrInvalid)
	}
	p.CPUQuotaMilli = q * 1000 / per
	return nil
}

func parseCPUAcct(b []byte, p *Pressure, _ bool) (err error) {
	p.CPUUsageNanos, err = parseUintBytes(b)
	return err
}

func parseMemPSI(b []byte, p *Pressure, _ bool) error {
	p.MemSomeUsec = psiTotal(b, "some")
	p.MemFullUsec = psiTotal(b, "full")
	return nil
}

func parseCPUPSI(b []byte, p *Pressure, _ bool) error {
	p.CPUSomeUsec = psiTotal(b, "some")
	return nil
}

// kv returns the value of key in "key value" lines; 0 if absent or not a
// number.
func kv(b []byte, key string) uint64 {
	for len(b) > 0 {
		line := b
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			line, b = b[:i], b[i+1:]
		} else {
			b = nil
		}
		if len(line) > len(key) && line[len(key)] == ' ' && string(line[:len(key)]) == key {
			n, _ := parseUintBytes(line[len(key)+1:])
			return n
		}
	}
	return 0
}

// psiTotal returns total= of the line starting with kind ("some", "full")
// of a PSI file: "some avg10=0.00 avg60=0.00 avg300=0.00 total=1234".
func psiTotal(b []byte, kind string) uint64 {
	for len(b) > 0 {
		line := b
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			line, b = b[:i], b[i+1:]
		} else {
			b = nil
		}
		if !bytes.HasPrefix(line, []byte(kind)) {
			continue
		}
		if i := bytes.Index(line, []byte("total=")); i >= 0 {
			n, _ := parseUintBytes(line[i+len("total="):])
			return n
		}
	}
	return 0
}

// parseUintBytes parses a decimal number, ignoring surrounding space.
func parseUintBytes(b []byte) (uint64, error) {
	b = bytes.TrimSpace(b)
	if len(b) == 0 {
		return 0, fmt.Errorf("empty number: %w", ErrInvalid)
	}
	var n uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("number %q: %w", b, ErrInvalid)
		}
		d := uint64(c - '0')
		if n > (1<<64-1-d)/10 {
			return 0, fmt.Errorf("number %q overflows: %w", b, ErrInvalid)
		}
		n = n*10 + d
	}
	return n, nil
}
