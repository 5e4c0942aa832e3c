"""Third-party modules that real deployments (Snikket) load beside OUR mod_invites, unmodified.

The modules come from ../shared/third-party (ProsodyServer(third_party=True); its README says
which revision runs on which Prosody): mod_http_admin_api (the Snikket web portal lists, shows
and deletes invites through it), mod_groups_internal, mod_invites_groups,
mod_invites_default_group, mod_invites_register_api, mod_invites_tracking and, on Prosody 13
only, mod_invites_bootstrap.

* Admin API (/admin_api/invites): each listed entry parses as the portal's
  AdminInviteInfo.from_api_response does (`id`, `created_at`, `expires`, `type`, `jid`,
  `reusable` required; `id` is also the token), with `uri` and, when a landing page is
  configured, `landing_page`; GET and DELETE /admin_api/invites/{id} take that id; DELETE of
  an invite that is already gone (or never was) answers 200, as with Prosody's own store.
  With `invite_token_storage = "hash"` nothing is retrievable: entries carry the token's
  SHA-256 (64 hex digits) as `id`, no `uri` and no `landing_page`, and GET/DELETE take it.
* `invite-created` fires before the invite is stored, and what its handlers change is
  stored: with mod_invites_default_group a contact invite's new account joins group
  "default" (that module acts on roster invites only).
* A new account joins each group of its invite exactly once (one `group-user-added` each),
  whether or not mod_invites_groups is loaded beside our mod_invites_register.
* mod_invites_register_api, mod_invites_tracking and mod_invites_bootstrap keep working.

Authentication to the admin API: a Bearer token made in the server by mod_tokenauth for
admin@localhost (0.12: create_jid_token with scope prosody:scope:admin; 13: a grant and a
token with the user's primary role), through the TEST-ONLY plugins/mod_thirdparty_testhook.lua
(which also creates groups with fixed ids, reads group members and counts group-user-added
events). Groups must exist before anyone can join them (mod_groups_internal.add_member).

plugin_paths: with third_party=True the harness puts the third-party folder before
spec/integration/plugins, so the real mod_groups_internal is used, not the stand-in; each
test checks where mod_groups_internal was loaded from.

Internal storage and SQLite.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.parse
from datetime import datetime, timezone

import pytest

import harness
import xmpp
from conftest import storage_fixture
from web_helpers import http_request, start_web_server

HOST = harness.HOST
ADMIN, ADMIN_PASSWORD = "admin", "admin-secret"

# What a Snikket server loads (mod_invites_bootstrap is added on 13 where a test needs it).
SNIKKET_MODULES = (
    "http",
    "http_admin_api",
    "groups_internal",
    "invites_groups",
    "invites_default_group",
    "invites_register_api",
    "invites_tracking",
    "thirdparty_testhook",  # TEST-ONLY: plugins/mod_thirdparty_testhook.lua
)

HEX64 = re.compile(r"[0-9a-f]{64}")


storage = storage_fixture("internal", "sql")


def json_or_none(r):
    """The decoded JSON body, or None (error pages are HTML, even under a JSON Content-Type)."""
    try:
        return json.loads(r.body)
    except ValueError:
        return None


class Site:
    """One server with the third-party modules, its HTTP base URL and an admin session."""

    def __init__(self, ws):
        self.ws = ws
        self.srv = ws.server
        self.base = ws.base_url
        self.bearer: str | None = None
        self.admin: xmpp.Client | None = None

    async def hook(self, fn, *args):
        """A call into the server through the test hooks; fails the test if it raised."""
        res = await xmpp.call_hook(self.admin, fn, *args)
        assert not res.raised, (fn, args, res)
        return res

    def api(self, method, path, body=None, *, auth=True):
        """A request to mod_http_admin_api; returns (status, decoded JSON or None, response)."""
        headers = {"Accept": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.bearer}"
        if body is not None:
            body = json.dumps(body)
            headers["Content-Type"] = "application/json"
        r = http_request(self.base + "/admin_api" + path, method, headers=headers, body=body)
        return r.status, json_or_none(r), r

    def landing_page(self, token):
        return f"{self.base}/invites_page?{token}"


async def start_site(make_server, request, *, modules=SNIKKET_MODULES, landing_page=False,
                     host_options=None, options=None) -> Site:
    """Starts the server, registers admin@localhost, logs in, gets a Bearer token for the admin
    API (when loaded) and creates the groups "default", "g1" and "g2"."""
    mods = list(modules)
    opts = dict(options or {})
    if landing_page:
        # Landing pages: web_options' `invites_page` template; 0.12 needs mod_invites_page for it.
        mods.append("invites_page")
    else:
        opts["invites_page"] = None
    hopts = {"groups_muc_host": False}  # no MUC host here (0.12's default would log an error)
    hopts.update(host_options or {})
    ws = start_web_server(make_server, extra_modules=mods, options=opts, host_options=hopts,
                          third_party=True)
    request.node._prosody_server = ws.server  # logs in the report on failure
    site = Site(ws)
    site.srv.register_user(ADMIN, ADMIN_PASSWORD)
    site.admin = await xmpp.login(site.srv.port, f"{ADMIN}@{HOST}", ADMIN_PASSWORD)
    where = (await site.hook("tp_module_path", "groups_internal")).value
    assert where and where.startswith(str(harness.third_party_dir())), f"mod_groups_internal loaded from {where}"
    if "http_admin_api" in mods:
        res = await site.hook("tp_admin_token", ADMIN)
        assert res.ok and isinstance(res.value, str), res
        site.bearer = res.value
    for group in ("default", "g1", "g2"):
        res = await site.hook("tp_group_create", group, f"Group {group}")
        assert res.value == group, res
    return site


def token_of(uri):
    return xmpp.parse_uri(uri).token


def handle_of(token):
    """The non-secret handle of an invite in hash mode: the token's SHA-256 (its storage key)."""
    return hashlib.sha256(token.encode()).hexdigest()


