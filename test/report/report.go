// Package report keeps the figures the long tests measure: `make test` sets
// $SHIM_REPORT_DIR and prints the files at the end, since go test shows a
// passing test's log only with -v.
package report

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Keep appends text to $SHIM_REPORT_DIR/NAME.txt when that variable is set.
func Keep(t testing.TB, name, text string) {
	t.Helper()
	dir := os.Getenv("SHIM_REPORT_DIR")
	if dir == "" {
		return
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Logf("report %s: %v", name, err)
		return
	}
	f, err := os.OpenFile(filepath.Join(dir, name+".txt"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err == nil {
		_, err = fmt.Fprintf(f, "%s\n", strings.TrimSpace(text))
		err = errors.Join(err, f.Close())
	}
	if err != nil {
		t.Logf("report %s: %v", name, err)
	}
}
