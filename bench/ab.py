#!/usr/bin/env python3
"""Interleaved A/B of our mod_invites against Prosody's own, per operation, in ONE Prosody.

bench/run.py measures ours and Prosody's own in separate servers, minutes apart; for
operations of tens of microseconds the machine drifts more between two servers than the two
implementations differ. Here one Prosody serves three VirtualHosts:

- `localhost`: our mod_invites (and bench/plugins/mod_invites_ab.lua, which drives the test);
- `stock.localhost`: Prosody's own mod_invites.lua, loaded under the name invites_stock
  (bench/plugins/mod_invites_stock.lua), on its own host and so its own store;
- `unlocked.localhost`: ours again with `invites_storage_lock = false` (today's unlocked
  path), when the build has that option; otherwise the column says n/a.

Every sample calls each implementation once, cycling through every order of them, at
N = 0, 100, 1,000, 10,000 and 100,000 pending account invites, on internal storage, SQLite
and PostgreSQL. Reported per operation and N: the median µs of each, and the ratios
ours/stock and locked/unlocked as the median of the per-round ratios with their min-max over
rounds. Also the listing (full pending_account_invites() walks, alternating) and the Lua
heap's peak above baseline while listing (a full collection every 1,000 rows).

    python3 bench/ab.py                       # full: N up to 100,000, internal, SQLite, PostgreSQL
    python3 bench/ab.py --quick               # N up to 1,000, fewer rounds
    python3 bench/ab.py --storage sql --ns 0,100,1000 --rounds 6

Writes bench/ab-results.md and bench/ab-results.csv (--out-dir), after each storage.
Speed is printed, never asserted; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "spec" / "integration"))
sys.path.insert(0, str(REPO / "spec" / "load"))
sys.path.insert(0, str(HERE))

import harness  # noqa: E402
import xmpp  # noqa: E402
import load  # noqa: E402  (snapshot_plugins, prosody_version)
from run import BenchServer, call, log, wait_disk_idle  # noqa: E402

NS_AB = "urn:prosody-invites:ab"
STOCK_HOST = "stock.localhost"
UNLOCKED_HOST = "unlocked.localhost"

# measure call -> metrics it yields, in table order
MEASURES = (
    ("create_delete", ("create_account", "delete_account_invite")),
    ("create_contact", ("create_contact",)),
    ("get_valid", ("get_valid",)),
    ("get_unknown", ("get_unknown",)),
    ("get_malformed", ("get_malformed",)),
    ("redeem", ("redeem",)),
)
LABELS = {
    "create_account": "create_account",
    "create_contact": "create_contact",
    "get_valid": "get (valid token)",
    "get_unknown": "get (unknown token)",
    "get_malformed": "get (over-long token)",
    "redeem": "redeem (get + :use())",
    "delete_account_invite": "delete_account_invite (revoke)",
    "list": "pending_account_invites() walk [ms]",
}
ORDER = ("create_account", "create_contact", "get_valid", "get_unknown", "get_malformed", "redeem", "delete_account_invite", "list")


def lock_option_in_build() -> bool:
    """Does the built mod_invites read invites_storage_lock (the lead's locked path)?"""
    for p in (harness.BUILD_PLUGINS / "mod_invites").glob("*.lua"):
        if "invites_storage_lock" in p.read_text(errors="replace"):
            return True
    return False


class ABServer(BenchServer):
    """One Prosody, three hosts: ours (localhost), Prosody's own (stock.localhost), ours without
    the storage lock (unlocked.localhost, optional). Each host only loads what it tests."""

    def __init__(self, storage: str, unlocked: bool, **kw):
        self.unlocked = unlocked
        opts = {"invites_ab_stock_host": STOCK_HOST}
        if unlocked:
            opts["invites_ab_unlocked_host"] = UNLOCKED_HOST
        super().__init__(storage, impl="ours", extra_modules=["invites_ab"], options=opts,
                         start_timeout=60.0, stop_timeout=60.0, **kw)

    def render_config(self) -> str:
        cfg = super().render_config()
        L = ["", f"VirtualHost {harness.lua_str(STOCK_HOST)}",
             '  modules_enabled = { "invites_stock" }']
        if self.unlocked:
            L += ["", f"VirtualHost {harness.lua_str(UNLOCKED_HOST)}",
                  '  modules_enabled = { "invites" }',
                  "  invites_storage_lock = false"]
        return cfg + "\n".join(L) + "\n"


async def ab(client, op: str, timeout: float = 600.0, **attrs) -> dict:
    return await call(client, NS_AB, "ab", op, timeout, **attrs)


# --------------------------------------------------------------------- statistics


def percentile(xs, p):
    s = sorted(xs)
    if not s:
        return math.nan
    k = (len(s) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def med(xs):
    return statistics.median(xs) if xs else math.nan


def ratio_stats(a_rounds: list[list[float]], b_rounds: list[list[float]]) -> tuple[float, float, float, int]:
    """Per-round ratio of medians a/b: (median, min, max, rounds)."""
    rs = [med(a) / med(b) for a, b in zip(a_rounds, b_rounds) if a and b and med(b) > 0]
    if not rs:
        return math.nan, math.nan, math.nan, 0
    return statistics.median(rs), min(rs), max(rs), len(rs)


# ---------------------------------------------------------------------- one storage


async def run_storage(storage: str, args, results: list[dict], memory: list[dict], notes: list[str]) -> None:
    unlocked = args.unlocked
    srv = ABServer(storage, unlocked, keep_dir=True)
    impls = ["ours", "stock"] + (["unlocked"] if unlocked else [])
    try:
        srv.start()
        srv.register_user("bench", "bench-password")
        client = await xmpp.login(srv.port, "bench@localhost", "bench-password", presence=False, timeout=30)
        info = await ab(client, "info")
        for name, i in info["impls"].items():
            log(f"  {name:8} on {i['host']}: {i.get('file') or i['path']} (storage {i['storage']}"
                + (f", invites_storage_lock={i.get('storage_lock')}" if name != "stock" else "") + ")")
        if not info["impls"]["ours"]["path"].startswith(str(harness.BUILD_PLUGINS)):
            raise RuntimeError(f"ours loaded from {info['impls']['ours']['path']}")

        # ---- our migration imports this host's invite_token store only: Prosody's own
        # invites on the stock host survive our module's start and stay unknown to ours.
        seeded = (await ab(client, "seed", n=5))["tokens"]
        await xmpp._shutdown(client)
        srv.restart()
        client = await xmpp.login(srv.port, "bench@localhost", "bench-password", presence=False, timeout=30)
        counts = await ab(client, "count")
        seen = await ab(client, "verify", tokens=json.dumps(seeded))
        ok = counts.get("stock") == 5 and counts.get("ours") == 0 and seen.get("stock") == 5 and seen.get("ours") == 0
        line = (f"migration isolation ({storage}): after a restart, stock host has {counts.get('stock')} of 5 seeded "
                f"invites, ours lists {counts.get('ours')} and finds {seen.get('ours')} of their tokens"
                + (f", unlocked finds {seen.get('unlocked')}" if unlocked else "") + (" [ok]" if ok else " [FAILED]"))
        log("  " + line)
        notes.append(line)
        if not ok:
            raise RuntimeError(line)
        await ab(client, "clear_stock", tokens=json.dumps(seeded))

        for n in args.ns:
            t0 = time.monotonic()
            fill_s = {k: 0.0 for k in impls}
            made = {k: 0 for k in impls}
            while True:
                r = await ab(client, "fill", n=n, budget=args.batch_seconds)
                for k in impls:
                    fill_s[k] += r["elapsed"].get(k, 0.0)
                    made[k] += r["created"].get(k, 0)
                if r["done"]:
                    break
                if time.monotonic() - t0 > args.fill_limit:
                    raise RuntimeError(f"fill to N={n} took over {args.fill_limit:.0f} s: {r['pending']}")
            if made["ours"]:
                log(f"  N={n:,}: filled in {time.monotonic() - t0:.0f} s ("
                    + ", ".join(f"{k} {made[k]:,} in {fill_s[k]:.1f} s" for k in impls) + ")")
            await asyncio.get_running_loop().run_in_executor(None, wait_disk_idle)

            # ---- listing, alternating (first: before the measurements leave records)
            lst = await ab(client, "list", reps=args.list_reps, budget=args.op_budget)
            rounds_of: dict[tuple[str, str], list[list[float]]] = {}
            for k in impls:
                rounds_of[(k, "list")] = [[x] for x in lst[k]["ms"]]
                if lst[k]["items"] != n:
                    log(f"    WARNING: {k} listed {lst[k]['items']} invites, expected {n}")

            # ---- per-invite operations: rounds, each op once per round (op order rotating)
            for rnd in range(args.rounds):
                order = MEASURES[rnd % len(MEASURES):] + MEASURES[:rnd % len(MEASURES)]
                for what, metrics in order:
                    r = await ab(client, "measure", what=what, samples=args.samples,
                                 budget=args.op_budget / args.rounds, offset=rnd)
                    for k in impls:
                        for m in metrics:
                            rounds_of.setdefault((k, m), []).append(r["samples"][k].get(m, []))

            for m in ORDER:
                row = {"storage": storage, "n": n, "metric": m}
                for k in impls:
                    rs = rounds_of.get((k, m), [])
                    allx = [x for rr in rs for x in rr]
                    row[f"{k}_median"] = med(allx)
                    row[f"{k}_p90"] = percentile(allx, 90)
                    row[f"{k}_samples"] = len(allx)
                row["ours_stock"] = ratio_stats(rounds_of.get(("ours", m), []), rounds_of.get(("stock", m), []))
                row["locked_unlocked"] = (ratio_stats(rounds_of.get(("ours", m), []), rounds_of.get(("unlocked", m), []))
                                          if unlocked else (math.nan, math.nan, math.nan, 0))
                results.append(row)
            log(f"  N={n:,}: " + "  ".join(
                f"{LABELS[r['metric']].split(' ')[0]} {r['ours_median']:.0f}/{r['stock_median']:.0f}"
                for r in results if r["storage"] == storage and r["n"] == n and r["metric"] != "list")
                + "  (ours/stock µs)")

            # ---- listing memory (a full collection every 1,000 rows)
            if n >= args.mem_min_n:
                mem = await ab(client, "listmem", impls=json.dumps(["ours", "stock"]))
                for what, v in mem.items():
                    memory.append({"storage": storage, "n": n, "what": what, **v})
                    log(f"    Lua heap peak while listing, {what}: {v['peak_kb'] / 1024:.2f} MiB "
                        f"({v['rows']} rows, {v['samples']} samples)")

            # ---- ours keeps used/revoked records (invite_retention); drop them so the next N
            # starts from exactly N records, as Prosody's own (which deletes at once). Untimed.
            await ab(client, "prune")
            write_outputs(args, results, memory, notes, partial=True)
        await xmpp._shutdown(client)
        err = srv.err_text().strip()
        if err:
            log(f"  prosody.err:\n{err[-2000:]}")
    except BaseException:
        try:
            print(srv.tail(30), file=sys.stderr)
        except Exception:
            pass
        raise
    finally:
        await xmpp.close_all()
        srv.cleanup()
        if not args.keep:
            shutil.rmtree(srv.dir, ignore_errors=True)


# --------------------------------------------------------------------------- output


def fnum(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def fratio(t) -> tuple[str, str]:
    r, lo, hi, k = t
    if not k:
        return "—", "—"
    def f(x):
        return f"{x:.2f}" if x >= 0.095 else f"{x:.2g}"
    return f(r), f"{f(lo)}–{f(hi)}"


def table_rows(results: list[dict], unlocked: bool) -> list[list[str]]:
    head = ["storage", "N", "operation", "ours µs", "stock µs", "ours/stock", "spread (min–max)"]
    if unlocked:
        head += ["unlocked µs", "locked/unlocked", "spread (min–max)"]
    else:
        head += ["locked/unlocked"]
    rows = [head]
    for r in results:
        os_, sp = fratio(r["ours_stock"])
        row = [r["storage"], f"{r['n']:,}", LABELS[r["metric"]], fnum(r["ours_median"]), fnum(r["stock_median"]), os_, sp]
        if unlocked:
            lu, lsp = fratio(r["locked_unlocked"])
            row += [fnum(r.get("unlocked_median", math.nan)), lu, lsp]
        else:
            row += ["n/a"]
        rows.append(row)
    return rows


def render_text(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out, prev = [], None
    for j, r in enumerate(rows):
        if j > 1 and (r[0], r[1]) != prev:
            out.append("")
        prev = (r[0], r[1])
        out.append("  ".join(c.ljust(w) if i in (0, 2) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def memory_rows(memory: list[dict]) -> list[list[str]]:
    rows = [["storage", "N", "listing", "Lua heap peak − baseline", "rows", "samples"]]
    for m in memory:
        rows.append([m["storage"], f"{m['n']:,}", m["what"], f"{m['peak_kb'] / 1024:.2f} MiB", str(m["rows"]), str(m["samples"])])
    return rows


def md_table(rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"] + \
        ["| " + " | ".join(r) + " |" for r in rows[1:]]


def write_outputs(args, results, memory, notes, partial: bool = False) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with (args.out_dir / "ab-results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        impls = ["ours", "stock", "unlocked"]
        w.writerow(["storage", "n", "metric", "unit"]
                   + [f"{k}_{s}" for k in impls for s in ("median", "p90", "samples")]
                   + ["ours_stock_median", "ours_stock_min", "ours_stock_max", "rounds",
                      "locked_unlocked_median", "locked_unlocked_min", "locked_unlocked_max"])
        for r in results:
            vals = []
            for k in impls:
                for s in ("median", "p90"):
                    v = r.get(f"{k}_{s}", math.nan)
                    vals.append("" if math.isnan(v) else f"{v:.3f}")
                vals.append(r.get(f"{k}_samples", ""))
            os_, lu = r["ours_stock"], r["locked_unlocked"]
            w.writerow([r["storage"], r["n"], r["metric"], "ms" if r["metric"] == "list" else "us"] + vals
                       + ["" if math.isnan(x) else f"{x:.3f}" for x in os_[:3]] + [os_[3]]
                       + ["" if math.isnan(x) else f"{x:.3f}" for x in lu[:3]])
        # Memory rows: the peak (KiB) as the median and the rows walked as the samples of the
        # implementation measured; metric heap_peak_pending or heap_peak_list.
        for m in memory:
            impl, _, listing = m["what"].partition(" ")
            metric = "heap_peak_list" if listing == "list" else "heap_peak_pending"
            cells = []
            for k in impls:
                cells += [f"{m['peak_kb']:.1f}", "", m["rows"]] if k == impl else ["", "", ""]
            w.writerow([m["storage"], m["n"], metric, "KiB"] + cells + [""] * 7)
    md = ["# Interleaved A/B: ours vs Prosody's own mod_invites, one Prosody"
          + (" (partial)" if partial else ""), "",
          f"`python3 bench/ab.py {' '.join(sys.argv[1:])}` on Prosody {args.version}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.rounds} rounds × up to {args.samples} samples per operation, "
          "implementations alternating call by call. µs: median of all samples; ratios: median of the per-round "
          "ratios of medians, spread = min–max over rounds. Below 1: ours is faster. `locked/unlocked`: ours "
          "against ours with `invites_storage_lock = false` (target ≤ 1.3).", ""]
    md += md_table(table_rows(results, args.unlocked))
    if memory:
        md += ["", "Lua heap peak above baseline while listing (full collection every 1,000 rows; our `list` command "
               "by a count hook calibrated to about 1,000 rows). Target (issue 16): < 2 MiB at 100,000 on SQL.", ""]
        md += md_table(memory_rows(memory))
    if notes:
        md += [""] + [f"- {n}" for n in notes]
    (args.out_dir / "ab-results.md").write_text("\n".join(md) + "\n")


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 0, 100, 1,000; 4 rounds of 10 samples")
    ap.add_argument("--ns", default=None, help="comma-separated N (default 0,100,1000,10000,100000)")
    ap.add_argument("--storage", default="internal,sql,pgsql",
                    help="internal,sql,pgsql (pgsql is skipped with a note when PostgreSQL is not installed)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per N (default 8; --quick 4)")
    ap.add_argument("--samples", type=int, default=None, help="samples per operation and round (default 25; --quick 10)")
    ap.add_argument("--op-budget", type=float, default=None,
                    help="seconds per operation and N, split over the rounds (default 60; --quick 10); "
                         "each round takes at least one sample of each implementation")
    ap.add_argument("--list-reps", type=int, default=3, help="full listings per implementation and N")
    ap.add_argument("--mem-min-n", type=int, default=1000, help="measure listing memory from this N on")
    ap.add_argument("--batch-seconds", type=float, default=8.0, help="server-side time of one fill request")
    ap.add_argument("--fill-limit", type=float, default=1800.0, help="seconds a fill to one N may take")
    ap.add_argument("--no-unlocked", action="store_true", help="leave out the invites_storage_lock = false host")
    ap.add_argument("--out-dir", type=Path, default=HERE)
    ap.add_argument("--keep", action="store_true", help="keep the servers' temp dirs")
    ap.add_argument("--no-snapshot", action="store_true", help="load build/plugins itself, not a private copy")
    args = ap.parse_args()
    q = args.quick
    if args.ns:
        args.ns = sorted({int(x.replace("_", "")) for x in args.ns.split(",")})
    else:
        args.ns = [0, 100, 1000] if q else [0, 100, 1000, 10_000, 100_000]
    args.rounds = args.rounds or (4 if q else 8)
    args.samples = args.samples or (10 if q else 25)
    args.op_budget = args.op_budget or (10.0 if q else 60.0)
    if harness.built_plugin_missing():
        print(f"build the plugins first (make build): missing {harness.built_plugin_missing()}", file=sys.stderr)
        return 2
    plugins = None if args.no_snapshot else load.snapshot_plugins()
    has_lock = lock_option_in_build()
    args.unlocked = has_lock and not args.no_unlocked
    args.version = load.prosody_version()
    notes: list[str] = []
    if not has_lock:
        notes.append("locked/unlocked: n/a, this build has no invites_storage_lock option")
    log(f"Prosody {args.version}; N = {', '.join(f'{n:,}' for n in args.ns)}; {args.rounds} rounds × {args.samples} "
        f"samples; unlocked host: {'yes' if args.unlocked else 'no (option not in this build)' if not has_lock else 'no'}")
    results: list[dict] = []
    memory: list[dict] = []
    t_all = time.monotonic()
    try:
        for storage in [s.strip() for s in args.storage.split(",") if s.strip()]:
            log(f"== {storage}")
            try:
                asyncio.run(run_storage(storage, args, results, memory, notes))
            except harness.PgsqlUnavailable as e:
                notes.append(f"{storage}: skipped ({str(e).splitlines()[0]})")
                log(f"  skipped: {e}")
            write_outputs(args, results, memory, notes, partial=True)
    finally:
        harness.stop_shared_pgsql()
        if plugins is not None:
            shutil.rmtree(plugins.parent, ignore_errors=True)
    write_outputs(args, results, memory, notes)
    print()
    print(render_text(table_rows(results, args.unlocked)))
    if memory:
        print()
        print(render_text(memory_rows(memory)))
    for n in notes:
        print(f"- {n}")
    print(f"\nwall time {(time.monotonic() - t_all) / 60:.1f} min; wrote {args.out_dir / 'ab-results.md'} and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
