#!/usr/bin/env python3
"""Load test: many clients race to register with a few multi-use invites, against a real Prosody.

One run (per storage, per round):

1. Start a real Prosody on loopback through spec/integration/harness.py (our modules unless
   INVITES_IMPL=stock; PROSODY_BIN / PROSODYCTL_BIN pick another Prosody, e.g. 13).
2. `prosodyctl mod_invites generate localhost --uses U`, once per invite.
3. Open every client's unauthenticated c2s stream (slixmpp over real TCP) and wait until all
   of them have their stream features. Only then does the race start (an asyncio.Event), so
   connection set-up is not part of what is measured.
4. The race: every client sends <preauth/> with its token and then registers its own
   username (XEP-0445, then XEP-0077). Clients are spread evenly over the valid invites; the
   rest carry distinct invalid tokens of a valid shape (random base64url, same length). The
   order in which they send is shuffled (--seed). Each client's preauth+register round trip
   is timed; a client whose preauth is refused still tries to register.
5. Checks, each independent of the clients' own replies where it can be:
   - exactly sum(min(uses, clients on invite)) accounts exist: counted in the storage (account
     files, or rows of the SQL store), and compared name by name with the successful clients;
   - no invite yielded more than `uses` accounts (the username tells which invite was used);
   - invalid tokens yielded no account;
   - every client that did not get an account received a proper stanza error (type, condition
     and a non-empty text) for each request, never a timeout or a closed stream;
   - every successful client logs in over c2s, every other client's login is refused;
   - `prosodyctl mod_invites list localhost --all` shows every invite used up (U/U uses);
   - Prosody is still running, and its logs hold no Lua traceback and no error-level line from
     mod_invites or mod_invites_register.
6. Report: accounts, refusals by condition and text, race wall time, registrations per second
   (accounts / race wall time) and p50/p90/p99/max latency of successful and refused clients.

--processes 2 runs two Prosody processes serving the same host on the same storage (one data
directory, SQLite file or PostgreSQL database; harness.ProsodyServer.twin()), the clients split
evenly across their c2s ports (each invite's clients too), and checks the same invariants across
both: exactly-once holds across processes. `--processes 1,2` runs both per storage and round and
prints their registrations/s side by side at the end.

The preauth throttle of mod_invites_register (invite_throttle_max, default 10 failed preauths per
IP per 60 s) would refuse every preauth from 127.0.0.1 after the 10th invalid token, so the load
server sets invite_throttle_max = 100000: this measures registration, not the throttle. Prosody's
own mod_register_limits allowlists 127.0.0.1 by default (0.12 and 13) and throttles nothing unless
min_seconds_between_registrations / registration_throttle_max are set, which they are not here;
neither version limits the number of c2s connections by default, and c2s_timeout (300 s) is far
beyond a run.

Speed is reported, never asserted. The client side (200 slixmpp clients in one Python process)
shares the machine with Prosody: the printed load average and CPU seconds of both say how much.
The streams are plain TCP on loopback, so they are opened and logins checked without loading the
system CA store slixmpp would load for every client (harness.plaintext_clients(): about 75 ms of
CPU each, which used to dominate the set-up).

The servers load a private copy of build/plugins made at start (see snapshot_plugins), so a
`make build` elsewhere during a run cannot pull the core out from under them; --no-snapshot
loads build/plugins itself. --server-option adds Prosody options for experiments, e.g.
'network_settings={"opportunistic_writes": true}'.

    python3 spec/load/load.py                           # 200 clients, 20 invites x 5 uses, 50 invalid
    python3 spec/load/load.py --storage internal,sql --rounds 3 --json load.json
    python3 spec/load/load.py --storage internal,sql,pgsql --processes 1,2   # one vs two processes
    PROSODY_BIN=$PWD/build/prosody13/bin/prosody PROSODYCTL_BIN=$PWD/build/prosody13/bin/prosodyctl \\
        python3 spec/load/load.py

Exit status: 0 when every check of every run passed, 1 when one failed (the report says which; the
server's folder is kept), 2 for bad arguments, missing plugins or no PostgreSQL for pgsql.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import json
import logging
import math
import os
import platform
import random
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
INTEGRATION = HERE.parent / "integration"
if str(INTEGRATION) not in sys.path:
    sys.path.insert(0, str(INTEGRATION))

import harness  # noqa: E402
import xmpp  # noqa: E402

# The login check makes SASL fail on purpose for every refused client; slixmpp logs each at error level.
logging.getLogger("slixmpp.features.feature_mechanisms.mechanisms").setLevel(logging.CRITICAL)

HOST = harness.HOST
REPO_PLUGINS = harness.BUILD_PLUGINS
# What the load server changes from the harness' defaults, and why (see the module docstring).
LOAD_OPTIONS = {"invite_throttle_max": 100000}
TOKEN_SHAPE_BYTES = 18  # our tokens: 18 random bytes, base64url (24 characters)
SHORT_ID_LEN = 10  # invite ids in listings: the last hex digits of sha256(token)

# Usernames say which invite a client raced for: load<invite>u<n>; invalid tokens: loadbad<n>.
VALID_NAME = re.compile(r"^load(?P<invite>\d{3})u(?P<n>\d{4})$")

# "Mon DD HH:MM:SS source\tlevel\tmessage" (Prosody's file log format)
LOG_LINE = re.compile(r"^\S+ \S+ \S+ (?P<source>\S+)\s+(?P<level>debug|info|warn|error)\t(?P<message>.*)$")
OUR_SOURCES = re.compile(r":invites(_register)?$")


# ------------------------------------------------------------------------ clients


@dataclass
class LoadClient:
    index: int
    username: str
    password: str
    token: str
    invite: int | None  # index into the run's invites; None for an invalid token
    port: int = 0  # the c2s port of the Prosody process this client uses
    session: xmpp.UnauthedSession | None = None
    preauth: xmpp.Outcome | None = None
    register: xmpp.Outcome | None = None
    started: float = 0.0  # seconds after the race started
    preauth_rtt: float = 0.0  # preauth round trip, seconds
    latency: float = 0.0  # preauth + register round trip, seconds
    login: str = ""  # "ok", "refused" or what went wrong

    @property
    def ok(self) -> bool:
        return bool(self.preauth and self.preauth.ok and self.register and self.register.ok)

    @property
    def jid(self) -> str:
        return f"{self.username}@{HOST}"

    def as_dict(self) -> dict:
        return {
            "username": self.username, "invite": self.invite, "ok": self.ok,
            "preauth": describe(self.preauth), "register": describe(self.register),
            "started_ms": round(self.started * 1000, 2), "preauth_ms": round(self.preauth_rtt * 1000, 2),
            "latency_ms": round(self.latency * 1000, 2), "login": self.login,
        }


def describe(outcome: xmpp.Outcome | None) -> str:
    if outcome is None:
        return "not sent"
    if outcome.ok:
        return "ok"
    if outcome.timed_out:
        return "TIMEOUT"
    if outcome.disconnected:
        return f"STREAM CLOSED {outcome.error}"
    return f"{outcome.error_type}/{outcome.condition} {outcome.text!r}"


def proper_error(outcome: xmpp.Outcome | None) -> bool:
    """A stanza error with a type, a condition and a non-empty text (not a timeout or a close)."""
    return bool(
        outcome is not None and not outcome.ok and not outcome.timed_out and not outcome.disconnected
        and outcome.error_type and outcome.condition and (outcome.text or "").strip()
    )


def invalid_token(length: int) -> str:
    """A token of the right shape (base64url, `length` characters) that no invite has."""
    return secrets.token_urlsafe(TOKEN_SHAPE_BYTES * 2)[:length]


def invite_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[-SHORT_ID_LEN:]


def make_clients(tokens: list[str], clients: int, invalid: int, ports: list[int]) -> list[LoadClient]:
    """clients - invalid racers spread round-robin over the invites, then `invalid` bad tokens;
    spread evenly over the processes' c2s `ports` (each invite's racers too)."""
    out = []
    shape = len(tokens[0]) if tokens else 24
    for n in range(clients - invalid):
        inv = n % len(tokens)
        name = f"load{inv:03d}u{n:04d}"
        port = ports[(n // len(tokens)) % len(ports)]
        out.append(LoadClient(n, name, f"pw-{name}-{secrets.token_hex(4)}", tokens[inv], inv, port))
    for n in range(invalid):
        name = f"loadbad{n:04d}"
        out.append(LoadClient(len(out), name, f"pw-{name}-{secrets.token_hex(4)}", invalid_token(shape), None,
                              ports[n % len(ports)]))
    return out


# ------------------------------------------------------------------------- phases


async def open_streams(clients: list[LoadClient], concurrency: int, timeout: float) -> None:
    """Every client's stream open (to its own c2s port) with its features received (a bounded
    number connecting at once: Prosody's listen backlog would otherwise drop SYNs, which costs
    seconds of retransmits)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(c: LoadClient):
        async with gate:
            c.session = await xmpp.UnauthedSession.open(c.port, timeout=timeout)

    with harness.plaintext_clients():
        await asyncio.wait_for(asyncio.gather(*(one(c) for c in clients)),
                               timeout * (1 + len(clients) / concurrency))


