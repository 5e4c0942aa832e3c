"""slixmpp-based async helpers for the invite integration tests.

Every wait is bounded (asyncio.wait_for); nothing sleeps to synchronise.
All clients created here are tracked so that ``close_all()`` (called by the
conftest runner after each async test) can shut them down.

Wire references: /work/shared/PROTOCOL.md (XEP-0445 preauth, XEP-0077, XEP-0379).
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any, Callable

from slixmpp import ClientXMPP
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

import slixmpp.exceptions as _slixmpp_exceptions
import slixmpp.stanza.error as _slixmpp_error

# slixmpp 1.17 lacks RFC 6120's <policy-violation/> (8.3.3.12), which Prosody uses for
# throttling: without it an error reply with that condition cannot even be parsed.
_slixmpp_error.Error.conditions.add("policy-violation")
_slixmpp_exceptions._DEFAULT_ERROR_TYPES.setdefault("policy-violation", "modify")

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
DOMAIN = "localhost"
LOOPBACK = "127.0.0.1"

NS_CLIENT = "jabber:client"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_PARS = "urn:xmpp:pars:0"
NS_IBR_TOKEN = "urn:xmpp:ibr-token:0"
NS_INVITE = "urn:xmpp:invite"
NS_IQ_REGISTER_FEATURE = "http://jabber.org/features/iq-register"
NS_REGISTER = "jabber:iq:register"
NS_ROSTER = "jabber:iq:roster"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_TEST = "urn:prosody-invites:test"

_live_clients: "set[ClientXMPP]" = set()


# --------------------------------------------------------------------------- URIs


@dataclass(frozen=True)
class InviteUri:
    jid: str
    action: str
    params: dict

    @property
    def token(self) -> str | None:
        return self.params.get("preauth")

    # allow ``jid, action, params = parse_uri(...)``
    def __iter__(self):
        return iter((self.jid, self.action, self.params))


def parse_uri(uri: str) -> InviteUri:
    """Parse ``xmpp:JID?ACTION;k=v;k=v`` (RFC 5122 / XEP-0147 style).

    Returns InviteUri(jid, action, params); params holds e.g. 'preauth' (the
    token) and 'ibr'. Unpackable as a 3-tuple.
    """
    if not uri.startswith("xmpp:"):
        raise ValueError(f"not an xmpp: URI: {uri!r}")
    rest = uri[len("xmpp:"):]
    if rest.startswith("//"):  # authority form xmpp://auth/jid
        rest = rest[2:].split("/", 1)[1] if "/" in rest[2:] else ""
    path, _, query = rest.partition("?")
    jid = urllib.parse.unquote(path)
    parts = query.split(";") if query else []
    action = urllib.parse.unquote(parts[0]) if parts else ""
    params: dict[str, str] = {}
    for p in parts[1:]:
        if not p:
            continue
        k, _, v = p.partition("=")
        params[urllib.parse.unquote(k)] = urllib.parse.unquote(v)
    return InviteUri(jid, action, params)


# ------------------------------------------------------------------- outcomes


@dataclass
class StanzaError:
    type: str | None
    condition: str | None
    text: str | None

    def as_tuple(self):
        return (self.type, self.condition, self.text)


@dataclass
class Outcome:
    """Result of one request: ok, or the stanza error (type, condition, text)."""

    ok: bool
    error: StanzaError | None = None
    raw: str = ""  # the reply stanza as XML ('' on timeout/close)
    timed_out: bool = False
    disconnected: bool = False  # the stream closed before a reply; error = stream error if any

    @property
    def error_type(self):
        return self.error.type if self.error else None

    @property
    def condition(self):
        return self.error.condition if self.error else None

    @property
    def text(self):
        return self.error.text if self.error else None

    def __repr__(self):
        if self.ok:
            return "Outcome(ok)"
        if self.timed_out:
            return "Outcome(timeout)"
        if self.disconnected:
            return f"Outcome(stream closed {self.error})"
        return f"Outcome(error {self.error_type}/{self.condition} {self.text!r})"


def parse_stanza_error(elem: ET.Element) -> StanzaError | None:
    """The <error/> child of a stanza (jabber:client namespace) as StanzaError."""
    err = elem.find(f"{{{NS_CLIENT}}}error")
    if err is None:
        err = elem.find("error")
    if err is None:
        return None
    condition = None
    text = None
    for child in err:
        ns, _, name = child.tag[1:].partition("}") if child.tag.startswith("{") else ("", "", child.tag)
        if ns != NS_STANZAS:
            continue
        if name == "text":
            text = child.text or ""
        elif condition is None:
            condition = name
    return StanzaError(err.get("type"), condition, text)


def _outcome_from_reply(reply) -> Outcome:
    xml = reply.xml if hasattr(reply, "xml") else reply
    raw = ET.tostring(xml, encoding="unicode")
    if xml.get("type") == "error":
        return Outcome(False, parse_stanza_error(xml), raw)
    return Outcome(True, None, raw)


async def _send_iq(client: ClientXMPP, iq, timeout: float) -> Outcome:
    """Send an Iq and turn result/error/timeout/stream close into an Outcome
    (never raises on error replies)."""
    closed = _closed_future(client)
    fut = asyncio.ensure_future(iq.send(timeout=timeout))
    try:
        done, _ = await asyncio.wait({fut, closed}, timeout=timeout + 1, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        fut.cancel()
        raise
    if fut in done:
        try:
            reply = fut.result()
        except IqError as e:
            return _outcome_from_reply(e.iq)
        except (IqTimeout, asyncio.TimeoutError):
            return Outcome(False, None, "", timed_out=True)
        return _outcome_from_reply(reply)
    fut.cancel()
    if closed in done:
        return Outcome(False, getattr(client, "stream_error", None), "", disconnected=True)
    return Outcome(False, None, "", timed_out=True)


def _closed_future(client: ClientXMPP) -> asyncio.Future:
    """A future resolved when the client's stream is closed (created once per client)."""
    fut = getattr(client, "_test_closed", None)
    if fut is None:
        fut = client.loop.create_future()
        client._test_closed = fut
        client.stream_error = None

        def on_stream_error(err):
            xml = err.xml
            cond, text = None, None
            for child in xml:
                name = child.tag.rpartition("}")[2]
                if name == "text":
                    text = child.text
                elif cond is None:
                    cond = name
            client.stream_error = StanzaError("stream", cond, text)

        def on_disconnected(_ev=None):
            if not fut.done():
                fut.set_result(True)

        client.add_event_handler("stream_error", on_stream_error)
        client.add_event_handler("disconnected", on_disconnected)
        client.add_event_handler("connection_failed", on_disconnected)
    return fut


