package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"github.com/shim-run/shim/auth"
	pb "github.com/shim-run/shim/proto/shimv1"
	"github.com/shim-run/shim/table"
)

// What a workload gets besides its spec: a work folder, the host paths it
// mounts resolved against the ones this node declares (HostPaths), and the
// way back to the cluster: $SHIM_ADDR (this node's API), $SHIM_TOKEN (its
// self token, which the servers hand over with the assignments) and
// $SHIM_CA (the cluster's CA, in its work folder).
//
// The work folder, <data dir>/work/<id>, lives as long as the process has
// business on this node: it outlives restarts and adoptions, and sweepWork
// removes it once the process is finally gone from here (no longer assigned
// to this node by the table, and not running here).

// HostPath is a host folder this node offers to sandboxes (shimd
// --host-path NAME=DIR[:ro]).
type HostPath struct {
	Path     string // absolute
	ReadOnly bool
}

// Mount is a host path bound into a sandbox.
type Mount struct {
	Source, Target string
	ReadOnly       bool
}

// CAFile is the cluster CA's file in each work folder ($SHIM_CA).
const CAFile = ".shim-ca.pem"

// workEvery is how often sweepWork looks for work folders to remove.
const workEvery = 5 * time.Second

// WorkPath is the work folder of process id under the data dir.
func WorkPath(dataDir, id string) string { return filepath.Join(dataDir, "work", id) }

// runSpec is what the runtime starts for rec: its spec, with its host
// paths resolved, its work folder and its environment.
func (a *Agent) runSpec(rec *pb.ProcessRecord) (Spec, error) {
	spec := rec.Spec
	s := Spec{
		ID: rec.Id, Incarnation: rec.Incarnation, Argv: spec.Command, Dir: spec.Dir,
		LogPath: LogPath(a.DataDir, rec.Id), Resources: spec.Resources, Isolation: spec.Isolation,
		Network: spec.Network, User: spec.User, WorkDir: WorkPath(a.DataDir, rec.Id), CA: a.CA,
		Keep: spec.GetOnLost() == pb.OnLost_ON_LOST_KEEP,
	}
	for _, m := range spec.Mounts {
		hp, ok := a.HostPaths[m.GetName()]
		if !ok {
			return s, fmt.Errorf("host path %s: node %s does not offer it", m.GetName(), a.Node.Name)
		}
		s.Mounts = append(s.Mounts, Mount{Source: hp.Path, Target: m.GetPath(), ReadOnly: m.GetReadOnly() || hp.ReadOnly})
	}
	if r := spec.Rootfs; r != "" {
		name, sub, err := table.SplitHostPath(r)
		if err != nil {
			return s, err
		}
		hp, ok := a.HostPaths[name]
		if !ok {
			return s, fmt.Errorf("root file system %s: node %s does not offer host path %s", r, a.Node.Name, name)
		}
		s.Rootfs = filepath.Join(hp.Path, filepath.FromSlash(sub))
	}
	s.Env = a.env(rec)
	return s, nil
}

// selfEnv is how a workload reaches the cluster: this node's API address,
// and, with trust on, its self token and the CA's file as the workload
// sees it.
func (a *Agent) selfEnv(rec *pb.ProcessRecord) []string {
	env := []string{"SHIM_ADDR=" + a.Node.ApiAddr}
	a.tokensMu.Lock()
	tok := a.tokens[rec.Id]
	a.tokensMu.Unlock()
	if t, err := auth.ParseSelfToken(tok); err == nil && t.Incarnation == rec.Incarnation {
		env = append(env, "SHIM_TOKEN="+tok)
	}
	if len(a.CA) > 0 {
		ca := path.Join("/work", CAFile)
		switch rec.Spec.GetIsolation() {
		case pb.Isolation_ISOLATION_HOST, pb.Isolation_ISOLATION_VM:
			ca = filepath.Join(WorkPath(a.DataDir, rec.Id), CAFile) // the same path inside
		}
		env = append(env, "SHIM_CA="+ca)
	}
	return env
}

// mergeTokens keeps the self tokens of an assignments answer: all of them
// after a full one, else those that came with changed records.
func (a *Agent) mergeTokens(m *pb.AssignmentsResponse) {
	a.tokensMu.Lock()
	defer a.tokensMu.Unlock()
	if m.Full || a.tokens == nil {
		a.tokens = make(map[string]string, len(m.SelfTokens))
	}
	for _, id := range m.Removed {
		delete(a.tokens, id)
	}
	for id, tok := range m.SelfTokens {
		a.tokens[id] = tok
	}
}

// sweepWork removes, every workEvery, the work folders of processes that
// are neither assigned here nor running here.
func (a *Agent) sweepWork(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.Clock.After(workEvery):
		}
		a.sweepWorkOnce()
	}
}

func (a *Agent) sweepWorkOnce() {
	dir := filepath.Join(a.DataDir, "work")
	ents, err := os.ReadDir(dir)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			a.Log.Warn("work folders", "err", err)
		}
		return
	}
	var gone []string
	a.mu.Lock()
	if a.table != nil && a.tableIndex >= a.minIndex {
		for _, e := range ents {
			id := e.Name()
			p := filepath.Join(dir, id)
			if strings.HasPrefix(id, ".") {
				gone = append(gone, p) // a sweep that did not finish
				continue
			}
			if a.procs[id] != nil || a.table[id] != nil {
				continue
			}
			// Renamed under the lock: a start of the same id after it
			// lets go finds no half-removed folder.
			trash := filepath.Join(dir, ".gone-"+id)
			if err := os.Rename(p, trash); err == nil {
				gone = append(gone, trash)
			}
		}
	}
	a.mu.Unlock()
	for _, p := range gone {
		if err := os.RemoveAll(p); err != nil {
			a.Log.Warn("remove work folder", "path", p, "err", err)
		}
	}
}
