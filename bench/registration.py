#!/usr/bin/env python3
"""Registration with an invite against open registration, interleaved in one Prosody.

One server (registration_invite_only = false, allow_registration = true: both ways work on it)
per storage. Each round is two bursts of --burst registrations over real c2s (XEP-0077), every
client of a burst sending at once:

- open: a fresh unauthenticated stream per client, then jabber:iq:register;
- invite: a fresh stream per client with <preauth/> (XEP-0445) already answered, then
  jabber:iq:register. The invites are made in the server (bench/plugins/mod_invites_bench.lua)
  and the streams opened and preauthed before the clock starts, so the burst times what
  registration with an invite adds: the reservation and its confirmation.

Before each burst the server collects its garbage (outside the clock), so that neither way
pays for garbage the other left, or for the invites and preauths made just before it.

The clock of a burst runs from the first request to the last reply; registrations/s = burst
size / that time. The order of the two bursts alternates from round to round (open first in
odd rounds, invite first in even ones), so neither always runs on the warmer server. Prints,
per storage, each way's registrations/s (median and range over rounds) and the ratio
invite/open of each round (median, min-max).

    python3 bench/registration.py                        # internal and SQLite, 30 rounds of 50 + 50
    python3 bench/registration.py --storage sql --rounds 4 --burst 30
    PROSODY_BIN=... PROSODYCTL_BIN=... python3 bench/registration.py    # another Prosody

Speed is printed, never asserted. Every wait is bounded. Writes bench/registration-results.md
and .csv (--out-dir).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
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
from run import BenchServer, bench, log  # noqa: E402

PASSWORD = "reg-bench-password"


async def open_sessions(port: int, n: int, concurrency: int, timeout: float) -> list[xmpp.UnauthedSession]:
    """n unauthenticated streams with their features, at most `concurrency` connecting at once
    (Prosody's listen backlog would otherwise drop SYNs)."""
    gate = asyncio.Semaphore(concurrency)

    async def one():
        async with gate:
            return await xmpp.UnauthedSession.open(port, timeout=timeout)

    return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), timeout * (1 + n / concurrency))


async def burst(sessions: list[xmpp.UnauthedSession], names: list[str], timeout: float) -> tuple[float, int, list[str]]:
    """Every session registers its name at once; returns (wall seconds first request to last reply,
    successes, distinct failures)."""
    go = asyncio.Event()

    async def one(s, name):
        await go.wait()
        return await s.register(name, PASSWORD, timeout=timeout)

    tasks = [asyncio.ensure_future(one(s, n)) for s, n in zip(sessions, names)]
    loop = asyncio.get_running_loop()
    await asyncio.sleep(0)  # every task waiting on the event
    t0 = loop.time()
    go.set()
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks), 2 * timeout + 30)
    wall = loop.time() - t0
    ok = sum(1 for o in outcomes if o.ok)
    failures = sorted({repr(o) for o in outcomes if not o.ok})
    return wall, ok, failures


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


async def close(sessions) -> None:
    await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)


async def run_storage(storage: str, args) -> dict:
    srv = BenchServer(
        storage,
        impl="ours",
        registration_invite_only=False,
        allow_registration=True,
        extra_modules=["invites_bench"],
        # The preauth throttle and Prosody's registration limits count per address, and every
        # client is 127.0.0.1: this measures registration, not the throttle (as spec/load does).
        options={"invite_throttle_max": 100000},
        start_timeout=60.0,
    )
    rates = {"open": [], "invite": []}
    ratios = []
    # Prosody's own CPU per registration: what the server spends, whatever the clients cost.
    cpu = {"open": [], "invite": []}
    system = {"open": [], "invite": []}  # of which in the kernel (file creation, locks, reads)
    cpu_ratios = []
    try:
        srv.start()
        srv.register_user("bench", "bench-password")
        client = await xmpp.login(srv.port, "bench@localhost", "bench-password", presence=False, timeout=30)
        info = await bench(client, "info")
        log(f"{storage}: mod_invites from {info['invites']}, mod_invites_register from {info['invites_register']}")
        # A warm-up burst of each (not counted): first connections, first account files / SQL statements.
        rounds = [("warm-up", ("open", "invite"))] + [
            (r, ("open", "invite") if r % 2 else ("invite", "open")) for r in range(1, args.rounds + 1)]
        for rnd, order in rounds:
            got = {}
            for way in order:
                tag = f"{storage[0]}{rnd if rnd != 'warm-up' else 0}{way[0]}"
                names = [f"{tag}u{i}" for i in range(args.burst)]
                sessions = await open_sessions(srv.port, args.burst, args.concurrency, args.timeout)
                try:
                    if way == "invite":
                        tokens = (await bench(client, "tokens", timeout=120, n=args.burst))["tokens"]
                        pre = await asyncio.gather(*(s.preauth(t, timeout=args.timeout) for s, t in zip(sessions, tokens)))
                        bad = [p for p in pre if not p.ok]
                        if bad:
                            raise RuntimeError(f"preauth refused: {bad[0]!r}")
                    # Each burst starts from a collected heap: neither way pays for garbage
                    # made before it (the other way's burst, the invites and preauths above).
                    await bench(client, "gc")
                    user0, sys0 = cpu_seconds(srv.proc.pid)
                    wall, ok, failures = await burst(sessions, names, args.timeout)
                    user1, sys1 = cpu_seconds(srv.proc.pid)
                    spent, in_kernel = (user1 - user0) + (sys1 - sys0), sys1 - sys0
                finally:
                    await close(sessions)
                if ok != args.burst:
                    raise RuntimeError(f"{way} burst: {ok}/{args.burst} registered; {failures[:3]}")
                got[way] = args.burst / wall
                got[way + "_cpu"] = spent / args.burst
                got[way + "_sys"] = in_kernel / args.burst
            line = (f"  round {rnd}: open {got['open']:.0f}/s, invite {got['invite']:.0f}/s, ratio "
                    f"{got['invite'] / got['open']:.2f}; server CPU per registration open "
                    f"{got['open_cpu'] * 1e3:.2f} ms, invite {got['invite_cpu'] * 1e3:.2f} ms")
            if rnd == "warm-up":
                log(line + " (not counted)")
                continue
            log(line)
            for way in rates:
                rates[way].append(got[way])
            ratios.append(got["invite"] / got["open"])
            for way in cpu:
                cpu[way].append(got[way + "_cpu"])
                system[way].append(got[way + "_sys"])
            if got["invite_cpu"] > 0:
                cpu_ratios.append(got["open_cpu"] / got["invite_cpu"])
        await xmpp._shutdown(client)
        err = srv.err_text().strip()
        if err:
            log(f"  prosody.err:\n{err[-1500:]}")
    finally:
        await xmpp.close_all()
        srv.cleanup()
    return {"storage": storage, "open": rates["open"], "invite": rates["invite"], "ratio": ratios,
            "open_cpu": cpu["open"], "invite_cpu": cpu["invite"], "cpu_ratio": cpu_ratios,
            "open_sys": system["open"], "invite_sys": system["invite"]}


