"""Listing the real token back without keeping a usable one at rest (invite_token_storage).

With the default `invite_token_storage = "sealed"`, each invite record (store `invites`,
keyed by the token's SHA-256) also holds the token sealed with XChaCha20-Poly1305 in the
JSON field `sealed_token` (hex), the record's storage key as associated data. The key is a
file outside the store (`invite_token_key_file`, default `<data_path>/invite_token.key`,
mode 0600, 64 hex digits and a newline), created on first use. Listings then give the token
and URI back (pending_account_invites(), get_account_invite_info(), `prosodyctl mod_invites
show`), while storage, logs, `list` and /metrics still never see the token. A lost or
changed key, or a sealed token that belongs to another record, costs only the link: the
invite lists with its handle (the token's SHA-256) and the token still registers.

With `invite_token_storage = "hash"` nothing is retrievable: listings carry the handle in
`token` (no `uri`), and the handle names the invite for get_account_invite_info(),
delete_account_invite(), `show` and `revoke`, but never works as a token.

Test 1 runs on every storage; the others edit or restart storage and run on internal
storage and SQLite only. Records are edited with the server stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import urllib.request

import pytest

import harness
import xmpp

REVOKED_TEXT = "This invitation has been revoked"
KEY_WARNING = r"\twarn\t.*invite_token_key_file"


def _internal_and_sql():
    """internal and sql, as far as INVITES_STORAGE allows (none left: the test is skipped)."""
    want = [s.strip() for s in os.environ.get("INVITES_STORAGE", "").split(",") if s.strip()]
    return [s for s in ("internal", "sql") if not want or s in want]


# Overrides conftest's `storage` fixture for one test: no PostgreSQL.
internal_and_sql = pytest.mark.parametrize("storage", _internal_and_sql())


def token_of(uri):
    return xmpp.parse_uri(uri).token


def handle_of(token):
    """The non-secret handle of an invite: the token's SHA-256, its storage key."""
    return hashlib.sha256(token.encode()).hexdigest()


def id_of(token):
    return handle_of(token)[-10:]


def ctl(server, *args):
    rc, out, err = server.prosodyctl("mod_invites", *args)
    return rc, out.strip(), err


async def api(client, fn, *args):
    """Calls mod_invites' Lua API inside the server; fails the test if it raised."""
    res = await xmpp.call_hook(client, fn, *args)
    assert not res.raised, res
    return res


async def pending_by_id(client):
    """pending_account_invites(), as {id: invite}."""
    listed = (await api(client, "pending_account_invites")).value or []
    return {inv["id"]: inv for inv in listed}


def key_path(server):
    return server.data_dir / "invite_token.key"


def assert_key_file(server):
    """The key file exists with mode 0600 and holds 64 hex digits and a newline; returns them."""
    path = key_path(server)
    assert path.is_file(), f"no key file at {path}"
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o600, oct(mode)
    text = path.read_text()
    assert re.fullmatch(r"[0-9a-fA-F]{64}\n", text), repr(text)
    return text.strip()


def links_in(text):
    return [xmpp.parse_uri(u) for u in re.findall(r"xmpp:[^\s'\"<>]+", text)]


def assert_handle_only(invite, token):
    """A listed invite that carries its handle instead of the token, and no link."""
    assert invite.get("token") == handle_of(token), f"not listed with its handle in `token`: {invite}"
    assert invite.get("id") == id_of(token), invite
    assert "uri" not in invite and "landing_page" not in invite, invite
    assert token not in json.dumps(invite), invite


def assert_with_link(invite, token, uri):
    assert invite.get("token") == token, f"not listed with its token: {invite}"
    assert invite.get("id") == id_of(token), invite
    assert "uri" in invite and xmpp.parse_uri(invite["uri"]) == xmpp.parse_uri(uri), invite


# ----------------------------------------------------------------- stored records
#
# One record per invite: store `invites`, owner = the token's SHA-256, value { record = JSON }.
# Internal storage: data/localhost/invites/<key>.dat, a Lua file `return { ["record"] = "…" };`.
# SQL: the row ("localhost", key, "invites", "record", "string", JSON) of table "prosody".

_RECORD_LITERAL = re.compile(r'\["record"\]\s*=\s*"((?:[^"\\]|\\.)*)"', re.S)
_LUA_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v",
                "\\": "\\", '"': '"', "'": "'", "\n": "\n"}


