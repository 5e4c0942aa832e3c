"""The Lua API as Prosody's admin shell and other modules use it: the same answers as
Prosody's own mod_invites, and errors the shell can print.

* `create_account(nil, nil, -3600)`: any integer ttl is accepted, as Prosody's store does
  (test suites and admins make an already expired invite this way); its token is then refused
  at preauth as expired.
* Every error the module raises is a Lua string. mod_admin_shell puts an error as text into
  its reply (`st.stanza("repl-result"):text(err)`): an error object that is not a string
  makes that raise in turn (`util/stanza.lua: invalid text value: expected string, got
  userdata`, a traceback in Prosody's log) and the shell client never gets an answer.
* `invite-created` fires before the invite is stored, and what its handlers change
  (`additional_data`, `landing_page`) is stored, as in Prosody; no raw token is stored.
* `delete_account_invite(token)` of an invite that is already gone returns true.
* Prosody 13 (13.0.2 and later): password-reset invites have the landing-page type
  "password-reset" in `invites_page_supports`.

Lua is evaluated through the shell the same way on 0.12 and 13: `prosodyctl shell ">CODE"`
(one argument; a line starting with `>` is run as Lua in the server's global environment and
the result printed as "Result: …"; an error is written to stderr and the exit code is the
number of error replies). Interactively (`prosodyctl shell --quiet`, lines on stdin) results
are printed as "| …" and errors as "! …".

Every shell call here is bounded (SHELL_TIMEOUT): a shell that hangs fails the test with the
tracebacks from Prosody's log. Internal storage and SQLite.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

import harness
import xmpp
from conftest import storage_fixture

HOST = harness.HOST
SHELL_TIMEOUT = 10.0  # a healthy shell answers in well under a second
EXPIRED = ("cancel", "item-not-found", "This invitation has expired")
GET_INVITES = f"require'core.modulemanager'.get_module({HOST!r},'invites')"

PROBE = "invites_created_probe"  # spec/integration/plugins/mod_invites_created_probe.lua
PROBE_PAGE = "https://example.test/welcome/"

PAGE_TEMPLATE = "https://invite.example.test/invites_page?{invite.token}"


storage = storage_fixture("internal", "sql")


def token_of(uri):
    return xmpp.parse_uri(uri).token


def page_of(token):
    return PAGE_TEMPLATE.replace("{invite.token}", token)


def ctl(server, *args):
    rc, out, err = server.prosodyctl("mod_invites", *args)
    return rc, out.strip(), err


def tracebacks(server) -> list[str]:
    """Traceback lines and error-level lines in Prosody's logs."""
    lines = server.log_lines(r"Traceback|\terror\t") + [
        ln for ln in server.err_text().splitlines() if "\terror\t" in ln or "Traceback" in ln
    ]
    return list(dict.fromkeys(lines))


def run_shell(server, *args, input=None, what=None):
    """`prosodyctl shell ARGS`, bounded by SHELL_TIMEOUT; a hang fails the test with a clear message."""
    try:
        return server.prosodyctl("shell", *args, input=input, timeout=SHELL_TIMEOUT)
    except subprocess.TimeoutExpired:
        log = "\n".join(tracebacks(server)) or "(no error in Prosody's log)"
        pytest.fail(
            f"`prosodyctl shell` got no answer to {what or args!r} within {SHELL_TIMEOUT:.0f}s "
            f"(the shell hangs). Errors in Prosody's log:\n{log}",
            pytrace=False,
        )


def shell_lua(server, code):
    """Evaluates one line of Lua in the server: `prosodyctl shell ">CODE"` (0.12 and 13)."""
    return run_shell(server, ">" + code, what=">" + code)


# ------------------------------------------------------------ negative ttl (a)


