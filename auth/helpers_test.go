package auth

import (
	"os"
	"path/filepath"
	"testing"
)

func errNotExist() error { return os.ErrNotExist }

func fileMode(t *testing.T, dir, name string) uint32 {
	t.Helper()
	fi, err := os.Stat(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	return uint32(fi.Mode().Perm())
}