def portal_parse(entry) -> dict:
    """What snikket-web-portal (AdminInviteInfo.from_api_response) reads from an admin-API
    invite: raises (fails the test) where the portal would, and checks the types it relies on."""
    assert isinstance(entry, dict), entry
    missing = [k for k in ("id", "created_at", "expires", "type", "jid", "reusable") if k not in entry]
    assert not missing, f"the portal needs {missing}, missing from {entry}"
    assert isinstance(entry["id"], str) and entry["id"], ("id", entry)
    for k in ("created_at", "expires"):
        assert isinstance(entry[k], int) and not isinstance(entry[k], bool), (k, entry)
        datetime.fromtimestamp(entry[k], timezone.utc)
    assert entry["expires"] > entry["created_at"], entry
    assert entry["type"] in ("register", "roster"), entry
    assert isinstance(entry["jid"], str), ("jid", entry)
    assert isinstance(entry["reusable"], bool), ("reusable", entry)
    for k in ("uri", "xmpp_uri", "landing_page", "inviter", "source"):
        assert entry.get(k) is None or isinstance(entry[k], str), (k, entry)
    groups = entry.get("groups", [])
    assert isinstance(groups, list) and all(isinstance(g, str) for g in groups), entry
    assert isinstance(entry.get("reset", False), bool), entry
    return {
        "id": entry["id"],
        "token": entry["id"],
        "type": entry["type"],
        "jid": entry["jid"],
        "created_at": entry["created_at"],
        "expires": entry["expires"],
        "reusable": entry["reusable"],
        "groups": groups,
        "is_reset": entry.get("reset", False),
        "landing_page": entry.get("landing_page"),
    }


def listed(site) -> dict:
    """GET /admin_api/invites, every entry parsed as the portal does: {id: entry}."""
    status, data, r = site.api("GET", "/invites")
    assert status == 200 and isinstance(data, list), (status, r.body[:1000])
    for entry in data:
        portal_parse(entry)
    ids = [e["id"] for e in data]
    assert len(set(ids)) == len(ids), f"duplicate ids in {data}"
    return {e["id"]: e for e in data}


def missing_invite_status() -> int:
    """GET /admin_api/invites/{id} of an invite that is not there: 404 from the 0.12 revision;
    the 13 revision answers 500 (its error registry has no "item-not-found"), with Prosody's
    own mod_invites too."""
    return 404 if harness.prosody_major_version() < 13 else 500


