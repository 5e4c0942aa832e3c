"""Registration through invites against a real Prosody, over c2s (issue: the product itself).

Each test runs on storage = "internal" and on SQLite (see conftest.py). Numbered tests
follow "Correct where Prosody is not" of the issue; with INVITES_IMPL=stock the
numbered ones fail, which is the point.
"""

import asyncio
import time

import pytest

import harness
import xmpp

USED_TEXT = "This invitation has already been used"
REVOKED_TEXT = "This invitation has been revoked"
INVALID_TEXT = "This invitation is not valid"
EXPIRED_TEXT = "This invitation has expired"
INVITE_ONLY_TEXT = "Registration on this server is through invitation only"


async def admin_client(server, admin):
    return await xmpp.login(server.port, admin.jid, admin.password)


async def api(client, fn, *args):
    """Calls mod_invites' Lua API inside the server; fails the test if it raised."""
    res = await xmpp.call_hook(client, fn, *args)
    assert not res.raised, res
    return res


async def account_exists(client, username):
    return (await api(client, "user_exists", username)).value is True


def token_of(uri):
    return xmpp.parse_uri(uri).token


# 1. A single-use token creates exactly one account ------------------------------------


async def test_1_two_sessions_preauth_one_token_get_one_account(server, admin):
    token = token_of(server.generate_invite())
    a = await xmpp.UnauthedSession.open(server.port)
    b = await xmpp.UnauthedSession.open(server.port)
    assert (await a.preauth(token)).ok
    assert (await b.preauth(token)).ok

    reg_a = await a.register("alice", "pw-a")
    reg_b = await b.register("bob", "pw-b")
    assert reg_a.ok, reg_a
    assert not reg_b.ok
    assert (reg_b.error_type, reg_b.condition, reg_b.text) == ("cancel", "item-not-found", USED_TEXT)

    # The session that registered cannot register a second account.
    again = await a.register("carol", "pw-c")
    assert not again.ok
    assert again.text == USED_TEXT

    c = await admin_client(server, admin)
    assert await account_exists(c, "alice")
    assert not await account_exists(c, "bob")
    assert not await account_exists(c, "carol")


async def test_1_concurrent_registrations_with_one_token_yield_one_account(server, admin):
    token = token_of(server.generate_invite())
    sessions = [await xmpp.UnauthedSession.open(server.port) for _ in range(5)]
    for s in sessions:
        assert (await s.preauth(token)).ok
    results = await asyncio.gather(*(s.register(f"racer{i}", "pw") for i, s in enumerate(sessions)))
    assert sum(r.ok for r in results) == 1, results
    c = await admin_client(server, admin)
    created = [i for i in range(5) if await account_exists(c, f"racer{i}")]
    assert len(created) == 1


# 2. Username binding and reservation ----------------------------------------------------


async def test_2_invite_for_alice_registers_only_alice(server, admin):
    c = await admin_client(server, admin)
    invite = (await api(c, "create_account", "alice")).value
    assert xmpp.parse_uri(invite["uri"]).jid == "alice@localhost"
    token = token_of(invite["uri"])

    async with xmpp.UnauthedSession(server.port) as s:
        assert (await s.preauth(token)).ok
        wrong = await s.register("mallory", "pw")
        assert (wrong.error_type, wrong.condition) == ("modify", "not-acceptable")
        assert wrong.text == "This invitation is for the username 'alice' only"
        right = await s.register("alice", "alice-pw")
        assert right.ok, right
    assert not await account_exists(c, "mallory")
    await xmpp.login(server.port, "alice@localhost", "alice-pw")


async def test_2_bound_username_is_reserved_against_other_invites(server, admin):
    c = await admin_client(server, admin)
    await api(c, "create_account", "alice")
    other = token_of(server.generate_invite())
    async with xmpp.UnauthedSession(server.port) as s:
        assert (await s.preauth(other)).ok
        taken = await s.register("alice", "pw")
        assert (taken.error_type, taken.condition) == ("cancel", "conflict")
        assert taken.text == "This username is reserved for an invited user"
        # The refusal did not spend the other invite.
        assert (await s.register("dave", "pw")).ok
    assert not await account_exists(c, "alice")


@pytest.mark.server_options(registration_invite_only=False, allow_registration=True)
async def test_2_bound_username_is_reserved_against_plain_registration(server, admin):
    c = await admin_client(server, admin)
    await api(c, "create_account", "alice")
    plain = await xmpp.register_with_invite(server.port, None, "alice", "pw")
    assert (plain.register.error_type, plain.register.condition) == ("cancel", "conflict")
    assert not await account_exists(c, "alice")
    # Open registration still works for names nobody was promised.
    assert (await xmpp.register_with_invite(server.port, None, "erin", "pw")).register.ok


