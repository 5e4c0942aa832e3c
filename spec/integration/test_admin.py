"""Operating the invite store: commands from a separate process, housekeeping, the preauth
throttle and metrics, against a real Prosody over c2s."""

import asyncio
import re
import time
import urllib.request

import pytest

import harness
import xmpp

USED_TEXT = "This invitation has already been used"
THROTTLED = ("wait", "policy-violation", "Too many invalid invitations from your address, please try again later")


def token_of(uri):
    return xmpp.parse_uri(uri).token


def ctl(server, *args):
    rc, out, err = server.prosodyctl("mod_invites", *args)
    return rc, out.strip(), err


def stored_records(server):
    """Invite records in storage, counted the way each backend keeps them."""
    if server.storage == "internal":
        folder = server.data_dir / "localhost" / "invites"
        return len(list(folder.glob("*.dat"))) if folder.exists() else 0
    ((n,),) = server.sql_query(
        """SELECT COUNT(DISTINCT "user") FROM prosody WHERE host='localhost' AND store='invites'"""
    )
    return n


async def wait_until(predicate, timeout, what):
    """Polls a condition of the outside world (clock, storage), bounded."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_uses_2_registers_exactly_two_accounts(server):
    rc, uri, _ = ctl(server, "generate", "localhost", "--uses", "2")
    assert rc == 0
    token = token_of(uri)
    sessions = [await xmpp.UnauthedSession.open(server.port) for _ in range(3)]
    for s in sessions:
        assert (await s.preauth(token)).ok
    results = [await s.register(f"user{i}", "pw") for i, s in enumerate(sessions)]
    assert [r.ok for r in results] == [True, True, False]
    assert results[2].text == USED_TEXT
    # Each account once: a session that registered cannot register again with it.
    assert (await sessions[0].register("user9", "pw")).text == USED_TEXT
    await xmpp.login(server.port, "user0@localhost", "pw")
    await xmpp.login(server.port, "user1@localhost", "pw")
    assert await xmpp.login_fails(server.port, "user2@localhost", "pw")


async def test_list_shows_every_kind_of_pending_invite_and_no_token(server, admin, make_user):
    make_user("romeo")
    make_user("alice")
    tokens = [token_of(ctl(server, "generate", "localhost", "--expires-after", "3d")[1])]
    tokens.append(token_of(ctl(server, "generate", "localhost", "--reset", "alice")[1]))
    c = await xmpp.login(server.port, admin.jid, admin.password)
    contact = await xmpp.call_hook(c, "create_contact", "romeo", False)
    tokens.append(token_of(contact.value["uri"]))

    rc, listing, _ = ctl(server, "list", "localhost")
    assert rc == 0
    lines = listing.splitlines()
    assert lines[0].split()[:3] == ["ID", "TYPE", "STATUS"]
    assert len(lines) == 4, listing
    assert any(re.search(r"roster\s+pending .* contact of romeo$", l) for l in lines), listing
    assert any(l.endswith("password reset of alice") for l in lines), listing
    assert any(l.endswith("new account") for l in lines), listing
    for token in tokens:
        assert token not in listing

    # --all adds finished ones with their state.
    assert (await xmpp.register_with_invite(server.port, tokens[0], "newbie", "pw")).ok
    _, pending, _ = ctl(server, "list", "localhost")
    _, everything, _ = ctl(server, "list", "localhost", "--all")
    assert len(pending.splitlines()) == 3
    assert re.search(r"register\s+used\s", everything), everything


async def test_revoke_from_another_process_stops_a_session_that_already_sent_preauth(server):
    token = token_of(ctl(server, "generate", "localhost")[1])
    async with xmpp.UnauthedSession(server.port) as s:
        assert (await s.preauth(token)).ok
        _, listing, _ = ctl(server, "list", "localhost")
        invite_id = listing.splitlines()[1].split()[0]
        rc, out, _ = ctl(server, "show", "localhost", invite_id)
        # show is where an admin gets one invite's link again.
        assert rc == 0 and "status:      pending" in out and f"preauth={token}" in out
        assert ctl(server, "revoke", "localhost", invite_id)[:2] == (0, f"Revoked invite {invite_id}")
        res = await s.register("alice", "pw")
        assert (res.condition, res.text) == ("item-not-found", "This invitation has been revoked")
    assert await xmpp.login_fails(server.port, "alice@localhost", "pw")
    assert ctl(server, "revoke", "localhost", "0000000000")[:2] == (1, "No such invite")


async def test_prune_removes_expired_used_and_revoked_records(server, admin):
    c = await xmpp.login(server.port, admin.jid, admin.password)
    keep = token_of(ctl(server, "generate", "localhost")[1])
    used = token_of(ctl(server, "generate", "localhost")[1])
    assert (await xmpp.register_with_invite(server.port, used, "someone", "pw")).ok
    revoked = token_of(ctl(server, "generate", "localhost")[1])
    assert (await xmpp.call_hook(c, "delete_account_invite", revoked)).value is True
    expiring = (await xmpp.call_hook(c, "create_account", None, None, 1)).value
    await wait_until(lambda: time.time() >= expiring["expires"] + 1, 5, "the invite to expire")

    assert stored_records(server) == 4
    assert ctl(server, "prune", "localhost")[:2] == (0, "Removed 3 used, revoked or expired invites")
    assert stored_records(server) == 1
    assert (await xmpp.register_with_invite(server.port, keep, "kept", "pw")).ok


@pytest.mark.server_options(options={"invite_prune_interval": 1, "invite_retention": 0})
async def test_timer_prunes_finished_records(server):
    used = token_of(ctl(server, "generate", "localhost")[1])
    ctl(server, "generate", "localhost")
    assert stored_records(server) == 2
    assert (await xmpp.register_with_invite(server.port, used, "someone", "pw")).ok
    await wait_until(lambda: stored_records(server) == 1, 10, "the timer to prune the used invite")
    assert server.log_lines(r"Pruned 1 finished invites")


@pytest.mark.server_options(options={"invite_prune_interval": 1, "invite_retention": 0})
async def test_timer_prunes_expired_records_nothing_in_the_server_touched(server):
    """Invites made and expired outside the server (prosodyctl): the timer still finds them."""
    ctl(server, "generate", "localhost", "--expires-after", "1s")
    ctl(server, "generate", "localhost")
    assert stored_records(server) == 2
    await wait_until(lambda: stored_records(server) == 1, 10, "the timer to prune the expired invite")
    assert server.log_lines(r"Pruned 1 finished invites")
    assert not server.log_lines(r"Could not list the stored invites")


@pytest.mark.server_options(options={"invite_prune_interval": 1, "invite_retention": 4})
async def test_timer_keeps_finished_records_for_the_retention_time(server):
    token = token_of(ctl(server, "generate", "localhost")[1])
    _, listing, _ = ctl(server, "list", "localhost")
    invite_id = listing.splitlines()[1].split()[0]
    assert ctl(server, "revoke", "localhost", invite_id)[0] == 0
    revoked_at = time.time()
    # Two timer runs pass within the retention time: the record stays, `list --all` shows it.
    await wait_until(lambda: time.time() >= revoked_at + 2.5, 5, "two timer runs")
    assert stored_records(server) == 1
    assert re.search(rf"^{invite_id}\s+register\s+revoked", ctl(server, "list", "localhost", "--all")[1], re.M)
    await wait_until(lambda: stored_records(server) == 0, 10, "the timer to prune the revoked invite")
    assert time.time() >= revoked_at + 3  # not before its retention time (whole seconds)
    res = await xmpp.register_with_invite(server.port, token, "late", "pw")
    assert res.preauth.condition == "item-not-found"


@pytest.mark.server_options(options={"invite_throttle_max": 3, "invite_throttle_period": 3})
async def test_throttle_engages_refuses_valid_tokens_and_lifts(server):
    valid = token_of(ctl(server, "generate", "localhost")[1])
    async with xmpp.UnauthedSession(server.port) as s:
        for i in range(3):
            out = await s.preauth(f"guess{i}")
            assert out.condition == "item-not-found"
        engaged_at = time.time()
        blocked = await s.preauth(valid)
        assert (blocked.error_type, blocked.condition, blocked.text) == THROTTLED
        assert (await s.preauth("guess4")).condition == "policy-violation"
    # Lifts once the period has passed; the throttled attempt consumed nothing.
    await wait_until(lambda: time.time() >= engaged_at + 4, 6, "the throttle period to pass")
    res = await xmpp.register_with_invite(server.port, valid, "patient", "pw")
    assert res.ok, res


def metrics_server(make_server, **options):
    """A server with /metrics (mod_http_openmetrics); returns it and a function that reads
    the page."""
    http_port = harness.free_port()
    server = make_server(
        extra_modules=["http_openmetrics"],
        options={
            "statistics": "internal",
            "statistics_interval": "manual",
            "http_ports": [http_port],
            "http_interfaces": ["127.0.0.1"],
            **options,
        },
    )

    def metrics():
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
            return r.read().decode()

    return server, metrics


async def test_metrics_count_creations_redemptions_and_rejections(make_server):
    server, metrics = metrics_server(make_server)

    def value(text, name, label):
        pattern = re.compile(r'^%s\{[^}]*%s[^}]*\} (\d+(?:\.\d+)?)' % (re.escape(name), re.escape(label)), re.M)
        m = pattern.search(text)
        return float(m.group(1)) if m else 0.0

    before = metrics()
    token = token_of(ctl(server, "generate", "localhost")[1])  # another process: not counted here
    c_admin = None
    server.register_user("admin", "admin-secret")
    c_admin = await xmpp.login(server.port, "admin@localhost", "admin-secret")
    await xmpp.call_hook(c_admin, "create_account")
    assert (await xmpp.register_with_invite(server.port, token, "metered", "pw")).ok
    async with xmpp.UnauthedSession(server.port) as s:
        await s.preauth("wrongtoken")
        await s.preauth(token)
    after = metrics()

    created = "prosody_mod_invites__created_total"
    redeemed = "prosody_mod_invites_register__redeemed_total"
    rejected = "prosody_mod_invites_register__rejected_total"
    assert value(after, created, 'type="register"') == value(before, created, 'type="register"') + 1, after
    assert value(after, redeemed, 'type="register"') == value(before, redeemed, 'type="register"') + 1, after
    assert value(after, rejected, 'reason="invalid"') == value(before, rejected, 'reason="invalid"') + 1, after
    assert value(after, rejected, 'reason="used"') == value(before, rejected, 'reason="used"') + 1, after
    assert server.log_lines(r"Invite \w+ redeemed by metered@localhost")
    assert token not in after


async def test_metrics_count_every_rejection_reason(make_server, make_user):
    server, metrics = metrics_server(make_server, invite_throttle_max=4)

    def rejected():
        text = metrics()
        return {m.group(1): float(m.group(2)) for m in re.finditer(
            r'^prosody_mod_invites_register__rejected_total\{[^}]*reason="([^"]+)"[^}]*\} (\S+)', text, re.M)}

    server.register_user("admin", "admin-secret")
    c = await xmpp.login(server.port, "admin@localhost", "admin-secret")
    make_user("romeo")
    for_alice = token_of((await xmpp.call_hook(c, "create_account", "alice")).value["uri"])
    expiring = (await xmpp.call_hook(c, "create_account", None, None, 1)).value
    revoked = token_of(ctl(server, "generate", "localhost")[1])
    assert (await xmpp.call_hook(c, "delete_account_invite", revoked)).value is True
    contact = token_of((await xmpp.call_hook(c, "create_contact", "romeo", False)).value["uri"])
    await wait_until(lambda: time.time() >= expiring["expires"] + 1, 5, "the invite to expire")
    before = rejected()

    async with xmpp.UnauthedSession(server.port) as s:
        assert (await s.preauth(for_alice)).ok
        assert (await s.register("mallory", "pw")).condition == "not-acceptable"  # username-mismatch
        assert (await s.preauth(token_of(expiring["uri"]))).text == "This invitation has expired"
        assert (await s.preauth(revoked)).text == "This invitation has been revoked"
        assert (await s.preauth("nonsense")).text == "This invitation is not valid"
    # XEP-0379 with a bad token counts too (the 4th failure from this address: throttle on).
    j = await xmpp.login(server.port, "admin@localhost", "admin-secret")
    xmpp.send_subscribe_with_preauth(j, "romeo@localhost", "nonsense" + contact[:4])
    await j.wait_for(lambda st: st.xml.get("type") == "unavailable" and st["from"].bare == "romeo@localhost")
    async with xmpp.UnauthedSession(server.port) as s:
        assert (await s.preauth(for_alice)).condition == "policy-violation"
    after = rejected()

    def moved(reason):
        return after.get(reason, 0) - before.get(reason, 0)

    assert {r: moved(r) for r in ("username-mismatch", "expired", "revoked", "invalid", "throttled")} == {
        "username-mismatch": 1, "expired": 1, "revoked": 1, "invalid": 2, "throttled": 1}, after


@pytest.mark.server_options(extra_modules=["admin_shell"])
async def test_admin_console_commands(server):
    def shell(command):
        rc, out, err = server.prosodyctl("shell", command)
        assert rc == 0, (out, err)
        return out

    created = shell("invite:create_account('zoe@localhost')")
    token = token_of(re.search(r"xmpp:\S+", created).group(0))
    listing = shell("invite:list('localhost')")
    assert "account zoe" in listing and token not in listing
    invite_id = re.search(r"^(\w{10})\s+register", listing, re.M).group(1)
    assert f"Revoked invite {invite_id}" in shell(f"invite:delete('localhost', '{invite_id}')")
    assert "status:      revoked" in shell(f"invite:show('localhost', '{invite_id}')")
    assert "Removed 1 used, revoked or expired invites" in shell("invite:prune('localhost')")
    res = await xmpp.register_with_invite(server.port, token, "zoe", "pw")
    assert res.preauth.condition == "item-not-found"


@pytest.mark.server_options(extra_modules=["admin_shell"])
async def test_admin_console_refuses_bad_input_with_one_line(server):
    """0.12's console (on 13 the same commands are shell items, tested below). The first
    command the server runs is a show: nothing else has opened the store before it."""
    if harness.prosody_major_version() >= 13:
        pytest.skip("Prosody 0.12's console; 13's shell items are tested below")
    server.register_user("alice", "alice-secret")
    ctl(server, "generate", "localhost")
    invite_id = ctl(server, "list", "localhost")[1].splitlines()[1].split()[0]

    def shell(command):
        rc, out, err = server.prosodyctl("shell", command)
        return rc, (out + err).strip()

    assert shell(f"invite:show('localhost', '{invite_id}')")[0] == 0
    for command, line in [
        ("invite:show('nosuch.example', 'abcd')", "Error: mod_invites is not loaded on nosuch.example"),
        ("invite:show('localhost', 'ffffffff')", "Error: No such invite"),
        ("invite:list()", "Error: Please give the host (or a JID) as the first argument"),
        ("invite:create_account('localhost', {expires_after = '3x'})",
         "Error: Invalid --expires-after: unknown unit: use s, m, h, d or w (e.g. 3d)"),
        ("invite:create_account('localhost', {uses = 0})", "Error: --uses must be a whole number of at least 1"),
        ("invite:create_account('bob@localhost', {uses = 2})",
         "Error: --uses needs an invite for any username: give the host, not a JID"),
        ("invite:create_reset('ghost@localhost')", "Error: The specified user account does not exist: ghost"),
    ]:
        assert shell(command) == (1, line), command
    # 0.12's console has what 13's shell has: flags as a table, create_reset.
    rc, out = shell("invite:create_account('localhost', {uses = 2, expires_after = '2d'})")
    assert rc == 0 and "xmpp:localhost?register;preauth=" in out
    assert re.search(r"0/2\s+new account", ctl(server, "list", "localhost")[1])
    assert "xmpp:alice@localhost?register;preauth=" in shell("invite:create_reset('alice@localhost')")[1]
    assert shell(f"invite:revoke('localhost', '{invite_id}')")[0] == 0
    assert shell(f"invite:revoke('localhost', '{invite_id}')") == (
        1, f"Error: Invite {invite_id} is already revoked; nothing to revoke")


@pytest.mark.server_options(extra_modules=["admin_shell"])
async def test_prosody13_shell_refuses_bad_input_with_one_line(server):
    if harness.prosody_major_version() < 13:
        pytest.skip("Prosody 13's shell-command items; 0.12's console is tested above")
    ctl(server, "generate", "localhost")
    invite_id = ctl(server, "list", "localhost")[1].splitlines()[1].split()[0]

    def shell(*args):
        rc, out, err = server.prosodyctl("shell", "invite", *args)
        return rc, (out + err).strip()

    assert shell("show", "localhost", invite_id)[0] == 0
    for args, line in [
        (("show", "localhost", "ffffffff"), "No such invite"),
        (("create_account", "localhost", "--expires-after", "3x"),
         "Invalid --expires-after: unknown unit: use s, m, h, d or w (e.g. 3d)"),
        (("create_account", "localhost", "--uses", "0"), "--uses must be a whole number of at least 1"),
        (("create_account", "bob@localhost", "--uses", "2"),
         "--uses needs an invite for any username: give the host, not a JID"),
        (("revoke", "localhost", "0000"), "No such invite"),
        (("create_reset", "ghost@localhost"), "The specified user account does not exist: ghost"),
    ]:
        rc, out = shell(*args)
        assert rc != 0 and out.splitlines()[-1].endswith(line), (args, rc, out)
    rc, out = shell("list", "nosuch.example")
    assert rc != 0 and "nosuch.example" in out, out


@pytest.mark.server_options(extra_modules=["admin_shell"])
async def test_admin_flag_of_create_account_makes_an_admin(server):
    """Prosody 13.0.6's shell takes `invite create_account HOST --admin` as a flag; 13.0.1's
    took no such flag and 0.12's console a table: all three make an admin here."""
    if harness.prosody_major_version() >= 13:
        rc, out, err = server.prosodyctl("shell", "invite", "create_account", "localhost", "--admin")
    else:
        rc, out, err = server.prosodyctl("shell", "invite:create_account('localhost', {admin = true})")
    assert rc == 0, (out, err)
    token = token_of(re.search(r"xmpp:\S+", out).group(0))
    assert (await xmpp.register_with_invite(server.port, token, "boss", "boss-pw")).ok
    client = await xmpp.login(server.port, "boss@localhost", "boss-pw", presence=False)
    assert (await xmpp.call_hook(client, "is_admin", "boss@localhost")).value is True


