package pid1

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Config is what the exec package tells a sandbox's init: the workload, its
// identity and, for a sandbox, how to build its root. exec encodes it with
// Marshal into a descriptor the init inherits (--config-fd).
type Config struct {
	Argv     []string // the workload; Argv[0] is looked up in Path unless it holds a "/"
	Env      []string // exactly the workload's environment
	Path     string   // the PATH Argv[0] is looked up in
	Dir      string   // working directory, as seen by the workload; "" = the init's
	Hostname string   // "" = leave the UTS namespace's name as it is
	UID, GID uint32   // the workload's identity (supplementary groups are cleared)
	StatusFD int      // descriptor the Reports go to; -1 = none
	Sandbox  *Sandbox // nil = no sandbox: the host's file system and privileges (only the user changes)
}

// Sandbox describes a sandbox's root and privileges. With Root, the init
// builds the root on a fresh tmpfs mounted there, inside its own mount
// namespace (whose mounts exec has made private): the mount points, the
// Symlinks and Binds, then a minimal /dev (null zero full random urandom
// tty, a private devpts, a tmpfs /dev/shm), a fresh /proc, a read-only
// /sys, a private tmpfs /tmp, then the Masked and ReadOnly paths. The
// tmpfs is made read-only and becomes "/" through pivot_root. Without Root,
// the init was cloned from a template (shim-init --template, which builds
// the shared part once) and mounts only the sandbox's own file systems:
// from /dev on.
type Sandbox struct {
	Root     string    // an empty host directory to build the root on; "" = the root is a template's
	Binds    []Bind    // host paths bound into the root, in order
	Symlinks []Symlink // symbolic links made in the root (e.g. /bin -> usr/bin)
	Masked   []string  // hidden: /dev/null over a file, an empty read-only tmpfs over a directory
	ReadOnly []string  // made read-only (recursively)
	Caps     uint64    // capabilities a root workload (UID 0) keeps; other users keep none
	Seccomp  []byte    // a compiled BPF program (struct sock_filter[]); nil = none
}

// Bind is a host path bound at Target (a path in the sandbox).
type Bind struct {
	Source, Target string
	ReadOnly       bool
	// FD, if above 2, is a detached mount (open_tree with OPEN_TREE_CLONE)
	// inherited as that descriptor: it is moved to Target (which must
	// exist: /work), and Source only names it in errors.
	FD int
}

// Symlink is a symbolic link at Path (in the sandbox) to Target.
type Symlink struct{ Path, Target string }

const configVersion = 1

// maxConfig bounds what Unmarshal accepts: argv and environment are bounded
// by the kernel's ARG_MAX long before this.
const maxConfig = 64 << 20

// ErrConfig: a configuration that Unmarshal cannot decode.
var ErrConfig = errors.New("malformed init configuration")

// Marshal encodes c for Unmarshal.
func (c *Config) Marshal() []byte {
	var e encoder
	e.uint(configVersion)
	e.strings(c.Argv)
	e.strings(c.Env)
	e.string(c.Path)
	e.string(c.Dir)
	e.string(c.Hostname)
	e.uint(uint64(c.UID))
	e.uint(uint64(c.GID))
	e.uint(uint64(int64(c.StatusFD) + 1)) // -1 is 0
	if c.Sandbox == nil {
		e.uint(0)
		return e.b
	}
	s := c.Sandbox
	e.uint(1)
	e.string(s.Root)
	e.uint(uint64(len(s.Binds)))
	for _, b := range s.Binds {
		e.string(b.Source)
		e.string(b.Target)
		e.bool(b.ReadOnly)
		e.uint(uint64(max(b.FD, 0)))
	}
	e.uint(uint64(len(s.Symlinks)))
	for _, l := range s.Symlinks {
		e.string(l.Path)
		e.string(l.Target)
	}
	e.strings(s.Masked)
	e.strings(s.ReadOnly)
	e.uint(s.Caps)
	e.string(string(s.Seccomp))
	return e.b
}

// Unmarshal decodes what Marshal encoded.
func Unmarshal(b []byte) (*Config, error) {
	if len(b) > maxConfig {
		return nil, fmt.Errorf("%w: %d bytes", ErrConfig, len(b))
	}
	d := decoder{b: b}
	if v := d.uint(); v != configVersion && d.err == nil {
		return nil, fmt.Errorf("%w: version %d, want %d", ErrConfig, v, configVersion)
	}
	c := &Config{}
	c.Argv = d.strings()
	c.Env = d.strings()
	c.Path = d.string()
	c.Dir = d.string()
	c.Hostname = d.string()
	c.UID = uint32(d.uint32())
	c.GID = uint32(d.uint32())
	c.StatusFD = int(d.uint32()) - 1
	if d.bool() {
		s := &Sandbox{}
		s.Root = d.string()
		for n := d.count(); n > 0 && d.err == nil; n-- {
			s.Binds = append(s.Binds, Bind{Source: d.string(), Target: d.string(), ReadOnly: d.bool(), FD: int(d.uint32())})
		}
		for n := d.count(); n > 0 && d.err == nil; n-- {
			s.Symlinks = append(s.Symlinks, Symlink{Path: d.string(), Target: d.string()})
		}
		s.Masked = d.strings()
		s.ReadOnly = d.strings()
		s.Caps = d.uint()
		if f := d.string(); f != "" {
			s.Seccomp = []byte(f)
		}
		c.Sandbox = s
	}
	if d.err == nil && len(d.b) != 0 {
		d.err = fmt.Errorf("%w: %d bytes left over", ErrConfig, len(d.b))
	}
	if d.err != nil {
		return nil, d.err
	}
	return c, nil
}

type encoder struct{ b []byte }

func (e *encoder) uint(v uint64) { e.b = binary.AppendUvarint(e.b, v) }
func (e *encoder) string(s string) {
	e.uint(uint64(len(s)))
	e.b = append(e.b, s...)
}
func (e *encoder) strings(ss []string) {
	e.uint(uint64(len(ss)))
	for _, s := range ss {
		e.string(s)
	}
}
func (e *encoder) bool(v bool) {
	if v {
		e.uint(1)
	} else {
		e.uint(0)
	}
}

// decoder reads what encoder wrote; the first error sticks and every later
// read returns a zero value.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) uint() uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.err = fmt.Errorf("%w: truncated", ErrConfig)
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) uint32() uint64 {
	v := d.uint()
	if v > 1<<32-1 && d.err == nil {
		d.err = fmt.Errorf("%w: %d out of range", ErrConfig, v)
		return 0
	}
	return v
}

func (d *decoder) bool() bool {
	switch d.uint() {
	case 0:
		return false
	case 1:
		return true
	}
	if d.err == nil {
		d.err = fmt.Errorf("%w: bad flag", ErrConfig)
	}
	return false
}

// count reads a length and checks that many more bytes could follow.
func (d *decoder) count() int {
	n := d.uint()
	if n > uint64(len(d.b)) && d.err == nil {
		d.err = fmt.Errorf("%w: truncated", ErrConfig)
		return 0
	}
	return int(n)
}

func (d *decoder) string() string {
	n := d.count()
	if d.err != nil {
		return ""
	}
	s := string(d.b[:n])
	d.b = d.b[n:]
	return s
}

func (d *decoder) strings() []string {
	n := d.count()
	var out []string
	for ; n > 0 && d.err == nil; n-- {
		out = append(out, d.string())
	}
	return out
}
