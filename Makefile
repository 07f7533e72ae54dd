# shim: build, test, demo, bench. `make test` is what CI runs (.ci/run).
GO      ?= go
TAGS    ?= seccomp
BIN     ?= bin
PKGS    := ./...

.PHONY: all build run test unit lint demo bench generate clean

all: build

build:
	CGO_ENABLED=1 $(GO) build -tags $(TAGS) -o $(BIN)/ ./cmd/shimd ./cmd/shim

generate:
	$(GO) generate ./proto/

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt -l:"; echo "$$out"; exit 1; fi
	$(GO) vet -tags $(TAGS) $(PKGS)

# Every test: unit, in-process cluster, end-to-end with real shimd processes,
# partitions in network namespaces, and the Docker chaos run.
test: lint
	$(GO) test -tags $(TAGS) -count=1 -timeout 25m -p 1 $(PKGS)

unit:
	$(GO) test -tags $(TAGS) -count=1 -short $(PKGS)

# The main job: shimd with no flags is a single-node cluster (data in
# ./shim-data, API on 127.0.0.1:7070). Talk to it with bin/shim.
run: build
	./$(BIN)/shimd

# A tour: a local 3-node cluster that runs example services and loses a node.
demo: build
	./examples/demo.sh

bench: build
	$(GO) run -tags $(TAGS) ./test/bench $(BENCHFLAGS)

clean:
	rm -rf $(BIN) shim-data
