package main

import (
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/shim-run/shim/agent"
	"github.com/shim-run/shim/auth"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/table"
)

// What this node offers its sandboxes: host paths (--host-path), shim-init
// (--init), VMs (if QEMU and a guest kernel are here), and the way back to
// the cluster a workload gets (the CA).

// parseHostPaths reads --host-path NAME=DIR[:ro] flags: a name as a
// process's (letters, digits, '.', '_', '-'), an absolute directory that
// exists, each name once.
func parseHostPaths(flags []string) (map[string]agent.HostPath, []*pb.HostPath, error) {
	paths := map[string]agent.HostPath{}
	var recs []*pb.HostPath
	for _, f := range flags {
		name, dir, ok := strings.Cut(f, "=")
		bad := func(why string) error { return fmt.Errorf("--host-path %q: %s (want NAME=DIR[:ro])", f, why) }
		if !ok || name == "" || table.ValidateName(name) != nil {
			return nil, nil, bad("the name is 1-63 letters, digits, '.', '_' or '-'")
		}
		ro := false
		if d, found := strings.CutSuffix(dir, ":ro"); found {
			dir, ro = d, true
		} else if d, found := strings.CutSuffix(dir, ":rw"); found {
			dir = d
		}
		if !filepath.IsAbs(dir) || filepath.Clean(dir) != dir || dir == "/" {
			return nil, nil, bad("the directory must be an absolute, clean path other than /")
		}
		if st, err := os.Stat(dir); err != nil || !st.IsDir() {
			return nil, nil, bad("not a directory on this host")
		}
		if _, dup := paths[name]; dup {
			return nil, nil, bad("the name " + name + " is declared twice")
		}
		paths[name] = agent.HostPath{Path: dir, ReadOnly: ro}
		recs = append(recs, &pb.HostPath{Name: name, ReadOnly: ro})
	}
	slices.SortFunc(recs, func(a, b *pb.HostPath) int { return strings.Compare(a.Name, b.Name) })
	return paths, recs, nil
}

// absInit makes --init absolute (exec and exec/vm want it so).
func absInit(p string) (string, error) {
	if p == "" {
		return "", nil
	}
	a, err := filepath.Abs(p)
	if err != nil {
		return "", fmt.Errorf("--init %q: %w", p, err)
	}
	if st, err := os.Stat(a); err != nil || !st.Mode().IsRegular() {
		return "", fmt.Errorf("--init %q: not a file", p)
	}
	return a, nil
}

// caPEM is the cluster CA as workloads get it ($SHIM_CA); nil with trust
// off.
func caPEM(creds *auth.Credentials) []byte {
	if creds == nil || creds.CA == nil {
		return nil
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: creds.CA.Raw})
}