async def test_2_reset_invite_resets_only_its_user_and_never_creates_an_account(server, admin, make_user):
    make_user("alice", "old-pw")
    c = await admin_client(server, admin)
    token = token_of((await api(c, "create_account_reset", "alice")).value["uri"])

    async with xmpp.UnauthedSession(server.port) as s:
        assert (await s.preauth(token)).ok
        other = await s.register("mallory", "pw")
        assert not other.ok
        assert other.condition == "not-acceptable"
        assert (await s.register("alice", "new-pw")).ok
    assert not await account_exists(c, "mallory")
    await xmpp.login(server.port, "alice@localhost", "new-pw")
    assert await xmpp.login_fails(server.port, "alice@localhost", "old-pw")

    # A reset invite for an account that does not exist creates nothing.
    ghost = token_of((await api(c, "create_account_reset", "ghost")).value["uri"])
    res = await xmpp.register_with_invite(server.port, ghost, "ghost", "pw")
    assert res.preauth.ok and not res.register.ok
    assert res.register.text == "This invitation only resets the password of an existing account"
    assert not await account_exists(c, "ghost")


async def test_2_generate_reset_from_prosodyctl(server, make_user):
    make_user("alice", "old-pw")
    token = token_of(server.generate_invite("--reset", "alice"))
    assert (await xmpp.register_with_invite(server.port, token, "alice", "newer-pw")).ok
    await xmpp.login(server.port, "alice@localhost", "newer-pw")


async def test_2_reset_invite_for_alice_resets_or_creates_no_other_account(server, admin, make_user):
    """Prosody 13.0.6 refuses another username with a reset invite ("Incorrect username for
    password reset"); 13.0.1 and 0.12 did not. Here every version refuses, and the invite
    still resets alice's password afterwards."""
    make_user("alice", "old-pw")
    make_user("bob", "bob-pw")
    c = await admin_client(server, admin)
    token = token_of(server.generate_invite("--reset", "alice"))
    async with xmpp.UnauthedSession(server.port) as s:
        assert (await s.preauth(token)).ok
        for other in ("bob", "mallory"):
            wrong = await s.register(other, "stolen-pw")
            assert (wrong.error_type, wrong.condition, wrong.text) == (
                "modify", "not-acceptable", "This invitation only resets the password of 'alice'"), (other, wrong)
    assert not await account_exists(c, "mallory")
    await xmpp.login(server.port, "bob@localhost", "bob-pw", presence=False)
    assert await xmpp.login_fails(server.port, "bob@localhost", "stolen-pw")
    assert (await xmpp.register_with_invite(server.port, token, "alice", "newer-pw")).ok
    await xmpp.login(server.port, "alice@localhost", "newer-pw", presence=False)


# 3. Revocation takes effect at once ---------------------------------------------------


async def test_3_revoking_after_preauth_stops_registration(server, admin):
    token = token_of(server.generate_invite())
    c = await admin_client(server, admin)
    async with xmpp.UnauthedSession(server.port) as s:
        assert (await s.preauth(token)).ok
        assert (await api(c, "delete_account_invite", token)).value is True
        res = await s.register("alice", "pw")
        assert (res.error_type, res.condition, res.text) == ("cancel", "item-not-found", REVOKED_TEXT)
        # And a fresh preauth says so too.
        again = await s.preauth(token)
        assert (again.condition, again.text) == ("item-not-found", REVOKED_TEXT)
    assert not await account_exists(c, "alice")


async def test_3_revoked_contact_invite_no_longer_approves_subscriptions(server, admin, make_user):
    romeo = make_user("romeo")
    juliet = make_user("juliet")
    c = await admin_client(server, admin)
    token = token_of((await api(c, "create_contact", "romeo", True)).value["uri"])
    assert (await api(c, "delete_account_invite", token)).value is True

    r = await xmpp.login(server.port, romeo.jid, romeo.password)
    j = await xmpp.login(server.port, juliet.jid, juliet.password)
    xmpp.send_subscribe_with_preauth(j, romeo.jid, token)
    # Manual approval applies: romeo is asked, and the token is not passed on to him.
    request = await r.wait_presence("subscribe", juliet.jid)
    assert "preauth" not in str(request)
    await j.roundtrip()
    assert not j.presences("subscribed", romeo.jid)
    assert (await xmpp.roster(r)).get(juliet.jid, {}).get("subscription") in (None, "none")


