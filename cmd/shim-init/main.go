// Command shim-init is the init of shim's sandboxes. As the init of a shim
// VM (pid1/guest) it mounts the guest's file systems, runs the workload and
// powers the VM off. Build it static (CGO_ENABLED=0): exec/vm puts it into
// the initramfs it builds.
package main

import (
	"fmt"
	"os"

	"github.com/shim-run/shim/pid1/guest"
)

func main() {
	if guest.IsGuest() {
		guest.Main()
	}
	fmt.Fprintln(os.Stderr, "shim-init: not the init of a shim VM (want PID 1 with "+guest.GuestEnv+"=1)")
	os.Exit(2)
}
