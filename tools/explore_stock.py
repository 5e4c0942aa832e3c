"""Exploration script (not a test): observe Prosody's behaviour on points the
product must get right. Results are recorded in spec/integration/NOTES.md.

    INVITES_IMPL=stock python3 tools/explore_stock.py [internal|sql ...]

Works against INVITES_IMPL=ours too, to compare.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

# The integration harness (harness.py, xmpp.py) lives with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "spec" / "integration"))

import harness  # noqa: E402
import xmpp  # noqa: E402

WAIT = 3.0  # bound for "does X arrive?" checks


def rel(srv, paths):
    out = []
    for p in paths:
        try:
            out.append(str(p.relative_to(srv.dir)))
        except ValueError:
            out.append(str(p))
    return out


async def subscription_case(srv, admin, inviter_online: bool, allow_registration: bool, contact: str):
    print(f"\n(a) XEP-0379 subscribe with preauth; inviter romeo {'ONLINE' if inviter_online else 'OFFLINE'}; "
          f"token from create_contact('romeo', {str(allow_registration).lower()}); contact {contact}")
    err_before = len(srv.err_text())
    res = await xmpp.call_hook(admin, "create_contact", "romeo", allow_registration)
    print("   create_contact ->", "ok" if res.ok else res)
    token = xmpp.parse_uri(res.value["uri"]).token
    romeo = None
    if inviter_online:
        romeo = await xmpp.login(srv.port, "romeo@localhost", "romeo-pw")
    c = await xmpp.login(srv.port, f"{contact}@localhost", f"{contact}-pw")
    xmpp.send_subscribe_with_preauth(c, "romeo@localhost", token)
    await c.roundtrip()
    got = {}
    for ptype in ("subscribed", "subscribe"):
        try:
            await c.wait_presence(ptype, "romeo@localhost", timeout=WAIT)
            got[ptype] = True
        except asyncio.TimeoutError:
            got[ptype] = False
    print(f"   {contact} received subscribed={got['subscribed']} subscribe={got['subscribe']}")
    print(f"   {contact} roster:", (await xmpp.roster(c)).get("romeo@localhost"))
    print("   romeo roster (storage):", (await xmpp.call_hook(admin, "get_roster", "romeo")).value.get(f"{contact}@localhost"))
    if romeo is not None:
        print("   romeo received presences:", [(s["type"], s["from"].bare) for s in romeo.presences()
                                             if s["from"].bare == f"{contact}@localhost"])
        await romeo.disconnect()
    g = await xmpp.call_hook(admin, "get", token, "romeo")
    print("   afterwards get(token,'romeo'):", "valid" if g.ok else ("RAISED " + str(g.err)[:90] if g.raised else g.err))
    print(f"   {contact} received (type, from):", [(s["type"] or "available", s["from"].bare) for s in c.presences()
                                               if s["from"].bare == "romeo@localhost"])
    print("   data files containing token:", rel(srv, srv.grep_data(token)))
    new_err = srv.err_text()[err_before:].strip()
    if new_err:
        print("   NEW WARN/ERROR LOG LINES:\n      " + "\n      ".join(new_err.splitlines()[:3]))
    return token


async def explore(srv: harness.ProsodyServer):
    print(f"==== {srv.impl} / storage={srv.storage} ====")
    for u in ("admin", "romeo", "juliet", "tybalt", "mercutio", "benvolio"):
        srv.register_user(u, f"{u}-pw")
    admin = await xmpp.login(srv.port, "admin@localhost", "admin-pw")

    # (b) tokens at rest after creating invites
    gen_token = xmpp.parse_uri(srv.generate_invite()).token
    acct = (await xmpp.call_hook(admin, "create_account", "alice")).value
    contact_reg = (await xmpp.call_hook(admin, "create_contact", "romeo", True)).value
    contact_only = (await xmpp.call_hook(admin, "create_contact", "romeo", False)).value
    print("\n(b) tokens in data dir right after creating invites:")
    for label, tok in (("prosodyctl generate", gen_token), ("create_account('alice')", acct["token"]),
                       ("create_contact(romeo,true)", contact_reg["token"]),
                       ("create_contact(romeo,false)", contact_only["token"])):
        print(f"   {label:30} data={rel(srv, srv.grep_data(tok))} logs={rel(srv, srv.grep_logs(tok))}")
    print("   data files:", rel(srv, srv.data_files()))

    # (a) XEP-0379 with inviter offline / online, contact-only and ibr tokens
    t1 = await subscription_case(srv, admin, False, False, "juliet")
    t2 = await subscription_case(srv, admin, False, True, "tybalt")
    t3 = await subscription_case(srv, admin, True, False, "mercutio")
    t4 = await subscription_case(srv, admin, True, True, "benvolio")
    print("\n(b) after the subscriptions, data files containing the tokens:")
    for t in (t1, t2, t3, t4):
        print(f"   {t}: {rel(srv, srv.grep_data(t))}")

    # (c) two sessions preauth with one token, then both register
    token = xmpp.parse_uri(srv.generate_invite()).token
    s1 = await xmpp.UnauthedSession.open(srv.port)
    s2 = await xmpp.UnauthedSession.open(srv.port)
    p1, p2 = await s1.preauth(token), await s2.preauth(token)
    r1 = await s1.register("twin1", "pw")
    r2 = await s2.register("twin2", "pw")
    r3 = await s1.register("twin3", "pw")  # same session, second account
    print("\n(c) one single-use token, two sessions:")
    print(f"   preauth s1={p1} s2={p2}")
    print(f"   register s1 twin1={r1}  s2 twin2={r2}  s1 again twin3={r3}")
    for u in ("twin1", "twin2", "twin3"):
        print(f"   {u} exists:", (await xmpp.call_hook(admin, "user_exists", u)).value)
    print("   token in data after registrations:", rel(srv, srv.grep_data(token)))
    await s1.close()
    await s2.close()

    # (d) preauth sent as <iq type='get'>
    token = xmpp.parse_uri(srv.generate_invite()).token
    res = await xmpp.register_with_invite(srv.port, token, "getter", "pw", preauth_type="get")
    print(f"\n(d) preauth as iq type=get: preauth={res.preauth} register={res.register}")

    print("\nlogs containing the (d) token (after preauth+register):", rel(srv, srv.grep_logs(token)))


def main(argv):
    storages = argv or ["internal", "sql"]
    for storage in storages:
        with harness.ProsodyServer(storage) as srv:
            xmpp.run(explore(srv), 120)
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