@pytest.mark.server_options(extra_modules=["admin_shell"])
async def test_shell_create_account_with_negative_ttl_makes_an_expired_invite(server, admin):
    rc, out, err = shell_lua(server, f"{GET_INVITES}.create_account(nil, nil, -3600)")
    assert rc == 0 and out.startswith("Result: "), (
        f"create_account(nil, nil, -3600) in the shell failed: rc={rc}\nstdout: {out}\nstderr: {err}")
    m = re.search(r"preauth=([A-Za-z0-9_-]+)", out)
    assert m, f"no invite URI in the shell's output:\n{out}"
    token = m.group(1)
    created = re.search(r"created_at = (\d+)", out)
    expires = re.search(r"expires = (\d+)", out)
    assert created and expires, out
    assert int(expires.group(1)) < int(created.group(1)), out  # already expired when made

    async with xmpp.UnauthedSession(server.port) as s:
        res = await s.preauth(token)
        assert (res.error_type, res.condition, res.text) == EXPIRED, res
        assert (await s.register("late", "pw")).condition == "not-acceptable"
    assert await xmpp.login_fails(server.port, "late@localhost", "pw")

    # Any integer ttl, through the API as other modules call it: -1 is expired at once too.
    c = await xmpp.login(server.port, admin.jid, admin.password)
    made = await xmpp.call_hook(c, "create_account", None, None, -1)
    assert made.ok and not made.raised, made
    res = await xmpp.register_with_invite(server.port, token_of(made.value["uri"]), "late2", "pw")
    assert (res.preauth.error_type, res.preauth.condition, res.preauth.text) == EXPIRED, res
    assert not tracebacks(server), tracebacks(server)


# -------------------------------------------------------- errors are strings (b)


@pytest.mark.server_options(extra_modules=["admin_shell"])
async def test_shell_error_from_a_bad_argument_is_one_line_and_the_shell_goes_on(server):
    bad = f"{GET_INVITES}.create_account(nil, {{ bad = print }})"

    # One command: one error line, exit code 1 (one error reply), answered at once.
    rc, out, err = shell_lua(server, bad)
    lines = [ln for ln in (out + err).splitlines() if ln.strip()]
    assert rc == 1 and len(lines) == 1 and "plain data expected" in lines[0], (rc, out, err)
    assert "userdata" not in lines[0], lines

    # The same session answers the next command after the error.
    rc, out, err = run_shell(server, "--quiet", input=f">{bad}\n>1+1\n", what=f"{bad!r} then '>1+1'")
    replies = [re.sub(r"^(prosody> )+", "", ln) for ln in out.splitlines()]
    errors = [ln for ln in replies if ln.startswith("! ")]
    assert len(errors) == 1 and "plain data expected" in errors[0], out
    assert "| Result: 2" in replies, out

    assert not tracebacks(server), "\n".join(tracebacks(server))
    assert not server.log_lines(r"invalid text value"), server.log_lines(r"invalid text value")


# ------------------------------------------------- invite-created handlers


@pytest.mark.server_options(extra_modules=[PROBE])
async def test_changes_made_by_invite_created_handlers_are_stored(server, admin):
    c = await xmpp.login(server.port, admin.jid, admin.password)
    for args, want_data in [
        ((), {"note": "from handler"}),  # additional_data created by the handler
        ((None, {"kept": "yes"}), {"kept": "yes", "note": "from handler"}),
    ]:
        made = await xmpp.call_hook(c, "create_account", *args)
        assert made.ok, made
        token = token_of(made.value["uri"])
        info = await xmpp.call_hook(c, "get_account_invite_info", token)
        assert info.ok, info
        assert info.value.get("additional_data") == want_data, info.value
        assert info.value.get("landing_page") == PROBE_PAGE + token, info.value
        assert server.grep_data(token) == [], f"raw token stored in {server.grep_data(token)}"
        # Still a working invite.
        assert (await xmpp.register_with_invite(server.port, token, f"user{len(args)}", "pw")).ok


# --------------------------------------------------- delete_account_invite


