"""`mfa-proxy`: serve, check-config, init-config, db, user, keys, local-user, audit.

Exit status: 0 done, 1 refused (unknown user, impossible action), 2 bad usage
or bad config. ``-c FILE`` goes anywhere on the command line.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from proxy import config as configmod
from proxy import data

if TYPE_CHECKING:  # imported when used: check-config starts without SQLAlchemy
    from policy.admin import Accounts, StatusView

F = TypeVar("F", bound=Callable[..., Any])


class Refused(click.ClickException):
    """An action that cannot be done: exit status 1."""

    exit_code = 1


def refusal_message(e: Exception) -> str:
    """A refusal of the admin service (policy/admin.py), in the CLI's words."""
    from policy.admin import (
        MAX_BYPASS_SECONDS,
        MAX_PERIOD_DAYS,
        MIN_BYPASS_SECONDS,
        MIN_PERIOD_DAYS,
        AlreadyEnrolled,
        InvalidBypassDuration,
        InvalidPeriod,
        InvalidTotpKey,
    )

    if isinstance(e, InvalidPeriod):
        return f"--days must be between {MIN_PERIOD_DAYS} and {MAX_PERIOD_DAYS}, got {e.days}"
    if isinstance(e, InvalidBypassDuration):
        return (f"--for must be between {MIN_BYPASS_SECONDS // 60}m and "
                f"{MAX_BYPASS_SECONDS // 86400}d, got {e.seconds}s")
    if isinstance(e, InvalidTotpKey):
        return f"--secret: {e.reason}"
    if isinstance(e, AlreadyEnrolled):
        return (f"{e.username} already has a key: `user reset` for a lost device, or "
                "`user enroll --force` to replace it")
    return str(e)


