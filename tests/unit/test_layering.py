"""Imports go one way: proxy → policy → backends, and the LDAP wire package is a leaf
that both LDAP sides share (read from the source, nothing imported)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(package: str) -> dict[str, set[str]]:
    """Every module each file of ``package`` imports, module-level or not."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path} imports {name}"
            for path, names in imported_modules(package).items()
            for name in sorted(names)
            if any(name == f or name.startswith(f + ".") for f in forbidden)]


@pytest.mark.parametrize(("package", "forbidden"), [
    ("backends", ("proxy", "policy")),
    ("policy", ("proxy", "backends.ldapwire")),
    ("backends/ldapwire", ("backends.ldap_async", "backends.ldap_client",
                           "backends.ldap_links", "backends.ldap", "backends.ldap_common")),
])
def test_imports_go_one_way(package: str, forbidden: tuple[str, ...]) -> None:
    assert offenders(package, forbidden) == []


SHIMS = ("proxy/ldap/ber.py", "proxy/ldap/tls.py")


def imports_a_shim(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            if any(a.name in ("proxy.ldap.ber", "proxy.ldap.tls") for a in node.names):
                return True
        elif isinstance(node, ast.ImportFrom):
            if node.module in ("proxy.ldap.ber", "proxy.ldap.tls"):
                return True
            if node.module == "proxy.ldap" and {a.name for a in node.names} & {"ber", "tls"}:
                return True
    return False


def test_the_wire_format_comes_from_backends_ldapwire() -> None:
    # proxy/ldap/ber.py and tls.py only re-export backends.ldapwire, for server.py alone.
    for shim in SHIMS:
        tree = ast.parse((ROOT / shim).read_text())
        imports = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        assert all(isinstance(n, ast.ImportFrom) and (n.module or "").startswith(
            "backends.ldapwire") for n in imports), shim
        assert not [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
    users = [str(path.relative_to(ROOT)) for folder in ("proxy", "backends", "tests", "bench")
             for path in sorted((ROOT / folder).rglob("*.py")) if imports_a_shim(path)]
    assert users == ["proxy/ldap/server.py"]
