#!/usr/bin/env python3
"""Write the seed corpora tests/fuzz/corpus/{cells,socks}/ from onionp2p's own encoders.

    .venv/bin/python tests/fuzz/make_corpus.py

Each seed is a small valid input for one harness target, laid out as fuzzlib.py
describes (target number, then the target's bytes, streams cut into chunks). The
generated files are committed; rerun this after changing a harness's input layout or
a wire format. Everything is deterministic except the RSA identity key and what depends
on it (the X.509 certificate and the cross-certificate): cryptography cannot generate an
RSA key from a seed.

Certificates are issued for fuzzlib.NOW, the clock of the harnesses, so the committed
chains stay valid. Before writing, every seed that should be accepted is checked against
the real decoders (a link handshake seed must complete the handshake), so a corpus that
only exercises error paths cannot be committed by mistake.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import shutil
import struct
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from fuzzlib import (  # noqa: E402
    CELL_TARGETS,
    NOW,
    SOCKS_TARGETS,
    TLS_CERT_DER,
    TLS_CERT_SHA256,
    fdp_input,
    stream_input,
)

from onionp2p.proto import cells as C  # noqa: E402
from onionp2p.proto import certs as X  # noqa: E402
from onionp2p.proto import relaycell as R  # noqa: E402
from onionp2p.proto.dnsmsg import parse_query  # noqa: E402
from onionp2p.proto.hs import cells as H  # noqa: E402
from onionp2p.proto.httpconnect import HttpConnectParser  # noqa: E402
from onionp2p.proto.link import AUTH0003_LEN, LinkHandshake, verify_certs  # noqa: E402
from onionp2p.proto.socks import (
    RequestReady,  # noqa: E402
    SocksParser,  # noqa: E402
)
from onionp2p.relay.hsdir import DESC_SIG_PREFIX, parse_outer  # noqa: E402

CELLS_DIR = HERE / "corpus" / "cells"
SOCKS_DIR = HERE / "corpus" / "socks"
YEAR = 365 * 86400.0


def _ed_key(name: str) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"onionp2p fuzz " + name.encode()).digest())


def _raw(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


class Chain:
    """A relay's certificates, valid at NOW; the type 5 certificate is for TLS_CERT_DER."""

    def __init__(self) -> None:
        identity, signing, link_auth = _ed_key("identity"), _ed_key("signing"), _ed_key("link auth")
        exp = X.expiry_hours(NOW + YEAR)
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        self.rsa_x509 = X.make_rsa_identity_cert(self.rsa, NOW, lifetime=2 * YEAR)
        self.signing = X.Ed25519Cert.create(X.CertType.IDENTITY_V_SIGNING, _raw(signing), identity,
                                            expires_hours=exp)
        self.tls_link = X.Ed25519Cert.create(X.CertType.SIGNING_V_TLS_CERT, TLS_CERT_SHA256, signing,
                                             expires_hours=exp, key_type=X.KeyType.SHA256_OF_X509,
                                             include_signer=False)
        self.link_auth = X.Ed25519Cert.create(X.CertType.SIGNING_V_LINK_AUTH, _raw(link_auth), signing,
                                              expires_hours=exp, include_signer=False)
        self.cross = X.RsaCrossCert.create(self.rsa, _raw(identity), exp)
        # An extension the verifier does not know and may ignore (flags 0).
        self.with_extension = X.Ed25519Cert.create(
            X.CertType.IDENTITY_V_SIGNING, _raw(signing), identity, expires_hours=exp,
            extensions=(X.CertExtension(0x77, 0, b"opaque"),))

    def certs(self, leaf: X.Ed25519Cert) -> C.Certs:
        return C.Certs((C.CertEntry(2, self.rsa_x509), C.CertEntry(4, self.signing.encode()),
                        C.CertEntry(int(leaf.cert_type), leaf.encode()), C.CertEntry(7, self.cross.encode())))