class Commands(click.Group):
    """The `mfa-proxy` group: a refusal of the admin service is exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as e:
            # policy/admin.py (SQLAlchemy and all) is imported only by the commands
            # that use it: when it is not loaded, nothing raised a Refusal.
            admin = sys.modules.get("policy.admin")
            if admin is not None and isinstance(e, admin.Refusal):
                raise Refused(refusal_message(e)) from None
            raise


@dataclass
class App:
    """What a command needs, built lazily from the config."""

    config_path: str | None = None
    clock: Callable[[], float] = time.time
    _settings: Any = None
    _store: Any = None
    _keys: Any = None
    _directory: Any = None
    _accounts: Any = None

    @property
    def settings(self) -> configmod.Settings:
        if self._settings is None:
            try:
                self._settings = configmod.load(self.config_path)
            except configmod.ConfigError as e:
                config_failed(e)
        return self._settings

    def checked_settings(self) -> configmod.Settings:
        """The settings after every check serve makes before it starts (what
        serve and check-config use: one refuses exactly what the other does)."""
        if self._settings is None:
            try:
                self._settings = configmod.load_checked(self.config_path)
            except configmod.ConfigError as e:
                config_failed(e)
        return self._settings

    @property
    def store(self) -> Any:
        if self._store is None:
            from policy.schema import StoreError
            from proxy.state import open_store

            try:
                self._store = open_store(self.settings.state, self.clock)
            except StoreError as e:
                raise Refused(str(e)) from None
        return self._store

    @property
    def keys(self) -> Any:
        if self._keys is None:
            from policy.keys import KeyFileError, KeyRing

            try:
                self._keys = KeyRing(self.settings.state.key_file)
            except KeyFileError as e:
                raise Refused(str(e)) from None
        return self._keys

    @property
    def accounts(self) -> Accounts:
        """The admin service (policy/admin.py) on this config's state; the key file
        is opened only by the actions that encrypt a key."""
        if self._accounts is None:
            from proxy.state import mail_events, make_accounts

            origin = f"the command line on {socket.gethostname()}"
            self._accounts = make_accounts(
                self.settings, self.store, lambda: self.keys, self.clock,
                events=mail_events(self.settings, self.store, origin, self.clock))
        accounts: Accounts = self._accounts
        return accounts

    @property
    def directory(self) -> Any:
        if self._directory is None:
            from proxy.directories import make_directory

            self._directory = make_directory(self.settings.directory)
        return self._directory

    @property
    def usernames(self) -> Any:
        from proxy.directories import username_rules

        return username_rules(self.settings.directory)

    def canonical(self, raw: str) -> str:
        from policy.usernames import InvalidUsername

        try:
            return str(self.usernames.normalize(raw))
        except InvalidUsername as e:
            raise Refused(f"{raw!r}: {e}") from None

    def audit_name(self, raw: str) -> str:
        """The name audit rows carry for ``raw``: its canonical form when it has one
        (no directory look-up: the audit trail is read when the directory is down)."""
        from policy.escaping import escape_controls
        from policy.usernames import InvalidUsername

        try:
            return str(self.usernames.normalize(raw))
        except InvalidUsername:
            return escape_controls(raw)

    def known_user(self, raw: str) -> str:
        """The identity an admin means: the directory entry's own name (as serve
        keys the state), or a name the state store has that the directory no
        longer knows (or cannot be asked about: its state can still be managed)."""
        from backends.base import DirectoryError
        from policy.usernames import InvalidUsername

        name = self.canonical(raw)
        try:
            found = self.directory.lookup(self.usernames.lookup_form(raw))
        except DirectoryError as e:
            if self.store.admin.get(name) is not None:
                return name
            raise Refused(f"cannot ask the directory about {name!r}: {e}") from None
        if found is not None:
            try:
                return str(self.usernames.canonical(found.username))
            except InvalidUsername as e:
                raise Refused(f"the directory's name for {raw!r} is unusable: {e}") from None
        if self.store.admin.get(name) is not None:
            return name
        raise Refused(f"unknown user {name!r}: not in the directory or the state store")


def config_failed(e: configmod.ConfigError) -> NoReturn:
    for line in e.problems:
        click.echo(f"config error: {line}", err=True)
    sys.exit(2)


def _set_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.ensure_object(App).config_path = value


def config_option(f: F) -> F:
    return click.option(
        "-c", "--config", metavar="FILE", expose_value=False, is_eager=True,
        callback=_set_config,
        help="Config file (default: $MFA_PROXY_CONFIG, else the first of "
             "./conf/mfa-proxy.toml and /etc/mfa-proxy/mfa-proxy.toml that exists).")(f)


def days_option(default: int | None) -> Callable[[F], F]:
    return click.option("--days", type=int, default=default, show_default=default is not None,
                        help="Enrollment period in days (1–365).")


def check_days(app: App, days: int | None) -> None:
    """A bad config, then a bad --days, are refused before anything else is looked at."""
    from policy.admin import check_period

    _ = app.settings
    if days is not None:
        check_period(days)


pass_app = click.make_pass_decorator(App, ensure=True)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.version_option(package_name="mfa-proxy")
def main() -> None:
    """TOTP multi-factor authentication in front of a directory, for RADIUS and LDAP.

    Every command takes -c FILE; without it the config is $MFA_PROXY_CONFIG, else
    the first of ./conf/mfa-proxy.toml and /etc/mfa-proxy/mfa-proxy.toml that
    exists (`mfa-proxy init-config` writes the packaged default to the first).
    Exit status: 0 done, 1 refused, 2 bad usage or bad config.
    """
    from proxy.logs import install_last_resort

    # The admin commands configure no logging of their own (serve does, in
    # proxy/service.py): what reaches Python's last-resort handler is escaped too.
    install_last_resort()


@main.command()
@config_option
@pass_app
def serve(app: App) -> None:
    """Run every configured listener (RADIUS, LDAP, HTTP) until SIGTERM/SIGINT."""
    from proxy.service import run

    settings = app.checked_settings()  # its warnings are logged, in the configured format
    sys.exit(run(settings))


@main.command("check-config")
@click.option("--connect", is_flag=True,
              help="Also try each [directory] URL: reachability, TLS, latency, the service "
                   "account's bind (exit 1 when a URL or the bind fails).")
@click.option("--user", "probe_user", metavar="NAME",
              help="With --connect: run the user filter (and the group search) for NAME.")
@config_option
@pass_app
def check_config(app: App, connect: bool, probe_user: str | None) -> None:
    """Validate the config file: one line per problem, exit 2 when any.

    Every check serve makes before it starts is made here too (RADIUS reply
    attributes, TLS files...): a file that passes, serve accepts. With
    --connect, each directory URL is tried as serve uses it: exit 0 when every
    one answers and the service account binds, 1 when one does not.
    """
    if probe_user is not None and not connect:
        raise click.UsageError("--user goes with --connect")
    settings = app.checked_settings()
    for w in settings.warnings:
        click.echo(f"warning: {w}")
    click.echo(f"{settings.path}: OK")
    if connect:
        check_connections(app, probe_user)


def check_connections(app: App, probe_user: str | None) -> None:
    from backends.base import DirectoryError
    from policy.usernames import InvalidUsername
    from proxy.directory_check import check_url

    directory = app.settings.directory
    name = None
    if probe_user is not None:
        try:
            name = app.usernames.lookup_form(probe_user)
        except InvalidUsername as e:
            raise click.UsageError(f"--user {probe_user!r}: {e}") from None
    if directory.ldap is None:
        users = directory.users_file
        click.echo(f"directory: the local users file {users}: nothing to connect to")
        if name is not None:
            try:
                found = app.directory.lookup(name)
            except DirectoryError as e:
                raise Refused(f"{users}: {e}") from None
            click.echo(f"user {probe_user!r}: {'found' if found else 'not found'} in {users}")
        return
    failed = 0
    for url in directory.ldap.urls:
        report = check_url(url, directory.ldap, name)
        failed += not report.ok
        for line in report.lines:
            click.echo(f"{url}: {line}")
        for warning in report.warnings:
            click.echo(f"warning: {url}: {warning}")
    total = len(directory.ldap.urls)
    if failed:
        raise Refused(f"{failed} of {total} directory URL(s) failed")
    click.echo(f"directory: {total} of {total} URL(s) answer")


@main.command("init-config")
@click.argument("path", required=False, type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--example", type=click.Choice(data.example_names()),
              help="Write this packaged example instead of the default.")
def init_config(path: str | None, example: str | None) -> None:
    """Write the packaged default config to PATH (default ./conf/mfa-proxy.toml, where
    serve looks; - for standard output). An existing file is left alone (exit 1)."""
    text = data.config_text(example)
    if path == "-":
        click.echo(text, nl=False)
        return
    target = Path(path) if path else configmod.CONFIG_SEARCH_PATH[0]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        configmod.write_private_file(target, text)
    except FileExistsError:
        raise Refused(f"{target}: exists; left as it is") from None
    except OSError as e:
        raise Refused(f"{target}: cannot write it ({e.strerror})") from None
    option = "" if path is None else f" -c {target}"
    if example is None:
        # the default's paths are ../var/…, relative to the file's folder
        var = os.path.normpath(target.parent.absolute() / ".." / "var")
        click.echo(f"wrote {target}: loopback only; state, key file, users file and "
                   f"RADIUS secret under {var}")
        click.echo(f"next: mfa-proxy serve{option}")
    else:
        click.echo(f"wrote {target} (example {example!r}): adapt it, then "
                   f"mfa-proxy check-config{option}")


@main.group()
def db() -> None:
    """The state database."""


@db.command("upgrade")
@config_option
@pass_app
def db_upgrade(app: App) -> None:
    """Create or migrate the state database to the current schema."""
    from policy.migrations import current_revision
    from policy.schema import StoreError
    from policy.store import Store

    store = Store(app.settings.state.url)
    try:
        store.upgrade()
        click.echo(f"state database at revision {current_revision(store.engine)}")
    except StoreError as e:  # e.g. migrated by a newer version: no downgrade
        raise Refused(f"cannot upgrade the state database: {e}") from None
    except Exception as e:
        raise Refused(f"cannot upgrade the state database: {type(e).__name__}: {e}") from None
    finally:
        store.close()


@db.command("backup")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@config_option
@pass_app
def db_backup(app: App, file: str, force: bool) -> None:
    """Copy the state database to FILE while serve keeps running (SQLite's online
    backup). Keep it with a copy of the key file: the TOTP keys in it are
    encrypted under that file. PostgreSQL: use pg_dump (this says how)."""
    from policy.schema import StoreError

    settings = app.settings
    if not settings.state.url.startswith("sqlite"):
        click.echo(postgres_backup_advice(settings.state.url, file))
        raise Refused("the state is in PostgreSQL: back it up with pg_dump (above)")
    if settings.state.url.endswith(":memory:"):
        raise Refused("state.url is an in-memory database: nothing to back up")
    if os.path.lexists(file) and not force:
        raise Refused(f"{file}: exists; give --force to replace it")
    try:
        done = app.store.backup(file)
    except (StoreError, OSError) as e:
        raise Refused(f"backup failed: {e}") from None
    click.echo(f"backed up the state database to {done.path} ({done.size} bytes, "
               f"schema {done.revision}, {done.users} user(s), {done.audit_rows} audit row(s))")
    click.echo(f"keep it with a copy of the key file {settings.state.key_file}: without "
               "it the TOTP keys in the backup cannot be read")


def postgres_backup_advice(url: str, file: str) -> str:
    from sqlalchemy.engine import URL, make_url

    # Never the password on a terminal or in a script's output: pg_dump finds it.
    u = make_url(url)
    shown = URL.create("postgresql", u.username, None, u.host, u.port, u.database,
                       u.query).render_as_string(hide_password=False)
    return (f"the state database is PostgreSQL; back it up with its own tool, e.g.\n"
            f"  pg_dump --format=custom --file={file} '{shown}'\n"
            f"(the password from ~/.pgpass or PGPASSWORD), restore with pg_restore --clean "
            f"--dbname=..., and keep a copy of the key file with it")


# -- users ---------------------------------------------------------------------------


MAIL_NOTE = ("With [mail] set, the user's mail is put in the outbox of the state store, "
             "in the same transaction as the change; a running `mfa-proxy serve` sends it "
             "(if none runs, the next one to start does). This command never waits for "
             "the mail server.")


@main.group(epilog=MAIL_NOTE)
def user() -> None:
    """Require, enroll, reset, unlock users; show their MFA status."""


def mail_note(app: App, what: str) -> str:
    """What the command line says about the mail it queued ("" when mail is off)."""
    return f"; {what} queued for serve to send" if app.settings.mail is not None else ""


def describe(view: StatusView) -> str:
    status = view.status.replace("_", " ")
    if view.days_left is not None:
        status += f" ({plural(view.days_left, 'day')} left)"
    if view.locked:
        status += f", locked until {view.locked_until or 'an admin unlocks'}"
    if view.bypass:
        status += f", bypass until {view.bypass_until}" if view.bypass_until else ", bypass"
    return status


_DURATION_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> int:
    """``15m``, ``4h``, ``2d``, ``1w`` in seconds (ValueError says what is accepted)."""
    value = text.strip().lower()
    number, unit = value[:-1].strip(), value[-1:]
    if unit not in _DURATION_UNITS or not number.isdigit() or not number.isascii():
        raise ValueError(f"{text!r}: expected a number and a unit: 15m, 4h, 2d or 1w")
    return int(number) * _DURATION_UNITS[unit]


def _duration(option: str) -> Callable[[click.Context, click.Parameter, str | None],
                                       int | None]:
    def convert(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
        if value is None:
            return None
        try:
            return parse_duration(value)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint=option) from None

    return convert


def _status_word(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    from policy.schema import STATUSES  # here: the other commands start without SQLAlchemy

    if value not in STATUSES:
        raise click.BadParameter(f"{value!r} is not one of {', '.join(STATUSES)}",
                                 param_hint="--status")
    return value


@user.command("show")
@click.argument("username")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@config_option
@pass_app
def user_show(app: App, username: str, as_json: bool) -> None:
    """Status: enrolled, in enrollment (days left), expired, locked, bypass."""
    name = app.known_user(username)
    view = app.accounts.view(name).as_json()
    if as_json:
        click.echo(json.dumps(view))
        return
    for key, value in view.items():
        click.echo(f"{key:20} {'-' if value is None else value}")


@user.command("list")
@click.option("--status", metavar="S", callback=_status_word,
              help="Only users with this status: enrolled, in_enrollment, enrollment_expired, "
                   "enrolled_not_required or not_required (as `user show` says it).")
@click.option("--locked", is_flag=True, help="Only users locked now.")
@click.option("--bypass", "bypass_only", is_flag=True,
              help="Only users whose bypass is in force now.")
@click.option("--expiring-within", "expiring", metavar="DURATION",
              callback=_duration("--expiring-within"),
              help="Only users in an enrollment period that ends within DURATION "
                   "(12h, 2d, 1w).")
@click.option("--json", "as_json", is_flag=True, help="A JSON array (as `user show --json`).")
@config_option
@pass_app
def user_list(app: App, status: str | None, locked: bool, bypass_only: bool,
              expiring: int | None, as_json: bool) -> None:
    """Every user the state store knows (and local-file users), by name.

    The filters combine: every one given must hold.
    """
    from policy.schema import UserFilter

    accounts = app.accounts
    where = UserFilter(status=status, locked=locked, bypass=bypass_only,
                       expiring_within=expiring)
    lister = getattr(app.directory, "list_users", None) if where.matches_default() else None
    views = accounts.list_views(lister() if lister is not None else (), where)
    if as_json:
        click.echo(json.dumps([v.as_json() for v in views]))
        return
    lines = [f"{'USER':24} {'FAILURES':>8}  STATUS"]
    lines += [f"{v.username:24} {v.failures:>8}  {describe(v)}" for v in views]
    click.echo("\n".join(lines))


@user.command("require", epilog=MAIL_NOTE)
@click.argument("username", required=False)
@click.option("--group", help="Every member of this directory group who has no requirement "
                             "yet (safe to run again: running periods are kept).")
@days_option(None)
@click.option("--no-mail", "no_mail", is_flag=True,
              help="Send no invitation mail (the reminder before the deadline still goes out).")
@click.option("--verbose", "-v", is_flag=True, help="With --group: one line per member.")
@config_option
@pass_app
def user_require(app: App, username: str | None, group: str | None, days: int | None,
                 no_mail: bool, verbose: bool) -> None:
    """Require MFA, with an enrollment period of N days (default [policy] enrollment_days).

    Each user gets an invitation mail with the deadline and the portal's link.
    With --group, members already required keep their period (never restarted
    or shortened) and enrolled members without a requirement are left alone;
    one summary line says how many were newly required, already required and
    skipped.
    """
    check_days(app, days)
    if bool(username) == bool(group):
        raise click.UsageError("give USER or --group GROUP")
    note = "" if no_mail else mail_note(app, "invitation")
    if group:
        require_group(app, group, days, not no_mail, verbose, note)
        return
    name = app.known_user(str(username))
    period = app.accounts.require(name, days, notify=not no_mail)
    if period is None:
        click.echo(f"{name}: already required and enrolled")
        return
    click.echo(f"{name}: MFA required; enrollment period {plural(period.days, 'day')}{note}")


def require_group(app: App, group: str, days: int | None, notify: bool, verbose: bool,
                  note: str) -> None:
    from collections import Counter

    done = app.accounts.require_members(group_members(app, group), days, notify=notify)
    if verbose:
        for name in done.newly_required:
            click.echo(f"{name}: newly required; enrollment period "
                       f"{plural(done.period.days, 'day')}")
        for name in done.already_required:
            click.echo(f"{name}: already required; left as it is")
        for name, why in done.skipped:
            click.echo(f"{name}: skipped ({why})")
    why = Counter(reason for _, reason in done.skipped)
    skipped = f"{len(done.skipped)} skipped"
    if why:
        skipped += " (" + ", ".join(f"{n} {reason}" for reason, n in sorted(why.items())) + ")"
    new = len(done.newly_required)
    click.echo(f"group {group}: {new} newly required"
               + (f" (enrollment period {plural(done.period.days, 'day')}{note})" if new else "")
               + f", {len(done.already_required)} already required, {skipped}")


def plural(n: int, unit: str) -> str:
    """ "1 day", "7 days". """
    return f"{n} {unit}" if n == 1 else f"{n} {unit}s"


def group_members(app: App, group: str) -> list[str]:
    """The group's members, as the directory names them (require_members keys
    them as serve does, and counts the unusable names as skipped)."""
    from backends.base import DirectoryError

    try:
        members: list[str] = app.directory.group_members(group)
    except DirectoryError as e:
        raise Refused(f"group {group!r}: {e}") from None
    return members


@user.command("enroll", epilog=MAIL_NOTE)
@click.argument("username")
@click.option("--secret", metavar="BASE32", help="Import this key instead of making one.")
@click.option("--png", type=click.Path(dir_okay=False, writable=True), help="Write the QR code.")
@click.option("--force", is_flag=True, help="Replace a key the user already has.")
@config_option
@pass_app
def user_enroll(app: App, username: str, secret: str | None, png: str | None,
                force: bool) -> None:
    """Create (or import) the user's TOTP key; print the otpauth:// URI and a QR code.

    The key is active at once: from now on the user must give a code wherever
    MFA applies.
    """
    from policy.admin import parse_totp_key

    name = app.known_user(username)
    if secret:
        parse_totp_key(secret)  # a bad key is refused before the --png check
    if png and os.path.islink(png):  # refused before the key changes, not after
        raise Refused(f"--png {png}: a symbolic link; give the path of the file itself")
    enrollment = app.accounts.enroll(name, secret, force=force)
    click.echo(f"{name}: enrolled; the key is active now{mail_note(app, 'security notice')}")
    click.echo(enrollment.uri)
    print_qr(enrollment.uri, png)


def print_qr(uri: str, png: str | None) -> None:
    import qrcode

    qr = qrcode.QRCode(border=2)
    qr.add_data(uri)
    qr.make(fit=True)
    out = io.StringIO()
    qr.print_ascii(out=out, invert=True)
    click.echo(out.getvalue())
    if png:
        image = io.BytesIO()
        qr.make_image().save(image)
        try:
            write_private_file(png, image.getvalue())
        except OSError as e:
            raise Refused(f"--png {png}: cannot write it ({e.strerror}); the key is enrolled "
                          "all the same: the URI above holds it") from None
        click.echo(f"QR code written to {png}")


def write_private_file(path: str, data: bytes) -> None:
    """``path`` becomes a new file that only its owner can read (0600).

    A QR code is the TOTP key itself. The bytes go to a temporary file created
    0600 (O_EXCL, O_NOFOLLOW) next to ``path``, which is then renamed over it:
    the key is never readable by others for a moment, an existing file is
    replaced rather than rewritten under its old mode, and a symbolic link put
    in its place is replaced, never followed.
    """
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@user.command("reset", epilog=MAIL_NOTE)
@click.argument("username")
@days_option(None)
@config_option
@pass_app
def user_reset(app: App, username: str, days: int | None) -> None:
    """Clear the key (a lost device) and open a new enrollment period."""
    check_days(app, days)
    name = app.known_user(username)
    period = app.accounts.reset(name, days)
    click.echo(f"{name}: key cleared; enrollment period {plural(period.days, 'day')}"
               f"{mail_note(app, 'notice')}")


@user.command("extend", epilog=MAIL_NOTE)
@click.argument("username")
@click.option("--days", type=int, required=True, help="Days from now (1–365).")
@config_option
@pass_app
def user_extend(app: App, username: str, days: int) -> None:
    """Extend or reopen the enrollment period, counting from now."""
    check_days(app, days)
    name = app.known_user(username)
    period = app.accounts.extend(name, days)
    click.echo(f"{name}: enrollment period {plural(period.days, 'day')} from now"
               f"{mail_note(app, 'notice')}")


@user.command("unlock")
@click.argument("username")
@config_option
@pass_app
def user_unlock(app: App, username: str) -> None:
    """Clear the failure counter and any lockout."""
    name = app.known_user(username)
    app.accounts.unlock(name)
    click.echo(f"{name}: unlocked")


@user.command("bypass")
@click.argument("username")
@click.option("--on/--off", "on", default=None,
              help="Password only for this user (until --off), or not.")
@click.option("--for", "seconds", metavar="DURATION", callback=_duration("--for"),
              help="Password only for this long (15m, 4h, 2d; 1m to 365d), then MFA as "
                   "before, by itself.")
@config_option
@pass_app
def user_bypass(app: App, username: str, on: bool | None, seconds: int | None) -> None:
    """Let this user sign in with the password alone (or stop that).

    --for ends the bypass by itself: sign-ins after that time ask for a code
    again, with nothing left to turn off.
    """
    if (on is None) == (seconds is None):
        raise click.UsageError("give one of --on, --off or --for DURATION")
    _ = app.settings
    if seconds is not None:
        from policy.admin import check_bypass_seconds

        check_bypass_seconds(seconds)  # refused before the user is looked up
    name = app.known_user(username)
    if seconds is not None:
        until = app.accounts.bypass_for(name, seconds)
        click.echo(f"{name}: bypass on until {_iso(until)}")
        return
    app.accounts.bypass(name, bool(on))
    click.echo(f"{name}: bypass {'on' if on else 'off'}")


@user.command("recovery-codes")
@click.argument("username")
@click.option("--json", "as_json", is_flag=True,
              help='One JSON object: {"username": …, "recovery_codes": […]}.')
@config_option
@pass_app
def user_recovery_codes(app: App, username: str, as_json: bool) -> None:
    """Print 10 new single-use recovery codes for an enrolled user, replacing any old ones.

    Each works once in place of a code, on the VPN (password,abcd-efgh-jk or as
    the answer to the code prompt), in LDAP binds and in the portal. Only keyed
    hashes are stored: this is the one time they can be read. Refused when
    [policy] recovery_codes = false.
    """
    name = app.known_user(username)
    issued = app.accounts.new_recovery_codes(name)
    if as_json:
        click.echo(json.dumps({"username": name, "recovery_codes": list(issued.codes)}))
        return
    click.echo(f"{name}: {len(issued.codes)} new recovery codes (older ones no longer work); "
               "each works once in place of a code:")
    click.echo("\n".join(f"  {code}" for code in issued.codes))


@user.command("delete")
@click.argument("username")
@config_option
@pass_app
def user_delete(app: App, username: str) -> None:
    """Remove the user's MFA state: key, requirement, counters, recovery codes.

    The audit rows stay. The directory (or local users file) entry is not
    touched: a user who signs in again starts as never required.
    """
    name = app.known_user(username)
    app.accounts.delete(name)
    click.echo(f"{name}: MFA state deleted (key, requirement, counters, recovery codes); "
               "audit rows kept")


@user.command("resync")
@click.argument("username")
@click.argument("code1")
@click.argument("code2")
@config_option
@pass_app
def user_resync(app: App, username: str, code1: str, code2: str) -> None:
    """Re-synchronise a user whose authenticator's clock is off: CODE1 and CODE2 are
    two codes it shows one after the other.

    They are looked for within ±10 minutes of now; where they are found becomes
    the user's clock offset, and codes are then checked around it (with the
    usual [totp] window). Nothing found: refused, nothing changed.
    """
    name = app.known_user(username)
    done = app.accounts.resync(name, code1, code2)
    minutes, seconds = divmod(abs(done.offset_seconds), 60)
    sign = "-" if done.offset_seconds < 0 else "+"
    click.echo(f"{name}: clock offset {sign}{abs(done.offset_steps)} time step(s) "
               f"({sign}{minutes}m{seconds:02d}s); both codes are used")


@user.command("unrequire")
@click.argument("username")
@config_option
@pass_app
def user_unrequire(app: App, username: str) -> None:
    """Remove the MFA requirement (the key is kept)."""
    name = app.known_user(username)
    app.accounts.unrequire(name)
    click.echo(f"{name}: MFA no longer required")


@user.command("import")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.option("--force", is_flag=True,
              help="Replace the keys users already have (their authenticators stop working).")
@click.option("--allow-unknown", is_flag=True,
              help="Import users the directory does not know (yet).")
@config_option
@pass_app
def user_import(app: App, file: io.TextIOBase, force: bool, allow_unknown: bool) -> None:
    """Bulk load CSV lines `username,secret[,required_days]`, all or nothing.

    An empty secret with required_days requires MFA without a key (a user
    already required keeps the period they have). Every bad line is reported
    by number and nothing is loaded: a key that is not base32 or under 128
    bits, a user who already has a key (unless --force), a user the directory
    does not know (unless --allow-unknown).
    """
    from policy.admin import ImportRefused

    text = file.read()
    resolve = None if allow_unknown else directory_name(app, prefetch=import_names(text))
    try:
        imported = app.accounts.import_csv(text, force=force, resolve=resolve)
    except ImportRefused as e:
        for problem in e.problems:
            click.echo(problem, err=True)
        hints = [option for option, n in (("--force", e.existing_keys),
                                          ("--allow-unknown", e.unknown_users)) if n]
        raise Refused(str(e) + (f" ({' / '.join(hints)} to load those lines anyway)"
                                if hints else "")) from None
    line = f"imported {imported.keys} key(s), {imported.requirements} requirement(s)"
    if imported.replaced:
        line += f"; {imported.replaced} of the keys replaced a key the user had"
    if imported.unchanged:
        line += f"; {imported.unchanged} user(s) already required, left as they are"
    click.echo(line)


def import_names(text: str) -> list[str]:
    """The first field of every line of an import file (what ``resolve`` will be
    asked about; a bad line is reported by the import itself)."""
    import csv

    return [fields[0].strip() for fields in csv.reader(io.StringIO(text))
            if fields and fields[0].strip()]


def directory_name(app: App, prefetch: Sequence[str] = ()) -> Callable[[str], str | None]:
    """A typed name to the directory entry's own name (as serve keys the state),
    None when the directory has no such entry. ``prefetch``: names asked about
    before the first call, several at a time (one look-up per directory
    connection of ``[directory] pool_size``): a 100,000-line import waits for
    the directory's round trips a few at a time, not one by one."""
    from backends.base import DirectoryError
    from policy.usernames import InvalidUsername

    directory, usernames = app.directory, app.usernames
    known: dict[str, str | None] = {}

    def resolve(raw: str) -> str | None:
        if raw in known:
            return known[raw]
        try:
            found = directory.lookup(usernames.lookup_form(raw))
        except InvalidUsername:
            return None
        except DirectoryError as e:
            raise Refused(f"cannot ask the directory about {raw!r}: {e} (--allow-unknown "
                          "imports without asking)") from None
        if found is None:
            return None
        try:
            return str(usernames.canonical(found.username))
        except InvalidUsername:
            return None

    names = list(dict.fromkeys(prefetch))
    ldap = app.settings.directory.ldap
    workers = ldap.pool_size if ldap is not None else 1  # the local file: one at a time
    if len(names) > 1 and workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as pool:
            known.update(zip(names, pool.map(resolve, names), strict=True))
    return resolve