async def race(clients: list[LoadClient], timeout: float) -> float:
    """All clients preauth + register at once; returns the wall time from start to the last reply."""
    go = asyncio.Event()
    loop = asyncio.get_running_loop()
    t0 = 0.0

    async def one(c: LoadClient):
        await go.wait()
        start = loop.time()
        c.started = start - t0
        c.preauth = await c.session.preauth(c.token, timeout=timeout)
        c.preauth_rtt = loop.time() - start
        # Registration is attempted even when preauth failed: that must not create an account either.
        c.register = await c.session.register(c.username, c.password, timeout=timeout)
        c.latency = loop.time() - start

    tasks = [asyncio.ensure_future(one(c)) for c in clients]
    t0 = loop.time()
    go.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 2 * timeout + 30)
    return loop.time() - t0


async def close_streams(clients: list[LoadClient]) -> None:
    await asyncio.gather(*(c.session.close() for c in clients if c.session), return_exceptions=True)


async def check_logins(clients: list[LoadClient], concurrency: int, timeout: float) -> None:
    """c.login = "ok" when the account's password works, "refused" when SASL fails, else why not
    (each on the process it registered with)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(c: LoadClient):
        async with gate:
            try:
                session = await xmpp.login(c.port, c.jid, c.password, presence=False, timeout=timeout)
            except xmpp.LoginError as e:
                c.login = "refused" if ": auth-failed" in str(e) else f"login failed otherwise: {e}"
                return
            c.login = "ok"
            await xmpp._shutdown(session)

    with harness.plaintext_clients():
        await asyncio.gather(*(one(c) for c in clients))


# ------------------------------------------------------------------ server side


def stored_accounts(srv: harness.ProsodyServer) -> set[str]:
    """Usernames with an account record in the server's storage."""
    if srv.storage == "internal":
        folder = srv.data_dir / urllib.parse.quote(HOST) / "accounts"
        return {urllib.parse.unquote(p.stem) for p in folder.glob("*.dat")}
    rows = srv.sql_query('SELECT DISTINCT "user" FROM "prosody" WHERE "host"=? AND "store"=?', HOST, "accounts")
    return {r[0] for r in rows}


