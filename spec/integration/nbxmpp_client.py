"""Drive python-nbxmpp (Gajim's XMPP library) the way Gajim does, one scenario per run.

Run by test_real_client.py in a subprocess: nbxmpp runs on a GLib main loop, which pytest's
process has not got. It reads one JSON object on stdin, prints one JSON object (what
happened) on stdout and nbxmpp's own log (INFO, with tokens and passwords cut out) on
stderr. Exit status: 0 when the scenario finished, 1 when nbxmpp reported a failure, 2 when
it ran out of time.

Common input: port, domain, cert (the server's certificate, PEM), timeout (seconds);
optional: trust_certificate (default true: see below), connection ("START_TLS", the default,
or "PLAIN": what nbxmpp does when a user allows plain-text connections).

* {"scenario": "register", "token", "username", "password"}: Gajim's sign-up with an invite.
  Client in Mode.REGISTER; once nbxmpp says "connected" (STARTTLS done, the server offers
  in-band registration) Register.send_preauth(token), then Register.request_register_form(),
  fill in username and password, Register.submit_register_form().
* {"scenario": "contact", "inviter": {username, password}, "invitee": {username, password}}:
  both log in (Mode.CLIENT, Roster.request_roster(), available presence). The inviter makes a
  contact invite as Gajim's "generate invite" does: AdHoc.request_command_list() on the
  server, then AdHoc.execute_command() of urn:xmpp:invite#invite, read with
  parse_account_invite(). The invitee sends BasePresence.subscribe(inviter, preauth=token)
  (XEP-0379) and approves the inviter's subscription request (BasePresence.subscribed()), as
  a user would. Done when both have a roster push with subscription 'both'; then both
  rosters are fetched again (Roster.request_roster()) and reported.

The certificate is trusted as Gajim does once the user has chosen to trust it in its
certificate warning: it is passed to Client.set_accepted_certificates(), which waives only
the "unknown CA" error for exactly this certificate (a wrong host name or an expired
certificate still fails). No TLS error is ignored otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import urllib.parse

import gi

gi.require_version("Gio", "2.0")
gi.require_version("GLib", "2.0")
from gi.repository import Gio, GLib  # noqa: E402

from nbxmpp.client import Client  # noqa: E402
from nbxmpp.const import ConnectionProtocol, ConnectionType, Mode, PresenceType, StreamState  # noqa: E402
from nbxmpp.modules.account_invite import parse_account_invite  # noqa: E402
from nbxmpp.namespaces import Namespace  # noqa: E402
from nbxmpp.protocol import JID  # noqa: E402
from nbxmpp.structs import StanzaHandler  # noqa: E402

INVITE_COMMAND = "urn:xmpp:invite#invite"


class Redact(logging.Filter):
    """Cuts the secrets (tokens, passwords) out of every log line."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        for s in self.secrets:
            if s:
                msg = msg.replace(s, "<redacted>")
        record.msg, record.args = msg, None
        return True


def fingerprint(cert: Gio.TlsCertificate | None) -> str | None:
    """SHA-256 of the certificate's DER, as openssl prints it (AB:CD:...)."""
    if cert is None:
        return None
    der = bytes(cert.props.certificate)
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def token_of(uri: str) -> str | None:
    """The preauth parameter of an xmpp: URI (xmpp:JID?ACTION;preauth=TOKEN;...)."""
    query = uri.partition("?")[2]
    for part in query.split(";")[1:]:
        key, _, value = part.partition("=")
        if urllib.parse.unquote(key) == "preauth":
            return urllib.parse.unquote(value)
    return None


