"""TOML → typed settings. Every problem names its key; all are reported at once.

Relative paths are relative to the config file's folder, so a config works
wherever it is started from. Without ``-c`` the file is found by
:func:`find_config`: ``$MFA_PROXY_CONFIG``, ``./conf/mfa-proxy.toml``,
``/etc/mfa-proxy/mfa-proxy.toml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import ipaddress
import os
import secrets
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from backends.ldap_common import LdapOptions
from policy.decision import MfaMode
from proxy.addresses import Address, parse_address
from proxy.ldap.config import BindCacheRule, LdapFrontendConfig
from proxy.mail.config import SECURITY, MailConfig, parse_server
from proxy.radius.clients import ClientTable, RadiusClientConfig

T = TypeVar("T")

CONFIG_ENV = "MFA_PROXY_CONFIG"
# Where a config is looked for, after $MFA_PROXY_CONFIG: the first is relative to the
# working directory (a checkout, where scripts/serve runs; `mfa-proxy init-config`
# writes there), the second is the system-wide place (the container image's mount).
CONFIG_SEARCH_PATH = (Path("conf/mfa-proxy.toml"), Path("/etc/mfa-proxy/mfa-proxy.toml"))
POSTGRES_EXTRA = "pip install 'mfa-proxy[postgres]'"
MFA_MODES = ("enrolled", "strict", "off")
RADIUS_MODES = ("append", "challenge", "auto")
ENROLLMENT_NOTICES = ("reply-message", "challenge", "none")
LOG_FORMATS = ("text", "json")


class ConfigError(Exception):
    """A config that cannot be used. ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class StateSettings:
    url: str
    key_file: Path
    threads: int = 4


@dataclass(frozen=True)
class TotpSettings:
    issuer: str = "mfa-proxy"
    digits: int = 6
    period: int = 30
    window: int = 1


@dataclass(frozen=True)
class PolicySettings:
    max_failures: int = 5
    lockout_seconds: int = 900
    enrollment_days: int = 7
    recovery_codes: bool = True  # `user recovery-codes`; False: none made, none accepted
    audit_days: int = 90
    # How to set MFA up, told in the enrollment notices when there is no portal
    # ([portal] public_url wins when set).
    enrollment_help: str = ""
    # Members of these directory groups (a name or a full DN) are required at
    # their first sign-in, with an enrollment period of enrollment_days from then.
    require_groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class DirectorySettings:
    """The ``[directory]`` section: which directory, and how typed names are read.

    An LDAP directory's options are parsed once, into the type its client uses
    (``backends.ldap_common.LdapOptions``), and checked with that type's own
    ``problems()`` -- the checks ``serve`` relies on are the checks
    ``check-config`` runs."""

    type: str = "local"
    users_file: Path | None = None
    ldap: LdapOptions | None = None  # type = "ldap"
    lowercase_usernames: bool = True
    strip_domain: bool = True  # DOMAIN\user -> user
    strip_realm: bool = True  # user@realm -> user


@dataclass(frozen=True)
class ReplyRule:
    group: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class RadiusSettings:
    listen: tuple[Address, ...] = ()
    accounting_listen: tuple[Address, ...] = ()
    mode: str = "auto"
    separator: str = ","
    require_message_authenticator: bool = True
    challenge_timeout: int = 120
    duplicate_window: int = 30
    clients: tuple[RadiusClientConfig, ...] = ()  # the RADIUS front-end's own type
    reply: tuple[ReplyRule, ...] = ()
    # A RADIUS dictionary of the operator's instead of the shipped one (vendor
    # attributes for reply rules); None: the shipped one.
    dictionary: Path | None = None


@dataclass(frozen=True)
class HttpSettings:
    listen: Address | None = None
    # Who sees why /readyz is not ready (URLs, errors): loopback always, plus these.
    admin_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True)
class PortalSettings:
    """``[portal]``: the self-service enrollment portal (its own listener)."""

    listen: Address
    cert_file: Path | None = None  # TLS when both are set
    key_file: Path | None = None
    public_url: str = ""  # in mails and in the RADIUS/LDAP enrollment notices
    session_minutes: int = 15  # idle timeout of a portal session

    @property
    def tls(self) -> bool:
        return self.cert_file is not None and self.key_file is not None


@dataclass(frozen=True)
class ServiceSettings:
    """``[service]``: the process itself."""

    # SIGTERM/SIGINT: how long in-flight decisions may take to finish before the
    # process exits anyway (/readyz is 503 from the signal on).
    shutdown_grace_seconds: float = 10.0
    # Linux: the CPUs serve's threads run on (empty: wherever the OS puts them).
    # The reactor and the state thread share one GIL, so the process runs Python
    # on one core at a time; kept on one CPU, each hand-over of the GIL between
    # them stays on that core instead of crossing to the other one.
    cpu_affinity: tuple[int, ...] = ()


