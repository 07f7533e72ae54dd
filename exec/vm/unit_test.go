package vm

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	osexec "os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/shim-run/shim/cgroup"
	"github.com/shim-run/shim/pid1/guest"
)

const mib = 1 << 20

func TestNewPlan(t *testing.T) {
	for _, c := range []struct {
		name           string
		r              cgroup.Resources
		mem, cpu       int64
		boot, max, reg int64
		grant          int64
		vcpus, maxV    int
		err            bool
	}{
		{name: "defaults", r: cgroup.Resources{}, boot: 128 * mib, max: 256 * mib, reg: 128 * mib, grant: 256 * mib, vcpus: 1, maxV: 1},
		{name: "fixed", r: cgroup.Resources{MemMinBytes: 256 * mib, MemMaxBytes: 256 * mib}, boot: 256 * mib, max: 256 * mib,
			grant: 256 * mib, vcpus: 1, maxV: 1},
		{name: "growable", r: cgroup.Resources{MemMaxBytes: 1 << 30, CPUMaxMilli: 2000}, mem: 256 * mib, cpu: 1000,
			boot: 128 * mib, max: 1024 * mib, reg: 896 * mib, grant: 256 * mib, vcpus: 1, maxV: 2},
		{name: "big", r: cgroup.Resources{MemMaxBytes: 8 << 30, CPUMaxMilli: 2500}, mem: 1 << 30, cpu: 1500,
			boot: 256 * mib, max: 8192 * mib, reg: 7936 * mib, grant: 1024 * mib, vcpus: 2, maxV: 3},
		{name: "min", r: cgroup.Resources{MemMinBytes: 300 * mib, MemMaxBytes: 1 << 30}, boot: 300 * mib, max: 1024 * mib,
			reg: 768 * mib, grant: 300 * mib, vcpus: 1, maxV: 1},
		{name: "odd sizes round", r: cgroup.Resources{MemMaxBytes: 1000*mib + 1}, mem: 200*mib + 5,
			boot: 128 * mib, max: 1002 * mib, reg: 896 * mib, grant: 202 * mib, vcpus: 1, maxV: 1},
		{name: "grant below boot", r: cgroup.Resources{MemMaxBytes: 1 << 30}, mem: 64 * mib, boot: 128 * mib,
			max: 1024 * mib, reg: 896 * mib, grant: 128 * mib, vcpus: 1, maxV: 1},
		{name: "too small", r: cgroup.Resources{MemMaxBytes: 64 * mib}, err: true},
		{name: "grant above max", r: cgroup.Resources{MemMaxBytes: 256 * mib}, mem: 512 * mib, err: true},
		{name: "cpu above max", r: cgroup.Resources{CPUMaxMilli: 1000}, cpu: 2000, err: true},
		{name: "too many vcpus", r: cgroup.Resources{CPUMaxMilli: 65000}, err: true},
		{name: "negative", r: cgroup.Resources{MemMaxBytes: -1}, err: true},
	} {
		p, err := newPlan(c.r, c.mem, c.cpu)
		if c.err {
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("%s: err = %v, want ErrInvalid", c.name, err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		want := plan{BootMem: c.boot, MaxMem: c.max, Region: c.reg, GrantMem: c.grant, VCPUs: c.vcpus, MaxVCPUs: c.maxV, GrantCPU: p.GrantCPU}
		if p != want {
			t.Errorf("%s: plan = %+v\n want %+v", c.name, p, want)
		}
		if p.Region%linuxMemBlock != 0 || p.BootMem%MemBlock != 0 || p.GrantMem%MemBlock != 0 {
			t.Errorf("%s: misaligned %+v", c.name, p)
		}
	}
}

func TestPlanResize(t *testing.T) {
	p, err := newPlan(cgroup.Resources{MemMaxBytes: 1 << 30, CPUMaxMilli: 2000}, 256*mib, 1000)
	if err != nil {
		t.Fatal(err)
	}
	q, err := p.resize(600*mib+1, 1500)
	if err != nil || q.GrantMem != 602*mib || q.VCPUs != 2 || q.GrantCPU != 1500 || q.plugged(q.GrantMem) != 474*mib {
		t.Errorf("resize up = %+v, %v", q, err)
	}
	if q, err := p.resize(mib, 100); err != nil || q.GrantMem != p.BootMem || q.VCPUs != 1 {
		t.Errorf("resize below boot = %+v, %v", q, err)
	}
	for _, c := range [][2]int64{{2 << 30, 1000}, {256 * mib, 2001}, {0, 1000}, {256 * mib, 0}} {
		if _, err := p.resize(c[0], c[1]); !errors.Is(err, ErrInvalid) {
			t.Errorf("resize(%d, %d): %v, want ErrInvalid", c[0], c[1], err)
		}
	}
}

func TestGroupResources(t *testing.T) {
	r := groupResources(cgroup.Resources{CPUMinMilli: 500, CPUMaxMilli: 4000, CPUBurstMilli: 100, MemMinBytes: 128 * mib,
		MemMaxBytes: 1 << 30, PidsMax: 10}, 512*mib, 1500, 100*mib, 100)
	want := cgroup.Resources{CPUMinMilli: 500, CPUMaxMilli: 1600, CPUBurstMilli: 100, MemMinBytes: 128 * mib,
		MemMaxBytes: 612 * mib, PidsMax: qemuPids}
	if r != want {
		t.Errorf("groupResources = %+v, want %+v", r, want)
	}
}

// readCpio parses a newc archive (independently of writeCpio's layout
// code): name -> entry.
func readCpio(t *testing.T, b []byte) ([]string, map[string]cpioEntry) {
	t.Helper()
	var names []string
	out := map[string]cpioEntry{}
	for off := 0; ; {
		if off+110 > len(b) || string(b[off:off+6]) != "070701" {
			t.Fatalf("bad header at %d", off)
		}
		field := func(i int) uint32 {
			v, err := strconv.ParseUint(string(b[off+6+8*i:off+14+8*i]), 16, 32)
			if err != nil {
				t.Fatalf("field %d at %d: %v", i, off, err)
			}
			return uint32(v)
		}
		mode, size, major, minor, nameLen := field(1), field(6), field(9), field(10), field(11)
		name := string(b[off+110 : off+110+int(nameLen)-1])
		off += (110 + int(nameLen) + 3) &^ 3
		data := b[off : off+int(size)]
		off += (int(size) + 3) &^ 3
		if name == "TRAILER!!!" {
			if off != len(b) {
				t.Errorf("%d bytes after the trailer", len(b)-off)
			}
			return names, out
		}
		names = append(names, name)
		out[name] = cpioEntry{Name: name, Mode: mode, Data: data, Major: major, Minor: minor}
	}
}

func TestWriteCpio(t *testing.T) {
	es := []cpioEntry{
		{Name: "dev", Mode: cpioDir | 0o755},
		{Name: "dev/console", Mode: cpioChar | 0o600, Major: 5, Minor: 1},
		{Name: "init", Mode: cpioFile | 0o755, Data: []byte("#!/bin/sh\necho hi\n")},
		{Name: "a/odd-sized-name", Mode: cpioFile | 0o644, Data: []byte("12345")},
		{Name: "bin", Mode: cpioLink | 0o777, Data: []byte("usr/bin")},
	}
	var buf bytes.Buffer
	if err := writeCpio(&buf, es); err != nil {
		t.Fatal(err)
	}
	if buf.Len()%4 != 0 {
		t.Errorf("archive length %d is not a multiple of 4", buf.Len())
	}
	names, got := readCpio(t, buf.Bytes())
	for i, e := range es {
		if names[i] != e.Name || got[e.Name].Mode != e.Mode || !bytes.Equal(got[e.Name].Data, e.Data) ||
			got[e.Name].Major != e.Major || got[e.Name].Minor != e.Minor {
			t.Errorf("entry %d = %+v, want %+v", i, got[e.Name], e)
		}
	}
	// Cross-check with GNU cpio where it is installed.
	if _, err := osexec.LookPath("cpio"); err == nil {
		cmd := osexec.Command("cpio", "-it", "--quiet")
		cmd.Stdin = bytes.NewReader(buf.Bytes())
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("cpio -t: %v", err)
		}
		if got := strings.Fields(string(out)); !slices.Equal(got, names) {
			t.Errorf("cpio -t lists %v, want %v", got, names)
		}
	}
	for _, bad := range []string{"", "/abs"} {
		if err := writeCpio(io.Discard, []cpioEntry{{Name: bad}}); err == nil {
			t.Errorf("writeCpio accepted name %q", bad)
		}
	}
}

func TestResolveModules(t *testing.T) {
	dir := t.TempDir()
	dep := "kernel/a/virtio_ring.ko:\nkernel/a/virtio.ko: kernel/a/virtio_ring.ko\n" +
		"kernel/a/virtio_pci.ko: kernel/a/legacy.ko kernel/a/virtio.ko kernel/a/virtio_ring.ko\nkernel/a/legacy.ko:\n" +
		"kernel/b/9p.ko: kernel/b/9pnet.ko\nkernel/b/9pnet.ko:\nkernel/c/loop1.ko: kernel/c/loop2.ko\nkernel/c/loop2.ko: kernel/c/loop1.ko\n"
	os.WriteFile(filepath.Join(dir, "modules.dep"), []byte(dep), 0o644)
	os.WriteFile(filepath.Join(dir, "modules.builtin"), []byte("kernel/x/qemu_fw_cfg.ko\n"), 0o644)
	got, err := resolveModules(dir, []string{"virtio_pci", "9p", "virtio", "qemu-fw-cfg"})
	if err != nil {
		t.Fatal(err)
	}
	var rel []string
	for _, p := range got {
		rel = append(rel, strings.TrimPrefix(p, dir+"/"))
	}
	want := []string{"kernel/a/legacy.ko", "kernel/a/virtio_ring.ko", "kernel/a/virtio.ko", "kernel/a/virtio_pci.ko",
		"kernel/b/9pnet.ko", "kernel/b/9p.ko"}
	if !slices.Equal(rel, want) {
		t.Errorf("order = %v, want %v", rel, want)
	}
	if _, err := resolveModules(dir, []string{"nope"}); err == nil || !strings.Contains(err.Error(), "nope") {
		t.Errorf("missing module: %v", err)
	}
	// A loop in modules.dep is no hang: each module is visited once.
	if got, err := resolveModules(dir, []string{"loop1"}); err != nil || len(got) != 2 {
		t.Errorf("loop: %v, %v", got, err)
	}
}

func TestStripSignature(t *testing.T) {
	body := []byte("\x7fELF module body")
	sig := []byte("SIGNATURE-BYTES")
	info := make([]byte, 12)
	binary.BigEndian.PutUint32(info[8:], uint32(len(sig)))
	signed := append(append(append(slices.Clone(body), sig...), info...), moduleSigMagic...)
	if got := stripSignature(signed); !bytes.Equal(got, body) {
		t.Errorf("stripSignature = %q", got)
	}
	if got := stripSignature(body); !bytes.Equal(got, body) {
		t.Errorf("unsigned module changed: %q", got)
	}
	bogus := append(slices.Clone(info), moduleSigMagic...)
	binary.BigEndian.PutUint32(bogus[8:], 1<<30)
	if got := stripSignature(bogus); !bytes.Equal(got, bogus) {
		t.Errorf("bad signature length was cut")
	}
}

func TestCompareVersions(t *testing.T) {
	in := []string{"vmlinuz-6.10.0-1-amd64", "vmlinuz-6.1.0-57-amd64", "vmlinuz-6.9.2-amd64", "vmlinuz-6.1.0-9-amd64"}
	slices.SortFunc(in, compareVersions)
	want := []string{"vmlinuz-6.1.0-9-amd64", "vmlinuz-6.1.0-57-amd64", "vmlinuz-6.9.2-amd64", "vmlinuz-6.10.0-1-amd64"}
	if !slices.Equal(in, want) {
		t.Errorf("sorted = %v", in)
	}
}

func TestKernelInfoNames(t *testing.T) {
	dir := t.TempDir()
	k := filepath.Join(dir, "vmlinuz-6.1.0-1-amd64")
	os.WriteFile(k, []byte("x"), 0o644)
	if p, v, err := kernelInfo(k); err != nil || p != k || v != "6.1.0-1-amd64" {
		t.Errorf("kernelInfo = %q %q %v", p, v, err)
	}
	other := filepath.Join(dir, "bzImage")
	os.WriteFile(other, []byte("x"), 0o644)
	if _, _, err := kernelInfo(other); err == nil {
		t.Errorf("kernelInfo accepted %s", other)
	}
}

func TestExtractRejectsNonKernel(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "vmlinuz-x"), bytes.Repeat([]byte{0}, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := extractVmlinux(filepath.Join(dir, "vmlinuz-x"), filepath.Join(dir, "out")); err == nil {
		t.Errorf("extracted a kernel from zeros")
	}
	// A bzImage-shaped file whose gzip payload is no PVH kernel.
	img := make([]byte, 0x1000)
	img[0x1f1] = 1 // setup_sects
	copy(img[0x202:], "HdrS")
	binary.LittleEndian.PutUint16(img[0x206:], 0x20f)
	var z bytes.Buffer
	zw := gzip.NewWriter(&z)
	zw.Write([]byte("not an ELF"))
	zw.Close()
	binary.LittleEndian.PutUint32(img[0x248:], 0x100)
	binary.LittleEndian.PutUint32(img[0x24c:], uint32(z.Len()))
	copy(img[2*512+0x100:], z.Bytes())
	os.WriteFile(filepath.Join(dir, "vmlinuz-y"), img, 0o644)
	err := extractVmlinux(filepath.Join(dir, "vmlinuz-y"), filepath.Join(dir, "out"))
	if err == nil || !strings.Contains(err.Error(), "PVH") {
		t.Errorf("extract of a non-ELF payload: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "out")); err == nil {
		t.Errorf("a rejected kernel was left in place")
	}
}

// TestBootFiles builds the real boot files once and finds them cached the
// second time: a PVH vmlinux and an initramfs with /init and the modules in
// dependency order.
func TestBootFiles(t *testing.T) {
	if err := Available(); err != nil {
		t.Skipf("no VM support here: %v", err)
	}
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	rt := &Runtime{Init: testInit, CacheDir: testCache}
	bf, err := rt.bootFiles()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(bf.Kernel, testCache) || !hasPVH(bf.Kernel) {
		t.Errorf("kernel %s is not the extracted PVH vmlinux", bf.Kernel)
	}
	st, _ := os.Stat(bf.Initrd)
	again, err := rt.bootFiles()
	if err != nil || again != bf {
		t.Fatalf("second bootFiles = %+v, %v", again, err)
	}
	if st2, _ := os.Stat(bf.Initrd); !st2.ModTime().Equal(st.ModTime()) {
		t.Errorf("initramfs rebuilt")
	}
	f, err := os.Open(bf.Initrd)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	names, es := readCpio(t, b)
	if e, ok := es["init"]; !ok || e.Mode != cpioFile|0o755 || len(e.Data) == 0 {
		t.Errorf("no executable /init in %v", names)
	}
	if e := es["dev/console"]; e.Mode&0o170000 != cpioChar || e.Major != 5 || e.Minor != 1 {
		t.Errorf("no /dev/console: %+v", e)
	}
	order := strings.Fields(string(es["shim/modules.order"].Data))
	idx := func(mod string) int {
		return slices.IndexFunc(order, func(p string) bool { return modName(p[strings.Index(p, "-")+1:]) == mod })
	}
	for _, pair := range [][2]string{{"virtio_ring", "virtio"}, {"virtio", "virtio_pci"}, {"9pnet", "9pnet_virtio"}, {"9pnet", "9p"}} {
		if a, b := idx(pair[0]), idx(pair[1]); a < 0 || b < 0 || a > b {
			t.Errorf("modules.order %v: %s must come before %s", order, pair[0], pair[1])
		}
	}
	for _, p := range order {
		if _, ok := es[strings.TrimPrefix(p, "/")]; !ok {
			t.Errorf("%s is in modules.order but not in the archive", p)
		}
	}
}

func TestArgs(t *testing.T) {
	p, err := newPlan(cgroup.Resources{MemMaxBytes: 1 << 30, CPUMaxMilli: 3000}, 256*mib, 2000)
	if err != nil {
		t.Fatal(err)
	}
	c := qemuConfig{Name: "shim-x.1", Accel: AccelTCG, Kernel: "/k", Initrd: "/i", Plan: p, Dir: "/s/x.1",
		Stdout: "/log/x", Stderr: "/log/x", QMPFD: 3, ControlFD: 4,
		Shares: []share{{Share: guest.Share{Tag: "sys0", Path: "/usr", ReadOnly: true}, Host: "/usr"},
			{Share: guest.Share{Tag: "work", Path: "/w"}, Host: "/w"}}}
	a := strings.Join(c.args(), " ")
	for _, want := range []string{
		"-M q35", "-nodefaults", "-no-reboot", "-accel tcg,tb-size=32", "-m size=128M,maxmem=1024M",
		"-smp 3,sockets=3,cores=1,threads=1,maxcpus=3", "maxcpus=2 ",
		"memory-backend-ram,id=vmem0,size=896M", "virtio-mem-pci,id=vmem,memdev=vmem0,block-size=2M,requested-size=128M",
		"-kernel /k -initrd /i", "SHIM_GUEST=1", "-fw_cfg name=opt/shim/config,file=/s/x.1/guest.json",
		"socket,id=qmp,fd=3,server=on,wait=off", "socket,id=ctl,fd=4,server=on,wait=off",
		"file,id=out,append=on,path=/log/x", "name=shim.out",
		"local,id=fssys0,path=/usr,security_model=none,multidevs=remap,readonly=on",
		"local,id=fswork,path=/w,security_model=passthrough,multidevs=remap",
	} {
		if !strings.Contains(a, want) {
			t.Errorf("args lack %q:\n%s", want, a)
		}
	}
	for _, bad := range []string{"x86_64-cpu", "name=shim.err", "-netdev", "-nic"} {
		if strings.Contains(a, bad) {
			t.Errorf("args contain %q:\n%s", bad, a)
		}
	}
	c.Accel, c.Stderr = AccelKVM, "/log/err"
	a = strings.Join(c.args(), " ")
	for _, want := range []string{"-accel kvm -cpu host", "file,id=err,append=on,path=/log/err"} {
		if !strings.Contains(a, want) {
			t.Errorf("kvm args lack %q", want)
		}
	}
	fixed, _ := newPlan(cgroup.Resources{MemMinBytes: 256 * mib, MemMaxBytes: 256 * mib}, 0, 0)
	c.Plan = fixed
	if a := strings.Join(c.args(), " "); strings.Contains(a, "maxmem") || strings.Contains(a, "virtio-mem") {
		t.Errorf("a VM without growth has hot-plug memory: %s", a)
	}
}

func TestConsoleEnd(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "console.log")
	os.WriteFile(p, []byte("[ 1.0] kernel noise\r\nshim-guest: boot basics=1.2\r\nshim-guest: exit code 3\r\n[ 2.0] reboot: Power down\r\n"), 0o644)
	if m := consoleEnd(p); m == nil || m.Kind != guest.KindExit || m.A != 3 || m.Signal {
		t.Errorf("consoleEnd = %+v", m)
	}
	os.WriteFile(p, []byte("shim-guest: fail exec \"/x\": not found\n"), 0o644)
	if m := consoleEnd(p); m == nil || m.Kind != guest.KindFail || !strings.Contains(m.Text, "not found") {
		t.Errorf("consoleEnd = %+v", m)
	}
	os.WriteFile(p, []byte("shim-guest: exit banana\nnothing\n"), 0o644)
	if m := consoleEnd(p); m != nil {
		t.Errorf("consoleEnd of garbage = %+v", m)
	}
	if m := consoleEnd(filepath.Join(dir, "missing")); m != nil {
		t.Errorf("consoleEnd of a missing file = %+v", m)
	}
}

// fakeQMP serves one QMP client on a listening socket: the greeting, the
// capabilities, then replies from handle (nil = hang up).
func fakeQMP(t *testing.T, l net.Listener, handle func(cmd map[string]any) []string) {
	conn, err := l.Accept()
	if err != nil {
		return
	}
	defer conn.Close()
	fmt.Fprintln(conn, `{"QMP": {"version": {}, "capabilities": []}}`)
	dec := json.NewDecoder(conn)
	for {
		var cmd map[string]any
		if err := dec.Decode(&cmd); err != nil {
			return
		}
		if cmd["execute"] == "qmp_capabilities" {
			// An event right behind the reply must not get lost.
			fmt.Fprintf(conn, "{\"return\": {}, \"id\": %q}\n{\"event\": \"RESUME\"}\n", cmd["id"])
			continue
		}
		lines := handle(cmd)
		if lines == nil {
			return
		}
		for _, l := range lines {
			fmt.Fprintln(conn, l)
		}
	}
}

func TestQMPClient(t *testing.T) {
	path := filepath.Join(t.TempDir(), strings.Repeat("long-dir-name-", 8), "qmp.sock") // past sockaddr_un's 108
	os.MkdirAll(filepath.Dir(path), 0o755)
	lf, err := listenUnix(path)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.FileListener(lf)
	lf.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go fakeQMP(t, l, func(cmd map[string]any) []string {
		id, _ := json.Marshal(cmd["id"])
		switch cmd["execute"] {
		case "qom-get":
			return []string{`{"event": "X", "data": {}}`, fmt.Sprintf(`{"return": 1234, "id": %s}`, id)}
		case "device_add":
			return []string{fmt.Sprintf(`{"error": {"class": "GenericError", "desc": "Duplicate ID"}, "id": %s}`, id)}
		}
		return nil
	})
	events := make(chan string, 4)
	q, err := dialQMP(path, 5*time.Second, func(name string, _ json.RawMessage) { events <- name })
	if err != nil {
		t.Fatal(err)
	}
	var size int64
	if err := q.run("qom-get", map[string]any{"path": "/x", "property": "size"}, &size); err != nil || size != 1234 {
		t.Errorf("qom-get = %d, %v", size, err)
	}
	err = q.run("device_add", map[string]any{"id": "cpu1"}, nil)
	var qe *qmpError
	if !errors.As(err, &qe) || qe.Desc != "Duplicate ID" {
		t.Errorf("device_add error = %v", err)
	}
	for _, want := range []string{"RESUME", "X"} {
		select {
		case got := <-events:
			if got != want {
				t.Errorf("event %q, want %q", got, want)
			}
		case <-time.After(2 * time.Second):
			t.Errorf("event %s lost", want)
		}
	}
	if err := q.run("quit", nil, nil); !errors.Is(err, errQMPClosed) {
		t.Errorf("command on a closed connection: %v, want errQMPClosed", err)
	}
	q.close()
}

func TestQMPNoGreeting(t *testing.T) {
	path := filepath.Join(t.TempDir(), "q.sock")
	lf, err := listenUnix(path)
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close() // listening, never accepting: QEMU hung or busy with another client
	if _, err := dialQMP(path, 200*time.Millisecond, nil); err == nil {
		t.Fatal("dialQMP succeeded without a greeting")
	}
}

func TestAvailableSaysWhy(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "mods", "1.0"), 0o755)
	os.WriteFile(filepath.Join(dir, "vmlinuz-1.0"), []byte("x"), 0o644)
	os.WriteFile(filepath.Join(dir, "mods", "1.0", "modules.dep"), []byte("kernel/virtio.ko:\n"), 0o644)
	for _, c := range []struct {
		r    *Runtime
		want string
	}{
		{&Runtime{QEMU: "no-such-qemu"}, "no QEMU: no-such-qemu not found (install qemu-system-x86)"},
		{&Runtime{QEMU: "/bin/true", Kernel: filepath.Join(dir, "missing-kernel")}, "guest kernel"},
		{&Runtime{QEMU: "/bin/true", Kernel: filepath.Join(dir, "vmlinuz-1.0"), ModulesDir: filepath.Join(dir, "mods")},
			"guest kernel 1.0: kernel module virtio_pci: not in"},
		{&Runtime{QEMU: "/bin/true", Kernel: filepath.Join(dir, "vmlinuz-1.0"), ModulesDir: filepath.Join(dir, "none")},
			"kernel modules:"},
	} {
		err := c.r.available()
		if err == nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("available() = %v, want one line with %q", err, c.want)
		}
	}
	r := &Runtime{QEMU: "/bin/true", Kernel: filepath.Join(dir, "vmlinuz-1.0")}
	if err := r.Check(); err == nil {
		t.Errorf("Check passed without modules or an init")
	}
}