def var(command: int, payload: bytes, width: int = 4) -> bytes:
    return C.encode_var(0, command, payload, circ_id_len=width)


def fixed(command: int, payload: bytes = b"", circ_id: int = 0) -> bytes:
    return C.encode_fixed(circ_id, command, payload)


def netinfo(peer: str | None, mine: tuple[str, ...], ts: int = int(NOW)) -> bytes:
    return C.NetInfo(ts, ipaddress.ip_address(peer) if peer else None,
                     tuple(ipaddress.ip_address(a) for a in mine)).encode()


def relay_body(command: int, stream_id: int, data: bytes) -> bytes:
    """A relay cell body without its padding (the harness pads with zeros to 509)."""
    return struct.pack(">BHH4sH", command, 0, stream_id, b"\0" * 4, len(data)) + data


def _exporter(label: bytes, context: bytes) -> bytes:
    return hashlib.sha256(label + b"\0" + context).digest()


def _handshake_completes(stream: bytes, *, initiator: bool) -> bool:
    """Does a client initiator (or a relay responder) finish the handshake on ``stream``?"""
    import tempfile

    from onionp2p.relay.keys import RelayKeys

    if initiator:
        hs = LinkHandshake(initiator=True, keys=None, now=NOW)
        hs.tls_established(None, TLS_CERT_DER, _exporter)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            keys = RelayKeys.load_or_create(os.path.join(tmp, "keys"), now=NOW)
        hs = LinkHandshake(initiator=False, keys=keys, now=NOW)
        hs.tls_established(TLS_CERT_DER, None, _exporter)
    hs.start()
    reader = C.CellReader()
    reader.receive_data(stream)
    while not hs.done:
        reader.circ_id_len = hs.circ_id_len
        cell = reader.next_cell()
        if cell is None:
            return False
        hs.receive_cell(cell)
    return True


