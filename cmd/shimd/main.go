// Command shimd is the shim node daemon. Every host runs one: servers keep
// the Raft-replicated process table, and every node, server or worker, runs
// the processes the table assigns to it. `shimd` with no flags is a working
// single-node cluster.
package main

import (
	"fmt"
	"os"

	"github.com/shim-run/shim/exec"
)

func main() {
	if exec.IsInit() { // re-executed by libcontainer as a container's init
		exec.Init() // never returns
	}
	if err := newCommand().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "shimd:", err)
		os.Exit(1)
	}
}