def create_via_api(site, kind, body=None) -> dict:
    status, data, r = site.api("POST", f"/invites/{kind}", body)
    assert status == 200 and isinstance(data, dict), (kind, status, r.body[:1000])
    assert isinstance(data.get("uri"), str), (kind, data)
    return data


# ------------------------------------------------------------------ admin API


def expected_landing_page(site, kind, token):
    """mod_invites_page gives every invite a page, but reset invites from prosody-modules
    hg20260723 on ("password reset invites are not currently supported")."""
    if kind == "reset" and harness.prosody_modules_snapshot() >= 20260723:
        return None
    return site.landing_page(token)


async def test_admin_api_note_is_the_invites_note_and_edit_changes_it(make_server, request):
    """The admin API keeps a note in additional_data.note: `show` prints it, and `edit --note`
    changes what the API lists."""
    if harness.prosody_major_version() < 13:
        pytest.skip("the 0.12 revision of mod_http_admin_api (rev 4956) has no note")
    site = await start_site(make_server, request)
    invite = create_via_api(site, "account", {"note": "for the choir"})
    token = token_of(invite["uri"])
    rc, out, err = site.srv.prosodyctl("mod_invites", "show", HOST, token)
    assert rc == 0 and "note:        for the choir" in out, (out, err)
    invite_id = re.search(r"^id:\s+(\w+)", out, re.M).group(1)
    rc, out, err = site.srv.prosodyctl("mod_invites", "edit", HOST, invite_id, "--note", "for the band")
    assert rc == 0, (out, err)
    assert listed(site)[token]["note"] == "for the band"
    rc, out, err = site.srv.prosodyctl("mod_invites", "edit", HOST, invite_id, "--note", "")
    assert rc == 0, (out, err)
    assert listed(site)[token].get("note") is None


async def test_admin_api_lists_gets_and_deletes_invites_by_their_token(make_server, request):
    site = await start_site(make_server, request, landing_page=True)
    site.srv.register_user("dave", "dave-secret")

    status, _, r = site.api("GET", "/invites", auth=False)
    assert status == 401, (status, r.body[:300])  # the API does authenticate

    account = create_via_api(site, "account")
    group = create_via_api(site, "group", {"groups": ["default"]})
    reset = create_via_api(site, "reset", {"username": "dave"})
    created = {}
    for name, inv in (("account", account), ("group", group), ("reset", reset)):
        token = token_of(inv["uri"])
        assert token and inv["id"] == token, (name, inv)
        created[token] = (name, inv)

    invites = listed(site)
    assert set(invites) == set(created), (
        f"listed ids {sorted(invites)} are not the created invites' tokens {sorted(created)}: {invites}")
    for token, entry in invites.items():
        name, inv = created[token]
        assert entry["uri"] == inv["uri"], (name, entry)
        assert token_of(entry["uri"]) == token and xmpp.parse_uri(entry["uri"]).jid == entry["jid"], (name, entry)
        assert entry.get("landing_page") == expected_landing_page(site, name, token), (name, entry)
        for k in ("type", "jid", "created_at", "expires", "reusable"):
            assert entry[k] == inv[k], (name, k, entry, inv)
    assert invites[token_of(group["uri"])]["groups"] == ["default"]
    assert invites[token_of(reset["uri"])]["reset"] is True
    assert invites[token_of(reset["uri"])]["jid"] == f"dave@{HOST}"
    assert invites[token_of(account["uri"])]["reset"] is False

    # GET /admin_api/invites/{id}: the same invite.
    for token, entry in invites.items():
        status, data, r = site.api("GET", f"/invites/{urllib.parse.quote(token, safe='')}")
        assert status == 200, (created[token][0], status, r.body[:500])
        assert portal_parse(data) == portal_parse(entry) and data.get("uri") == entry["uri"], (data, entry)

    # The listed xmpp: URI registers an account over c2s; the used invite leaves the list.
    account_uri = invites[token_of(account["uri"])]["uri"]
    res = await xmpp.register_with_invite(site.srv.port, token_of(account_uri), "newbie", "newbie password")
    assert res.ok, (res.preauth, res.register)
    await xmpp.login(site.srv.port, f"newbie@{HOST}", "newbie password", presence=False)
    assert set(listed(site)) == set(created) - {token_of(account["uri"])}
    # Deleting the used (so already gone) invite: 200, as with Prosody's own store.
    status, _, r = site.api("DELETE", f"/invites/{token_of(account['uri'])}")
    assert status == 200, ("DELETE of a used invite", status, r.body[:500])

    # DELETE, twice: 200 both times; then it is gone and its token registers nothing.
    gone = token_of(reset["uri"])
    for attempt in (1, 2):
        status, _, r = site.api("DELETE", f"/invites/{gone}")
        assert status == 200, (f"DELETE #{attempt}", status, r.body[:500])
    status, _, r = site.api("GET", f"/invites/{gone}")
    assert status == missing_invite_status(), (status, r.body[:500])
    assert set(listed(site)) == {token_of(group["uri"])}
    out = await xmpp.register_with_invite(site.srv.port, gone, "dave2", "pw")
    assert not out.preauth.ok and not out.register.ok, (out.preauth, out.register)
    # An id that never was: 200 too (Prosody's own store deletes nothing and says so).
    status, _, r = site.api("DELETE", "/invites/NeverWasAnInviteToken123")
    assert status == 200, (status, r.body[:500])
    # The group invite is untouched and still registers.
    res = await xmpp.register_with_invite(site.srv.port, token_of(group["uri"]), "grouped", "pw")
    assert res.ok, (res.preauth, res.register)
    assert (await site.hook("tp_group_members", "default")).value == ["grouped"]