LIST_LINE = re.compile(
    r"^(?P<id>[0-9a-f]+)\s+(?P<type>\S+)\s+(?P<status>\S+)\s+\d{4}-\d\d-\d\d \d\d:\d\d\s+"
    r"\d{4}-\d\d-\d\d \d\d:\d\d\s+(?P<uses>\S+)\s+(?P<target>.*)$"
)


def listed_invites(srv: harness.ProsodyServer) -> tuple[dict[str, dict], str]:
    """`prosodyctl mod_invites list localhost --all`, parsed by id; and the raw output."""
    rc, out, err = srv.prosodyctl("mod_invites", "list", HOST, "--all", timeout=60)
    found = {}
    for line in out.splitlines():
        m = LIST_LINE.match(line.strip())
        if m:
            found[m["id"]] = m.groupdict()
    return found, f"rc={rc}\n{out}{err}"


def wait_for_first_cron_run(srv: harness.ProsodyServer, timeout: float = 15.0) -> None:
    """Prosody 13: wait until mod_cron has run its periodic tasks (about 1 s after start).

    Those tasks write to storage; with SQLite (LuaDBI's driver sets no busy timeout) a prosodyctl
    writing at the same moment fails at once with "database is locked", or the server's task does.
    Waiting for the log line avoids most of that race (the line comes just before the tasks run,
    hence also the retry in generate_invite); 0.12 has no mod_cron.
    """
    if harness.prosody_major_version() < 13:
        return
    deadline = time.monotonic() + timeout
    while "Running periodic tasks" not in srv.log_text():
        if time.monotonic() > deadline:
            raise harness.HarnessError(f"mod_cron did not log 'Running periodic tasks' within {timeout} s")
        time.sleep(0.05)  # polling a log file, bounded by the deadline


def generate_invite(srv: harness.ProsodyServer, uses: int, attempts: int = 3) -> tuple[str, int]:
    """`prosodyctl mod_invites generate localhost --uses N`; returns (URI, retries). A write that
    loses SQLite's lock to the server ("database is locked") is retried, at most `attempts` times."""
    for attempt in range(attempts):
        try:
            return srv.generate_invite("--uses", str(uses)), attempt
        except harness.HarnessError as e:
            if "database is locked" not in str(e) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def prosody_cpu_times(pid: int) -> tuple[float, float] | None:
    """User and system CPU seconds of a process so far (/proc/PID/stat, clock ticks);
    None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def prosody_cpu_seconds(pid: int) -> float | None:
    times = prosody_cpu_times(pid)
    return None if times is None else sum(times)


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def snapshot_plugins(attempts: int = 3) -> Path:
    """Copies the built plugins to a private folder and points the harness at it.

    `make build` copies the core over build/plugins/mod_invites/prosody_invites.so in place (cp keeps
    the inode), and a Prosody that has the old file mapped then crashes (SIGSEGV) at its next call
    into it. On a machine where someone else may rebuild during a run, the servers load this copy.
    """
    src = harness.BUILD_PLUGINS
    missing = harness.built_plugin_missing()
    if missing:
        raise harness.ImplementationMissing(f"{', '.join(missing)} not found under {src} (run `make build`)")
    dst = Path(tempfile.mkdtemp(prefix="load-plugins-")) / "plugins"
    for _ in range(attempts):
        before = tree_digest(src)
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        if tree_digest(dst) == before == tree_digest(src):  # not torn by a build copying meanwhile
            harness.BUILD_PLUGINS = dst
            return dst
    raise harness.HarnessError(f"{src} kept changing while it was copied; try again")


def prosody_version() -> str:
    try:
        out = subprocess.run([harness.PROSODYCTL, "about"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    m = re.search(r"^Prosody (\S+)", out, re.M)
    return m.group(1) if m else "unknown"


def log_findings(srv: harness.ProsodyServer) -> dict:
    """Tracebacks and error/warn lines in every log the server wrote."""
    texts = {"prosody.log": srv.log_text(), "prosody.err": srv.err_text()}
    try:
        texts["stdout"] = srv.stdout_path.read_text(errors="replace")
    except OSError:
        texts["stdout"] = ""
    tracebacks, ours, other_errors, warnings = [], [], [], []
    for name, text in texts.items():
        for line in text.splitlines():
            if "stack traceback" in line or "Traceback" in line:
                tracebacks.append(f"{name}: {line}")
            if name != "prosody.log":
                continue  # prosody.err repeats prosody.log's warn/error lines
            m = LOG_LINE.match(line)
            if not m:
                continue
            if m["level"] == "error":
                (ours if OUR_SOURCES.search(m["source"]) else other_errors).append(line)
            elif m["level"] == "warn":
                warnings.append(line)
    if not texts["prosody.log"].strip():
        other_errors.append("prosody.log is empty")
    return {"tracebacks": tracebacks, "our_errors": ours, "other_errors": other_errors, "warnings": warnings}


# ----------------------------------------------------------------------- statistics


def percentile(xs: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of xs, or None when there are none."""
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def latency_summary(xs: list[float]) -> dict:
    return {
        "n": len(xs),
        **{f"p{p}_ms": (round(v * 1000, 1) if (v := percentile(xs, p)) is not None else None) for p in (50, 90, 99)},
        "max_ms": round(max(xs) * 1000, 1) if xs else None,
    }