def cell_seeds(chain: Chain) -> dict[str, bytes]:
    t = {name: i for i, name in enumerate(CELL_TARGETS)}
    seeds: dict[str, bytes] = {}

    def payload(target: str, name: str, data: bytes, *ints: int) -> None:
        seeds[f"{target}-{name}"] = fdp_input(data, [t[target], *ints])

    # A responder's side of the link handshake, and a client's and a relay's initiator side.
    responder = b"".join((
        var(7, C.Versions((4, 5)).encode(), 2),
        var(129, chain.certs(chain.tls_link).encode()),
        var(130, C.AuthChallenge(bytes(range(32)), (3,)).encode()),
        fixed(8, netinfo("127.0.0.1", ("127.0.0.1",))),
    ))
    assert _handshake_completes(responder, initiator=True), "responder transcript does not complete"
    client = var(7, C.Versions((3, 4, 5)).encode(), 2) + fixed(8, netinfo("127.0.0.1", ()))
    assert _handshake_completes(client, initiator=False), "client transcript does not complete"
    relay_init = b"".join((
        var(7, C.Versions((4, 5)).encode(), 2),
        var(128, bytes(10)),  # VPADDING
        var(129, chain.certs(chain.link_auth).encode()),
        var(131, C.Authenticate(3, b"AUTH0003" + bytes(AUTH0003_LEN - 8)).encode()),
        fixed(8, netinfo("127.0.0.1", ("127.0.0.1",))),
    ))
    open_link = b"".join((
        var(7, C.Versions((4, 5)).encode(), 2),
        fixed(8, netinfo("127.0.0.1", ())),
        fixed(10, C.Create2(2, bytes(84)).encode(), 0x80000001),
        fixed(3, relay_body(2, 1, b"GET / HTTP/1.0\r\n\r\n"), 0x80000001),
        fixed(9, bytes(509), 0x80000001),
        fixed(0),
        var(128, bytes(3)),
        fixed(11, C.Created2(bytes(64)).encode(), 5),
        fixed(4, C.Destroy(C.DestroyReason.FINISHED).encode(), 0x80000001),
        var(132, b"x"),
    ))

    def stream(target: str, name: str, data: bytes, cuts: list[int], *head: int) -> None:
        seeds[f"{target}-{name}"] = stream_input([t[target], *head], data, cuts)

    stream("reader", "responder-handshake", responder, [256])
    stream("reader", "client-handshake", client, [7])
    stream("reader", "open-link-cells", open_link, [1, 13, 200, 256])
    stream("reader", "versions-after-handshake", client + var(7, C.Versions((4,)).encode()), [256])
    stream("reader", "var-cell-too-long", client + b"\0\0\0\0\x81\x40\x01", [256])
    stream("link_initiator", "client", responder, [256, 100], 0)
    stream("link_initiator", "relay", responder, [256], 1)
    stream("link_initiator", "no-challenge", b"".join((
        var(7, C.Versions((5,)).encode(), 2), var(129, chain.certs(chain.tls_link).encode()),
        fixed(8, netinfo("::1", ("::1",))))), [256], 0)
    stream("link_responder", "client", client, [5, 256])
    stream("link_responder", "relay", relay_init, [256])

    payload("versions", "3-4-5", C.Versions((3, 4, 5)).encode())
    payload("versions", "4-5", C.Versions((4, 5)).encode())
    payload("netinfo", "relay-v4", netinfo("127.0.0.1", ("127.0.0.2",)).ljust(509, b"\0"))
    payload("netinfo", "relay-v6", netinfo("::1", ("::1", "127.0.0.1")))
    payload("netinfo", "client", netinfo(None, (), 0))
    payload("certs", "responder", chain.certs(chain.tls_link).encode())
    payload("certs", "initiator", chain.certs(chain.link_auth).encode())
    payload("certs", "empty", C.Certs(()).encode())
    payload("auth_challenge", "method3", C.AuthChallenge(bytes(range(32)), (3,)).encode())
    payload("auth_challenge", "methods", C.AuthChallenge(bytes(32), (1, 3, 4)).encode())
    payload("authenticate", "auth0003", C.Authenticate(3, b"AUTH0003" + bytes(AUTH0003_LEN - 8)).encode())
    payload("create2", "ntor", C.Create2(2, bytes(range(84))).encode().ljust(509, b"\0"))
    payload("created2", "ntor", C.Created2(bytes(range(64))).encode().ljust(509, b"\0"))
    for reason in (0, 1, 9, 12):
        payload("destroy", f"reason{reason}", C.Destroy(reason).encode())
    payload("padding_negotiate", "start", C.PaddingNegotiate(2, 1500, 9500).encode())
    payload("padding_negotiate", "stop", C.PaddingNegotiate(1).encode())

    messages = {
        "begin-hostname": R.Begin("example.com", 80),
        "begin-ipv6-flags": R.Begin("::1", 443, R.Begin.IPV6_OK | R.Begin.IPV6_PREFERRED),
        "begin-ipv4": R.Begin("127.0.0.1", 8000),
        "begin-dir": R.BeginDir(),
        "data": R.Data(b"HTTP/1.0 200 OK\r\n\r\nhello"),
        "end-done": R.End(R.EndReason.DONE),
        "end-exitpolicy-v4": R.End(R.EndReason.EXITPOLICY, ipaddress.ip_address("192.0.2.1"), 300),
        "end-exitpolicy-v6": R.End(R.EndReason.EXITPOLICY, ipaddress.ip_address("2001:db8::1"), 300),
        "connected-empty": R.Connected(),
        "connected-v4": R.Connected(ipaddress.ip_address("127.0.0.1"), 60),
        "connected-v6": R.Connected(ipaddress.ip_address("::1"), 60),
        "sendme-v0": R.Sendme(),
        "sendme-v1": R.Sendme(1, bytes(range(20))),
        "extend2": R.Extend2((R.LinkSpec.ipv4("127.0.0.1", 9001), R.LinkSpec.legacy_id(bytes(20)),
                              R.LinkSpec.ed25519_id(bytes(32)), R.LinkSpec.ipv6("::1", 9001)),
                             2, bytes(84)),
        "extended2": R.Extended2(bytes(64)),
        "truncate": R.Truncate(),
        "truncated": R.Truncated(C.DestroyReason.REQUESTED),
        "drop": R.Drop(b"pad"),
        "resolve": R.Resolve("example.com"),
        "resolve-ptr": R.Resolve("1.0.0.127.in-addr.arpa"),
        "resolved": R.Resolved((R.ResolvedAnswer(4, bytes((127, 0, 0, 1)), 60),
                                R.ResolvedAnswer(6, ipaddress.ip_address("::1").packed, 60),
                                R.ResolvedAnswer(0, b"localhost", 60),
                                R.ResolvedAnswer(0xF0, b"", 0))),
    }
    for name, msg in messages.items():
        sid = 1 if msg.command in R.STREAM_COMMANDS else 0
        body = relay_body(int(msg.command), sid, msg.encode())
        assert R.parse_message(*R.unpack_relay(body.ljust(509, b"\0"))[::2]) is not None
        payload("relay", name, body)
    payload("relay", "xon-unimplemented", relay_body(44, 1, b"\0"))

    payload("ed25519_cert", "identity-v-signing", chain.signing.encode())
    payload("ed25519_cert", "signing-v-tls", chain.tls_link.encode())
    payload("ed25519_cert", "signing-v-link-auth", chain.link_auth.encode())
    payload("ed25519_cert", "unknown-extension", chain.with_extension.encode())
    payload("cross_cert", "rsa-v-identity", chain.cross.encode())
    payload("x509", "rsa-identity", chain.rsa_x509)
    payload("verify_certs", "responder", chain.certs(chain.tls_link).encode(), 0)
    payload("verify_certs", "initiator", chain.certs(chain.link_auth).encode(), 1)
    # The chains must verify: otherwise the fuzzer never gets past the first check.
    verify_certs(chain.certs(chain.tls_link), leaf_type=5, now=NOW, tls_cert_der=TLS_CERT_DER)
    verify_certs(chain.certs(chain.link_auth), leaf_type=6, now=NOW)
    chain.with_extension.verify(now=NOW)

    # onion-service messages (the first int picks the command: 32 + it)
    auth = _ed_key("hs-auth")
    intro = H.EstablishIntro.create(auth, bytes(range(20)), (H.DosParams(25, 200).extension(),)).encode()
    payload("hs_cell", "establish-intro", intro, 0)
    payload("hs_cell", "establish-rendezvous", bytes(range(20)), 1)
    introduce1 = H.Introduce1(_raw(auth), bytes(range(64)), (H.Extension(9, b"x"),)).encode()
    payload("hs_cell", "introduce1", introduce1, 2)
    payload("hs_cell", "rendezvous1", bytes(range(20)) + bytes(64), 4)
    payload("hs_cell", "intro-established", H.IntroEstablished().encode(), 6)
    payload("hs_cell", "introduce-ack", H.IntroduceAck(H.IntroAckStatus.UNKNOWN_ID).encode(), 8)
    desc = hs_descriptor(_ed_key("hs-blinded"), _ed_key("hs-signing"))
    parse_outer(desc, NOW)  # it must pass, or the fuzzer never gets past the first check
    payload("hs_descriptor", "outer", desc)
    return seeds