@dataclass(frozen=True)
class Settings:
    path: Path
    state: StateSettings
    totp: TotpSettings
    policy: PolicySettings
    directory: DirectorySettings
    radius: RadiusSettings | None
    ldap: LdapFrontendConfig | None
    http: HttpSettings
    log_level: str = "info"
    # "rejects": one line per refused attempt (accepts are in the audit table);
    # "all": a line per decision, accepts too (costs CPU on a busy proxy).
    log_decisions: str = "rejects"
    warnings: tuple[str, ...] = field(default_factory=tuple)
    portal: PortalSettings | None = None  # None: no portal
    log_format: str = "text"  # [logging] format: "text" lines or "json" objects
    service: ServiceSettings = field(default_factory=lambda: ServiceSettings())
    mail: MailConfig | None = None  # None: no mail


class _Reader:
    """Walks one TOML table, collecting problems instead of stopping at the first."""

    def __init__(self, cfg: _Loader, prefix: str, table: dict[str, Any]) -> None:
        self.cfg, self.prefix, self.table = cfg, prefix, table
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def problem(self, name: str, message: str) -> None:
        self.cfg.problems.append(f"{self.key(name)}: {message}")

    def _get(self, name: str, kinds: tuple[type, ...], what: str, default: T) -> Any:
        self.seen.add(name)
        if name not in self.table:
            return default
        value = self.table[name]
        # bool is an int in Python; TOML keeps them apart, and so do we
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            self.problem(name, f"expected {what}, got {_toml_type(value)} {value!r}")
            return default
        return value

    def str(self, name: str, default: str = "", choices: tuple[str, ...] = ()) -> str:
        value: str = self._get(name, (str,), "a string", default)
        if choices and value not in choices:
            self.problem(name, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
            return default
        return value

    def int(self, name: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
        value: int = self._get(name, (int,), "an integer", default)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            self.problem(name, f"must be between {lo} and {hi if hi is not None else '∞'}, "
                               f"got {value}")
            return default
        return value

    def float(self, name: str, default: float, lo: float = 0.0, hi: float | None = None) -> float:
        value = self._get(name, (int, float), "a number", default)
        if value < lo or (hi is not None and value > hi):
            self.problem(name, f"must be between {lo} and {hi}, got {value}")
            return default
        return float(value)

    def bool(self, name: str, default: bool) -> bool:
        value: bool = self._get(name, (bool,), "true or false", default)
        return value

    def str_list(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self._get(name, (list, str), "a list of strings", list(default))
        if isinstance(value, str):
            value = [value]
        bad = [v for v in value if not isinstance(v, str)]
        if bad:
            self.problem(name, f"expected a list of strings, found {bad[0]!r}")
            return default
        return tuple(value)

    def path(self, name: str, default: str | None = None) -> Path | None:
        raw = self.str(name, default or "")
        return self.cfg.resolve(raw) if raw else None

    def table_of(self, name: str, required: bool = False) -> _Reader | None:
        self.seen.add(name)
        value = self.table.get(name)
        if value is None:
            if required:
                self.cfg.problems.append(f"{self.key(name)}: missing section [{self.key(name)}]")
            return None
        if not isinstance(value, dict):
            self.problem(name, f"expected a table, got {_toml_type(value)}")
            return None
        return _Reader(self.cfg, self.key(name), value)

    def tables(self, name: str) -> Iterator[_Reader]:
        self.seen.add(name)
        value = self.table.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.problem(name, f"expected [[{self.key(name)}]] tables")
            return
        for i, item in enumerate(value):
            yield _Reader(self.cfg, f"{self.key(name)}[{i}]", item)

    def secret(self, name: str, required: bool, create: bool = False) -> str:
        """A secret given inline or as ``<name>_file``; never both."""
        inline = self.str(name)
        file_key = f"{name}_file"
        path = self.path(file_key)
        if inline and path:
            self.problem(name, f"give either {name} or {file_key}, not both")
            return ""
        if path:
            return self.cfg.read_secret(self.key(file_key), path, create)
        if required and not inline:
            self.problem(name, f"missing (set {name} or {file_key})")
        return inline

    def address(self, name: str, value: str) -> Address | None:
        try:
            return parse_address(value)
        except ValueError as e:
            self.problem(name, str(e))
            return None

    def addresses(self, name: str, default: tuple[str, ...] = ()) -> tuple[Address, ...]:
        out = (self.address(name, v) for v in self.str_list(name, default))
        return tuple(a for a in out if a is not None)

    def done(self) -> None:
        for name in sorted(set(self.table) - self.seen):
            close = difflib.get_close_matches(name, sorted(self.seen), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            self.cfg.problems.append(f"{self.key(name)}: unknown key{hint}")


class _Loader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.parent
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def resolve(self, raw: str) -> Path:
        p = Path(os.path.expanduser(raw))
        return p if p.is_absolute() else (self.base / p).resolve()

    def read_secret(self, key: str, path: Path, create: bool) -> str:
        if not path.exists() and create:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_private_file(path, secrets.token_urlsafe(24) + "\n")
            except OSError as e:
                self.problems.append(f"{key}: cannot create {path}: {e.strerror}")
                return ""
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            self.problems.append(f"{key}: cannot read {path}: {e.strerror}")
            return ""
        if not value:
            self.problems.append(f"{key}: {path} is empty")
        self.check_private(key, path)
        return value

    def check_private(self, key: str, path: Path) -> None:
        """Warn when a file holding a secret (a password, a shared secret, a private
        key, the key file) can be read by other users of the machine."""
        try:
            mode = path.stat().st_mode
        except OSError:
            return  # reported where it is read, or created private later
        if mode & 0o044 and not path.is_dir():
            who = " and ".join(w for w, bit in (("group", 0o040), ("others", 0o004))
                               if mode & bit)
            self.warnings.append(f"{key}: {path} is readable by {who} (mode "
                                 f"{mode & 0o777:o}): it holds a secret; chmod 600 it")


def _toml_type(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)


def write_private_file(path: Path, text: str) -> None:
    """Create a file readable by its owner only (0600), never following a race."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def find_config(environ: Mapping[str, str] = os.environ, cwd: Path | None = None) -> Path:
    """The config file to use when none is given with ``-c``.

    ``$MFA_PROXY_CONFIG`` when set (a missing file is then an error, not a reason to
    try elsewhere: falling back would quietly run another config), else the first of
    :data:`CONFIG_SEARCH_PATH` that exists. Raise ConfigError naming every place
    looked at when there is none."""
    base = cwd or Path.cwd()
    named = environ.get(CONFIG_ENV, "")
    if named:
        path = base / os.path.expanduser(named)
        if not path.exists():
            raise ConfigError([f"{path}: no such file (named by ${CONFIG_ENV})"])
        return path
    for candidate in CONFIG_SEARCH_PATH:
        if (base / candidate).exists():
            return base / candidate
    looked = ", ".join(f"{base / p}" for p in CONFIG_SEARCH_PATH)
    raise ConfigError([f"no config file: ${CONFIG_ENV} is not set and none of {looked} "
                       "exists; give one with -c FILE, or write the packaged default "
                       "with `mfa-proxy init-config` (to ./conf/mfa-proxy.toml)"])


def load(path: Path | str | None = None) -> Settings:
    """Load and validate a config file (by default :func:`find_config`'s); raise
    ConfigError listing every problem."""
    path = Path(path) if path else find_config()
    path = path.resolve()
    loader = _Loader(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from None
    root = _Reader(loader, "", raw)
    settings = _settings(loader, root)
    root.done()
    if loader.problems:
        raise ConfigError(loader.problems)
    assert settings is not None
    return settings


def load_checked(path: Path | str | None = None) -> Settings:
    """:func:`load`, then every check ``serve`` makes before it listens
    (:func:`startup_problems`): what ``serve``, ``check-config`` and a reload
    (SIGHUP) all use, so none of them accepts a file another refuses."""
    settings = load(path)
    problems = startup_problems(settings)
    if problems:
        raise ConfigError(problems)
    return settings


def startup_problems(s: Settings) -> list[str]:
    """What start-up would refuse in a config that :func:`load` accepts, one line
    per problem naming its key: the RADIUS dictionary, reply attributes (names,
    value types), TLS certificates and keys, CA bundles, the key file.

    These need heavier modules (pyrad, OpenSSL) than the admin commands load,
    so they are apart from :func:`load`; ``serve`` builds its listeners from
    the same objects, so a file that passes here is one they accept."""
    problems: list[str] = []
    if s.radius is not None and (s.radius.listen or s.radius.accounting_listen):
        problems += _radius_startup_problems(s.radius)
    for key, cert, key_file in _tls_pairs(s):
        problems += _tls_pair_problems(key, cert, key_file)
    for key, ca in _ca_files(s):
        problems += _ca_problems(key, ca)
    if s.state.key_file.exists():
        from policy.keys import KeyFileError, KeyRing

        try:
            KeyRing(s.state.key_file)
        except KeyFileError as e:
            problems.append(f"state.key_file: {e}")
    return problems


def _radius_startup_problems(r: RadiusSettings) -> list[str]:
    from proxy.radius.packet import encode_named, load_dictionary

    try:
        dictionary = load_dictionary(str(r.dictionary) if r.dictionary else None)
    except Exception as e:  # a broken file (or installation): say so, with the cause
        where = "radius.dictionary" if r.dictionary else "radius"
        return [f"{where}: cannot load the RADIUS dictionary: {type(e).__name__}: {e}"]
    problems = []
    for i, rule in enumerate(r.reply):
        for name, value in rule.attributes.items():
            try:
                encode_named(dictionary, [(name, value)])
            except ValueError as e:
                problems.append(f"radius.reply[{i}].attributes.{name}: {_after_name(name, e)}")
    return problems


def _after_name(name: str, error: ValueError) -> str:
    """encode_named's message without the attribute name it starts with."""
    text = str(error)
    for prefix in (f"{name}: ", f"{name} = "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def _tls_pairs(s: Settings) -> list[tuple[str, str, str]]:
    pairs = []
    if s.ldap is not None and s.ldap.cert_file and s.ldap.key_file:
        pairs.append(("ldap", s.ldap.cert_file, s.ldap.key_file))
    if s.portal is not None and s.portal.tls:
        pairs.append(("portal", str(s.portal.cert_file), str(s.portal.key_file)))
    return pairs


def _ca_files(s: Settings) -> list[tuple[str, str]]:
    found = []
    if s.directory.ldap is not None and s.directory.ldap.ca_file:
        found.append(("directory.ca_file", s.directory.ldap.ca_file))
    if s.ldap is not None and s.ldap.ca_file:
        found.append(("ldap.ca_file", s.ldap.ca_file))
    if s.mail is not None and s.mail.ca_file:
        found.append(("mail.ca_file", s.mail.ca_file))
    return found


def _tls_pair_problems(section: str, cert: str, key: str) -> list[str]:
    """The listener's certificate and key, loaded as serve loads them (and matched)."""
    from OpenSSL import SSL, crypto

    from backends.ldapwire.tls import server_options

    try:
        server_options(cert, key).getContext()
    except OSError as e:
        return [f"{section}.cert_file: cannot read {e.filename}: {e.strerror}"]
    except ValueError as e:
        return [f"{section}.cert_file: {e}"]
    except crypto.Error:
        return [f"{section}.key_file: {key}: not a PEM private key (or it is encrypted)"]
    except SSL.Error:
        return [f"{section}.key_file: {key} does not match the certificate in {cert}"]
    return []


def _ca_problems(key: str, ca: str) -> list[str]:
    from backends.ldapwire.tls import certificates

    try:
        certificates(ca)
    except OSError as e:
        return [f"{key}: cannot read {ca}: {e.strerror}"]
    except ValueError as e:  # no PEM block at all
        return [f"{key}: {e}"]
    except Exception:  # a PEM block OpenSSL cannot parse
        return [f"{key}: {ca}: holds a certificate that cannot be read"]
    return []


def _settings(cfg: _Loader, root: _Reader) -> Settings | None:
    state = _section(root, "state", True, lambda r: _state(cfg, r))
    totp = _section(root, "totp", False, _totp) or TotpSettings()
    policy = _section(root, "policy", False, _policy) or PolicySettings()
    directory = _section(root, "directory", True, lambda r: _directory(cfg, r))
    radius = _section(root, "radius", False, lambda r: _radius(cfg, r, totp))
    ldap = _section(root, "ldap", False, _ldap)
    http = _section(root, "http", False, _http) or HttpSettings()
    portal = _section(root, "portal", False, _portal)
    service = _section(root, "service", False, _service) or ServiceSettings()
    mail = _section(root, "mail", False, _mail)
    logging = _section(root, "logging", False, lambda r: (
        r.str("level", "info", ("debug", "info", "warning", "error")),
        r.str("decisions", "rejects", ("rejects", "all")),
        r.str("format", "text", LOG_FORMATS)))
    if directory and ldap and not ldap.user_base and directory.type == "ldap":
        assert directory.ldap is not None
        ldap = _replace(ldap, user_base=directory.ldap.user_base)
    if directory and ldap and not ldap.upstream:
        if directory.ldap is not None and directory.ldap.urls:
            ldap = _replace(ldap, upstream=directory.ldap.urls[0])
        else:
            cfg.problems.append("ldap.upstream: missing (no [directory] LDAP url to default to)")
    if ldap is not None and ldap.upstream:
        # The front-end's own checks (what its factory refuses at start-up), on
        # the final values, for the keys not reported yet.
        for problem in ldap.problems():
            if not any(p.startswith(problem.partition(": ")[0] + ":") for p in cfg.problems):
                cfg.problems.append(problem)
    if radius and directory:
        _check_timeouts(cfg, radius, directory)
    if directory and directory.ldap is not None and not (
            directory.ldap.group_base or directory.ldap.use_memberof):
        uses = (["policy.require_groups"] if policy.require_groups else []) + (
            ["radius.reply"] if radius and (radius.reply or any(c.reply_rules
                                                                for c in radius.clients))
            else [])
        for key in uses:
            cfg.warnings.append(f"{key}: the directory reads no groups (use_memberof = false "
                                "and no group_base): no user is in any group")
    if state is None or directory is None:
        return None
    level, decisions, log_format = logging or ("info", "rejects", "text")
    return Settings(cfg.path, state, totp, policy, directory, radius, ldap, http,
                    level, decisions, tuple(cfg.warnings), portal, log_format, service, mail)


def _replace(obj: T, **changes: Any) -> T:
    return dataclasses.replace(obj, **changes)  # type: ignore[type-var]


def _section(root: _Reader, name: str, required: bool, build: Callable[[_Reader], T]) -> T | None:
    reader = root.table_of(name, required)
    if reader is None:
        return None
    result = build(reader)
    reader.done()
    return result


def _state(cfg: _Loader, r: _Reader) -> StateSettings:
    url = r.str("url", "sqlite:///../var/mfa-proxy.db")
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        rest = url[len("sqlite:///"):]
        url = "sqlite:///" + str(cfg.resolve(rest))
    elif url.startswith("postgresql"):
        _check_postgres_driver(r, url)
    elif not url.startswith("sqlite:"):
        r.problem("url", f"unsupported database URL {url.split(':')[0]!r} "
                         "(use sqlite:///PATH or postgresql+psycopg://…)")
    key_file = r.path("key_file", "../var/secret.key")
    assert key_file is not None
    cfg.check_private(r.key("key_file"), key_file)
    return StateSettings(url, key_file, r.int("threads", 4, 1, 64))


def _check_postgres_driver(r: _Reader, url: str) -> None:
    """The driver is an extra (``mfa-proxy[postgres]``): say so here, where check-config
    and serve both see it, rather than as an ImportError when the store opens."""
    scheme = url.split(":", 1)[0]
    module = scheme.partition("+")[2] or "psycopg2"  # SQLAlchemy's default for postgresql://
    if scheme.partition("+")[0] != "postgresql" or not module.isidentifier():
        r.problem("url", f"unsupported database URL {scheme!r} "
                         "(use sqlite:///PATH or postgresql+psycopg://…)")
        return
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != module:
            r.problem("url", f"cannot load the PostgreSQL driver {module}: {e}")
        elif module == "psycopg":
            r.problem("url", "PostgreSQL needs the psycopg driver, which is not installed: "
                             + POSTGRES_EXTRA)
        else:
            r.problem("url", f"{scheme}:// needs the {module} driver, which is not installed; "
                             f"use postgresql+psycopg://… with {POSTGRES_EXTRA}")
    except ImportError as e:  # psycopg without libpq: "no pq wrapper available"
        r.problem("url", f"cannot load the PostgreSQL driver {module}: {e}")


def _totp(r: _Reader) -> TotpSettings:
    return TotpSettings(
        issuer=r.str("issuer", "mfa-proxy") or "mfa-proxy",
        digits=r.int("digits", 6, 6, 8),
        period=r.int("period", 30, 15, 120),
        window=r.int("window", 1, 0, 10),
    )


def _policy(r: _Reader) -> PolicySettings:
    return PolicySettings(
        max_failures=r.int("max_failures", 5, 1, 1000),
        lockout_seconds=r.int("lockout_seconds", 900, 0, 10 * 365 * 86400),
        enrollment_days=r.int("enrollment_days", 7, 1, 365),
        recovery_codes=r.bool("recovery_codes", True),
        audit_days=r.int("audit_days", 90, 1, 3650),
        enrollment_help=" ".join(r.str("enrollment_help").split()),
        require_groups=_group_names(r, "require_groups"),
    )


def _group_names(r: _Reader, key: str) -> tuple[str, ...]:
    names = r.str_list(key)  # compared as policy.engine.GroupRequirement says
    if not all(names):
        r.problem(key, "a group name cannot be empty")
    return tuple(g for g in names if g)


def _directory(cfg: _Loader, r: _Reader) -> DirectorySettings:
    kind = r.str("type", "local", ("local", "ldap"))
    common: dict[str, Any] = dict(
        lowercase_usernames=r.bool("lowercase_usernames", True),
        strip_domain=r.bool("strip_domain", True),
        strip_realm=r.bool("strip_realm", True),
    )
    if kind == "local":
        users = r.path("users_file", "../var/users.toml")
        return DirectorySettings(type="local", users_file=users, **common)
    urls = r.str_list("urls")
    if not urls:
        r.problem("urls", "missing: at least one ldap:// or ldaps:// URL")
    for u in urls:
        if not u.startswith(("ldap://", "ldaps://")):
            r.problem("urls", f"not an ldap:// or ldaps:// URL: {u!r}")
    start_tls = r.bool("start_tls", False)
    _warn_plain_ldap(r, "urls", urls, start_tls)
    bind_dn = r.str("bind_dn")
    password = r.secret("bind_password", required=bool(bind_dn))
    user_base = r.str("user_base")
    if not user_base:
        r.problem("user_base", "missing: the DN under which users are searched")
    user_filter = r.str("user_filter", "(uid={username})")
    if "{username}" not in user_filter:
        r.problem("user_filter", "must contain {username}")
    ca_file = r.path("ca_file")
    if ca_file and not ca_file.is_file():
        r.problem("ca_file", f"cannot read {ca_file}")
    options = LdapOptions(
        urls=list(urls), bind_dn=bind_dn, bind_password=password, user_base=user_base,
        user_filter=user_filter, username_attribute=r.str("username_attribute", "uid"),
        mail_attribute=r.str("mail_attribute", "mail"),
        group_base=r.str("group_base"),
        group_filter=r.str("group_filter", "(member={dn})"),
        group_cache_seconds=float(r.int("group_cache_seconds", 60, 0, 86400)),
        use_memberof=r.bool("use_memberof", True), start_tls=start_tls,
        ca_file=str(ca_file) if ca_file else "", tls_verify=r.bool("tls_verify", True),
        connect_timeout=r.float("connect_timeout", 3.0, 0.1, 60),
        timeout=r.float("timeout", 5.0, 0.1, 120),
        dn_cache_seconds=float(r.int("dn_cache_seconds", 60, 0, 86400)),
    )
    # The client's own checks (filter syntax...), for keys not reported above.
    for problem in options.problems():
        key, _, message = problem.partition(": ")
        if not any(p.startswith(f"{r.key(key)}:") for p in r.cfg.problems):
            r.problem(key, message)
    return DirectorySettings(type="ldap", ldap=options, **common)


def _warn_plain_ldap(r: _Reader, key: str, urls: Sequence[str], start_tls: bool) -> None:
    """ldap:// without StartTLS to another host: passwords cross the network in clear."""
    if start_tls:
        return
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme == "ldap" and parts.hostname and not _is_loopback(parts.hostname):
            r.cfg.warnings.append(
                f"{r.key(key)}: {url} is plain LDAP without StartTLS to a non-loopback host: "
                "the service account's and users' passwords cross the network in clear; "
                "use ldaps:// or set start_tls = true")


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(
            ".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _network(r: _Reader, value: str, key: str = "address"
             ) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        r.problem(key, f"not an address or CIDR: {value!r}")
        return None
    if "/" in value and network.network_address != ipaddress.ip_interface(value).ip:
        r.cfg.warnings.append(
            f"{r.key(key)}: {value} has host bits set: it means the whole network {network}; "
            f"write {network} (or {ipaddress.ip_interface(value).ip} for that one host)")
    return network


def _radius(cfg: _Loader, r: _Reader, totp: TotpSettings) -> RadiusSettings:
    listen = r.addresses("listen", ("127.0.0.1:1812",))
    default_acct = tuple(str(type(a)(a.host, a.port + 1)) for a in listen if a.port < 65535)
    acct = r.addresses("accounting_listen", default_acct)
    mode = r.str("mode", "auto", RADIUS_MODES)
    separator = r.str("separator", ",")
    require_ma = r.bool("require_message_authenticator", True)
    settings = RadiusSettings(
        listen=listen, accounting_listen=acct, mode=mode, separator=separator,
        require_message_authenticator=require_ma,
        challenge_timeout=r.int("challenge_timeout", 120, 10, 3600),
        duplicate_window=r.int("duplicate_window", 30, 0, 600),
        dictionary=r.path("dictionary"),
    )
    readers = list(r.tables("clients"))
    clients = tuple(c for c in (_client(cfg, c, settings) for c in readers) if c)
    if listen and not readers:  # a broken client has its own message
        r.problem("clients", "no [[radius.clients]]: every request would be dropped")
    names = [c.name for c in clients]
    for name in sorted({n for n in names if names.count(n) > 1}):
        r.problem("clients", f"duplicate client name {name!r}")
    if len(set(names)) == len(names):
        try:  # the table serve builds: two clients claiming one network are refused
            ClientTable(clients)
        except ValueError as e:
            r.problem("clients", str(e))
    reply = tuple(_reply(rr) for rr in r.tables("reply"))
    return _replace(settings, clients=clients, reply=tuple(x for x in reply if x))


def _client(cfg: _Loader, r: _Reader, d: RadiusSettings) -> RadiusClientConfig | None:
    name = r.str("name")
    if not name:
        r.problem("name", "missing: a short name for metrics and logs")
    addresses = r.str_list("address")
    if not addresses:
        r.problem("address", "missing: an address or CIDR")
    networks = tuple(n for n in (_network(r, a) for a in addresses) if n is not None)
    secret = r.secret("secret", required=True, create=r.bool("create_secret_file", False))
    if secret and len(secret) < 16:
        cfg.warnings.append(f"{r.key('secret')}: shorter than 16 characters; a RADIUS shared "
                            "secret should be long and random (BlastRADIUS)")
    fields: dict[str, Any] = dict(
        mfa=r.str("mfa", "enrolled", MFA_MODES), mode=r.str("mode", d.mode, RADIUS_MODES),
        separator=r.str("separator", d.separator),
        require_message_authenticator=r.bool("require_message_authenticator",
                                             d.require_message_authenticator),
        repeat_window_seconds=r.int("repeat_window_seconds", 0, 0, 3600),
        enrollment_notice=r.str("enrollment_notice", "reply-message", ENROLLMENT_NOTICES),
        nas_timeout=r.float("nas_timeout", 0.0, 0.0, 600) or None,
    )
    r.done()
    if not (name and networks and secret):
        return None  # its problems are reported
    return RadiusClientConfig(name=name, networks=networks, nas_secret=secret.encode(), **fields)


def _reply(r: _Reader) -> ReplyRule | None:
    group = r.str("group")
    if not group:
        r.problem("group", "missing: the directory group these attributes are for")
    attrs = r._get("attributes", (dict,), "a table of attribute = value", {})
    r.done()
    return ReplyRule(group, dict(attrs)) if group and attrs else None


def _check_timeouts(cfg: _Loader, radius: RadiusSettings, d: DirectorySettings) -> None:
    """A NAS that gives up before we answer retransmits or fails over: warn."""
    if d.ldap is None:
        return
    urls = d.ldap.urls
    worst = (d.ldap.connect_timeout + d.ldap.timeout) * max(1, len(urls)) + 0.5
    for c in radius.clients:
        if c.nas_timeout and worst > c.nas_timeout:
            cfg.warnings.append(
                f"radius.clients[{c.name}].nas_timeout: {c.nas_timeout:g} s is shorter than the "
                f"worst directory time ({worst:g} s = (connect_timeout + timeout) × "
                f"{len(urls)} URLs + processing); the NAS may retransmit or give up")


def _ldap(r: _Reader) -> LdapFrontendConfig:
    if r.str("username_attribute"):
        r.cfg.warnings.append(
            f"{r.key('username_attribute')}: no longer used and ignored: a bind DN is "
            "resolved to its entry by the directory ([directory] username_attribute names it)")
    listen = r.addresses("listen", ("127.0.0.1:3389",))
    ldaps = r.addresses("ldaps_listen")
    cert, key = r.path("cert_file"), r.path("key_file")
    if ldaps and not (cert and key):
        r.problem("ldaps_listen", "needs cert_file and key_file")
    for name, p in (("cert_file", cert), ("key_file", key)):
        if p and not p.is_file():
            r.problem(name, f"cannot read {p}")
    if key:
        r.cfg.check_private(r.key("key_file"), key)
    upstream = r.str("upstream")
    if upstream and not upstream.startswith(("ldap://", "ldaps://")):
        r.problem("upstream", f"not an ldap:// or ldaps:// URL: {upstream!r}")
    upstream_start_tls = r.bool("start_tls", False)
    _warn_plain_ldap(r, "upstream", [upstream] if upstream else [], upstream_start_tls)
    ca = r.path("ca_file")
    if ca and not ca.is_file():
        r.problem("ca_file", f"cannot read {ca}")
    allow_anonymous = r.bool("allow_anonymous", False)
    sasl_passthrough = r.bool("sasl_passthrough", False)
    if sasl_passthrough:
        r.cfg.warnings.append(
            f"{r.key('sasl_passthrough')}: SASL binds are relayed to the directory without a "
            "code: MFA is bypassed for whatever identity the mechanism asserts")
    max_message_size = r.int("max_message_size", 262144, 1024, 64 * 1048576)
    max_buffered = r.int("max_buffered_bytes", 64 * 1048576, 65536, 1 << 40)
    if max_buffered < max_message_size:
        r.problem("max_buffered_bytes",
                  f"must be at least max_message_size ({max_message_size}), got {max_buffered}")
    config = LdapFrontendConfig(
        listen=tuple(map(str, listen)), ldaps_listen=tuple(map(str, ldaps)),
        cert_file=str(cert or ""), key_file=str(key or ""), upstream=upstream,
        upstream_start_tls=upstream_start_tls, ca_file=str(ca or ""),
        tls_verify=r.bool("tls_verify", True), exempt=r.str_list("exempt"),
        mfa=MfaMode(r.str("mfa", "enrolled", MFA_MODES)), separator=r.str("separator", ","),
        bind_cache_seconds=r.int("bind_cache_seconds", 0, 0, 86400),
        allow_anonymous=allow_anonymous,
        require_bind=r.bool("require_bind", not allow_anonymous),
        sasl_passthrough=sasl_passthrough,
        max_message_size=max_message_size,
        max_connections=r.int("max_connections", 1000, 1, 100000),
        max_connections_per_source=r.int("max_connections_per_source", 64, 1, 100000),
        max_buffered_bytes=max_buffered,
        idle_timeout=float(r.int("idle_timeout", 600, 0, 86400)),
        unbound_timeout=r.float("unbound_timeout", 10.0, 0, 3600),
        user_base=r.str("user_base"),
        bind_cache_rules=tuple(x for x in (_cache_rule(c) for c in r.tables("bind_cache_rules"))
                               if x),
        connect_timeout=r.float("connect_timeout", 10.0, 0.1, 300),
        bind_timeout=r.float("bind_timeout", 30.0, 0.1, 300),
    )
    return config


def _cache_rule(r: _Reader) -> BindCacheRule | None:
    dn = r.str("dn")
    if not dn:
        r.problem("dn", "missing: the DN or DN suffix this window applies to")
    seconds = r.int("seconds", 0, 0, 86400)
    r.done()
    return BindCacheRule(dn, seconds) if dn else None


def _service(r: _Reader) -> ServiceSettings:
    return ServiceSettings(shutdown_grace_seconds=r.float("shutdown_grace_seconds", 10.0, 0.0,
                                                          3600.0),
                           cpu_affinity=_cpus(r, "cpu_affinity"))


def _cpus(r: _Reader, name: str) -> tuple[int, ...]:
    """CPU numbers this process may run on (os.sched_getaffinity), checked here so
    check-config refuses what serve could not apply."""
    value = r._get(name, (list,), "a list of CPU numbers", [])
    if not value:
        return ()
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in value):
        r.problem(name, f"expected CPU numbers (integers from 0), got {value!r}")
        return ()
    if not hasattr(os, "sched_setaffinity"):
        r.problem(name, "setting the CPU affinity is not supported on this platform")
        return ()
    allowed = os.sched_getaffinity(0)
    outside = sorted(set(value) - allowed)
    if outside:
        r.problem(name, f"CPU {outside[0]} is not one this process may run on "
                        f"(allowed: {', '.join(map(str, sorted(allowed)))})")
        return ()
    return tuple(sorted(set(value)))


def _http(r: _Reader) -> HttpSettings:
    raw = r.str("listen", "127.0.0.1:9812")
    admin = (_network(r, a, "admin_networks") for a in r.str_list("admin_networks"))
    return HttpSettings(r.address("listen", raw) if raw else None,
                        tuple(n for n in admin if n is not None))


def _portal(r: _Reader) -> PortalSettings | None:
    raw = r.str("listen", "127.0.0.1:8443")
    listen = r.address("listen", raw) if raw else None
    cert, key = r.path("cert_file"), r.path("key_file")
    if bool(cert) != bool(key):
        r.problem("cert_file" if key else "key_file",
                  "TLS needs both cert_file and key_file (or neither, for plain HTTP)")
    for name, p in (("cert_file", cert), ("key_file", key)):
        if p and not p.is_file():
            r.problem(name, f"cannot read {p}")
    if key:
        r.cfg.check_private(r.key("key_file"), key)
    public_url = r.str("public_url")
    if public_url:
        from urllib.parse import urlsplit

        parts = urlsplit(public_url)
        if parts.scheme not in ("https", "http") or not parts.netloc:
            r.problem("public_url", f"expected an http:// or https:// URL, got {public_url!r}")
    minutes = r.int("session_minutes", 15, 1, 24 * 60)
    if listen is None:
        return None
    if not (cert and key) and not ipaddress.ip_address(listen.host).is_loopback:
        r.cfg.warnings.append(
            f"{r.key('listen')}: the portal is plain HTTP on {listen}, a non-loopback address: "
            "passwords and codes cross the network in clear; set cert_file and key_file "
            "(or put a TLS reverse proxy on the same host in front of a loopback listener)")
    return PortalSettings(listen, cert, key, public_url, minutes)


def _mail(r: _Reader) -> MailConfig | None:
    """``[mail]``; None when ``smtp`` is "" (no mail)."""
    from policy.mail import RetryPolicy, TemplateError
    from proxy.mail.templates import load_templates

    security = r.str("security", "starttls", SECURITY)
    raw = r.str("smtp", "127.0.0.1:25")
    username = r.str("username")
    password = r.secret("password", required=False)
    from_header = r.str("from")
    reminder_hours = r.int("reminder_hours", 24, 0, 24 * 365)
    ca_file = r.path("ca_file")
    if ca_file and not ca_file.is_file():
        r.problem("ca_file", f"cannot read {ca_file}")
    tls_verify = r.bool("tls_verify", True)
    timeout = r.float("timeout_seconds", 30.0, 0.5, 600)
    retry = RetryPolicy(first_seconds=r.int("retry_seconds", 60, 1, 86400),
                        max_seconds=r.int("retry_max_seconds", 3600, 1, 7 * 86400),
                        give_up_seconds=r.int("give_up_hours", 48, 1, 24 * 60) * 3600)
    claim = r.int("claim_seconds", 300, 1, 86400)
    poll = r.float("poll_seconds", 15.0, 0.2, 60)
    folder = r.path("templates")
    if folder and not folder.is_dir():
        r.problem("templates", f"not a folder: {folder}")
        folder = None
    try:
        templates = load_templates(folder)
    except TemplateError as e:
        r.problem("templates", str(e))
        templates = {}
    if not raw:
        return None
    try:
        host, port = parse_server(raw, security)
    except ValueError as e:
        r.problem("smtp", str(e))
        return None
    config = MailConfig(host, port, security, username, password, from_header, reminder_hours,
                        str(ca_file or ""), tls_verify, timeout, retry, claim, poll,
                        templates=templates, templates_dir=folder)
    for problem in config.problems():
        key, _, message = problem.partition(": ")
        if not any(p.startswith(f"{r.key(key)}:") for p in r.cfg.problems):
            r.problem(key, message)
    r.cfg.warnings.extend(f"{r.key(w.partition(': ')[0])}: {w.partition(': ')[2]}"
                          for w in config.warnings())
    return config