def fmt_ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


# ------------------------------------------------------------------------ one run


class LoadServer(harness.ProsodyServer):
    """The harness' server with another level for prosody.log. The harness logs at debug level,
    which under load adds to Prosody's work (about 20% of its CPU time in a race), so the level is
    an option (default info, as on a production server)."""

    def __init__(self, *, log_level: str = "info", **kw):
        super().__init__(**kw)
        self.log_level = log_level

    def render_config(self) -> str:
        config = super().render_config()
        debug = '{ levels = { min = "debug" }, to = "file"'
        if debug not in config:
            raise harness.HarnessError("the harness' log line changed; update LoadServer.render_config")
        return config.replace(debug, f'{{ levels = {{ min = {harness.lua_str(self.log_level)} }}, to = "file"', 1)


@dataclass
class RunResult:
    config: dict
    metrics: dict = field(default_factory=dict)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)  # (name, passed, detail)
    clients: list[dict] = field(default_factory=list)  # per client, for --json

    def check(self, name: str, passed: bool, detail: str = "") -> None:
        self.checks.append((name, bool(passed), detail))

    @property
    def passed(self) -> bool:
        return all(ok for _name, ok, _detail in self.checks)

    def as_dict(self) -> dict:
        return {
            "config": self.config,
            "metrics": self.metrics,
            "checks": [{"name": n, "passed": ok, "detail": d} for n, ok, d in self.checks],
            "passed": self.passed,
            "clients": self.clients,
        }


def run_once(args, storage: str, round_no: int, version: str, processes: int = 1) -> RunResult:
    result = RunResult({
        "prosody": version,
        "impl": harness.invites_impl(),
        "storage": storage,
        "processes": processes,
        "round": round_no,
        "clients": args.clients,
        "invites": args.invites,
        "uses": args.uses,
        "invalid": args.invalid,
        "log_level": args.log_level,
        "seed": args.seed,
        "options": dict(args.options),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    })
    srv = LoadServer(storage=storage, log_level=args.log_level, options=dict(args.options), start_timeout=60,
                     keep_dir=args.keep)
    servers = [srv]  # srv owns the storage; the others are its twins (same host, same storage)
    try:
        srv.start()
        for _ in range(processes - 1):
            servers.append(srv.twin(log_level=args.log_level))
        result.config["server_dir"] = str(srv.dir)
        where = ", ".join(f"port {s.port}, {s.dir}" for s in servers)
        print(f"\n== Prosody {version}, {result.config['impl']} modules, storage={storage}, "
              f"{processes} process{'es' if processes > 1 else ''}, round {round_no}: "
              f"{args.clients} clients, {args.invites} invites x {args.uses} uses, {args.invalid} invalid tokens "
              f"({where})", flush=True)
        t = time.monotonic()
        for s in servers:
            wait_for_first_cron_run(s)
        uris = []
        for n in range(args.invites):
            uri, retries = generate_invite(servers[n % len(servers)], args.uses)
            uris.append(uri)
            result.metrics["generate_retries"] = result.metrics.get("generate_retries", 0) + retries
        tokens = [xmpp.parse_uri(u).token for u in uris]
        ids = [invite_id(tok) for tok in tokens]
        result.metrics["generate_s"] = round(time.monotonic() - t, 2)
        clients = make_clients(tokens, args.clients, args.invalid, [s.port for s in servers])
        # The order in which the clients send: shuffled, so invalid tokens and every invite's
        # clients are interleaved as they would be in the wild (reproducible with --seed).
        random.Random(f"{args.seed}/{storage}/{round_no}").shuffle(clients)
        asyncio.run(drive(args, servers, clients, result))
        verify(args, servers, clients, ids, result)
    except (harness.ImplementationMissing, harness.PgsqlUnavailable):
        raise
    except Exception as e:  # the run itself broke (a stream that never opened, a bound exceeded)
        result.check("the run completed", False, f"{type(e).__name__}: {e}")
    finally:
        for n, s in enumerate(servers):
            if s.proc is not None:
                which = f" (process {n + 1})" if len(servers) > 1 else ""
                result.check(f"prosody still running at the end{which}", s.running,
                             "" if s.running else f"exit code {s.proc.poll()}\n{s.tail(20)}")
        if not result.passed and not args.keep:
            for s in servers:
                s.keep_dir = True  # keep the evidence
        if srv.keep_dir:
            result.config["kept_dir"] = " ".join(str(s.dir) for s in servers)
        srv.cleanup()  # its twins first
    return result


