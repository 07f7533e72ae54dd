# shim: build, test, demo, bench. `make test` is what CI runs (.ci/run).
GO      ?= go
TAGS    ?= seccomp
BIN     ?= bin
PKGS    := ./...

.PHONY: all build deps run install test unit lint demo bench generate clean

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
# RUNFLAGS adds shimd flags: make run RUNFLAGS='--api 127.0.0.1:7170 --raft 127.0.0.1:7171'.
run: deps build
	./$(BIN)/shimd $(RUNFLAGS)

# What a build and a run need on Debian (as root): a C toolchain and
# libseccomp-dev for shimd's seccomp filters (cgo), pkg-config to find it.
# apt-get runs only when something is missing.
DEPS_PKGS := build-essential pkg-config libseccomp-dev
deps:
	@missing=""; \
	  command -v gcc >/dev/null 2>&1 || missing="$$missing build-essential"; \
	  command -v pkg-config >/dev/null 2>&1 || missing="$$missing pkg-config"; \
	  pkg-config --exists libseccomp 2>/dev/null || missing="$$missing libseccomp-dev"; \
	  if [ -n "$$missing" ]; then \
	    echo "make deps: installing$$missing"; \
	    if ! command -v apt-get >/dev/null 2>&1; then echo "make deps: no apt-get: install$$missing by hand" >&2; exit 1; fi; \
	    [ "$$(id -u)" = 0 ] || { echo "make deps: installing$$missing needs root" >&2; exit 1; }; \
	    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $$missing >/dev/null; \
	  fi

# Install the binaries in $(PREFIX)/bin and shimd.service in systemd's
# folder (enable it with systemctl enable --now shimd; flags go in
# /etc/default/shimd as SHIMD_ARGS).
PREFIX  ?= /usr/local
UNITDIR ?= /etc/systemd/system
install: deps build
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(UNITDIR)
	install -m 0755 $(BIN)/shimd $(BIN)/shim $(BIN)/shim-init $(DESTDIR)$(PREFIX)/bin/
	sed 's|@BINDIR@|$(PREFIX)/bin|g' examples/shimd.service >$(DESTDIR)$(UNITDIR)/shimd.service
	@command -v systemctl >/dev/null 2>&1 && [ -z "$(DESTDIR)" ] && systemctl daemon-reload 2>/dev/null || true
	@echo "installed; start with: systemctl enable --now shimd"

# A tour: a local 3-node cluster that runs example services and loses a node.
demo: build
	./examples/demo.sh

bench: build
	$(GO) run -tags $(TAGS) ./test/bench $(BENCHFLAGS)

clean:
	rm -rf $(BIN) shim-data
