// Package boot diverts a container's init process into libcontainer as
// early as Go allows.
//
// libcontainer starts a container's init by re-executing the agent's own
// binary ("<binary> init"); the process then runs every package initializer
// of that binary before main. This package's initializer depends only on
// libcontainer, so Go runs it as soon as libcontainer's own dependencies
// are initialized, and the initializers after it are skipped. That is
// fewer than hoped: Go initializes, among the packages whose dependencies
// are done, the first by import path, and libcontainer needs net and
// vendor/golang.org/x/net, which sort late, so nearly every package of the
// agent is initialized first. Measured (GODEBUG=inittrace=1, shimd): this
// is initializer 163 of 183, after 1.6 of 2.1 ms of initializers; with the
// Go runtime's own start, shimd's size costs a container start about 2 ms
// over a binary of libcontainer alone. The exec package imports it;
// exec.IsInit and exec.Init remain the explicit hook for main.
package boot

import (
	"os"

	"github.com/opencontainers/runc/libcontainer"
	// nsexec, run by a C constructor before the Go runtime starts, sets up
	// a container init's namespaces; it returns at once in other processes.
	_ "github.com/opencontainers/runc/libcontainer/nsenter"
)

func init() {
	if IsInit() {
		Init()
	}
}

// IsInit reports whether this process is a container's init, started by
// libcontainer as "<this binary> init".
func IsInit() bool {
	return len(os.Args) > 1 && os.Args[1] == "init" && os.Getenv("_LIBCONTAINER_INITPIPE") != ""
}

// Init runs libcontainer's init, which finishes setting up the sandbox and
// executes the workload. It never returns.
func Init() {
	libcontainer.Init()
}
