// Package proto holds shim's protobuf schema (shim/v1/shim.proto) and the code
// generated from it in shimv1. Run `go generate ./proto/` to regenerate.
package proto

//go:generate ./gen.sh