def _plaintext_only(c: ClientXMPP) -> None:
    """Loopback tests: plain TCP only (no direct TLS attempt, no STARTTLS)."""
    c.enable_direct_tls = False
    c.enable_starttls = False
    c.enable_plaintext = True


def _el(tag: str, attrs: dict | None = None, text: str | None = None, children=()) -> ET.Element:
    e = ET.Element(tag, attrs or {})
    if text is not None:
        e.text = text
    for c in children:
        e.append(c)
    return e


def preauth_element(token: str) -> ET.Element:
    return _el(f"{{{NS_PARS}}}preauth", {"token": token})


# ------------------------------------------------------- unauthenticated session


class _UnauthedClient(ClientXMPP):
    """A c2s stream that stops after the first <stream:features/>: no TLS, no SASL, no bind."""

    def __init__(self, domain: str):
        super().__init__(domain, "")
        _plaintext_only(self)
        self._always_send_everything = True  # allow iqs before session start
        _closed_future(self)
        self.features_future: asyncio.Future = self.loop.create_future()
        self.features_xml: str = ""
        self.feature_set: set[tuple[str, str]] = set()

    async def _handle_stream_features(self, features):  # overrides ClientXMPP's negotiation
        if not self.features_future.done():
            xml = features.xml
            self.features_xml = ET.tostring(xml, encoding="unicode")
            for child in xml:
                tag = child.tag
                if tag.startswith("{"):
                    ns, _, name = tag[1:].partition("}")
                else:
                    ns, name = "", tag
                self.feature_set.add((ns, name))
            self.features_future.set_result(self.feature_set)
        return None