def summary_rows(results: list[dict]) -> list[list[str]]:
    rows = [["storage", "rounds", "open reg/s median (min-max)", "invite reg/s median (min-max)",
             "invite/open median", "invite/open min-max", "server CPU ms/reg open", "invite",
             "open/invite CPU median (min-max)", "of which system ms/reg open", "invite"]]
    for r in results:
        if not r["ratio"]:
            continue
        o, i, q = r["open"], r["invite"], r["ratio"]
        rows.append([r["storage"], str(len(q)),
                     f"{statistics.median(o):.0f} ({min(o):.0f}-{max(o):.0f})",
                     f"{statistics.median(i):.0f} ({min(i):.0f}-{max(i):.0f})",
                     f"{statistics.median(q):.2f}", f"{min(q):.2f}-{max(q):.2f}",
                     f"{statistics.median(r['open_cpu']) * 1e3:.2f}",
                     f"{statistics.median(r['invite_cpu']) * 1e3:.2f}",
                     (f"{statistics.median(r['cpu_ratio']):.2f} ({min(r['cpu_ratio']):.2f}-"
                      f"{max(r['cpu_ratio']):.2f})") if r["cpu_ratio"] else "-",
                     f"{statistics.median(r['open_sys']) * 1e3:.2f}",
                     f"{statistics.median(r['invite_sys']) * 1e3:.2f}"])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storage", default="internal,sql", help="internal,sql,pgsql (default internal,sql)")
    ap.add_argument("--rounds", type=int, default=30, help="counted rounds (each: one open and one invite burst)")
    ap.add_argument("--burst", type=int, default=50, help="registrations per burst")
    ap.add_argument("--concurrency", type=int, default=25, help="streams connecting at once while a burst is set up")
    ap.add_argument("--timeout", type=float, default=30.0, help="bound on each request")
    ap.add_argument("--quick", action="store_true", help="3 rounds")
    ap.add_argument("--out-dir", type=Path, default=HERE)
    ap.add_argument("--no-snapshot", action="store_true", help="load build/plugins itself, not a private copy")
    args = ap.parse_args()
    if args.quick:
        args.rounds = min(args.rounds, 3)
    if harness.built_plugin_missing():
        print(f"build the plugins first (make build): missing {harness.built_plugin_missing()}", file=sys.stderr)
        return 2
    plugins = None if args.no_snapshot else load.snapshot_plugins()
    version = load.prosody_version()
    log(f"Prosody {version}; {args.rounds} rounds of {args.burst} open + {args.burst} invite registrations per storage")
    results = []
    try:
        for storage in [s.strip() for s in args.storage.split(",") if s.strip()]:
            results.append(asyncio.run(run_storage(storage, args)))
    finally:
        if plugins is not None:
            import shutil
            shutil.rmtree(plugins.parent, ignore_errors=True)
    rows = summary_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    print(f"Registrations/s on Prosody {version} (bursts of {args.burst}, concurrent; invite: preauth before the clock)")
    for j, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with (args.out_dir / "registration-results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prosody", "storage", "round", "open_per_s", "invite_per_s", "ratio",
                    "open_cpu_ms", "invite_cpu_ms", "open_sys_ms", "invite_sys_ms"])
        for r in results:
            for k, (o, i, q, oc, ic, os_, is_) in enumerate(zip(r["open"], r["invite"], r["ratio"], r["open_cpu"],
                                                                r["invite_cpu"], r["open_sys"], r["invite_sys"]), 1):
                w.writerow([version, r["storage"], k, f"{o:.1f}", f"{i:.1f}", f"{q:.3f}", f"{oc * 1e3:.3f}",
                            f"{ic * 1e3:.3f}", f"{os_ * 1e3:.3f}", f"{is_ * 1e3:.3f}"])
    md = [f"# Registration: invite vs open, one server (Prosody {version})", "",
          f"`python3 bench/registration.py {' '.join(sys.argv[1:])}` on {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M')}. Bursts of {args.burst} concurrent registrations, alternating; "
          "invite registrations preauthed before the clock. Target (issue 16): invite/open >= 0.90. "
          "Server CPU: Prosody's user+system time over each burst, per registration (what the server "
          "spends, whatever the clients in this same machine cost); system: the part spent in the kernel. "
          "A full garbage collection in the server before each burst, outside the clock. "
          f"Load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())} "
          "(other work on the machine shows as a wide spread).", "",
          "| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    (args.out_dir / "registration-results.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
