package cgroup

import (
	"bufio"
	"cmp"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"

	cgroups "github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// Sentinel errors, wrapped with context; test with errors.Is.
var (
	ErrNotFound    = errors.New("cgroup not found")
	ErrExists      = errors.New("cgroup already exists")
	ErrInvalid     = errors.New("invalid argument")
	ErrUnsupported = errors.New("no usable cgroup hierarchy")
	ErrBusy        = errors.New("cgroup still has processes")
)

// v1Controllers are the v1 hierarchies a group lives in. cpuset is left
// out on purpose: a new cpuset group is unusable until cpus/mems are copied
// from its parent, and shim does not pin CPUs.
var v1Controllers = []cgroup1.Name{cgroup1.Cpu, cgroup1.Cpuacct, cgroup1.Memory, cgroup1.Pids, cgroup1.Freezer}

// v2Controllers are enabled in cgroup.subtree_control down to each group.
var v2Controllers = []string{"cpu", "memory", "pids"}

const v2Mount = "/sys/fs/cgroup"

// controller is one mounted v1 hierarchy.
type controller struct {
	name  cgroup1.Name
	dir   string // where the hierarchy is reachable, e.g. /sys/fs/cgroup/cpu
	mroot string // the mount's root inside the hierarchy (mountinfo field 4)
}

// Manager creates and finds the groups below one root. It is safe for
// concurrent use. One Manager per node agent.
type Manager struct {
	root  string // relative to every hierarchy's mount, e.g. "shim/node1"
	v2    bool
	mount string            // v2 only: the unified hierarchy's mount point
	ctls  []controller      // v1 only
	hier  cgroup1.Hierarchy // v1 only: ctls as library subsystems
	// devCtls and devHier are ctls and hier plus the devices hierarchy,
	// for groups made by CreateDevices (v1 only; nil if devices is not
	// mounted).
	devCtls []controller
	devHier cgroup1.Hierarchy
	// extra are the other mounted hierarchies (v1 only: cpuset, devices,
	// blkio, named and hybrid-unified ones). Groups are never created there,
	// but a container runtime joining a group (libcontainer) creates the
	// same path in every hierarchy, so Delete removes it there too.
	extra []string

	// mu orders directory creation against removal of empty parents, so a
	// Delete never removes a parent that a concurrent Create is using.
	mu sync.Mutex
	// homeTasks holds the open "tasks" files (by directory) of the groups
	// Spawn's borrowed threads return to (see writeHomeTasks).
	homeTasks sync.Map
	// live counts the groups this Manager created that Delete has not
	// removed: while there are any, the root is not empty and Delete need
	// not try to remove the parents (a dozen failing rmdirs per process).
	live int
}

// NewManager returns a Manager for root, a relative cgroup path such as
// "shim/node1". It detects cgroup v1 (legacy or hybrid) or v2 (unified).
// Nothing is created until the first Create.
func NewManager(root string) (*Manager, error) {
	clean := filepath.Clean(root)
	if root == "" || filepath.IsAbs(root) || clean == "." || clean == ".." || strings.HasPrefix(clean, "../") {
		return nil, fmt.Errorf("cgroup manager root %q: must be a relative path inside the cgroup mount: %w", root, ErrInvalid)
	}
	m := &Manager{root: clean}
	switch cgroups.Mode() {
	case cgroups.Unified:
		m.v2, m.mount = true, v2Mount
		return m, nil
	case cgroups.Legacy, cgroups.Hybrid:
	default:
		return nil, fmt.Errorf("cgroup manager %s: %w", root, ErrUnsupported)
	}
	all, err := cgroup1.Default()
	if err != nil {
		return nil, fmt.Errorf("cgroup manager %s: %w: %w", root, ErrUnsupported, err)
	}
	mroots, mpoints, err := v1Mounts()
	if err != nil {
		return nil, fmt.Errorf("cgroup manager %s: %w", root, err)
	}
	var subs []cgroup1.Subsystem
	var devSub cgroup1.Subsystem
	var devCtl controller
	for _, s := range all {
		if !slices.Contains(v1Controllers, s.Name()) && s.Name() != cgroup1.Devices {
			continue
		}
		p, ok := s.(interface{ Path(string) string })
		if !ok {
			continue
		}
		orig := p.Path("/")
		dir := orig
		if real, err := filepath.EvalSymlinks(orig); err == nil {
			dir = real // co-mounted hierarchies (cpu,cpuacct) share one dir
		}
		if s.Name() == cgroup1.Devices {
			mr := mroots[string(s.Name())]
			if mr == "" {
				mr = "/"
			}
			devSub, devCtl = s, controller{name: s.Name(), dir: dir, mroot: mr}
			continue
		}
		if s.Name() == cgroup1.Memory {
			// Stats must not fail on kernels without swap or kmem accounting.
			s = cgroup1.NewMemory(filepath.Dir(orig), cgroup1.OptionalSwap(), cgroup1.IgnoreModules("kmem", "kmem.tcp"))
		}
		mr := mroots[string(s.Name())]
		if mr == "" {
			mr = "/"
		}
		m.ctls = append(m.ctls, controller{name: s.Name(), dir: dir, mroot: mr})
		subs = append(subs, s)
	}
	// Spawn relies on memory coming last (entered last, left first).
	slices.SortStableFunc(m.ctls, func(a, b controller) int {
		return cmp.Compare(boolInt(a.name == cgroup1.Memory), boolInt(b.name == cgroup1.Memory))
	})
	if len(m.ctls) == 0 {
		return nil, fmt.Errorf("cgroup manager %s: none of %v mounted: %w", root, v1Controllers, ErrUnsupported)
	}
	m.hier = func() ([]cgroup1.Subsystem, error) { return subs, nil }
	if devSub != nil {
		m.devCtls = m.ctls // co-mounted with one of them: the same directories
		if !slices.ContainsFunc(m.ctls, func(c controller) bool { return c.dir == devCtl.dir }) {
			// Before memory, which Spawn enters last.
			i := slices.IndexFunc(m.ctls, func(c controller) bool { return c.name == cgroup1.Memory })
			if i < 0 {
				i = len(m.ctls)
			}
			m.devCtls = slices.Insert(slices.Clone(m.ctls), i, devCtl)
		}
		devSubs := append(slices.Clone(subs), devSub)
		m.devHier = func() ([]cgroup1.Subsystem, error) { return devSubs, nil }
	}
	for _, mp := range mpoints {
		if real, err := filepath.EvalSymlinks(mp); err == nil {
			mp = real
		}
		if !slices.ContainsFunc(m.ctls, func(c controller) bool { return c.dir == mp }) && !slices.Contains(m.extra, mp) {
			m.extra = append(m.extra, mp)
		}
	}
	return m, nil
}

// V2 reports whether the manager drives the cgroup v2 unified hierarchy.
func (m *Manager) V2() bool { return m.v2 }

// Root returns the manager's root, relative to the cgroup mount.
func (m *Manager) Root() string { return m.root }

// Create creates group name below the root in every needed controller and
// applies r. It fails with ErrExists if the group is already there.
func (m *Manager) Create(name string, r Resources) (*Group, error) {
	return m.create(name, r, nil, false)
}

// CreateDevices is Create for a sandbox whose device access is restricted
// (a container). On cgroup v1 the group also lives in the devices
// hierarchy, where every device is denied except those rules allow, e.g.
// {Allow: true, Type: "c", Major: 1, Minor: 3, Access: "rwm"} for
// /dev/null. On v1 without a mounted devices hierarchy it fails with
// ErrUnsupported, as runc does: the rules are a wall of the sandbox. cgroup
// v2 has no device files (a container runtime attaches an eBPF program to
// the group instead), so there it is Create.
func (m *Manager) CreateDevices(name string, r Resources, allow []specs.LinuxDeviceCgroup) (*Group, error) {
	if !m.v2 && m.devCtls == nil {
		return nil, fmt.Errorf("create cgroup %s: the v1 devices controller is not mounted: %w", name, ErrUnsupported)
	}
	return m.create(name, r, allow, true)
}

func (m *Manager) create(name string, r Resources, allow []specs.LinuxDeviceCgroup, devices bool) (*Group, error) {
	if err := validName(name); err != nil {
		return nil, fmt.Errorf("create cgroup %s: %w", name, err)
	}
	if err := r.Validate(); err != nil {
		return nil, fmt.Errorf("create cgroup %s: %w", name, err)
	}
	g := m.group(name)
	var devs []specs.LinuxDeviceCgroup
	if devices && !m.v2 {
		g.ctls = m.devCtls
		devs = append([]specs.LinuxDeviceCgroup{{Allow: false, Access: "rwm"}}, allow...)
	}
	if err := m.mkdirs(g); err != nil {
		return nil, fmt.Errorf("create cgroup %s: %w", name, err)
	}
	g.counted = true // by mkdirs
	var err error
	if m.v2 {
		err = g.createV2(r)
	} else {
		err = g.createV1(r, devs)
	}
	if err != nil {
		_ = g.Delete()
		return nil, fmt.Errorf("create cgroup %s: %w", name, err)
	}
	return g, nil
}

// Open returns the existing group name, or an error wrapping ErrNotFound.
func (m *Manager) Open(name string) (*Group, error) {
	if err := validName(name); err != nil {
		return nil, fmt.Errorf("open cgroup %s: %w", name, err)
	}
	g := m.group(name)
	if m.v2 {
		if _, err := os.Stat(g.dir); err != nil {
			return nil, fmt.Errorf("open cgroup %s: %w", name, notFound(err))
		}
		cg, err := cgroup2.Load("/"+g.rel, cgroup2.WithMountpoint(m.mount))
		if err != nil {
			return nil, fmt.Errorf("open cgroup %s: %w", name, err)
		}
		g.cg2 = cg
		return g, nil
	}
	cg, err := cgroup1.Load(cgroup1.StaticPath(g.rel), cgroup1.WithHierarchy(m.hier))
	if err != nil {
		return nil, fmt.Errorf("open cgroup %s: %w", name, notFound(err))
	}
	g.cg = cg
	// Keep the manager's order (memory last), limited to where g exists.
	g.ctls = nil
	for _, c := range m.ctls {
		if slices.ContainsFunc(cg.Subsystems(), func(s cgroup1.Subsystem) bool { return s.Name() == c.name }) {
			g.ctls = append(g.ctls, c)
		}
	}
	return g, nil
}

// List returns the names of the groups below the root (in any controller,
// so half-deleted groups show up too), sorted. A missing root is empty.
func (m *Manager) List() ([]string, error) {
	var dirs []string
	if m.v2 {
		dirs = []string{filepath.Join(m.mount, m.root)}
	} else {
		for _, c := range m.ctls {
			dirs = append(dirs, filepath.Join(c.dir, m.root))
		}
	}
	var names []string
	for _, d := range dirs {
		ents, err := os.ReadDir(d)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("list cgroups under %s: %w", m.root, err)
		}
		for _, e := range ents {
			if e.IsDir() && !slices.Contains(names, e.Name()) {
				names = append(names, e.Name())
			}
		}
	}
	slices.Sort(names)
	return names, nil
}

