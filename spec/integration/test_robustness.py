"""Bad input gets a clear error and loses nothing: malformed stanzas, corrupt records."""

import hashlib

import xmpp

INVALID_TEXT = "This invitation is not valid"


def corrupt_record(server, token, garbage):
    """Overwrites the stored record of `token` with something we never write."""
    key = hashlib.sha256(token.encode()).hexdigest()
    if server.storage == "internal":
        path = server.data_dir / "localhost" / "invites" / f"{key}.dat"
        assert path.exists(), sorted(p.name for p in path.parent.iterdir())
        path.write_text(f"return {{ record = {garbage!r} }};\n".replace("'", '"'))
    else:
        changed = server.sql_query(
            """UPDATE prosody SET "value"=? WHERE host='localhost' AND store='invites' AND "user"=? AND "key"='record'""",
            garbage, key,
        ).rowcount
        assert changed == 1
    return key[-10:]


async def test_corrupt_record_is_refused_logged_once_without_token_and_server_goes_on(server):
    token = xmpp.parse_uri(server.generate_invite()).token
    short_id = corrupt_record(server, token, "{broken json")

    async with xmpp.UnauthedSession(server.port) as s:
        out = await s.preauth(token)
        assert (out.error_type, out.condition, out.text) == ("cancel", "item-not-found", INVALID_TEXT)

    warnings = server.log_lines(r"ignoring corrupt invite record")
    assert len(warnings) == 1, warnings
    assert short_id in warnings[0]
    assert token not in server.log_text()

    # Nothing else is affected: a fresh invite still registers.
    other = xmpp.parse_uri(server.generate_invite()).token
    assert (await xmpp.register_with_invite(server.port, other, "alice", "pw")).ok


async def test_preauth_without_token_is_a_bad_request(server):
    async with xmpp.UnauthedSession(server.port) as s:
        out = await s.iq("set", xmpp._el("{urn:xmpp:pars:0}preauth"))
        assert (out.error_type, out.condition, out.text) == (
            "modify", "bad-request", "The invitation token is missing")
        assert s.connected
