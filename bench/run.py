#!/usr/bin/env python3
"""Benchmark our mod_invites against Prosody's own, inside a real Prosody on loopback.

    python3 bench/run.py            # full run: N = 0, 1,000, 10,000, 100,000
    python3 bench/run.py --quick    # smoke run: N up to 10,000, fewer samples

See bench/README.md for what is measured and what each column means.
Writes bench/results.csv and bench/results.md (override with --out-dir).
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
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "spec" / "integration"))

import harness  # noqa: E402
import xmpp  # noqa: E402

BENCH_PLUGINS = HERE / "plugins"
NS_BENCH = "urn:prosody-invites:bench"

IMPLS = ("ours", "stock")
STORAGES = ("internal", "sql")

# Per-token operations measured inside the server (microseconds per op).
OPS = (
    "create_account",
    "get_valid",
    "get_unknown",
    "redeem",
    "delete_account_invite",
    "create_contact",
)
# measure call -> op names it yields
MEASURES = (
    ("create_delete", ("create_account", "delete_account_invite")),
    ("get_valid", ("get_valid",)),
    ("get_unknown", ("get_unknown",)),
    ("redeem", ("redeem",)),
    ("create_contact", ("create_contact",)),
)

# metric -> (label, unit, how a value is shown)
METRICS = {
    "create_account": ("create_account", "us"),
    "get_valid": ("get (valid token)", "us"),
    "get_unknown": ("get (unknown token)", "us"),
    "redeem": ("redeem (get + :use())", "us"),
    "delete_account_invite": ("delete_account_invite", "us"),
    "create_contact": ("create_contact", "us"),
    "list_total": ("pending_account_invites() full iteration", "ms"),
    "list_per_item": ("  ... per listed invite", "us"),
    "list_mem": ("  ... Lua memory peak during iteration", "KiB"),
    "e2e_register": ("e2e registration (preauth + register, c2s)", "ms"),
    "e2e_preauth": ("  ... preauth iq round trip", "ms"),
    "e2e_iq_register": ("  ... jabber:iq:register round trip", "ms"),
    "fill_per_invite": ("fill: create_account per invite (mean)", "us"),
    "list_rss": ("  ... process RSS growth during iteration", "MiB"),
    "fs_probe": ("env: create an empty file (reference)", "us"),
    "rss_peak": ("Prosody peak RSS so far (VmHWM)", "MiB"),
    "lua_mem": ("Prosody Lua heap after step", "MiB"),
    "disk_bytes": ("bytes on disk (apparent size)", "MB"),
    "disk_alloc": ("bytes on disk (allocated blocks)", "MB"),
}
TABLE_ORDER = (
    "create_account", "get_valid", "get_unknown", "redeem", "delete_account_invite", "create_contact",
    "list_total", "list_per_item", "list_mem", "list_rss", "e2e_register", "e2e_preauth", "e2e_iq_register",
    "fill_per_invite", "fs_probe",
    "rss_peak", "lua_mem", "disk_bytes", "disk_alloc",
)
PER_TOKEN = set(OPS)  # targets: ours at max N within 2x of N=0, etc.


LEFTOVER_DIRS: list[Path] = []


def _disk_busy_ms() -> int:
    """Milliseconds spent doing I/O so far, summed over the whole disks (/proc/diskstats)."""
    total = 0
    try:
        for line in Path("/proc/diskstats").read_text().splitlines():
            f = line.split()
            name = f[2]
            if name.startswith(("loop", "ram", "zram", "dm-", "sr")) or name[-1].isdigit() and not name.startswith("nvme"):
                continue  # partitions and virtual devices: their time is counted in the disk's
            if name.startswith("nvme") and "p" in name[4:]:
                continue
            total += int(f[12])  # field 10: time spent doing I/Os (ms)
    except (OSError, IndexError, ValueError):
        pass
    return total


def wait_disk_idle(quiet: float = 2.0, max_wait: float = 90.0) -> float:
    """sync, then wait until the disk has been (nearly) idle for `quiet` seconds.

    On this kind of VM, deleting many files (online discard) or writing back a large fill
    keeps the disk busy for seconds afterwards and slows down file creation several-fold;
    measuring in that state would time the previous step's housekeeping, not the operation.
    Returns the seconds waited."""
    t0 = time.monotonic()
    os.sync()
    last, quiet_since = _disk_busy_ms(), time.monotonic()
    while time.monotonic() - t0 < max_wait:
        time.sleep(0.25)
        now_busy, now = _disk_busy_ms(), time.monotonic()
        if now_busy - last > 25:  # more than 10% busy in this interval
            quiet_since = now
        last = now_busy
        if now - quiet_since >= quiet:
            break
    return time.monotonic() - t0


_probe_dir: Path | None = None
_probe_count = 0


def file_create_us(n: int = 50) -> float:
    """Median time to create an empty file in the temp dir's filesystem (microseconds).
    The files are kept until the end of the run: deleting them would itself slow creation."""
    global _probe_dir, _probe_count
    if _probe_dir is None:
        _probe_dir = Path(tempfile.mkdtemp(prefix="bench-fsprobe-"))
        LEFTOVER_DIRS.append(_probe_dir)
    ts = []
    for _ in range(n):
        _probe_count += 1
        t0 = time.perf_counter()
        os.close(os.open(_probe_dir / f"p{_probe_count}", os.O_CREAT | os.O_WRONLY, 0o644))
        ts.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(ts)


def wait_fs_fast(threshold_us: float, max_wait: float = 300.0) -> tuple[float, float]:
    """Wait until creating a file is fast again (three probes in a row under threshold_us).

    Seen on this VM: after heavy file I/O (e.g. deleting the previous run's 100k-file data
    dir), creating a file costs ~1 ms instead of 0.02-0.1 ms for a minute or more, without
    visible disk activity (it looks like a throttled virtual disk catching up). Measuring
    then would time the VM, not the code. Returns (seconds waited, last probe us)."""
    t0 = time.monotonic()
    good = 0
    probe = file_create_us()
    while time.monotonic() - t0 < max_wait:
        good = good + 1 if probe < threshold_us else 0
        if good >= 3:
            break
        if not good:
            time.sleep(2)
        probe = file_create_us()
    return time.monotonic() - t0, probe


def settle(args=None) -> None:
    """Before a configuration: flush dirty pages, wait for the disk to go quiet and for file
    creation to be fast again (untimed)."""
    waited = wait_disk_idle()
    threshold = getattr(args, "fs_settle_us", 250.0) if args else 250.0
    fs_waited, probe = wait_fs_fast(threshold) if threshold > 0 else (0.0, math.nan)
    log(f"  (disk idle after {waited:.1f} s; file creation {probe:.0f} us after {fs_waited:.0f} s)")


class BenchServer(harness.ProsodyServer):
    """ProsodyServer with bench/plugins on plugin_paths and log level info.

    The harness logs at debug to a file; a production server runs at info, and per-op
    debug lines would add file I/O to the timings, so the bench raises the level.
    """

    @property
    def plugin_paths(self) -> list[str]:
        return super().plugin_paths + [str(BENCH_PLUGINS)]

    def render_config(self) -> str:
        cfg = super().render_config()
        debug = '{ levels = { min = "debug" }, to = "file"'
        assert debug in cfg, "harness log config changed; update BenchServer.render_config"
        return cfg.replace(debug, '{ levels = { min = "info" }, to = "file"')


# ----------------------------------------------------------------- statistics


def percentile(xs: list[float], p: float) -> float:
    """Linear-interpolated percentile (p in 0..100)."""
    s = sorted(xs)
    if not s:
        return math.nan
    k = (len(s) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class Stat:
    median: float
    p90: float
    mean: float
    min: float
    max: float
    n: int
    note: str = ""

    @classmethod
    def of(cls, xs: list[float], note: str = "") -> "Stat":
        if not xs:
            return cls(math.nan, math.nan, math.nan, math.nan, math.nan, 0, note)
        return cls(statistics.median(xs), percentile(xs, 90), statistics.fmean(xs), min(xs), max(xs), len(xs), note)

    @classmethod
    def single(cls, x: float, note: str = "") -> "Stat":
        return cls(x, math.nan, x, x, x, 1, note)


@dataclass
class Config:
    impl: str
    storage: str
    results: dict = field(default_factory=dict)  # n -> {metric: Stat}
    stopped: str = ""  # why the N series ended early ("" when it did not)
    info: dict = field(default_factory=dict)
    wall: float = 0.0


# -------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


async def call(client, xmlns: str, element: str, op: str, timeout: float, **attrs) -> dict:
    """One request to a benchmark plugin (bench/plugins/bench_iq.lib.lua): its JSON result."""
    iq = client.Iq()
    iq["type"] = "set"
    iq["to"] = client.boundjid.domain
    iq.append(xmpp._el(f"{{{xmlns}}}{element}", {"op": op, **{k: str(v) for k, v in attrs.items()}}))
    out = await xmpp._send_iq(client, iq, timeout)
    if not out.ok:
        raise RuntimeError(f"{element} op={op} {attrs}: {out!r}")
    res = ET.fromstring(out.raw).find(f"{{{xmlns}}}result")
    return json.loads(res.text or "{}")


async def bench(client, op: str, timeout: float = 120.0, **attrs) -> dict:
    return await call(client, NS_BENCH, "bench", op, timeout, **attrs)


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux: echo 5 > /proc/PID/clear_refs),
    so the next VmHWM read is the peak of what ran in between."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def proc_status(pid: int) -> dict:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS"):
                out[k] = int(v.split()[0])  # KiB
    except FileNotFoundError:
        pass
    return out


def disk_usage(srv: harness.ProsodyServer) -> tuple[int, int, int]:
    """(apparent bytes, allocated bytes, file count) of the data dir + SQLite files."""
    apparent = alloc = count = 0
    for p in srv.data_files():
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        apparent += st.st_size
        alloc += st.st_blocks * 512
        count += 1
    return apparent, alloc, count


async def e2e_registrations(srv, client, n: int, tag: str, timeout: float) -> tuple[dict, int]:
    """n registrations, each on a fresh unauthenticated stream: preauth iq + jabber:iq:register.
    Returns wall-clock ms per registration (connect excluded) and the number that succeeded."""
    toks = (await bench(client, "tokens", timeout=timeout, n=n))["tokens"]
    times = {"e2e_register": [], "e2e_preauth": [], "e2e_iq_register": []}
    ok = 0
    for i, token in enumerate(toks):
        s = await xmpp.UnauthedSession.open(srv.port, timeout=timeout)
        try:
            t0 = time.perf_counter()
            pre = await s.preauth(token)
            tm = time.perf_counter()
            reg = await s.register(f"e2e{tag}u{i}", "e2e-password-123")
            t1 = time.perf_counter()
        finally:
            await s.close()
        if pre.ok and reg.ok:
            ok += 1
            times["e2e_register"].append((t1 - t0) * 1000.0)
            times["e2e_preauth"].append((tm - t0) * 1000.0)
            times["e2e_iq_register"].append((t1 - tm) * 1000.0)
        else:
            log(f"    e2e registration {i} failed: preauth={pre!r} register={reg!r}")
    # every successful registration spent one of these invites
    await bench(client, "adjust", delta=-ok)
    return times, ok


# ------------------------------------------------------------------ one config


async def run_config(cfg: Config, args) -> None:
    t_start = time.monotonic()
    srv = BenchServer(
        cfg.storage,
        impl=cfg.impl,
        extra_modules=["invites_bench"],
        keep_dir=True,  # removed at the end of the run: deleting 100k files now would slow the next config
        start_timeout=60.0,
        stop_timeout=60.0,
    )
    try:
        srv.start()
        srv.register_user("bench", "bench-password")
        client = await xmpp.login(srv.port, "bench@localhost", "bench-password", presence=False, timeout=30)
        info = await bench(client, "info")
        cfg.info = info
        log(f"  loaded mod_invites from {info['invites']} ({info['clock']}, resolution {info['clock_resolution_us']:.3f} us)")
        if cfg.impl == "ours" and not info["invites"].startswith(str(harness.BUILD_PLUGINS)):
            raise RuntimeError(f"ours: mod_invites loaded from {info['invites']}")
        if cfg.impl == "stock" and not info["invites"].startswith("/usr/lib/prosody/modules"):
            raise RuntimeError(f"stock: mod_invites loaded from {info['invites']}")
        pid = srv.proc.pid

        prev_n, prev_create = None, None
        peak_kb = proc_status(pid).get("VmHWM", 0)  # VmHWM is reset per phase: keep the running max
        for step, n in enumerate(args.ns):
            # ---- fill, unless the estimate says it will take too long
            pending = (await bench(client, "info"))["pending"]
            to_create = n - pending
            remaining = args.deadline - time.monotonic()
            limit = min(args.step_limit, max(remaining, 0.0))
            why = (f"limit {args.step_limit/60:.0f} min per step" if limit == args.step_limit
                   else f"{remaining/60:.0f} min left of the {args.budget:.0f}-min run budget")
            if to_create > 0 and prev_create is not None:
                # worst case: create cost grows linearly with N (true for the stock internal
                # store); from N=0 there is no slope to go by, so assume a constant cost (a fill
                # that turns out slower is still cut off below, at 1.5x the limit)
                avg_n = (pending + n) / 2
                growth = max(1.0, avg_n / prev_n) if prev_n > 0 else 1.0
                est = to_create * prev_create * 1e-6 * growth
                if est > limit:
                    cfg.stopped = (
                        f"stopped before N={n:,}: estimated fill time {est/60:.0f} min "
                        f"(create_account at N={prev_n:,} took {prev_create/1000:.1f} ms, assumed to grow "
                        f"linearly with N; {why})"
                    )
                    log("  " + cfg.stopped)
                    break
            can_reset = reset_peak(pid)
            fill_t0 = time.monotonic()
            fill_server_s = 0.0
            created = 0
            last_report = fill_t0
            aborted = False
            while True:
                r = await bench(client, "fill", timeout=args.iq_timeout, n=n, budget=args.batch_seconds)
                fill_server_s += r["elapsed"]
                created += r["created"]
                if r["done"]:
                    break
                now = time.monotonic()
                if now - last_report > 30:
                    rate = created / max(fill_server_s, 1e-9)
                    log(f"    fill {r['pending']:,}/{n:,} ({rate:.0f}/s, last create {r['last_create_us']/1000:.1f} ms)")
                    last_report = now
                if now - fill_t0 > max(limit * 1.5, 60.0):
                    aborted = True
                    cfg.stopped = (
                        f"stopped during fill to N={n:,}: {now - fill_t0:.0f} s spent, reached "
                        f"{r['pending']:,} (last create_account {r['last_create_us']/1000:.1f} ms)"
                    )
                    log("  " + cfg.stopped)
                    break
            if aborted:
                break
            fill_wall = time.monotonic() - fill_t0
            # Write back what the fill left dirty and wait for the disk to go quiet (untimed),
            # so the measurements below do not share it with the flush of up to 100k files.
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, wait_disk_idle)
            if args.fs_settle_us > 0:
                fs_waited, probe = await loop.run_in_executor(None, wait_fs_fast, args.fs_settle_us)
                if fs_waited > 5:
                    log(f"    (waited {fs_waited:.0f} s for file creation to be fast again: {probe:.0f} us)")
            res: dict = {}
            if created:
                res["fill_per_invite"] = Stat.single(fill_server_s / created * 1e6, f"{created} created in {fill_wall:.1f} s")
            log(f"  N={n:,}: filled {created:,} in {fill_wall:.1f} s")

            peak_kb = max(peak_kb, proc_status(pid).get("VmHWM", 0))

            # ---- listing (first: before the measurements leave any records behind)
            rss_before = proc_status(pid).get("VmRSS", 0)
            reset_peak(pid)
            runs = []
            t0 = time.monotonic()
            while len(runs) < args.list_reps and time.monotonic() - t0 < args.op_budget:
                r = await bench(client, "list", timeout=args.iq_timeout, reps=args.list_reps - len(runs), budget=args.batch_seconds)
                runs.extend(r["runs"])
            items = {r["items"] for r in runs}
            if items != {n}:
                log(f"    WARNING: listing yielded {sorted(items)} items, expected {n}")
            res["list_total"] = Stat.of([r["us"] / 1000.0 for r in runs], f"items={sorted(items)}")
            res["list_per_item"] = Stat.of([r["us"] / r["items"] for r in runs if r["items"]], "")
            res["list_mem"] = Stat.of([r["peak_delta_kb"] for r in runs], f"base={runs[0]['base_kb']/1024:.1f} MiB" if runs else "")
            if can_reset:
                list_hwm = proc_status(pid).get("VmHWM", 0)
                peak_kb = max(peak_kb, list_hwm)
                res["list_rss"] = Stat.single(max(0, list_hwm - rss_before) / 1024.0,
                                              f"VmRSS before {rss_before/1024:.1f} MiB, peak during {list_hwm/1024:.1f} MiB")
                reset_peak(pid)

            # ---- per-token ops, in rounds that interleave the operations, so a slow spell
            # of the (virtual) disk does not land on one operation only
            probes = [await asyncio.get_running_loop().run_in_executor(None, file_create_us)]
            samples: dict[str, list[float]] = {k: [] for _, names in MEASURES for k in names}
            spent = {what: 0.0 for what, _ in MEASURES}
            for rnd in range(args.rounds):
                goal = math.ceil(args.samples * (rnd + 1) / args.rounds)
                for what, names in MEASURES:
                    calls = 0
                    while len(samples[names[0]]) < goal and (calls == 0 or spent[what] < args.op_budget * (rnd + 1) / args.rounds):
                        t0 = time.monotonic()
                        r = await bench(client, "measure", timeout=args.iq_timeout, what=what,
                                        samples=goal - len(samples[names[0]]), budget=args.batch_seconds, step=step)
                        spent[what] += time.monotonic() - t0
                        calls += 1
                        for k in names:
                            samples[k].extend(r["samples"][k])
            probes.append(await asyncio.get_running_loop().run_in_executor(None, file_create_us))
            res["fs_probe"] = Stat.of(probes, "before/after: " + " / ".join(f"{p:.0f}" for p in probes))
            for k, xs in samples.items():
                note = "" if len(xs) >= args.samples else f"only {len(xs)} samples within {args.op_budget:.0f} s"
                res[k] = Stat.of(xs, note)
            line = "  ".join(f"{k}={res[k].median:.0f}us" for k in OPS)
            log(f"    {line}  list={res['list_total'].median:.1f}ms")

            # ---- end-to-end registration over c2s
            # (at every N: a series may stop early, and its last N must have it too)
            if args.e2e > 0:
                times, ok = await e2e_registrations(srv, client, args.e2e, f"{cfg.storage[0]}{n}", args.iq_timeout)
                for k, xs in times.items():
                    res[k] = Stat.of(xs, "" if ok == args.e2e else f"{args.e2e - ok} failed")
                log(f"    e2e registration median {res['e2e_register'].median:.2f} ms ({ok}/{args.e2e} ok)")

            # ---- drop used/revoked records the measurements left (ours keeps them for
            # invite_retention; Prosody's own deletes them at once), so the next step
            # starts from exactly N pending invites in both.
            pr = await bench(client, "prune", timeout=args.iq_timeout)
            if pr.get("supported"):
                log(f"    pruned {pr['pruned']} finished records ({pr['elapsed']:.1f} s)")

            # ---- memory and disk
            info = await bench(client, "info")
            ps = proc_status(pid)
            peak_kb = max(peak_kb, ps.get("VmHWM", 0))
            res["rss_peak"] = Stat.single(peak_kb / 1024.0 if peak_kb else math.nan, f"VmRSS={ps.get('VmRSS', 0)/1024:.1f} MiB")
            res["lua_mem"] = Stat.single(info["lua_kb"] / 1024.0)
            apparent, alloc, count = disk_usage(srv)
            res["disk_bytes"] = Stat.single(apparent / 1e6, f"{count} files")
            res["disk_alloc"] = Stat.single(alloc / 1e6, f"{count} files")
            cfg.results[n] = res
            prev_n, prev_create = n, res["create_account"].median
            log(f"    peak RSS {res['rss_peak'].median:.1f} MiB, disk {apparent/1e6:.1f} MB ({alloc/1e6:.1f} MB allocated, {count} files)")
        await xmpp._shutdown(client)
        err = srv.err_text().strip()
        if err:
            log(f"  prosody.err:\n{err[-2000:]}")
    except BaseException:
        try:
            print(srv.tail(), file=sys.stderr)
        except Exception:
            pass
        raise
    finally:
        await xmpp.close_all()
        srv.cleanup()
        LEFTOVER_DIRS.append(srv.dir)
        cfg.wall = time.monotonic() - t_start


# --------------------------------------------------------------------- output


def fmt(v: float, unit: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if unit in ("us", "ms", "KiB"):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    return f"{v:,.1f}"


def ratio(a: float, b: float) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or a <= 0:
        return "—"
    r = b / a
    return f"{r:,.0f}x" if r >= 100 else f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


def build_table(configs: dict, ns: list[int]) -> list[list[str]]:
    header = ["storage", "N", "metric", "unit", "ours median", "ours p90", "ours growth",
              "stock median", "stock p90", "stock/ours"]
    rows = [header]
    for storage in STORAGES:
        ours = configs.get(("ours", storage))
        stock = configs.get(("stock", storage))
        if not ours and not stock:
            continue
        for n in ns:
            o = ours.results.get(n, {}) if ours else {}
            s = stock.results.get(n, {}) if stock else {}
            if not o and not s:
                continue
            o0 = ours.results.get(0, {}) if ours else {}
            first_n = next((k for k in sorted(ours.results) if k > 0), None) if ours else None
            o1 = ours.results.get(first_n, {}) if first_n is not None else {}
            for m in TABLE_ORDER:
                if m not in o and m not in s:
                    continue
                label, unit = METRICS[m]
                os_, ss = o.get(m), s.get(m)
                # growth of ours with N: per-op costs against N=0; listing per item and listing
                # memory against the first N > 0 (at N=0 nothing is listed)
                if m in PER_TOKEN or m.startswith("e2e_"):
                    base = o0.get(m) if n != 0 else None
                elif m in ("list_per_item", "list_mem", "list_rss"):
                    base = o1.get(m) if n != first_n else None
                else:
                    base = None
                vs0 = ratio(base.median, os_.median) if (os_ and base) else ""
                rows.append([
                    storage, f"{n:,}", label, unit,
                    fmt(os_.median, unit) if os_ else "—",
                    fmt(os_.p90, unit) if os_ else "—",
                    vs0,
                    fmt(ss.median, unit) if ss else ("(stopped)" if stock and stock.stopped else "—"),
                    fmt(ss.p90, unit) if ss else "—",
                    ratio(os_.median, ss.median) if (os_ and ss) else "—",
                ])
    return rows


def render_text(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {1, 4, 5, 6, 7, 8, 9}
    out = []
    prev_group = None
    for j, r in enumerate(rows):
        group = (r[0], r[1])
        if j > 1 and group != prev_group:
            out.append("")
        prev_group = group
        cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)]
        out.append("  ".join(cells).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def render_md(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---:" if i in {1, 4, 5, 6, 7, 8, 9} else "---" for i in range(len(rows[0]))) + "|"]
    for r in rows[1:]:
        out.append("| " + " | ".join(r) + " |")
    return "\n".join(out)


def write_csv(path: Path, configs: dict) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["impl", "storage", "n", "metric", "unit", "median", "p90", "mean", "min", "max", "samples", "note"])
        for (impl, storage), cfg in configs.items():
            for n, res in cfg.results.items():
                for m in TABLE_ORDER:
                    if m not in res:
                        continue
                    s = res[m]
                    w.writerow([impl, storage, n, m, METRICS[m][1]] + [
                        "" if math.isnan(x) else f"{x:.3f}" for x in (s.median, s.p90, s.mean, s.min, s.max)
                    ] + [s.n, s.note])
            if cfg.stopped:
                w.writerow([impl, storage, "", "stopped", "", "", "", "", "", "", "", cfg.stopped])


def targets(configs: dict, ns: list[int]) -> list[str]:
    """The issue's targets, checked against the numbers (informational)."""
    out = []
    top = max(ns)
    for storage in STORAGES:
        ours = configs.get(("ours", storage))
        stock = configs.get(("stock", storage))
        if ours and 0 in ours.results and top in ours.results:
            worst = max(PER_TOKEN, key=lambda m: ours.results[top][m].median / ours.results[0][m].median)
            r = ours.results[top][worst].median / ours.results[0][worst].median
            out.append(f"[{'ok' if r <= 2 else 'MISSED'}] ours/{storage}: every per-invite op at N={top:,} within 2x of N=0 "
                       f"(worst: {worst} {r:.2f}x)")
            e0 = ours.results[0].get("e2e_register")
            e1 = ours.results[top].get("e2e_register")
            if e0 and e1:
                r = e1.median / e0.median
                out.append(f"[{'ok' if r <= 1.10 else 'MISSED'}] ours/{storage}: e2e registration at N={top:,} within 10% of N=0 ({r:.2f}x)")
            first = min(k for k in ours.results if k > 0) if any(k > 0 for k in ours.results) else None
            if first is not None and first != top:
                m0, m1 = ours.results[first]["list_mem"].median, ours.results[top]["list_mem"].median
                r0 = ours.results[first].get("list_rss")
                r1 = ours.results[top].get("list_rss")
                rss = f"; process RSS growth {r0.median:.1f} MiB -> {r1.median:.1f} MiB" if r0 and r1 else ""
                out.append(f"[{'ok' if m1 <= 2 * max(m0, 64) else 'MISSED'}] ours/{storage}: listing memory flat in N: "
                           f"Lua peak {m0:.0f} KiB at N={first:,}, {m1:.0f} KiB at N={top:,}{rss}")
        if storage == "internal" and ours and stock and 10000 in ours.results and 10000 in stock.results:
            for m in ("create_account", "redeem"):
                r = stock.results[10000][m].median / ours.results[10000][m].median
                out.append(f"[{'ok' if r >= 50 else 'MISSED'}] internal N=10,000: {m} ours {r:.0f}x faster than stock (target >= 50x)")
        if storage == "sql" and ours and stock:
            worst = None
            for n in ns:
                if n in ours.results and n in stock.results:
                    for m in PER_TOKEN:
                        r = ours.results[n][m].median / stock.results[n][m].median
                        if worst is None or r > worst[0]:
                            worst = (r, m, n)
            if worst:
                r, m, n = worst
                out.append(f"[{'ok' if r <= 1.2 else 'MISSED'}] sql: no per-token op of ours >20% slower than stock "
                           f"(worst: {m} at N={n:,}: ours/stock = {r:.2f})")
    for (impl, storage), cfg in configs.items():
        if cfg.stopped:
            out.append(f"[note] {impl}/{storage}: {cfg.stopped}")
    return out


