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


GONE = ("proxy.ldap.ber", "proxy.ldap.tls")  # the front-end's old copies of the wire format


def imports_a_gone_module(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            if any(a.name in GONE for a in node.names):
                return True
        elif isinstance(node, ast.ImportFrom):
            if node.module in GONE:
                return True
            if node.module == "proxy.ldap" and {a.name for a in node.names} & {"ber", "tls"}:
                return True
    return False


def test_the_wire_format_comes_from_backends_ldapwire() -> None:
    # One LDAP codec for both sides: the front-end keeps neither a copy nor a re-export.
    for module in GONE:
        assert not (ROOT / (module.replace(".", "/") + ".py")).exists(), module
    users = [str(path.relative_to(ROOT)) for folder in ("proxy", "backends", "tests", "bench")
             for path in sorted((ROOT / folder).rglob("*.py")) if imports_a_gone_module(path)]
    assert users == []
    assert "backends.ldapwire.messages" in imported_modules("proxy/ldap")["proxy/ldap/server.py"]


def test_the_ldap_session_logic_does_no_io() -> None:
    # h11's rule: the session state machine takes events and returns actions; the
    # Twisted protocol (server.py) and the connection (upstream.py) do the I/O.
    imports = imported_modules("proxy/ldap")
    io = ("twisted", "zope", "socket", "asyncio", "proxy.ldap.server", "proxy.ldap.upstream",
          "backends.ldapwire.transport", "backends.ldapwire.connect", "proxy.metrics")
    for path in ("proxy/ldap/session.py", "proxy/ldap/upstream_session.py", "proxy/ldap/bind.py"):
        names = imports[path] - {"twisted.internet.defer"} if path.endswith("bind.py") else \
            imports[path]
        assert [n for n in sorted(names) if any(n == m or n.startswith(m + ".") for m in io)] \
            == [], path
    # bind.py only names the core's timeout and cancellation errors from Twisted
    source = (ROOT / "proxy/ldap/bind.py").read_text()
    assert "from twisted.internet.defer import CancelledError\n" in source


STORE_MODULES = {"policy/schema.py", "policy/hot_store.py", "policy/admin_store.py",
                 "policy/store.py"}
# Names that read no table: errors to catch, and URL parsing (`db backup`, check-config).
HARMLESS_SQLALCHEMY = {"sqlalchemy.exc", "sqlalchemy.engine"}


def test_only_the_store_modules_write_sql() -> None:
    # The sign-in path's statements (hot_store) and the admin's (admin_store) on one
    # schema (schema): nothing else builds a query; the migrations are the schema's own.
    writers = [f"{path} imports {name}"
               for package in ("policy", "proxy", "backends")
               for path, names in imported_modules(package).items()
               for name in sorted(names)
               if (name == "sqlalchemy" or name.startswith("sqlalchemy."))
               and name not in HARMLESS_SQLALCHEMY and path not in STORE_MODULES
               and not path.startswith("policy/migrations/")]
    assert writers == []
