"""One user, one name: usernames are normalised once, before anything counts.

Without this a guesser could dodge the failure counter by changing case or by
adding a domain (``ALICE``, ``EXAMPLE\\alice``, ``alice@example.org``).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

MAX_USERNAME = 256


class InvalidUsername(ValueError):
    pass


@dataclass(frozen=True)
class UsernameRules:
    lowercase: bool = True
    strip_domain: bool = True  # DOMAIN\user -> user
    strip_realm: bool = True  # user@realm -> user

    def normalize(self, raw: str) -> str:
        name = unicodedata.normalize("NFC", raw).strip()
        if self.strip_domain and "\\" in name:
            name = name.rsplit("\\", 1)[1]
        if self.strip_realm and "@" in name:
            name = name.split("@", 1)[0]
        name = name.strip()
        if self.lowercase:
            name = name.casefold()
        if not name or len(name) > MAX_USERNAME:
            raise InvalidUsername("empty or too long username")
        if any(unicodedata.category(c).startswith("C") for c in name):
            raise InvalidUsername("control characters in username")
        return name
