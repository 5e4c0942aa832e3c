"""Switching from Prosody's own mod_invites: links handed out before keep working."""

import harness
import xmpp


async def test_pending_invites_of_prosodys_store_are_imported_and_plaintext_removed(make_server):
    server = make_server(impl="stock")
    server.register_user("admin", "admin-secret")
    server.register_user("romeo", "romeo-secret")
    server.register_user("juliet", "juliet-secret")
    c = await xmpp.login(server.port, "admin@localhost", "admin-secret")
    # Through the Lua API: Prosody 13 deprecated its own `generate`.
    account = await xmpp.call_hook(c, "create_account")
    account_token = xmpp.parse_uri(account.value["uri"]).token
    contact = await xmpp.call_hook(c, "create_contact", "romeo", False)
    contact_token = xmpp.parse_uri(contact.value["uri"]).token
    await xmpp.close_all()
    assert server.grep_data(account_token), "stock Prosody should have stored the token in clear"

    server.impl = "ours"
    server.restart()
    assert all(p.startswith(str(harness.BUILD_PLUGINS)) for p in server.module_paths.values())

    # Plaintext copies are gone as soon as the server has started.
    assert server.grep_data(account_token) == []
    assert server.grep_data(contact_token) == []

    res = await xmpp.register_with_invite(server.port, account_token, "alice", "alice-pw")
    assert res.ok, res
    await xmpp.login(server.port, "alice@localhost", "alice-pw")

    j = await xmpp.login(server.port, "juliet@localhost", "juliet-secret")
    xmpp.send_subscribe_with_preauth(j, "romeo@localhost", contact_token)
    await j.wait_presence("subscribed", "romeo@localhost")
