# shim: build, test, demo, bench. `make test` is what CI runs (.ci/run).
GO      ?= go
TAGS    ?= seccomp
BIN     ?= bin
PKGS    := ./...

.PHONY: all build run test unit lint demo bench generate clean

all: build

build:
	CGO_ENABLED=1 $(GO) build -tags $(TAGS) -o $(BIN)/ ./cmd/shimd ./cmd/shim
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags='-s -w' -o $(BIN)/shim-init ./cmd/shim-init

generate:
	$(GO) generate ./proto/

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt -l:"; echo "$$out"; exit 1; fi
	$(GO) vet -tags $(TAGS) $(PKGS)

# Every test: unit, in-process cluster, end-to-end with real shimd processes,
# partitions in network namespaces, and the Docker chaos run.
# The failover, partition and chaos tests also write their figures to
# test-reports/, printed at the end (go test hides a passing test's log).
test: lint
	@rm -rf test-reports
	@SHIM_REPORT_DIR=$(CURDIR)/test-reports $(GO) test -tags $(TAGS) -count=1 -timeout 25m -p 1 $(PKGS); \
	  rc=$$?; for f in test-reports/*.txt; do [ -f "$$f" ] && { echo "== $$f"; cat "$$f"; }; done; exit $$rc

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
