"""One invite throttle per address for c2s and HTTP: token guessing over the web is limited.

Every path that checks a token counts failures from one client address (per host) against
the same budget: c2s preauth (XEP-0445), XEP-0379, and the HTTP routes of Prosody's
mod_invites_page (GET /invites_page?TOKEN), mod_invites_register_web (GET /register?t=TOKEN,
POST /register with the form fields user, password, token) and the third-party
mod_invites_register_api (GET /register_api/invite/TOKEN, POST /register_api/register with
the JSON body {username, password, token}). The invite_throttle_max-th failure within
invite_throttle_period locks the address for one whole period. A locked address gets, on
every route of those modules, HTTP 429 with Retry-After before any lookup (an HTML page, or
{"error": "throttled", "text": ...} from the JSON API), and c2s preauth gets
wait/policy-violation. The address is Prosody's request.ip, which follows X-Forwarded-For
from a trusted proxy (127.0.0.1 by default). A refused valid token is not consumed.

The modules run unmodified on top of OUR mod_invites / mod_invites_register; the API module
comes from ../shared/third-party (ProsodyServer(third_party=True)). A second client address
is an HTTP connection bound to 127.0.0.2 (all of 127.0.0.0/8 is loopback on Linux).
Internal storage and SQLite only (the throttle lives in the process, not in storage).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import time
import urllib.parse

import pytest

import web_helpers
import xmpp
from conftest import storage_fixture
from web_helpers import http_request, start_web_server, token_of_landing_page

THROTTLED_TEXT = "Too many invalid invitations from your address, please try again later"
THROTTLED = ("wait", "policy-violation", THROTTLED_TEXT)
INVALID_TEXT = "This invitation is not valid"

THROTTLE_MAX = 3
THROTTLE_PERIOD = 5  # seconds; every locked-phase check below takes well under one second

OTHER_ADDRESS = "127.0.0.2"  # another client address on loopback (not a trusted proxy)
FORWARDED = "192.0.2.7"  # X-Forwarded-For value, from 127.0.0.1 (a trusted proxy by default)

MODULES = web_helpers.WEB_MODULES + ("invites_register_api", "http_openmetrics")


storage = storage_fixture("internal", "sql")


def guess() -> str:
    """An unknown token shaped like a real one."""
    return secrets.token_urlsafe(18)


class Site:
    """The three modules' token routes on one server, as one client address sees them.

    headers: sent with every request (X-Forwarded-For); source_address: where to connect from.
    """

    def __init__(self, base: str, headers: dict | None = None, source_address: str | None = None):
        self.base = base
        self.headers = dict(headers or {})
        self.source_address = source_address

    def _req(self, path, method="GET", body=None, headers=None):
        h = dict(self.headers)
        h.update(headers or {})
        return http_request(self.base + path, method, headers=h, body=body, source_address=self.source_address)

    # mod_invites_page
    def landing(self, token):
        return self._req(f"/invites_page?{token}")

    # mod_invites_register_web (the form posts to the page's own URL, /register?t=TOKEN)
    def register_page(self, token):
        return self._req(f"/register?t={urllib.parse.quote(token)}")

    def register_form(self, token, user, password):
        body = urllib.parse.urlencode({"user": user, "password": password, "token": token})
        return self._req(f"/register?t={urllib.parse.quote(token)}", "POST", body,
                         {"Content-Type": "application/x-www-form-urlencoded"})

    # mod_invites_register_api (third-party)
    def api_invite(self, token):
        return self._req(f"/register_api/invite/{urllib.parse.quote(token)}")

    def api_register(self, token, username, password):
        body = json.dumps({"username": username, "password": password, "token": token})
        return self._req("/register_api/register", "POST", body, {"Content-Type": "application/json"})

    def guesses(self, n, start=0):
        """n failed lookups with unknown tokens, spread over the three modules' five routes
        (starting with the start-th of them)."""
        routes = (
            lambda t: self.landing(t),
            lambda t: self.register_page(t),
            lambda t: self.api_invite(t),
            lambda t: self.register_form(t, "guesser", "guesser password"),
            lambda t: self.api_register(t, "guesser", "guesser password"),
        )
        out = []
        for i in range(n):
            r = routes[(start + i) % len(routes)](guess())
            # The modules' own answers to an unknown token (200 "invalid" page, 303, 404), never a
            # refusal: the lock comes only with the last of them.
            assert r.status != 429 and r.status < 500, (i, r.status, r.headers, r.body[:500])
            out.append(r)
        return out


def _retry_after(r, what):
    ra = r.header("Retry-After")
    assert ra is not None and re.fullmatch(r"[0-9]+", ra.strip()), (what, "Retry-After", ra, r.headers)
    assert 0 < int(ra) <= THROTTLE_PERIOD, (what, "Retry-After", ra)


def assert_html_429(r, what):
    assert r.status == 429, (what, "expected 429", r.status, r.headers, r.body[:500])
    assert (r.header("Content-Type") or "").startswith("text/html"), (what, r.headers)
    assert THROTTLED_TEXT in r.body, (what, r.body[:2000])
    _retry_after(r, what)


def assert_json_429(r, what):
    assert r.status == 429, (what, "expected 429", r.status, r.headers, r.body[:500])
    assert (r.header("Content-Type") or "").startswith("application/json"), (what, r.headers)
    assert json.loads(r.body) == {"error": "throttled", "text": THROTTLED_TEXT}, (what, r.body)
    _retry_after(r, what)


def assert_all_routes_locked(site, token, elapsed):
    """Every module's routes answer 429 for a VALID token (before any lookup)."""
    why = f"{elapsed():.2f}s after the lock"
    assert_html_429(site.landing(token), f"GET /invites_page, {why}")
    assert_html_429(site.register_page(token), f"GET /register, {why}")
    assert_html_429(site.register_form(token, "alice", "alice password 1"), f"POST /register, {why}")
    assert_json_429(site.api_invite(token), f"GET /register_api/invite, {why}")
    assert_json_429(site.api_register(token, "alice", "alice password 1"), f"POST /register_api/register, {why}")
    # HEAD falls back to the GET handler in Prosody's HTTP server: refused the same way.
    r = site._req(f"/invites_page?{token}", "HEAD")
    assert r.status == 429, (f"HEAD /invites_page, {why}", r.status, r.headers)


