"""The product as a plain pip install runs it, outside the checkout.

SLOW (marked ``packaging``; about half a minute, once per test session): the
session fixture builds the wheel from a copy of exactly what the Dockerfile
copies into its build stage, installs it (without extras, so without the
PostgreSQL driver) into a fresh venv in a temporary folder, from the index
pip is set up with, and every test runs that venv's ``mfa-proxy`` from a
folder outside the checkout: the RADIUS dictionary and the configs must come
from the package, not from ``conf/`` next to the code.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.configs import STATE_AND_LOCAL_DIRECTORY, http_section, radius_section
from tests.integration.test_serve import free_tcp_port, free_udp_pair, get

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT = 480.0  # bounds, never expectations
START_WAIT = 90.0
STOP_WAIT = 30.0
NAS_SECRET = "packaging-test-nas-secret"


def dockerfile_build_context() -> list[str]:
    """What the Dockerfile's first stage COPYs from the build context (not --from)."""
    stages = re.split(r"(?m)^FROM ", (REPO / "Dockerfile").read_text())
    sources: list[str] = []
    for line in stages[1].splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources += words[1:-1]
    return sources


@dataclass(frozen=True)
class Install:
    venv: Path
    wheel: Path
    outside: Path  # a folder outside the checkout, the working directory of every run

    @property
    def mfa_proxy(self) -> str:
        return str(self.venv / "bin" / "mfa-proxy")

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("MFA_PROXY_CONFIG", "PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env.update(extra)
        return env

    def run(self, *args: str, cwd: Path | None = None, input: str | None = None,
            **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.mfa_proxy, *args], cwd=cwd or self.outside,
                              env=self.env(**env), input=input, capture_output=True,
                              text=True, timeout=120, check=False)


