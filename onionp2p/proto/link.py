"""The link handshake (tor-spec §4 "Negotiating and initializing channels"; specs/link.md), sans-IO.

Theory of operation
-------------------
After TLS is up, the two ends of a link exchange a few *handshake cells* that
(1) pick a link protocol version, (2) prove the responder's relay identity to the
initiator, (3) optionally prove the initiator's relay identity to the responder,
and (4) swap clocks and addresses::

    initiator                               responder
    VERSIONS (CircID 2 bytes)        ->
                                     <-     VERSIONS (CircID 2 bytes)
                                     <-     CERTS {2, 4, 5, 7}
                                     <-     AUTH_CHALLENGE (32 random bytes, methods [3])
                                     <-     NETINFO
    [CERTS {2, 4, 6, 7}, AUTHENTICATE]  ->  (relays only; clients skip this)
    NETINFO                          ->

We offer link versions 4 and 5 only; the highest version both sides list wins,
and from the cell after the VERSIONS cell on, circuit IDs are 4 bytes wide.

*Responder proof.* The responder's CERTS chain runs from its Ed25519 identity key
through its signing key (type 4) to the SHA-256 of the very TLS certificate it
presented (type 5); a self-signed 1024-bit RSA certificate (type 2) plus an RSA
cross-certificate over the Ed25519 identity (type 7) tie in the legacy RSA identity.
Since TLS already proved possession of the TLS key, a valid chain proves both
identities.

*Initiator proof.* A relay initiator's CERTS chain ends instead in a link
authentication key (type 6), which signs an AUTH0003 authenticator: both identity
digests, both Ed25519 identities, SHA-256 digests of everything each side sent so
far (SLOG, CLOG), the responder's TLS certificate digest and a TLS exporter value,
plus 24 random bytes. The logs and exporter bind the proof to this very TLS session
and this very handshake, so it cannot be replayed elsewhere. An initiator that sends
NETINFO without CERTS/AUTHENTICATE is an anonymous client: ``peer`` stays None.

The :class:`LinkHandshake` object performs no I/O and reads no clock: the caller
feeds it received cells with :meth:`LinkHandshake.receive_cell`, sends what
:meth:`LinkHandshake.data_to_send` returns, and watches :attr:`LinkHandshake.done`.
Every violation by the peer raises a :class:`ProtocolError` subclass
(:class:`HandshakeError`, :class:`CertificateError`); after that the object is dead.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.constant_time import bytes_eq

from onionp2p.errors import CertificateError, HandshakeError, LocalProtocolError, OnionError, ProtocolError
from onionp2p.proto import certs as _certs
from onionp2p.proto.cells import (
    AuthChallenge,
    Authenticate,
    Cell,
    CellCommand,
    CertEntry,
    Certs,
    NetInfo,
    Versions,
    encode_cell,
    encode_fixed,
    encode_var,
)

if TYPE_CHECKING:
    from onionp2p.relay.keys import RelayKeys

__all__ = [
    "LINK_VERSIONS",
    "AUTH_METHOD_ED25519",
    "AUTH0003_LEN",
    "AUTH0003_LABEL",
    "PeerIdentity",
    "ProvenCerts",
    "LinkHandshake",
    "versions_cell",
    "netinfo_cell",
    "verify_certs",
    "rsa_key_sha256",
]

LINK_VERSIONS: tuple[int, ...] = (4, 5)
AUTH_METHOD_ED25519 = 3  # "Ed25519-SHA256-RFC5705"
AUTH0003_LEN = 352
AUTH0003_LABEL = b"EXPORTER FOR TOR TLS CLIENT BINDING AUTH0003"
_AUTH0003_TYPE = b"AUTH0003"
_AUTH_FIXED_LEN = 8 + 8 * 32  # TYPE .. TLSSECRETS: everything the responder recomputes
_AUTH_RAND_LEN = 24
_SIG_LEN = 64
_AUTH_FIELDS = ("TYPE", "CID", "SID", "CID_ED", "SID_ED", "SLOG", "CLOG", "SCERT", "TLSSECRETS")

# Cert types in CERTS cells (tor-spec §4.2).
_RSA_ID_X509 = int(_certs.CertType.RSA_ID_X509)  # 2
_IDENTITY_V_SIGNING = int(_certs.CertType.IDENTITY_V_SIGNING)  # 4
_SIGNING_V_TLS_CERT = int(_certs.CertType.SIGNING_V_TLS_CERT)  # 5
_SIGNING_V_LINK_AUTH = int(_certs.CertType.SIGNING_V_LINK_AUTH)  # 6
_RSA_ID_V_IDENTITY = int(_certs.CertType.RSA_ID_V_IDENTITY)  # 7

# Anything a certificate/key library may raise on hostile bytes (x509.InvalidVersion is
# not a ValueError; certs.parse_x509 lets it through).
_CERT_ERRORS = (ValueError, TypeError, IndexError, KeyError, struct.error, InvalidSignature,
                UnsupportedAlgorithm, x509.InvalidVersion)


def _sha256(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


def rsa_key_sha256(public_key: rsa.RSAPublicKey) -> bytes:
    """SHA-256 of the PKCS#1 DER encoding of an RSA public key (AUTH0003 CID/SID)."""
    return _sha256(public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1))