def assert_routes_open(site, token, what):
    """A valid token works on the GET routes (nothing is consumed by them)."""
    r = site.landing(token)
    assert r.status == 200 and "text/html" in (r.header("Content-Type") or ""), (what, r.status, r.body[:500])
    assert token in r.body, (what, "landing page without the invite", r.body[:2000])
    r = site.register_page(token)
    assert r.status == 200 and f'value="{token}"' in r.body, (what, r.status, r.headers, r.body[:500])
    r = site.api_invite(token)
    assert r.status == 200, (what, r.status, r.headers, r.body[:500])
    info = json.loads(r.body)
    assert info["token"] == token and info["type"] == "register", (what, info)


@pytest.fixture
def web(make_server, request):
    ws = start_web_server(
        make_server,
        extra_modules=MODULES,
        third_party=True,
        options={
            "invite_throttle_max": THROTTLE_MAX,
            "invite_throttle_period": THROTTLE_PERIOD,
            "statistics": "internal",
            "statistics_interval": "manual",
        },
    )
    request.node._prosody_server = ws.server  # logs in the report on failure
    return ws


def new_invite(ws):
    url = ws.server.generate_invite()
    assert url.startswith(ws.base_url + "/invites_page?"), url
    return token_of_landing_page(url)


def rejected(ws):
    """prosody_mod_invites_register__rejected_total by reason, from /metrics."""
    r = http_request(ws.base_url + "/metrics")
    assert r.status == 200, (r.status, r.body[:500])
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^prosody_mod_invites_register__rejected_total\{[^}]*reason="([^"]+)"[^}]*\} (\S+)', r.body, re.M)}


async def c2s_preauth(port, token):
    async with xmpp.UnauthedSession(port) as s:
        return await s.preauth(token)


async def wait_for_unlock(site, token, timeout):
    """Polls the landing page with the valid token until it is served (bounded); returns the response."""
    deadline = time.monotonic() + timeout
    while True:
        r = site.landing(token)
        if r.status != 429:
            return r
        assert time.monotonic() < deadline, f"still 429 after {timeout}s: {r.headers} {r.body[:300]}"
        await asyncio.sleep(0.2)


@pytest.mark.async_timeout(60)
async def test_http_guesses_lock_every_route_and_c2s(web):
    srv = web.server
    here = Site(web.base_url)
    other = Site(web.base_url, source_address=OTHER_ADDRESS)
    token = new_invite(web)
    assert_routes_open(here, token, "before any guess")  # the modules (and the API module) answer

    here.guesses(THROTTLE_MAX)
    locked_at = time.monotonic()
    elapsed = lambda: time.monotonic() - locked_at  # noqa: E731

    assert_all_routes_locked(here, token, elapsed)
    out = await c2s_preauth(srv.port, token)
    assert out.error and out.error.as_tuple() == THROTTLED, (out, f"{elapsed():.2f}s after the lock")
    # Another address is not locked: the valid token works there.
    assert_routes_open(other, token, f"from {OTHER_ADDRESS} while 127.0.0.1 is locked")
    assert elapsed() < THROTTLE_PERIOD - 1, f"locked-phase checks took {elapsed():.2f}s: raise THROTTLE_PERIOD"

    # The lock lasts one whole period, then lifts for HTTP and c2s alike.
    r = await wait_for_unlock(here, token, THROTTLE_PERIOD + 5)
    assert elapsed() >= THROTTLE_PERIOD - 1.5, f"the lock lifted after {elapsed():.2f}s"
    assert r.status == 200 and token in r.body, (r.status, r.body[:500])
    assert_routes_open(here, token, "after the period")
    assert (await c2s_preauth(srv.port, token)).ok

    # The refused attempts consumed nothing: the invite registers an account.
    r = here.api_register(token, "alice", "alice password 1")
    assert r.status == 200, (r.status, r.headers, r.body[:500])
    assert json.loads(r.body) == {"jid": f"alice@{srv.host}"}, r.body
    await xmpp.login(srv.port, f"alice@{srv.host}", "alice password 1", presence=False)


