package vm

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"debug/elf"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	osexec "os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// guestModules are the kernel modules the guest needs, by name; their
// dependencies come from modules.dep. A module built into the kernel
// (modules.builtin) needs nothing.
var guestModules = []string{
	"virtio_pci",     // the PCI transport of every virtio device (pulls virtio, virtio_ring)
	"virtio_console", // virtio-serial: control channel, stdout, stderr
	"virtio_mem",     // memory that grows and shrinks
	"9pnet_virtio",   // 9p over virtio: the host's folders
	"9p",             //
	"qemu_fw_cfg",    // the guest's Config
}

// bootFiles is what QEMU boots: a kernel and the initramfs for it.
type bootFiles struct {
	Kernel  string // an uncompressed vmlinux with a PVH entry, or the bzImage itself
	Initrd  string
	Version string // kernel release, e.g. 6.1.0-57-amd64
}

// kernelInfo finds the guest kernel: path, or else the newest
// /boot/vmlinuz-*. It returns the kernel and its release.
func kernelInfo(path string) (string, string, error) {
	if path == "" {
		ks, _ := filepath.Glob("/boot/vmlinuz-*")
		if len(ks) == 0 {
			return "", "", errors.New("no guest kernel: no /boot/vmlinuz-* (install linux-image-amd64)")
		}
		slices.SortFunc(ks, compareVersions)
		path = ks[len(ks)-1]
	}
	if _, err := os.Stat(path); err != nil {
		return "", "", fmt.Errorf("guest kernel: %w", err)
	}
	ver, ok := strings.CutPrefix(filepath.Base(path), "vmlinuz-")
	if !ok || ver == "" {
		return "", "", fmt.Errorf("guest kernel %s: want a file named vmlinuz-RELEASE", path)
	}
	return path, ver, nil
}

// compareVersions orders strings by their runs of digits numerically, so
// that vmlinuz-6.10 sorts after vmlinuz-6.9.
func compareVersions(a, b string) int {
	for a != "" && b != "" {
		da, db := digitsPrefix(a), digitsPrefix(b)
		if da != "" && db != "" {
			if c := len(strings.TrimLeft(da, "0")) - len(strings.TrimLeft(db, "0")); c != 0 {
				return c
			}
			if c := strings.Compare(strings.TrimLeft(da, "0"), strings.TrimLeft(db, "0")); c != 0 {
				return c
			}
			a, b = a[len(da):], b[len(db):]
			continue
		}
		if a[0] != b[0] {
			return int(a[0]) - int(b[0])
		}
		a, b = a[1:], b[1:]
	}
	return len(a) - len(b)
}

func digitsPrefix(s string) string {
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	return s[:i]
}

// resolveModules returns the .ko files to load, dependencies first, for
// the wanted module names, from modDir's modules.dep and modules.builtin.
func resolveModules(modDir string, wanted []string) ([]string, error) {
	deps, err := readModulesDep(filepath.Join(modDir, "modules.dep"))
	if err != nil {
		return nil, err
	}
	builtin := map[string]bool{}
	if b, err := os.ReadFile(filepath.Join(modDir, "modules.builtin")); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if l != "" {
				builtin[modName(l)] = true
			}
		}
	}
	byName := map[string]string{} // name -> path in modules.dep
	for p := range deps {
		byName[modName(p)] = p
	}
	var order []string
	seen := map[string]bool{}
	var visit func(p string, depth int) error
	visit = func(p string, depth int) error {
		if seen[p] {
			return nil
		}
		if depth > 64 {
			return fmt.Errorf("modules.dep: dependency loop at %s", p)
		}
		seen[p] = true
		for _, d := range deps[p] {
			if err := visit(d, depth+1); err != nil {
				return err
			}
		}
		order = append(order, filepath.Join(modDir, p))
		return nil
	}
	for _, w := range wanted {
		n := strings.ReplaceAll(w, "-", "_")
		if builtin[n] {
			continue
		}
		p, ok := byName[n]
		if !ok {
			return nil, fmt.Errorf("kernel module %s: not in %s (neither a module nor built in)", w, modDir)
		}
		if err := visit(p, 0); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// readModulesDep parses modules.dep: "path: dep dep...".
func readModulesDep(path string) (map[string][]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("kernel modules: %w", err)
	}
	defer f.Close()
	deps := map[string][]string{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		mod, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		deps[mod] = strings.Fields(rest)
	}
	return deps, sc.Err()
}

