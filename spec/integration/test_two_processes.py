"""Two Prosody processes serving one host on one storage (issue 16).

Each test starts a server and its twin (harness.ProsodyServer.twin()): a second Prosody
process for the same VirtualHost "localhost" on the same data directory, SQLite file or
PostgreSQL database, with its own c2s port. Clients are split evenly across both ports and the
invites are made with `prosodyctl mod_invites` against either config. Every change to one
invite must then be atomic across the two processes (and prosodyctl), as it is within one:

* a race of 200 clients for 20 invites x 5 uses (all of them preauthed, then registering at
  once) makes exactly 100 accounts, none over an invite's uses, and every loser gets a proper
  stanza error;
* a `prosodyctl mod_invites revoke` fired in the middle of a stream of registrations with
  one invite is never lost, and no registration sent after it returned succeeds;
* SIGKILL of one process mid-burst: the other keeps answering, and after a restart (and the
  dead process's reservations lapsing) every invite has given exactly the uses its accounts
  took, and its other uses can still be taken.

On SQLite, Prosody's own writes (the account, the roster: mod_storage_sql through LuaDBI,
which sets no busy timeout) can fail with "database is locked" when two processes write one
file; the client then gets internal-server-error. Such a client tries again on its stream
(preauth and register, at most RETRIES more times), as a user would. The invariants are the
same; the retries are counted in the printed summary.

With `invites_storage_lock = false` (the per-process atomicity of before) the race test sees
invites give 6 accounts for 5 uses (or a use that is never counted), and the revoke test
registrations succeed after a revocation that returned (it was overwritten). The kill test is
about a crash, not a race: its burst (a few workers per process) seldom collides.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import sqlite3
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass

import pytest

import harness
import xmpp

HOST = harness.HOST
REQUEST_TIMEOUT = 20.0  # bound on each preauth / register reply
RETRIES = 5  # SQLite: more tries for a client refused with internal-server-error or a wait error
# A failed token check (an invite already used) counts against the address; every client is
# on 127.0.0.1, so the throttle is set out of the way: this tests the invites, not it.
OPTIONS = {"invite_throttle_max": 100000}
USED_TEXT = "This invitation has already been used"
REVOKED_TEXT = "This invitation has been revoked"

LIST_LINE = re.compile(
    r"^(?P<id>[0-9a-f]+)\s+(?P<type>\S+)\s+(?P<status>\S+)\s+\d{4}-\d\d-\d\d \d\d:\d\d\s+"
    r"\d{4}-\d\d-\d\d \d\d:\d\d\s+(?P<used>\d+)/(?P<uses>\d+)\s+(?P<target>.*)$"
)


# ------------------------------------------------------------------ clients


@dataclass
class Racer:
    """One client: its username names the invite it races for (see invite_of)."""

    username: str
    token: str
    invite: int
    port: int
    session: xmpp.UnauthedSession | None = None
    preauth: xmpp.Outcome | None = None
    register: xmpp.Outcome | None = None
    tries: int = 0
    sent_at: float = 0.0  # time.monotonic() when its last register iq was sent
    replied_at: float = 0.0  # ... and when the reply (or timeout, or close) came

    @property
    def password(self) -> str:
        return f"pw-{self.username}"

    @property
    def ok(self) -> bool:
        return bool(self.preauth and self.preauth.ok and self.register and self.register.ok)

    @property
    def refusal(self) -> xmpp.Outcome | None:
        """The reply that refused this client: its preauth's, else its registration's."""
        return self.preauth if self.preauth is not None and not self.preauth.ok else self.register

    def describe(self) -> str:
        return (f"{self.username} (port {self.port}, {self.tries} tries): "
                f"preauth {self.preauth}, register {self.register}")


def proper_error(out: xmpp.Outcome | None) -> bool:
    """A stanza error with a type, a condition and a non-empty text (not a timeout or a close)."""
    return bool(out is not None and not out.ok and not out.timed_out and not out.disconnected
                and out.error_type and out.condition and (out.text or "").strip())


def answered_properly(r: Racer) -> bool:
    """Registered, or refused with a proper stanza error for each request it sent."""
    if r.ok:
        return True
    if not proper_error(r.refusal):
        return False
    return proper_error(r.register)  # a refused preauth: the registration sent after it too


def retryable(out: xmpp.Outcome | None) -> bool:
    return bool(out is not None and not out.ok and not out.timed_out and not out.disconnected
                and (out.condition == "internal-server-error" or out.error_type == "wait"))


async def attempt(r: Racer, retry: bool, preauthed: bool = False) -> None:
    """Preauth (unless `preauthed`: done already, and accepted), then register (sent even when
    preauth was refused: that must create nothing either); on SQLite (retry) both again on the
    same stream while the refusal is a storage error."""
    for n in range(1 + (RETRIES if retry else 0)):
        r.tries += 1
        if n > 0 or not preauthed:
            r.preauth = await r.session.preauth(r.token, timeout=REQUEST_TIMEOUT)
        r.sent_at = time.monotonic()
        r.register = await r.session.register(r.username, r.password, timeout=REQUEST_TIMEOUT)
        r.replied_at = time.monotonic()
        if r.ok or not retryable(r.refusal):
            return


async def open_sessions(racers: list[Racer], concurrency: int = 32) -> None:
    """Every racer's unauthenticated stream open, its features received."""
    gate = asyncio.Semaphore(concurrency)

    async def one(r: Racer):
        async with gate:
            r.session = await xmpp.UnauthedSession.open(r.port, timeout=REQUEST_TIMEOUT)

    with harness.plaintext_clients():
        await asyncio.wait_for(asyncio.gather(*(one(r) for r in racers)), 60)


