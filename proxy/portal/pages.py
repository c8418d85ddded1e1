"""The portal's pages: Jinja2 templates (templates/), autoescaped, and the
QR code as an inline PNG.

Jinja2 rather than ``twisted.web.template``: the pages are plain HTML files a
designer can read and change, one base layout the others extend, and
autoescaping of every value (``StrictUndefined`` turns a misspelt variable
into an error in the tests instead of an empty string on a page). Rendering
is synchronous and pure, so the pages are testable without a reactor.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


@dataclass(frozen=True)
class Branding:
    issuer: str
    digits: int = 6
    period: int = 30


def render(name: str, branding: Branding, **values: Any) -> bytes:
    values.setdefault("issuer", branding.issuer)
    values.setdefault("digits", branding.digits)
    values.setdefault("period", branding.period)
    return _env.get_template(name).render(**values).encode("utf-8")


def grouped(key: str, size: int = 4) -> str:
    """A base32 key in groups of four, as people type it."""
    return " ".join(key[i:i + size] for i in range(0, len(key), size))


def qr_data_uri(uri: str) -> str:
    """The ``otpauth://`` URI as a QR code: a PNG in a ``data:`` URI (CSP allows
    ``img-src data:``; nothing is fetched, the key never sits in a URL path)."""
    import qrcode

    qr = qrcode.QRCode(border=2, box_size=8)
    qr.add_data(uri)
    qr.make(fit=True)
    image = io.BytesIO()
    qr.make_image().save(image)
    return "data:image/png;base64," + base64.b64encode(image.getvalue()).decode("ascii")


def stylesheet() -> bytes:
    return (STATIC / "portal.css").read_bytes()