class UnauthedSession:
    """An unauthenticated c2s stream on which preauth/register can be sent repeatedly.

        s = await UnauthedSession.open(port)
        await s.preauth(token)          # -> Outcome
        await s.register("u", "pw")     # -> Outcome
        await s.close()

    Also usable as ``async with UnauthedSession(port) as s:``.
    """

    def __init__(self, port: int, domain: str = DOMAIN, timeout: float = DEFAULT_TIMEOUT):
        self.port = port
        self.domain = domain
        self.timeout = timeout
        self.client: _UnauthedClient | None = None

    @classmethod
    async def open(cls, port: int, domain: str = DOMAIN, timeout: float = DEFAULT_TIMEOUT) -> "UnauthedSession":
        s = cls(port, domain, timeout)
        await s.connect()
        return s

    async def connect(self):
        self.client = _UnauthedClient(self.domain)
        _live_clients.add(self.client)
        failed = self.client.loop.create_future()

        def on_fail(ev):
            if not failed.done():
                failed.set_result(ev)

        self.client.add_event_handler("connection_failed", on_fail)
        self.client.add_event_handler("disconnected", on_fail)
        self.client.connect(LOOPBACK, self.port)
        done, _ = await asyncio.wait(
            {self.client.features_future, failed}, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if self.client.features_future not in done:
            reason = failed.result() if failed.done() else "timeout"
            await self.close()
            raise ConnectionError(f"no stream features from 127.0.0.1:{self.port}: {reason}")
        return self

    @property
    def features(self) -> set[tuple[str, str]]:
        """(namespace, local name) of each child of <stream:features/>."""
        return set(self.client.feature_set)

    @property
    def features_xml(self) -> str:
        return self.client.features_xml

    def has_feature(self, ns: str, name: str = "register") -> bool:
        return (ns, name) in self.client.feature_set

    @property
    def offered_ibr_token(self) -> bool:
        return self.has_feature(NS_IBR_TOKEN)

    @property
    def offered_invite(self) -> bool:
        return self.has_feature(NS_INVITE)

    @property
    def offered_iq_register(self) -> bool:
        return self.has_feature(NS_IQ_REGISTER_FEATURE)

    @property
    def connected(self) -> bool:
        c = self.client
        return c is not None and c.transport is not None and not c.transport.is_closing()

    async def iq(self, itype: str, payload: ET.Element, timeout: float | None = None, to: str | None = None) -> Outcome:
        """Send an arbitrary iq with one payload element; returns the Outcome."""
        iq = self.client.Iq()
        iq["type"] = itype
        if to:
            iq["to"] = to
        iq.append(payload)
        return await _send_iq(self.client, iq, timeout or self.timeout)

    async def preauth(self, token: str, iq_type: str = "set", timeout: float | None = None,
                      to: str | None = None) -> Outcome:
        """<iq type=iq_type [to=to]><preauth xmlns='urn:xmpp:pars:0' token=token/></iq>."""
        return await self.iq(iq_type, preauth_element(token), timeout, to=to)

    async def register(self, username: str, password: str, timeout: float | None = None, **fields: str) -> Outcome:
        """XEP-0077: <iq type='set'><query xmlns='jabber:iq:register'><username/><password/>...</query></iq>."""
        q = _el(f"{{{NS_REGISTER}}}query")
        for name, value in (("username", username), ("password", password), *fields.items()):
            if value is not None:
                q.append(_el(f"{{{NS_REGISTER}}}{name}", text=value))
        return await self.iq("set", q, timeout)

    async def registration_form(self, timeout: float | None = None) -> Outcome:
        """XEP-0077 get (the form); Outcome.raw holds the reply."""
        return await self.iq("get", _el(f"{{{NS_REGISTER}}}query"), timeout)

    async def close(self):
        c = self.client
        if c is not None:
            await _shutdown(c)

    async def __aenter__(self):
        if self.client is None:
            await self.connect()
        return self

    async def __aexit__(self, *exc):
        await self.close()


@dataclass
class RegistrationResult:
    features: set = field(default_factory=set)
    offered_ibr_token: bool = False
    offered_invite: bool = False
    offered_iq_register: bool = False
    preauth: Outcome | None = None  # None when no token was given
    register: Outcome | None = None

    @property
    def ok(self) -> bool:
        return bool(self.register and self.register.ok and (self.preauth is None or self.preauth.ok))


async def register_with_invite(
    port: int,
    token: str | None,
    username: str,
    password: str,
    preauth_type: str = "set",
    *,
    domain: str = DOMAIN,
    timeout: float = DEFAULT_TIMEOUT,
) -> RegistrationResult:
    """Fresh unauthenticated stream: record features, preauth (unless token is None), register.

    Registration is attempted even when preauth fails, so both outcomes are reported.
    """
    async with UnauthedSession(port, domain, timeout) as s:
        res = RegistrationResult(
            features=s.features,
            offered_ibr_token=s.offered_ibr_token,
            offered_invite=s.offered_invite,
            offered_iq_register=s.offered_iq_register,
        )
        if token is not None:
            res.preauth = await s.preauth(token, preauth_type)
        res.register = await s.register(username, password)
        return res


# --------------------------------------------------------- authenticated client


class LoginError(Exception):
    pass


class Client(ClientXMPP):
    """Authenticated test client that records every presence, message and roster push.

    Subscription requests are NOT auto-answered (auto_authorize=None, auto_subscribe=False).
    """

    def __init__(self, jid: str, password: str):
        super().__init__(
            jid,
            password,
            plugin_config={
                "feature_mechanisms": {
                    "unencrypted_plain": True,
                    "unencrypted_scram": True,
                }
            },
        )
        _plaintext_only(self)
        _closed_future(self)
        self.auto_authorize = None
        self.auto_subscribe = False
        self.received: list = []  # stanza objects (presence, message, iq set roster)
        self._changed = asyncio.Event()
        self.register_handler(Callback("test:presence", MatchXPath(f"{{{NS_CLIENT}}}presence"), self._record))
        self.register_handler(Callback("test:message", MatchXPath(f"{{{NS_CLIENT}}}message"), self._record))
        self.register_handler(
            Callback("test:rosterpush", MatchXPath(f"{{{NS_CLIENT}}}iq/{{{NS_ROSTER}}}query"), self._record_push)
        )

    def _record(self, stanza):
        self.received.append(stanza)
        self._changed.set()

    def _record_push(self, stanza):
        if stanza["type"] == "set":
            self._record(stanza)

    def presences(self, ptype: str | None = None, from_jid: str | None = None) -> list:
        """Recorded presences, filtered by type ('available' for no type) and bare sender."""
        out = []
        for s in self.received:
            if s.xml.tag != f"{{{NS_CLIENT}}}presence":
                continue
            t = s.xml.get("type") or "available"
            if ptype is not None and t != ptype:
                continue
            if from_jid is not None and s["from"].bare != from_jid and str(s["from"]) != from_jid:
                continue
            out.append(s)
        return out

    async def wait_for(self, predicate: Callable[[Any], bool], timeout: float = DEFAULT_TIMEOUT, start: int = 0):
        """First recorded stanza (index >= start) matching predicate; raises asyncio.TimeoutError."""

        async def _wait():
            i = start
            while True:
                while i < len(self.received):
                    s = self.received[i]
                    i += 1
                    if predicate(s):
                        return s
                self._changed.clear()
                if i < len(self.received):
                    continue
                await self._changed.wait()

        return await asyncio.wait_for(_wait(), timeout)

    async def wait_presence(self, ptype: str, from_jid: str | None = None, timeout: float = DEFAULT_TIMEOUT):
        """Await a presence of type ptype ('available' for none) from from_jid (bare or full)."""

        def match(s):
            if s.xml.tag != f"{{{NS_CLIENT}}}presence":
                return False
            if (s.xml.get("type") or "available") != ptype:
                return False
            return from_jid is None or s["from"].bare == from_jid or str(s["from"]) == from_jid

        return await self.wait_for(match, timeout)

    async def expect_no_presence(self, ptype: str, from_jid: str | None = None, within: float = 1.0) -> bool:
        """True if no such presence arrives within `within` seconds (a bounded negative check)."""
        try:
            await self.wait_presence(ptype, from_jid, timeout=within)
            return False
        except asyncio.TimeoutError:
            return True

    async def roundtrip(self, timeout: float = DEFAULT_TIMEOUT) -> Outcome:
        """Barrier: a roster get answered by the server. Prosody handles one session's
        stanzas in order and local routing is synchronous, so once this returns, every
        local effect of what this client sent before (and stanzas the server sent to it
        as a result) has happened/arrived. Timers and s2s are not covered."""
        iq = self.Iq()
        iq["type"] = "get"
        iq.append(_el(f"{{{NS_ROSTER}}}query"))
        return await _send_iq(self, iq, timeout)


async def login(
    port: int,
    jid: str,
    password: str,
    *,
    presence: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> Client:
    """Connect, authenticate (SASL over plaintext loopback), bind; returns the Client or raises LoginError.

    With presence=True the roster is fetched and initial presence is sent, so the
    session is "available" and receives subscription requests live.
    """
    c = Client(jid, password)
    _live_clients.add(c)
    loop = asyncio.get_running_loop()
    started: asyncio.Future = loop.create_future()

    def done(kind):
        def cb(ev=None):
            if not started.done():
                started.set_result((kind, ev))

        return cb

    c.add_event_handler("session_start", done("ok"))
    c.add_event_handler("failed_all_auth", done("auth-failed"))
    c.add_event_handler("no_auth", done("no-auth"))
    c.add_event_handler("connection_failed", done("connection-failed"))
    c.add_event_handler("disconnected", done("disconnected"))
    c.connect(LOOPBACK, port)
    try:
        kind, ev = await asyncio.wait_for(started, timeout)
    except asyncio.TimeoutError:
        await _shutdown(c)
        raise LoginError(f"login {jid}: timeout after {timeout}s")
    if kind != "ok":
        await _shutdown(c)
        raise LoginError(f"login {jid}: {kind} {ev!r}")
    if presence:
        await asyncio.wait_for(c.get_roster(), timeout)
        c.send_presence()
        await c.roundtrip(timeout)
    return c


async def login_fails(port: int, jid: str, password: str, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """True when login is refused (auth failure), False when it succeeds."""
    try:
        c = await login(port, jid, password, presence=False, timeout=timeout)
    except LoginError:
        return True
    await _shutdown(c)
    return False


async def roster(client: Client, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Fetch the roster: {bare_jid: {'subscription':..., 'ask':..., 'name':..., 'groups': [...]}}."""
    iq = client.Iq()
    iq["type"] = "get"
    iq.append(_el(f"{{{NS_ROSTER}}}query"))
    out = await _send_iq(client, iq, timeout)
    if not out.ok:
        raise RuntimeError(f"roster fetch failed: {out!r}")
    xml = ET.fromstring(out.raw)
    items = {}
    for item in xml.iter(f"{{{NS_ROSTER}}}item"):
        items[item.get("jid")] = {
            "subscription": item.get("subscription", "none"),
            "ask": item.get("ask"),
            "name": item.get("name"),
            "groups": [g.text for g in item.findall(f"{{{NS_ROSTER}}}group")],
        }
    return items


def send_presence_raw(client: Client, to: str, ptype: str | None = None, children=()) -> None:
    p = client.Presence()
    p["to"] = to
    if ptype:
        p["type"] = ptype
    for ch in children:
        p.append(ch)
    client.send(p)


def send_subscribe_with_preauth(client: Client, to: str, token: str | None) -> None:
    """<presence type='subscribe' to=to><preauth xmlns='urn:xmpp:pars:0' token=token/></presence>
    (no preauth child when token is None)."""
    send_presence_raw(client, to, "subscribe", [preauth_element(token)] if token is not None else [])


@dataclass
class HookResult:
    ok: bool
    raised: bool
    value: Any
    err: Any
    values: list
    raw: dict = field(repr=False)

    def __getitem__(self, k):
        return self.raw.get(k)


class HookError(RuntimeError):
    pass


async def call_hook(client: Client, fn: str, *args, timeout: float = DEFAULT_TIMEOUT) -> HookResult:
    """Call fn(*args) in mod_invites (or a testhook helper) via mod_invites_testhook."""
    iq = client.Iq()
    iq["type"] = "set"
    iq["to"] = client.boundjid.domain
    iq.append(_el(f"{{{NS_TEST}}}call", {"fn": fn}, json.dumps(list(args))))
    out = await _send_iq(client, iq, timeout)
    if not out.ok:
        raise HookError(f"call_hook {fn}: {out!r}")
    xml = ET.fromstring(out.raw)
    res = xml.find(f"{{{NS_TEST}}}result")
    if res is None:
        raise HookError(f"call_hook {fn}: no result element in {out.raw}")
    data = json.loads(res.text or "{}")
    return HookResult(
        ok=bool(data.get("ok")),
        raised=bool(data.get("raised")),
        value=data.get("value"),
        err=data.get("err"),
        values=data.get("values") or [],
        raw=data,
    )


# --------------------------------------------------------------------- cleanup


async def _shutdown(c: ClientXMPP, wait: float = 1.0):
    _live_clients.discard(c)
    try:
        c.cancel_connection_attempt()
    except Exception:
        pass
    try:
        if c.transport is not None and not c.transport.is_closing():
            await asyncio.wait_for(c.disconnect(wait=wait), wait + 1)
    except Exception:
        pass
    try:
        c.abort()
    except Exception:
        pass
    # Let slixmpp's outgoing-queue task finish cancelling, or asyncio complains
    # "Task was destroyed but it is pending" when the client is collected.
    tasks = [t for t in (getattr(c, "_run_out_filters", None),) if t is not None and not t.done()]
    for t in tasks:
        t.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=wait)


async def close_all():
    """Disconnect every client created by this module that is still open."""
    clients = list(_live_clients)
    if clients:
        await asyncio.gather(*(_shutdown(c) for c in clients), return_exceptions=True)
    _live_clients.clear()


def run(coro, timeout: float = 60.0):
    """Run a coroutine to completion in a fresh event loop with an overall timeout,
    closing every client afterwards."""

    async def main():
        try:
            return await asyncio.wait_for(coro, timeout)
        finally:
            await close_all()

    return asyncio.run(main())
