"""Landing page and web registration in a real browser (headless Chromium via Selenium).

Prosody's own mod_invites_page and mod_invites_register_web run on top of OUR mod_invites
and mod_invites_register: the invite is made by our `prosodyctl mod_invites generate`,
the pages call our invites.get(), and the registration goes through our user-registering /
user-registered hooks.

mod_invites_register_web depends on mod_password_policy. Under Prosody 13 that is the real
module from bookworm-backports' prosody-modules. Debian's prosody-modules for 0.12 does not
ship it: under 0.12 the test loads a minimal stand-in,
spec/integration/plugins-0.12/mod_password_policy.lua (the community module's defaults:
minimum length 8, password must not contain the username).

Screenshots of every page go to build/screenshots/<test>-<storage>-<step>.png
(prosody13-<test>-… under Prosody 13).

Needs chromium, chromium-driver (apt) and selenium (pip); libjs-bootstrap4 (apt) makes the
pages styled. Without them the tests are skipped, or fail when CI is set.
"""

from __future__ import annotations

import os

import pytest

import web_helpers
import xmpp
from web_helpers import SITE_NAME, Browser, start_web_server, token_of_landing_page


def _require_browser():
    problem = web_helpers.browser_problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests cannot run: {problem}", pytrace=False)
        pytest.skip(f"browser tests need chromium, chromium-driver and selenium: {problem}")


@pytest.fixture
def browser(request, storage):
    """A headless Chromium with a fresh profile; screenshots named after the test and storage."""
    _require_browser()
    test = request.node.originalname.removeprefix("test_")
    b = Browser(screenshot_prefix=(test, storage))
    yield b
    b.quit()


@pytest.fixture
def web_server(make_server, request):
    ws = start_web_server(make_server, extra_modules=web_helpers.WEB_MODULES)
    request.node._prosody_server = ws.server  # logs in the report on failure
    return ws


async def _login_and_check(port, jid, password, *others):
    """Log in as jid, and ask the server (testhook) whether each of `others` exists."""
    client = await xmpp.login(port, jid, password)
    exists = {}
    for username in others:
        res = await xmpp.call_hook(client, "user_exists", username)
        assert not res.raised, res
        exists[username] = bool(res.value)
    return exists


def test_web_registration(browser, web_server):
    srv, base = web_server.server, web_server.base_url
    password = "correct horse battery"

    # --- our generate prints the landing page URL (invites_page is enabled on the host)
    url = srv.generate_invite()
    assert url.startswith(base + "/invites_page?"), url
    token = token_of_landing_page(url)

    # --- 1. landing page
    browser.open(url)
    text = browser.wait_for_text("You have been invited to chat")
    assert browser.title == f"Invite to {SITE_NAME}"
    assert f"Invite to {SITE_NAME}" in text
    assert "register an account manually" in text
    # The page offers the xmpp: URI of this very invite.
    alternate = browser.find("css selector", "link[rel=alternate]").get_attribute("href")
    assert alternate == f"xmpp:{srv.host}?register;preauth={token}"
    browser.screenshot("1-landing")

    # --- 2. follow the page's own link to the web registration form
    landing_tab = browser.tab
    browser.find("link text", "register an account manually").click()
    register_url = browser.wait_for_url(r"/register\?t=")
    assert register_url == f"{base}/register?t={token}"
    text = browser.wait_for_text("Create an account")
    assert f"Register on {SITE_NAME}" in text
    assert f"@{srv.host}" in text
    browser.find("name", "user")  # the form is there
    browser.screenshot("2-register-form")

    # A second tab holds the same form (a stale copy of the link, opened before registering).
    second_tab = browser.new_tab()
    browser.open(register_url)
    browser.wait_for_text("Create an account")
    browser.switch_to(landing_tab)

    # --- 3. register: success page
    browser.fill_and_submit({"user": "webuser", "password": password})
    text = browser.wait_for_text("Congratulations!")
    assert f"You have created an account on {SITE_NAME}" in text
    jid_field = browser.find("css selector", "input.form-control-plaintext").get_attribute("value")
    assert jid_field == f"webuser@{srv.host}"
    browser.screenshot("3-success")

    # The invite was spent through our hooks.
    assert srv.log_lines(rf"Invite \w+ redeemed by webuser@{srv.host}"), "no redemption log line"

    # --- the new account logs in over c2s
    exists = xmpp.run(_login_and_check(srv.port, f"webuser@{srv.host}", password, "webuser"), 30)
    assert exists == {"webuser": True}

    # --- 4. the same single-use link, opened again: invalid-invite page
    browser.open(url)
    text = browser.wait_for_text("Invite expired")
    assert "Sorry, it looks like this invite code has expired!" in text
    assert "register an account manually" not in text
    browser.screenshot("4-reopened-invalid")

    # The registration link itself no longer shows a form either.
    browser.open(register_url)
    text = browser.wait_for_text("Invite expired")
    assert "/invites_page" in browser.url
    assert not browser.driver.find_elements("name", "user")

    # --- 5. the stale form in the second tab, submitted with another name: refused, no account
    browser.switch_to(second_tab)
    browser.screenshot("5-stale-form")
    browser.fill_and_submit({"user": "webuser2", "password": password})
    text = browser.wait_for_text("Invite expired")
    assert "Congratulations" not in text
    browser.screenshot("6-second-registration-refused")

    exists = xmpp.run(_login_and_check(srv.port, f"webuser@{srv.host}", password, "webuser2"), 30)
    assert exists == {"webuser2": False}
    assert xmpp.run(xmpp.login_fails(srv.port, f"webuser2@{srv.host}", password), 30)

    # --- and the token is spent for XMPP clients as well
    res = xmpp.run(xmpp.register_with_invite(srv.port, token, "webuser3", password), 30)
    assert not res.preauth.ok and res.preauth.condition == "item-not-found", res.preauth
    assert not res.register.ok, res.register

    assert len(browser.screenshots) == 6
    for shot in browser.screenshots:
        assert shot.is_file() and shot.stat().st_size > 1000, shot


