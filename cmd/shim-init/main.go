// Command shim-init is PID 1 of every shim sandbox and VM guest. In a
// sandbox (package pid1) it builds the sandbox, starts the workload,
// forwards signals to it, reaps zombies and reports how the workload ended.
// As the init of a shim VM (package pid1/guest) it mounts the guest's file
// systems, runs the workload and powers the VM off. Build it statically
// (CGO_ENABLED=0) and install it next to shimd; exec/vm puts it into the
// initramfs it builds.
package main

import (
	"os"

	"github.com/shim-run/shim/pid1"
	"github.com/shim-run/shim/pid1/guest"
)

func main() {
	if guest.IsGuest() {
		guest.Main()
	}
	os.Exit(pid1.Main(os.Args[1:]))
}