# ------------------------------------------------------------------ server side


@pytest.fixture
def pair(make_server, request):
    """A started server and its started twin on the same storage (both cleaned up by
    make_server). Options from @pytest.mark.server_options, as for `server`."""
    marker = request.node.get_closest_marker("server_options")
    kw = dict(marker.kwargs) if marker else {}
    kw["options"] = {**OPTIONS, **kw.get("options", {})}
    first = make_server(**kw)
    request.node._prosody_server = first  # conftest attaches its log tail to a failure
    return first, first.twin()


def logs(*servers: harness.ProsodyServer) -> str:
    return "\n".join(f"=== {srv!r}\n{srv.tail(30)}" for srv in servers)


def stored_accounts(srv: harness.ProsodyServer) -> set[str]:
    """Usernames with an account in the storage (an account a kill cut short between its writes
    counts too: it takes a use all the same)."""
    if srv.storage == "internal":
        folder = srv.data_dir / urllib.parse.quote(HOST) / "accounts"
        return {urllib.parse.unquote(p.stem) for p in folder.glob("*.dat")}
    try:
        rows = srv.sql_query('SELECT DISTINCT "user" FROM "prosody" WHERE "host"=? AND "store"=?', HOST, "accounts")
    except sqlite3.OperationalError as e:  # sql_query waits 10 s for SQLite's lock
        pytest.fail(f"the SQLite file stayed locked by Prosody after the burst ({e}):\n{logs(srv, *srv.twins)}")
    return {row[0] for row in rows}


def invite_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[-10:]


def listed(srv: harness.ProsodyServer) -> dict[str, dict]:
    """`prosodyctl mod_invites list localhost --all`, by invite id."""
    rc, out, err = srv.prosodyctl("mod_invites", "list", HOST, "--all", timeout=60)
    assert rc == 0, out + err
    return {m["id"]: m.groupdict() for line in out.splitlines() if (m := LIST_LINE.match(line.strip()))}


def generate(servers, n: int, uses: int) -> list[str]:
    """n invites, made with prosodyctl against each server's config in turn; their tokens."""
    return [xmpp.parse_uri(servers[i % len(servers)].generate_invite("--uses", str(uses))).token
            for i in range(n)]


def invite_of(username: str) -> int:
    return int(re.match(r"^[a-z]+(\d+)x", username).group(1))


def traceback_logs(*servers: harness.ProsodyServer) -> list[str]:
    """Lua tracebacks in the logs (of every run) of these servers, each with the lines before it."""
    found = []
    for srv in servers:
        for path in sorted(srv.dir.glob("prosody.log*")) + [srv.err_path, srv.stdout_path]:
            lines = path.read_text(errors="replace").splitlines() if path.exists() else []
            found += [f"{path}:\n" + "\n".join(lines[max(0, n - 3):n + 6])
                      for n, line in enumerate(lines) if "traceback" in line.lower()]
    return found


# ------------------------------------------------------------------ the race

INVITES, USES, PER_INVITE = 20, 5, 10  # 200 clients race for 100 uses