def pip_errors(p: subprocess.CompletedProcess[str]) -> str:
    # pip's config names an extra index folder that may be absent: not an error
    lines = (p.stdout + p.stderr).splitlines()
    return "\n".join(line for line in lines if "is ignored: it is neither" not in line)


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Install:
    root = tmp_path_factory.mktemp("packaging")
    assert REPO not in root.parents, "the fresh install must be outside the checkout"
    src = root / "src"
    src.mkdir()
    for name in dockerfile_build_context():
        source = REPO / name
        if source.is_dir():  # links kept, as docker COPY keeps them
            shutil.copytree(source, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, src / name)
    wheels = root / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--wheel-dir", str(wheels),
         str(src)], capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False)
    assert build.returncode == 0, pip_errors(build)
    (wheel,) = wheels.glob("mfa_proxy-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False)
    assert install.returncode == 0, pip_errors(install)
    outside = root / "elsewhere"
    outside.mkdir()
    return Install(venv, wheel, outside)


def test_the_wheel_carries_the_package_data(installed: Install) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        shipped = {
            "proxy/data/dictionary": REPO / "conf" / "dictionary",
            "proxy/data/mfa-proxy.toml": REPO / "conf" / "mfa-proxy.toml",
            "proxy/data/examples/ldap.toml": REPO / "conf" / "examples" / "ldap.toml",
            "proxy/data/examples/docker.toml": REPO / "conf" / "examples" / "docker.toml",
            "proxy/data/grafana/mfa-proxy.json": REPO / "conf" / "grafana" / "mfa-proxy.json",
            "proxy/data/prometheus/mfa-proxy-rules.yml":
                REPO / "conf" / "prometheus" / "mfa-proxy-rules.yml",
            "proxy/data/systemd/mfa-proxy.service":
                REPO / "conf" / "systemd" / "mfa-proxy.service",
            **{f"proxy/data/mail/{p.name}": p for p in (REPO / "conf" / "mail").glob("*.txt")},
        }
        assert len(shipped) == 4 + 3 + 7  # configs, monitoring and unit, mail templates
        for name, source in shipped.items():
            assert name in names, name
            assert wheel.read(name) == source.read_bytes(), name  # the file, not a link
        assert not any(n.startswith("conf/") for n in names)


def test_the_install_does_not_use_the_checkout(installed: Install) -> None:
    code = ("import importlib.util, proxy.data, proxy.radius.packet as p; "
            "print(proxy.data.__file__); print(p.SHIPPED_DICTIONARY); "
            "print(importlib.util.find_spec('psycopg') is None)")
    p = subprocess.run([str(installed.venv / "bin" / "python"), "-c", code],
                       cwd=installed.outside, env=installed.env(), capture_output=True,
                       text=True, timeout=60, check=True)
    data, dictionary, no_psycopg = p.stdout.splitlines()
    site = installed.venv / "lib"
    assert Path(data).is_relative_to(site) and Path(dictionary).is_relative_to(site)
    assert Path(dictionary).is_file() and not Path(dictionary).is_symlink()
    assert no_psycopg == "True"  # the [postgres] extra was not asked for
    version = installed.run("--version")
    assert version.returncode == 0 and "0." in version.stdout, version.stderr


def minimal_config(folder: Path, radius: int, http: int) -> Path:
    folder.mkdir()
    config = folder / "mfa-proxy.toml"
    config.write_text(STATE_AND_LOCAL_DIRECTORY
                      + radius_section(radius, NAS_SECRET, "nas", "127.0.0.1/32")
                      + http_section(http) + f"""

# the mail templates are package data: check-config and serve load them
[mail]
smtp = "127.0.0.1:{free_tcp_port()}"
security = "none"
from = "MFA <mfa@example.org>"
""")
    return config


def access_request(port: int, username: str, password: str) -> int:
    """One PAP Access-Request (with a Message-Authenticator) by pyrad; the reply's code."""
    from pyrad.client import Client
    from pyrad.dictionary import Dictionary

    from proxy.radius.packet import SHIPPED_DICTIONARY

    nas = Client(server="127.0.0.1", authport=port, secret=NAS_SECRET.encode(),
                 dict=Dictionary(str(SHIPPED_DICTIONARY)), retries=2, timeout=10,
                 enforce_ma=True)
    request = nas.CreateAuthPacket(User_Name=username)
    request["User-Password"] = request.PwCrypt(password)
    return int(nas.SendPacket(request).code)


@pytest.fixture
def serving(installed: Install, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes],
                                                                  int, int, Path]]:
    radius, http = free_udp_pair(), free_tcp_port()
    config = minimal_config(tmp_path / "site", radius, http)
    check = installed.run("check-config", "-c", str(config))
    assert (check.returncode, check.stdout) == (0, f"{config}: OK\n"), check.stderr
    user = installed.run("local-user", "set", "alice", "-c", str(config), input="alice-pw\n")
    assert user.returncode == 0, user.stdout + user.stderr
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen([installed.mfa_proxy, "serve", "-c", str(config)],
                                   cwd=installed.outside, env=installed.env(),
                                   stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_WAIT
        while True:
            if process.poll() is not None:
                pytest.fail(f"serve exited {process.returncode}:\n{log.read_text()}")
            try:
                if get(f"http://127.0.0.1:{http}/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"/healthz did not answer within {START_WAIT:g} s:\n"
                            f"{log.read_text()}")
            time.sleep(0.1)
        yield process, radius, http, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(STOP_WAIT)


def test_check_config_and_serve_from_the_wheel(serving: tuple[subprocess.Popen[bytes], int,
                                                                 int, Path]) -> None:
    process, radius, http, log = serving
    assert get(f"http://127.0.0.1:{http}/healthz") == (200, "ok\n")
    # answered at all: the packaged dictionary loaded; Accept: the whole core ran
    assert access_request(radius, "alice", "alice-pw") == 2  # Access-Accept
    assert access_request(radius, "alice", "wrong") == 3  # Access-Reject
    process.send_signal(signal.SIGTERM)
    assert process.wait(STOP_WAIT) == 0, log.read_text()


def test_the_config_search_order_outside_the_checkout(installed: Install,
                                                      tmp_path: Path) -> None:
    here = tmp_path / "here"
    here.mkdir()
    if not Path("/etc/mfa-proxy/mfa-proxy.toml").exists():  # this machine's own: left alone
        none = installed.run("check-config", cwd=here)
        assert none.returncode == 2
        assert none.stderr.splitlines() == [
            f"config error: no config file: $MFA_PROXY_CONFIG is not set and none of "
            f"{here / 'conf' / 'mfa-proxy.toml'}, /etc/mfa-proxy/mfa-proxy.toml exists; give "
            "one with -c FILE, or write the packaged default with `mfa-proxy init-config` "
            "(to ./conf/mfa-proxy.toml)"]

    # the packaged default, written where serve looks, works from there
    init = installed.run("init-config", cwd=here)
    assert init.returncode == 0, init.stderr
    written = here / "conf" / "mfa-proxy.toml"
    assert written.read_text() == (REPO / "conf" / "mfa-proxy.toml").read_text()
    assert installed.run("init-config", cwd=here).returncode == 1  # never overwritten
    found = installed.run("check-config", cwd=here)
    assert (found.returncode, found.stdout) == (0, f"{written}: OK\n"), found.stderr
    assert (here / "var" / "radius-localhost.secret").is_file()  # ../var, beside conf/

    # $MFA_PROXY_CONFIG comes first; naming a missing file is an error, not a fallback
    named = minimal_config(tmp_path / "named", free_udp_pair(), free_tcp_port())
    first = installed.run("check-config", cwd=here, MFA_PROXY_CONFIG=str(named))
    assert (first.returncode, first.stdout) == (0, f"{named}: OK\n"), first.stderr
    gone = installed.run("check-config", cwd=here, MFA_PROXY_CONFIG=str(tmp_path / "gone"))
    assert gone.returncode == 2
    assert gone.stderr == (f"config error: {tmp_path / 'gone'}: no such file "
                           "(named by $MFA_PROXY_CONFIG)\n")

    # the packaged examples come out of the package too
    example = installed.run("init-config", "--example", "docker", "-", cwd=here)
    assert example.stdout == (REPO / "conf" / "examples" / "docker.toml").read_text()


def test_postgres_without_the_driver_says_which_extra(installed: Install,
                                                      tmp_path: Path) -> None:
    config = minimal_config(tmp_path / "site", free_udp_pair(), free_tcp_port())
    config.write_text(config.read_text().replace(
        '"sqlite:///var/state.db"', '"postgresql+psycopg://mfa@127.0.0.1:1/mfa"'))
    expected = ["config error: state.url: PostgreSQL needs the psycopg driver, which is not "
                "installed: pip install 'mfa-proxy[postgres]'"]
    for command in ("check-config", "serve"):
        p = installed.run(command, "-c", str(config))
        assert (p.returncode, p.stderr.splitlines()) == (2, expected), (command, p.stderr)
