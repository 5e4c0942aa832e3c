"""Start and drive a real Prosody 0.12 process on loopback for integration tests.

Usage (see NOTES.md):

    with ProsodyServer(storage="internal") as srv:
        uri = srv.generate_invite()
        ...
        other = srv.twin()  # a second Prosody process serving the host on the same storage

The implementation under test is selected with the environment variable
INVITES_IMPL:

* ``ours`` (default): ``plugin_paths`` starts with ``<repo>/build/plugins``, so
  our mod_invites / mod_invites_register shadow Prosody's own modules.
* ``stock``: Prosody's own modules from /usr/lib/prosody/modules.

In both cases ``spec/integration/plugins`` (the test-only mod_invites_testhook)
is on the plugin path too, after the build folder.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Iterable, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
# INVITES_PLUGINS_DIR overrides where INVITES_IMPL=ours looks for the built plugins.
BUILD_PLUGINS = Path(os.environ.get("INVITES_PLUGINS_DIR") or (REPO / "build" / "plugins")).resolve()
TEST_PLUGINS = HERE / "plugins"
# Stand-ins for community modules that Debian ships for Prosody 13 but not for 0.12.
TEST_PLUGINS_012 = HERE / "plugins-0.12"
# Unmodified third-party modules (Snikket's, prosody-modules' newer ones), one set per Prosody
# version, beside the repo (see its README). Never copied into the repo.
THIRD_PARTY = Path(os.environ.get("INVITES_THIRD_PARTY_DIR") or (REPO.parent / "shared" / "third-party")).resolve()

PROSODY = os.environ.get("PROSODY_BIN", "prosody")
PROSODYCTL = os.environ.get("PROSODYCTL_BIN", "prosodyctl")

HOST = "localhost"
LOOPBACK = "127.0.0.1"

# Log line written by mod_invites_testhook on "server-started"; the harness
# waits for it (plus the c2s port) before declaring the server up.
READY_RE = re.compile(
    r"invites_testhook ready: mod_invites=(?P<invites>\S+) mod_invites_register=(?P<register>\S+)"
)

DEFAULT_MODULES = (
    "roster",
    "saslauth",
    "register",
    "invites",
    "invites_register",
    "presence",
    "invites_testhook",
)


class HarnessError(RuntimeError):
    pass


class ImplementationMissing(HarnessError):
    """INVITES_IMPL=ours but the built plugins are not there."""


class ThirdPartyMissing(HarnessError):
    """../shared/third-party (or INVITES_THIRD_PARTY_DIR) is not there: skipped, failed under CI."""


class PgsqlUnavailable(HarnessError):
    """storage="pgsql" but there is no PostgreSQL to start (or to reach with INVITES_PGSQL_DSN)."""


STORAGES = ("internal", "sql", "pgsql")


def third_party_dir() -> Path:
    """The third-party modules for the Prosody version under test."""
    return THIRD_PARTY / ("prosody-13" if prosody_major_version() >= 13 else "prosody-0.12")


def third_party_missing() -> str | None:
    """Why the third-party modules cannot be used, or None."""
    d = third_party_dir()
    return None if d.is_dir() else f"third-party modules not found at {d} (set INVITES_THIRD_PARTY_DIR)"


def invites_impl() -> str:
    impl = os.environ.get("INVITES_IMPL", "ours").strip().lower() or "ours"
    if impl not in ("ours", "stock"):
        raise HarnessError(f"INVITES_IMPL must be 'ours' or 'stock', not {impl!r}")
    return impl


def built_plugin_missing() -> list[str]:
    """Names of the plugins that INVITES_IMPL=ours needs but are absent."""
    missing = []
    for name in ("mod_invites", "mod_invites_register"):
        if not ((BUILD_PLUGINS / name / f"{name}.lua").is_file() or (BUILD_PLUGINS / f"{name}.lua").is_file()):
            missing.append(name)
    return missing


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def lua_str(value: str) -> str:
    """Quote a Python string as a Lua string literal."""
    out = ['"']
    for ch in str(value):
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append("\\%03d" % ord(ch))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def lua_value(value) -> str:
    """Render a Python value (bool/int/float/str/list/tuple/dict/None) as Lua."""
    if value is None:
        return "nil"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return lua_str(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return "{ " + "; ".join(lua_value(v) for v in value) + " }"
    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            if isinstance(k, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                parts.append(f"{k} = {lua_value(v)}")
            else:
                parts.append(f"[{lua_value(k)}] = {lua_value(v)}")
        return "{ " + "; ".join(parts) + " }"
    raise TypeError(f"cannot render {value!r} as Lua")


# --------------------------------------------------------------- PostgreSQL
#
# storage="pgsql" runs Prosody's mod_storage_sql with driver "PostgreSQL". By default the
# harness starts ONE PostgreSQL server per Python process (so one per pytest run), lazily, on
# the first pgsql ProsodyServer: initdb into a temp dir, listening on 127.0.0.1 only (plus a
# unix socket inside that temp dir), started with `pg_ctl -w`, stopped and removed at exit
# (conftest also stops it in pytest_sessionfinish). Every pgsql ProsodyServer gets its own fresh
# database, dropped by cleanup(). INVITES_PGSQL_DSN points at an existing server instead.

PG_SUPERUSER = "postgres"  # bootstrap superuser of the cluster we initdb (trust on loopback)
PG_ROLE = "prosody"  # what Prosody logs in as (scram-sha-256 password, owns each test database)
PG_PASSWORD = "prosody-test-secret"
PG_SERVER_TOOLS = ("initdb", "pg_ctl", "postgres")
PG_CLIENT_TOOLS = ("psql", "pg_dump")
# Where LuaDBI's PostgreSQL driver (Debian: lua-dbi-postgresql; LuaRocks: luadbi-postgresql) lives.
LUADBI_PG_GLOBS = (
    "/usr/lib/*/lua/*/dbd/postgresql.so",
    "/usr/lib/lua/*/dbd/postgresql.so",
    "/usr/local/lib/lua/*/dbd/postgresql.so",
    "/usr/local/lib/*/lua/*/dbd/postgresql.so",
)
_INSTALL_HINT = (
    "install Debian's `postgresql` and `lua-dbi-postgresql` (apt-get install postgresql lua-dbi-postgresql), "
    "or set INVITES_PGSQL_DSN=postgresql://USER:PASSWORD@HOST:PORT/postgres to use an existing server, "
    "or leave pgsql out of INVITES_STORAGE"
)


def _pg_version_key(bindir: Path):
    try:
        return tuple(int(x) for x in bindir.parent.name.split("."))
    except ValueError:
        return (-1,)


def pg_bindirs() -> list[Path]:
    """Candidate PostgreSQL bin dirs, newest first: INVITES_PGSQL_BINDIR, else /usr/lib/postgresql/*/bin."""
    env = os.environ.get("INVITES_PGSQL_BINDIR")
    if env:
        return [Path(env)]
    return sorted((Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")), key=_pg_version_key, reverse=True)


def _is_exe(p: Path) -> bool:
    return p.is_file() and os.access(p, os.X_OK)


def pg_server_bindir() -> Path:
    """The bin dir holding initdb, pg_ctl, postgres, psql and pg_dump, or PgsqlUnavailable."""
    for d in pg_bindirs():
        if all(_is_exe(d / t) for t in PG_SERVER_TOOLS + PG_CLIENT_TOOLS):
            return d
    where = os.environ.get("INVITES_PGSQL_BINDIR") or "/usr/lib/postgresql/<version>/bin"
    raise PgsqlUnavailable(
        f"storage=pgsql: no PostgreSQL server binaries ({', '.join(PG_SERVER_TOOLS + PG_CLIENT_TOOLS)}) "
        f"under {where}; {_INSTALL_HINT}"
    )


def pg_client_tool(name: str) -> str:
    """psql / pg_dump: from a PostgreSQL bin dir (newest), else from PATH."""
    for d in pg_bindirs():
        if _is_exe(d / name):
            return str(d / name)
    found = shutil.which(name)
    if found:
        return found
    raise PgsqlUnavailable(f"storage=pgsql: `{name}` not found (Debian: postgresql-client); {_INSTALL_HINT}")


def luadbi_postgresql_present() -> bool:
    return any(glob.glob(g) for g in LUADBI_PG_GLOBS)


def _pg_env(extra: dict | None = None) -> dict:
    """The environment minus libpq's PG* variables (they would silently redirect psql/pg_dump)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({"PGCONNECT_TIMEOUT": "10", "LC_ALL": "C"})
    if extra:
        env.update(extra)
    return env


def pg_ident(name: str) -> str:
    """Quote an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def pg_literal(value: str) -> str:
    """Quote an SQL string literal (standard_conforming_strings is on in every supported version)."""
    return "'" + str(value).replace("'", "''") + "'"


class SqlResult(list):
    """Rows (tuples) of sql_query(); .rowcount: rows changed by INSERT/UPDATE/DELETE, len(rows) for a query."""

    rowcount: int = -1


class _JsonObj(list):
    """Key/value pairs of a JSON object, in order (json.loads object_pairs_hook)."""


def _from_json(v):
    if isinstance(v, _JsonObj):
        return {k: _from_json(x) for k, x in v}
    if isinstance(v, list):
        return [_from_json(x) for x in v]
    return v


_ROWS_STATEMENT = re.compile(r"^\s*(select|with|values|table)\b", re.I)
_DML_TAG = re.compile(r"^(INSERT \d+|UPDATE|DELETE|MERGE|COPY|SELECT) (\d+)$")


def _placeholders_to_psql(query: str, params: Sequence) -> tuple[str, dict]:
    """`?` placeholders (sqlite3 style) -> psql variables :'p1' (quoted by psql itself)."""
    out, variables, n = [], {}, 0
    i, quote = 0, None
    while i < len(query):
        ch = query[i]
        if quote:
            if ch == quote:
                quote = None
            out.append(ch)
        elif ch in ("'", '"'):
            quote = ch
            out.append(ch)
        elif ch == "-" and query.startswith("--", i):
            j = query.find("\n", i)
            j = len(query) if j < 0 else j
            out.append(query[i:j])
            i = j
            continue
        elif ch == "?":
            if n >= len(params):
                raise HarnessError(f"sql_query: more ? than parameters ({len(params)}) in {query!r}")
            v = params[n]
            n += 1
            if v is None:
                out.append("NULL")
            elif isinstance(v, bool):
                out.append("true" if v else "false")
            elif isinstance(v, (int, float)):
                out.append(repr(v))
            else:
                if isinstance(v, bytes):
                    v = v.decode()
                name = f"p{n}"
                variables[name] = str(v)
                out.append(f":'{name}'")
        else:
            out.append(ch)
        i += 1
    if n != len(params):
        raise HarnessError(f"sql_query: {len(params)} parameters for {n} placeholders in {query!r}")
    return "".join(out), variables


class PgsqlCluster:
    """A PostgreSQL server for storage="pgsql".

    PgsqlCluster() starts its own (initdb in a temp dir, 127.0.0.1 on a free port, pg_ctl -w);
    PgsqlCluster(dsn="postgresql://user:pw@host:port/db") uses an existing server (the user needs
    CREATEDB; databases are created and dropped there, nothing else is touched).
    """

    def __init__(self, dsn: str | None = None, *, start_timeout: float = 60.0, keep_dir: bool | None = None):
        self.managed = not dsn
        self.dsn = dsn
        self.start_timeout = start_timeout
        if keep_dir is None:
            keep_dir = os.environ.get("PROSODY_KEEP_DIR", "") not in ("", "0")
        self.keep_dir = keep_dir
        self.dir: Path | None = None
        self.bindir: Path | None = None
        self.host = LOOPBACK
        self.port: int | None = None
        self.admin_db = "postgres"
        self.admin_user = PG_SUPERUSER
        self.admin_password: str | None = None
        self.role = PG_ROLE
        self.password: str | None = PG_PASSWORD
        self.started = False
        self.databases: set[str] = set()
        self._counter = itertools.count(1)
        if not self.managed:
            self._parse_dsn(dsn)

    # ------------------------------------------------------------ set-up

    def _parse_dsn(self, dsn: str):
        u = urllib.parse.urlsplit(dsn)
        if u.scheme not in ("postgresql", "postgres"):
            raise PgsqlUnavailable(f"INVITES_PGSQL_DSN must be postgresql://USER:PASSWORD@HOST:PORT/DB, not {dsn!r}")
        q = urllib.parse.parse_qs(u.query)
        netloc_host = u.netloc.rpartition("@")[2]
        if netloc_host.startswith("["):
            host = netloc_host[1: netloc_host.index("]")]
        else:
            host = urllib.parse.unquote(netloc_host.split(":")[0]) if netloc_host else ""
        self.host = (q.get("host") or [host])[0] or "127.0.0.1"  # a /path is a unix socket dir
        self.port = int((q.get("port") or [u.port or 5432])[0])
        self.admin_user = urllib.parse.unquote(u.username) if u.username else PG_SUPERUSER
        self.admin_password = urllib.parse.unquote(u.password) if u.password is not None else None
        self.admin_db = urllib.parse.unquote(u.path.lstrip("/")) or "postgres"
        self.role, self.password = self.admin_user, self.admin_password

    def _as_postgres(self) -> dict:
        """Popen kwargs running a server tool as the `postgres` user when we are root (PostgreSQL refuses root)."""
        if os.geteuid() != 0:
            return {}
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise PgsqlUnavailable(
                "storage=pgsql: running as root, and PostgreSQL refuses to run as root, but there is no "
                f"`postgres` system user to run it as (Debian's postgresql package creates it); {_INSTALL_HINT}"
            ) from None
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def _server_tool(self, *args, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
        assert self.bindir is not None and self.dir is not None
        p = subprocess.run(
            [str(self.bindir / args[0]), *map(str, args[1:])],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(self.dir),
            env=_pg_env({"HOME": str(self.dir)}),
            **self._as_postgres(),
        )
        if check and p.returncode != 0:
            raise PgsqlUnavailable(
                f"storage=pgsql: {args[0]} failed rc={p.returncode}\n{p.stdout}\n{p.stderr}\n{self.log_tail()}"
            )
        return p

    @property
    def data_dir(self) -> Path | None:
        return self.dir / "data" if self.dir else None

    @property
    def log_path(self) -> Path | None:
        return self.dir / "postgres.log" if self.dir else None

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-n:]
        except (AttributeError, OSError):
            return ""
        return f"--- postgres.log ({self.log_path}) ---\n" + "\n".join(lines)

    def start(self) -> "PgsqlCluster":
        if self.started:
            return self
        if not luadbi_postgresql_present():
            raise PgsqlUnavailable(
                "storage=pgsql: LuaDBI's PostgreSQL driver (dbd/postgresql.so) is not installed, so Prosody "
                f"could not connect; {_INSTALL_HINT}"
            )
        if self.managed:
            self._start_managed()
        else:
            try:  # reachable, credentials work
                self.psql("SELECT 1", database=self.admin_db, admin=True)
            except (HarnessError, subprocess.TimeoutExpired) as e:
                raise PgsqlUnavailable(
                    f"storage=pgsql: cannot use INVITES_PGSQL_DSN (host={self.host} port={self.port} "
                    f"user={self.admin_user} database={self.admin_db}): {e}"
                ) from None
        self.started = True
        return self

    def _start_managed(self):
        self.bindir = pg_server_bindir()
        creds = self._as_postgres()  # fails early and clearly without a postgres user
        self.dir = Path(tempfile.mkdtemp(prefix="prosody-pgsql-"))
        try:
            if creds:
                os.chown(self.dir, creds["user"], creds["group"])
            t0 = time.monotonic()
            self._server_tool(
                "initdb", "-D", self.data_dir, "-U", PG_SUPERUSER, "-A", "trust", "-E", "UTF8",
                "--locale=C", "--no-sync", timeout=self.start_timeout,
            )
            # Files stay owned by postgres: rewriting existing files keeps their owner.
            (self.data_dir / "pg_hba.conf").write_text(
                "# generated by spec/integration/harness.py\n"
                "local all all trust\n"
                f"host all {PG_SUPERUSER} 127.0.0.1/32 trust\n"
                "host all all 127.0.0.1/32 scram-sha-256\n"
            )
            with open(self.data_dir / "postgresql.conf", "a") as f:
                f.write(
                    "\n# generated by spec/integration/harness.py: a throwaway test cluster\n"
                    "listen_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = {pg_literal(self.dir)}\n"
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                    "password_encryption = 'scram-sha-256'\n"
                    "logging_collector = off\n"
                    "log_line_prefix = '%m [%p] %q%u@%d '\n"
                )
            last = ""
            for _attempt in range(3):  # the free port can be taken before postgres binds it
                self.port = free_port()
                remaining = max(5.0, self.start_timeout - (time.monotonic() - t0))
                # -w: pg_ctl returns once the server accepts connections, or fails after -t seconds.
                p = self._server_tool(
                    "pg_ctl", "-D", self.data_dir, "-l", self.log_path, "-w", "-t", int(remaining),
                    "-o", f"-p {self.port}", "start", timeout=remaining + 10, check=False,
                )
                if p.returncode == 0:
                    break
                last = f"pg_ctl start rc={p.returncode}\n{p.stdout}\n{p.stderr}\n{self.log_tail()}"
                if "Address already in use" not in self.log_tail(10):
                    break
            else:
                p = None
            if p is None or p.returncode != 0:
                raise PgsqlUnavailable(f"storage=pgsql: PostgreSQL did not start in {self.dir}\n{last}")
            self.started = True
            self.psql(
                f"CREATE ROLE {pg_ident(PG_ROLE)} LOGIN PASSWORD {pg_literal(PG_PASSWORD)}",
                database="postgres", admin=True,
            )
            self.start_seconds = time.monotonic() - t0
        except BaseException:
            self.stop()
            raise

    def stop(self):
        """Stops a server we started and removes its dir (kept with PROSODY_KEEP_DIR=1)."""
        if self.managed and self.dir is not None:
            if self.data_dir and (self.data_dir / "postmaster.pid").exists():
                p = self._server_tool("pg_ctl", "-D", self.data_dir, "-m", "fast", "-w", "-t", 30, "stop",
                                      timeout=40, check=False)
                if p.returncode != 0:
                    self._server_tool("pg_ctl", "-D", self.data_dir, "-m", "immediate", "-w", "-t", 30, "stop",
                                      timeout=40, check=False)
            if not self.keep_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
                self.dir = None
        elif not self.managed and self.started:
            for name in sorted(self.databases):  # leftovers of servers never cleaned up
                self.drop_database(name)
        self.started = False

    # ------------------------------------------------------------ clients

    def _conn_args(self, database: str, admin: bool) -> tuple[list[str], dict]:
        user, password = (self.admin_user, self.admin_password) if admin else (self.role, self.password)
        args = ["-h", str(self.host), "-p", str(self.port), "-U", user, "-d", database]
        env = _pg_env({"PGAPPNAME": "prosody-invites-harness"})
        if password is not None:
            env["PGPASSWORD"] = password
        return args, env

    def psql(self, sql: str, *, database: str | None = None, variables: dict | None = None,
             admin: bool = False, quiet: bool = True, timeout: float = 30.0) -> str:
        """Runs SQL (read from stdin, so :'var' interpolation works) and returns psql's unaligned output."""
        conn, env = self._conn_args(database or self.admin_db, admin)
        cmd = [pg_client_tool("psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", *conn]
        if quiet:
            cmd.append("-q")
        for k, v in (variables or {}).items():
            cmd += ["-v", f"{k}={v}"]
        p = subprocess.run(cmd, input=sql if sql.rstrip().endswith(";") else sql + ";\n",
                           capture_output=True, text=True, timeout=timeout, env=env, cwd="/")
        if p.returncode != 0:
            raise HarnessError(f"psql failed rc={p.returncode}: {p.stderr.strip()}\nSQL: {sql}")
        return p.stdout

    def query(self, database: str, query: str, *params) -> SqlResult:
        """sqlite3-style query (`?` placeholders) on `database` as the Prosody role."""
        sql, variables = _placeholders_to_psql(query.strip().rstrip(";"), params)
        res = SqlResult()
        if _ROWS_STATEMENT.match(sql):
            out = self.psql(f"SELECT coalesce(json_agg(q), '[]'::json) FROM (\n{sql}\n) AS q",
                            database=database, variables=variables)
            for row in json.loads(out.strip() or "[]", object_pairs_hook=_JsonObj):
                res.append(tuple(_from_json(v) for _k, v in row))
            res.rowcount = len(res)
            return res
        out = self.psql(sql, database=database, variables=variables, quiet=False)
        for line in out.splitlines():
            m = _DML_TAG.match(line.strip())
            if m:
                res.rowcount = int(m.group(2))
            elif line and not re.match(r"^[A-Z][A-Z ]*$", line):  # RETURNING rows, unaligned, as text
                res.append(tuple(line.split("|")))
        return res

    def create_database(self) -> str:
        """A fresh, empty UTF-8 database owned by the Prosody role; returns its name."""
        self.start()
        name = f"prosody_test_{os.getpid()}_{next(self._counter)}_{secrets.token_hex(3)}"
        self.psql(
            f"CREATE DATABASE {pg_ident(name)} OWNER {pg_ident(self.role)} TEMPLATE template0 "
            "ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'",
            database=self.admin_db, admin=True, timeout=60,
        )
        self.databases.add(name)
        return name

    def drop_database(self, name: str):
        if self.started:
            # WITH (FORCE): a connection of a killed prosody/prosodyctl must not keep it alive.
            self.psql(f"DROP DATABASE IF EXISTS {pg_ident(name)} WITH (FORCE)",
                      database=self.admin_db, admin=True, timeout=60)
        self.databases.discard(name)

    def dump(self, database: str, timeout: float = 30.0) -> bytes:
        """pg_dump (plain SQL; table data as COPY text) of one database."""
        conn, env = self._conn_args(database, admin=False)
        p = subprocess.run(
            [pg_client_tool("pg_dump"), "--no-owner", "--no-privileges", *conn],
            capture_output=True, timeout=timeout, env=env, cwd="/",
        )
        if p.returncode != 0:
            raise HarnessError(f"pg_dump {database} failed rc={p.returncode}: {p.stderr.decode(errors='replace')}")
        return p.stdout

    def sql_config(self, database: str) -> dict:
        """The `sql = { ... }` option for Prosody."""
        cfg = {"driver": "PostgreSQL", "database": database, "host": str(self.host), "port": self.port,
               "username": self.role}
        if self.password is not None:
            cfg["password"] = self.password
        return cfg

    def __repr__(self):
        where = f"dir={self.dir}" if self.managed else f"dsn-host={self.host}"
        return f"<PgsqlCluster {where} port={self.port} started={self.started}>"


_shared_pgsql: PgsqlCluster | None = None
_shared_pgsql_error: PgsqlUnavailable | None = None


def shared_pgsql() -> PgsqlCluster:
    """The process-wide PostgreSQL for storage="pgsql", started on first use (INVITES_PGSQL_DSN: existing one).

    A failure to start is remembered, so later servers fail at once with the same message.
    """
    global _shared_pgsql, _shared_pgsql_error
    if _shared_pgsql_error is not None:
        raise PgsqlUnavailable(str(_shared_pgsql_error))
    if _shared_pgsql is None:
        cluster = PgsqlCluster(dsn=os.environ.get("INVITES_PGSQL_DSN") or None)
        try:
            cluster.start()
        except PgsqlUnavailable as e:
            _shared_pgsql_error = e
            raise
        _shared_pgsql = cluster
        atexit.register(stop_shared_pgsql)
    return _shared_pgsql


def stop_shared_pgsql():
    """Stops (and removes) the shared PostgreSQL if it was started. Safe to call more than once."""
    global _shared_pgsql
    cluster, _shared_pgsql = _shared_pgsql, None
    if cluster is not None:
        cluster.stop()


def _copy_escape(needle: bytes) -> bytes:
    """How COPY ... TO STDOUT (text format, as in pg_dump) writes these bytes."""
    return (needle.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
            .replace(b"\t", b"\\t"))


_PROSODY_VERSION = None


def prosody_version() -> str:
    """Version of the Prosody under test, as `prosodyctl about` gives it ("13.0.6"), asked once."""
    global _PROSODY_VERSION
    if _PROSODY_VERSION is None:
        out = subprocess.run([PROSODYCTL, "about"], capture_output=True, text=True, timeout=60).stdout
        m = re.search(r"^Prosody (\S+)", out, re.M)
        _PROSODY_VERSION = m.group(1) if m else "unknown"
    return _PROSODY_VERSION


def prosody_major_version() -> int:
    """Major version of the Prosody under test (0 for 0.12, 13 for 13.x)."""
    m = re.match(r"(\d+)\.", prosody_version())
    return int(m.group(1)) if m else 0


def _debian_version(status: Path, package: str) -> str | None:
    if not status.exists():
        return None
    for stanza in status.read_text(errors="replace").split("\n\n"):
        if re.search(rf"^Package: {re.escape(package)}$", stanza, re.M):
            m = re.search(r"^Version: (\S+)$", stanza, re.M)
            return m.group(1) if m else None
    return None


def prosody_modules_version() -> str:
    """Debian version of the prosody-modules beside the Prosody under test: the host's
    package, the one in a Debian root made by .ci/prosody-root, or the .deb that
    .ci/prosody13 extracted ("" when none is found)."""
    launcher = Path(shutil.which(PROSODY) or PROSODY).resolve()
    prefix = launcher.parent.parent  # DIR of DIR/bin/prosody
    found = _debian_version(prefix / "root" / "var/lib/dpkg/status", "prosody-modules")
    if found is None:
        debs = sorted((prefix / "deb").glob("prosody-modules_*.deb"))
        found = debs[0].name.split("_")[1] if debs else None
    if found is None:
        found = _debian_version(Path("/var/lib/dpkg/status"), "prosody-modules")
    return found or ""


def prosody_modules_snapshot() -> int:
    """The date of that prosody-modules snapshot (20260723 for 0.0~hg20260723.…), or 0."""
    m = re.search(r"hg(\d{8})", prosody_modules_version())
    return int(m.group(1)) if m else 0


class ProsodyServer:
    """One Prosody process with its own config, data dir and c2s port.

    Parameters
    ----------
    storage: "internal", "sql" (SQLite3 file inside the temp dir) or "pgsql" (a fresh database
        of the shared PostgreSQL, see shared_pgsql(); dropped by cleanup()).
    impl: "ours" or "stock"; default from INVITES_IMPL.
    registration_invite_only: value for the option of the same name
        (None leaves it out of the config, i.e. module default).
    allow_registration: written only when not None.
    extra_modules: more names appended to the VirtualHost's modules_enabled.
    extra_config: Lua lines appended to the global section (before VirtualHost).
    extra_host_config: Lua lines appended inside the VirtualHost section.
    options: dict of global options rendered with lua_value().
    host_options: dict of VirtualHost options rendered with lua_value().
    admins: JIDs for the ``admins`` option.
    testhook: load mod_invites_testhook (default True).
    pgsql: the PgsqlCluster for storage="pgsql" (default: shared_pgsql()).
    extra_hosts: {host: {option: value}} more VirtualHosts after the first, each with the
        same modules_enabled (plus its own options, rendered with lua_value()).
    third_party: also put the third-party modules for this Prosody version
        (THIRD_PARTY/prosody-13 or prosody-0.12) on plugin_paths, after ours and before the
        test stand-ins (so the real mod_groups_internal is used).
    storage_of: another ProsodyServer whose storage this one shares (its data directory, SQLite
        file or PostgreSQL database) instead of having its own; see twin(), which is the way to
        make one. Such a server never removes or drops that storage: its owner does.
    """

    def __init__(
        self,
        storage: str = "internal",
        *,
        impl: str | None = None,
        registration_invite_only: bool | None = True,
        allow_registration: bool | None = None,
        extra_modules: Sequence[str] = (),
        extra_config: str | Iterable[str] = (),
        extra_host_config: str | Iterable[str] = (),
        options: dict | None = None,
        host_options: dict | None = None,
        admins: Sequence[str] = ("admin@localhost",),
        testhook: bool = True,
        start_timeout: float = 20.0,
        stop_timeout: float = 10.0,
        keep_dir: bool | None = None,
        pgsql: PgsqlCluster | None = None,
        extra_hosts: dict | None = None,
        third_party: bool = False,
        storage_of: "ProsodyServer | None" = None,
    ):
        if storage not in STORAGES:
            raise HarnessError(f"storage must be one of {', '.join(STORAGES)}, not {storage!r}")
        self.storage = storage
        self.impl = impl or invites_impl()
        if self.impl not in ("ours", "stock"):
            raise HarnessError(f"impl must be 'ours' or 'stock', not {self.impl!r}")
        if self.impl == "ours":
            missing = built_plugin_missing()
            if missing:
                raise ImplementationMissing(
                    f"INVITES_IMPL=ours but {', '.join(missing)} not found under {BUILD_PLUGINS} "
                    "(build the plugins first, or run with INVITES_IMPL=stock)"
                )
        self.registration_invite_only = registration_invite_only
        self.allow_registration = allow_registration
        self.extra_modules = list(extra_modules)
        self.extra_config = [extra_config] if isinstance(extra_config, str) else list(extra_config)
        self.extra_host_config = (
            [extra_host_config] if isinstance(extra_host_config, str) else list(extra_host_config)
        )
        self.options = dict(options or {})
        self.host_options = dict(host_options or {})
        self.admins = list(admins)
        self.extra_hosts = {h: dict(o or {}) for h, o in (extra_hosts or {}).items()}
        self.third_party = third_party
        self.testhook = testhook
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        if keep_dir is None:
            keep_dir = os.environ.get("PROSODY_KEEP_DIR", "") not in ("", "0")
        self.keep_dir = keep_dir

        if storage_of is not None and storage_of.storage != storage:
            raise HarnessError(f"storage_of: that server's storage is {storage_of.storage!r}, not {storage!r}")
        # The server whose storage this one shares (None: its own), and the servers sharing ours.
        self.storage_of = storage_of
        self.twins: list[ProsodyServer] = []

        self.host = HOST
        self.dir = Path(tempfile.mkdtemp(prefix=f"prosody-{self.impl}-{storage}-"))
        if storage_of is None:
            self.data_dir = self.dir / "data"
            self.data_dir.mkdir(mode=0o750)
        else:
            self.data_dir = storage_of.data_dir
        self.certs_dir = self.dir / "certs"
        self.certs_dir.mkdir()
        self.config_path = self.dir / "prosody.cfg.lua"
        self.log_path = self.dir / "prosody.log"
        self.err_path = self.dir / "prosody.err"
        self.stdout_path = self.dir / "stdout.txt"
        self.pid_path = self.dir / "prosody.pid"
        self.sqlite_path = self.dir / "prosody.sqlite" if storage_of is None else storage_of.sqlite_path
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.module_paths: dict[str, str] = {}
        self._stdout_file = None
        self.pgsql: PgsqlCluster | None = None
        self.pg_database: str | None = None
        self.pg_dump_path = self.dir / "pgsql-dump.sql"
        if storage_of is not None:
            self.pgsql = storage_of.pgsql
            self.pg_database = storage_of.pg_database
            storage_of.twins.append(self)
        elif storage == "pgsql":
            try:
                self.pgsql = pgsql or shared_pgsql()
                self.pg_database = self.pgsql.create_database()
            except BaseException:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise

    # ------------------------------------------------------------------ config

    @property
    def plugin_paths(self) -> list[str]:
        paths = []
        if self.impl == "ours":
            paths.append(str(BUILD_PLUGINS))
        if self.third_party:
            # Before the test stand-ins: the real mod_groups_internal wins over ours.
            missing = third_party_missing()
            if missing:
                raise ThirdPartyMissing(missing)
            paths.append(str(third_party_dir()))
        if self.testhook:
            paths.append(str(TEST_PLUGINS))
        if prosody_major_version() < 13:
            paths.append(str(TEST_PLUGINS_012))
        return paths

    @property
    def modules(self) -> list[str]:
        mods = [m for m in DEFAULT_MODULES if self.testhook or m != "invites_testhook"]
        for m in self.extra_modules:
            if m not in mods:
                mods.append(m)
        return mods

    def render_config(self) -> str:
        assert self.port is not None
        L = []
        a = L.append
        a("-- generated by spec/integration/harness.py; do not edit")
        a(f"-- INVITES_IMPL={self.impl} storage={self.storage}")
        a("daemonize = false")
        a("run_as_root = true")
        a(f"pidfile = {lua_str(self.pid_path)}")
        a(f"data_path = {lua_str(self.data_dir)}")
        # Defaults below that a test's options replace are left out (Prosody warns of
        # duplicate options).
        if "certificates" not in self.options:
            a(f"certificates = {lua_str(self.certs_dir)}")  # empty dir: avoids a certmanager error line
        if self.plugin_paths:
            a(f"plugin_paths = {lua_value(self.plugin_paths)}")
        a("log = {")
        a(f'  {{ levels = {{ min = "debug" }}, to = "file", filename = {lua_str(self.log_path)} }};')
        a(f'  {{ levels = {{ min = "warn" }}, to = "file", filename = {lua_str(self.err_path)} }};')
        a("}")
        a(f"interfaces = {{ {lua_str(LOOPBACK)} }}")
        a(f"local_interfaces = {{ {lua_str(LOOPBACK)} }}")
        a(f"c2s_interfaces = {{ {lua_str(LOOPBACK)} }}")
        a(f"c2s_ports = {{ {self.port} }}")
        a("legacy_ssl_ports = { }")
        a("c2s_direct_tls_ports = { }")
        a("s2s_ports = { }")
        a("s2s_direct_tls_ports = { }")
        a("component_ports = { }")
        if "http_ports" not in self.options:
            a("http_ports = { }")
        a("https_ports = { }")
        a("admin_ports = { }")  # mod_admin_telnet is not loaded anyway
        a('modules_disabled = { "s2s"; "s2s_auth_certs" }')
        for k, v in (("c2s_require_encryption", "false"), ("allow_unencrypted_plain_auth", "true")):
            if k not in self.options:
                a(f"{k} = {v}")
        a('authentication = "internal_hashed"')
        a(f"admins = {lua_value(self.admins)}")
        if "storage" not in self.options:  # a test may wrap the driver (mod_storage_faulty)
            a(f'storage = "{"sql" if self.storage == "pgsql" else self.storage}"')
        if self.storage == "sql":
            a(f'sql = {{ driver = "SQLite3", database = {lua_str(self.sqlite_path)} }}')
        elif self.storage == "pgsql":
            a(f"sql = {lua_value(self.pgsql.sql_config(self.pg_database))}")
        if self.registration_invite_only is not None:
            a(f"registration_invite_only = {lua_value(self.registration_invite_only)}")
        if self.allow_registration is not None:
            a(f"allow_registration = {lua_value(self.allow_registration)}")
        for k, v in self.options.items():
            a(f"{k} = {lua_value(v)}")
        L.extend(self.extra_config)
        a("")
        a(f"VirtualHost {lua_str(self.host)}")
        a(f"  modules_enabled = {lua_value(self.modules)}")
        for k, v in self.host_options.items():
            a(f"  {k} = {lua_value(v)}")
        L.extend("  " + line for line in self.extra_host_config)
        for extra_host, host_options in self.extra_hosts.items():
            a("")
            a(f"VirtualHost {lua_str(extra_host)}")
            a(f"  modules_enabled = {lua_value(self.modules)}")
            for k, v in host_options.items():
                a(f"  {k} = {lua_value(v)}")
        a("")
        return "\n".join(L)

    def write_config(self) -> Path:
        if self.port is None:
            self.port = free_port()
        self.config_path.write_text(self.render_config())
        return self.config_path

    # ----------------------------------------------------------------- process

    def start(self) -> "ProsodyServer":
        if self.proc is not None:
            raise HarnessError("already started")
        last_err = None
        for _attempt in range(3):  # a port picked by free_port() can be taken by the time we bind
            self.port = free_port()
            self.write_config()
            try:
                self._spawn_and_wait()
                return self
            except _PortInUse as e:
                last_err = e
                self._kill()
                continue
        raise HarnessError(f"could not bind a c2s port: {last_err}")

    def _spawn_and_wait(self):
        self._stdout_file = open(self.stdout_path, "ab")
        env = dict(os.environ)
        env.pop("PROSODY_CONFIG", None)
        self.proc = subprocess.Popen(
            [PROSODY, "--config", str(self.config_path), "-F"],
            stdin=subprocess.DEVNULL,
            stdout=self._stdout_file,
            stderr=subprocess.STDOUT,
            cwd=str(self.dir),
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout
        port_ok = False
        ready_ok = not self.testhook
        interval = 0.02
        while True:
            rc = self.proc.poll()
            if rc is not None:
                text = self.log_text()
                if "Failed to open server port" in text:
                    raise _PortInUse(self.tail())
                raise HarnessError(f"prosody exited with {rc} during startup\n{self.tail()}")
            if not port_ok:
                port_ok = _port_accepts(LOOPBACK, self.port)
            if not ready_ok:
                m = READY_RE.search(self.log_text())
                if m:
                    self.module_paths = {"invites": m["invites"], "invites_register": m["register"]}
                    ready_ok = True
            if port_ok and ready_ok:
                break
            text = self.log_text()
            if "Failed to open server port" in text:
                raise _PortInUse(self.tail())
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"prosody not ready within {self.start_timeout}s (port_ok={port_ok}, ready={ready_ok})\n"
                    + self.tail()
                )
            time.sleep(interval)  # polling interval, bounded by deadline
            interval = min(interval * 1.5, 0.2)
        if self.impl == "ours" and self.testhook:
            for name, path in self.module_paths.items():
                if not path.startswith(str(BUILD_PLUGINS)):
                    raise ImplementationMissing(
                        f"INVITES_IMPL=ours but mod_{name} was loaded from {path}, not {BUILD_PLUGINS}"
                    )

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after stop_timeout. Returns the exit code."""
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    self.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
                proc = self.proc
                try:
                    rc = proc.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    self._kill()
                    rc = proc.returncode
            else:
                rc = self.proc.returncode
            self.proc = None
        if self._stdout_file:
            self._stdout_file.close()
            self._stdout_file = None
        return rc

    def _kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                pass
        self.proc = None
        if self._stdout_file:
            self._stdout_file.close()
            self._stdout_file = None

    def restart(self) -> "ProsodyServer":
        """Stop and start again on the same config/data (a fresh port is picked).

        The old log is renamed to prosody.log.N so the readiness check only sees the new run.
        """
        self.stop()
        self.module_paths = {}
        if self.log_path.exists():
            n = 1
            while (self.dir / f"prosody.log.{n}").exists():
                n += 1
            self.log_path.rename(self.dir / f"prosody.log.{n}")
        return self.start()

    def twin(self, *, start: bool = True, **overrides) -> "ProsodyServer":
        """A second Prosody process serving the same host(s) on this server's storage: the same
        data directory (internal storage, the token key file), the same SQLite file or the same
        PostgreSQL database; with its own dir, config file, c2s port, logs and pidfile, so
        `twin.prosodyctl(...)` and `twin.port` are its own. It is made with this server's settings
        (`overrides`: ProsodyServer keyword arguments to change) and started unless start=False.
        cleanup() of this server cleans its twins up first; a twin's cleanup() removes only its
        own dir, never the shared storage.
        """
        kw = dict(
            storage=self.storage, impl=self.impl, registration_invite_only=self.registration_invite_only,
            allow_registration=self.allow_registration, extra_modules=list(self.extra_modules),
            extra_config=list(self.extra_config), extra_host_config=list(self.extra_host_config),
            options=dict(self.options), host_options=dict(self.host_options), admins=list(self.admins),
            testhook=self.testhook, start_timeout=self.start_timeout, stop_timeout=self.stop_timeout,
            keep_dir=self.keep_dir, pgsql=self.pgsql,
            extra_hosts={h: dict(o) for h, o in self.extra_hosts.items()}, third_party=self.third_party,
        )
        kw.update(overrides)
        owner = self.storage_of or self
        twin = type(self)(storage_of=owner, **kw)
        if start:
            try:
                twin.start()
            except BaseException:
                twin.cleanup()
                raise
        return twin

    def cleanup(self):
        # Servers sharing this one's storage go first: it is about to be dropped or removed.
        for twin in list(self.twins):
            twin.cleanup()
        self.stop()
        if self.storage_of is not None:  # the storage is its owner's: only our own files go
            if self in self.storage_of.twins:
                self.storage_of.twins.remove(self)
            if not self.keep_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
            return
        if self.pg_database is not None:
            if self.keep_dir:  # the database stays too; its dump lands in the kept dir
                try:
                    self.pg_dump()
                except HarnessError:
                    pass
            else:
                self.pgsql.drop_database(self.pg_database)
                self.pg_database = None
        if not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc):
        self.cleanup()

    # -------------------------------------------------------------- prosodyctl

    def prosodyctl(self, *args: str, timeout: float = 30.0, input: str | None = None) -> tuple[int, str, str]:
        """Run ``prosodyctl --config <cfg> ARGS``; returns (rc, stdout, stderr).

        On SQLite, a command that failed only because the running server held the database
        ("database is locked": Prosody sets no SQLite busy timeout, and Prosody 13's periodic
        tasks write about a second after start) is run again, up to 5 times. Nothing was
        written by the failed run: its transaction did not happen.
        """
        if not self.config_path.exists():
            self.write_config()
        env = dict(os.environ)
        env.pop("PROSODY_CONFIG", None)
        for attempt in range(5):
            p = subprocess.run(
                [PROSODYCTL, "--config", str(self.config_path), *map(str, args)],
                input=input if input is not None else "",
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=str(self.dir),
                env=env,
            )
            locked = self.storage == "sql" and "database is locked" in p.stdout + p.stderr
            if p.returncode == 0 or not locked:
                break
            time.sleep(0.2 * (attempt + 1))  # no event to wait for: the lock is the server's
        return p.returncode, p.stdout, p.stderr

    def generate_invite(self, *flags: str, host: str | None = None) -> str:
        """``prosodyctl mod_invites generate HOST FLAGS`` (HOST: localhost); returns the URI line."""
        rc, out, err = self.prosodyctl("mod_invites", "generate", host or self.host, *flags)
        uris = [ln.strip() for ln in out.splitlines() if re.match(r"^\s*(xmpp:|https?://)", ln)]
        if rc != 0 or not uris:
            raise HarnessError(f"invite generation failed rc={rc}\nstdout:\n{out}\nstderr:\n{err}")
        return uris[-1]

    def register_user(self, username: str, password: str, host: str | None = None) -> None:
        """Create an account with ``prosodyctl register USER HOST PASS`` (non-interactive)."""
        rc, out, err = self.prosodyctl("register", username, host or self.host, password)
        if rc != 0:
            raise HarnessError(f"prosodyctl register {username} failed rc={rc}\n{out}\n{err}")

    # --------------------------------------------------------------- inspection

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def err_text(self) -> str:
        try:
            return self.err_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self, pattern: str | None = None) -> list[str]:
        lines = self.log_text().splitlines()
        if pattern is None:
            return lines
        rx = re.compile(pattern)
        return [ln for ln in lines if rx.search(ln)]

    def tail(self, n: int = 40) -> str:
        parts = []
        for label, path in (("prosody.log", self.log_path), ("prosody.err", self.err_path), ("stdout", self.stdout_path)):
            try:
                lines = path.read_text(errors="replace").splitlines()[-n:]
            except FileNotFoundError:
                continue
            parts.append(f"--- {label} ({path}) ---\n" + "\n".join(lines))
        return "\n".join(parts)

    def data_files(self) -> list[Path]:
        """All files of the storage: data_path tree plus the SQLite database.

        For pgsql, the database is dumped afresh (pg_dump) to `pgsql-dump.sql` in the server's dir,
        and that file stands for it.
        """
        files = sorted(p for p in self.data_dir.rglob("*") if p.is_file())
        for p in sorted(self.sqlite_path.parent.glob(self.sqlite_path.name + "*")):
            files.append(p)
        if self.storage == "pgsql" and self.pg_database is not None:
            files.append(self.pg_dump())
        return files

    def grep_data(self, needle: str | bytes) -> list[Path]:
        """Files of the storage whose raw bytes contain needle (pgsql: a fresh dump of the database)."""
        if isinstance(needle, str):
            needle = needle.encode()
        found = []
        for p in self.data_files():
            data = p.read_bytes()
            if needle in data or (p == self.pg_dump_path and _copy_escape(needle) in data):
                found.append(p)
        return found

    # ------------------------------------------------------------------- SQL

    def pg_dump(self) -> Path:
        """Writes a pg_dump of this server's PostgreSQL database to `pgsql-dump.sql`; returns the path."""
        if self.storage != "pgsql" or self.pg_database is None:
            raise HarnessError(f"pg_dump: storage is {self.storage!r}, not pgsql (or the database is gone)")
        self.pg_dump_path.write_bytes(self.pgsql.dump(self.pg_database))
        return self.pg_dump_path

    def sql_query(self, query: str, *params) -> SqlResult:
        """Runs one SQL statement on the server's SQL storage (SQLite3 or PostgreSQL), with sqlite3-style
        `?` placeholders, and returns its rows as a list of tuples (`.rowcount`: rows changed by
        INSERT/UPDATE/DELETE, or the number of rows returned).

        Portable SQL: quote Prosody's column names "user", "key", "type", "value" ("user" unquoted is
        CURRENT_USER in PostgreSQL). Types: SQLite gives its own; PostgreSQL gives JSON-able values
        (numbers, text, bool, None) for a SELECT, text for RETURNING rows. Works while Prosody runs.
        """
        if self.storage == "sql":
            db = sqlite3.connect(self.sqlite_path, timeout=10)
            try:
                with db:
                    cur = db.execute(query, params)
                    res = SqlResult(tuple(r) for r in cur.fetchall())
                    res.rowcount = cur.rowcount if cur.rowcount >= 0 else len(res)
            finally:
                db.close()
            return res
        if self.storage == "pgsql":
            if self.pg_database is None:
                raise HarnessError("sql_query: the PostgreSQL database was dropped (cleanup() ran)")
            return self.pgsql.query(self.pg_database, query, *params)
        raise HarnessError(f"sql_query: storage {self.storage!r} is not SQL")

    def stored_rows(self, store: str | None = None, *, user: str | None = None, key: str | None = None,
                    host: str | None = HOST) -> list[dict]:
        """Rows of Prosody's `prosody` table as dicts (host, user, store, key, type, value), any SQL backend."""
        cols = ("host", "user", "store", "key", "type", "value")
        where, params = [], []
        for col, val in (("host", host), ("store", store), ("user", user), ("key", key)):
            if val is not None:
                where.append(f'"{col}"=?')
                params.append(val)
        q = "SELECT " + ", ".join(f'"{c}"' for c in cols) + ' FROM "prosody"'
        if where:
            q += " WHERE " + " AND ".join(where)
        q += ' ORDER BY "host", "user", "store", "key"'
        return [dict(zip(cols, row)) for row in self.sql_query(q, *params)]

    def grep_logs(self, needle: str | bytes) -> list[Path]:
        if isinstance(needle, str):
            needle = needle.encode()
        out = []
        for p in sorted(self.dir.glob("prosody.log*")) + [self.err_path, self.stdout_path]:
            if p.exists() and needle in p.read_bytes():
                out.append(p)
        return out

    def __repr__(self):
        db = f" db={self.pg_database}" if self.pg_database else ""
        return f"<ProsodyServer impl={self.impl} storage={self.storage} port={self.port} dir={self.dir}{db}>"


class _PortInUse(HarnessError):
    pass


def _port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------ many clients


class _NoCaStoreContext(ssl.SSLContext):
    """An SSL context that does not load the system CA store (see plaintext_clients)."""

    def set_default_verify_paths(self):
        pass

    def load_default_certs(self, purpose=ssl.Purpose.SERVER_AUTH):
        pass


_plaintext_clients_depth = 0
_create_default_context = ssl.create_default_context


def _cheap_default_context(purpose=ssl.Purpose.SERVER_AUTH, *, cafile=None, capath=None, cadata=None):
    if cafile or capath or cadata:
        return _create_default_context(purpose, cafile=cafile, capath=capath, cadata=cadata)
    return _NoCaStoreContext(ssl.PROTOCOL_TLS_CLIENT)


@contextlib.contextmanager
def plaintext_clients():
    """While open, slixmpp clients are made without loading the system CA store.

    slixmpp builds an SSL context with the CA store for every client it makes (about 70 ms
    of CPU each, most of the time it takes to open a hundred streams), and the streams of
    xmpp.UnauthedSession never use it: they are plain TCP on loopback. Wrap the making of
    many such sessions (not a TLS client) in this. It nests, also across asyncio tasks that
    open and close it in any order: the last one out puts ssl.create_default_context back.
    """
    global _plaintext_clients_depth
    _plaintext_clients_depth += 1
    ssl.create_default_context = _cheap_default_context
    try:
        yield
    finally:
        _plaintext_clients_depth -= 1
        if _plaintext_clients_depth == 0:
            ssl.create_default_context = _create_default_context
