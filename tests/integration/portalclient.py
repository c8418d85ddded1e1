"""A scripted browser for the portal: http.client, a cookie jar, no redirects
followed unless asked, the page's hidden CSRF token and ids read from its HTML.

    web = PortalClient(port)
    page = web.get("/")                       # Page: status, headers, cookies, body
    page = web.login("alice", "alice-pw")     # the form's own CSRF token
    page.status == 303; web.follow(page)      # GET its Location
    page.by_id("mfa-status")["data-status"]
"""

from __future__ import annotations

import http.client
import re
import ssl
from dataclasses import dataclass, field
from html.parser import HTMLParser
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import urlencode


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.by_id: dict[str, dict[str, str]] = {}
        self.text_of: dict[str, list[str]] = {}
        self.hidden: dict[str, str] = {}
        self.inputs: list[dict[str, str]] = []
        self._open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        a["_tag"] = tag
        if "id" in a:
            self.by_id[a["id"]] = a
            self.text_of[a["id"]] = []
        if tag == "input":
            self.inputs.append(a)
            if a.get("type") == "hidden":
                self.hidden[a.get("name", "")] = a.get("value", "")
        elif "id" in a:
            self._open.append(a["id"])
        else:
            self._open.append("")

    def handle_endtag(self, tag: str) -> None:
        if self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for element in self._open:
            if element:
                self.text_of[element].append(data)


@dataclass
class Page:
    status: int
    headers: dict[str, list[str]]
    body: str
    elements: _Elements = field(repr=False)

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def by_id(self, element_id: str) -> dict[str, str]:
        return self.elements.by_id[element_id]

    def has(self, element_id: str) -> bool:
        return element_id in self.elements.by_id

    def text(self, element_id: str) -> str:
        return " ".join("".join(self.elements.text_of[element_id]).split())

    @property
    def csrf(self) -> str:
        return self.elements.hidden["csrf_token"]

    @property
    def input_names(self) -> set[str]:
        return {i.get("name", "") for i in self.elements.inputs}

    @property
    def set_cookies(self) -> list[str]:
        return self.headers.get("set-cookie", [])


class PortalClient:
    def __init__(self, port: int, host: str = "127.0.0.1", tls: bool = False) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.cookies: dict[str, str] = {}
        self.last: Page | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self.tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return http.client.HTTPSConnection(self.host, self.port, timeout=15,
                                               context=context)
        return http.client.HTTPConnection(self.host, self.port, timeout=15)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, cookies: bool = True) -> Page:
        conn = self._connection()
        h = dict(headers or {})
        if cookies and self.cookies:
            h["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        try:
            conn.request(method, path, body=body, headers=h)
            answer = conn.getresponse()
            raw = answer.read()
            got: dict[str, list[str]] = {}
            for k, v in answer.getheaders():
                got.setdefault(k.lower(), []).append(v)
        finally:
            conn.close()
        for line in got.get("set-cookie", []):
            jar: SimpleCookie = SimpleCookie()
            jar.load(line)
            for name, morsel in jar.items():
                if morsel["max-age"] == "0" or not morsel.value:
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        text = raw.decode("utf-8", "replace")
        elements = _Elements()
        if "html" in (got.get("content-type") or [""])[0]:
            elements.feed(text)
        page = Page(answer.status, got, text, elements)
        self.last = page
        return page

    def get(self, path: str = "/") -> Page:
        return self.request("GET", path)

    def post(self, path: str, fields: dict[str, str], csrf: bool = True,
             **kw: Any) -> Page:
        data = dict(fields)
        if csrf and "csrf_token" not in data and self.last is not None:
            data["csrf_token"] = self.last.elements.hidden.get("csrf_token", "")
        return self.request("POST", path, urlencode(data).encode(),
                            {"Content-Type": "application/x-www-form-urlencoded"}, **kw)

    def follow(self, page: Page) -> Page:
        assert page.status in (302, 303), (page.status, page.body[:500])
        location = page.header("location")
        assert location is not None
        return self.get(location)

    # -- the flows

    def login(self, username: str, password: str) -> Page:
        form = self.get("/")
        assert form.status == 200 and {"username", "password"} <= form.input_names, form.body
        return self.post("/login", {"username": username, "password": password})

    def login_with_code(self, username: str, password: str, code: str) -> Page:
        page = self.follow(self.login(username, password))
        assert "code" in page.input_names, page.body
        return self.post("/login/code", {"code": code})

    def start_setup(self, button: str = "setup-mfa") -> Page:
        account = self.get("/")
        assert account.has(button), account.body
        page = self.post("/setup/start", {})
        return self.follow(page)

    def secret(self, page: Page) -> str:
        return re.sub(r"\s+", "", page.text("totp-secret"))
