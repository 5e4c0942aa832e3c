"""Start and drive a real Prosody 0.12 process on loopback for integration tests.

Usage (see NOTES.md):

    with ProsodyServer(storage="internal") as srv:
        uri = srv.generate_invite()
        ...

The implementation under test is selected with the environment variable
INVITES_IMPL:

* ``ours`` (default): ``plugin_paths`` starts with ``<repo>/build/plugins``, so
  our mod_invites / mod_invites_register shadow Prosody's own modules.
* ``stock``: Prosody's own modules from /usr/lib/prosody/modules.

In both cases ``spec/integration/plugins`` (the test-only mod_invites_testhook)
is on the plugin path too, after the build folder.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
# INVITES_PLUGINS_DIR overrides where INVITES_IMPL=ours looks for the built plugins.
BUILD_PLUGINS = Path(os.environ.get("INVITES_PLUGINS_DIR") or (REPO / "build" / "plugins")).resolve()
TEST_PLUGINS = HERE / "plugins"

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


class ProsodyServer:
    """One Prosody process with its own config, data dir and c2s port.

    Parameters
    ----------
    storage: "internal" or "sql" (SQLite3 file inside the temp dir).
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
    ):
        if storage not in ("internal", "sql"):
            raise HarnessError(f"storage must be 'internal' or 'sql', not {storage!r}")
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
        self.testhook = testhook
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        if keep_dir is None:
            keep_dir = os.environ.get("PROSODY_KEEP_DIR", "") not in ("", "0")
        self.keep_dir = keep_dir

        self.host = HOST
        self.dir = Path(tempfile.mkdtemp(prefix=f"prosody-{self.impl}-{storage}-"))
        self.data_dir = self.dir / "data"
        self.data_dir.mkdir(mode=0o750)
        self.certs_dir = self.dir / "certs"
        self.certs_dir.mkdir()
        self.config_path = self.dir / "prosody.cfg.lua"
        self.log_path = self.dir / "prosody.log"
        self.err_path = self.dir / "prosody.err"
        self.stdout_path = self.dir / "stdout.txt"
        self.pid_path = self.dir / "prosody.pid"
        self.sqlite_path = self.dir / "prosody.sqlite"
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.module_paths: dict[str, str] = {}
        self._stdout_file = None

    # ------------------------------------------------------------------ config

    @property
    def plugin_paths(self) -> list[str]:
        paths = []
        if self.impl == "ours":
            paths.append(str(BUILD_PLUGINS))
        if self.testhook:
            paths.append(str(TEST_PLUGINS))
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
        a("c2s_require_encryption = false")
        a("allow_unencrypted_plain_auth = true")
        a('authentication = "internal_hashed"')
        a(f"admins = {lua_value(self.admins)}")
        a(f'storage = "{self.storage}"')
        if self.storage == "sql":
            a(f'sql = {{ driver = "SQLite3", database = {lua_str(self.sqlite_path)} }}')
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
                try:
                    rc = self.proc.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    self._kill()
                    rc = self.proc.returncode
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

    def cleanup(self):
        self.stop()
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
        """Run ``prosodyctl --config <cfg> ARGS``; returns (rc, stdout, stderr)."""
        if not self.config_path.exists():
            self.write_config()
        env = dict(os.environ)
        env.pop("PROSODY_CONFIG", None)
        p = subprocess.run(
            [PROSODYCTL, "--config", str(self.config_path), *map(str, args)],
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(self.dir),
            env=env,
        )
        return p.returncode, p.stdout, p.stderr

    def generate_invite(self, *flags: str) -> str:
        """``prosodyctl mod_invites generate localhost FLAGS``; returns the URI line."""
        rc, out, err = self.prosodyctl("mod_invites", "generate", self.host, *flags)
        uris = [ln.strip() for ln in out.splitlines() if re.match(r"^\s*(xmpp:|https?://)", ln)]
        if rc != 0 or not uris:
            raise HarnessError(f"invite generation failed rc={rc}\nstdout:\n{out}\nstderr:\n{err}")
        return uris[-1]

    def register_user(self, username: str, password: str) -> None:
        """Create an account with ``prosodyctl register USER HOST PASS`` (non-interactive)."""
        rc, out, err = self.prosodyctl("register", username, self.host, password)
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
        """All files of the storage: data_path tree plus the SQLite database."""
        files = sorted(p for p in self.data_dir.rglob("*") if p.is_file())
        for p in sorted(self.dir.glob("prosody.sqlite*")):
            files.append(p)
        return files

    def grep_data(self, needle: str | bytes) -> list[Path]:
        """Files of the storage whose raw bytes contain needle."""
        if isinstance(needle, str):
            needle = needle.encode()
        return [p for p in self.data_files() if needle in p.read_bytes()]

    def grep_logs(self, needle: str | bytes) -> list[Path]:
        if isinstance(needle, str):
            needle = needle.encode()
        out = []
        for p in sorted(self.dir.glob("prosody.log*")) + [self.err_path, self.stdout_path]:
            if p.exists() and needle in p.read_bytes():
                out.append(p)
        return out

    def __repr__(self):
        return f"<ProsodyServer impl={self.impl} storage={self.storage} port={self.port} dir={self.dir}>"


class _PortInUse(HarnessError):
    pass


def _port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