@pytest.mark.async_timeout(120)
async def test_two_processes_racing_for_invites_make_exactly_their_uses(pair):
    a, b = pair
    tokens = generate(pair, INVITES, USES)
    # Each invite's clients half on each process, sending in invite order: both processes
    # take the same invite's registrations at the same moment, the worst case for atomicity.
    racers = [Racer(f"race{i:02d}x{k}", tokens[i], i, (a, b)[k % 2].port)
              for i in range(INVITES) for k in range(PER_INVITE)]
    await open_sessions(racers)
    # Every client has presented its token before the race (nothing is used yet, so each is
    # accepted): the race is the registrations, each of which takes a use.
    for r, out in zip(racers, await asyncio.gather(*(r.session.preauth(r.token, timeout=REQUEST_TIMEOUT)
                                                     for r in racers))):
        r.preauth = out
    assert all(r.preauth.ok for r in racers), [r.describe() for r in racers if not r.preauth.ok][:10]

    go = asyncio.Event()

    async def run(r: Racer):
        await go.wait()
        await attempt(r, retry=a.storage == "sql", preauthed=True)

    tasks = [asyncio.ensure_future(run(r)) for r in racers]
    t0 = time.monotonic()
    go.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 2 * (RETRIES + 1) * REQUEST_TIMEOUT)
    wall = time.monotonic() - t0
    await xmpp.close_all()

    winners = [r for r in racers if r.ok]
    retried = sum(1 for r in racers if r.tries > 1)
    print(f"\n[{a.storage}] {len(winners)} registered on both processes in {wall:.2f} s "
          f"({sum(1 for r in winners if r.port == a.port)} on the first, "
          f"{sum(1 for r in winners if r.port == b.port)} on the second), {retried} clients retried; "
          f"refusals: {dict(Counter(str(r.refusal) for r in racers if not r.ok))}")

    assert a.running and b.running, logs(a, b)
    stored = stored_accounts(a)
    per_invite = Counter(invite_of(u) for u in stored)
    over = {invite_id(tokens[i]): n for i, n in per_invite.items() if n > USES}
    assert not over, f"invites above their {USES} uses (stored accounts): {over}"
    assert len(stored) == INVITES * USES, (len(stored), sorted(per_invite.items()))
    assert stored == {r.username for r in winners}, (
        f"stored only: {sorted(stored - {r.username for r in winners})}; "
        f"told only: {sorted({r.username for r in winners} - stored)}")
    improper = [r.describe() for r in racers if not answered_properly(r)]
    assert not improper, "\n".join(improper[:20])
    if a.storage != "sql":  # only SQLite's own locking may refuse a client with a storage error
        failed = [r.describe() for r in racers if not r.ok and retryable(r.refusal)]
        assert not failed, "\n".join(failed[:20])

    invites = listed(b)
    for i, token in enumerate(tokens):
        got = invites.get(invite_id(token))
        assert got is not None and (got["status"], got["used"]) == ("used", str(USES)), (i, got)
    assert not traceback_logs(a, b), "\n".join(traceback_logs(a, b)[:5])


# ------------------------------------------------------------------ revoke mid-burst

REVOKE_ROUNDS = 4  # invites, each revoked in the middle of its own burst
REVOKE_USES = 1000  # more than a burst can take: only the revocation ends it
WORKERS_PER_PROCESS = 4
SUCCESSES_BEFORE_REVOKE = 10
SENT_AFTER_REVOKE = 16  # registrations sent after revoke returned, then the next round


