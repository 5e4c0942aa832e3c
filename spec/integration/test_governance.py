"""Invite governance: who made each invite and who signed up with it, the invite tree, an
account's invites revoked when it is deleted, quotas and a cool-down for users' invites,
live edits, and the inviter told of a sign-up. On every Prosody version and storage.

Invites are made as users make them: over ad-hoc (our mod_invites_adhoc), where the
requester's own account becomes the invite's creator.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request

import pytest

import harness
import xmpp
from test_adhoc_0401 import CREATE_ACCOUNT, INVITE, command

NS_REGISTER = "jabber:iq:register"

GOVERNED = dict(extra_modules=["adhoc", "invites_adhoc"], options={"allow_user_invites": True})
governed = pytest.mark.server_options(**GOVERNED)


def token_of(uri: str) -> str:
    return xmpp.parse_uri(uri).token


def ctl(server, *args):
    rc, out, err = server.prosodyctl("mod_invites", *args)
    return rc, out.strip(), err


async def contact_invite(client) -> str:
    """A contact invite (that may register an account) made over ad-hoc; its token."""
    answer = await command(client, INVITE)
    assert answer.ok and answer.status == "completed" and not answer.notes, answer
    return token_of(answer.value("uri"))


async def sign_up(server, token: str, username: str) -> xmpp.Client:
    res = await xmpp.register_with_invite(server.port, token, username, f"{username}-pw")
    assert res.ok, (username, res)
    return await xmpp.login(server.port, f"{username}@localhost", f"{username}-pw", presence=False)


async def delete_own_account(client) -> None:
    """XEP-0077 account removal: the user deletes their own account (user-deleted fires)."""
    iq = client.Iq()
    iq["type"] = "set"
    iq.append(xmpp._el(f"{{{NS_REGISTER}}}query", children=[xmpp._el(f"{{{NS_REGISTER}}}remove")]))
    out = await xmpp._send_iq(client, iq, xmpp.DEFAULT_TIMEOUT)
    assert out.ok or out.condition is None, out


async def chain(server, admin):
    """admin → alice → bob → carol, each made with the invite of the one before (ad-hoc)."""
    a = await xmpp.login(server.port, admin.jid, admin.password, presence=False)
    answer = await command(a, CREATE_ACCOUNT)
    assert answer.ok and answer.status == "completed", answer
    alice = await sign_up(server, token_of(answer.value("uri")), "alice")
    bob = await sign_up(server, await contact_invite(alice), "bob")
    carol = await sign_up(server, await contact_invite(bob), "carol")
    return a, alice, bob, carol


# ------------------------------------------------------------- provenance and the tree


@governed
async def test_a_three_level_chain_shows_in_tree_show_list_and_the_lua_api(server, admin):
    a, alice, bob, carol = await chain(server, admin)
    server.register_user("dave", "dave-pw")  # registered without an invite: a root

    rc, out, err = ctl(server, "tree", "localhost")
    assert rc == 0, (out, err)
    lines = out.splitlines()
    at = {re.match(r"\s*(\S+)@localhost", line).group(1): line for line in lines if "@localhost" in line}
    assert at["admin"].startswith("admin@localhost  (depth 0, invited 1)"), out
    assert at["alice"] == "  alice@localhost  (depth 1, invited 1)", out
    assert at["bob"] == "    bob@localhost  (depth 2, invited 1)", out
    assert at["carol"] == "      carol@localhost  (depth 3)", out
    assert at["dave"] == "dave@localhost  (depth 0)", out
    assert lines.index(at["admin"]) < lines.index(at["alice"]) < lines.index(at["bob"]) < lines.index(at["carol"])
    assert lines[-1] == "5 accounts in 2 trees, deepest depth 3", out

    rc, out, _ = ctl(server, "tree", "localhost", "bob@localhost")
    assert rc == 0 and out.splitlines() == [
        "bob@localhost  (depth 0, invited 1, invited by alice@localhost)",
        "  carol@localhost  (depth 1)",
        "2 accounts in 1 trees, deepest depth 1",
    ], out

    # The Lua API for other modules.
    assert (await xmpp.call_hook(a, "invited_by", "carol")).value == "bob"
    assert (await xmpp.call_hook(a, "invited_by", "admin")).value is None
    assert (await xmpp.call_hook(a, "invitees", "alice")).value == ["bob"]
    assert (await xmpp.call_hook(a, "invitees", "dave")).value in ([], {}, None)

    # Who made each invite and who signed up with it; list --by.
    pending = await contact_invite(carol)
    rc, out, _ = ctl(server, "list", "localhost", "--all", "--by", "bob@localhost")
    rows = out.splitlines()[1:]
    assert rc == 0 and len(rows) == 1 and "used" in rows[0], out
    invite_id = rows[0].split()[0]
    rc, out, _ = ctl(server, "show", "localhost", invite_id)
    assert rc == 0, out
    assert re.search(r"^created by:  bob@localhost \(via bob@localhost/\S+\)$", out, re.M), out
    assert re.search(r"^redeemed:    carol@localhost signed up at \d{4}-\d\d-\d\d \d\d:\d\d UTC$", out, re.M), out
    rc, out, _ = ctl(server, "list", "localhost", "--by", "carol@localhost")
    assert rc == 0 and len(out.splitlines()) == 2, out
    assert pending not in out
    rc, out, _ = ctl(server, "list", "localhost", "--by", "nobody@elsewhere.example")
    assert rc == 2 and "--by needs the JID of an account of localhost" in out, out


@governed
async def test_deleting_an_account_revokes_its_pending_invites_and_keeps_the_chain(server, admin):
    a, alice, bob, carol = await chain(server, admin)
    pending = [await contact_invite(bob), await contact_invite(bob)]
    alices = await contact_invite(alice)

    await delete_own_account(bob)
    assert server.log_lines(r"Revoked 2 pending invites of deleted account bob")
    for token in pending:
        res = await xmpp.register_with_invite(server.port, token, "latecomer", "pw")
        assert res.preauth.condition == "item-not-found", res
    # Nobody else's invites are touched.
    await sign_up(server, alices, "erin")

    rc, out, _ = ctl(server, "tree", "localhost")
    assert rc == 0, out
    assert "    bob@localhost  (depth 2, deleted, invited 1)" in out.splitlines(), out
    assert "      carol@localhost  (depth 3)" in out.splitlines(), out
    assert (await xmpp.call_hook(a, "invited_by", "carol")).value == "bob"


@governed
async def test_revoke_by_revokes_every_pending_invite_a_user_made(server, admin):
    a, alice, bob, carol = await chain(server, admin)
    bobs = [await contact_invite(bob), await contact_invite(bob)]
    carols = await contact_invite(carol)
    rc, out, _ = ctl(server, "revoke", "localhost", "--by", "bob@localhost")
    assert (rc, out) == (0, "Revoked 2 pending invites created by bob@localhost"), out
    for token in bobs:
        assert (await xmpp.register_with_invite(server.port, token, "x", "pw")).preauth.condition == "item-not-found"
    await sign_up(server, carols, "frank")
    rc, out, _ = ctl(server, "revoke", "localhost", "--by", "bob@localhost")
    assert (rc, out) == (0, "Revoked 0 pending invites created by bob@localhost"), out


# ------------------------------------------------------------- quotas and cool-down


async def test_a_quota_of_two_a_day_refuses_the_third_contact_invite_and_counts_it(make_server):
    http_port = harness.free_port()
    server = make_server(
        extra_modules=["adhoc", "invites_adhoc", "http_openmetrics"],
        options={"allow_user_invites": True, "invite_quota": {"prosody:registered": [2, "1 day"]},
                 "statistics": "internal", "statistics_interval": "manual",
                 "http_ports": [http_port], "http_interfaces": ["127.0.0.1"]})

    def metrics():
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
            return r.read().decode()

    server.register_user("alice", "alice-pw")
    server.register_user("admin", "admin-pw")
    alice = await xmpp.login(server.port, "alice@localhost", "alice-pw", presence=False)
    first, second = await contact_invite(alice), await contact_invite(alice)
    third = await command(alice, INVITE)
    assert third.ok and third.status == "completed" and "uri" not in third.fields, third
    [(kind, text)] = third.notes
    assert kind == "error" and re.fullmatch(
        r"You have created as many invitations as you may for now; you can create another after"
        r" \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", text), third
    assert re.search(r'prosody_mod_invites__refused_total\{[^}]*reason="quota-exceeded"[^}]*\} 1', metrics())
    assert server.log_lines(r"Invite for alice@localhost refused: quota-exceeded")
    # What alice already made stays valid; admins are not limited by the role's quota.
    await sign_up(server, first, "bob")
    await sign_up(server, second, "carol")
    admin = await xmpp.login(server.port, "admin@localhost", "admin-pw", presence=False)
    for _ in range(3):
        await contact_invite(admin)


async def test_a_new_account_waits_before_it_may_invite(make_server):
    server = make_server(extra_modules=["adhoc", "invites_adhoc"],
                         options={"allow_user_invites": True, "invite_wait_after_registration": 2})
    server.register_user("old", "old-pw")
    # Registered before the server knew: old enough.
    old = await xmpp.login(server.port, "old@localhost", "old-pw", presence=False)
    fresh = await sign_up(server, token_of(ctl(server, "generate", "localhost")[1]), "fresh")
    await contact_invite(old)
    early = await command(fresh, INVITE)
    assert [kind for kind, _ in early.notes] == ["error"], early
    assert early.notes[0][1].startswith("New accounts cannot create invitations yet; you can create one after"), early
    # Allowed once the wait is over (polled, bounded).
    deadline = time.monotonic() + 15
    while True:
        answer = await command(fresh, INVITE)
        if not answer.notes:
            break
        assert time.monotonic() < deadline, answer
        await asyncio.sleep(0.5)
    assert answer.status == "completed" and answer.value("uri"), answer


async def test_an_account_registered_without_an_invite_waits_too_and_is_counted(make_server):
    """Open registration (no invite): the server notes when the account registered."""
    http_port = harness.free_port()
    server = make_server(
        extra_modules=["adhoc", "invites_adhoc", "http_openmetrics"],
        registration_invite_only=False, allow_registration=True,
        options={"allow_user_invites": True, "invite_wait_after_registration": "1 hour",
                 "statistics": "internal", "statistics_interval": "manual",
                 "http_ports": [http_port], "http_interfaces": ["127.0.0.1"]})
    async with xmpp.UnauthedSession(server.port) as s:
        assert (await s.register("walkin", "walkin-pw")).ok
    walkin = await xmpp.login(server.port, "walkin@localhost", "walkin-pw", presence=False)
    answer = await command(walkin, INVITE)
    assert [kind for kind, _ in answer.notes] == ["error"], answer
    assert answer.notes[0][1].startswith("New accounts cannot create invitations yet"), answer
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
        page = r.read().decode()
    assert re.search(r'prosody_mod_invites__refused_total\{[^}]*reason="too-soon"[^}]*\} 1', page), page


# ------------------------------------------------------------- live edits


async def test_edit_uses_3_makes_exactly_three_accounts_under_a_burst(server):
    token = token_of(ctl(server, "generate", "localhost")[1])
    invite_id = ctl(server, "list", "localhost")[1].splitlines()[1].split()[0]
    rc, out, _ = ctl(server, "edit", "localhost", invite_id, "--uses", "3", "--note", "for the choir")
    assert rc == 0 and re.fullmatch(rf"Invite {invite_id}: pending, expires .* UTC, uses 0/3, note: for the choir",
                                    out), out
    results = await asyncio.gather(*[
        xmpp.register_with_invite(server.port, token, f"singer{i}", "pw") for i in range(8)])
    assert sum(r.ok for r in results) == 3, results
    rc, out, _ = ctl(server, "show", "localhost", invite_id)
    assert "uses:        3/3" in out and "note:        for the choir" in out, out
    assert len(re.findall(r"^redeemed:    singer\d@localhost signed up", out, re.M)) == 3, out
    rc, out, _ = ctl(server, "list", "localhost", "--all")
    assert re.search(rf"^{invite_id} .* new account; note: for the choir$", out, re.M), out
    # Below what is taken: refused, nothing changes.
    rc, out, _ = ctl(server, "edit", "localhost", invite_id, "--uses", "2")
    assert rc == 1 and out == f"Invite {invite_id} not changed: it is used up; nothing to change", out


async def test_edit_expiry_revives_nothing_used_or_revoked(server):
    used = token_of(ctl(server, "generate", "localhost")[1])
    assert (await xmpp.register_with_invite(server.port, used, "first", "pw")).ok
    revoked = token_of(ctl(server, "generate", "localhost")[1])
    ids = {}
    for token in (used, revoked):
        rc, out, _ = ctl(server, "show", "localhost", token)
        ids[token] = re.search(r"^id:\s+(\w+)", out, re.M).group(1)
    assert ctl(server, "revoke", "localhost", ids[revoked])[0] == 0
    for token, why in ((used, "it is used up"), (revoked, "it is revoked")):
        rc, out, _ = ctl(server, "edit", "localhost", ids[token], "--expires-after", "30d")
        assert (rc, out) == (1, f"Invite {ids[token]} not changed: {why}; nothing to change"), out
        assert (await xmpp.register_with_invite(server.port, token, "second", "pw")).preauth.condition == (
            "item-not-found")
    # Shortening a pending invite takes effect at once; an expired one can be extended again.
    live = token_of(ctl(server, "generate", "localhost")[1])
    live_id = ctl(server, "list", "localhost")[1].splitlines()[1].split()[0]
    assert ctl(server, "edit", "localhost", live_id, "--expires-after", "1s")[0] == 0
    deadline = time.monotonic() + 10
    while "status:      expired" not in ctl(server, "show", "localhost", live_id)[1]:
        assert time.monotonic() < deadline, "the shortened invite never expired"
        await asyncio.sleep(0.5)
    res = await xmpp.register_with_invite(server.port, live, "third", "pw")
    assert res.preauth.condition == "item-not-found", res
    assert ctl(server, "edit", "localhost", live_id, "--expires-after", "1d")[0] == 0
    assert (await xmpp.register_with_invite(server.port, live, "third", "pw")).ok


# ------------------------------------------------------------- the inviter told


async def test_the_inviter_is_told_once_of_each_sign_up(make_server):
    server = make_server(extra_modules=["adhoc", "invites_adhoc"],
                         options={"allow_user_invites": True, "invite_notify_inviter": True})
    server.register_user("alice", "alice-pw")
    alice = await xmpp.login(server.port, "alice@localhost", "alice-pw")
    token = await contact_invite(alice)

    def told(s, who="bob"):
        return (s.xml.tag.endswith("}message") and s["from"] == "localhost"
                and f"{who}@localhost has signed up with your invitation." in (s["body"] or ""))

    await sign_up(server, token, "bob")
    await alice.wait_for(told)
    await alice.roundtrip()
    assert sum(1 for s in alice.received if told(s)) == 1
    # A failed sign-up tells nobody: the used invite registers nothing more.
    assert not (await xmpp.register_with_invite(server.port, token, "eve", "pw")).ok
    await alice.roundtrip()
    assert sum(1 for s in alice.received if s.xml.tag.endswith("}message")) == 1

    # An account invite an admin made over ad-hoc: the admin is told too.
    server.register_user("admin", "admin-pw")
    admin = await xmpp.login(server.port, "admin@localhost", "admin-pw")
    answer = await command(admin, CREATE_ACCOUNT)
    await sign_up(server, token_of(answer.value("uri")), "carol")
    await admin.wait_for(lambda s: told(s, "carol"))
    await admin.roundtrip()
    assert sum(1 for s in admin.received if told(s, "carol")) == 1


# ------------------------------------------------------------- 13's shell, 0.12's console


@pytest.mark.server_options(extra_modules=["admin_shell", "adhoc", "invites_adhoc"],
                            options={"allow_user_invites": True})
async def test_the_shell_has_tree_edit_list_by_and_revoke_by(server, admin):
    await chain(server, admin)
    bob = await xmpp.login(server.port, "bob@localhost", "bob-pw", presence=False)
    token = await contact_invite(bob)
    invite_id = ctl(server, "show", "localhost", token)[1].splitlines()[0].split()[-1]
    if harness.prosody_major_version() >= 13:
        commands = {
            "tree": ("invite", "tree", "localhost", "alice@localhost"),
            "list": ("invite", "list", "localhost", "--by", "bob@localhost"),
            "edit": ("invite", "edit", "localhost", invite_id, "--note", "from the shell"),
            "revoke": ("invite", "revoke", "localhost", "--by", "bob@localhost"),
        }
    else:
        commands = {
            "tree": ("invite:tree('localhost', 'alice@localhost')",),
            "list": ("invite:list('localhost', { by = 'bob@localhost' })",),
            "edit": (f"invite:edit('localhost', '{invite_id}', {{ note = 'from the shell' }})",),
            "revoke": ("invite:revoke('localhost', { by = 'bob@localhost' })",),
        }

    def shell(name):
        rc, out, err = server.prosodyctl("shell", *commands[name])
        assert rc == 0, (name, out, err)
        return out

    out = shell("tree")
    assert "  bob@localhost  (depth 1, invited 1)" in out and "3 accounts in 1 trees, deepest depth 2" in out, out
    out = shell("list")
    assert invite_id in out and token not in out, out
    assert "note: from the shell" in shell("edit")
    assert "Revoked 1 pending invites created by bob@localhost" in shell("revoke")
    res = await xmpp.register_with_invite(server.port, token, "late", "pw")
    assert res.preauth.condition == "item-not-found", res