@dataclass(frozen=True)
class PeerIdentity:
    """The identities a peer proved (or that we expect it to prove)."""

    ed25519_id: bytes | None
    rsa_id: bytes | None

    @property
    def fingerprint(self) -> str:
        """Tor-style fingerprint: upper-case hex of the RSA identity digest (else of the Ed25519 key)."""
        if self.rsa_id is not None:
            return self.rsa_id.hex().upper()
        return self.ed25519_id.hex().upper() if self.ed25519_id is not None else ""

    def satisfies(self, expected: PeerIdentity) -> bool:
        """True when every identity that ``expected`` names is the one proven here."""
        if expected.ed25519_id is not None and expected.ed25519_id != self.ed25519_id:
            return False
        if expected.rsa_id is not None and expected.rsa_id != self.rsa_id:
            return False
        return True


@dataclass(frozen=True)
class ProvenCerts:
    """What a verified CERTS cell establishes."""

    identity: PeerIdentity
    rsa_id_sha256: bytes  # SHA-256 of the RSA identity key (AUTH0003 CID/SID)
    leaf_key: bytes  # type 5: SHA-256 of the TLS cert; type 6: the Ed25519 link-auth key


# ---------------------------------------------------------------------------
# Cell helpers


def versions_cell(versions: tuple[int, ...] = LINK_VERSIONS) -> bytes:
    """Our VERSIONS cell, encoded with the 2-byte CircID every first VERSIONS cell uses."""
    return encode_var(0, CellCommand.VERSIONS, Versions(versions).encode(), circ_id_len=2)


def _ip(addr: Any, *, strict: bool = True) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``addr`` as an IP address; a non-IP is an error if ``strict``, else None (unknown)."""
    if addr is None:
        return None
    try:
        return ipaddress.ip_address(addr)
    except ValueError:
        if strict:
            raise LocalProtocolError(f"not an IP address: {addr!r}") from None
        return None


def netinfo_cell(peer_address: str | None, my_addresses: tuple[str, ...] | list[str],
                 timestamp: int) -> bytes:
    """A NETINFO cell (CircID 0, 4-byte CircID): time, the peer's address, our addresses."""
    info = NetInfo(int(timestamp), _ip(peer_address, strict=False), tuple(_ip(a) for a in my_addresses))
    return encode_fixed(0, CellCommand.NETINFO, info.encode())


# ---------------------------------------------------------------------------
# CERTS verification


def _check_ed_cert(body: bytes, cert_type: int, signing_key: bytes | None, now: float) -> Any:
    """Parse and verify an Ed25519 cert of ``cert_type`` (by ``signing_key``, else its signed-with key)."""
    cert = _certs.Ed25519Cert.parse(body)
    if cert.cert_type != cert_type:
        raise CertificateError(f"certificate in slot {cert_type} has type {int(cert.cert_type)}")
    want = _certs.KeyType.SHA256_OF_X509 if cert_type == _SIGNING_V_TLS_CERT else _certs.KeyType.ED25519
    if cert.key_type != want:
        raise CertificateError(f"type {cert_type} certificate certifies key type {int(cert.key_type)}")
    if signing_key is None:
        if cert.signed_with is None:
            raise CertificateError(f"type {cert_type} certificate lacks the signed-with-key extension")
    elif cert.signed_with is not None and cert.signed_with != signing_key:
        raise CertificateError(f"type {cert_type} certificate names the wrong signing key")
    cert.verify(signing_key, now=now)
    return cert