# 4. Preauth must be a set; refusals are item-not-found with a text --------------------


async def test_4_preauth_get_is_a_bad_request_and_unlocks_nothing(server, admin):
    token = token_of(server.generate_invite())
    async with xmpp.UnauthedSession(server.port) as s:
        out = await s.preauth(token, iq_type="get")
        assert (out.error_type, out.condition) == ("modify", "bad-request")
        assert out.text
        reg = await s.register("alice", "pw")
        assert (reg.condition, reg.text) == ("not-acceptable", INVITE_ONLY_TEXT)
    # The invite was not touched.
    assert (await xmpp.register_with_invite(server.port, token, "alice", "pw")).ok


async def test_4_unknown_used_and_expired_tokens_get_item_not_found_with_text(server, admin):
    async with xmpp.UnauthedSession(server.port) as s:
        for odd in ("no-such-token", "x" * 500, "sp ace", "\u00e9t\u00e9"):
            out = await s.preauth(odd)
            assert (out.error_type, out.condition, out.text) == ("cancel", "item-not-found", INVALID_TEXT), odd

    used = token_of(server.generate_invite())
    assert (await xmpp.register_with_invite(server.port, used, "first", "pw")).ok
    async with xmpp.UnauthedSession(server.port) as s:
        out = await s.preauth(used)
        assert (out.error_type, out.condition, out.text) == ("cancel", "item-not-found", USED_TEXT)

    c = await admin_client(server, admin)
    expiring = (await api(c, "create_account", None, None, 1)).value
    token = token_of(expiring["uri"])
    # Expiry is a matter of the clock passing `expires`: poll, bounded, until it has.
    deadline = time.monotonic() + 5
    while time.time() < expiring["expires"] + 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    async with xmpp.UnauthedSession(server.port) as s:
        out = await s.preauth(token)
        assert (out.error_type, out.condition, out.text) == ("cancel", "item-not-found", EXPIRED_TEXT)


async def test_4_expiry_is_judged_at_preauth(server, admin):
    c = await admin_client(server, admin)
    expiring = (await api(c, "create_account", None, None, 2)).value
    token = token_of(expiring["uri"])
    async with xmpp.UnauthedSession(server.port) as s:
        assert (await s.preauth(token)).ok
        deadline = time.monotonic() + 6
        while time.time() < expiring["expires"] + 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert (await s.register("late", "pw")).ok
    assert await account_exists(c, "late")


# 5. XEP-0379 whether or not the inviter is online ------------------------------------


@pytest.mark.parametrize("to_full_jid", [False, True], ids=["to-bare-jid", "to-full-jid"])
@pytest.mark.parametrize("romeo_online", [False, True], ids=["inviter-offline", "inviter-online"])
async def test_5_preauth_subscription_is_approved(server, admin, make_user, romeo_online, to_full_jid):
    """Also when the subscribe is addressed to a full JID, which is a subscription to the
    bare JID (RFC 6121) that Prosody handles on another path."""
    romeo = make_user("romeo")
    juliet = make_user("juliet")
    c = await admin_client(server, admin)
    token = token_of((await api(c, "create_contact", "romeo", False)).value["uri"])

    r = await xmpp.login(server.port, romeo.jid, romeo.password) if romeo_online else None
    j = await xmpp.login(server.port, juliet.jid, juliet.password)
    xmpp.send_subscribe_with_preauth(j, romeo.jid + "/balcony" if to_full_jid else romeo.jid, token)
    await j.wait_presence("subscribed", romeo.jid)
    await j.wait_presence("subscribe", romeo.jid)

    romeo_roster = (await api(c, "get_roster", "romeo")).value
    assert romeo_roster[juliet.jid]["subscription"] == "from"
    assert romeo_roster[juliet.jid].get("ask") == "subscribe"
    assert (await xmpp.roster(j))[romeo.jid]["subscription"] == "to"
    if r is not None:
        assert not r.presences("subscribe", juliet.jid)  # approved for him, not asked

    # Spent: a second use of the token is left to manual approval.
    assert (await api(c, "get", token, "romeo")).value is None
    # The token reached neither storage (the roster keeps pending requests) nor the logs.
    assert server.grep_data(token) == []
    assert server.grep_logs(token) == []


