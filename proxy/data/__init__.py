"""What the product ships besides code, read with ``importlib.resources``:
the RADIUS dictionary, the default config and the example configs, and for
operations the Grafana dashboard (``grafana/mfa-proxy.json``), the Prometheus
alert rules (``prometheus/mfa-proxy-rules.yml``) and the systemd unit
(``systemd/mfa-proxy.service``).

In the repository these are symbolic links into ``conf/``, where the files
live (one copy): ``conf/mfa-proxy.toml`` is the checkout's own default config
and a config's relative paths are relative to its real folder, so it cannot
be a link itself; the wheel gets the files (setuptools copies a link's
target).
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable

DATA: Traversable = files(__name__)


def example_names() -> list[str]:
    """The packaged example configs, by name (``ldap`` for ``examples/ldap.toml``)."""
    return sorted(p.name.removesuffix(".toml") for p in DATA.joinpath("examples").iterdir()
                  if p.name.endswith(".toml"))


def config_text(example: str | None = None) -> str:
    """The packaged default config, or the example of that name."""
    name = "mfa-proxy.toml" if example is None else f"examples/{example}.toml"
    return DATA.joinpath(*name.split("/")).read_text(encoding="utf-8")


SHIPPED = ("grafana/mfa-proxy.json", "prometheus/mfa-proxy-rules.yml",
           "systemd/mfa-proxy.service")


def shipped_text(name: str) -> str:
    """One of :data:`SHIPPED` (the operations files), as text."""
    if name not in SHIPPED:
        raise KeyError(name)
    return DATA.joinpath(*name.split("/")).read_text(encoding="utf-8")
