// Command shimd is the shim node daemon. Every host runs one: servers keep
// the Raft-replicated process table, and every node, server or worker, runs
// the processes the table assigns to it. `shimd` with no flags is a working
// single-node cluster.
package main

import (
	"fmt"
	"math"
	"os"

	"golang.org/x/sys/unix"

	"github.com/shim-run/shim/exec"
)

func main() {
	if exec.IsInit() { // re-executed by libcontainer as a container's init
		exec.Init() // never returns
	}
	// Descriptors inherited from whoever started shimd (a lock held by a
	// script, a socket) must not leak into the guard or the workloads, and
	// must not be kept open by them for their whole lives.
	_ = unix.CloseRange(3, math.MaxUint32, unix.CLOSE_RANGE_CLOEXEC)
	if err := newCommand().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "shimd:", err)
		os.Exit(1)
	}
}
