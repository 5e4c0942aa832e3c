# prosody-invites: build the Rust core as a Lua module and assemble the plugin folder.
#
#   make run                      install what is missing, build, start a demo Prosody
#   make test                     every test layer (Rust, busted, integration)
#   make build [LUA_VERSION=5.4]  build/plugins/, ready for Prosody's plugin_paths
#   make install PLUGIN_DIR=...   copy build/plugins/* there

LUA_VERSION ?= 5.4
PLUGIN_DIR ?=
BUILD := build
PLUGINS := $(BUILD)/plugins

LUA_FEATURE_5.1 := lua51
LUA_FEATURE_5.2 := lua52
LUA_FEATURE_5.3 := lua53
LUA_FEATURE_5.4 := lua54
LUA_FEATURE_jit := luajit
LUA_FEATURE := $(LUA_FEATURE_$(LUA_VERSION))
ifeq ($(LUA_FEATURE),)
$(error LUA_VERSION must be one of 5.1 5.2 5.3 5.4 jit, not '$(LUA_VERSION)')
endif

TARGET_DIR ?= target
CORE := $(TARGET_DIR)/release/libprosody_invites.so

# Prosody 13 for the second integration run, extracted under build/ (see .ci/prosody13).
PROSODY13_VERSION := 13.0.1-1~bpo12+1
PROSODY13_MODULES_VERSION := 0.0~hg20250402.f315edc39f3d+dfsg-1~bpo12+1
PROSODY13 := $(BUILD)/prosody13
# Made last by .ci/prosody13; named after both versions, so changing one extracts again.
PROSODY13_READY := $(PROSODY13)/ready-$(subst ~,_,$(PROSODY13_VERSION))-$(subst ~,_,$(PROSODY13_MODULES_VERSION))

# Prosody 13.0.6 (trixie-backports) and the newest Prosody of Debian testing (forky), each with
# its suite's prosody-modules, in Debian roots made by .ci/prosody-root (debootstrap; run
# through chroot by DIR/bin/prosody and DIR/bin/prosodyctl). The plugin folder built here
# loads in them as it is (their Lua 5.4 and newer glibc take a module built on Debian 12).
PROSODY1306_VERSION := 13.0.6-1~bpo13+1
PROSODY1306_MODULES_VERSION := 0.0~hg20260723.0971c99bfbc9+dfsg-1~bpo13+1
PROSODY1306 := $(BUILD)/root-trixie
PROSODY1306_READY := $(PROSODY1306)/ready-$(subst ~,_,$(PROSODY1306_VERSION))-$(subst ~,_,$(PROSODY1306_MODULES_VERSION))
PROSODY_NEWEST_VERSION := 13.0.7-1
PROSODY_NEWEST_MODULES_VERSION := 0.0~hg20260723.0971c99bfbc9+dfsg-1
PROSODY_NEWEST := $(BUILD)/root-forky
# With LuaSQLite3, which Prosody 13 then uses for SQLite (util.sqlite3); the other 13s use LuaDBI.
PROSODY_NEWEST_EXTRA := lua-lsqlite3
PROSODY_NEWEST_READY := $(PROSODY_NEWEST)/ready-$(subst ~,_,$(PROSODY_NEWEST_VERSION))-$(subst ~,_,$(PROSODY_NEWEST_MODULES_VERSION))-$(PROSODY_NEWEST_EXTRA)

# Python for the tests and tools (see .ci/python).
PYTHON := sh .ci/python

# Lua versions the boundary specs run on (each with its own build of the core).
LUA_MATRIX := 5.1 5.2 5.3 5.4 jit

.PHONY: all build install deps test test-rust test-busted test-lua-versions test-integration test-prosody13 test-prosody1306 test-prosody-newest bench bench-quick bench-ab bench-registration bench-tree bench-core lint run clean load load-prosody13 fuzz fuzz-smoke

all: build