async def test_delete_account_invite_of_a_gone_invite_returns_true(server, admin):
    c = await xmpp.login(server.port, admin.jid, admin.password)
    token = token_of(server.generate_invite())
    invite_id = ctl(server, "list", HOST)[1].splitlines()[1].split()[0]

    first = await xmpp.call_hook(c, "delete_account_invite", token)
    again = await xmpp.call_hook(c, "delete_account_invite", token)
    assert (first.value, first.raised) == (True, False), first
    assert (again.value, again.raised) == (True, False), again
    # The command line still tells the admin there is nothing to revoke.
    assert ctl(server, "revoke", HOST, invite_id)[:2] == (
        1, f"Invite {invite_id} is already revoked; nothing to revoke")

    # Gone from storage altogether (pruned), or never there: true as well.
    assert ctl(server, "prune", HOST)[:2] == (0, "Removed 1 used, revoked or expired invites")
    pruned = await xmpp.call_hook(c, "delete_account_invite", token)
    assert (pruned.value, pruned.raised) == (True, False), pruned
    unknown = await xmpp.call_hook(c, "delete_account_invite", "no-such-token-" + "x" * 10)
    assert (unknown.value, unknown.raised) == (True, False), unknown
    res = await xmpp.register_with_invite(server.port, token, "late", "pw")
    assert res.preauth.condition == "item-not-found", res


# ------------------------------------------- password-reset landing pages (13)


# (invites_page_supports, reset invite gets a page, account invite gets a page)
LANDING_PAGE_CASES = [
    (None, False, True),  # the default: account, contact, account-and-contact
    (["account", "password-reset"], True, True),
    (["password-reset"], True, False),
]


async def test_prosody13_password_reset_landing_page_type(make_server, request):
    """One server per invites_page_supports value (in one test: each alone would not tell
    "password-reset" from "account" in every case)."""
    if harness.prosody_major_version() < 13:
        pytest.skip("Prosody 13: 0.12 leaves landing pages to mod_invites_page")
    for supports, reset_page, account_page in LANDING_PAGE_CASES:
        options = {"invites_page": PAGE_TEMPLATE}
        if supports is not None:
            options["invites_page_supports"] = supports
        server = make_server(options=options)
        request.node._prosody_server = server  # its log goes into the failure report
        case = f"invites_page_supports = {supports or 'default'}"
        server.register_user("admin", "admin-secret")
        server.register_user("alice", "alice-secret")
        c = await xmpp.login(server.port, "admin@localhost", "admin-secret")

        reset = await xmpp.call_hook(c, "create_account_reset", "alice")
        assert reset.ok, (case, reset)
        token = token_of(reset.value["uri"])
        assert reset.value.get("landing_page") == (page_of(token) if reset_page else None), (case, reset.value)

        account = await xmpp.call_hook(c, "create_account")
        assert account.ok, (case, account)
        token = token_of(account.value["uri"])
        assert account.value.get("landing_page") == (page_of(token) if account_page else None), (
            case, account.value)

        # `generate` prints the landing page when the invite has one, the xmpp: URI otherwise.
        rc, out, err = ctl(server, "generate", HOST, "--reset", "alice")
        assert rc == 0, (case, out, err)
        out = out.splitlines()[-1]
        if reset_page:
            assert re.fullmatch(re.escape(page_of("")) + r"[A-Za-z0-9_-]+", out), (case, out)
        else:
            assert out.startswith("xmpp:alice@localhost?register;preauth="), (case, out)
        rc, out, err = ctl(server, "generate", HOST)
        assert rc == 0, (case, out, err)
        out = out.splitlines()[-1]
        if account_page:
            assert out.startswith(page_of("")), (case, out)
        else:
            assert out.startswith("xmpp:localhost?register;preauth="), (case, out)
        await xmpp.close_all()
        server.cleanup()


async def test_prosody13_generate_reads_the_hosts_landing_page_options(make_server, request):
    """prosodyctl runs mod_invites loaded globally: it must still read options set under the
    VirtualHost (it read the global section only before)."""
    if harness.prosody_major_version() < 13:
        pytest.skip("Prosody 13: 0.12 leaves landing pages to mod_invites_page")
    server = make_server(options={"invites_page": None}, host_options={"invites_page": PAGE_TEMPLATE})
    request.node._prosody_server = server
    rc, out, err = ctl(server, "generate", HOST)
    assert rc == 0, (out, err)
    out = out.splitlines()[-1]
    assert re.fullmatch(re.escape(page_of("")) + r"[A-Za-z0-9_-]+", out), out
