"""mod_invites_adhoc on our store: XEP-0050 commands over c2s.

What Prosody's own mod_invites_adhoc (Debian's prosody package) and ours
(lua/mod_invites_adhoc, found first in build/plugins) must both do: these pass with either.
What only ours does is in test_adhoc_0401.py.
"""

import xml.etree.ElementTree as ET

import pytest

import xmpp

NS_COMMANDS = "http://jabber.org/protocol/commands"
NS_DATA = "jabber:x:data"


async def run_command(client, node):
    """Executes an ad-hoc command; returns (status, {field var: value}, error text)."""
    iq = client.Iq()
    iq["type"] = "set"
    iq["to"] = client.boundjid.domain
    iq.append(xmpp._el(f"{{{NS_COMMANDS}}}command", {"node": node, "action": "execute"}))
    out = await xmpp._send_iq(client, iq, xmpp.DEFAULT_TIMEOUT)
    if not out.ok:
        return None, {}, out.text or out.condition
    command = ET.fromstring(out.raw).find(f"{{{NS_COMMANDS}}}command")
    fields = {}
    for field in command.iter(f"{{{NS_DATA}}}field"):
        value = field.find(f"{{{NS_DATA}}}value")
        fields[field.get("var")] = value.text if value is not None else None
    note = command.find(f"{{{NS_COMMANDS}}}note")
    return command.get("status"), fields, note.text if note is not None else None


suite = pytest.mark.server_options(extra_modules=["adhoc", "invites_adhoc"])


@suite
async def test_admin_account_invite_from_adhoc_registers(server, admin):
    c = await xmpp.login(server.port, admin.jid, admin.password)
    status, fields, _ = await run_command(c, "urn:xmpp:invite#create-account")
    assert status == "completed"
    uri = xmpp.parse_uri(fields["uri"])
    assert uri.action == "register" and uri.jid == "localhost"
    assert fields["expire"]
    assert (await xmpp.register_with_invite(server.port, uri.token, "fromadhoc", "pw")).ok
    await xmpp.login(server.port, "fromadhoc@localhost", "pw")
    assert server.grep_data(uri.token) == []


@suite
async def test_admin_contact_invite_from_adhoc_registers_with_mutual_subscription(server, admin):
    c = await xmpp.login(server.port, admin.jid, admin.password)
    status, fields, _ = await run_command(c, "urn:xmpp:invite#invite")
    assert status == "completed"
    uri = xmpp.parse_uri(fields["uri"])
    assert (uri.jid, uri.action, uri.params.get("ibr")) == ("admin@localhost", "roster", "y")
    assert (await xmpp.register_with_invite(server.port, uri.token, "friend", "pw")).ok
    friend = await xmpp.login(server.port, "friend@localhost", "pw")
    assert (await xmpp.roster(friend))["admin@localhost"]["subscription"] == "both"
    assert (await xmpp.roster(c))["friend@localhost"]["subscription"] == "both"


@suite
async def test_ordinary_users_contact_invite_cannot_register_by_default(server, make_user, admin):
    user = make_user("plain")
    c = await xmpp.login(server.port, user.jid, user.password)
    status, fields, _ = await run_command(c, "urn:xmpp:invite#invite")
    assert status == "completed"
    uri = xmpp.parse_uri(fields["uri"])
    assert "ibr" not in uri.params
    res = await xmpp.register_with_invite(server.port, uri.token, "stranger", "pw")
    assert not res.preauth.ok and not res.register.ok
    # ... but it still works for a subscription (XEP-0379).
    juliet = make_user("juliet")
    j = await xmpp.login(server.port, juliet.jid, juliet.password)
    xmpp.send_subscribe_with_preauth(j, user.jid, uri.token)
    await j.wait_presence("subscribed", user.jid)
    # Account invites stay admin-only.
    status, _, _ = await run_command(c, "urn:xmpp:invite#create-account")
    assert status != "completed"


@pytest.mark.server_options(extra_modules=["adhoc", "invites_adhoc"], host_options={"allow_user_invites": True})
async def test_ordinary_users_contact_invite_registers_with_allow_user_invites(server, make_user):
    user = make_user("plain")
    c = await xmpp.login(server.port, user.jid, user.password)
    _, fields, _ = await run_command(c, "urn:xmpp:invite#invite")
    uri = xmpp.parse_uri(fields["uri"])
    assert uri.params.get("ibr") == "y"
    assert (await xmpp.register_with_invite(server.port, uri.token, "invitee", "pw")).ok
    invitee = await xmpp.login(server.port, "invitee@localhost", "pw")
    assert (await xmpp.roster(invitee))[user.jid]["subscription"] == "both"
