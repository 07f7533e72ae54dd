package table

import (
	"errors"
	"slices"
	"strings"
	"testing"

	pb "github.com/shim-run/shim/proto/shimv1"
)

// TestValidateSandbox: a spec's paths name places in its sandbox or host
// paths its node declared, never the node's own files.
func TestValidateSandbox(t *testing.T) {
	const (
		proc      = pb.Isolation_ISOLATION_PROCESS
		container = pb.Isolation_ISOLATION_CONTAINER
		host      = pb.Isolation_ISOLATION_HOST
		vm        = pb.Isolation_ISOLATION_VM
	)
	mnt := func(name, path string) *pb.Mount { return &pb.Mount{Name: name, Path: path} }
	cases := []struct {
		name   string
		spec   *pb.ProcessSpec
		reason string // "" = valid
	}{
		{"no dir", &pb.ProcessSpec{}, ""},
		{"work", &pb.ProcessSpec{Dir: "/work"}, ""},
		{"in work", &pb.ProcessSpec{Dir: "/work/src"}, ""},
		{"tmp", &pb.ProcessSpec{Dir: "/tmp/x", Isolation: container}, ""},
		{"in a mount", &pb.ProcessSpec{Dir: "/data/in", Mounts: []*pb.Mount{mnt("data", "/data")}}, ""},
		{"host isolation", &pb.ProcessSpec{Dir: "/etc", Isolation: host}, ""},
		{"relative", &pb.ProcessSpec{Dir: "work"}, "absolute, clean"},
		{"dot dot", &pb.ProcessSpec{Dir: "../x"}, "absolute, clean"},
		{"escape from work", &pb.ProcessSpec{Dir: "/work/../etc"}, "absolute, clean"},
		{"etc", &pb.ProcessSpec{Dir: "/etc"}, "outside the sandbox"},
		{"workshop", &pb.ProcessSpec{Dir: "/workshop"}, "outside the sandbox"},
		{"root", &pb.ProcessSpec{Dir: "/", Isolation: proc}, "outside the sandbox"},
		{"host relative", &pb.ProcessSpec{Dir: "x", Isolation: host}, "absolute, clean"},
		{"vm dir", &pb.ProcessSpec{Dir: "/work", Isolation: vm}, "VM starts in its work folder"},
		{"mount", &pb.ProcessSpec{Mounts: []*pb.Mount{mnt("data", "/data"), mnt("logs", "/var/log/app")}}, ""},
		{"mount no name", &pb.ProcessSpec{Mounts: []*pb.Mount{mnt("", "/data")}}, "host path's name"},
		{"mount bad name", &pb.ProcessSpec{Mounts: []*pb.Mount{mnt("../x", "/data")}}, "host path's name"},
		{"mount relative", &pb.ProcessSpec{Mounts: []*pb.Mount{mnt("data", "data")}}, "absolute, clean"},
		{"mount at /", &pb.ProcessSpec{Mounts: []*pb.Mount{mnt("data", "/")}}, "other than /"},
		{"mount over etc", &pb.ProcessSpec{Mounts: []*pb.Mount{mnt("data", "/etc")}}, "overlaps /etc"},
		{"mount in usr", &pb.ProcessSpec{Mounts: []*pb.Mount{mnt("data", "/usr/local")}}, "overlaps /usr"},
		{"mount over work", &pb.ProcessSpec{Mounts: []*pb.Mount{mnt("data", "/work")}}, "overlaps /work"},
		{"mounts nested", &pb.ProcessSpec{Mounts: []*pb.Mount{mnt("a", "/data"), mnt("b", "/data/b")}}, "overlaps /data"},
		{"mount in host isolation", &pb.ProcessSpec{Isolation: host, Mounts: []*pb.Mount{mnt("a", "/data")}}, "need a process or container"},
		{"mount in a vm", &pb.ProcessSpec{Isolation: vm, Mounts: []*pb.Mount{mnt("a", "/data")}}, "need a process or container"},
		{"rootfs", &pb.ProcessSpec{Isolation: container, Rootfs: "images"}, ""},
		{"rootfs sub", &pb.ProcessSpec{Isolation: container, Rootfs: "images/alpine/3"}, ""},
		{"rootfs /", &pb.ProcessSpec{Isolation: container, Rootfs: "/"}, "NAME[/SUB]"},
		{"rootfs absolute", &pb.ProcessSpec{Isolation: container, Rootfs: "/srv/root"}, "NAME[/SUB]"},
		{"rootfs escape", &pb.ProcessSpec{Isolation: container, Rootfs: "images/../../etc"}, "clean relative"},
		{"rootfs dot dot", &pb.ProcessSpec{Isolation: container, Rootfs: "images/.."}, "clean relative"},
		{"rootfs process", &pb.ProcessSpec{Rootfs: "images"}, "container isolation"},
		{"user", &pb.ProcessSpec{User: "1000:100"}, ""},
		{"root", &pb.ProcessSpec{User: "0"}, ""},
		{"user name", &pb.ProcessSpec{User: "nobody"}, "UID[:GID]"},
		{"user no gid", &pb.ProcessSpec{User: "1000:"}, "UID[:GID]"},
		{"user too big", &pb.ProcessSpec{User: "4294967295"}, "UID[:GID]"},
	}
	for _, c := range cases {
		c.spec.Command = []string{"/bin/true"}
		err := ValidateSpec(c.spec)
		switch {
		case c.reason == "" && err != nil:
			t.Errorf("%s: %v", c.name, err)
		case c.reason != "" && (!errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.reason)):
			t.Errorf("%s: %v, want invalid: ...%s...", c.name, err, c.reason)
		case err != nil && strings.Contains(err.Error(), "\n"):
			t.Errorf("%s: not one line: %q", c.name, err)
		}
	}
}