// modName is a module's name from its path: kernel/fs/9p/9p.ko -> 9p.
func modName(path string) string {
	b := filepath.Base(path)
	if i := strings.Index(b, ".ko"); i >= 0 {
		b = b[:i]
	}
	return strings.ReplaceAll(b, "-", "_")
}

// cpioEntry is one file of a newc cpio archive.
type cpioEntry struct {
	Name         string // without a leading "/"
	Mode         uint32 // with the file type bits (0o040000 dir, 0o100000 file, 0o120000 link, 0o020000 char)
	Data         []byte // file content or link target
	Major, Minor uint32 // device number of a device node
}

// Mode type bits for cpioEntry.
const (
	cpioDir  = 0o040000
	cpioFile = 0o100000
	cpioLink = 0o120000
	cpioChar = 0o020000
)

// writeCpio writes entries as a newc ("070701") archive, ending with the
// trailer: a 110-byte header of 13 hex fields, the NUL-terminated name
// padded to 4 bytes, then the data padded to 4 bytes.
func writeCpio(w io.Writer, entries []cpioEntry) error {
	bw := bufio.NewWriterSize(w, 64<<10)
	pad := func(n int) {
		if r := n % 4; r != 0 {
			bw.Write(make([]byte, 4-r))
		}
	}
	ino := uint32(1)
	put := func(e cpioEntry) {
		nlink := uint32(1)
		if e.Mode&0o170000 == cpioDir {
			nlink = 2
		}
		fmt.Fprintf(bw, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
			ino, e.Mode, 0, 0, nlink, 0, len(e.Data), 0, 0, e.Major, e.Minor, len(e.Name)+1, 0)
		ino++
		bw.WriteString(e.Name)
		bw.WriteByte(0)
		pad(110 + len(e.Name) + 1)
		bw.Write(e.Data)
		pad(len(e.Data))
	}
	for _, e := range entries {
		if e.Name == "" || strings.HasPrefix(e.Name, "/") || len(e.Name) > 4096 {
			return fmt.Errorf("cpio: bad name %q", e.Name)
		}
		put(e)
	}
	put(cpioEntry{Name: "TRAILER!!!"})
	return bw.Flush()
}

// initramfsEntries lays out the guest's root: /init, the modules under
// /shim/modules with their load order in /shim/modules.order, the mount
// points, and /dev/console, which the kernel opens as init's stdio. With
// strip, the modules' signatures are removed: checking them costs a TCG
// boot about 0.08 s (measured), and a kernel that does not enforce
// signatures loads unsigned modules (it only notes a taint).
func initramfsEntries(initBin []byte, modules []string, strip bool) ([]cpioEntry, error) {
	es := []cpioEntry{}
	for _, d := range []string{"dev", "proc", "sys", "tmp", "run", "shim", "shim/modules", "usr", "etc"} {
		es = append(es, cpioEntry{Name: d, Mode: cpioDir | 0o755})
	}
	es = append(es, cpioEntry{Name: "dev/console", Mode: cpioChar | 0o600, Major: 5, Minor: 1})
	es = append(es, cpioEntry{Name: "init", Mode: cpioFile | 0o755, Data: initBin})
	var order strings.Builder
	for i, m := range modules {
		b, err := os.ReadFile(m)
		if err != nil {
			return nil, fmt.Errorf("kernel module: %w", err)
		}
		if strip {
			b = stripSignature(b)
		}
		name := fmt.Sprintf("shim/modules/%02d-%s", i, filepath.Base(m))
		es = append(es, cpioEntry{Name: name, Mode: cpioFile | 0o644, Data: b})
		order.WriteString("/" + name + "\n")
	}
	es = append(es, cpioEntry{Name: "shim/modules.order", Mode: cpioFile | 0o644, Data: []byte(order.String())})
	return es, nil
}

