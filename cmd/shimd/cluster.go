package main

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"path/filepath"
	"regexp"

	"github.com/shim-run/shim/auth"
)

// Cgroups belong to one cluster. Two clusters on one host may both have a
// node called n1; were cgroups named by node alone, each would see (adopt,
// fence, remove) the other's sandboxes. So a node's cgroup root is
// shim/<cluster>/<node>, its VM state /run/shim/<cluster>/<node>/vm.
//
// The cluster's ID is the one its CA was made for (the CA certificate's
// organizational unit): every node holds ca.pem from the moment it has
// joined, it never changes, and a restarted node reads the same. An
// insecure node (no CA) is named by its data dir instead: unique on the
// host, stable across restarts.

var clusterIDPattern = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// clusterID is this node's cluster's ID, safe as a path element.
func clusterID(creds *auth.Credentials, dataDir string) (string, error) {
	if creds != nil && creds.CA != nil {
		if ou := creds.CA.Subject.OrganizationalUnit; len(ou) == 1 && clusterIDPattern.MatchString(ou[0]) {
			return ou[0], nil
		}
		sum := sha256.Sum256(creds.CA.RawSubjectPublicKeyInfo) // a CA made elsewhere: its key's fingerprint
		return hex.EncodeToString(sum[:8]), nil
	}
	dir, err := filepath.Abs(dataDir)
	if err != nil {
		return "", fmt.Errorf("data dir: %w", err)
	}
	sum := sha256.Sum256([]byte(dir))
	return "local-" + hex.EncodeToString(sum[:6]), nil
}

// keepDirName is the folder in the data dir of the on-lost keep markers
// (execRuntime.keepDir).
const keepDirName = "keep"

// cgroupRoot is the node's cgroup root, below every hierarchy's mount.
func cgroupRoot(cluster, node string) string { return "shim/" + cluster + "/" + node }
