// Command shim is the command-line client for a shim cluster: it spawns,
// lists, resizes and kills processes, streams their logs, and shows and drains
// nodes, by speaking the ShimService Connect API to any member of the cluster.
//
// Addresses come from --addr or $SHIM_ADDR (comma-separated host:port list,
// default 127.0.0.1:7070); they are tried in order until one answers. Errors
// are printed as one line on stderr prefixed "shim: "; the exit code is 1 for
// server and connection errors and 2 for usage errors.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = ""

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := newApp(os.Stdout, os.Stderr).execute(ctx, os.Args[1:])
	stop()
	os.Exit(code)
}