class Run:
    """One scenario on one GLib main loop; ends with finish() or fail()."""

    def __init__(self, args: dict, secrets: list[str]):
        self.args = args
        self.secrets = secrets
        self.loop = GLib.MainLoop()
        self.result: dict = {"scenario": args["scenario"], "ok": False, "steps": []}
        self.status = 1
        self.clients: list[Client] = []
        self.callbacks: list = []
        self.done = False

    # ---------------------------------------------------------------- plumbing

    def step(self, what: str) -> None:
        self.result["steps"].append(what)

    def client(self, name: str, mode: Mode, username: str | None = None, password: str | None = None) -> Client:
        a = self.args
        c = Client(log_context=name)
        c.set_domain(a["domain"])
        c.set_username(username)
        c.set_resource("nbxmpp-test")
        c.set_password(password)
        c.set_mode(mode)
        # The server listens on 127.0.0.1:port, not where DNS would send "localhost" clients.
        con_type = ConnectionType[a.get("connection", "START_TLS")]
        c.set_custom_host(f"127.0.0.1:{a['port']}", ConnectionProtocol.TCP, con_type)
        if a.get("trust_certificate", True):
            c.set_accepted_certificates([Gio.TlsCertificate.new_from_file(a["cert"])])
        c.subscribe("disconnected", lambda cl, _sig: self.on_disconnected(name, cl))
        c.subscribe("connection-failed", lambda cl, _sig: self.on_disconnected(name, cl))
        self.clients.append(c)
        return c

    def on_disconnected(self, name: str, c: Client) -> None:
        if not self.done:
            domain, error, text = c.get_error()
            self.fail(f"{name}: disconnected before the scenario finished: "
                      f"{getattr(domain, 'name', domain)} {error} {text or ''}".strip())

    def tls_info(self, name: str, c: Client) -> None:
        cert, errors = c.peer_certificate
        self.result.setdefault("tls", {})[name] = {
            "secure": c.is_stream_secure,
            "connection_type": c.current_connection_type.name,
            "fingerprint": fingerprint(cert),
            "certificate_errors_left": sorted(e.value_nick for e in (errors or ())),
        }

    def guard(self, what: str, fn):
        """A task callback that turns an exception (a stanza error, a malformed reply) into fail()."""

        def callback(task):
            if self.done:
                return
            try:
                fn(task.finish())
            except Exception as e:  # nbxmpp raises StanzaError & co. from finish()
                self.fail(f"{what}: {type(e).__name__}: {e}")

        # nbxmpp holds task callbacks by weak reference (Gajim passes bound methods of its
        # windows): keep this closure alive until the run ends.
        self.callbacks.append(callback)
        return callback

    def finish(self) -> None:
        self.result["ok"] = True
        self.status = 0
        self.stop()

    def fail(self, why: str) -> None:
        if self.done:
            return
        self.result["error"] = why
        self.status = 1
        self.stop()

    def timeout(self) -> bool:
        if not self.done:
            self.result["error"] = f"timeout after {self.args.get('timeout', 30)} s"
            self.status = 2
            self.stop()
        return GLib.SOURCE_REMOVE

    def stop(self) -> None:
        self.done = True
        for c in self.clients:
            c.remove_subscriptions()
            if c.state not in (StreamState.DISCONNECTED, StreamState.DISCONNECTING):
                c.disconnect(immediate=True)
        GLib.idle_add(self.loop.quit)

    def run(self) -> int:
        GLib.timeout_add_seconds(int(self.args.get("timeout", 30)), self.timeout)
        GLib.idle_add(self.start)
        self.loop.run()
        return self.status

    # ---------------------------------------------------------------- scenarios

    def start(self) -> bool:
        getattr(self, "start_" + self.args["scenario"])()
        return GLib.SOURCE_REMOVE

    def start_register(self) -> None:
        a = self.args
        c = self.client("register", Mode.REGISTER)
        register = None

        def on_connected(cl, _sig):
            nonlocal register
            self.step("connected")
            self.tls_info("register", cl)
            register = cl.get_module("Register")
            register.send_preauth(a["token"], callback=self.guard("preauth", on_preauth))

        def on_preauth(_result):
            self.step("preauth accepted")
            register.request_register_form(callback=self.guard("registration form", on_form))

        def on_form(data):
            # Gajim shows the data form when there is one, else the legacy fields.
            form = data.form if data.form is not None else data.fields_form
            self.result["form"] = {"data_form": data.form is not None, "fields": sorted(form.vars)}
            self.step("form received")
            form["username"].value = a["username"]
            form["password"].value = a["password"]
            if not form.is_fake_form():
                form.type_ = "submit"
            register.submit_register_form(form, callback=self.guard("register", on_registered))

        def on_registered(_result):
            self.step("registered")
            self.finish()

        c.subscribe("connected", on_connected)
        c.connect()

    def start_contact(self) -> None:
        a = self.args
        inviter_jid = JID.from_string(f"{a['inviter']['username']}@{a['domain']}")
        invitee_jid = JID.from_string(f"{a['invitee']['username']}@{a['domain']}")
        inviter = self.client("inviter", Mode.CLIENT, a["inviter"]["username"], a["inviter"]["password"])
        invitee = self.client("invitee", Mode.CLIENT, a["invitee"]["username"], a["invitee"]["password"])
        both = {"inviter": False, "invitee": False}
        pushes: dict[str, list] = {"inviter": [], "invitee": []}
        presences: dict[str, list] = {"inviter": [], "invitee": []}
        rosters: dict[str, dict] = {}
        token = None

        def record_pushes(name, contact):
            def on_push(_cl, _stanza, properties):
                item = properties.roster.item
                pushes[name].append({"jid": str(item.jid), "subscription": item.subscription, "ask": item.ask})
                if item.jid == contact and item.subscription == "both" and not both[name]:
                    both[name] = True
                    self.step(f"{name}: roster push, subscription both")
                    if all(both.values()):
                        fetch_rosters()

            return StanzaHandler(name="iq", callback=on_push, typ="set", ns=Namespace.ROSTER, priority=20)

        def record_presences(name):
            def on_presence(cl, _stanza, properties):
                presences[name].append({"from": str(properties.jid), "type": properties.type.name})
                if (name == "invitee" and properties.type == PresenceType.SUBSCRIBE
                        and properties.jid.bare_match(inviter_jid)):
                    self.step("invitee: approves the inviter's subscription request")
                    cl.get_module("BasePresence").subscribed(inviter_jid)

            return StanzaHandler(name="presence", callback=on_presence, priority=20)

        inviter.register_handler(record_pushes("inviter", invitee_jid))
        invitee.register_handler(record_pushes("invitee", inviter_jid))
        inviter.register_handler(record_presences("inviter"))
        invitee.register_handler(record_presences("invitee"))

        def go_online(name, cl, then):
            """What a client does after login: fetch the roster, send available presence."""

            def online(_roster):
                cl.get_module("BasePresence").send()
                self.step(f"{name}: online")
                then()

            self.tls_info(name, cl)
            cl.get_module("Roster").request_roster(callback=self.guard(f"{name}: roster", online))

        def inviter_connected(cl, _sig):
            self.step("inviter: connected")
            go_online("inviter", cl, lambda: cl.get_module("AdHoc").request_command_list(
                jid=a["domain"], callback=self.guard("command list", on_commands)))

        def on_commands(commands):
            command = next((cmd for cmd in commands if cmd.node == INVITE_COMMAND), None)
            self.result["commands"] = sorted(cmd.node for cmd in commands)
            if command is None:
                self.fail(f"the server lists no {INVITE_COMMAND} command")
                return
            inviter.get_module("AdHoc").execute_command(command, callback=self.guard("invite command", on_invite))

        def on_invite(command):
            nonlocal token
            if not command.is_completed or command.data is None:
                self.fail(f"invite command ended {command.status}: {command.notes}")
                return
            invite = parse_account_invite(command.data)
            token = token_of(invite.uri)
            if not token:
                self.fail("the invite command gave a URI without a preauth token")
                return
            self.secrets.append(token)
            self.result["invite_uri"] = invite.uri.replace(token, "<token>")
            self.step("inviter: contact invite made")
            invitee.subscribe("connected", invitee_connected)
            invitee.connect()

        def invitee_connected(cl, _sig):
            self.step("invitee: connected")
            go_online("invitee", cl, lambda: (
                cl.get_module("BasePresence").subscribe(inviter_jid, preauth=token),
                self.step("invitee: subscribe with the preauth token sent"),
            ))

        def fetch_rosters():
            for name, cl in (("inviter", inviter), ("invitee", invitee)):
                cl.get_module("Roster").request_roster(callback=self.guard(f"{name}: roster", got_roster(name)))

        def got_roster(name):
            def callback(data):
                rosters[name] = {str(i.jid): {"subscription": i.subscription, "ask": i.ask} for i in data.items or []}
                if len(rosters) == 2:
                    self.result.update(rosters=rosters, pushes=pushes, presences=presences)
                    self.finish()

            return callback

        self.result.update(pushes=pushes, presences=presences)
        inviter.subscribe("connected", inviter_connected)
        inviter.connect()


def main() -> int:
    args = json.load(sys.stdin)
    secrets = [s for s in (args.get("token"), args.get("password"),
                           (args.get("inviter") or {}).get("password"),
                           (args.get("invitee") or {}).get("password")) if s]
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(Redact(secrets))
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger("nbxmpp").setLevel(logging.INFO)
    run = Run(args, secrets)
    status = run.run()
    print(json.dumps(run.result, indent=1, sort_keys=True))
    return status


if __name__ == "__main__":
    sys.exit(main())
