"""Helpers for the HTTP tests: a Prosody with its web modules, a plain HTTP client and
a headless Chromium driven by Selenium.

Needs (see the report / .ci/deps):
  apt: chromium chromium-driver libjs-bootstrap4 (the last only for styled screenshots)
  pip: selenium

Every wait here is bounded: WebDriverWait with an explicit timeout, page-load and
script timeouts on the driver, socket timeouts on HTTP requests. Nothing sleeps.
"""

from __future__ import annotations

import base64
import http.client
import os
import re
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import harness

LOOPBACK = harness.LOOPBACK
SCREENSHOT_DIR = harness.REPO / "build" / "screenshots"

CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_BIN", "/usr/bin/chromedriver")

# How long one page load / one wait for a page's content may take (seconds).
PAGE_TIMEOUT = float(os.environ.get("WEB_PAGE_TIMEOUT", "20"))

SITE_NAME = "Invites Test"

# Modules for the landing page and web registration (added to the harness's list, which
# already has invites and invites_register). invites_page pulls register_apps itself;
# it is listed for clarity. http_libjs serves /share/ (Bootstrap and jQuery from
# /usr/share/javascript) so the pages look as they would on a real server.
WEB_MODULES = ("http", "invites_page", "register_apps", "invites_register_web", "http_libjs")


def web_options(http_port: int) -> dict:
    """Global options for an HTTP server on 127.0.0.1:http_port whose URLs point there.

    * http_default_host: requests carry ``Host: 127.0.0.1:PORT``; route them to the
      VirtualHost "localhost", where the apps live.
    * http_external_url: module:http_url() (the base of the landing page's links and of
      mod_invites_register_web's redirects) becomes http://127.0.0.1:PORT/...
    * invites_page: the landing page template. Needed for ``prosodyctl mod_invites
      generate``: under prosodyctl mod_http is not loaded, so mod_invites_page has no
      module:http_url() and, without this option, no landing page at all (generate then
      prints the xmpp: URI).
    """
    base = f"http://{LOOPBACK}:{http_port}"
    return {
        "http_ports": [http_port],
        "http_interfaces": [LOOPBACK],
        "http_default_host": harness.HOST,
        "http_external_url": base + "/",
        "invites_page": base + "/invites_page?{invite.token}",
        "site_name": SITE_NAME,
    }


@dataclass
class WebServer:
    server: harness.ProsodyServer
    http_port: int

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"


def start_web_server(make_server, *, extra_modules=(), options=None, **kw) -> WebServer:
    """make_server(...) with an HTTP port and the given modules; a fresh HTTP port is
    tried again if the first one was taken in the meantime."""
    last = None
    for _attempt in range(3):
        http_port = harness.free_port()
        opts = web_options(http_port)
        opts.update(options or {})
        try:
            srv = make_server(extra_modules=list(extra_modules), options=opts, **kw)
        except harness.HarnessError as e:  # HTTP port lost between free_port() and bind
            if "could not bind" not in str(e) and "Failed to open server port" not in str(e):
                raise
            last = e
            continue
        return WebServer(srv, http_port)
    raise harness.HarnessError(f"could not bind an HTTP port: {last}")


# ------------------------------------------------------------------ plain HTTP


