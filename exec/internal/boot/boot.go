// Package boot diverts a container's init process into libcontainer as
// early as Go allows.
//
// libcontainer starts a container's init by re-executing the agent's own
// binary ("<binary> init"); the process then runs every package initializer
// of that binary before main. This package's initializer depends only on
// libcontainer, so Go runs it as soon as libcontainer's own dependencies
// are initialized, before the agent's heavier packages (protobuf
// registries, metrics, HTTP, Raft) that the init never uses: their
// initializers are skipped, which shortens every container start. The
// exec package imports it; exec.IsInit and exec.Init remain the explicit
// hook for main.
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
