"""HTTP API: Prosody's mod_invites_api creates invites through OUR mod_invites.

mod_invites_api (GET /invites_api) authenticates with an API key made by
`prosodyctl mod_invites_api create HOST NAME` (it prints KEY_ID/SECRET), given either as
`Authorization: Bearer KEY_ID/SECRET` or as `?key=KEY_ID/SECRET`. It answers 201 with the
invite's landing page (or its xmpp: URI) in Location, 303 with `?redirect=1`, and 403 for
a missing or wrong key. The invite is an ordinary account invite with
additional_data.source = "api/token/KEY_ID".
"""

from __future__ import annotations

import re

import pytest

import xmpp
from web_helpers import http_request, start_web_server, token_of_landing_page

API_MODULES = ("http", "invites_api")

# Prosody 0.12.3's mod_invites_api calls formdecode(request.url.query) before looking at the
# Authorization header, and a request with no query string at all makes it raise
# ("util/http.lua:46: attempt to index a nil value") and answer 500. That is Prosody's module,
# not ours, so requests here always carry a (meaningless) query string.
NO_KEY_QUERY = "?client=test"


@pytest.fixture
def api_server(make_server, request):
    # No landing page here: without `invites_page`, Location is the invite's xmpp: URI (with
    # it, Prosody 13's mod_invites, and ours on 13, would point at a page nobody serves).
    ws = start_web_server(make_server, extra_modules=API_MODULES, options={"invites_page": None})
    request.node._prosody_server = ws.server  # logs in the report on failure
    return ws


def create_api_key(srv, name: str = "test-key") -> str:
    rc, out, err = srv.prosodyctl("mod_invites_api", "create", srv.host, name)
    keys = [ln.strip() for ln in out.splitlines() if re.fullmatch(r"[^/\s]+/\S+", ln.strip())]
    assert rc == 0 and len(keys) == 1, f"prosodyctl mod_invites_api create: rc={rc}\n{out}\n{err}"
    return keys[0]


async def _checks_after_registration(port, host, password, token):
    """Log in as the new account; the invite carries the API source and is now spent."""
    client = await xmpp.login(port, f"apiuser@{host}", password)
    info = await xmpp.call_hook(client, "get_account_invite_info", token)
    again = await xmpp.register_with_invite(port, token, "apiuser2", password)
    exists = await xmpp.call_hook(client, "user_exists", "apiuser2")
    return info, again, exists


async def _invite_info(port, jid, password, token):
    client = await xmpp.login(port, jid, password)
    return await xmpp.call_hook(client, "get_account_invite_info", token)


def test_api_invite_registers_an_account(api_server):
    srv, base = api_server.server, api_server.base_url
    key = create_api_key(srv)
    key_id = key.split("/", 1)[0]
    password = "api user password"

    # Bearer authentication: 201, Location is the invite's xmpp: URI (no landing page module).
    r = http_request(f"{base}/invites_api{NO_KEY_QUERY}", headers={"Authorization": f"Bearer {key}"})
    assert r.status == 201, (r.status, r.headers, r.body)
    uri = r.header("Location")
    invite = xmpp.parse_uri(uri)
    assert (invite.jid, invite.action) == (srv.host, "register"), uri
    token = invite.token
    assert token

    # Pending, and made on behalf of this key.
    srv.register_user("observer", "observer-secret")
    info = xmpp.run(_invite_info(srv.port, f"observer@{srv.host}", "observer-secret", token), 30)
    assert info.ok, info
    assert info.value["additional_data"]["source"] == f"api/token/{key_id}", info.value

    # The invite registers an account over c2s (XEP-0445), which can then log in.
    res = xmpp.run(xmpp.register_with_invite(srv.port, token, "apiuser", password), 30)
    assert res.ok, (res.preauth, res.register)
    info, again, exists = xmpp.run(
        _checks_after_registration(srv.port, srv.host, password, token), 30
    )
    # Single use: the token now refuses a second account.
    assert not again.preauth.ok and again.preauth.condition == "item-not-found", again.preauth
    assert not again.register.ok, again.register
    assert exists.value is False, exists
    assert not info.ok, info  # no longer a valid invite
    assert srv.log_lines(rf"Invite \w+ redeemed by apiuser@{srv.host}")


def test_api_key_in_query_and_redirect(api_server):
    srv, base = api_server.server, api_server.base_url
    key = create_api_key(srv)

    r = http_request(f"{base}/invites_api?key={key}")
    assert r.status == 201, (r.status, r.body)
    first = xmpp.parse_uri(r.header("Location")).token

    r = http_request(f"{base}/invites_api?key={key}&redirect=1")
    assert r.status == 303, (r.status, r.body)
    second = xmpp.parse_uri(r.header("Location")).token
    assert first and second and first != second

    # Both are independent single-use invites.
    for username, token in (("first", first), ("second", second)):
        res = xmpp.run(xmpp.register_with_invite(srv.port, token, username, f"{username} password"), 30)
        assert res.ok, (username, res.preauth, res.register)


def test_api_refuses_without_a_valid_key(api_server):
    srv, base = api_server.server, api_server.base_url
    key = create_api_key(srv)
    key_id, secret = key.split("/", 1)

    for headers, query in (
        ({}, NO_KEY_QUERY),
        ({}, f"?key={key_id}/wrong-secret"),
        ({}, f"?key=unknown/{secret}"),
        ({}, f"?key={secret}"),
        ({"Authorization": f"Bearer {key_id}/wrong-secret"}, NO_KEY_QUERY),
        ({"Authorization": f"Bearer unknown/{secret}"}, NO_KEY_QUERY),
        ({"Authorization": f"Basic {key}"}, NO_KEY_QUERY),
        # The header wins over the query: a wrong header is refused even with a good ?key=.
        ({"Authorization": f"Bearer {key_id}/wrong-secret"}, f"?key={key}"),
    ):
        r = http_request(f"{base}/invites_api{query}", headers=headers)
        assert r.status == 403, (headers, query, r.status, r.body)
        assert "location" not in r.headers

    # The refused calls created nothing.
    rc, out, err = srv.prosodyctl("mod_invites", "list", srv.host)
    assert rc == 0, (out, err)
    assert not re.search(r"\bpending\b", out), out


def test_api_invite_with_landing_page(make_server, request):
    """With mod_invites_page on the host the API answers with the landing page URL."""
    ws = start_web_server(make_server, extra_modules=API_MODULES + ("invites_page",))
    request.node._prosody_server = ws.server
    srv = ws.server
    key = create_api_key(srv)

    r = http_request(f"{ws.base_url}/invites_api{NO_KEY_QUERY}", headers={"Authorization": f"Bearer {key}"})
    assert r.status == 201, (r.status, r.body)
    landing = r.header("Location")
    assert landing.startswith(f"{ws.base_url}/invites_page?"), landing
    token = token_of_landing_page(landing)

    page = http_request(landing)
    assert page.status == 200 and "You have been invited to chat" in page.body, page.status
    assert f"xmpp:{srv.host}?register;preauth={token}" in page.header("Link")

    res = xmpp.run(xmpp.register_with_invite(srv.port, token, "landed", "landed password"), 30)
    assert res.ok, (res.preauth, res.register)
    assert not xmpp.run(xmpp.login_fails(srv.port, f"landed@{srv.host}", "landed password"), 30)