func (m *Manager) group(name string) *Group {
	g := &Group{m: m, name: name, rel: filepath.Join(m.root, name)}
	if m.v2 {
		g.dir = filepath.Join(m.mount, g.rel)
	} else {
		g.ctls = m.ctls
	}
	return g
}

// mkdirs creates g's directories; the leaf must not exist yet.
func (m *Manager) mkdirs(g *Group) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.v2 {
		if err := m.mkdirParentsV2(); err != nil {
			return err
		}
		if err := os.Mkdir(g.dir, 0o755); err != nil {
			if errors.Is(err, fs.ErrExist) {
				return ErrExists
			}
			return err
		}
		m.live++
		return nil
	}
	var made []string
	for _, dir := range g.dirs() {
		err := os.Mkdir(dir, 0o755)
		for try := 0; errors.Is(err, fs.ErrNotExist) && try < 3; try++ {
			// The parents are missing (or another agent sharing one
			// removed it in between).
			if err = os.MkdirAll(filepath.Dir(dir), 0o755); err == nil {
				err = os.Mkdir(dir, 0o755)
			}
		}
		if err != nil {
			removeDirs(made)
			if errors.Is(err, fs.ErrExist) {
				return ErrExists
			}
			return err
		}
		made = append(made, dir)
	}
	m.live++
	return nil
}

