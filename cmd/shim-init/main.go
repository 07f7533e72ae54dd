// Command shim-init is PID 1 of every shim sandbox: it builds the sandbox,
// starts the workload, forwards signals to it, reaps zombies and reports
// how the workload ended. See package pid1. Build it statically
// (CGO_ENABLED=0) and install it next to shimd.
package main

import (
	"os"

	"github.com/shim-run/shim/pid1"
)

func main() { os.Exit(pid1.Main(os.Args[1:])) }