def _lua_unquote(body):
    out, i = [], 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        nxt = body[i + 1]
        if nxt.isdigit():
            m = re.match(r"\d{1,3}", body[i + 1:])
            out.append(chr(int(m.group(0))))
            i += 1 + len(m.group(0))
        elif nxt == "x":
            out.append(chr(int(body[i + 2:i + 4], 16)))
            i += 4
        elif nxt == "z":
            i += 2
            while i < len(body) and body[i].isspace():
                i += 1
        else:
            out.append(_LUA_ESCAPES[nxt])
            i += 2
    return "".join(out)


def record_file(server, key):
    return server.data_dir / "localhost" / "invites" / f"{key}.dat"


def read_record(server, key):
    """The JSON record of one invite, as a dict."""
    if server.storage == "internal":
        text = record_file(server, key).read_text()
        m = _RECORD_LITERAL.search(text)
        assert m, f"no record in {record_file(server, key)}:\n{text}"
        return json.loads(_lua_unquote(m.group(1)))
    rows = [r for r in server.stored_rows("invites", user=key) if r["key"] == "record"]
    assert len(rows) == 1, rows
    return json.loads(rows[0]["value"])


def write_record(server, key, record):
    """Replaces one invite's JSON record (server stopped)."""
    assert not server.running
    text = json.dumps(record, separators=(",", ":"))
    if server.storage == "internal":
        path = record_file(server, key)
        assert path.is_file(), path
        path.write_text('return {\n\t["record"] = ' + harness.lua_str(text) + ";\n};\n")
        return
    changed = server.sql_query(
        'UPDATE "prosody" SET "value"=? WHERE "host"=? AND "store"=? AND "user"=? AND "key"=?',
        text, "localhost", "invites", key, "record",
    ).rowcount
    assert changed == 1, changed


def all_records(server):
    """{key: record} for every stored invite."""
    if server.storage == "internal":
        folder = server.data_dir / "localhost" / "invites"
        keys = [p.stem for p in folder.glob("*.dat")] if folder.exists() else []
    else:
        keys = [r["user"] for r in server.stored_rows("invites") if r["key"] == "record"]
    return {k: read_record(server, k) for k in keys}


def assert_sealed(record, token):
    """The record holds the token sealed: hex, longer than token + tag, no plain copy inside."""
    sealed = record.get("sealed_token")
    assert isinstance(sealed, str) and re.fullmatch(r"[0-9a-fA-F]+", sealed), f"no hex sealed_token: {record}"
    raw = bytes.fromhex(sealed)
    assert len(raw) >= len(token) + 16, len(raw)  # at least the Poly1305 tag on top
    assert token.encode() not in raw
    return sealed


# 1. Sealed by default ------------------------------------------------------------------