def servers_cpu_seconds(servers: list[harness.ProsodyServer]) -> float | None:
    """CPU seconds of every Prosody process, summed (None when one cannot be read)."""
    each = [prosody_cpu_seconds(s.proc.pid) for s in servers]
    return None if None in each else sum(each)


async def drive(args, servers: list[harness.ProsodyServer], clients: list[LoadClient], result: RunResult) -> None:
    try:
        t = time.monotonic()
        await open_streams(clients, args.connect_concurrency, args.timeout)
        result.metrics["connect_s"] = round(time.monotonic() - t, 2)
        cpu0, proc0, load0 = servers_cpu_seconds(servers), time.process_time(), os.getloadavg()
        wall = await race(clients, args.timeout)
        cpu1, proc1, load1 = servers_cpu_seconds(servers), time.process_time(), os.getloadavg()
        result.metrics.update({
            "race_wall_s": round(wall, 3),
            "prosody_cpu_s": round(cpu1 - cpu0, 2) if cpu0 is not None and cpu1 is not None else None,
            "client_cpu_s": round(proc1 - proc0, 2),
            "loadavg_before": [round(x, 2) for x in load0],
            "loadavg_after": [round(x, 2) for x in load1],
        })
        await close_streams(clients)
        result.check("prosody running after the race", all(s.running for s in servers))
        t = time.monotonic()
        await check_logins(clients, args.connect_concurrency, args.timeout)
        result.metrics["login_check_s"] = round(time.monotonic() - t, 2)
    finally:
        await xmpp.close_all()


