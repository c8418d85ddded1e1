"""One user, one name: how a typed name becomes the name the directory is asked for.

This is not what makes the MFA identity: the core resolves every name to its
directory entry and keys all state by the entry's own name (normalised here
too, so admin commands and the directory agree). Normalising the typed name
(NFKC, case-folded, ``DOMAIN\\`` and ``@realm`` dropped) only makes more
spellings find their entry; a spelling that finds none creates no state.
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

    def lookup_form(self, raw: str) -> str:
        """A typed name as the directory is asked for it: NFKC, without domain or
        realm, but not case-folded -- the directory folds case its own way, and
        Python's folding differs from it (``İ`` folds to ``i`` + a combining dot).
        InvalidUsername when there is no name left, or a control character in it."""
        name = unicodedata.normalize("NFKC", raw).strip()
        if self.strip_domain and "\\" in name:
            name = name.rsplit("\\", 1)[1]
        if self.strip_realm and "@" in name:
            name = name.split("@", 1)[0]
        name = name.strip()
        _check(name)
        return name

    def normalize(self, raw: str) -> str:
        """A typed name as a state key (when no directory entry can tell)."""
        return self.canonical(self.lookup_form(raw))

    def canonical(self, stored: str) -> str:
        """The state key of a directory entry, from its own username value.

        No domain or realm is dropped: two entries named ``alice@a.example``
        and ``alice@b.example`` are two identities. Case and compatibility
        forms fold as in :meth:`normalize`, so ``user require Alice`` and the
        entry ``uid=alice`` agree.
        """
        name = unicodedata.normalize("NFKC", stored).strip()
        if self.lowercase:
            name = unicodedata.normalize("NFKC", name.casefold())
        _check(name)
        return name


def _check(name: str) -> None:
    if not name or len(name) > MAX_USERNAME:
        raise InvalidUsername("empty or too long username")
    # str.isprintable() is False for every C* (and Z*) character: a C-speed pass
    # for the common name, the per-character look only for the rest.
    if not name.isprintable() and any(unicodedata.category(c).startswith("C") for c in name):
        raise InvalidUsername("control characters in username")

