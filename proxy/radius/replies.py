"""Reply attributes by directory group (``[[radius.reply]]``).

Rules are encoded once, when the server starts (a bad attribute name or
value fails then, naming it), so an Access-Accept only concatenates bytes.
Every rule whose group the user is in applies, in configured order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pyrad.dictionary import Dictionary

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


def _compile(rule: ReplyRuleLike, dictionary: Dictionary) -> _Compiled:
    try:
        encoded = encode_named(dictionary, rule_pairs(rule))
    except ValueError as exc:
        raise ValueError(f"radius.reply (group {rule.group!r}): {exc}") from None
    return _Compiled(rule.group.casefold(), encoded)


def group_names(groups: Iterable[str]) -> set[str]:
    """Names a rule's ``group`` may match: each group as given and, for a DN,
    its first RDN value (``cn=VPN Users,ou=groups,...`` → ``vpn users``);
    case-insensitive, as directories compare group names."""
    names = set()
    for group in groups:
        names.add(group.casefold())
        first, _, _ = group.partition(",")
        attribute, equals, value = first.partition("=")
        if equals and attribute.strip() and value.strip():
            names.add(value.strip().casefold())
    return names