def write_outputs(args, configs: dict, wall: float, partial: bool = False) -> None:
    rows = build_table(configs, args.ns)
    checks = targets(configs, args.ns)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(args.out_dir / "results.csv", configs)
    cmd = " ".join(["python3 bench/run.py", *sys.argv[1:]])
    md = [
        "# Benchmark results" + (" (partial: run still going or cut short)" if partial else ""),
        "",
        f"`{cmd}` on {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}, wall time {wall/60:.1f} min;",
        f"N = {', '.join(f'{n:,}' for n in args.ns)}; up to {args.samples} samples per op and N.",
        "",
        "Medians and p90 of single calls timed inside Prosody (util.time.monotonic); e2e registration is",
        "wall-clock in the client. `ours growth`: ours at this N divided by ours at N=0 (per-op rows, e2e)",
        "or at the first N > 0 (listing per item and memory).",
        "`stock/ours`: stock divided by ours (above 1: ours is faster / smaller). See README.md.",
        "",
        render_md(rows),
        "",
        *[f"- {c}" for c in checks],
        "",
    ]
    (args.out_dir / "results.md").write_text("\n".join(md))


# ----------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N up to 10,000, 50 samples per op, shorter budgets")
    ap.add_argument("--max-n", type=int, default=None, help="largest N (default 100000; --quick: 10000)")
    ap.add_argument("--ns", type=str, default=None, help="comma-separated list of N (overrides --max-n)")
    ap.add_argument("--samples", type=int, default=None, help="samples per op and N (default 200; --quick: 50)")
    ap.add_argument("--rounds", type=int, default=4, help="rounds the per-token samples are spread over (interleaving the operations)")
    ap.add_argument("--list-reps", type=int, default=None, help="full listings per N (default 5; --quick: 3)")
    ap.add_argument("--e2e", type=int, default=20, help="registrations per e2e measurement, at every N (0: skip)")
    ap.add_argument("--op-budget", type=float, default=None, help="seconds per op and N before giving up on more samples (default 45; --quick 10)")
    ap.add_argument("--step-limit", type=float, default=None,
                    help="stop a series when filling the next N is estimated to take longer (seconds; default 1800; --quick 120)")
    ap.add_argument("--budget", type=float, default=None,
                    help="minutes for the whole run: a series also stops when the next fill is estimated "
                         "to outlast it (default 40; --quick 5)")
    ap.add_argument("--fs-settle-us", type=float, default=250.0,
                    help="before each configuration, wait (up to 5 min) until creating a file takes less "
                         "than this many microseconds (0: do not wait); see wait_fs_fast")
    ap.add_argument("--batch-seconds", type=float, default=8.0, help="server-side time budget of one iq (Prosody is single-threaded)")
    ap.add_argument("--iq-timeout", type=float, default=180.0, help="client timeout for one bench iq")
    ap.add_argument("--impl", default="ours,stock", help="ours,stock (default both)")
    ap.add_argument("--storage", default="internal,sql", help="internal,sql (default both)")
    ap.add_argument("--out-dir", type=Path, default=HERE, help="where results.csv and results.md go")
    ap.add_argument("--keep", action="store_true", help="keep each server's temp dir")
    args = ap.parse_args()

    q = args.quick
    if args.ns:
        args.ns = sorted({int(x.replace("_", "")) for x in args.ns.split(",")})
    else:
        max_n = args.max_n if args.max_n is not None else (10_000 if q else 100_000)
        args.ns = [n for n in (0, 1_000, 10_000, 100_000) if n <= max_n]
        if max_n not in args.ns:
            args.ns.append(max_n)
    args.samples = args.samples or (50 if q else 200)
    args.list_reps = args.list_reps or (3 if q else 5)
    args.op_budget = args.op_budget or (10.0 if q else 45.0)
    args.step_limit = args.step_limit or (120.0 if q else 1800.0)
    impls = [x.strip() for x in args.impl.split(",") if x.strip()]
    storages = [x.strip() for x in args.storage.split(",") if x.strip()]

    if "ours" in impls and harness.built_plugin_missing():
        print(f"build the plugins first (make build): missing {harness.built_plugin_missing()} in {harness.BUILD_PLUGINS}",
              file=sys.stderr)
        return 2

    t_all = time.monotonic()
    args.budget = args.budget or (5.0 if q else 40.0)
    args.deadline = t_all + args.budget * 60
    log(f"N = {', '.join(f'{n:,}' for n in args.ns)}; {args.samples} samples per op; list reps {args.list_reps}; "
        f"e2e {args.e2e}; step limit {args.step_limit:.0f} s; run budget {args.budget:.0f} min")
    configs: dict = {}
    # Prosody's own module on the internal store is by far the slowest series: run it last,
    # and rewrite the results after every configuration so a cut-short run still has them.
    order = [(i, s) for (i, s) in (("ours", "internal"), ("ours", "sql"), ("stock", "sql"), ("stock", "internal"))
             if i in impls and s in storages]
    for impl, storage in order:
        cfg = Config(impl, storage)
        configs[(impl, storage)] = cfg
        log(f"== {impl} / {storage} (load average {', '.join(f'{x:.2f}' for x in os.getloadavg())})")
        settle(args)
        asyncio.run(run_config(cfg, args))
        log(f"== {impl} / {storage} done in {cfg.wall:.0f} s")
        write_outputs(args, configs, time.monotonic() - t_all, partial=(impl, storage) != order[-1])
    wall = time.monotonic() - t_all
    if not args.keep:
        for d in LEFTOVER_DIRS:
            shutil.rmtree(d, ignore_errors=True)
    else:
        log("kept: " + ", ".join(str(d) for d in LEFTOVER_DIRS))

    rows = build_table(configs, args.ns)
    print()
    print(render_text(rows))
    print()
    for c in targets(configs, args.ns):
        print(c)
    print(f"\nwall time {wall/60:.1f} min")
    log(f"wrote {args.out_dir / 'results.csv'} and {args.out_dir / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
