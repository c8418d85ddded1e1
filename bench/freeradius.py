"""The reference: Debian's FreeRADIUS 3.2 doing the same job as mfa-proxy.

A config generated into a temp dir: one client 127.0.0.1 with
Message-Authenticator required (as mfa-proxy requires it), rlm_ldap
search + bind against the bench slapd as the same service account, and
rlm_totp checking the code against the user's ``totpSecret`` (fetched by the
same search). The User-Password is ``password,code`` -- the same request the
proxy gets in append mode -- split by unlang. Debian's defaults that would
distort the figures are changed: ``reject_delay = 0``, ``max_requests``
raised. ``freeradius -f`` runs in the foreground, so we own its PID.

What rlm_totp (3.2.1) does not do that mfa-proxy does: it takes only the
current time step (no window), keeps no state (no replay protection, no
failure counter or lockout), writes no audit row.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import PEOPLE_DN, SVC_DN, SVC_PASSWORD, Managed, free_udp_pair, tail

FREERADIUS = "/usr/sbin/freeradius"
MODULES = "/usr/lib/freeradius"


def missing() -> str | None:
    """Why the reference cannot run here, or None."""
    for path in (FREERADIUS, f"{MODULES}/rlm_ldap.so", f"{MODULES}/rlm_totp.so"):
        if not os.path.exists(path):
            return f"{path} not found (apt-get install freeradius freeradius-ldap)"
    return None


def version() -> str:
    out = subprocess.run([FREERADIUS, "-v"], capture_output=True, text=True, timeout=10,
                         check=False).stdout
    first = out.splitlines()[0] if out else ""
    return first.split("Version", 1)[-1].split(",")[0].strip() or "?"


@dataclass
class Reference:
    proc: Managed
    port: int
    secret: str
    workdir: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


def radiusd_conf(workdir: Path, port: int, ldap_port: int, secret: str, threads: int) -> str:
    return f"""\
prefix = /usr
exec_prefix = /usr
sysconfdir = /etc
localstatedir = /var
sbindir = /usr/sbin
logdir = {workdir}/log
raddbdir = {workdir}
confdir = {workdir}
run_dir = {workdir}/run
db_dir = {workdir}
libdir = {MODULES}
pidfile = ${{run_dir}}/radiusd.pid
name = radiusd
max_request_time = 30
cleanup_delay = 5
# Debian's 16384 is too small above ~3k requests/s with cleanup_delay = 5
max_requests = 1048576
hostname_lookups = no

log {{
	destination = files
	file = ${{logdir}}/radius.log
	colourise = no
	auth = no
	auth_badpass = no
	auth_goodpass = no
}}

security {{
	allow_core_dumps = no
	max_attributes = 200
	# Debian's 1 s would slow every reject down
	reject_delay = 0
	status_server = yes
}}

proxy_requests = no

thread pool {{
	start_servers = 5
	max_servers = {threads}
	min_spare_servers = 3
	max_spare_servers = 10
	max_queue_size = 65536
	max_requests_per_server = 0
	auto_limit_acct = no
}}

client bench {{
	ipaddr = 127.0.0.1
	secret = {secret}
	require_message_authenticator = yes
	nas_type = other
	shortname = bench
}}

modules {{
	always ok {{
		rcode = ok
	}}
	always reject {{
		rcode = reject
	}}
	ldap {{
		server = '127.0.0.1'
		port = {ldap_port}
		identity = '{SVC_DN}'
		password = '{SVC_PASSWORD}'
		base_dn = '{PEOPLE_DN}'
		update {{
			control:TOTP-Secret := 'totpSecret'
		}}
		user_dn = "LDAP-UserDn"
		user {{
			base_dn = "${{..base_dn}}"
			filter = "(uid=%{{%{{Stripped-User-Name}}:-%{{User-Name}}}})"
			scope = 'sub'
		}}
		options {{
			chase_referrals = no
			rebind = no
			res_timeout = 10
			srv_timelimit = 3
			net_timeout = 1
			idle = 60
			probes = 3
			interval = 3
			ldap_debug = 0x0000
		}}
		pool {{
			start = 5
			min = 3
			max = {threads}
			spare = 10
			uses = 0
			retry_delay = 1
			lifetime = 0
			idle_timeout = 0
		}}
	}}
	totp {{
	}}
}}

server default {{
	listen {{
		type = auth
		ipaddr = 127.0.0.1
		port = {port}
	}}
	authorize {{
		# User-Password is "<password>,<6 digits>", as mfa-proxy's append mode has it
		if (&User-Password =~ /^(.+),([0-9]{{6}})$/) {{
			update request {{
				&TOTP-Password := "%{{2}}"
				&User-Password := "%{{1}}"
			}}
		}}
		else {{
			reject
		}}
		ldap
		if (!ok && !updated) {{
			reject
		}}
		# without a secret rlm_totp returns noop, which would accept the password alone
		if (!&control:TOTP-Secret) {{
			reject
		}}
		update control {{
			&Auth-Type := LDAP
		}}
	}}
	authenticate {{
		Auth-Type LDAP {{
			ldap
			totp
		}}
	}}
	post-auth {{
		Post-Auth-Type REJECT {{
			ok
		}}
	}}
}}
"""


def start(workdir: Path, ldap_port: int, secret: str, threads: int = 32) -> Reference:
    """Write the config, check it (``-C``), run ``freeradius -f``; returns once it listens."""
    reason = missing()
    if reason:
        raise RuntimeError(reason)
    workdir = workdir.resolve()
    for d in ("log", "run"):
        (workdir / d).mkdir(parents=True, exist_ok=True)
    port = free_udp_pair()
    (workdir / "radiusd.conf").write_text(radiusd_conf(workdir, port, ldap_port, secret,
                                                       threads))
    check = subprocess.run([FREERADIUS, "-C", "-d", str(workdir), "-n", "radiusd"],
                           capture_output=True, text=True, timeout=60, check=False)
    if check.returncode != 0:
        raise RuntimeError(f"freeradius -C failed:\n{check.stdout[-3000:]}{check.stderr[-2000:]}"
                           f"{tail(workdir / 'log' / 'radius.log')}")
    proc = Managed.start("freeradius", [FREERADIUS, "-f", "-d", str(workdir), "-n", "radiusd"],
                         workdir / "freeradius.out")
    try:
        _wait_listening(proc, port, workdir)
    except BaseException:
        proc.stop()
        raise
    return Reference(proc, port, secret, workdir)


def udp_listening(port: int) -> bool:
    """Whether some socket is bound to 127.0.0.1:port (UDP), from /proc/net/udp."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/udp") as f:
        return any(line.split()[1] == want for line in list(f)[1:])


def _wait_listening(proc: Managed, port: int, workdir: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"freeradius exited {proc.popen.returncode}:\n"
                               f"{tail(proc.log_path)}{tail(workdir / 'log' / 'radius.log')}")
        if udp_listening(port):
            return
        time.sleep(0.1)
    raise RuntimeError(f"freeradius did not listen on {port} within {timeout:g} s:\n"
                       f"{tail(workdir / 'log' / 'radius.log')}")
