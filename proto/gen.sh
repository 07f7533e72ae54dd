#!/usr/bin/env bash
# Regenerates proto/shimv1 from proto/shim/v1/shim.proto. The Go plugins are
# pinned by the tool directives in go.mod; protoc comes from Debian's
# protobuf-compiler package. Run through `go generate ./proto/`.
set -euo pipefail
cd "$(dirname "$0")"
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
go build -o "$bin/protoc-gen-go" google.golang.org/protobuf/cmd/protoc-gen-go
go build -o "$bin/protoc-gen-connect-go" connectrpc.com/connect/cmd/protoc-gen-connect-go
protoc -I . \
  --plugin=protoc-gen-go="$bin/protoc-gen-go" --go_out=. --go_opt=module=github.com/shim-run/shim/proto \
  --plugin=protoc-gen-connect-go="$bin/protoc-gen-connect-go" --connect-go_out=. --connect-go_opt=module=github.com/shim-run/shim/proto \
  shim/v1/shim.proto