async def test_admin_api_in_hash_mode_uses_the_handle(make_server, request):
    site = await start_site(make_server, request, landing_page=True,
                            host_options={"invite_token_storage": "hash"})
    kept = create_via_api(site, "account")
    doomed = create_via_api(site, "group", {"groups": ["g1"]})
    kept_token, doomed_token = token_of(kept["uri"]), token_of(doomed["uri"])
    kept_handle, doomed_handle = handle_of(kept_token), handle_of(doomed_token)
    assert not site.srv.grep_data(kept_token) and not site.srv.grep_data(doomed_token), "a token is stored"

    invites = listed(site)
    assert set(invites) == {kept_handle, doomed_handle}, (
        f"hash mode: expected the handles {kept_handle}, {doomed_handle} as ids: {invites}")
    for handle, entry in invites.items():
        assert HEX64.fullmatch(handle), entry
        assert "uri" not in entry and "landing_page" not in entry, ("nothing retrievable in hash mode", entry)
    assert invites[doomed_handle]["groups"] == ["g1"]

    status, data, r = site.api("GET", f"/invites/{doomed_handle}")
    assert status == 200, (status, r.body[:500])
    assert portal_parse(data) == portal_parse(invites[doomed_handle]), (data, invites[doomed_handle])
    assert "uri" not in data and "landing_page" not in data, data

    for attempt in (1, 2):
        status, _, r = site.api("DELETE", f"/invites/{doomed_handle}")
        assert status == 200, (f"DELETE #{attempt}", status, r.body[:500])
    status, _, r = site.api("GET", f"/invites/{doomed_handle}")
    assert status == missing_invite_status(), (status, r.body[:500])
    assert set(listed(site)) == {kept_handle}

    # The deleted invite's token no longer registers; the other one does.
    out = await xmpp.register_with_invite(site.srv.port, doomed_token, "doomed", "pw")
    assert not out.preauth.ok and not out.register.ok, (out.preauth, out.register)
    res = await xmpp.register_with_invite(site.srv.port, kept_token, "kept", "kept password")
    assert res.ok, (res.preauth, res.register)
    await xmpp.login(site.srv.port, f"kept@{HOST}", "kept password", presence=False)
    assert listed(site) == {}


# ------------------------------------------------------------------ groups