async def test_c2s_guesses_lock_http(web):
    srv = web.server
    here = Site(web.base_url)
    token = new_invite(web)
    async with xmpp.UnauthedSession(srv.port) as s:
        for _ in range(THROTTLE_MAX):
            out = await s.preauth(guess())
            assert out.text == INVALID_TEXT, out
        locked_at = time.monotonic()
        out = await s.preauth(token)
        assert out.error and out.error.as_tuple() == THROTTLED, out

    elapsed = lambda: time.monotonic() - locked_at  # noqa: E731
    assert_all_routes_locked(here, token, elapsed)
    assert_routes_open(Site(web.base_url, source_address=OTHER_ADDRESS), token, f"from {OTHER_ADDRESS}")
    assert_routes_open(Site(web.base_url, headers={"X-Forwarded-For": FORWARDED}), token, f"as {FORWARDED}")
    assert elapsed() < THROTTLE_PERIOD - 1, f"locked-phase checks took {elapsed():.2f}s: raise THROTTLE_PERIOD"


async def test_forwarded_for_from_trusted_proxy_counts_for_the_client(web):
    srv = web.server
    proxied = Site(web.base_url, headers={"X-Forwarded-For": FORWARDED})
    token = new_invite(web)

    proxied.guesses(THROTTLE_MAX, start=2)
    locked_at = time.monotonic()
    elapsed = lambda: time.monotonic() - locked_at  # noqa: E731

    # The forwarded client is locked on every route...
    assert_all_routes_locked(proxied, token, elapsed)
    # ...the proxy itself, another forwarded client and another address are not.
    assert_routes_open(Site(web.base_url), token, "from 127.0.0.1 without X-Forwarded-For")
    assert_routes_open(Site(web.base_url, headers={"X-Forwarded-For": "192.0.2.8"}), token, "as 192.0.2.8")
    assert_routes_open(Site(web.base_url, source_address=OTHER_ADDRESS), token, f"from {OTHER_ADDRESS}")
    assert (await c2s_preauth(srv.port, token)).ok
    assert elapsed() < THROTTLE_PERIOD - 1, f"locked-phase checks took {elapsed():.2f}s: raise THROTTLE_PERIOD"


async def test_metrics_count_http_guesses_and_refusals(web):
    srv = web.server
    here = Site(web.base_url)
    token = new_invite(web)

    before = rejected(web)
    # One c2s failure (also proves that /metrics is read right), then HTTP failures up to the
    # limit: both count toward the same budget, so the last HTTP guess locks 127.0.0.1.
    first = await c2s_preauth(srv.port, guess())
    assert first.text == INVALID_TEXT, first
    c2s_guessed = rejected(web)
    here.guesses(THROTTLE_MAX - 1, start=3)  # the two POST routes
    guessed = rejected(web)
    statuses = [  # while locked: 429 each, a valid token or not, and no lookup
        here.landing(token).status,
        here.landing(guess()).status,
        here.register_page(token).status,
        here.register_form(token, "alice", "alice password 1").status,
        here.api_invite(token).status,
        here.api_register(guess(), "alice", "alice password 1").status,
    ]
    out = await c2s_preauth(srv.port, token)
    after = rejected(web)

    def moved(a, b):
        return {r: b.get(r, 0) - a.get(r, 0) for r in ("invalid", "throttled")}

    assert moved(before, c2s_guessed) == {"invalid": 1, "throttled": 0}, (before, c2s_guessed)
    assert moved(c2s_guessed, guessed) == {"invalid": THROTTLE_MAX - 1, "throttled": 0}, (c2s_guessed, guessed)
    assert moved(guessed, after) == {"invalid": 0, "throttled": len(statuses) + 1}, (guessed, after, statuses, out)
    assert statuses == [429] * len(statuses), statuses
    assert out.error and out.error.as_tuple() == THROTTLED, out
