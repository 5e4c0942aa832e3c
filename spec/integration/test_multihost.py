"""Two virtual hosts: an invite works only on the host that made it (issue: an invite made
for b.localhost registers, resets passwords and grants roles on localhost).

Each server here has two VirtualHosts with the same modules: localhost (A) and b.localhost
(B), both invite-only. Prosody hands an unauthenticated stream's iq to the host named in its
`to`, so a stream opened to A can send its preauth to B and its registration to A (or the
other way round). Each test does that with one kind of invite and checks that nothing is
created or changed on either host (accounts and their passwords, invite lists, rosters,
roles), that the invite is still pending, and that it still works on its own host.

Run on storage = "internal" and SQLite only: the bug is in which host handles what, not in a
storage driver (INVITES_STORAGE still narrows the set). With the code before the fix every
test fails except the XEP-0379 one, which is a regression test.
"""

import os
import urllib.parse
import xml.etree.ElementTree as ET

import pytest

import xmpp

A = "localhost"
B = "b.localhost"
HOSTS = (A, B)
ADMIN_PASSWORD = "admin-secret"

INVITE_ONLY = ("modify", "not-acceptable", "Registration on this server is through invitation only")
WRONG_HOST_PREAUTH = ("cancel", "not-allowed", f"Invitations for {B} can only be used on a connection to {B}")
WRONG_HOST_REGISTER = ("cancel", "not-allowed", "This invitation is for another host")


# internal and SQLite only; INVITES_STORAGE narrows it further (pgsql alone skips them all).
STORAGES = [s.strip() for s in (os.environ.get("INVITES_STORAGE") or "internal,sql").split(",")
            if s.strip() in ("internal", "sql")]


@pytest.fixture(params=STORAGES)
def storage(request):
    """Overrides conftest's fixture of the same name (which also has pgsql)."""
    return request.param


@pytest.fixture
def server(make_server, request):
    """Prosody with VirtualHosts localhost and b.localhost, admin@ each (test-hook callers)."""
    srv = make_server(extra_hosts={B: {}}, admins=(f"admin@{A}", f"admin@{B}"))
    request.node._prosody_server = srv  # conftest attaches its log tail to a failure
    for host in HOSTS:
        srv.register_user("admin", ADMIN_PASSWORD, host=host)
    return srv


def token_of(uri):
    return xmpp.parse_uri(uri).token


def outcome(out):
    return (out.error_type, out.condition, out.text)


def register_query(username, password):
    q = ET.Element(f"{{{xmpp.NS_REGISTER}}}query")
    for name, value in (("username", username), ("password", password)):
        ET.SubElement(q, f"{{{xmpp.NS_REGISTER}}}{name}").text = value
    return q


class TwoHosts:
    """The test hook on each host (through admin@HOST) and what storage holds for each."""

    def __init__(self, server):
        self.server = server
        self.clients = {}

    @classmethod
    async def connect(cls, server):
        h = cls(server)
        for host in HOSTS:
            h.clients[host] = await xmpp.login(server.port, f"admin@{host}", ADMIN_PASSWORD, presence=False)
        return h

    async def api(self, host, fn, *args, client=None):
        """mod_invites' Lua API (or a test-hook helper) on `host`; fails the test if it raised."""
        res = await xmpp.call_hook(client or self.clients[host], fn, *args)
        assert not res.raised, res
        return res.value

    async def exists(self, host, username):
        return await self.api(host, "user_exists", username) is True

    def accounts(self, host):
        """Every account record of `host` as stored (password changes show here too)."""
        srv = self.server
        if srv.storage == "internal":
            out = {}
            for d in srv.data_dir.iterdir():
                if urllib.parse.unquote(d.name) == host and (d / "accounts").is_dir():
                    for f in sorted((d / "accounts").iterdir()):
                        out[urllib.parse.unquote(f.stem)] = f.read_bytes()
            return out
        return sorted((r["user"], r["key"], r["value"]) for r in srv.stored_rows("accounts", host=host))

    def invites(self, host):
        """`prosodyctl mod_invites list HOST --all`, sorted: status and uses of every invite."""
        rc, out, err = self.server.prosodyctl("mod_invites", "list", host, "--all")
        assert rc == 0, (out, err)
        return sorted(out.splitlines())

    def show(self, host, token):
        """`prosodyctl mod_invites show HOST TOKEN` as a dict (status, uses, for, ...)."""
        rc, out, err = self.server.prosodyctl("mod_invites", "show", host, token)
        assert rc == 0, f"show {host}: rc={rc} {out} {err}"
        return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines() if ":" in ln)}

    def assert_pending(self, host, token):
        shown = self.show(host, token)
        assert shown["status"] == "pending" and shown["uses"].startswith("0/"), shown

    async def state(self, roster_of=()):
        """Accounts and invites of both hosts, plus the rosters of these usernames on both."""
        return {
            host: {
                "accounts": self.accounts(host),
                "invites": self.invites(host),
                "rosters": {u: await self.api(host, "get_roster", u) for u in roster_of},
            }
            for host in HOSTS
        }