async def test_default_group_module_puts_a_contact_invite_account_in_group_default(make_server, request):
    """mod_invites_default_group sets additional_data.groups = { "default" } in invite-created
    (for roster invites only): that must be stored, so the new account joins "default"."""
    site = await start_site(make_server, request)
    site.srv.register_user("alice", "alice-secret")
    invite = (await site.hook("create_contact", "alice", True)).value
    assert invite["additional_data"]["groups"] == ["default"], invite  # the handler ran
    token = token_of(invite["uri"])

    stored = await site.hook("get_account_invite_info", token)
    assert stored.ok and (stored.value.get("additional_data") or {}).get("groups") == ["default"], (
        "the groups set in invite-created were not stored", stored)

    res = await xmpp.register_with_invite(site.srv.port, token, "bob", "bob password")
    assert res.ok, (res.preauth, res.register)
    assert (await site.hook("tp_group_members", "default")).value == ["bob"]
    assert (await site.hook("tp_group_events")).value == [{"id": "default", "user": "bob"}]
    roster = (await site.hook("get_roster", "bob")).value
    assert roster.get(f"alice@{HOST}", {}).get("subscription") == "both", roster


@pytest.mark.parametrize("with_invites_groups", [True, False], ids=["with-mod_invites_groups", "without"])
async def test_new_account_joins_each_group_of_its_invite_once(make_server, request, with_invites_groups):
    modules = [m for m in SNIKKET_MODULES if with_invites_groups or m != "invites_groups"]
    site = await start_site(make_server, request, modules=modules)
    by_group = (await site.hook("create_group", ["g1", "g2"])).value
    by_account = (await site.hook("create_account", None, {"groups": ["g2"]})).value

    res = await xmpp.register_with_invite(site.srv.port, token_of(by_group["uri"]), "gina", "pw")
    assert res.ok, (res.preauth, res.register)
    res = await xmpp.register_with_invite(site.srv.port, token_of(by_account["uri"]), "hank", "pw")
    assert res.ok, (res.preauth, res.register)

    events = (await site.hook("tp_group_events")).value
    assert sorted((e["id"], e["user"]) for e in events) == [("g1", "gina"), ("g2", "gina"), ("g2", "hank")], (
        "group-user-added events (each once expected)", events)
    assert (await site.hook("tp_group_members", "g1")).value == ["gina"]
    assert (await site.hook("tp_group_members", "g2")).value == ["gina", "hank"]


# ------------------------------------------------------------ keep working


def register_api(site, method, path, body=None):
    headers = {}
    if body is not None:
        body = json.dumps(body)
        headers["Content-Type"] = "application/json"
    r = http_request(site.base + "/register_api" + path, method, headers=headers, body=body)
    return r.status, json_or_none(r), r


async def test_register_api_info_registration_reuse_and_bound_username(make_server, request):
    site = await start_site(make_server, request)
    srv = site.srv
    srv.register_user("alice", "alice-secret")

    account = (await site.hook("create_account")).value
    token = token_of(account["uri"])
    status, info, r = register_api(site, "GET", f"/invite/{token}")
    assert status == 200, (status, r.body[:500])
    assert (info["token"], info["type"], info.get("jid"), info["domain"]) == (token, "register", HOST, HOST), info
    assert token_of(info["uri"]) == token and not info.get("inviter"), info

    contact = (await site.hook("create_contact", "alice", True)).value
    contact_token = token_of(contact["uri"])
    status, info, r = register_api(site, "GET", f"/invite/{contact_token}")
    assert status == 200, (status, r.body[:500])
    assert (info["type"], info.get("jid"), info.get("inviter")) == ("roster", f"alice@{HOST}", "alice"), info
    assert token_of(info["uri"]) == contact_token, info

    # Registration, then the single-use token is refused.
    status, data, r = register_api(site, "POST", "/register",
                                   {"username": "erin", "password": "erin password", "token": token})
    assert (status, data) == (200, {"jid": f"erin@{HOST}"}), (status, r.body[:500])
    await xmpp.login(srv.port, f"erin@{HOST}", "erin password", presence=False)
    status, _, r = register_api(site, "POST", "/register",
                                {"username": "erin2", "password": "pw", "token": token})
    assert status == 404, ("a used single-use token", status, r.body[:500])
    assert register_api(site, "GET", f"/invite/{token}")[0] == 404
    assert (await site.hook("user_exists", "erin2")).value is False

    # A contact invite makes the new account and the inviter mutual contacts.
    status, data, r = register_api(site, "POST", "/register",
                                   {"username": "frank", "password": "frank password", "token": contact_token})
    assert (status, data) == (200, {"jid": f"frank@{HOST}"}), (status, r.body[:500])
    roster = (await site.hook("get_roster", "frank")).value
    assert roster.get(f"alice@{HOST}", {}).get("subscription") == "both", roster

    # An invite bound to carol registers carol only.
    bound = (await site.hook("create_account", "carol")).value
    bound_token = token_of(bound["uri"])
    status, _, r = register_api(site, "POST", "/register",
                                {"username": "mallory", "password": "pw", "token": bound_token})
    assert status == 403, ("another username with an invite for carol", status, r.body[:500])
    assert (await site.hook("user_exists", "mallory")).value is False
    status, data, r = register_api(site, "POST", "/register",
                                   {"username": "carol", "password": "carol password", "token": bound_token})
    assert (status, data) == (200, {"jid": f"carol@{HOST}"}), (status, r.body[:500])
    await xmpp.login(srv.port, f"carol@{HOST}", "carol password", presence=False)