@pytest.mark.parametrize("to_full_jid", [False, True], ids=["to-bare-jid", "to-full-jid"])
async def test_5_subscription_from_another_server_is_approved_and_its_token_not_kept(
        server, admin, make_user, to_full_jid):
    """A stanza from another server reaches Prosody as it was addressed: to a full JID it
    takes Prosody's presence/full path, where the roster would keep it, token and all."""
    romeo = make_user("romeo")
    c = await admin_client(server, admin)
    token = token_of((await api(c, "create_contact", "romeo", False)).value["uri"])
    remote = "mercutio@remote.example"
    await api(c, "deliver_subscribe", remote, romeo.jid + "/balcony" if to_full_jid else romeo.jid, token)

    romeo_roster = (await api(c, "get_roster", "romeo")).value
    assert romeo_roster[remote]["subscription"] == "from"  # approved by the invite
    assert (await api(c, "get", token, "romeo")).value is None  # and spent
    assert server.grep_data(token) == []
    assert server.grep_logs(token) == []


async def test_5_an_existing_subscription_does_not_spend_a_contact_invite(server, admin, make_user):
    romeo = make_user("romeo")
    juliet = make_user("juliet")
    c = await admin_client(server, admin)
    first = token_of((await api(c, "create_contact", "romeo", False)).value["uri"])
    j = await xmpp.login(server.port, juliet.jid, juliet.password)
    xmpp.send_subscribe_with_preauth(j, romeo.jid, first)
    await j.wait_presence("subscribed", romeo.jid)

    # Juliet is subscribed already: a second invite she sends is left for someone else.
    second = token_of((await api(c, "create_contact", "romeo", False)).value["uri"])
    mark = len(j.received)
    xmpp.send_subscribe_with_preauth(j, romeo.jid, second)
    # mod_presence handles it after our hook: romeo is offline, so it answers with his
    # "unavailable" (its "subscribed" stays on the server: Juliet is subscribed already).
    await j.wait_for(lambda s: s.xml.tag == f"{{{xmpp.NS_CLIENT}}}presence"
                     and s.xml.get("type") == "unavailable" and s["from"].bare == romeo.jid, start=mark)
    assert (await api(c, "get", second, "romeo")).value is not None


# 6. A failed registration does not consume the invite --------------------------------


async def test_6_taken_username_does_not_consume_the_invite(server, make_user, admin):
    make_user("bob")
    token = token_of(server.generate_invite())
    async with xmpp.UnauthedSession(server.port) as s:
        assert (await s.preauth(token)).ok
        taken = await s.register("bob", "pw")
        assert (taken.error_type, taken.condition) == ("cancel", "conflict")
        assert (await s.register("carol", "carol-pw")).ok
    await xmpp.login(server.port, "carol@localhost", "carol-pw")


async def test_6_registration_refused_by_another_module_does_not_consume(server, admin):
    token = token_of(server.generate_invite())
    async with xmpp.UnauthedSession(server.port) as s:
        assert (await s.preauth(token)).ok
        # mod_register_ibr refuses an empty username before user-registering: nothing held.
        bad = await s.register("", "pw")
        assert not bad.ok
        assert (await s.register("frank", "pw")).ok


# Roster invites, roles, secrets, features --------------------------------------------


async def test_roster_invite_registration_creates_mutual_subscription(server, admin, make_user):
    romeo = make_user("romeo")
    c = await admin_client(server, admin)
    invite = (await api(c, "create_contact", "romeo", True)).value
    assert xmpp.parse_uri(invite["uri"]).params.get("ibr") == "y"
    token = token_of(invite["uri"])
    assert (await xmpp.register_with_invite(server.port, token, "juliet", "j-pw")).ok

    j = await xmpp.login(server.port, "juliet@localhost", "j-pw")
    assert (await xmpp.roster(j))[romeo.jid]["subscription"] == "both"
    romeo_roster = (await api(c, "get_roster", "romeo")).value
    assert romeo_roster["juliet@localhost"]["subscription"] == "both"
    # The contact part is spent with it.
    assert (await api(c, "get", token, "romeo")).value is None


async def test_generate_role_and_admin_are_imported(server):
    token = token_of(server.generate_invite("--role", "prosody:operator"))
    assert (await xmpp.register_with_invite(server.port, token, "op", "op-pw")).ok
    c = await xmpp.login(server.port, "op@localhost", "op-pw")
    assert (await api(c, "get_roles", "op")).value == {"prosody:operator": True}


