"""Config text the tests start from: the smallest file `serve` and the admin
commands accept (SQLite state under var/, the local users file), and the usual
sections added to it. A test adds or replaces what it is about."""

from __future__ import annotations

# The users file is "users.toml" beside the config: a test writes it (may be empty).
STATE_AND_LOCAL_DIRECTORY = """\
[state]
url = "sqlite:///var/state.db"
key_file = "var/secret.key"

[directory]
type = "local"
users_file = "users.toml"
"""

NAS_SECRET = "a-long-enough-radius-secret"


def radius_section(port: int, nas_secret: str = NAS_SECRET, name: str = "vpn",
                   address: str = "127.0.0.0/8") -> str:
    return f"""
[radius]
listen = ["127.0.0.1:{port}"]

[[radius.clients]]
name = "{name}"
address = "{address}"
secret = "{nas_secret}"
"""


def http_section(port: int) -> str:
    return f'\n[http]\nlisten = "127.0.0.1:{port}"\n'