async def test_register_api_password_reset_works_once(make_server, request):
    """mod_invites_register_api resets with set_password and fires user-password-reset with the
    bare username: the reset link must still be spent, exactly once."""
    site = await start_site(make_server, request)
    srv = site.srv
    srv.register_user("alice", "old password")
    reset = (await site.hook("create_account_reset", "alice")).value
    token = token_of(reset["uri"])
    status, info, r = register_api(site, "GET", f"/invite/{token}")
    assert status == 200 and info.get("reset") == "alice", (status, r.body[:500])

    status, data, r = register_api(site, "POST", "/register",
                                   {"username": "alice", "password": "new password", "token": token})
    assert (status, data) == (200, {"jid": f"alice@{HOST}"}), (status, r.body[:500])
    await xmpp.login(srv.port, f"alice@{HOST}", "new password", presence=False)

    # Spent: the same link resets nothing again.
    status, _, r = register_api(site, "POST", "/register",
                                {"username": "alice", "password": "third password", "token": token})
    assert status == 404, ("a used reset link", status, r.body[:500])
    assert await xmpp.login_fails(srv.port, f"alice@{HOST}", "third password")
    await xmpp.login(srv.port, f"alice@{HOST}", "new password", presence=False)


async def test_invites_tracking_records_the_invite_of_each_account(make_server, request):
    site = await start_site(make_server, request)
    invite = (await site.hook("create_account", None, {"source": "portal/test"})).value
    token = token_of(invite["uri"])
    res = await xmpp.register_with_invite(site.srv.port, token, "tina", "pw")
    assert res.ok, (res.preauth, res.register)
    record = (await site.hook("tp_store_get", "invites_tracking", "tina")).value
    assert record == {"invite_id": token, "invite_source": "portal/test"}, record


async def test_bootstrap_link_makes_an_admin_in_group_default(make_server, request):
    if harness.prosody_major_version() < 13:
        pytest.skip("mod_invites_bootstrap needs Prosody 13 (it requires prosody.net.http)")
    secret = "bootstrap-secret-123"
    site = await start_site(make_server, request, modules=SNIKKET_MODULES + ("invites_bootstrap",),
                            host_options={"invites_bootstrap_secret": secret, "invites_bootstrap_index": 1})
    url = f"{site.base}/invites_bootstrap"

    r = http_request(f"{url}?token=wrong")
    assert r.status == 403, (r.status, r.body[:300])
    r = http_request(f"{url}?token={secret}")
    assert r.status == 303, (r.status, r.headers, r.body[:300])
    location = r.header("Location")
    invite = xmpp.parse_uri(location)
    assert (invite.jid, invite.action) == (HOST, "register") and invite.token, location
    # The same index again: the same link (replay protection), no second invite.
    again = http_request(f"{url}?token={secret}")
    assert (again.status, again.header("Location")) == (303, location), (again.status, again.headers)

    res = await xmpp.register_with_invite(site.srv.port, invite.token, "boss", "boss password")
    assert res.ok, (res.preauth, res.register)
    await xmpp.login(site.srv.port, f"boss@{HOST}", "boss password", presence=False)
    assert (await site.hook("is_admin", f"boss@{HOST}")).value is True
    assert "prosody:admin" in ((await site.hook("get_roles", "boss")).value or {})
    assert "boss" in (await site.hook("tp_group_members", "default")).value