def verify(args, servers: list[harness.ProsodyServer], clients: list[LoadClient], ids: list[str],
           result: RunResult) -> None:
    srv = servers[0]  # the storage is one; listed through the last process's config
    per_invite = Counter(c.invite for c in clients if c.invite is not None)
    expected = sum(min(args.uses, n) for n in per_invite.values())
    winners = [c for c in clients if c.ok]
    losers = [c for c in clients if not c.ok]
    m = result.metrics

    # What the clients were told.
    m["accounts_by_replies"] = len(winners)
    if len(servers) > 1:
        m["accounts_per_process"] = [sum(1 for c in winners if c.port == s.port) for s in servers]
    result.check(f"clients told they registered == {expected}", len(winners) == expected, f"got {len(winners)}")
    over = {i: n for i, n in Counter(c.invite for c in winners).items() if n > args.uses}
    result.check(f"no invite yields more than {args.uses} accounts", not over,
                 "; ".join(f"invite {ids[i]}: {n} accounts" for i, n in sorted(over.items())))
    bad_winners = [c.username for c in winners if c.invite is None]
    result.check("invalid tokens yield no account", not bad_winners, ", ".join(bad_winners))
    improper = [c for c in losers
                if not proper_error(c.preauth if not c.preauth.ok else c.register)
                or not proper_error(c.register)]
    result.check("every refused client got a stanza error (type, condition, text) for each request",
                 not improper,
                 "\n".join(f"{c.username}: preauth {describe(c.preauth)}; register {describe(c.register)}"
                           for c in improper[:20]))

    # What the server holds, independently of the replies.
    stored = stored_accounts(srv)
    m["accounts_stored"] = len(stored)
    result.check(f"accounts in storage == {expected}", len(stored) == expected, f"{len(stored)} stored")
    names_ok = stored == {c.username for c in winners}
    result.check("stored accounts are exactly the clients told they registered", names_ok,
                 "" if names_ok else f"stored only: {sorted(stored - {c.username for c in winners})[:10]}; "
                 f"told only: {sorted({c.username for c in winners} - stored)[:10]}")
    per_invite_stored = Counter(int(mm["invite"]) for u in stored if (mm := VALID_NAME.match(u)))
    over_stored = {i: n for i, n in per_invite_stored.items() if n > args.uses}
    result.check(f"no invite has more than {args.uses} stored accounts", not over_stored,
                 "; ".join(f"invite {ids[i]}: {n}" for i, n in sorted(over_stored.items())))
    stray = sorted(u for u in stored if not VALID_NAME.match(u))
    result.check("every stored account is of a client with a valid invite", not stray, ", ".join(stray[:10]))

    wrong_login = [c for c in clients if c.login != ("ok" if c.ok else "refused")]
    result.check("successful clients log in, all others are refused", not wrong_login,
                 "\n".join(f"{c.username} (registered={c.ok}): {c.login}" for c in wrong_login[:20]))

    listed, raw = listed_invites(servers[-1])
    wrong = []
    for i, inv_id in enumerate(ids):
        used = min(args.uses, per_invite[i])
        want = ("used" if used == args.uses else "pending", f"{used}/{args.uses}")
        got = listed.get(inv_id)
        if got is None or (got["status"], got["uses"]) != want:
            wrong.append(f"{inv_id}: want {want}, listed {got and (got['status'], got['uses'])}")
    result.check("prosodyctl mod_invites list --all shows every invite used up", not wrong,
                 "\n".join(wrong[:20]) + ("" if not wrong else f"\n{raw}"))

    logs = {"tracebacks": [], "our_errors": [], "other_errors": [], "warnings": []}
    for s in servers:
        for k, v in log_findings(s).items():
            logs[k] += v
    m["log_warnings"] = len(logs["warnings"])
    m["log_other_errors"] = len(logs["other_errors"])
    result.check("no Lua traceback in Prosody's logs", not logs["tracebacks"], "\n".join(logs["tracebacks"][:20]))
    result.check("no error-level log line from mod_invites / mod_invites_register", not logs["our_errors"],
                 "\n".join(logs["our_errors"][:20]))
    result.metrics["log_notes"] = (logs["other_errors"] + logs["warnings"])[:20]

    # Numbers.
    wall = m["race_wall_s"]
    m["accounts"] = len(stored)
    m["refused"] = len(losers)
    m["registrations_per_s"] = round(len(winners) / wall, 1) if wall > 0 else None
    m["requests_per_s"] = round(2 * len(clients) / wall, 1) if wall > 0 else None
    m["latency_ok"] = latency_summary([c.latency for c in winners])
    m["latency_refused"] = latency_summary([c.latency for c in losers])
    m["latency_preauth"] = latency_summary([c.preauth_rtt for c in clients])
    result.clients = [c.as_dict() for c in clients]
    m["refusals"] = dict(Counter(
        f"preauth {describe(c.preauth)} -> register {describe(c.register)}" for c in losers
    ).most_common())


# ------------------------------------------------------------------------ report


def print_report(r: RunResult) -> None:
    c, m = r.config, r.metrics
    procs = c.get("processes", 1)
    print(f"-- result: Prosody {c['prosody']} / {c['storage']} / {procs} process{'es' if procs > 1 else ''} / "
          f"round {c['round']}")
    if "race_wall_s" in m:
        retries = f" ({m['generate_retries']} retried after 'database is locked')" if m.get("generate_retries") else ""
        print(f"   generate {c['invites']} invites: {m.get('generate_s')} s{retries}; open {c['clients']} streams: "
              f"{m.get('connect_s')} s; login check: {m.get('login_check_s')} s")
        per_process = (f"; made through each process: {', '.join(map(str, m['accounts_per_process']))}"
                       if m.get("accounts_per_process") else "")
        print(f"   accounts created: {m.get('accounts')} (replies said {m.get('accounts_by_replies')}{per_process}); "
              f"refused clients: {m.get('refused')}")
        for text, n in (m.get("refusals") or {}).items():
            print(f"     {n:4d} x {text}")
        print(f"   race wall time: {m['race_wall_s']:.3f} s; registrations/s: {m.get('registrations_per_s')}; "
              f"requests/s (preauth + register): {m.get('requests_per_s')}")
        for label, key in (("successful", "latency_ok"), ("refused", "latency_refused"),
                           ("(preauth alone, all clients)", "latency_preauth")):
            s = m.get(key) or {}
            print(f"   latency {label} (n={s.get('n')}): p50 {fmt_ms(s.get('p50_ms'))} ms  "
                  f"p90 {fmt_ms(s.get('p90_ms'))} ms  p99 {fmt_ms(s.get('p99_ms'))} ms  "
                  f"max {fmt_ms(s.get('max_ms'))} ms")
        print(f"   CPU during the race: prosody {m.get('prosody_cpu_s')} s, clients {m.get('client_cpu_s')} s; "
              f"load average before {m.get('loadavg_before')}, after {m.get('loadavg_after')}")
        if m.get("log_warnings") or m.get("log_other_errors"):
            print(f"   log: {m.get('log_warnings')} warn lines, "
                  f"{m.get('log_other_errors')} error lines from other modules:")
            for line in m.get("log_notes") or []:
                print(f"     {line}")
    for name, ok, detail in r.checks:
        print(f"   [{'ok' if ok else 'FAIL'}] {name}")
        if not ok and detail:
            for line in detail.splitlines():
                print(f"          {line}")
    if c.get("kept_dir"):
        print(f"   server dir kept: {c['kept_dir']}")


