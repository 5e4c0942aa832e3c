#!/usr/bin/env python3
"""`prosodyctl mod_invites tree` on 0 to 100,000 accounts: wall time and peak memory.

Each size gets a fresh data directory with N accounts and their invite tree entries
written straight into storage (internal: files; SQLite: rows), in the layout the server
writes: every account after the first few was invited by a random earlier one, so the tree
is wide and about log(N) deep, with some roots. Then `tree HOST` runs once in its own
process; its peak RSS (the whole prosodyctl: Lua, Prosody's libraries, the core) and wall
time are printed. Prosody has no such command to compare with; the N = 0 row is the cost
of starting prosodyctl at all.

    python3 bench/tree.py [--storage internal,sql] [--sizes 0,1000,10000,100000]
"""

import argparse
import json
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "spec" / "integration"))
import harness  # noqa: E402

ENTRY_STORE = "invite_accounts"


def tree_of(n: int, seed: int = 1):
    """{username: entry} for n accounts: 2% roots, the others invited by an earlier one."""
    rng = random.Random(seed)
    names = [f"u{i}" for i in range(n)]
    entries = {name: {"v": 1, "registered": 1_700_000_000 + i} for i, name in enumerate(names)}
    for i, name in enumerate(names):
        if i < 3 or rng.random() < 0.02:
            continue
        parent = names[rng.randrange(i)]
        entries[name]["by"] = parent
        entries[name]["invite"] = f"{i:010x}"
        entries[parent].setdefault("invited", []).append(name)
    return entries


def lua_string(text: str) -> str:
    return json.dumps(text)  # ASCII only here: JSON's escapes are Lua's


def seed_internal(srv, entries):
    host_dir = Path(srv.data_dir) / srv.host
    accounts, tree = host_dir / "accounts", host_dir / ENTRY_STORE
    accounts.mkdir(parents=True, exist_ok=True)
    tree.mkdir(parents=True, exist_ok=True)
    for name, entry in entries.items():
        (accounts / f"{name}.dat").write_text('return { ["password"] = "x" };\n')
        record = lua_string(json.dumps(entry, separators=(",", ":")))
        (tree / f"account%3a{name}.dat").write_text(f'return {{ ["record"] = {record} }};\n')


def seed_sql(srv, entries):
    # Prosody makes its table on first use: have prosodyctl make it, then drop that account.
    srv.register_user("seed", "seed-pw")
    db = sqlite3.connect(srv.sqlite_path)
    with db:
        db.execute("DELETE FROM prosody WHERE user = 'seed'")
        db.executemany(
            "INSERT INTO prosody (host, user, store, key, type, value) VALUES (?, ?, ?, ?, ?, ?)",
            [(srv.host, name, "accounts", "password", "string", "x") for name in entries]
            + [(srv.host, f"account:{name}", ENTRY_STORE, "record", "string",
                json.dumps(entry, separators=(",", ":"))) for name, entry in entries.items()])
    db.close()


MEASURE = """
import resource, subprocess, sys, time
t = time.monotonic()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=3600)
wall = time.monotonic() - t
print(done.returncode, wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:])
"""


def run_tree(srv):
    """(wall seconds, peak RSS in KiB, last line) of one `tree` in its own process."""
    cmd = [harness.PROSODYCTL, "--config", str(srv.config_path), "mod_invites", "tree", srv.host]
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, timeout=3700)
    first, last = out.stdout.splitlines()[:2]
    rc, wall, rss = first.split()
    if rc != "0":
        raise RuntimeError(f"tree failed ({rc}): {last}")
    return float(wall), int(rss), last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--storage", default="internal,sql")
    ap.add_argument("--sizes", default="0,1000,10000,100000")
    args = ap.parse_args()
    print(f"Prosody {harness.prosody_version()}; `prosodyctl mod_invites tree` on N accounts")
    print(f"{'storage':8} {'N':>8} {'wall s':>8} {'peak RSS MiB':>13}  summary")
    for storage in args.storage.split(","):
        for n in (int(x) for x in args.sizes.split(",")):
            srv = harness.ProsodyServer(storage, testhook=False)
            try:
                srv.start()  # creates the data directory (and the SQL schema)
                srv.stop()
                entries = tree_of(n)
                (seed_sql if storage == "sql" else seed_internal)(srv, entries)
                wall, rss, summary = run_tree(srv)
                print(f"{storage:8} {n:>8} {wall:>8.2f} {rss / 1024:>13.1f}  {summary}", flush=True)
            finally:
                srv.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