# -- keys and local users --------------------------------------------------------------


@main.group()
def keys() -> None:
    """The key file that encrypts TOTP keys at rest."""


@keys.command("rotate")
@config_option
@pass_app
def keys_rotate(app: App) -> None:
    """Re-encrypt every stored TOTP key under a new key version (no downtime)."""
    rotation = app.accounts.rotate_keys()
    skipped = rotation.changed_meanwhile
    click.echo(f"key version {rotation.version}: re-encrypted {rotation.reencrypted} key(s)"
               + (f", {skipped} changed meanwhile" if skipped else ""))
    failed = rotation.undecryptable
    if failed:
        raise Refused(f"{len(failed)} key(s) could not be decrypted and were left as they "
                      f"are: {', '.join(failed[:20])}")


@main.group("local-user")
def local_user() -> None:
    """Users of the local users file (directory.type = "local")."""


@local_user.command("set")
@click.argument("username")
@click.option("--group", "groups", multiple=True, help="Group membership (repeatable).")
@click.option("--email", metavar="ADDR",
              help="The user's mail address, for MFA mails (\"\" removes it).")
@click.option("--keep-password", is_flag=True,
              help="Change only --group/--email of an existing user; read no password.")
@config_option
@pass_app
def local_user_set(app: App, username: str, groups: tuple[str, ...], email: str | None,
                   keep_password: bool) -> None:
    """Set a local user's password (argon2id): one line from stdin, or prompted."""
    if app.settings.directory.type != "local":
        raise Refused("directory.type is not \"local\": passwords live in the directory")
    name = app.canonical(username)
    if email:
        from policy.mail import valid_address

        if not valid_address(email):
            raise Refused(f"--email: not a mail address: {email!r}")
    if keep_password:
        from backends.base import UnknownUser

        try:
            app.directory.update(name, list(groups) if groups else None, email)
        except UnknownUser:
            raise Refused(f"{name}: no such local user (set a password first)") from None
        click.echo(f"{name}: updated")
        return
    if sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise Refused("empty password")
    app.directory.set_password(name, password, list(groups) if groups else None, email)
    click.echo(f"{name}: password set")