CSV_FIELDS = (
    "prosody", "impl", "storage", "processes", "round", "clients", "invites", "uses", "invalid", "log_level",
    "accounts", "refused", "race_wall_s", "registrations_per_s", "requests_per_s", "ok_p50_ms", "ok_p90_ms",
    "ok_p99_ms", "ok_max_ms", "refused_p50_ms", "refused_p99_ms", "refused_max_ms", "prosody_cpu_s", "client_cpu_s",
    "loadavg_1m", "passed",
)


def csv_row(r: RunResult) -> dict:
    c, m = r.config, r.metrics
    ok, ref = m.get("latency_ok") or {}, m.get("latency_refused") or {}
    return {
        **{k: c.get(k) for k in ("prosody", "impl", "storage", "round", "clients", "invites", "uses", "invalid",
                                  "log_level")},
        "processes": c.get("processes", 1),
        **{k: m.get(k) for k in ("accounts", "refused", "race_wall_s", "registrations_per_s", "requests_per_s",
                                  "prosody_cpu_s", "client_cpu_s")},
        "ok_p50_ms": ok.get("p50_ms"), "ok_p90_ms": ok.get("p90_ms"), "ok_p99_ms": ok.get("p99_ms"),
        "ok_max_ms": ok.get("max_ms"), "refused_p50_ms": ref.get("p50_ms"), "refused_p99_ms": ref.get("p99_ms"),
        "refused_max_ms": ref.get("max_ms"),
        "loadavg_1m": (m.get("loadavg_before") or [None])[0],
        "passed": r.passed,
    }


def print_summary(results: list[RunResult]) -> None:
    print("\n== summary")
    print(f"{'prosody':9s} {'storage':8s} {'procs':>5s} {'rd':>2s} {'clients':>7s} {'accounts':>8s} {'refused':>7s} "
          f"{'reg/s':>7s} {'p50 ms':>7s} {'p99 ms':>7s} {'wall s':>7s} {'load1':>5s}  result")
    for r in results:
        row = csv_row(r)
        print(f"{row['prosody']:9s} {row['storage']:8s} {row['processes']:>5} {row['round']:>2} {row['clients']:>7} "
              f"{str(row['accounts']):>8s} {str(row['refused']):>7s} {str(row['registrations_per_s']):>7s} "
              f"{fmt_ms(row['ok_p50_ms']):>7s} {fmt_ms(row['ok_p99_ms']):>7s} {str(row['race_wall_s']):>7s} "
              f"{str(row['loadavg_1m']):>5s}  {'passed' if r.passed else 'FAILED'}")


def print_side_by_side(results: list[RunResult], processes: list[int]) -> None:
    """Registrations/s per storage for each number of processes (the mean over rounds), side by side."""
    if len(processes) < 2:
        return
    print("\n== registrations/s by number of Prosody processes (mean over rounds; same storage, same clients)")
    print(f"{'storage':8s} " + " ".join(f"{f'{n} proc':>9s}" for n in processes)
          + " " + " ".join(f"{f'{n}/{processes[0]}':>7s}" for n in processes[1:]))
    for storage in dict.fromkeys(r.config["storage"] for r in results):
        rates = {}
        for n in processes:
            xs = [r.metrics.get("registrations_per_s") for r in results
                  if r.config["storage"] == storage and r.config.get("processes", 1) == n]
            xs = [x for x in xs if x is not None]
            rates[n] = sum(xs) / len(xs) if xs else None
        base = rates[processes[0]]
        print(f"{storage:8s} " + " ".join(f"{'-' if rates[n] is None else f'{rates[n]:.1f}':>9s}" for n in processes)
              + " " + " ".join(f"{'-' if not base or rates[n] is None else f'{rates[n] / base:.2f}':>7s}"
                               for n in processes[1:]))