// bootFiles returns the kernel and initramfs to boot, building and caching
// them under CacheDir the first time: the initramfs is keyed by the kernel
// release and the init binary's hash, the extracted kernel by the release
// and the compressed kernel's size and modification time.
func (r *Runtime) bootFiles() (bootFiles, error) {
	r.bootMu.Lock()
	defer r.bootMu.Unlock()
	kpath, ver, err := kernelInfo(r.Kernel)
	if err != nil {
		return bootFiles{}, err
	}
	initPath := r.initPath()
	initBin, err := os.ReadFile(initPath)
	if err != nil {
		return bootFiles{}, fmt.Errorf("guest init: %w", err)
	}
	if len(initBin) < 4 || string(initBin[:4]) != "\x7fELF" {
		return bootFiles{}, fmt.Errorf("guest init %s: not an ELF executable: %w", initPath, ErrInvalid)
	}
	sum := sha256.Sum256(initBin)
	cache := r.cacheDir()
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return bootFiles{}, fmt.Errorf("vm cache: %w", err)
	}
	bf := bootFiles{Version: ver, Initrd: filepath.Join(cache, "initramfs-"+ver+"-"+hex.EncodeToString(sum[:8])+".cpio.gz")}
	if _, err := os.Stat(bf.Initrd); err != nil {
		mods, err := resolveModules(filepath.Join(r.modulesRoot(), ver), guestModules)
		if err != nil {
			return bootFiles{}, err
		}
		es, err := initramfsEntries(initBin, mods, !sigForced(filepath.Dir(kpath), ver))
		if err != nil {
			return bootFiles{}, err
		}
		if err := writeAtomic(bf.Initrd, func(w io.Writer) error {
			zw := gzip.NewWriter(w)
			if err := writeCpio(zw, es); err != nil {
				return err
			}
			return zw.Close()
		}); err != nil {
			return bootFiles{}, fmt.Errorf("initramfs: %w", err)
		}
	}
	bf.Kernel = kpath
	st, err := os.Stat(kpath)
	if err != nil {
		return bootFiles{}, fmt.Errorf("guest kernel: %w", err)
	}
	vmlinux := filepath.Join(cache, fmt.Sprintf("vmlinux-%s-%d-%d", ver, st.Size(), st.ModTime().Unix()))
	if _, err := os.Stat(vmlinux); err == nil {
		bf.Kernel = vmlinux
	} else if r.extractFailed[vmlinux] == "" {
		if err := extractVmlinux(kpath, vmlinux); err != nil {
			if r.extractFailed == nil {
				r.extractFailed = map[string]string{}
			}
			r.extractFailed[vmlinux] = err.Error() // boot the bzImage: slower under TCG, but it works
		} else {
			bf.Kernel = vmlinux
		}
	}
	return bf, nil
}

// writeAtomic writes path through a temporary file and a rename, so that a
// reader never sees half a file and concurrent writers do not collide.
func writeAtomic(path string, write func(io.Writer) error) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if err := write(f); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Chmod(f.Name(), 0o644); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}