@pytest.mark.async_timeout(150)
async def test_sealed_by_default_listings_give_tokens_back_and_nothing_usable_rests(make_server):
    http_port = harness.free_port()
    server = make_server(
        extra_modules=["http_openmetrics"],
        options={"statistics": "internal", "statistics_interval": "manual",
                 "http_ports": [http_port], "http_interfaces": ["127.0.0.1"]},
    )
    for user in ("admin", "alice", "romeo"):
        server.register_user(user, f"{user}-secret")
    c = await xmpp.login(server.port, "admin@localhost", "admin-secret")

    created = {  # name -> uri as handed out at creation
        "generated": server.generate_invite(),
        "generated reset": server.generate_invite("--reset", "alice"),
        "account": (await api(c, "create_account")).value["uri"],
        "bound": (await api(c, "create_account", "bob")).value["uri"],
        "contact+ibr": (await api(c, "create_contact", "romeo", True)).value["uri"],
        "contact only": (await api(c, "create_contact", "romeo", False)).value["uri"],
    }
    tokens = {name: token_of(uri) for name, uri in created.items()}
    registering = [n for n in created if n != "contact only"]

    # One key per server, outside the invite store.
    key = assert_key_file(server)
    assert server.grep_data(key) == [key_path(server)]

    # Every record sits under its token's SHA-256 and holds the token sealed, never in clear.
    records = all_records(server)
    assert set(records) == {handle_of(t) for t in tokens.values()}
    sealed = [assert_sealed(records[handle_of(t)], t) for t in tokens.values()]
    assert len(set(sealed)) == len(sealed)

    # The Lua API gives the real tokens and links back.
    listed = await pending_by_id(c)
    assert set(listed) == {id_of(tokens[n]) for n in registering}, listed
    for name in registering:
        assert_with_link(listed[id_of(tokens[name])], tokens[name], created[name])
        info = (await api(c, "get_account_invite_info", tokens[name])).value
        assert_with_link(info, tokens[name], created[name])

    # `show` prints the link; `list` never a token.
    for name, uri in created.items():
        rc, out, err = ctl(server, "show", "localhost", id_of(tokens[name]))
        assert rc == 0, (name, out, err)
        assert xmpp.parse_uri(uri) in links_in(out), (name, out)
    for args in (("list", "localhost"), ("list", "localhost", "--all")):
        rc, out, err = ctl(server, *args)
        assert rc == 0, (out, err)
        for name, token in tokens.items():
            assert id_of(token) in out, (name, out)
            assert token not in out, (name, out)
        assert "preauth=" not in out, out

    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert "prosody_mod_invites__created_total" in metrics

    # A sealed invite registers as always.
    assert (await xmpp.register_with_invite(server.port, tokens["bound"], "bob", "bob-pw")).ok

    # Nothing at rest or in the (debug) logs holds a token, in clear or as hex.
    for name, token in tokens.items():
        assert server.grep_data(token) == [], name
        assert server.grep_data(token.encode().hex()) == [], name
        assert server.grep_logs(token) == [], name
        assert token not in metrics, name
    assert not server.log_lines(KEY_WARNING)  # the key is there: nothing to warn about


# 2. A lost key costs the links, nothing else -------------------------------------------


@internal_and_sql
@pytest.mark.async_timeout(120)
async def test_lost_key_file_lists_handles_warns_once_and_tokens_still_register(make_server):
    server = make_server()
    server.register_user("admin", "admin-secret")
    c = await xmpp.login(server.port, "admin@localhost", "admin-secret")
    a = token_of(server.generate_invite())
    b = token_of((await api(c, "create_account", "bob")).value["uri"])
    old_key = assert_key_file(server)
    await xmpp.close_all()

    server.stop()
    key_path(server).unlink()
    server.restart()

    c = await xmpp.login(server.port, "admin@localhost", "admin-secret")
    for _ in range(2):
        listed = await pending_by_id(c)
        assert set(listed) == {id_of(a), id_of(b)}, listed
        assert_handle_only(listed[id_of(a)], a)
        assert_handle_only(listed[id_of(b)], b)
    warnings = server.log_lines(KEY_WARNING)
    assert len(warnings) == 1, warnings
    for token in (a, b):
        rc, out, err = ctl(server, "show", "localhost", id_of(token))
        assert rc == 0 and id_of(token) in out, (out, err)
        assert links_in(out) == [] and token not in out + err, out

    # A new key, and invites made from now on list with their links again.
    fresh = await api(c, "create_account")
    new_key = assert_key_file(server)
    assert new_key != old_key
    fresh_token = token_of(fresh.value["uri"])
    listed = await pending_by_id(c)
    assert_with_link(listed[id_of(fresh_token)], fresh_token, fresh.value["uri"])
    assert_handle_only(listed[id_of(a)], a)
    assert xmpp.parse_uri(fresh.value["uri"]) in links_in(ctl(server, "show", "localhost", id_of(fresh_token))[1])

    # The old links still register, once each.
    assert (await xmpp.register_with_invite(server.port, a, "alice", "alice-pw")).ok
    assert (await xmpp.register_with_invite(server.port, b, "bob", "bob-pw")).ok
    assert (await xmpp.register_with_invite(server.port, fresh_token, "carol", "carol-pw")).ok
    for token in (a, b, fresh_token):
        assert server.grep_data(token) == [] and server.grep_logs(token) == []


# 3. A sealed token is bound to its record ----------------------------------------------