@pytest.mark.async_timeout(120)
async def test_revoke_in_the_middle_of_a_burst_on_two_processes_is_never_lost(pair):
    """Round by round, every worker (half on each process) registers with one invite, each
    on a fresh stream, while `prosodyctl mod_invites revoke` runs against that invite."""
    a, b = pair
    tokens = generate(pair, REVOKE_ROUNDS, REVOKE_USES)
    retry = a.storage == "sql"
    racers: list[Racer] = []
    rounds = [{"enough": asyncio.Event(), "done": asyncio.Event()} for _ in tokens]
    stop = asyncio.Event()

    async def worker(w: int, port: int):
        n = 0
        for i, rnd in enumerate(rounds):
            while not rnd["done"].is_set() and not stop.is_set():
                r = Racer(f"burst{i}x{w}n{n}", tokens[i], i, port)
                n += 1
                racers.append(r)
                with harness.plaintext_clients():
                    r.session = await xmpp.UnauthedSession.open(port, timeout=REQUEST_TIMEOUT)
                await attempt(r, retry)
                await r.session.close()
                mine = [x for x in racers if x.invite == i]
                if sum(x.ok for x in mine) >= SUCCESSES_BEFORE_REVOKE:
                    rnd["enough"].set()
                if "returned" in rnd and sum(x.sent_at > rnd["returned"] for x in mine) >= SENT_AFTER_REVOKE:
                    rnd["done"].set()

    def run_revoke(i: int):
        rnd = rounds[i]
        rnd["started"] = time.monotonic()
        rnd["result"] = (a, b)[i % 2].prosodyctl("mod_invites", "revoke", HOST, invite_id(tokens[i]))
        rnd["returned"] = time.monotonic()

    workers = [asyncio.ensure_future(worker(w, (a, b)[w % 2].port)) for w in range(2 * WORKERS_PER_PROCESS)]
    try:
        for i, rnd in enumerate(rounds):
            await asyncio.wait_for(rnd["enough"].wait(), 60)
            await asyncio.to_thread(run_revoke, i)
            await asyncio.wait_for(rnd["done"].wait(), 60)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), 2 * (RETRIES + 1) * REQUEST_TIMEOUT)
    await xmpp.close_all()

    listing = listed(b)
    stored = stored_accounts(a)
    for i, rnd in enumerate(rounds):
        rc, out, err = rnd["result"]
        mine = [r for r in racers if r.invite == i]
        before = [r for r in mine if r.sent_at < rnd["started"]]
        during = [r for r in mine if rnd["started"] <= r.sent_at <= rnd["returned"]]
        after = [r for r in mine if r.sent_at > rnd["returned"]]
        print(f"\n[{a.storage}] round {i}: revoke took {rnd['returned'] - rnd['started']:.2f} s; registrations "
              f"sent before it: {len(before)} ({sum(r.ok for r in before)} ok), while it ran: {len(during)} "
              f"({sum(r.ok for r in during)} ok), after it returned: {len(after)} ({sum(r.ok for r in after)} ok); "
              f"refusals after: {dict(Counter(str(r.refusal) for r in after if not r.ok))}")
        assert rc == 0, f"round {i}: revoke failed rc={rc}\n{out}{err}\n{logs(a, b)}"
        assert sum(r.ok for r in before) >= SUCCESSES_BEFORE_REVOKE and len(after) >= SENT_AFTER_REVOKE
        late = [r.describe() for r in after if r.ok]
        assert not late, f"round {i}: registered after the revocation had returned:\n" + "\n".join(late[:20])
        wrong_text = [r.describe() for r in after if not retryable(r.refusal) and r.refusal.text != REVOKED_TEXT]
        assert not wrong_text, "\n".join(wrong_text[:10])
        got = listing.get(invite_id(tokens[i]))
        assert got is not None and got["status"] == "revoked", (i, got)
        rc, out, err = (b, a)[i % 2].prosodyctl("mod_invites", "show", HOST, invite_id(tokens[i]))
        assert rc == 0 and re.search(r"^status:\s+revoked$", out, re.M), out + err

    improper = [r.describe() for r in racers if not answered_properly(r)]
    assert not improper, "\n".join(improper[:20])
    assert stored == {r.username for r in racers if r.ok}, sorted(stored ^ {r.username for r in racers if r.ok})[:20]
    assert a.running and b.running, logs(a, b)
    assert not traceback_logs(a, b), "\n".join(traceback_logs(a, b)[:5])


# ------------------------------------------------------------------ SIGKILL mid-burst

KILL_INVITES, KILL_USES = 10, 10
SENT_AFTER_KILL = 30  # registrations the survivor answers after the kill, then the burst stops
LEASE = 2  # invite_reservation_lease, seconds: the dead process's reservations lapse soon


