#!/bin/sh
# Runs each fuzz target for a bounded time and says what it found.
#   usage: fuzz/run.sh [SECONDS [TARGET...]]   (default: 60 seconds, every target)
#
# libFuzzer grows each target's corpus in build/fuzz-corpus/TARGET, starting from the
# committed seeds in fuzz/corpus/TARGET (which it only reads); full output goes to
# build/fuzz-logs/TARGET.log and crashing inputs to fuzz/artifacts/TARGET/.
# Exits non-zero if any target crashed.
set -eu
cd "$(dirname "$0")/.."

seconds=${1:-60}
[ $# -gt 0 ] && shift
targets=${*:-token record_decode duration lua_values}

if ! command -v cargo-fuzz >/dev/null 2>&1; then
	echo "Installing cargo-fuzz"
	cargo install cargo-fuzz --locked
fi

# cargo fuzz passes -Z flags (sanitizer, coverage); RUSTC_BOOTSTRAP lets the stable
# toolchain accept them. AddressSanitizer (cargo fuzz's default) also watches the C side:
# the system Lua and mlua's unsafe code. FUZZ_SANITIZER=none runs about five times faster.
RUSTC_BOOTSTRAP=1
export RUSTC_BOOTSTRAP
sanitizer=${FUZZ_SANITIZER:-address}

mkdir -p build/fuzz-logs
for t in $targets; do
	cargo fuzz build --sanitizer "$sanitizer" "$t"
done

crashed=""
summary=""
for t in $targets; do
	corpus=build/fuzz-corpus/$t
	log=build/fuzz-logs/$t.log
	mkdir -p "$corpus"
	echo "fuzzing $t for ${seconds}s"
	start=$(date +%s)
	if cargo fuzz run --sanitizer "$sanitizer" "$t" "$corpus" "fuzz/corpus/$t" -- \
		-max_total_time="$seconds" -timeout=30 -print_final_stats=1 >"$log" 2>&1; then
		outcome="no crash"
	else
		outcome="CRASH (input in fuzz/artifacts/$t/, log in $log)"
		crashed="$crashed $t"
		tail -n 40 "$log"
	fi
	wall=$(($(date +%s) - start))
	grep '^Done [0-9]* runs' "$log" || true
	runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
	persec=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
	# libFuzzer's last status line: "#N DONE cov: C ft: F corp: INPUTS/SIZE ...".
	corp=$(sed -n 's/^#[0-9].* corp: \([0-9]*\/[0-9]*[a-zA-Z]*\).*/\1/p' "$log" | tail -n 1)
	summary="$summary
$t: ${runs:-?} runs in ${wall}s wall (${persec:-?}/s), corpus ${corp:-?}, $outcome"
done

echo "fuzz summary:$summary"
if [ -n "$crashed" ]; then
	echo "crashed:$crashed" >&2
	exit 1
fi