build:
	cargo build --release --target-dir $(TARGET_DIR) --features "$(LUA_FEATURE) module"
	mkdir -p $(PLUGINS)/mod_invites $(PLUGINS)/mod_invites_register $(PLUGINS)/mod_invites_adhoc
	cp lua/mod_invites/mod_invites.lua lua/mod_invites/*.lib.lua $(PLUGINS)/mod_invites/
	cp lua/mod_invites_register/mod_invites_register.lua $(PLUGINS)/mod_invites_register/
	cp lua/mod_invites_adhoc/mod_invites_adhoc.lua $(PLUGINS)/mod_invites_adhoc/
	# install writes a new file: overwriting a loaded shared library in place crashes the
	# Prosody that has it mapped (a live server during an upgrade, a test server here).
	install -m 0755 $(CORE) $(PLUGINS)/mod_invites/prosody_invites.so

install: build
	@test -n "$(PLUGIN_DIR)" || { echo "usage: make install PLUGIN_DIR=/path/in/plugin_paths"; exit 2; }
	mkdir -p "$(PLUGIN_DIR)"
	cp -R --remove-destination $(PLUGINS)/. "$(PLUGIN_DIR)/"

deps:
	sh .ci/deps

run: deps build
	$(PYTHON) tools/devserver.py

# The integration suite in full on every Prosody version we support: 0.12.3 (the host's,
# Debian 12), 13.0.1 (trixie, bookworm-backports), 13.0.6 (trixie-backports) and the newest
# (Debian testing).
test: deps build test-rust test-busted test-lua-versions test-integration test-prosody13 test-prosody1306 test-prosody-newest

test-rust:
	cargo test --features lua54

test-busted:
	lua5.4 /usr/bin/busted --lua=lua5.4 spec

# The native module's Lua boundary (spec/core_spec.lua) on every Lua in LUA_MATRIX.
test-lua-versions:
	set -e; for v in $(LUA_MATRIX); do \
		lua=lua$$v; [ "$$v" = jit ] && lua=luajit; \
		$(MAKE) --no-print-directory build LUA_VERSION=$$v BUILD=$(BUILD)/lua$$v TARGET_DIR=target/lua$$v >/dev/null; \
		echo "busted on $$lua:"; \
		INVITES_PLUGINS_DIR=$(CURDIR)/$(BUILD)/lua$$v/plugins $$lua /usr/bin/busted --lua=$$lua spec/core_spec.lua; \
	done

test-integration: deps build
	$(PYTHON) -m pytest -q spec/integration

$(PROSODY13_READY):
	sh .ci/prosody13 $(PROSODY13) "$(PROSODY13_VERSION)" "$(PROSODY13_MODULES_VERSION)"
	touch $@

test-prosody13: deps build $(PROSODY13_READY)
	PROSODY_BIN=$(CURDIR)/$(PROSODY13)/bin/prosody PROSODYCTL_BIN=$(CURDIR)/$(PROSODY13)/bin/prosodyctl \
		$(PYTHON) -m pytest -q spec/integration

$(PROSODY1306_READY):
	rm -f $(PROSODY1306)/ready-*
	sh .ci/prosody-root $(PROSODY1306) trixie "$(PROSODY1306_VERSION)" "$(PROSODY1306_MODULES_VERSION)"
	touch $@

test-prosody1306: deps build $(PROSODY1306_READY)
	PROSODY_BIN=$(CURDIR)/$(PROSODY1306)/bin/prosody PROSODYCTL_BIN=$(CURDIR)/$(PROSODY1306)/bin/prosodyctl \
		$(PYTHON) -m pytest -q spec/integration

$(PROSODY_NEWEST_READY):
	rm -f $(PROSODY_NEWEST)/ready-*
	sh .ci/prosody-root $(PROSODY_NEWEST) forky "$(PROSODY_NEWEST_VERSION)" "$(PROSODY_NEWEST_MODULES_VERSION)" "$(PROSODY_NEWEST_EXTRA)"
	touch $@

test-prosody-newest: deps build $(PROSODY_NEWEST_READY)
	PROSODY_BIN=$(CURDIR)/$(PROSODY_NEWEST)/bin/prosody PROSODYCTL_BIN=$(CURDIR)/$(PROSODY_NEWEST)/bin/prosodyctl \
		$(PYTHON) -m pytest -q spec/integration

# Every benchmark of bench/README.md: ours vs Prosody's own in separate servers (run.py, N up to
# 100,000, about 40 min), the same interleaved per operation in one server with the locked path
# against the unlocked one (ab.py, about 30 min), and invite vs open registration (registration.py).
bench: deps build
	$(PYTHON) bench/run.py
	$(PYTHON) bench/ab.py
	$(PYTHON) bench/registration.py

# The same, smaller (about 5 min).
bench-quick: deps build
	$(PYTHON) bench/run.py --quick
	$(PYTHON) bench/ab.py --quick
	$(PYTHON) bench/registration.py --quick

# Per-operation A/B in one Prosody: ours, Prosody's own, ours with invites_storage_lock = false;
# internal, SQLite, PostgreSQL (skipped when not installed); listing memory. BENCH_ARGS=--quick etc.
BENCH_ARGS ?=
bench-ab: deps build
	$(PYTHON) bench/ab.py $(BENCH_ARGS)

# Registrations/s with an invite against open registration, interleaved bursts in one Prosody,
# ours and Prosody's own modules side by side (about 8 min a storage).
bench-registration: deps build
	$(PYTHON) bench/registration.py $(BENCH_ARGS)

# `prosodyctl mod_invites tree` on 0 to 100,000 accounts: time and peak memory (about 2 min).
bench-tree: deps build
	$(PYTHON) bench/tree.py

# CPU per operation of the Rust core alone (in-memory storage).
bench-core:
	cargo bench --features lua54 --bench core_bench

lint:
	cargo fmt --check
	cargo clippy --features lua54 --all-targets -- -D warnings
	luacheck -q lua spec bench

clean:
	rm -rf $(BUILD) fuzz/target fuzz/artifacts
	cargo clean

# Load: 200 clients race for 20 invites x 5 uses plus 50 invalid tokens (spec/load/load.py);
# prints registrations/s and latency, fails on any broken invariant. LOAD_ARGS to resize;
# LOAD_ARGS="--processes 1,2" also runs two Prosody processes on one storage, side by side.
LOAD_ARGS ?=
load: deps build
	$(PYTHON) spec/load/load.py $(LOAD_ARGS)

load-prosody13: deps build $(PROSODY13_READY)
	PROSODY_BIN=$(CURDIR)/$(PROSODY13)/bin/prosody PROSODYCTL_BIN=$(CURDIR)/$(PROSODY13)/bin/prosodyctl \
		$(PYTHON) spec/load/load.py $(LOAD_ARGS)

# Fuzzing (fuzz/run.sh; installs cargo-fuzz if missing): each target for FUZZ_SECONDS.
FUZZ_SECONDS ?= 60
fuzz:
	sh fuzz/run.sh $(FUZZ_SECONDS)

# A short run of each fuzz target, for CI.
fuzz-smoke:
	sh fuzz/run.sh 15