@internal_and_sql
async def test_sealed_token_copied_into_another_record_does_not_open(make_server):
    server = make_server()
    server.register_user("admin", "admin-secret")
    c = await xmpp.login(server.port, "admin@localhost", "admin-secret")
    a_uri = (await api(c, "create_account")).value["uri"]
    a, b = token_of(a_uri), token_of(server.generate_invite())
    await xmpp.close_all()

    server.stop()
    record_a, record_b = read_record(server, handle_of(a)), read_record(server, handle_of(b))
    sealed_a, sealed_b = assert_sealed(record_a, a), assert_sealed(record_b, b)
    assert sealed_a != sealed_b
    record_b["sealed_token"] = sealed_a
    write_record(server, handle_of(b), record_b)
    assert read_record(server, handle_of(b)) == record_b
    server.restart()

    c = await xmpp.login(server.port, "admin@localhost", "admin-secret")
    listed = await pending_by_id(c)
    assert set(listed) == {id_of(a), id_of(b)}, listed
    assert_handle_only(listed[id_of(b)], b)
    assert a not in json.dumps(listed[id_of(b)])
    assert_with_link(listed[id_of(a)], a, a_uri)  # the original still opens with its own key
    rc, out, err = ctl(server, "show", "localhost", id_of(b))
    assert rc == 0 and links_in(out) == [] and a not in out + err, out

    assert (await xmpp.register_with_invite(server.port, a, "alice", "alice-pw")).ok
    assert (await xmpp.register_with_invite(server.port, b, "bob", "bob-pw")).ok


# 4. invite_token_storage = "hash" ------------------------------------------------------


@internal_and_sql
@pytest.mark.async_timeout(120)
async def test_hash_mode_lists_handles_that_name_invites_but_never_register(make_server):
    server = make_server(host_options={"invite_token_storage": "hash"})
    server.register_user("admin", "admin-secret")
    c = await xmpp.login(server.port, "admin@localhost", "admin-secret")
    a = token_of(server.generate_invite())
    b_invite = (await api(c, "create_account", "bob")).value
    b = token_of(b_invite["uri"])
    d = token_of(server.generate_invite())  # kept for the restart in sealed mode
    tokens = (a, b, d)

    records = all_records(server)
    assert set(records) == {handle_of(t) for t in tokens}
    for made_by, token in (("prosodyctl generate", a), ("create_account", b), ("prosodyctl generate", d)):
        assert not records[handle_of(token)].get("sealed_token"), (made_by, records[handle_of(token)])
    for token in tokens:
        assert server.grep_data(token) == []

    listed = await pending_by_id(c)
    assert set(listed) == {id_of(t) for t in tokens}, listed
    for token in tokens:
        assert_handle_only(listed[id_of(token)], token)
    info = (await api(c, "get_account_invite_info", handle_of(b))).value
    assert info is not None
    assert_handle_only(info, b)
    assert info["bound_username"] == "bob"
    rc, out, err = ctl(server, "show", "localhost", handle_of(a))
    assert rc == 0 and id_of(a) in out and links_in(out) == [] and a not in out, (out, err)
    rc, out, _ = ctl(server, "list", "localhost")
    assert all(token not in out for token in tokens) and "preauth=" not in out, out

    # The handle is no token.
    for token in tokens:
        res = await xmpp.register_with_invite(server.port, handle_of(token), "mallory", "pw")
        assert not res.ok and res.preauth.condition == "item-not-found", res

    # Revoking by handle, through the API and prosodyctl.
    assert (await api(c, "delete_account_invite", handle_of(b))).value is True
    assert ctl(server, "revoke", "localhost", handle_of(a))[:2] == (0, f"Revoked invite {id_of(a)}")
    for token in (a, b):
        res = await xmpp.register_with_invite(server.port, token, "late", "pw")
        assert (res.preauth.condition, res.preauth.text) == ("item-not-found", REVOKED_TEXT), res
    assert set(await pending_by_id(c)) == {id_of(d)}
    await xmpp.close_all()

    # The same data in sealed mode (the default): the old invite lists by handle and registers.
    server.host_options.pop("invite_token_storage")
    server.restart()
    c = await xmpp.login(server.port, "admin@localhost", "admin-secret")
    listed = await pending_by_id(c)
    assert set(listed) == {id_of(d)}, listed
    assert_handle_only(listed[id_of(d)], d)
    rc, out, err = ctl(server, "show", "localhost", id_of(d))
    assert rc == 0 and links_in(out) == [] and d not in out, (out, err)
    res = await xmpp.register_with_invite(server.port, handle_of(d), "mallory", "pw")
    assert not res.ok and res.preauth.condition == "item-not-found", res
    assert (await xmpp.register_with_invite(server.port, d, "dora", "dora-pw")).ok