@pytest.mark.server_options(extra_modules=["admin_shell"])
async def test_prosody13_shell_commands(server):
    rc, out, _ = server.prosodyctl("about")
    if "Prosody 13" not in out:
        pytest.skip("Prosody 13's shell-command items; 0.12's console is tested above")

    def shell(*args):
        rc, out, err = server.prosodyctl("shell", "invite", *args)
        assert rc == 0, (out, err)
        return out

    server.register_user("alice", "alice-secret")
    created = shell("create_account", "localhost", "--uses", "2", "--expires-after", "1d")
    token = token_of(re.search(r"xmpp:\S+", created).group(0))
    listing = shell("list", "localhost")
    assert "0/2" in listing and token not in listing
    invite_id = re.search(r"^(\w{10})\s+register", listing, re.M).group(1)
    assert "status:      pending" in shell("show", "localhost", invite_id)
    reset = shell("create_reset", "alice@localhost")
    assert "xmpp:alice@localhost?register;preauth=" in reset
    contact = shell("create_contact", "romeo@localhost", "--allow-registration")
    assert re.search(r"xmpp:romeo@localhost\?roster;preauth=\S+;ibr=y", contact)
    assert f"Revoked invite {invite_id}" in shell("delete", "localhost", invite_id)
    assert "Removed 1 used, revoked or expired invites" in shell("prune", "localhost")
    res = await xmpp.register_with_invite(server.port, token, "late", "pw")
    assert res.preauth.condition == "item-not-found"
    rc, out, err = server.prosodyctl("shell", "invite", "create_account", "localhost", "--uses", "0")
    assert "--uses must be a whole number of at least 1" in out + err