def local_directory(app: App) -> Any:
    if app.settings.directory.type != "local":
        raise Refused("directory.type is not \"local\": users live in the directory")
    return app.directory


@local_user.command("list")
@click.option("--json", "as_json", is_flag=True,
              help="A JSON array of {username, groups, email}.")
@config_option
@pass_app
def local_user_list(app: App, as_json: bool) -> None:
    """The users of the local users file: names, groups, mail addresses."""
    entries = local_directory(app).entries()
    if as_json:
        click.echo(json.dumps([{"username": e.username, "groups": list(e.groups),
                                "email": e.mail} for e in entries]))
        return
    lines = [f"{'USER':24} {'GROUPS':30} EMAIL"]
    lines += [f"{e.username:24} {','.join(e.groups) or '-':30} {e.mail or '-'}"
              for e in entries]
    click.echo("\n".join(lines))


@local_user.command("delete")
@click.argument("username")
@config_option
@pass_app
def local_user_delete(app: App, username: str) -> None:
    """Remove a user from the local users file (the MFA state stays: `user delete`)."""
    from backends.base import UnknownUser

    directory = local_directory(app)
    try:
        name = directory.delete(app.canonical(username))
    except UnknownUser:
        raise Refused(f"{username}: no such local user") from None
    click.echo(f"{name}: removed from the local users file; its MFA state is kept "
               f"(`mfa-proxy user delete {name}` removes it)")