async def preauth_on_b_then_register_on_a(server, token, username, password):
    """The issue's reproduction: a stream to localhost, preauth to='b.localhost', register (no to)."""
    async with xmpp.UnauthedSession(server.port, domain=A) as s:
        pre = await s.preauth(token, to=B)
        reg = await s.register(username, password)
    return pre, reg


def assert_refused_on_both(pre, reg):
    assert outcome(pre) == WRONG_HOST_PREAUTH, pre
    assert outcome(reg) == INVITE_ONLY, reg


# Variants: an invite of b.localhost used on a stream to localhost --------------------


async def test_account_invite_of_b_creates_no_account_on_a(server):
    h = await TwoHosts.connect(server)
    token = token_of(server.generate_invite(host=B))
    before = await h.state()

    pre, reg = await preauth_on_b_then_register_on_a(server, token, "mallory", "pw")

    for host in HOSTS:
        assert not await h.exists(host, "mallory"), f"mallory@{host} created with {B}'s invite: {pre}, {reg}"
    assert_refused_on_both(pre, reg)
    assert await h.state() == before
    h.assert_pending(B, token)

    assert (await xmpp.register_with_invite(server.port, token, "mallory", "pw", domain=B)).ok
    await xmpp.login(server.port, f"mallory@{B}", "pw", presence=False)
    assert not await h.exists(A, "mallory")


async def test_reset_invite_of_b_resets_no_password_on_a(server):
    for host in HOSTS:
        server.register_user("alice", f"old-pw-{host}", host=host)
    h = await TwoHosts.connect(server)
    token = token_of(server.generate_invite("--reset", "alice", host=B))
    before = await h.state()

    pre, reg = await preauth_on_b_then_register_on_a(server, token, "alice", "new-pw")

    assert await xmpp.login_fails(server.port, f"alice@{A}", "new-pw"), \
        f"alice@{A}'s password was reset with {B}'s invite: {pre}, {reg}"
    for host in HOSTS:  # both keep their passwords
        await xmpp.login(server.port, f"alice@{host}", f"old-pw-{host}", presence=False)
    assert await xmpp.login_fails(server.port, f"alice@{B}", "new-pw")
    assert_refused_on_both(pre, reg)
    assert await h.state() == before
    h.assert_pending(B, token)

    assert (await xmpp.register_with_invite(server.port, token, "alice", "new-pw", domain=B)).ok
    await xmpp.login(server.port, f"alice@{B}", "new-pw", presence=False)
    await xmpp.login(server.port, f"alice@{A}", f"old-pw-{A}", presence=False)


async def test_admin_invite_of_b_makes_no_admin_on_a(server):
    h = await TwoHosts.connect(server)
    token = token_of(server.generate_invite("--admin", host=B))
    before = await h.state()

    pre, reg = await preauth_on_b_then_register_on_a(server, token, "eve", "pw")

    for host in HOSTS:
        assert not await h.api(host, "is_admin", f"eve@{host}"), f"eve@{host} is admin: {pre}, {reg}"
        assert not await h.exists(host, "eve"), f"eve@{host} created with {B}'s admin invite: {pre}, {reg}"
        assert await h.api(host, "get_roles", "eve") is None
    assert_refused_on_both(pre, reg)
    assert await h.state() == before
    h.assert_pending(B, token)

    assert (await xmpp.register_with_invite(server.port, token, "eve", "pw", domain=B)).ok
    assert await h.api(B, "is_admin", f"eve@{B}") is True
    assert not await h.api(A, "is_admin", f"eve@{A}")
    assert not await h.exists(A, "eve")


