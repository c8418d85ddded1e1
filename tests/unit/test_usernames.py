"""One user, one name: the forms a guesser might use all normalise to one."""

from __future__ import annotations

import pytest

from policy.usernames import MAX_USERNAME, InvalidUsername, UsernameRules

RULES = UsernameRules()


@pytest.mark.parametrize("raw", [
    "alice", "ALICE", "Alice", " alice ", "\talice\n", "EXAMPLE\\alice", "example\\ALICE",
    "alice@example.org", "ALICE@EXAMPLE.ORG", " EXAMPLE\\Alice@example.org ",
    "DOMAIN\\ alice", "alice @realm",
])
def test_every_form_is_alice(raw: str) -> None:
    assert RULES.normalize(raw) == "alice"


def test_unicode_is_normalised_to_nfc_and_casefolded() -> None:
    decomposed = "zo\u0065\u0308"  # e + combining diaeresis
    assert RULES.normalize(decomposed) == "zo\u00eb"
    assert RULES.normalize("ZOË") == "zoë"
    assert RULES.normalize("STRASSE") == RULES.normalize("straße")


def test_rules_can_keep_case_domain_and_realm() -> None:
    keep = UsernameRules(lowercase=False, strip_domain=False, strip_realm=False)
    assert keep.normalize(" EXAMPLE\\Alice ") == "EXAMPLE\\Alice"
    assert keep.normalize("Alice@Example.org") == "Alice@Example.org"
    assert UsernameRules(strip_realm=False).normalize("Alice@X") == "alice@x"
    assert UsernameRules(strip_domain=False).normalize("EX\\Alice") == "ex\\alice"


@pytest.mark.parametrize("raw", [
    "", "   ", "EXAMPLE\\", "@example.org", "ali\x00ce", "ali\nce", "alice\u200b",
    "x" * (MAX_USERNAME + 1), "ali\x85ce", "ali\ue000ce", "ali\U000e0001ce", "ali\u0378ce",
])
def test_invalid_usernames(raw: str) -> None:
    with pytest.raises(InvalidUsername):
        RULES.normalize(raw)


def test_separators_that_are_no_control_characters_are_kept() -> None:
    """Z* characters fail str.isprintable() like C* ones (the fast path's test):
    they still take the per-character look, which lets them through."""
    assert RULES.canonical("ali\u00a0ce") == "ali ce"  # NFKC: no-break space -> space
    assert RULES.canonical("ali\u2028ce") == "ali\u2028ce"


def test_longest_username_is_accepted() -> None:
    assert RULES.normalize("x" * MAX_USERNAME) == "x" * MAX_USERNAME
