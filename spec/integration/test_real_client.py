"""A real client on a `make run` server: python-nbxmpp 7.4, the XMPP library of Gajim.

Real clients register only over an encrypted stream, so `make run` (tools/devserver.py)
serves STARTTLS with a self-signed certificate for localhost and requires encryption. These
tests build their server from the same pieces: the certificate made by
devserver.ensure_certificate(), the options of devserver.tls_options() and the modules of
devserver.MODULES (plus mod_adhoc and mod_invites_adhoc, for the contact invite). If
`make run`'s TLS setup breaks, they fail.

nbxmpp runs on a GLib main loop, so it runs in a subprocess, nbxmpp_client.py (one scenario
per run, every wait bounded there and here). A failure shows what nbxmpp reported and the
end of its log (tokens and passwords cut out).

Trusting the certificate: nbxmpp gets it through Client.set_accepted_certificates(), as
Gajim does once the user has chosen to trust it in its certificate warning. That waives only
"unknown CA" for exactly this certificate; the host name and the dates are still checked.
The server-side check logs in with slixmpp, which gets the certificate as its CA file.

Needs python-nbxmpp and PyGObject (pip) with GLib's introspection data and libsoup 3
(Debian: gir1.2-glib-2.0, gir1.2-soup-3.0); .ci/deps installs them. Without them the tests
are skipped, or fail when CI is set.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import subprocess
import sys

import pytest

import harness
import xmpp
from conftest import storage_fixture

sys.path.insert(0, str(harness.REPO / "tools"))
import devserver  # noqa: E402

HELPER = harness.HERE / "nbxmpp_client.py"
HELPER_TIMEOUT = 30  # seconds, for one scenario (nbxmpp's own bound; the process gets 30 more)
CERT_PROBLEMS = "|".join(map(re.escape, devserver.CERT_PROBLEMS))  # Prosody did not take the certificate

# The client does not depend on the storage backend.
storage = storage_fixture("internal")


# ------------------------------------------------------------------------ nbxmpp

_nbxmpp_problem: list = []


def nbxmpp_problem() -> str | None:
    """Why nbxmpp cannot run here (asked once), or None."""
    if not _nbxmpp_problem:
        check = ("import gi; gi.require_version('Soup', '3.0'); import nbxmpp, nbxmpp.client; "
                 "print(nbxmpp.__version__, gi.__version__)")
        try:
            p = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
            problem = None if p.returncode == 0 else (p.stderr.strip().splitlines() or ["?"])[-1]
        except subprocess.TimeoutExpired:
            problem = "importing nbxmpp took more than 60 s"
        _nbxmpp_problem.append(problem)
    return _nbxmpp_problem[0]


@pytest.fixture(scope="module")
def nbxmpp_ready():
    problem = nbxmpp_problem()
    if problem:
        if os.environ.get("CI", "") not in ("", "0", "false"):
            pytest.fail(f"nbxmpp cannot run ({problem}); CI: .ci/deps must install it", pytrace=False)
        pytest.skip(f"needs python-nbxmpp with PyGObject and libsoup 3 (sh .ci/deps installs them): {problem}")


def nbxmpp(server, crt, scenario: str, **args) -> dict:
    """Runs one scenario of nbxmpp_client.py against server; returns its result (plus exit, log)."""
    payload = {"scenario": scenario, "port": server.port, "domain": server.host, "cert": str(crt),
               "timeout": HELPER_TIMEOUT, **args}
    try:
        p = subprocess.run([sys.executable, str(HELPER)], input=json.dumps(payload), capture_output=True,
                           text=True, timeout=HELPER_TIMEOUT + 30)
    except subprocess.TimeoutExpired as e:  # its partial output comes as bytes
        log = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        return {"ok": False, "error": f"nbxmpp_client.py did not end within {e.timeout} s", "exit": None, "log": log}
    try:
        result = json.loads(p.stdout)
    except ValueError:
        result = {"ok": False, "error": f"no result on stdout: {p.stdout[-2000:]!r}"}
    result["exit"] = p.returncode
    result["log"] = p.stderr
    return result


def report(result: dict, lines: int = 80) -> str:
    """What nbxmpp reported, for an assertion message."""
    shown = {k: v for k, v in result.items() if k != "log"}
    log = "\n".join(result.get("log", "").splitlines()[-lines:])
    return f"nbxmpp reported:\n{json.dumps(shown, indent=1, sort_keys=True)}\n--- nbxmpp log (end) ---\n{log}"


# ------------------------------------------------------------------------ server


@pytest.fixture
def certificate(tmp_path):
    """(crt, key) made by `make run`'s own function, under pytest's tmp (under /tmp, which the
    chroot launchers of Prosody 13.0.6/13.0.7 bind-mount)."""
    return devserver.ensure_certificate(tmp_path / "certs", harness.HOST)


@pytest.fixture
def tls_server(make_server, certificate, request, nbxmpp_ready):
    """A Prosody configured as `make run` does it (certificate, STARTTLS required, its modules)."""
    crt, _key = certificate
    options = devserver.tls_options(crt.parent)
    # make run leaves allow_unencrypted_plain_auth at Prosody's default (false); given here, it
    # replaces the harness's plain-text default for its other tests.
    options["allow_unencrypted_plain_auth"] = False
    srv = make_server(options=options, extra_modules=[*devserver.MODULES, "adhoc", "invites_adhoc"])
    request.node._prosody_server = srv  # its logs in the report on failure
    assert not srv.log_lines(CERT_PROBLEMS), srv.tail()
    return srv


async def tls_login(server, jid: str, password: str, cafile) -> xmpp.Client:
    """slixmpp over STARTTLS, trusting cafile; bounded like xmpp.login()."""
    c = xmpp.Client(jid, password)
    c.enable_starttls = True
    c.enable_plaintext = True  # a TCP connection that STARTTLS then secures (not direct TLS)
    c.ca_certs = cafile
    xmpp._live_clients.add(c)  # closed by the conftest runner after the test
    started = asyncio.get_running_loop().create_future()

    def done(kind):
        return lambda ev=None: started.done() or started.set_result((kind, ev))

    for event in ("session_start", "failed_all_auth", "connection_failed", "disconnected"):
        c.add_event_handler(event, done(event))
    c.connect(harness.LOOPBACK, server.port)
    kind, ev = await asyncio.wait_for(started, xmpp.DEFAULT_TIMEOUT)
    assert kind == "session_start", f"slixmpp login {jid} over STARTTLS: {kind} {ev!r}"
    assert c.is_connected() and c.transport.get_extra_info("ssl_object") is not None, "not encrypted"
    return c


# ------------------------------------------------------------------------ tests


def test_make_run_config_requires_starttls_with_its_certificate(tmp_path):
    """What `make run` writes: STARTTLS required, its certificate, mod_tls, no plain auth."""
    certs = tmp_path / "certs"
    crt, key = devserver.ensure_certificate(certs, "localhost")
    assert (crt.name, key.name) == ("localhost.crt", "localhost.key")  # where `certificates` looks
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert devserver.certificate_usable(crt, "localhost")
    assert not devserver.certificate_usable(crt, "example.com")  # subjectAltName is DNS:localhost only
    text = subprocess.run(["openssl", "x509", "-in", crt, "-noout", "-text"], capture_output=True, text=True,
                          timeout=30, check=True).stdout
    assert "CA:FALSE" in text  # trusted anywhere, it vouches for localhost only
    fingerprint = devserver.certificate_fingerprint(crt)
    assert len(fingerprint.split(":")) == 32

    mtime = crt.stat().st_mtime_ns
    assert devserver.ensure_certificate(certs, "localhost") == (crt, key)
    assert crt.stat().st_mtime_ns == mtime, "a good certificate is kept between runs"
    # One that expires within min_validity (here: any, a year is less than two) is made again.
    devserver.ensure_certificate(certs, "localhost", min_validity=2 * 365 * 86400)
    assert devserver.certificate_fingerprint(crt) != fingerprint
    key.unlink()
    devserver.ensure_certificate(certs, "localhost")
    assert key.exists() and stat.S_IMODE(key.stat().st_mode) == 0o600

    config = devserver.render_config(tmp_path, "/plugins", 5222, certs)
    for k, v in devserver.tls_options(certs).items():
        assert f"{k} = {devserver.lua_value(v)}" in config.splitlines()
    assert "c2s_require_encryption = true" in config.splitlines()
    assert "allow_unencrypted_plain_auth" not in config
    assert '"tls"' in config and "tls" in devserver.MODULES


@pytest.mark.async_timeout(3 * (HELPER_TIMEOUT + 30))
async def test_nbxmpp_signs_up_with_an_invite_and_adds_its_inviter_with_a_contact_invite(tls_server, certificate):
    server, (crt, _key) = tls_server, certificate
    romeo_pw = "romeo-secret"
    server.register_user("romeo", romeo_pw)
    token = xmpp.parse_uri(server.generate_invite()).token  # what `make run` prints

    # Gajim's sign-up with an invite: preauth, then the registration form, over STARTTLS.
    reg = await asyncio.to_thread(nbxmpp, server, crt, "register", token=token, username="juliet",
                                  password="juliet-secret")
    assert reg["ok"], report(reg)
    assert reg["steps"] == ["connected", "preauth accepted", "form received", "registered"], report(reg)
    tls = reg["tls"]["register"]
    assert tls["secure"] and tls["connection_type"] == "START_TLS", report(reg)
    assert tls["fingerprint"] == devserver.certificate_fingerprint(crt), report(reg)

    # Log in as her, and use romeo's contact invite (made by romeo's client, XEP-0401 ad-hoc)
    # for a subscription with the token (XEP-0379).
    contact = await asyncio.to_thread(nbxmpp, server, crt, "contact",
                                      inviter={"username": "romeo", "password": romeo_pw},
                                      invitee={"username": "juliet", "password": "juliet-secret"})
    assert contact["ok"], report(contact)
    assert contact["rosters"]["invitee"]["romeo@localhost"]["subscription"] == "both", report(contact)
    assert contact["rosters"]["inviter"]["juliet@localhost"]["subscription"] == "both", report(contact)
    # The server approved for romeo: his client was never asked.
    asked = [p for p in contact["presences"]["inviter"] if p["type"] == "SUBSCRIBE"]
    assert asked == [], report(contact)
    pushed = {"subscription": "both", "jid": "juliet@localhost", "ask": None}
    assert pushed in contact["pushes"]["inviter"], report(contact)

    # Ask the server again, with another client library (slixmpp) and the testhook.
    romeo = await tls_login(server, "romeo@localhost", romeo_pw, crt)
    assert (await xmpp.roster(romeo))["juliet@localhost"]["subscription"] == "both"
    juliet_roster = (await xmpp.call_hook(romeo, "get_roster", "juliet")).value
    assert juliet_roster["romeo@localhost"]["subscription"] == "both"
    assert server.grep_logs(token) == []


@pytest.mark.async_timeout(4 * (HELPER_TIMEOUT + 30))
async def test_nbxmpp_registers_nothing_untrusted_or_in_plain_text(tls_server, certificate):
    """The certificate must be trusted, and plain text is refused; neither spends the invite."""
    server, (crt, _key) = tls_server, certificate
    token = xmpp.parse_uri(server.generate_invite()).token
    account = {"token": token, "username": "juliet", "password": "juliet-secret"}

    untrusted = await asyncio.to_thread(nbxmpp, server, crt, "register", trust_certificate=False, **account)
    assert not untrusted["ok"] and "BAD_CERTIFICATE" in untrusted["error"], report(untrusted)

    plain = await asyncio.to_thread(nbxmpp, server, crt, "register", connection="PLAIN", **account)
    assert not plain["ok"] and "tls-required" in plain["error"], report(plain)

    trusted = await asyncio.to_thread(nbxmpp, server, crt, "register", **account)
    assert trusted["ok"], report(trusted)