def verify_certs(
    certs: Certs, *, leaf_type: int, now: float, tls_cert_der: bytes | None = None
) -> ProvenCerts:
    """Check a CERTS cell per tor-spec §4.2 and return what it proves.

    ``leaf_type`` is 5 for a responder's cell (then ``tls_cert_der`` is the TLS
    certificate the responder presented) or 6 for an authenticating initiator's.
    Certificate types we do not need are ignored; a duplicate type is an error.

    Raises:
        CertificateError: a needed certificate is missing, malformed, expired or
            badly signed, or the chain does not link up.
    """
    if leaf_type not in (_SIGNING_V_TLS_CERT, _SIGNING_V_LINK_AUTH):
        raise LocalProtocolError("leaf_type must be 5 or 6")
    try:
        by_type = certs.by_type()
    except ProtocolError as exc:
        raise CertificateError(str(exc)) from None
    needed = (_RSA_ID_X509, _IDENTITY_V_SIGNING, leaf_type, _RSA_ID_V_IDENTITY)
    missing = [t for t in needed if t not in by_type]
    if missing:
        raise CertificateError(f"CERTS cell lacks certificate type(s) {missing}")
    try:
        id_cert = _check_ed_cert(by_type[_IDENTITY_V_SIGNING], _IDENTITY_V_SIGNING, None, now)
        ed_identity = bytes(id_cert.signed_with)
        signing_key = bytes(id_cert.certified_key)
        leaf = _check_ed_cert(by_type[leaf_type], leaf_type, signing_key, now)
        leaf_key = bytes(leaf.certified_key)
        if leaf_type == _SIGNING_V_TLS_CERT:
            if tls_cert_der is None:
                raise CertificateError("no TLS certificate to check the type 5 certificate against")
            if not bytes_eq(leaf_key, _sha256(tls_cert_der)):
                raise CertificateError("type 5 certificate does not match the TLS certificate")
        rsa_key = _certs.verify_rsa_identity_cert(by_type[_RSA_ID_X509], now=now)
        cross = _certs.RsaCrossCert.parse(by_type[_RSA_ID_V_IDENTITY])
        cross.verify(rsa_key, now=now)
        if bytes(cross.ed25519_key) != ed_identity:
            raise CertificateError("RSA cross-certificate names a different Ed25519 identity")
        rsa_id = _certs.rsa_identity_digest(rsa_key)
    except CertificateError:
        raise
    except ProtocolError as exc:
        raise CertificateError(str(exc)) from None
    except _CERT_ERRORS as exc:
        raise CertificateError(f"bad certificate: {type(exc).__name__}") from None
    return ProvenCerts(PeerIdentity(ed_identity, rsa_id), rsa_key_sha256(rsa_key), leaf_key)


# ---------------------------------------------------------------------------
# The state machine


class _State(Enum):
    VERSIONS = auto()  # both: waiting for the peer's VERSIONS
    CERTS = auto()  # initiator: waiting for the responder's CERTS
    CHALLENGE_OR_NETINFO = auto()  # initiator: AUTH_CHALLENGE (optional) then NETINFO
    NETINFO = auto()  # both: only NETINFO may come now
    CERTS_OR_NETINFO = auto()  # responder: authenticating initiator (CERTS) or client (NETINFO)
    AUTHENTICATE = auto()  # responder: CERTS seen, AUTHENTICATE must follow
    DONE = auto()
    FAILED = auto()


_ALWAYS_IGNORED = (CellCommand.VPADDING,)
_IGNORED_AFTER_VERSIONS = (CellCommand.VPADDING, CellCommand.PADDING, CellCommand.VERSIONS)