// mkdirParentsV2 creates the root and enables the controllers in every
// ancestor's subtree_control, from the mount down to the root itself.
func (m *Manager) mkdirParentsV2() error {
	dir := m.mount
	parts := strings.Split(m.root, "/")
	for i := 0; i <= len(parts); i++ {
		if i > 0 {
			dir = filepath.Join(dir, parts[i-1])
			if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
				return err
			}
		}
		avail, err := os.ReadFile(filepath.Join(dir, "cgroup.controllers"))
		if err != nil {
			return err
		}
		var want []string
		for _, c := range v2Controllers {
			if slices.Contains(strings.Fields(string(avail)), c) {
				want = append(want, "+"+c)
			}
		}
		if len(want) > 0 {
			if err := os.WriteFile(filepath.Join(dir, "cgroup.subtree_control"), []byte(strings.Join(want, " ")), 0); err != nil {
				return fmt.Errorf("enable controllers in %s: %w", dir, err)
			}
		}
	}
	return nil
}

// removeParents removes the now-empty directories between the root and the
// mount, deepest first, stopping in each hierarchy at the first one in use.
func (m *Manager) removeParents() {
	mounts := []string{m.mount}
	if !m.v2 {
		mounts = append(uniqueDirs(m.ctls, "."), m.extra...)
	}
	for _, mnt := range mounts {
		for rel := m.root; rel != "." && rel != "/"; rel = filepath.Dir(rel) {
			if err := os.Remove(filepath.Join(mnt, rel)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				break
			}
		}
	}
}