async def test_tokens_never_reach_storage_or_logs(server, admin, make_user):
    make_user("romeo")
    tokens = [token_of(server.generate_invite()) for _ in range(2)]
    c = await admin_client(server, admin)
    tokens.append(token_of((await api(c, "create_contact", "romeo", True)).value["uri"]))
    tokens.append(token_of((await api(c, "create_account", "zoe")).value["uri"]))
    assert (await xmpp.register_with_invite(server.port, tokens[0], "user0", "pw")).ok
    async with xmpp.UnauthedSession(server.port) as s:
        await s.preauth(tokens[1])
        await s.preauth("unknowntokenvalue")
    listed = (await api(c, "pending_account_invites")).value
    assert len(listed) == 3  # tokens[1], the roster invite with ibr, zoe's
    # Sealed at rest, the pending ones are listed with their tokens (as Prosody lists them);
    # the used one is not listed at all.
    assert tokens[0] not in str(listed)
    assert all(t in str(listed) for t in tokens[1:]), listed
    for token in tokens + ["unknowntokenvalue"]:
        assert server.grep_data(token) == [], token
        assert server.grep_logs(token) == [], token


async def test_generate_bad_input_is_one_clear_line(server):
    rc, out, err = server.prosodyctl("mod_invites", "generate", "nosuchhost.example")
    assert rc != 0
    assert "nosuchhost.example" in out + err
    rc, out, err = server.prosodyctl("mod_invites", "generate", "localhost", "--bogus")
    assert rc != 0
    assert "unexpected argument: --bogus" in out
    # A reset link for an account that does not exist: refused, nothing stored (Prosody 13.0.6).
    rc, out, err = server.prosodyctl("mod_invites", "generate", "localhost", "--reset", "ghost")
    assert (rc, out.strip().splitlines()[-1]) == (1, "The specified user account does not exist: ghost"), (out, err)
    rc, out, err = server.prosodyctl("mod_invites", "list", "localhost", "--all")
    assert (rc, out.strip().splitlines()[1:]) == (0, []), out


async def test_roles_from_a_list_primary_and_secondary(server, admin):
    """Prosody 13 invites carry roles as a list (primary first); 0.12 gets them as a set."""
    c = await admin_client(server, admin)
    invite = (await api(c, "create_account", None, {"roles": ["prosody:operator", "prosody:admin"]})).value
    assert (await xmpp.register_with_invite(server.port, token_of(invite["uri"]), "twohats", "pw")).ok
    roles = (await api(c, "get_roles", "twohats")).value
    assert roles == {"prosody:operator": True, "prosody:admin": True}
    if harness.prosody_major_version() >= 13:
        # The first role of the list is the primary one, the rest are secondary.
        assert (await api(c, "get_primary_role", "twohats")).value == "prosody:operator"


@pytest.mark.server_options(extra_modules=["groups_internal"])  # a stand-in: see the plugin
async def test_generate_group_adds_the_new_account_to_its_groups(server, admin):
    token = token_of(server.generate_invite("--group", "crew", "--group", "band"))
    assert (await xmpp.register_with_invite(server.port, token, "gina", "pw")).ok
    c = await admin_client(server, admin)
    assert (await api(c, "group_members", "crew")).value == {"gina": True}
    assert (await api(c, "group_members", "band")).value == {"gina": True}


@pytest.mark.server_options(options={"invites_page": "https://invite.example/#{invite.token}"})
async def test_invites_page_option_makes_landing_pages_without_mod_invites_page(server, admin, make_user):
    """As Prosody 13's own mod_invites does (for an external page such as easy-xmpp-invitation).
    0.12's leaves the option to mod_invites_page, and so does ours there."""
    if harness.prosody_major_version() < 13:
        assert server.generate_invite().startswith("xmpp:localhost?register;preauth=")
        return
    page = server.generate_invite()
    assert page.startswith("https://invite.example/#"), page
    assert (await xmpp.register_with_invite(server.port, page.split("#", 1)[1], "lander", "pw")).ok
    make_user("romeo")
    c = await admin_client(server, admin)
    with_registration = (await api(c, "create_contact", "romeo", True)).value
    assert with_registration["landing_page"].startswith("https://invite.example/#")
    # Contact-only invites are not among invites_page_supports' defaults.
    assert "landing_page" not in (await api(c, "create_contact", "romeo", False)).value


@pytest.mark.parametrize("period,seconds", [("2 days", 2 * 86400), ("12 hrs", 12 * 3600)])
async def test_invite_expiry_accepts_a_period(make_server, admin, period, seconds):
    """Periods as Prosody 13 reads them (on both versions), not only "N days"."""
    server = make_server(options={"invite_expiry": period})
    server.register_user(admin.username, admin.password)
    c = await admin_client(server, admin)
    invite = (await api(c, "create_account")).value
    assert invite["expires"] - invite["created_at"] == seconds
    assert not server.log_lines(r"invite_expiry.*not a usable period")  # understood: no complaint
