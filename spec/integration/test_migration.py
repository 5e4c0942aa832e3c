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
    # Imported sealed: an admin can still be shown the link (and nothing usable rests).
    rc, out, _ = server.prosodyctl("mod_invites", "show", "localhost", account_token)
    assert rc == 0 and f"preauth={account_token}" in out, out

    res = await xmpp.register_with_invite(server.port, account_token, "alice", "alice-pw")
    assert res.ok, res
    await xmpp.login(server.port, "alice@localhost", "alice-pw")

    j = await xmpp.login(server.port, "juliet@localhost", "juliet-secret")
    xmpp.send_subscribe_with_preauth(j, "romeo@localhost", contact_token)
    await j.wait_presence("subscribed", "romeo@localhost")


# Prosody's store takes any string as a token (its own are base64url): odd ones must import
# too, and expired entries must go instead of being kept and warned about at every start.
ODD_TOKEN = "legacy+tok/en=with;odd chars"
ODD_EXPIRED = "expired+legacy/token=2"


def _rewrite_token(server, old: str, new: str):
    """Gives a stored invite of Prosody's own store another token (server stopped)."""
    if server.storage == "internal":
        changed = 0
        for p in server.data_files():
            data = p.read_bytes()
            if old.encode() in data:
                p.write_bytes(data.replace(old.encode(), new.encode()))
                changed += 1
        assert changed, f"token not found in {server.data_files()}"
    else:
        res = server.sql_query(
            'UPDATE "prosody" SET "key" = replace("key", ?, ?), "value" = replace("value", ?, ?) '
            'WHERE "store" = ?',
            old, new, old, new, "invite_token",
        )
        assert res.rowcount >= 1, "token not found in the invite_token rows"


async def test_legacy_tokens_of_any_shape_import_and_expired_ones_are_dropped(make_server):
    server = make_server(impl="stock")
    server.register_user("admin", "admin-secret")
    c = await xmpp.login(server.port, "admin@localhost", "admin-secret")
    live = await xmpp.call_hook(c, "create_account")
    expired = await xmpp.call_hook(c, "create_account", None, None, -60)  # expired a minute ago
    assert live.ok and expired.ok, (live, expired)
    live_token = xmpp.parse_uri(live.value["uri"]).token
    expired_token = xmpp.parse_uri(expired.value["uri"]).token
    await xmpp.close_all()

    server.stop()
    _rewrite_token(server, live_token, ODD_TOKEN)
    _rewrite_token(server, expired_token, ODD_EXPIRED)
    assert server.grep_data(ODD_TOKEN) and server.grep_data(ODD_EXPIRED)

    server.impl = "ours"
    server.restart()
    # Both plaintext copies are gone at once: the live one imported, the expired one dropped.
    assert server.grep_data(ODD_TOKEN) == []
    assert server.grep_data(ODD_EXPIRED) == []
    assert "Could not import" not in server.log_text()

    # The odd link still registers an account, once.
    res = await xmpp.register_with_invite(server.port, ODD_TOKEN, "oddone", "odd-pw")
    assert res.ok, res
    again = await xmpp.register_with_invite(server.port, ODD_TOKEN, "oddtwo", "odd-pw")
    assert not again.ok and again.preauth.condition == "item-not-found", again
    expired_try = await xmpp.register_with_invite(server.port, ODD_EXPIRED, "late", "late-pw")
    assert not expired_try.ok, expired_try

    # A second start has nothing left to import or warn about.
    before = len(server.err_text())
    server.restart()
    later = server.err_text()[before:]
    assert "invites" not in later, later