@dataclass
class HttpResponse:
    status: int
    headers: dict = field(default_factory=dict)  # lower-case names
    body: str = ""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def http_request(url: str, method: str = "GET", headers: dict | None = None, body: str | None = None,
                 timeout: float = 10.0, source_address: str | None = None) -> HttpResponse:
    """One request, no redirects followed (so 201/303 and their Location can be checked).

    source_address: the local address to connect from (e.g. "127.0.0.2": on Linux every
    127.0.0.0/8 address is on loopback, so the server sees another client address).
    """
    u = urllib.parse.urlsplit(url)
    assert u.scheme == "http", url
    conn = http.client.HTTPConnection(
        u.hostname, u.port or 80, timeout=timeout,
        source_address=(source_address, 0) if source_address else None,
    )
    try:
        path = u.path or "/"
        if u.query:
            path += "?" + u.query
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read().decode("utf-8", errors="replace")
        return HttpResponse(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
    finally:
        conn.close()


def token_of_landing_page(url: str) -> str:
    """The invite token of a landing page URL http://HOST/invites_page?TOKEN."""
    query = urllib.parse.urlsplit(url).query
    if not query or "=" in query or "&" in query:
        raise ValueError(f"not a landing page URL with a bare token: {url!r}")
    return urllib.parse.unquote(query)


# -------------------------------------------------------------------- browser


def browser_problem() -> str | None:
    """Why a browser test cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    for path, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} not found (apt-get install {pkg})"
    return None


def screenshot_name(test: str, storage: str, step: str) -> str:
    """<test>-<storage>-<step>.png under Prosody 0.12, prosody13-<test>-… under 13."""
    safe = lambda s: re.sub(r"[^A-Za-z0-9_.-]+", "_", s)  # noqa: E731
    version = "prosody13-" if harness.prosody_major_version() >= 13 else ""
    return f"{version}{safe(test)}-{safe(storage)}-{safe(step)}.png"


class Browser:
    """Headless Chromium (Debian's) through chromedriver, with a fresh profile.

    Only loopback is reachable: every other host name resolves to "not found" at once,
    so pages that reference app-store images do not wait on the network.
    """

    def __init__(self, screenshot_prefix: tuple[str, str] | None = None, timeout: float = PAGE_TIMEOUT):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.timeout = timeout
        self.screenshot_prefix = screenshot_prefix
        self.screenshots: list[Path] = []
        self.profile_dir = tempfile.mkdtemp(prefix="chromium-profile-")
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for arg in (
            "--headless=new",
            "--no-sandbox",  # running as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,900",
            f"--user-data-dir={self.profile_dir}",
            f"--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE {LOOPBACK}",
        ):
            opts.add_argument(arg)
        # A given chromedriver path keeps Selenium Manager from looking for a driver online.
        service = Service(executable_path=CHROMEDRIVER, log_output=os.devnull)
        try:
            self.driver = webdriver.Chrome(service=service, options=opts)
        except BaseException:
            shutil.rmtree(self.profile_dir, ignore_errors=True)
            raise
        self.driver.set_page_load_timeout(timeout)
        self.driver.set_script_timeout(timeout)

    # -- navigation and waiting

    def open(self, url: str):
        self.driver.get(url)

    def wait(self, condition, what: str, timeout: float | None = None):
        """WebDriverWait(condition); on timeout the message says what was awaited and where we are."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout or self.timeout).until(condition)
        except TimeoutException:
            raise AssertionError(
                f"timed out after {timeout or self.timeout}s waiting for {what}; "
                f"url={self.driver.current_url!r} title={self.driver.title!r}\n"
                f"page text:\n{self.body_text()[:2000]}"
            ) from None

    def wait_for_text(self, text: str, timeout: float | None = None) -> str:
        """Wait until the page body shows `text`; returns the body text."""
        self.wait(lambda d: text in self._body_text_or_empty(), f"page text {text!r}", timeout)
        return self.body_text()

    def wait_for_url(self, pattern: str, timeout: float | None = None) -> str:
        rx = re.compile(pattern)
        self.wait(lambda d: rx.search(d.current_url), f"URL matching {pattern!r}", timeout)
        return self.driver.current_url

    def _body_text_or_empty(self) -> str:
        from selenium.common.exceptions import WebDriverException

        try:
            return self.driver.find_element("tag name", "body").text
        except WebDriverException:  # page being replaced
            return ""

    def body_text(self) -> str:
        return self._body_text_or_empty()

    @property
    def title(self) -> str:
        return self.driver.title

    @property
    def url(self) -> str:
        return self.driver.current_url

    def find(self, by: str, value: str):
        return self.driver.find_element(by, value)

    # -- forms

    def fill_and_submit(self, fields: dict[str, str], submit_css: str = "form button[type=submit]"):
        """Type into the named inputs and click submit; waits until the old page is gone."""
        for name, value in fields.items():
            el = self.driver.find_element("name", name)
            el.clear()
            el.send_keys(value)
        # Mark the current document; a freshly loaded page does not carry the mark. (Selenium's
        # staleness_of races with the navigation: Chromium may answer "node does not belong to
        # the document" instead of "stale element", which staleness_of does not catch.)
        self.driver.execute_script("window.__invites_old_page = true;")
        self.driver.find_element("css selector", submit_css).click()
        self.wait(self._new_document_loaded, "the form submission to load a new page")

    def _new_document_loaded(self, driver) -> bool:
        from selenium.common.exceptions import WebDriverException

        try:
            return bool(
                driver.execute_script(
                    "return window.__invites_old_page === undefined && document.readyState === 'complete';"
                )
            )
        except WebDriverException:  # page being replaced
            return False

    # -- tabs

    def new_tab(self) -> str:
        self.driver.switch_to.new_window("tab")
        return self.driver.current_window_handle

    def switch_to(self, handle: str):
        self.driver.switch_to.window(handle)

    @property
    def tab(self) -> str:
        return self.driver.current_window_handle

    # -- screenshots

    def screenshot(self, step: str) -> Path:
        """Whole-page PNG at build/screenshots/ (see screenshot_name)."""
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        test, storage = self.screenshot_prefix or ("browser", "any")
        path = SCREENSHOT_DIR / screenshot_name(test, storage, step)
        # The whole page, not just the viewport (Chromium DevTools: capture beyond the viewport).
        metrics = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
        content = metrics.get("cssContentSize") or metrics["contentSize"]
        width = max(1, int(content["width"]))
        height = max(1, min(int(content["height"]), 8000))
        shot = self.driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
        })
        path.write_bytes(base64.b64decode(shot["data"]))
        self.screenshots.append(path)
        return path

    def quit(self):
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.quit()