def hs_descriptor(blinded: ed25519.Ed25519PrivateKey, signing: ed25519.Ed25519PrivateKey) -> bytes:
    """A v3 descriptor's outer layer, valid at NOW (superencrypted part: fixed bytes)."""
    def pem(kind: str, raw: bytes) -> str:
        b = base64.b64encode(raw).decode()
        return f"-----BEGIN {kind}-----\n" + "\n".join(b[i:i + 64] for i in range(0, len(b), 64)) \
            + f"\n-----END {kind}-----\n"
    cert = X.Ed25519Cert.create(X.CertType.HS_BLINDED_ID_V_SIGNING, _raw(signing), blinded,
                                expires_hours=X.expiry_hours(NOW + 3 * 3600))
    body = (f"hs-descriptor 3\ndescriptor-lifetime 180\ndescriptor-signing-key-cert\n"
            f"{pem('ED25519 CERT', cert.encode())}revision-counter 42\nsuperencrypted\n"
            f"{pem('MESSAGE', bytes(range(256)) * 2)}")
    sig = signing.sign(DESC_SIG_PREFIX + body.encode())
    return (body + "signature " + base64.b64encode(sig).decode().rstrip("=") + "\n").encode()


def socks_seeds() -> dict[str, bytes]:
    t = {name: i for i, name in enumerate(SOCKS_TARGETS)}
    seeds: dict[str, bytes] = {}

    def greet(*methods: int) -> bytes:
        return bytes((5, len(methods), *methods))

    def auth(user: bytes, pw: bytes) -> bytes:
        return bytes((1, len(user))) + user + bytes((len(pw),)) + pw

    def req5(cmd: int, atyp: int, addr: bytes, port: int) -> bytes:
        if atyp == 3:
            addr = bytes((len(addr),)) + addr
        return bytes((5, cmd, 0, atyp)) + addr + struct.pack(">H", port)

    def req4(cmd: int, port: int, ip: bytes, user: bytes, host: bytes | None = None) -> bytes:
        out = bytes((4, cmd)) + struct.pack(">H", port) + ip + user + b"\0"
        return out + host + b"\0" if host is not None else out

    v4 = bytes((127, 0, 0, 1))
    v6 = ipaddress.ip_address("::1").packed
    streams = {
        "5-noauth-connect-name": (greet(0) + req5(1, 3, b"example.com", 80), True),
        "5-noauth-connect-ipv4": (greet(0) + req5(1, 1, v4, 8000), True),
        "5-noauth-connect-ipv6": (greet(0) + req5(1, 4, v6, 443), True),
        "5-userpass-connect": (greet(0, 2) + auth(b"alice", b"secret") + req5(1, 3, b"example.com", 443), True),
        "5-userpass-empty": (greet(2) + auth(b"", b"") + req5(1, 3, b"localhost", 80), True),
        "5-prefer-noauth": (greet(0, 2) + req5(1, 3, b"example.org", 80), True),
        "5-resolve": (greet(0) + req5(0xF0, 3, b"example.com", 0), True),
        "5-resolve-ptr-ipv4": (greet(0) + req5(0xF1, 1, v4, 0), True),
        "5-resolve-ptr-name-ip": (greet(0) + req5(0xF1, 3, b"[::1]", 0), True),
        "5-optimistic-data": (greet(0) + req5(1, 3, b"example.com", 80) + b"GET / HTTP/1.0\r\n\r\n", True),
        "5-bind-unsupported": (greet(0) + req5(2, 1, v4, 80), False),
        "5-bad-atyp": (greet(0) + bytes((5, 1, 0, 9)), False),
        "5-no-method": (greet(1), False),
        "5-bad-auth-version": (greet(2) + b"\x02\x01a\x01b", False),
        "5-connect-port0": (greet(0) + req5(1, 3, b"example.com", 0), False),
        "5-trailing-dot-underscore": (greet(0) + req5(1, 3, b"_dmarc.example.com.", 25), True),
        "4-connect": (req4(1, 80, v4, b"alice"), True),
        "4a-connect": (req4(1, 80, bytes((0, 0, 0, 1)), b"", b"example.com"), True),
        "4a-resolve": (req4(0xF0, 0, bytes((0, 0, 0, 1)), b"bob", b"example.com"), True),
        "4-bind": (req4(2, 80, v4, b""), False),
        "http-get": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False),
    }
    for name, (data, ok) in streams.items():
        prefer = 1 if name == "5-prefer-noauth" else 0
        parser = SocksParser(prefer_no_auth=bool(prefer))
        try:
            done = any(isinstance(e, RequestReady) for e in parser.receive_data(data))
        except Exception:  # noqa: BLE001 - only the outcome matters here
            done = False
        assert done == ok, f"SOCKS seed {name}: expected {'success' if ok else 'rejection'}"
        cuts = [256] if len(seeds) % 2 else [1, 3, 256]
        seeds[f"parser-{name}"] = stream_input([t["parser"], prefer], data, cuts)

    resolved = {
        "v4-v6": R.Resolved((R.ResolvedAnswer(4, v4, 60), R.ResolvedAnswer(6, v6, 60))),
        "v6-only": R.Resolved((R.ResolvedAnswer(6, v6, 60),)),
        "hostname": R.Resolved((R.ResolvedAnswer(0, b"localhost", 3600),)),
        "error": R.Resolved((R.ResolvedAnswer(0xF1, b"", 0),)),
    }
    for name, msg in resolved.items():
        seeds[f"resolved-{name}"] = fdp_input(msg.encode(), [t["resolved"]])
        seeds[f"dns_resolved-{name}"] = fdp_input(msg.encode(), [t["dns_resolved"]])

    basic = b"Proxy-Authorization: Basic " + base64.b64encode(b"alice:secret") + b"\r\n"
    http = {
        "connect-name": (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", True),
        "connect-ipv6-auth": (b"CONNECT [::1]:8443 HTTP/1.1\r\n" + basic + b"\r\n\x16\x03\x01", True),
        "connect-lf": (b"CONNECT 127.0.0.1:80 HTTP/1.0\n\n", True),
        "get": (b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n", False),
        "no-port": (b"CONNECT example.com HTTP/1.1\r\n\r\n", False),
    }
    for name, (data, ok) in http.items():
        try:
            done = HttpConnectParser().receive_data(data) is not None
        except Exception:  # noqa: BLE001 - only the outcome matters here
            done = False
        assert done == ok, f"HTTP CONNECT seed {name}: expected {'success' if ok else 'rejection'}"
        seeds[f"http_connect-{name}"] = stream_input([t["http_connect"]], data, [1, 7, 256])

    def dns(name: str, qtype: int, extra: bytes = b"") -> bytes:
        qname = b"".join(bytes((len(x),)) + x.encode() for x in name.split(".") if x) + b"\0"
        return (b"\x12\x34\x01\x20\x00\x01\x00\x00\x00\x00" + (b"\x00\x01" if extra else b"\x00\x00")
                + qname + struct.pack(">HH", qtype, 1) + extra)

    opt = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x0c\x00\x0a\x00\x08" + b"\x01" * 8  # EDNS + cookie
    for name, data in {"a": dns("example.com", 1, opt), "aaaa": dns("localhost", 28),
                       "ptr": dns("1.0.0.127.in-addr.arpa", 12), "mx": dns("example.com", 15),
                       "pointer": b"\x12\x34\x01\x00\x00\x02" + b"\x00" * 6 + b"\x01a\x00\x00\x01\x00\x01"
                       + b"\xc0\x0c\x00\x1c\x00\x01"}.items():
        parse_query(data)  # every seed must parse
        seeds[f"dns_query-{name}"] = fdp_input(data, [t["dns_query"]])
    return seeds


def write(directory: Path, seeds: dict[str, bytes]) -> None:
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for name, data in sorted(seeds.items()):
        (directory / name).write_bytes(data)
    print(f"{directory.relative_to(HERE.parents[1])}: {len(seeds)} seeds, "
          f"{sum(map(len, seeds.values()))} bytes")


def main() -> None:
    write(CELLS_DIR, cell_seeds(Chain()))
    write(SOCKS_DIR, socks_seeds())


if __name__ == "__main__":
    main()
