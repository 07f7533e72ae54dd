// Package shimv1 is the Go code generated from proto/shim/v1/shim.proto: the
// process, node and command messages and the Connect service stubs.
package shimv1
