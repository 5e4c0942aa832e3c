"""Our mod_invites_adhoc: XEP-0401 0.6 answers, bound account invites, refusals as notes.

Prosody's own mod_invites_adhoc (what runs without build/plugins/mod_invites_adhoc) fails
every test here but the command list, which is the point: its results have no FORM_TYPE,
create-account ignores a submitted username, 13's password reset makes an account invite
for anyone from a JID without a username, and a refusal from the store ends in a traceback
with no answer. (test_suite_adhoc.py holds what both must do.)
"""

from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pytest

import harness
import xmpp

NS_COMMANDS = "http://jabber.org/protocol/commands"
NS_DATA = "jabber:x:data"
NS_DISCO_ITEMS = "http://jabber.org/protocol/disco#items"
FORM_TYPE = "urn:xmpp:invite#invitation"
INVITE = "urn:xmpp:invite#invite"
CREATE_ACCOUNT = "urn:xmpp:invite#create-account"
PASSWORD_RESET = "xmpp:prosody.im/mod_invites_adhoc#password-reset"
PAGE_TEMPLATE = "https://invite.example.test/invites_page?{invite.token}"
WEEK = 7 * 86400

adhoc = pytest.mark.server_options(extra_modules=["adhoc", "invites_adhoc"])


def prosody13() -> bool:
    return harness.prosody_major_version() >= 13


@dataclass
class Answer:
    """One reply to a command request."""

    ok: bool
    error: xmpp.StanzaError | None = None
    status: str | None = None
    sessionid: str | None = None
    form_type: str | None = None  # the x element's type
    fields: dict = field(default_factory=dict)  # var -> (field type, value)
    notes: list = field(default_factory=list)  # (type, text)

    def value(self, var):
        return self.fields[var][1]


async def command(client, node, values: dict | None = None, *, sessionid=None, action="execute") -> Answer:
    """Executes (or continues) an ad-hoc command, submitting `values` as a form when given."""
    iq = client.Iq()
    iq["type"] = "set"
    iq["to"] = client.boundjid.domain
    attrs = {"node": node, "action": action}
    if sessionid:
        attrs["sessionid"] = sessionid
    children = []
    if values is not None:
        children = [xmpp._el(f"{{{NS_DATA}}}x", {"type": "submit"}, children=[
            xmpp._el(f"{{{NS_DATA}}}field", {"var": var}, children=[xmpp._el(f"{{{NS_DATA}}}value", text=value)])
            for var, value in values.items()
        ])]
    iq.append(xmpp._el(f"{{{NS_COMMANDS}}}command", attrs, children=children))
    out = await xmpp._send_iq(client, iq, xmpp.DEFAULT_TIMEOUT)
    if not out.ok:
        return Answer(False, out.error)
    cmd = ET.fromstring(out.raw).find(f"{{{NS_COMMANDS}}}command")
    answer = Answer(True, status=cmd.get("status"), sessionid=cmd.get("sessionid"))
    form = cmd.find(f"{{{NS_DATA}}}x")
    if form is not None:
        answer.form_type = form.get("type")
        for f in form.iter(f"{{{NS_DATA}}}field"):
            value = f.find(f"{{{NS_DATA}}}value")
            answer.fields[f.get("var")] = (f.get("type"), value.text if value is not None else None)
    answer.notes = [(n.get("type"), n.text) for n in cmd.findall(f"{{{NS_COMMANDS}}}note")]
    return answer


async def command_nodes(client) -> set[str]:
    iq = client.Iq()
    iq["type"] = "get"
    iq["to"] = client.boundjid.domain
    iq.append(xmpp._el(f"{{{NS_DISCO_ITEMS}}}query", {"node": NS_COMMANDS}))
    out = await xmpp._send_iq(client, iq, xmpp.DEFAULT_TIMEOUT)
    assert out.ok, out
    return {item.get("node") for item in ET.fromstring(out.raw).iter(f"{{{NS_DISCO_ITEMS}}}item")}


