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
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "spec" / "integration"))
sys.path.insert(0, str(REPO / "spec" / "load"))
sys.path.insert(0, str(HERE))

import harness  # noqa: E402
import xmpp  # noqa: E402
import load  # noqa: E402  (snapshot_plugins, prosody_version, prosody_cpu_times)
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


def cpu_seconds(pid: int) -> tuple[float, float, float]:
    """CPU time of a process so far (Linux /proc): (total, user, system). The total is the
    scheduler's own count in nanoseconds (/proc/PID/schedstat); user and system come in
    clock ticks (10 ms), which only their sums over many bursts can split finely."""
    times = load.prosody_cpu_times(pid)
    if times is None:
        raise RuntimeError(f"Prosody (pid {pid}) is gone")
    user, system = times
    try:
        total = int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        total = user + system
    return total, user, system


async def close(sessions) -> None:
    await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)


IMPL_NAMES = {"ours": "ours", "stock": "Prosody's"}


class Side:
    """One server under measurement: an implementation on a storage, and what its bursts gave."""

    def __init__(self, impl: str, storage: str):
        self.impl, self.storage = impl, storage
        self.srv = BenchServer(
            storage,
            impl=impl,
            registration_invite_only=False,
            allow_registration=True,
            extra_modules=["invites_bench"],
            # The preauth throttle and Prosody's registration limits count per address, and
            # every client is 127.0.0.1: this measures registration, not the throttle (as
            # spec/load does). Prosody's own modules have no such throttle.
            options={"invite_throttle_max": 100000},
            start_timeout=60.0,
        )
        self.client = None
        self.rates = {"open": [], "invite": []}
        self.ratios: list[float] = []
        # Prosody's own CPU per registration: what the server spends, whatever the clients cost.
        self.cpu = {"open": [], "invite": []}
        self.cpu_ratios: list[float] = []
        # Summed over the counted bursts: total CPU and its user/system split (ticks).
        self.sums = {w: {"n": 0, "cpu": 0.0, "user": 0.0, "sys": 0.0} for w in ("open", "invite")}

    @property
    def label(self) -> str:
        return f"{self.storage} ({IMPL_NAMES[self.impl]})"

    async def start(self) -> None:
        self.srv.start()
        self.srv.register_user("bench", "bench-password")
        self.client = await xmpp.login(self.srv.port, "bench@localhost", "bench-password", presence=False,
                                       timeout=30)
        info = await bench(self.client, "info")
        log(f"{self.label}: mod_invites from {info['invites']}, mod_invites_register from {info['invites_register']}")

    async def one_burst(self, way: str, tag: str, args) -> dict:
        names = [f"{tag}u{i}" for i in range(args.burst)]
        sessions = await open_sessions(self.srv.port, args.burst, args.concurrency, args.timeout)
        try:
            if way == "invite":
                tokens = (await bench(self.client, "tokens", timeout=120, n=args.burst))["tokens"]
                pre = await asyncio.gather(*(s.preauth(t, timeout=args.timeout) for s, t in zip(sessions, tokens)))
                bad = [p for p in pre if not p.ok]
                if bad:
                    raise RuntimeError(f"{self.label}: preauth refused: {bad[0]!r}")
            # Each burst starts from a collected heap: neither way pays for garbage made
            # before it (the other way's burst, the invites and preauths above).
            await bench(self.client, "gc")
            before = cpu_seconds(self.srv.proc.pid)
            wall, ok, failures = await burst(sessions, names, args.timeout)
            after = cpu_seconds(self.srv.proc.pid)
        finally:
            await close(sessions)
        if ok != args.burst:
            raise RuntimeError(f"{self.label} {way} burst: {ok}/{args.burst} registered; {failures[:3]}")
        total, user, system = (a - b for a, b in zip(after, before))
        return {"rate": args.burst / wall, "cpu": total, "user": user, "sys": system}

    def count(self, got: dict, n: int) -> None:
        for way in ("open", "invite"):
            self.rates[way].append(got[way]["rate"])
            self.cpu[way].append(got[way]["cpu"] / n)
            for k in ("cpu", "user", "sys"):
                self.sums[way][k] += got[way][k]
            self.sums[way]["n"] += n
        self.ratios.append(got["invite"]["rate"] / got["open"]["rate"])
        if got["invite"]["cpu"] > 0:
            self.cpu_ratios.append(got["open"]["cpu"] / got["invite"]["cpu"])

    async def stop(self) -> None:
        try:
            if self.client is not None:
                await xmpp._shutdown(self.client)
            err = self.srv.err_text().strip()
            if err:
                log(f"  {self.label} prosody.err:\n{err[-1500:]}")
        finally:
            self.srv.cleanup()