// extractVmlinux decompresses the kernel inside a bzImage into out, an ELF
// file that QEMU boots through its PVH entry point. Under TCG this skips
// the firmware's real-mode kernel setup and the in-guest decompression
// (for Debian's xz kernel: a boot in 2.1 s instead of 5.8 s, measured).
// gzip is decoded here; xz and zstd by the xz and zstd commands (xz-utils
// is part of every Debian system; no Go xz decoder handles the x86 BCJ
// filter that kernels use).
func extractVmlinux(bzImage, out string) error {
	f, err := os.Open(bzImage)
	if err != nil {
		return err
	}
	defer f.Close()
	hdr := make([]byte, 0x250)
	if _, err := io.ReadFull(f, hdr); err != nil {
		return fmt.Errorf("%s: not a bzImage: %w", bzImage, err)
	}
	if string(hdr[0x202:0x206]) != "HdrS" || binary.LittleEndian.Uint16(hdr[0x206:]) < 0x208 {
		return fmt.Errorf("%s: not a bzImage (boot protocol 2.08 or later)", bzImage)
	}
	setupSects := int64(hdr[0x1f1])
	if setupSects == 0 {
		setupSects = 4
	}
	// The payload runs from payload_offset to about payload_length; its
	// exact end varies with the kernel's build (a size word may follow),
	// so the decoders get everything to the end of the file and stop at
	// the end of the first stream.
	off := (setupSects+1)*512 + int64(binary.LittleEndian.Uint32(hdr[0x248:]))
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if off <= 0 || off >= st.Size() {
		return fmt.Errorf("%s: payload offset %d out of range", bzImage, off)
	}
	payload := make([]byte, st.Size()-off)
	if _, err := f.ReadAt(payload, off); err != nil {
		return fmt.Errorf("%s: payload: %w", bzImage, err)
	}
	tmp := out + ".new"
	defer os.Remove(tmp)
	err = writeAtomic(tmp, func(w io.Writer) error {
		var err error
		switch {
		case bytes.HasPrefix(payload, []byte{0x1f, 0x8b}):
			var zr *gzip.Reader
			if zr, err = gzip.NewReader(bytes.NewReader(payload)); err == nil {
				zr.Multistream(false)
				_, err = io.Copy(w, zr)
			}
		case bytes.HasPrefix(payload, []byte("\xfd7zXZ\x00")):
			err = runFilter(w, payload, "xz", "-dc", "--single-stream")
		case bytes.HasPrefix(payload, []byte{0x28, 0xb5, 0x2f, 0xfd}):
			err = runFilter(w, payload, "zstd", "-dc")
		default:
			err = errors.New("unknown kernel compression")
		}
		if err != nil {
			return fmt.Errorf("%s: decompress: %w", bzImage, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if !hasPVH(tmp) {
		return fmt.Errorf("%s: the kernel has no PVH entry point", bzImage)
	}
	return os.Rename(tmp, out)
}

// runFilter pipes in through a command into w.
func runFilter(w io.Writer, in []byte, name string, args ...string) error {
	cmd := osexec.Command(name, args...)
	cmd.Stdin = bytes.NewReader(in)
	cmd.Stdout = w
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		return err
	}
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("%s: %w: %s", name, err, strings.TrimSpace(stderr.String()))
		}
		return nil
	case <-time.After(2 * time.Minute):
		_ = cmd.Process.Kill()
		<-done
		return fmt.Errorf("%s: timed out", name)
	}
}

// hasPVH reports whether an ELF kernel has the Xen PVH entry note
// (XEN_ELFNOTE_PHYS32_ENTRY, type 18), which QEMU needs to boot it.
func hasPVH(path string) bool {
	f, err := elf.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		b, err := io.ReadAll(io.LimitReader(p.Open(), 1<<20))
		if err != nil {
			continue
		}
		for len(b) >= 12 {
			nsz, dsz, typ := binary.LittleEndian.Uint32(b), binary.LittleEndian.Uint32(b[4:]), binary.LittleEndian.Uint32(b[8:])
			al := func(n uint32) int { return int((n + 3) &^ 3) }
			if 12+al(nsz)+al(dsz) > len(b) {
				break
			}
			name := strings.TrimRight(string(b[12:12+nsz]), "\x00")
			if name == "Xen" && typ == 18 {
				return true
			}
			b = b[12+al(nsz)+al(dsz):]
		}
	}
	return false
}

// sigForced reports whether the kernel insists on signed modules: its
// config (bootDir/config-RELEASE) sets CONFIG_MODULE_SIG_FORCE, or there is
// no config to tell.
func sigForced(bootDir, ver string) bool {
	b, err := os.ReadFile(filepath.Join(bootDir, "config-"+ver))
	if err != nil {
		return true
	}
	return bytes.Contains(b, []byte("\nCONFIG_MODULE_SIG_FORCE=y"))
}

// moduleSigMagic ends a signed kernel module.
const moduleSigMagic = "~Module signature appended~\n"

// stripSignature removes a module's appended signature.
func stripSignature(b []byte) []byte {
	if !bytes.HasSuffix(b, []byte(moduleSigMagic)) {
		return b
	}
	rest := b[:len(b)-len(moduleSigMagic)]
	if len(rest) < 12 {
		return b
	}
	info := rest[len(rest)-12:]
	sigLen := int(binary.BigEndian.Uint32(info[8:]))
	if sigLen > len(rest)-12 {
		return b
	}
	return rest[:len(rest)-12-sigLen]
}