async def test_invite_of_b_cannot_take_a_name_reserved_on_a(server):
    h = await TwoHosts.connect(server)
    carol_token = token_of((await h.api(A, "create_account", "carol"))["uri"])
    token = token_of(server.generate_invite(host=B))
    before = await h.state()

    pre, reg = await preauth_on_b_then_register_on_a(server, token, "carol", "mallory-pw")

    assert not await h.exists(A, "carol"), f"carol@{A}, reserved there, taken with {B}'s invite: {pre}, {reg}"
    assert not await h.exists(B, "carol")
    assert_refused_on_both(pre, reg)
    assert await h.state() == before
    h.assert_pending(A, carol_token)
    h.assert_pending(B, token)

    # Both invites still work, each on its own host.
    assert (await xmpp.register_with_invite(server.port, carol_token, "carol", "carol-pw", domain=A)).ok
    await xmpp.login(server.port, f"carol@{A}", "carol-pw", presence=False)
    assert (await xmpp.register_with_invite(server.port, token, "dave", "pw", domain=B)).ok
    await xmpp.login(server.port, f"dave@{B}", "pw", presence=False)


async def test_contact_invite_of_a_user_of_b_creates_nothing_on_a(server):
    for host in HOSTS:
        server.register_user("romeo", f"romeo-{host}", host=host)
    h = await TwoHosts.connect(server)
    romeo_b = await xmpp.login(server.port, f"romeo@{B}", f"romeo-{B}", presence=False)
    token = token_of((await h.api(B, "create_contact", "romeo", True, client=romeo_b))["uri"])
    before = await h.state(roster_of=("romeo", "juliet"))

    pre, reg = await preauth_on_b_then_register_on_a(server, token, "juliet", "pw")

    for host in HOSTS:
        assert not await h.exists(host, "juliet"), f"juliet@{host} created with romeo@{B}'s invite: {pre}, {reg}"
    assert f"juliet@{A}" not in (await h.api(A, "get_roster", "romeo") or {}), "A's romeo got a contact"
    assert_refused_on_both(pre, reg)
    assert await h.state(roster_of=("romeo", "juliet")) == before
    h.assert_pending(B, token)

    assert (await xmpp.register_with_invite(server.port, token, "juliet", "pw", domain=B)).ok
    assert (await h.api(B, "get_roster", "romeo"))[f"juliet@{B}"]["subscription"] == "both"
    assert (await h.api(B, "get_roster", "juliet"))[f"romeo@{B}"]["subscription"] == "both"
    assert await h.api(A, "get_roster", "romeo") == before[A]["rosters"]["romeo"]
    assert not await h.exists(A, "juliet")


# The mirror case: validated on localhost, registration sent to b.localhost -------------


async def test_invite_of_a_validated_on_a_registers_nothing_on_b(server):
    h = await TwoHosts.connect(server)
    token = token_of(server.generate_invite(host=A))
    before = await h.state()

    async with xmpp.UnauthedSession(server.port, domain=A) as s:
        pre = await s.preauth(token)
        assert pre.ok, pre  # on its own host: accepted
        reg = await s.iq("set", register_query("mallory", "pw"), to=B)

    for host in HOSTS:
        assert not await h.exists(host, "mallory"), f"mallory@{host} created with {A}'s invite: {reg}"
    assert outcome(reg) == WRONG_HOST_REGISTER, reg
    assert await h.state() == before
    h.assert_pending(A, token)

    assert (await xmpp.register_with_invite(server.port, token, "mallory", "pw", domain=A)).ok
    await xmpp.login(server.port, f"mallory@{A}", "pw", presence=False)
    assert not await h.exists(B, "mallory")


# XEP-0379 with a token of the other host (regression test) ------------------------------


async def test_contact_token_of_b_approves_no_subscription_on_a(server):
    for name in ("romeo", "juliet"):
        server.register_user(name, f"{name}-pw", host=A)
    server.register_user("romeo", "romeo-pw", host=B)
    h = await TwoHosts.connect(server)
    token = token_of((await h.api(B, "create_contact", "romeo", False))["uri"])
    juliet = await xmpp.login(server.port, f"juliet@{A}", "juliet-pw")

    xmpp.send_subscribe_with_preauth(juliet, f"romeo@{A}", token)
    assert (await juliet.roundtrip()).ok
    assert await juliet.expect_no_presence("subscribed", f"romeo@{A}", within=1.0), \
        f"romeo@{A} approved juliet with romeo@{B}'s token"
    assert (await h.api(A, "get_roster", "romeo")).get(f"juliet@{A}", {}).get("subscription") in (None, "none")
    h.assert_pending(B, token)

    # The same token to its own inviter is approved.
    xmpp.send_subscribe_with_preauth(juliet, f"romeo@{B}", token)
    await juliet.wait_presence("subscribed", f"romeo@{B}")
    assert (await h.api(B, "get_roster", "romeo"))[f"juliet@{A}"]["subscription"] == "from"
    assert h.show(B, token)["status"] == "used"