@pytest.mark.async_timeout(150)
@pytest.mark.server_options(options={"invite_reservation_lease": LEASE})
async def test_sigkill_of_one_process_mid_burst_the_other_serves_and_nothing_is_lost(pair):
    """Workers on both processes register one after another (each on a fresh stream, the
    invites in turn); the first process is killed as soon as one of its clients has an account
    while others of its clients wait for their answer. The survivor's workers go on."""
    a, b = pair
    tokens = generate(pair, KILL_INVITES, KILL_USES)
    retry = a.storage == "sql"
    killed_port = a.port  # a.restart() picks another
    racers: list[Racer] = []
    killed = asyncio.Event()
    enough = asyncio.Event()  # the survivor answered SENT_AFTER_KILL registrations after the kill
    stop = asyncio.Event()
    killed_at = None

    def kill_when_mid_burst():
        """Kill the first process now if it made an account and has registrations in flight."""
        nonlocal killed_at
        mine = [x for x in racers if x.port == killed_port]
        if killed_at is None and any(x.ok for x in mine) and any(x.sent_at and not x.replied_at for x in mine):
            a.proc.kill()
            killed_at = time.monotonic()
            killed.set()

    async def worker(w: int, port: int):
        n = 0
        while not stop.is_set():
            i = (w // 2 + n) % KILL_INVITES  # a worker of each process on the same invite at once
            r = Racer(f"kill{i:02d}x{w}n{n}", tokens[i], i, port)
            n += 1
            try:
                with harness.plaintext_clients():
                    r.session = await xmpp.UnauthedSession.open(port, timeout=REQUEST_TIMEOUT)
            except ConnectionError:
                assert port == killed_port, f"the survivor refused a stream: {logs(a, b)}"
                return  # the killed process is gone
            racers.append(r)
            await attempt(r, retry and port != killed_port)  # a client of the killed one: no retries
            await r.session.close()
            if port == killed_port:
                kill_when_mid_burst()
            if killed_at is not None and sum(x.port == b.port and x.sent_at > killed_at
                                             for x in racers) >= SENT_AFTER_KILL:
                enough.set()

    workers = [asyncio.ensure_future(worker(w, (a, b)[w % 2].port)) for w in range(2 * WORKERS_PER_PROCESS)]
    try:
        await asyncio.wait_for(killed.wait(), 60)
        await asyncio.wait_for(enough.wait(), 60)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), 2 * (RETRIES + 1) * REQUEST_TIMEOUT)
    await xmpp.close_all()

    on_b = [r for r in racers if r.port == b.port]
    improper = [r.describe() for r in on_b if not answered_properly(r)]
    assert b.running, logs(a, b)
    assert not improper, "the surviving process left clients without a proper answer:\n" + "\n".join(improper[:20])
    # Killed with registrations in flight (usually cut short; an answer already on its way
    # still arrives), and the burst went on on the survivor (SENT_AFTER_KILL).
    cut_short = [r for r in racers if r.port == killed_port and not answered_properly(r)]

    a.restart()
    stored = stored_accounts(b)
    per_invite = Counter(invite_of(u) for u in stored)
    told = {r.username for r in racers if r.ok}
    assert told <= stored, sorted(told - stored)  # every account confirmed to a client exists
    assert stored <= {r.username for r in racers}, sorted(stored - {r.username for r in racers})
    over = {i: n for i, n in per_invite.items() if n > KILL_USES}
    assert not over, f"invites above their {KILL_USES} uses (stored accounts): {over}"

    # Once the dead process's reservations have lapsed (the listing settles them), every
    # invite's listed uses are exactly the accounts made with it. A lease is a time (whole
    # seconds of os.time(), taken at or before the kill): nothing to wait for but the clock.
    await asyncio.sleep(max(0.0, killed_at + LEASE + 1.5 - time.monotonic()))
    deadline = time.monotonic() + 20
    while True:
        invites = listed(b)
        wrong = {i: (per_invite[i], invites.get(invite_id(t), {}).get("used")) for i, t in enumerate(tokens)
                 if invites.get(invite_id(t), {}).get("used") != str(per_invite[i])}
        if not wrong or time.monotonic() > deadline:
            break
    assert not wrong, f"invite: (accounts, listed uses) {wrong}"
    print(f"\n[{a.storage}] killed the first process {sum(r.ok and r.replied_at <= killed_at for r in racers)} "
          f"registrations into the burst, {len(cut_short)} of its clients cut short; the survivor registered "
          f"{sum(r.ok and r.sent_at > killed_at for r in on_b)} more after the kill and refused "
          f"{sum(not r.ok and r.sent_at > killed_at for r in on_b)}; {len(stored)} accounts after the restart")

    # Nothing lost: each invite's remaining uses can be taken, on either process, and no more.
    left = [(i, k) for i in range(KILL_INVITES) for k in range(KILL_USES - per_invite[i])]
    final = [Racer(f"kill{i:02d}xf{k}", tokens[i], i, (a, b)[k % 2].port) for i, k in left]
    final += [Racer(f"kill{i:02d}xz", tokens[i], i, (a, b)[i % 2].port) for i in range(KILL_INVITES)]
    await open_sessions(final)
    await asyncio.wait_for(asyncio.gather(*(attempt(r, retry) for r in final[:len(left)])),
                           2 * (RETRIES + 1) * REQUEST_TIMEOUT)
    await asyncio.wait_for(asyncio.gather(*(attempt(r, retry) for r in final[len(left):])),
                           2 * (RETRIES + 1) * REQUEST_TIMEOUT)
    await xmpp.close_all()
    assert all(r.ok for r in final[:len(left)]), [r.describe() for r in final[:len(left)] if not r.ok]
    one_more = [r.describe() for r in final[len(left):]
                if r.ok or not answered_properly(r) or r.refusal.text != USED_TEXT]
    assert not one_more, "an invite gave more than its uses, or no proper refusal:\n" + "\n".join(one_more)
    assert all(got["status"] == "used" for got in listed(a).values()), listed(a)
    assert a.running and b.running, logs(a, b)
    assert not traceback_logs(a, b), "\n".join(traceback_logs(a, b)[:5])