async def run_storage(storage: str, impls: list[str], args) -> list[Side]:
    """Every implementation's server on `storage`, all running; each round visits them in
    turn (the order rotates from round to round) and makes one open and one invite burst on
    each (that order alternates too), so the implementations share the machine's drift."""
    sides = [Side(impl, storage) for impl in impls]
    try:
        for side in sides:
            await side.start()
        # A warm-up burst of each (not counted): first connections, first account files / SQL statements.
        for rnd in ["warm-up"] + list(range(1, args.rounds + 1)):
            r = 0 if rnd == "warm-up" else rnd
            order = ("open", "invite") if r % 2 else ("invite", "open")
            k = r % len(sides)
            for side in sides[k:] + sides[:k]:
                got = {}
                for way in order:
                    got[way] = await side.one_burst(way, f"{storage[0]}{side.impl[0]}{r}{way[0]}", args)
                line = (f"  round {rnd} {side.label}: open {got['open']['rate']:.0f}/s, invite "
                        f"{got['invite']['rate']:.0f}/s, ratio {got['invite']['rate'] / got['open']['rate']:.2f}; "
                        f"server CPU per registration open {got['open']['cpu'] / args.burst * 1e3:.2f} ms, "
                        f"invite {got['invite']['cpu'] / args.burst * 1e3:.2f} ms")
                if rnd == "warm-up":
                    log(line + " (not counted)")
                    continue
                log(line)
                side.count(got, args.burst)
    finally:
        for side in sides:
            await side.stop()
        await xmpp.close_all()
    return sides


def per_reg_ms(side: Side, way: str, key: str) -> float:
    s = side.sums[way]
    return s[key] / s["n"] * 1e3 if s["n"] else math.nan


def summary_rows(results: list[Side]) -> list[list[str]]:
    rows = [["storage (modules)", "rounds", "open reg/s median (min-max)", "invite reg/s median (min-max)",
             "invite/open median", "invite/open min-max", "server CPU ms/reg open", "invite",
             "open/invite CPU median (min-max)", "open/invite CPU, all bursts", "of which system ms/reg open",
             "invite"]]
    for r in results:
        if not r.ratios:
            continue
        o, i, q, c = r.rates["open"], r.rates["invite"], r.ratios, r.cpu_ratios
        rows.append([r.label, str(len(q)),
                     f"{statistics.median(o):.0f} ({min(o):.0f}-{max(o):.0f})",
                     f"{statistics.median(i):.0f} ({min(i):.0f}-{max(i):.0f})",
                     f"{statistics.median(q):.2f}", f"{min(q):.2f}-{max(q):.2f}",
                     f"{per_reg_ms(r, 'open', 'cpu'):.2f}", f"{per_reg_ms(r, 'invite', 'cpu'):.2f}",
                     f"{statistics.median(c):.2f} ({min(c):.2f}-{max(c):.2f})" if c else "-",
                     f"{per_reg_ms(r, 'open', 'cpu') / per_reg_ms(r, 'invite', 'cpu'):.2f}",
                     f"{per_reg_ms(r, 'open', 'sys'):.2f}", f"{per_reg_ms(r, 'invite', 'sys'):.2f}"])
    return rows


def file_system(path: str) -> str:
    """The file system under `path` and its mount options (from /proc/mounts), for the record."""
    best = ("?", "?", "")
    try:
        real = os.path.realpath(path)
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype, opts = line.split()[:4]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
                best = (fstype, mnt, opts)
    except OSError:
        pass
    return f"{best[0]} on {best[1]} ({best[2]})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storage", default="internal,sql", help="internal,sql,pgsql (default internal,sql)")
    ap.add_argument("--impl", default="ours,stock",
                    help="ours,stock (default both: our modules and Prosody's own, side by side)")
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
    impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    bad = [i for i in impls if i not in IMPL_NAMES]
    if bad or not impls:
        print(f"--impl takes ours and/or stock, not {args.impl!r}", file=sys.stderr)
        return 2
    data_fs = file_system(tempfile.gettempdir())
    log(f"Prosody {version}; {args.rounds} rounds of {args.burst} open + {args.burst} invite registrations per "
        f"storage and implementation ({', '.join(IMPL_NAMES[i] for i in impls)}); data directories on {data_fs}")
    results = []
    try:
        for storage in [s.strip() for s in args.storage.split(",") if s.strip()]:
            results.extend(asyncio.run(run_storage(storage, impls, args)))
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
        w.writerow(["prosody", "modules", "storage", "round", "open_per_s", "invite_per_s", "ratio",
                    "open_cpu_ms", "invite_cpu_ms"])
        for r in results:
            for k, (o, i, q, oc, ic) in enumerate(zip(r.rates["open"], r.rates["invite"], r.ratios, r.cpu["open"],
                                                      r.cpu["invite"]), 1):
                w.writerow([version, r.impl, r.storage, k, f"{o:.1f}", f"{i:.1f}", f"{q:.3f}", f"{oc * 1e3:.3f}",
                            f"{ic * 1e3:.3f}"])
    md = [f"# Registration: invite vs open, one server each (Prosody {version})", "",
          f"`python3 bench/registration.py {' '.join(sys.argv[1:])}` on {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M')}; data directories on {data_fs}. "
          f"Bursts of {args.burst} concurrent registrations, alternating; "
          "invite registrations preauthed before the clock. With both implementations, both servers run "
          "at once and every round visits each in turn (the order rotates). Target (issue 16): "
          "invite/open >= 0.90. "
          "Server CPU: Prosody's CPU time over each burst (/proc/PID/schedstat, nanoseconds), per "
          "registration, summed over all counted bursts (what the server spends, whatever the clients in "
          "this same machine cost); system: the part spent in the kernel (clock ticks, summed). "
          "A full garbage collection in the server before each burst, outside the clock. "
          f"Load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())} "
          "(other work on the machine shows as a wide spread).", "",
          "| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    (args.out_dir / "registration-results.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