// uniqueDirs returns rel inside each distinct hierarchy of ctls.
func uniqueDirs(ctls []controller, rel string) []string {
	var out []string
	for _, c := range ctls {
		if d := filepath.Join(c.dir, rel); !slices.Contains(out, d) {
			out = append(out, d)
		}
	}
	return out
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

func removeDirs(dirs []string) {
	for _, d := range dirs {
		_ = os.Remove(d)
	}
}

func validName(name string) error {
	if name == "" || name == "." || name == ".." || len(name) > 255 || strings.ContainsAny(name, "/\x00") {
		return fmt.Errorf("group name %q: %w", name, ErrInvalid)
	}
	return nil
}

func notFound(err error) error {
	// ENODEV: the group is being removed (its files are deactivated).
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, cgroup1.ErrCgroupDeleted) || errors.Is(err, syscall.ENODEV) {
		return fmt.Errorf("%w: %w", ErrNotFound, err)
	}
	return err
}

// v1Mounts reads /proc/self/mountinfo. It maps each v1 controller to the
// root of its mount (field 4; "/" unless a sub-hierarchy is bind-mounted or
// a cgroup namespace is in use), and lists the mount points of every cgroup
// hierarchy whose root is "/" (v1 ones and a hybrid setup's unified one).
func v1Mounts() (roots map[string]string, points []string, err error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	roots = map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		sep := slices.Index(fields, "-")
		if sep < 4 || len(fields) < sep+4 || (fields[sep+1] != "cgroup" && fields[sep+1] != "cgroup2") {
			continue
		}
		if fields[3] == "/" && !slices.Contains(points, fields[4]) {
			points = append(points, fields[4])
		}
		if fields[sep+1] != "cgroup" {
			continue
		}
		for _, opt := range strings.Split(fields[sep+3], ",") {
			if _, dup := roots[opt]; !dup {
				roots[opt] = fields[3]
			}
		}
	}
	return roots, points, sc.Err()
}
