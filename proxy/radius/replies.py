"""Reply attributes by directory group (``[[radius.reply]]``).

Rules are encoded once, when the server starts (a bad attribute name or
value fails then, naming it), so an Access-Accept only concatenates bytes.
Every rule whose group the user is in applies, in configured order. A rule's
``group`` is a group's name (the first RDN value of its DN: ``vpn-users``
for ``cn=vpn-users,ou=groups,…``, in any group under that name) or its full
DN (that group only), compared case-insensitively
(:func:`backends.base.group_names`). A client with no rule makes the core
search no groups (``uses_groups``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pyrad.dictionary import Dictionary

from backends.base import group_key
from backends.base import group_names as group_names
from proxy.radius.clients import ReplyRuleLike, rule_pairs
from proxy.radius.packet import encode_named


@dataclass(frozen=True)
class _Compiled:
    group: str  # casefolded
    attributes: bytes


class ReplyAttributes:
    """Compiled reply rules: groups in, encoded attributes out."""

    def __init__(self, rules: Sequence[ReplyRuleLike], dictionary: Dictionary) -> None:
        self._rules = tuple(_compile(rule, dictionary) for rule in rules)

    def for_groups(self, groups: Iterable[str]) -> bytes:
        if not self._rules:
            return b""
        names = group_names(groups)
        return b"".join(r.attributes for r in self._rules if r.group in names)

    def __len__(self) -> int:
        return len(self._rules)

    @property
    def uses_groups(self) -> bool:
        """Whether an accept needs the entry's groups (``AuthRequest.needs_groups``)."""
        return bool(self._rules)


def _compile(rule: ReplyRuleLike, dictionary: Dictionary) -> _Compiled:
    try:
        encoded = encode_named(dictionary, rule_pairs(rule))
    except ValueError as exc:
        raise ValueError(f"radius.reply (group {rule.group!r}): {exc}") from None
    return _Compiled(group_key(rule.group), encoded)