def assert_invitation(answer: Answer) -> xmpp.InviteUri:
    """The result form of XEP-0401 0.6 (§ 5.1, 5.4); returns its parsed uri."""
    assert (answer.ok, answer.status, answer.notes) == (True, "completed", []), answer
    assert answer.form_type == "result", answer
    assert answer.fields["FORM_TYPE"] == ("hidden", FORM_TYPE), answer
    assert answer.fields["uri"][0] == "text-single", answer
    assert answer.fields["landing-url"][0] == "text-single", answer  # a value only with a landing page
    kind, expire = answer.fields["expire"]
    assert kind == "text-single", answer
    expires = datetime.strptime(expire, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    assert abs(expires - (time.time() + WEEK)) < 120, expire  # invite_expiry's default
    return xmpp.parse_uri(answer.value("uri"))


def refusal(answer: Answer) -> str:
    """The text of an error note ending a command: no form, status completed."""
    assert (answer.ok, answer.status, answer.fields) == (True, "completed", {}), answer
    [(kind, text)] = answer.notes
    assert kind == "error" and text, answer
    return text


async def registers(server, token, username) -> bool:
    return (await xmpp.register_with_invite(server.port, token, username, "pw")).ok


# ---------------------------------------------------------------- XEP-0401 0.6 results


@pytest.mark.server_options(extra_modules=["adhoc", "invites_adhoc"], host_options={"invites_page": PAGE_TEMPLATE})
async def test_contact_invite_answers_with_an_xep0401_invitation_form(server, admin, make_user):
    c = await xmpp.login(server.port, admin.jid, admin.password)
    answer = await command(c, INVITE)
    uri = assert_invitation(answer)
    assert (uri.jid, uri.action, uri.params.get("ibr")) == (admin.jid, "roster", "y")
    if prosody13():  # 0.12 leaves landing pages to mod_invites_page
        assert answer.value("landing-url") == PAGE_TEMPLATE.replace("{invite.token}", uri.token)
    # ... and for a user who may not invite new users: no ibr=y.
    user = make_user("plain")
    u = await xmpp.login(server.port, user.jid, user.password)
    uri = assert_invitation(await command(u, INVITE))
    assert (uri.jid, uri.action, "ibr" in uri.params) == (user.jid, "roster", False)


@pytest.mark.server_options(extra_modules=["adhoc", "invites_adhoc"], host_options={"invites_page": PAGE_TEMPLATE})
async def test_account_invite_answers_with_an_xep0401_invitation_form(server, admin):
    c = await xmpp.login(server.port, admin.jid, admin.password)
    answer = await command(c, CREATE_ACCOUNT)
    uri = assert_invitation(answer)
    assert (uri.jid, uri.action) == ("localhost", "register")
    if prosody13():
        assert answer.value("landing-url") == PAGE_TEMPLATE.replace("{invite.token}", uri.token)
    assert await registers(server, uri.token, "anyone")


# ---------------------------------------------------------------- username


@adhoc
async def test_create_account_with_a_username_binds_the_invite_to_it(server, admin):
    c = await xmpp.login(server.port, admin.jid, admin.password)
    # XEP-0401's fields, submitted with the request; "Juliet" is normalised as registration does.
    answer = await command(c, CREATE_ACCOUNT, {"username": "Juliet", "roster-subscription": "0"})
    uri = xmpp.parse_uri(answer.value("uri"))
    assert (uri.jid, uri.action) == ("juliet@localhost", "register")
    assert_invitation(answer)
    assert not await registers(server, uri.token, "mallory")
    assert await registers(server, uri.token, "juliet")
    await xmpp.login(server.port, "juliet@localhost", "pw")
    # An empty username is none: any name.
    uri = assert_invitation(await command(c, CREATE_ACCOUNT, {"username": ""}))
    assert uri.jid == "localhost"


@pytest.mark.server_options(extra_modules=["adhoc", "invites_adhoc"], host_options={"invites_adhoc_account_form": True})
async def test_create_account_can_ask_for_the_username_first(server, admin):
    c = await xmpp.login(server.port, admin.jid, admin.password)
    first = await command(c, CREATE_ACCOUNT)
    assert (first.status, first.form_type) == ("executing", "form"), first
    assert first.fields["username"][0] == "text-single", first
    uri = assert_invitation(await command(c, CREATE_ACCOUNT, {"username": "romeo"}, sessionid=first.sessionid,
                                          action="complete"))
    assert uri.jid == "romeo@localhost"
    assert not await registers(server, uri.token, "mallory")
    assert await registers(server, uri.token, "romeo")
    # Completed without a form: any name, as with Prosody's.
    first = await command(c, CREATE_ACCOUNT)
    uri = assert_invitation(await command(c, CREATE_ACCOUNT, sessionid=first.sessionid, action="complete"))
    assert uri.jid == "localhost"


@adhoc
async def test_create_account_with_roster_subscription_makes_mutual_contacts(server, admin):
    """XEP-0401 0.6 roster-subscription: the new account and the admin who made the invite
    become contacts; without it, they do not."""
    c = await xmpp.login(server.port, admin.jid, admin.password)
    with_contact = assert_invitation(await command(c, CREATE_ACCOUNT, {"roster-subscription": "1"}))
    plain = assert_invitation(await command(c, CREATE_ACCOUNT, {"roster-subscription": "0"}))
    assert await registers(server, with_contact.token, "friend")
    assert await registers(server, plain.token, "stranger")
    friend = await xmpp.login(server.port, "friend@localhost", "pw")
    assert (await xmpp.roster(friend)).get(admin.jid, {}).get("subscription") == "both"
    roster = await xmpp.roster(c)
    assert roster["friend@localhost"]["subscription"] == "both", roster
    assert "stranger@localhost" not in roster, roster


@adhoc
async def test_create_account_refuses_a_username_it_cannot_give(server, admin):
    c = await xmpp.login(server.port, admin.jid, admin.password)
    assert refusal(await command(c, CREATE_ACCOUNT, {"username": "admin"})) == "That username is already taken"
    assert_invitation(await command(c, CREATE_ACCOUNT, {"username": "juliet"}))
    assert refusal(await command(c, CREATE_ACCOUNT, {"username": "juliet"})) == \
        "That username is reserved by another invitation"
    assert refusal(await command(c, CREATE_ACCOUNT, {"username": "a@b"})) == "That username is not valid"
    assert refusal(await command(c, CREATE_ACCOUNT, {"roster-subscription": "maybe"})) == "Fill in the form correctly"
    assert len(server.log_lines(r"invites_adhoc\tinfo\tNo account invite for admin@localhost: ")) == 3
    # None of them made an invite: romeo is free.
    uri = assert_invitation(await command(c, CREATE_ACCOUNT, {"username": "romeo"}))
    assert uri.jid == "romeo@localhost"


# ---------------------------------------------------------------- commands and password resets


@pytest.mark.server_options(extra_modules=["disco", "adhoc", "invites_adhoc"])
async def test_commands_are_those_of_prosodys_own_module(server, admin, make_user):
    """0.12 offers two commands, 13 also a password reset for admins."""
    c = await xmpp.login(server.port, admin.jid, admin.password)
    nodes = await command_nodes(c)
    mine = {n for n in nodes if "invite" in n}
    assert mine == ({INVITE, CREATE_ACCOUNT, PASSWORD_RESET} if prosody13() else {INVITE, CREATE_ACCOUNT}), nodes
    user = make_user("plain")
    u = await xmpp.login(server.port, user.jid, user.password)
    assert {n for n in await command_nodes(u) if "invite" in n} == {INVITE}


@adhoc
async def test_password_reset_invite_needs_an_account_of_this_host(server, admin, make_user):
    if not prosody13():
        pytest.skip("Prosody 13: 0.12's mod_invites_adhoc has no password reset command")
    user = make_user("juliet")
    c = await xmpp.login(server.port, admin.jid, admin.password)
    for jid in ("localhost", "nobody@localhost", "juliet@elsewhere.example"):
        first = await command(c, PASSWORD_RESET)
        # Prosody's own makes an account invite for anyone from "localhost".
        assert refusal(await command(c, PASSWORD_RESET, {"accountjid": jid}, sessionid=first.sessionid,
                                     action="complete")) == "There is no such account on this server", jid
    first = await command(c, PASSWORD_RESET)
    answer = await command(c, PASSWORD_RESET, {"accountjid": user.jid}, sessionid=first.sessionid, action="complete")
    assert (answer.form_type, answer.fields["FORM_TYPE"]) == ("result", ("hidden", FORM_TYPE)), answer
    uri = xmpp.parse_uri(answer.value("uri"))
    assert not await registers(server, uri.token, "mallory")
    assert await registers(server, uri.token, "juliet")
    await xmpp.login(server.port, user.jid, "pw")


# ---------------------------------------------------------------- refusals from the store


@pytest.fixture
def faulty_server(make_server, storage, tmp_path):
    """A server whose stores go through mod_storage_faulty; .faults is its control file."""
    faults = tmp_path / "faults.json"
    faults.write_text("[]")
    server = make_server(extra_modules=["adhoc", "invites_adhoc"], options={
        "storage": "faulty",
        "faulty_storage_driver": "sql" if storage in ("sql", "pgsql") else "internal",
        "faulty_storage_control": str(faults),
    })
    server.faults = faults
    return server


def problem_lines(server) -> list[str]:
    return [ln for ln in server.log_text().splitlines() if re.search(r"\t(warn|error)\t", ln)]


@pytest.mark.parametrize("node, what", [(INVITE, "contact invite"), (CREATE_ACCOUNT, "account invite")])
@pytest.mark.parametrize("action", ["fail", "raise"])
async def test_a_store_refusal_is_an_error_note_and_one_log_line(faulty_server, node, what, action):
    server = faulty_server
    server.register_user("admin", "admin-secret")
    c = await xmpp.login(server.port, "admin@localhost", "admin-secret")
    before = problem_lines(server)
    server.faults.write_text(f'[{{"store": "invites", "method": "set", "action": "{action}"}}]')
    answer = await command(c, node)
    server.faults.write_text("[]")

    assert refusal(answer) == "The invitation could not be created, please try again later"
    # One line of ours, at info; the store's own error is the only problem line.
    assert len(server.log_lines(rf"invites_adhoc\tinfo\tNo {what} for admin@localhost: internal-server-error$")) == 1
    new = [ln for ln in problem_lines(server) if ln not in before]
    assert len(new) == 1 and "injected fault" in new[0], new
    assert "traceback" not in server.log_text().lower()
    assert "preauth=" not in server.log_text()
    # The server runs on, and the next request makes an invite.
    assert server.running
    uri = assert_invitation(await command(c, node))
    assert uri.token not in server.log_text()