def test_web_registration_form_errors(browser, web_server):
    """Refusals on the form keep the invite usable: a weak password, then a taken name."""
    srv = web_server.server
    srv.register_user("taken", "taken-password")
    url = srv.generate_invite()
    token = token_of_landing_page(url)

    browser.open(f"{web_server.base_url}/register?t={token}")
    browser.wait_for_text("Create an account")

    # Too short for the (stand-in) password policy. The browser's own minlength check would
    # stop the submission, so it is lifted, as a script or an older browser would.
    browser.driver.execute_script("document.querySelector('input[name=password]').removeAttribute('minlength')")
    browser.fill_and_submit({"user": "newbie", "password": "short"})
    text = browser.wait_for_text("Password is too short")
    assert "Create an account" in text
    browser.screenshot("1-password-too-short")

    browser.fill_and_submit({"user": "taken", "password": "long enough password"})
    text = browser.wait_for_text("This username is already in use.")
    browser.screenshot("2-username-taken")

    # The invite still works after both refusals.
    browser.fill_and_submit({"user": "newbie", "password": "long enough password"})
    browser.wait_for_text("Congratulations!")
    browser.screenshot("3-success")
    xmpp.run(_login_and_check(srv.port, f"newbie@{srv.host}", "long enough password"), 30)


async def _create_invite_as(port, jid, password, fn, *args):
    client = await xmpp.login(port, jid, password)
    res = await xmpp.call_hook(client, fn, *args)
    assert res.ok, res
    return res.value


def test_web_registration_bound_username(browser, web_server):
    """An invite for the username alice, opened in the browser: another name is refused with
    our reason on the error page, and the invite still registers alice afterwards."""
    srv, base = web_server.server, web_server.base_url
    srv.register_user("inviter", "inviter-secret")
    invite = xmpp.run(_create_invite_as(srv.port, f"inviter@{srv.host}", "inviter-secret", "create_account", "alice"), 30)
    url = invite["landing_page"]
    assert url.startswith(base + "/invites_page?"), invite
    token = token_of_landing_page(url)
    assert invite["uri"] == f"xmpp:alice@{srv.host}?register;preauth={token}"

    browser.open(url)
    browser.wait_for_text("You have been invited to chat")
    browser.find("link text", "register an account manually").click()
    browser.wait_for_text("Create an account")
    register_url = browser.url

    browser.fill_and_submit({"user": "mallory", "password": "a long secret one"})
    text = browser.wait_for_text("Registration error")
    assert "This invitation is for the username 'alice' only" in text
    browser.screenshot("1-other-username-refused")

    browser.open(register_url)
    browser.wait_for_text("Create an account")
    browser.fill_and_submit({"user": "alice", "password": "another long secret"})
    text = browser.wait_for_text("Congratulations!")
    assert browser.find("css selector", "input.form-control-plaintext").get_attribute("value") == f"alice@{srv.host}"
    browser.screenshot("2-success")

    assert xmpp.run(xmpp.login_fails(srv.port, f"mallory@{srv.host}", "a long secret one"), 30)
    assert not xmpp.run(xmpp.login_fails(srv.port, f"alice@{srv.host}", "another long secret"), 30)