# -- the audit trail -------------------------------------------------------------------


def _audit_time(option: str) -> Callable[[click.Context, click.Parameter, str | None],
                                         float | None]:
    def convert(_ctx: click.Context, _param: click.Parameter, value: str | None) -> float | None:
        if value is None:
            return None
        from proxy.audit import parse_time

        try:
            return parse_time(value, time.time())
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint=option) from None

    return convert


@main.command("audit")
@click.option("--user", "username", metavar="USER", help="One user's rows.")
@click.option("--since", metavar="T", callback=_audit_time("--since"),
              help="From T on: ISO 8601 (local time unless an offset is given) or a time "
                   "ago (15m, 1h, 7d).")
@click.option("--until", metavar="T", callback=_audit_time("--until"), help="Up to T.")
@click.option("--result", type=click.Choice(["accept", "reject", "challenge"]))
@click.option("--reason", metavar="R", help="bad_password, bad_code, locked_out, ...")
@click.option("--protocol", type=click.Choice(["radius", "ldap", "portal"]))
@click.option("--client", metavar="NAME", help="The RADIUS client's name (ldap, portal).")
@click.option("--limit", type=click.IntRange(min=0), default=None,
              help="At most N rows (default 50; with --follow, 10 before the new ones; "
                   "0: all).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--follow", "-f", is_flag=True,
              help="Keep printing new rows as they are written (oldest first), until "
                   "interrupted.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, hidden=True)
@config_option
@pass_app
def audit(app: App, username: str | None, since: float | None, until: float | None,
          result: str | None, reason: str | None, protocol: str | None, client: str | None,
          limit: int | None, as_json: bool, follow: bool, interval: float) -> None:
    """Read the audit trail (one row per decision), newest first.

    Each row: time, user, protocol, client name and source address, result,
    reason, latency. --json gives one object per line with the keys time,
    user, protocol, client, source, result, reason, latency_ms.
    """
    from policy.schema import AuditFilter, StoreError
    from proxy import audit as trail

    where = AuditFilter(username=app.audit_name(username) if username else None,
                        since=since, until=until, result=result, reason=reason,
                        protocol=protocol, client=client)
    store = app.store
    try:
        if not follow:
            found = trail.rows(store, where, 50 if limit is None else (limit or None))
            if not as_json:
                click.echo(trail.TEXT_HEADER)
            trail.emit(found, as_json, click.echo)
            return
        if not as_json:
            click.echo(trail.TEXT_HEADER)
        try:
            for batch in trail.follow(store, where, 10 if limit is None else limit, interval):
                trail.emit(batch, as_json, click.echo)
                sys.stdout.flush()
        except KeyboardInterrupt:
            return
    except StoreError as e:
        raise Refused(str(e)) from None


# -- mail ------------------------------------------------------------------------------


@main.group()
def mail() -> None:
    """Mail to users ([mail]): a test mail, and what waits in the outbox."""


def mail_config(app: App) -> Any:
    m = app.settings.mail
    if m is None:
        raise Refused("mail is off: no [mail] section, or [mail] smtp = \"\"")
    return m


@mail.command("test")
@click.argument("address")
@config_option
@pass_app
def mail_test(app: App, address: str) -> None:
    """Send one test mail to ADDRESS now, through [mail]'s server; print the outcome.

    Exit status 0: the server accepted it; 1: refused or unreachable (with the
    server's reply or the error).
    """
    from policy.mail import MailEvent, render, valid_address, values_for
    from proxy.mail.smtp import build_message, send
    from proxy.state import mail_context

    m = mail_config(app)
    if not valid_address(address):
        raise click.UsageError(f"not a mail address: {address!r}")
    context = mail_context(app.settings)
    rendered = render(context.templates[MailEvent.TEST.value],
                      values_for(None, "", app.clock(), context))
    click.echo(f"sending a test mail to {address} via {m.server} (security {m.security}"
               f"{', AUTH as ' + m.username if m.username else ''})")
    result = send(m, address, build_message(m, address, rendered))
    if result.ok:
        click.echo(f"sent: {result.reply}")
        return
    what = "refused" if result.reason in ("refused", "temporary", "auth") else "failed"
    raise Refused(f"{what} ({result.reason}): {result.reply}")


@mail.command("queue")
@click.option("--all", "show_all", is_flag=True, help="Sent and cancelled mails too.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@config_option
@pass_app
def mail_queue(app: App, show_all: bool, as_json: bool) -> None:
    """Mails pending (waiting for serve, or for a retry) and failed (given up)."""
    from policy.schema import MAIL_STATUSES

    statuses = MAIL_STATUSES if show_all else ("pending", "failed")
    mails = app.store.admin.mail_queue(statuses)
    rows = [{"id": q.id, "event": q.event, "user": q.username, "status": q.status,
             "queued": _iso(q.created_at), "attempts": q.attempts,
             "next_attempt": _iso(q.next_attempt_at) if q.status == "pending" else None,
             "done": _iso(q.done_at) if q.done_at else None, "address": q.address,
             "last_error": q.last_error} for q in mails]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    if not rows:
        click.echo("no mail waiting" + ("" if show_all else " or failed"))
        return
    click.echo(f"{'ID':>6} {'STATUS':9} {'EVENT':10} {'USER':20} {'QUEUED':20} {'TRIES':>5}  "
               "NEXT TRY / LAST ERROR")
    for r in rows:
        tail = r["last_error"] or ""
        if r["status"] == "pending":
            tail = f"{r['next_attempt']}" + (f"  ({tail})" if tail else "")
        click.echo(f"{r['id']:>6} {r['status']:9} {r['event']:10} {r['user']:20} "
                   f"{r['queued']:20} {r['attempts']:>5}  {tail}")


def _iso(ts: int | None) -> str:
    import datetime as dt

    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


if __name__ == "__main__":
    main()
