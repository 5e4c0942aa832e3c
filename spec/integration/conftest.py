"""Fixtures for the Prosody integration tests. See NOTES.md."""

from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import harness  # noqa: E402
import xmpp  # noqa: E402

# Overall bound for one async test (seconds); override per test with
# @pytest.mark.async_timeout(N).
ASYNC_TEST_TIMEOUT = float(os.environ.get("ASYNC_TEST_TIMEOUT", "60"))

# "pgsql" is in the default set: a missing PostgreSQL makes its tests FAIL (clear message), not skip.
_ALL_STORAGES = harness.STORAGES  # ("internal", "sql", "pgsql")


def _storages():
    want = os.environ.get("INVITES_STORAGE", "")
    if not want:
        return list(_ALL_STORAGES)
    chosen = [s.strip() for s in want.split(",") if s.strip()]
    bad = [s for s in chosen if s not in _ALL_STORAGES]
    if bad:
        raise pytest.UsageError(
            f"INVITES_STORAGE: unknown storage {bad}; use a comma-separated subset of {','.join(_ALL_STORAGES)}"
        )
    return chosen


def pytest_configure(config):
    config.addinivalue_line("markers", "async_timeout(seconds): overall bound for an async test")
    config.addinivalue_line("markers", "server_options(**kw): keyword arguments for the `server` fixture")


def pytest_report_header(config):
    header = f"INVITES_IMPL={harness.invites_impl()} storages={','.join(_storages())}"
    if "pgsql" in _storages():
        dsn = os.environ.get("INVITES_PGSQL_DSN")
        header += " pgsql=" + ("INVITES_PGSQL_DSN (existing server)" if dsn else "own server, started on first use")
    return header


def pytest_terminal_summary(terminalreporter):
    """Which versions ran: a pinned one Debian no longer has is replaced by its newest (see
    .ci/prosody13, .ci/prosody-root), and the log says which was tested."""
    terminalreporter.write_line(
        f"Tested on Prosody {harness.prosody_version()}"
        f" with prosody-modules {harness.prosody_modules_version() or '(none)'}")


def pytest_sessionfinish(session, exitstatus):
    """The PostgreSQL of storage=pgsql lives for the whole run (one per pytest process); stop it here."""
    harness.stop_shared_pgsql()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Run ``async def`` tests in a fresh event loop, bounded, closing all XMPP clients afterwards."""
    fn = pyfuncitem.obj
    if not inspect.iscoroutinefunction(fn):
        return None
    marker = pyfuncitem.get_closest_marker("async_timeout")
    timeout = float(marker.args[0]) if marker else ASYNC_TEST_TIMEOUT
    argnames = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in argnames}
    xmpp.run(fn(**kwargs), timeout)
    return True


# ------------------------------------------------------------------ servers


@pytest.fixture(params=_storages())
def storage(request):
    return request.param


def storage_fixture(*names):
    """A `storage` fixture for one test module that runs on `names` only (as far as
    INVITES_STORAGE allows; none left: its tests are skipped). In the module:
    ``storage = storage_fixture("internal", "sql")``."""

    @pytest.fixture(params=[s for s in names if s in _storages()])
    def storage(request):
        return request.param

    return storage


@pytest.fixture(scope="session")
def pgsql():
    """The run's shared PostgreSQL (harness.PgsqlCluster), started on first use; fails if unavailable."""
    try:
        return harness.shared_pgsql()
    except harness.PgsqlUnavailable as e:
        problem = str(e)
    pytest.fail(problem, pytrace=False)


@pytest.fixture
def make_server(storage, request):
    """Factory: make_server(**ProsodyServer kwargs) -> started ProsodyServer (stopped at teardown).

    Uses the parametrised storage unless storage= is given.
    """
    servers = []

    def factory(**kw):
        kw.setdefault("storage", storage)
        if kw.get("third_party"):
            missing = harness.third_party_missing()
            if missing and os.environ.get("CI", "") in ("", "0", "false"):
                pytest.skip(missing)
            if missing:
                pytest.fail(missing + " (CI: the third-party modules must be there)", pytrace=False)
        problem = None
        try:
            srv = harness.ProsodyServer(**kw)
            servers.append(srv)
            srv.start()
        except (harness.ImplementationMissing, harness.PgsqlUnavailable) as e:
            problem = str(e)
        if problem:  # outside the except block: no exception chain in the report
            pytest.fail(problem, pytrace=False)
        return srv

    yield factory
    request.node._prosody_servers = list(servers)
    for srv in servers:
        srv.cleanup()


@pytest.fixture
def server(make_server, request):
    """A fresh, started Prosody (per test), for each storage backend.

    Options via ``@pytest.mark.server_options(registration_invite_only=False, ...)``.
    """
    marker = request.node.get_closest_marker("server_options")
    kw = dict(marker.kwargs) if marker else {}
    srv = make_server(**kw)
    request.node._prosody_server = srv
    return srv


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, attach the tail of the Prosody logs to the report."""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        srv = getattr(item, "_prosody_server", None)
        if srv is not None and srv.dir.exists():
            rep.sections.append(("prosody logs", srv.tail(60)))
        pg = getattr(srv, "pgsql", None)
        if pg is not None and pg.log_path is not None and srv.pg_database:
            try:
                lines = [ln for ln in pg.log_path.read_text(errors="replace").splitlines() if srv.pg_database in ln]
            except OSError:
                lines = []
            if lines:
                rep.sections.append(("postgres log (this server's database)", "\n".join(lines[-30:])))


# ------------------------------------------------------------------ accounts


@dataclass
class Account:
    username: str
    password: str
    host: str = harness.HOST

    @property
    def jid(self) -> str:
        return f"{self.username}@{self.host}"


@pytest.fixture
def make_user(server):
    """Factory: make_user(username, password=None) -> Account, created with `prosodyctl register`."""

    def factory(username: str, password: str | None = None) -> Account:
        password = password or f"{username}-secret"
        server.register_user(username, password)
        return Account(username, password)

    return factory


@pytest.fixture
def admin(make_user):
    """Account admin@localhost (listed in `admins` in the generated config)."""
    return make_user("admin", "admin-secret")