class LinkHandshake:
    """Sans-IO link handshake for one TLS connection. See the module docstring.

    Drive it as: :meth:`tls_established`, :meth:`start`, then for each received cell
    :meth:`receive_cell` followed by sending :meth:`data_to_send`, until :attr:`done`.
    Read cells with a CircID width of :attr:`circ_id_len` (it changes after VERSIONS).

    ``keys`` None makes an anonymous client initiator; a responder needs keys.
    ``expected`` (initiators only) names the identity the responder must prove.
    ``peer_address``/``my_addresses`` go into our NETINFO; ``now`` (unix seconds)
    is used for certificate expiry and the NETINFO clock.
    """

    def __init__(
        self,
        *,
        initiator: bool,
        keys: RelayKeys | None,
        expected: PeerIdentity | None = None,
        peer_address: str | None = None,
        my_addresses: tuple[str, ...] = (),
        now: float,
    ):
        if not initiator and keys is None:
            raise LocalProtocolError("a responder needs relay keys")
        self.initiator = initiator
        self.keys = keys
        self.expected = expected
        self.peer_address = peer_address
        self.my_addresses = tuple(my_addresses)
        self.now = now
        self.link_version = 0
        self.peer: PeerIdentity | None = None
        self.peer_netinfo: NetInfo | None = None
        self.authenticated_initiator = False
        self._state = _State.VERSIONS
        self._started = False
        self._out = bytearray()
        self._own_cert_der: bytes | None = None
        self._peer_cert_der: bytes | None = None
        self._exporter: Callable[[bytes, bytes], bytes] | None = None
        self._sent_log: Any = hashes.Hash(hashes.SHA256())  # until NETINFO/AUTHENTICATE
        self._recv_log: Any = hashes.Hash(hashes.SHA256())
        self._slog: bytes | None = None  # responder's log digest, once known
        self._proven: ProvenCerts | None = None  # the peer's verified CERTS
        # Netinfo addresses are checked now so a bad local config fails early, not mid-handshake.
        self._peer_ip = _ip(peer_address, strict=False)
        self._my_ips = tuple(_ip(a) for a in self.my_addresses)

    # -- public interface -----------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once the link is open (handshake finished successfully)."""
        return self._state is _State.DONE

    @property
    def circ_id_len(self) -> int:
        """CircID width for the next cell to read (2 before VERSIONS, then 4)."""
        return 4 if self.link_version else 2

    def tls_established(
        self,
        own_cert_der: bytes | None,
        peer_cert_der: bytes | None,
        exporter: Callable[[bytes, bytes], bytes],
    ) -> None:
        """Record the TLS facts: our and the peer's certificate (DER) and an RFC 5705 exporter."""
        if self._started:
            raise LocalProtocolError("tls_established() after start()")
        if not self.initiator and own_cert_der is None:
            raise LocalProtocolError("a responder must know its own TLS certificate")
        self._own_cert_der = own_cert_der
        self._peer_cert_der = peer_cert_der
        self._exporter = exporter

    def start(self) -> None:
        """Begin: an initiator queues its VERSIONS cell; a responder waits."""
        if self._exporter is None:
            raise LocalProtocolError("call tls_established() first")
        if self._started:
            raise LocalProtocolError("start() called twice")
        self._started = True
        if self.initiator:
            self._send(versions_cell())

    def data_to_send(self) -> bytes:
        """Bytes queued for the peer since the last call."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def send_vpadding(self, length: int = 0) -> None:
        """Queue a VPADDING cell of ``length`` zero bytes (allowed at any point of the handshake)."""
        if not self._started or self._state in (_State.DONE, _State.FAILED):
            raise LocalProtocolError("send_vpadding() outside the handshake")
        if self.initiator and not self.link_version:
            # Between our VERSIONS and the peer's, no CircID width is valid for us.
            raise LocalProtocolError("an initiator cannot pad before the link version is known")
        self._send(encode_var(0, CellCommand.VPADDING, bytes(length), circ_id_len=self.circ_id_len))

    def receive_cell(self, cell: Cell) -> None:
        """Process one cell from the peer.

        Raises:
            ProtocolError: (or HandshakeError, CertificateError) the peer broke the
                protocol; the handshake is over and the connection must be closed.
            LocalProtocolError: called before :meth:`start` or after the end.
        """
        if not self._started:
            raise LocalProtocolError("receive_cell() before start()")
        if self._state in (_State.DONE, _State.FAILED):
            raise LocalProtocolError(f"receive_cell() in state {self._state.name}")
        try:
            self._receive(cell)
        except ProtocolError:
            self._state = _State.FAILED
            raise

    # -- plumbing ---------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        self._out += data
        if self._sent_log is not None:
            self._sent_log.update(data)

    def _send_netinfo(self) -> None:
        # A clock reading is a fingerprint: clients send 0 (tor-spec §4.5).
        ts = int(self.now) if self.keys is not None else 0
        mine = self._my_ips if self.keys is not None else ()
        info = NetInfo(ts, self._peer_ip, mine)
        self._sent_log = None  # NETINFO and later are never part of a log digest
        self._send(encode_fixed(0, CellCommand.NETINFO, info.encode()))

    def _export(self, context: bytes) -> bytes:
        assert self._exporter is not None
        try:
            value = self._exporter(AUTH0003_LABEL, context)
        except ProtocolError:
            raise
        except OnionError as exc:
            raise HandshakeError(f"cannot compute AUTH0003 TLSSECRETS: {exc}") from exc
        if len(value) != 32:
            raise LocalProtocolError("exporter must return 32 bytes")
        return value

    def _receive(self, cell: Cell) -> None:
        try:
            raw = encode_cell(cell, circ_id_len=self.circ_id_len)
        except (LocalProtocolError, struct.error):
            raise ProtocolError("malformed cell") from None
        cmd = cell.command
        # The initiator's SLOG ends with AUTH_CHALLENGE; the responder's CLOG excludes AUTHENTICATE.
        if self._recv_log is not None and cmd != CellCommand.AUTHENTICATE:
            self._recv_log.update(raw)
        st = self._state
        if st is _State.VERSIONS:
            if cmd in _ALWAYS_IGNORED:
                return
            if cmd != CellCommand.VERSIONS:
                raise ProtocolError(f"expected VERSIONS, got command {cmd}")
            self._on_versions(cell)
            return
        if cmd in _IGNORED_AFTER_VERSIONS:
            return  # padding; later VERSIONS cells MUST be ignored (tor-spec §4.1)
        handler = _HANDLERS.get((st, cmd))
        if handler is None:
            raise ProtocolError(f"unexpected command {cmd} during link handshake ({st.name})")
        if cell.circ_id != 0:
            raise ProtocolError(f"handshake cell (command {cmd}) with nonzero circuit ID")
        handler(self, cell)

    # -- handlers ---------------------------------------------------------------------

    def _on_versions(self, cell: Cell) -> None:
        theirs = Versions.parse(cell.payload).versions
        common = set(theirs) & set(LINK_VERSIONS)
        if not common:
            offered = sorted(set(theirs))
            raise HandshakeError(f"no common link protocol version (peer offers {offered[:8]})")
        self.link_version = max(common)
        if self.initiator:
            self._state = _State.CERTS
            return
        keys = self.keys
        self._send(versions_cell())
        certs = Certs(tuple(CertEntry(t, bytes(b)) for t, b in keys.certs_for_responder()))
        self._send(encode_var(0, CellCommand.CERTS, certs.encode()))
        challenge = AuthChallenge(os.urandom(32), (AUTH_METHOD_ED25519,))
        self._send(encode_var(0, CellCommand.AUTH_CHALLENGE, challenge.encode()))
        self._slog = self._sent_log.finalize()
        self._send_netinfo()
        self._state = _State.CERTS_OR_NETINFO

    def _on_responder_certs(self, cell: Cell) -> None:
        proven = verify_certs(
            Certs.parse(cell.payload), leaf_type=_SIGNING_V_TLS_CERT, now=self.now,
            tls_cert_der=self._peer_cert_der,
        )
        if self.expected is not None and not proven.identity.satisfies(self.expected):
            raise HandshakeError("wrong identity: the responder is not the relay we expected")
        self._proven = proven
        self.peer = proven.identity
        self._state = _State.CHALLENGE_OR_NETINFO

    def _on_auth_challenge(self, cell: Cell) -> None:
        challenge = AuthChallenge.parse(cell.payload)
        self._state = _State.NETINFO
        assert self._recv_log is not None
        slog = self._recv_log.finalize()
        self._recv_log = None
        if self.keys is None or AUTH_METHOD_ED25519 not in challenge.methods:
            return  # clients never authenticate; nor do we with no method in common
        self._authenticate(slog)

    def _authenticate(self, slog: bytes) -> None:
        keys = self.keys
        proven = self._proven
        assert proven is not None and self._peer_cert_der is not None
        certs = Certs(tuple(CertEntry(t, bytes(b)) for t, b in keys.certs_for_initiator()))
        self._send(encode_var(0, CellCommand.CERTS, certs.encode()))
        clog = self._sent_log.finalize()
        self._sent_log = None
        cid = rsa_key_sha256(keys.rsa_identity.public_key())
        body = b"".join((
            _AUTH0003_TYPE, cid, proven.rsa_id_sha256, bytes(keys.identity_public),
            bytes(proven.identity.ed25519_id), slog, clog, _sha256(self._peer_cert_der),
            self._export(cid), os.urandom(_AUTH_RAND_LEN),
        ))
        sig = keys.link_auth_key.sign(body)
        auth = Authenticate(AUTH_METHOD_ED25519, body + sig)
        self._send(encode_var(0, CellCommand.AUTHENTICATE, auth.encode()))
        self.authenticated_initiator = True

    def _on_initiator_certs(self, cell: Cell) -> None:
        self._proven = verify_certs(Certs.parse(cell.payload), leaf_type=_SIGNING_V_LINK_AUTH, now=self.now)
        self._state = _State.AUTHENTICATE

    def _on_authenticate(self, cell: Cell) -> None:
        auth = Authenticate.parse(cell.payload)
        if auth.auth_type != AUTH_METHOD_ED25519:
            raise HandshakeError(f"AUTHENTICATE type {auth.auth_type} was not offered")
        body = auth.auth
        if len(body) < AUTH0003_LEN:
            raise HandshakeError(f"AUTH0003 authenticator too short ({len(body)} bytes)")
        assert self._recv_log is not None and self._slog is not None and self._proven is not None
        clog = self._recv_log.finalize()
        self._recv_log = None
        keys = self.keys
        proven = self._proven
        fields = (
            _AUTH0003_TYPE, proven.rsa_id_sha256, rsa_key_sha256(keys.rsa_identity.public_key()),
            bytes(proven.identity.ed25519_id), bytes(keys.identity_public), self._slog, clog,
            _sha256(self._own_cert_der), self._export(proven.rsa_id_sha256),
        )
        expected = b"".join(fields)
        if not bytes_eq(body[:_AUTH_FIXED_LEN], expected):
            pos = 0
            for name, value in zip(_AUTH_FIELDS, fields):
                if body[pos : pos + len(value)] != value:
                    raise HandshakeError(f"AUTHENTICATE field {name} is wrong")
                pos += len(value)
        signed, sig = body[:-_SIG_LEN], body[-_SIG_LEN:]
        try:
            Ed25519PublicKey.from_public_bytes(proven.leaf_key).verify(sig, signed)
        except (InvalidSignature, ValueError):
            raise HandshakeError("AUTHENTICATE signature is invalid") from None
        self.peer = proven.identity
        self.authenticated_initiator = True
        self._state = _State.NETINFO

    def _on_netinfo(self, cell: Cell) -> None:
        self.peer_netinfo = NetInfo.parse(cell.payload)
        if self.initiator:
            self._recv_log = None
            self._send_netinfo()
        self._state = _State.DONE


_HANDLERS: dict[tuple[_State, int], Callable[[LinkHandshake, Cell], None]] = {
    (_State.CERTS, CellCommand.CERTS): LinkHandshake._on_responder_certs,
    (_State.CHALLENGE_OR_NETINFO, CellCommand.AUTH_CHALLENGE): LinkHandshake._on_auth_challenge,
    (_State.CHALLENGE_OR_NETINFO, CellCommand.NETINFO): LinkHandshake._on_netinfo,
    (_State.CERTS_OR_NETINFO, CellCommand.CERTS): LinkHandshake._on_initiator_certs,
    (_State.CERTS_OR_NETINFO, CellCommand.NETINFO): LinkHandshake._on_netinfo,
    (_State.AUTHENTICATE, CellCommand.AUTHENTICATE): LinkHandshake._on_authenticate,
    (_State.NETINFO, CellCommand.NETINFO): LinkHandshake._on_netinfo,
}
