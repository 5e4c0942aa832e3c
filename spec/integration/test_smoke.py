"""Smoke tests: prove the harness drives a real Prosody (stock modules or ours).

Run: INVITES_IMPL=stock python3 -m pytest spec/integration -q
"""

import harness
import xmpp
from xmpp import NS_IBR_TOKEN, NS_INVITE, NS_IQ_REGISTER_FEATURE

INVITE_ONLY_TEXT = "Registration on this server is through invitation only"


def test_parse_uri():
    jid, action, params = xmpp.parse_uri("xmpp:romeo@example.com?roster;preauth=T0k-_;ibr=y")
    assert (jid, action, params) == ("romeo@example.com", "roster", {"preauth": "T0k-_", "ibr": "y"})
    u = xmpp.parse_uri("xmpp:example.com?register;preauth=abc")
    assert (u.jid, u.action, u.token) == ("example.com", "register", "abc")


def test_server_runs_and_prosodyctl_works(server):
    assert server.running
    assert server.log_lines(r"Activated service 'c2s' on \[127\.0\.0\.1\]:%d" % server.port)
    rc, out, err = server.prosodyctl("about")
    assert rc == 0, (out, err)
    if server.impl == "ours":
        assert all(p.startswith(str(harness.BUILD_PLUGINS)) for p in server.module_paths.values())
    else:
        assert all(p.startswith("/usr/lib/prosody/modules/") for p in server.module_paths.values())


async def test_generated_invite_registers_account_that_can_log_in(server):
    uri = server.generate_invite()
    parsed = xmpp.parse_uri(uri)
    assert parsed.jid == "localhost" and parsed.action == "register" and parsed.token

    res = await xmpp.register_with_invite(server.port, parsed.token, "alice", "alice-pw")
    assert res.preauth.ok, res
    assert res.register.ok, res

    client = await xmpp.login(server.port, "alice@localhost", "alice-pw")
    assert client.boundjid.bare == "alice@localhost"
    assert (await xmpp.call_hook(client, "user_exists", "alice")).value is True
    assert await xmpp.login_fails(server.port, "alice@localhost", "wrong-pw")


async def test_used_invite_is_refused_afterwards(server):
    token = xmpp.parse_uri(server.generate_invite()).token
    first = await xmpp.register_with_invite(server.port, token, "first", "pw")
    assert first.ok, first
    second = await xmpp.register_with_invite(server.port, token, "second", "pw")
    assert not second.preauth.ok
    assert not second.register.ok
    assert await xmpp.login_fails(server.port, "second@localhost", "pw")


async def test_registration_without_invite_is_refused(server):
    res = await xmpp.register_with_invite(server.port, None, "mallory", "pw")
    assert res.preauth is None
    assert not res.register.ok
    assert res.register.error_type == "modify"
    assert res.register.condition == "not-acceptable"
    assert res.register.text == INVITE_ONLY_TEXT
    assert await xmpp.login_fails(server.port, "mallory@localhost", "pw")


async def test_unknown_token_is_refused_at_preauth(server):
    async with xmpp.UnauthedSession(server.port) as s:
        out = await s.preauth("no-such-token")
        assert not out.ok and not out.timed_out
        assert out.error_type == "cancel"
        assert out.condition in ("forbidden", "item-not-found")
        assert out.text  # a human-readable text is required
        reg = await s.register("mallory", "pw")
        assert (reg.error_type, reg.condition, reg.text) == ("modify", "not-acceptable", INVITE_ONLY_TEXT)


async def test_stream_features_offer_register_features_to_unauthenticated_stream(server):
    async with xmpp.UnauthedSession(server.port) as s:
        assert s.offered_ibr_token, s.features_xml
        assert s.offered_invite, s.features_xml
        assert s.offered_iq_register, s.features_xml


async def test_testhook_create_contact_returns_uri(server, admin):
    server.register_user("romeo", "romeo-pw")
    client = await xmpp.login(server.port, admin.jid, admin.password)
    res = await xmpp.call_hook(client, "create_contact", "romeo", True)
    assert res.ok and not res.raised, res
    uri = res.value["uri"]
    parsed = xmpp.parse_uri(uri)
    assert parsed.jid == "romeo@localhost"
    assert parsed.action == "roster"
    assert parsed.token
    assert parsed.params.get("ibr") == "y"
    # helpers
    assert (await xmpp.call_hook(client, "is_admin", admin.jid)).value is True
    assert (await xmpp.call_hook(client, "is_admin", "romeo@localhost")).value is False
    assert (await xmpp.call_hook(client, "user_exists", "romeo")).value is True
    assert (await xmpp.call_hook(client, "user_exists", "nobody")).value is False
    missing = await xmpp.call_hook(client, "no_such_function")
    assert missing.raised and not missing.ok


async def test_generate_admin_invite_grants_role(server):
    token = xmpp.parse_uri(server.generate_invite("--admin")).token
    res = await xmpp.register_with_invite(server.port, token, "boss", "boss-pw")
    assert res.ok, res
    client = await xmpp.login(server.port, "boss@localhost", "boss-pw")
    roles = await xmpp.call_hook(client, "get_roles", "boss")
    assert roles.value == {"prosody:admin": True}
    assert (await xmpp.call_hook(client, "is_admin", "boss@localhost")).value is True