# -------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Race many c2s clients to register with a few multi-use invites against a real Prosody.",
        epilog="PROSODY_BIN / PROSODYCTL_BIN choose the Prosody, INVITES_IMPL=stock Prosody's own modules.",
    )
    p.add_argument("--clients", type=int, default=200, help="clients in the race, invalid ones included (200)")
    p.add_argument("--invites", type=int, default=20, help="valid invites (20)")
    p.add_argument("--uses", type=int, default=5, help="uses of each invite, prosodyctl --uses (5)")
    p.add_argument("--invalid", type=int, default=50, help="clients with distinct invalid tokens (50)")
    p.add_argument("--storage", default="internal",
                   help="internal, sql (SQLite3) or pgsql, or a comma list to run each (internal)")
    p.add_argument("--rounds", type=int, default=1, help="runs per storage, each on a fresh server (1)")
    p.add_argument("--processes", default="1",
                   help="Prosody processes serving the host on one storage, clients split across them; a comma "
                        "list runs each and prints their registrations/s side by side, e.g. 1,2 (1)")
    p.add_argument("--timeout", type=float, default=30.0, help="bound on each request and connection, s (30)")
    p.add_argument("--connect-concurrency", type=int, default=32,
                   help="streams opened (and logins checked) at once before/after the race (32)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warn"),
                   help="Prosody's log level during the run (info; debug added about 20%% to Prosody's CPU time)")
    p.add_argument("--server-option", action="append", default=[], metavar="NAME=JSON",
                   help="one more global Prosody option, its value as JSON (repeatable), e.g. "
                        "'network_settings={\"opportunistic_writes\": true}' or invite_throttle_max=10")
    p.add_argument("--seed", default=None, help="seed of the order in which clients send (default: random, printed)")
    p.add_argument("--json", metavar="PATH", help="write every run's config, metrics and checks as JSON")
    p.add_argument("--csv", metavar="PATH", help="write one CSV row per run")
    p.add_argument("--keep", action="store_true", help="keep each server's directory (always kept on failure)")
    p.add_argument("--no-snapshot", action="store_true",
                   help="load the plugins from build/plugins itself, not from a private copy made at start")
    args = p.parse_args(argv)
    args.storages = [s.strip() for s in args.storage.split(",") if s.strip()]
    try:
        args.process_counts = [int(x) for x in args.processes.split(",") if x.strip()]
    except ValueError:
        args.process_counts = []
    if not args.process_counts or not all(1 <= n <= 8 for n in args.process_counts):
        p.error(f"--processes: a comma list of numbers from 1 to 8, not {args.processes!r}")
    if args.seed is None:
        args.seed = secrets.token_hex(4)
    args.options = dict(LOAD_OPTIONS)
    for item in args.server_option:
        name, sep, value = item.partition("=")
        try:
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError("not NAME=JSON")
            args.options[name] = json.loads(value)
        except ValueError as e:
            p.error(f"--server-option {item!r}: {e}")
    bad = [s for s in args.storages if s not in harness.STORAGES]
    if bad or not args.storages:
        p.error(f"--storage: use a comma list of {', '.join(harness.STORAGES)}, not {args.storage!r}")
    if args.invites < 1 or args.uses < 1 or args.rounds < 1 or args.invalid < 0 or args.connect_concurrency < 1:
        p.error("--invites, --uses, --rounds and --connect-concurrency must be at least 1, --invalid at least 0")
    if args.clients - args.invalid < args.invites:
        p.error(f"--clients minus --invalid ({args.clients - args.invalid}) must be at least --invites "
                f"({args.invites}), so every invite has a client")
    if args.clients > 9999 or args.invites > 999:
        p.error("at most 9999 clients and 999 invites (usernames carry their numbers)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    version = prosody_version()
    plugins = None
    if harness.invites_impl() == "ours" and not args.no_snapshot:
        try:
            plugins = snapshot_plugins()
        except harness.HarnessError as e:
            print(f"cannot use the built plugins: {e}", file=sys.stderr)
            return 2
    try:
        return run_all(args, version, plugins)
    finally:
        harness.stop_shared_pgsql()
        if plugins is not None:
            harness.BUILD_PLUGINS = REPO_PLUGINS
            shutil.rmtree(plugins.parent, ignore_errors=True)


def run_all(args, version: str, plugins: Path | None) -> int:
    print(f"load test: Prosody {version} ({harness.PROSODY}), INVITES_IMPL={harness.invites_impl()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    if plugins is not None:
        print(f"plugins: a private copy of {REPO_PLUGINS} ({plugins})")
    print(f"server options beyond the harness defaults: {args.options} (invite_throttle_max: the preauth "
          "throttle would otherwise refuse every preauth from 127.0.0.1 after the 10th invalid token); "
          f"log level {args.log_level}; --seed {args.seed}")
    results: list[RunResult] = []
    status = 0
    for storage in args.storages:
        for round_no, processes in ((rn, n) for rn in range(1, args.rounds + 1) for n in args.process_counts):
            try:
                r = run_once(args, storage, round_no, version, processes)
            except (harness.ImplementationMissing, harness.PgsqlUnavailable) as e:
                print(f"cannot run storage={storage}: {e}", file=sys.stderr)
                return 2
            results.append(r)
            print_report(r)
            if not r.passed:
                status = 1
    print_summary(results)
    print_side_by_side(results, args.process_counts)
    if args.json:
        Path(args.json).write_text(json.dumps([r.as_dict() for r in results], indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            for r in results:
                w.writerow(csv_row(r))
        print(f"wrote {args.csv}")
    failed = [f"{r.config['storage']} x{r.config.get('processes', 1)} round {r.config['round']}: {name}"
              for r in results for name, ok, _d in r.checks if not ok]
    if failed:
        print("FAILED checks:\n  " + "\n  ".join(failed))
    else:
        print(f"all checks passed ({len(results)} runs)")
    return status


if __name__ == "__main__":
    sys.exit(main())
