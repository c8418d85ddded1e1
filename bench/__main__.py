"""``python -m bench radius|ldap|audit|admin [options]`` (what ``scripts/bench`` runs)."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: scripts/bench radius|ldap|audit|admin [options]   "
              "(scripts/bench radius --help, scripts/bench ldap --help)")
        return 0 if argv else 2
    if argv[0] == "radius":
        from bench.radius import main as radius

        return radius(argv[1:])
    if argv[0] == "audit":
        from bench.audit import main as audit

        return audit(argv[1:])
    if argv[0] == "admin":
        from bench.admin import main as admin

        return admin(argv[1:])
    if argv[0] == "ldap":
        from bench.ldap import main as ldap

        return ldap(argv[1:])
    print(f"scripts/bench: unknown benchmark {argv[0]!r} (known: radius, ldap, audit, admin)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