func hostPathNode(name string, vmUnavailable string, paths ...*pb.HostPath) *pb.Command {
	cmd := nodeCmd(name, 2*core, 4*gib)
	n := cmd.GetRegisterNode().Node
	n.HostPaths, n.VmUnavailable = paths, vmUnavailable
	return cmd
}

// TestPlacementOffers: a process goes only to a node that offers its host
// paths (read-write where it mounts one so) and, for a VM, can run VMs; a
// process pinned to another is refused with one line.
func TestPlacementOffers(t *testing.T) {
	x := newTester(t)
	x.ok(hostPathNode("n1", "no QEMU: qemu-system-x86_64 not found (install qemu-system-x86)"))
	x.ok(hostPathNode("n2", "", &pb.HostPath{Name: "data"}, &pb.HostPath{Name: "images", ReadOnly: true}))
	x.ok(hostPathNode("n3", "", &pb.HostPath{Name: "data", ReadOnly: true}))
	withMount := func(name string, ro bool) *pb.ProcessSpec {
		s := spec(100)
		s.Mounts = []*pb.Mount{{Name: name, Path: "/data", ReadOnly: ro}}
		return s
	}
	vmSpec := spec(100)
	vmSpec.Isolation = pb.Isolation_ISOLATION_VM
	rootfs := spec(100)
	rootfs.Isolation, rootfs.Rootfs = pb.Isolation_ISOLATION_CONTAINER, "images/alpine"

	x.ok(spawnCmd(withMount("data", false), "a1", "a2", "a3")) // only n2 offers data read-write
	x.ok(spawnCmd(withMount("data", true), "b1", "b2"))        // n2 and n3
	x.ok(spawnCmd(vmSpec, "v1", "v2", "v3"))                   // n2 and n3
	x.ok(spawnCmd(rootfs, "r1"))
	for id, on := range map[string][]string{
		"a1": {"n2"}, "a2": {"n2"}, "a3": {"n2"}, "b1": {"n2", "n3"}, "b2": {"n2", "n3"},
		"v1": {"n2", "n3"}, "v2": {"n2", "n3"}, "v3": {"n2", "n3"}, "r1": {"n2"},
	} {
		if n := x.get(id).Node; !slices.Contains(on, n) {
			t.Errorf("%s placed on %s, want one of %v", id, n, on)
		}
	}
	for _, c := range []struct {
		spec *pb.ProcessSpec
		want string
	}{
		{pinned(withMount("data", false), "n3"), "node n3 offers host path data read-only"},
		{pinned(withMount("data", false), "n1"), "node n1 does not offer host path data"},
		{pinned(vmSpec, "n1"), "node n1 cannot run VMs: no QEMU"},
		{withMount("logs", false), "no up node offers what it needs"},
	} {
		err := x.fail(spawnCmd(c.spec, "z"), ErrNoCapacity)
		if !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("error %q, want one line with %q", err, c.want)
		}
	}
	// A node that stops offering a host path takes no more processes
	// needing it; those it runs stay.
	x.ok(hostPathNode("n2", ""))
	x.fail(spawnCmd(withMount("data", false), "z"), ErrNoCapacity)
	if n := x.get("a1").Node; n != "n2" {
		t.Errorf("a1 moved to %s", n)
	}
}
