"""What one Access-Request costs the RADIUS layer in CPU: measured, never asserted.

Run ``.venv/bin/python -m bench.radius_packet_cost`` to see the figures; the
loops are small and bounded. A measurement, not a test.  Compared:

- pyrad: AuthPacket decode, Message-Authenticator check, PwDecrypt, CreateReply + ReplyPacket
- packet: this project's parse, verify, password decode and signed Access-Accept
- server: RadiusServer.handle_auth end to end with an instant fake core
  (client lookup, duplicate cache, AuthRequest, a Deferred, reply attributes)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from pyrad.dictionary import Dictionary
from pyrad.packet import AccessAccept, AuthPacket
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from backends.base import Identity
from policy.decision import AuthRequest, Decision, Outcome, Reason
from proxy.radius.clients import ClientTable, RadiusClientConfig, ReplyRule
from proxy.radius.packet import (
    SHIPPED_DICTIONARY,
    Attr,
    access_accept,
    decode_user_password,
    parse_datagram,
    verify_message_authenticator,
)
from proxy.radius.server import RadiusServer, ServerSettings
from proxy.radius.testing import access_request

DICTIONARY = Dictionary(str(SHIPPED_DICTIONARY))
SECRET = b"a-long-random-shared-secret"
ROUNDS = 3000
# What a VPN concentrator typically sends besides the credentials.
NAS_ATTRIBUTES = [(4, bytes((10, 0, 0, 1))), (5, (7).to_bytes(4, "big")),
                  (6, (2).to_bytes(4, "big")), (31, b"203.0.113.7"), (32, b"vpn-1"),
                  (61, (5).to_bytes(4, "big"))]


def requests(n: int) -> list[bytes]:
    return [access_request(SECRET, f"user{i:05d}", f"pass{i:05d},123456",
                           identifier=i % 256, extra=NAS_ATTRIBUTES) for i in range(n)]


def per_packet_microseconds(run: Callable[[bytes], object], packets: list[bytes]) -> float:
    best = float("inf")
    for _ in range(3):  # best of three: the machine is shared
        started = time.process_time()
        for packet in packets:
            run(packet)
        best = min(best, time.process_time() - started)
    return best / len(packets) * 1e6


def with_pyrad(data: bytes) -> bytes:
    request = AuthPacket(packet=data, dict=DICTIONARY, secret=SECRET)
    assert request.verify_message_authenticator()
    request["User-Name"]
    request.PwDecrypt(request[2][0])
    reply = request.CreateReply()
    reply.code = AccessAccept
    reply["Class"] = b"admins"
    return reply.ReplyPacket()


def with_packet_module(data: bytes) -> bytes:
    packet = parse_datagram(data)
    assert not isinstance(packet, str)
    assert verify_message_authenticator(packet, SECRET)
    (packet.first(Attr.USER_NAME) or b"").decode()
    decode_user_password(packet.first(Attr.USER_PASSWORD) or b"", SECRET, packet.authenticator)
    return access_accept(packet, SECRET, "", b"\x19\x08admins")


def server_path() -> Callable[[bytes], object]:
    identity = Identity("u", groups=("admins",))

    def core(request: AuthRequest):
        return succeed(Decision(Outcome.ACCEPT, Reason.OK, request.username, identity))

    server = RadiusServer(
        ClientTable([RadiusClientConfig("vpn", ("10.0.0.0/8",), SECRET)]), core, DICTIONARY,
        clock=Clock(),
        settings=ServerSettings(reply_rules=(ReplyRule("admins", {"Class": "admins"}),)))
    sent: list[bytes] = []
    port = iter(range(1024, 65536))
    return lambda data: server.handle_auth(data, ("10.0.0.1", next(port)), sent.append)


def measure() -> dict[str, float]:
    packets = requests(ROUNDS)
    return {
        "pyrad decode+verify+password+reply": per_packet_microseconds(with_pyrad, packets),
        "proxy.radius.packet, same work": per_packet_microseconds(with_packet_module, packets),
        "RadiusServer.handle_auth, fake core": per_packet_microseconds(server_path(), packets),
    }


def report() -> None:
    for name, micros in measure().items():
        print(f"{name:40s} {micros:6.1f} µs CPU per Access-Request")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    report()
