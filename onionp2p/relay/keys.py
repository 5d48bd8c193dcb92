"""A relay's keys and certificates, kept in a private key directory (specs/keys.md).

Theory of operation
-------------------
A relay holds the same set of keys as C tor (tor-spec §1.1 "Keys and names",
cert-spec §2, §2.3) so that its CERTS cells, fingerprints and ntor IDs are exactly
tor's:

===========================  =========  ===========================================
key                          algorithm  lifetime
===========================  =========  ===========================================
master identity              Ed25519    forever
legacy RSA identity          RSA-1024   forever (fingerprint = SHA1 of PKCS#1 DER)
signing key (cert type 4)    Ed25519    30 days, renewed when < 2 days remain
ntor onion key               X25519     28 days + 7 days of grace for the old one
TLS link key + X.509 cert    RSA-2048   365 days, renewed when < 7 days remain
TLS link cert (type 5)       --         2 days, reissued when < 1 day remains
link auth key (type 6)       Ed25519    2 days, renewed when < 1 day remains
RSA identity X.509 (type 2)  --         365 days, reissued when < 30 days remain
RSA->Ed cross-cert (type 7)  --         180 days, reissued when < 30 days remain
===========================  =========  ===========================================

:meth:`RelayKeys.load_or_create` reads every file, creates what is missing and then
runs the same *refresh* as :meth:`RelayKeys.maybe_rotate`: each derived key or
certificate is checked (matches its key, verifies against its issuer, enough time
left) and re-issued if not. Because every check is made against the current issuer,
a new signing key automatically causes new type-5 and type-6 certificates, and a new
TLS certificate causes a new type-5 certificate. Files are replaced atomically
(temporary file + ``os.replace``), so a crash leaves either the old or the new file;
a key/certificate pair torn by a crash is noticed and re-issued at the next start.

Secret keys are unencrypted PKCS#8 PEM files created with mode 0600 in a 0700
directory; loading refuses a secret file that the group or others may read. The two
identity keys are never replaced: if one exists without the other, or other keys
exist without them, loading fails instead of silently minting a new identity.
Any unreadable, corrupt or mismatched file raises :class:`~onionp2p.errors.KeyFileError`.

The only clock reads are the ``now=None`` defaults of the two public entry points.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa, x25519
from cryptography.x509 import load_pem_x509_certificate

from onionp2p.errors import CertificateError, KeyFileError
from onionp2p.keyfiles import ensure_private_dir as _ensure_private_dir
from onionp2p.keyfiles import read_key_file as _read_file
from onionp2p.keyfiles import write_key_file as _write_file
from onionp2p.log import get_logger
from onionp2p.proto.certs import (
    CertType,
    Ed25519Cert,
    KeyType,
    RsaCrossCert,
    expiry_hours,
    make_rsa_identity_cert,
    make_self_signed_x509,
    parse_x509,
    rsa_identity_digest,
    x509_sha256,
)

__all__ = [
    "CROSS_CERT_LIFETIME",
    "CROSS_CERT_RENEW",
    "KEY_FILES",
    "LINK_CERT_LIFETIME",
    "LINK_CERT_RENEW",
    "ONION_KEY_GRACE",
    "ONION_KEY_LIFETIME",
    "RSA_ID_CERT_LIFETIME",
    "RSA_ID_CERT_RENEW",
    "SIGNING_KEY_LIFETIME",
    "SIGNING_KEY_RENEW",
    "TLS_CERT_LIFETIME",
    "TLS_CERT_RENEW",
    "RelayKeys",
]

DAY = 86400.0
SIGNING_KEY_LIFETIME = 30 * DAY
SIGNING_KEY_RENEW = 2 * DAY
LINK_CERT_LIFETIME = 2 * DAY  # type-5 cert and type-6 auth key/cert
LINK_CERT_RENEW = 1 * DAY
TLS_CERT_LIFETIME = 365 * DAY
TLS_CERT_RENEW = 7 * DAY
RSA_ID_CERT_LIFETIME = 365 * DAY
RSA_ID_CERT_RENEW = 30 * DAY
CROSS_CERT_LIFETIME = 180 * DAY
CROSS_CERT_RENEW = 30 * DAY
ONION_KEY_LIFETIME = 28 * DAY
ONION_KEY_GRACE = 7 * DAY

_STATE_FORMAT = 1

#: File names inside the key directory, and whether each holds a secret.
KEY_FILES: dict[str, tuple[str, bool]] = {
    "identity": ("ed25519_master_id_secret_key.pem", True),
    "signing": ("ed25519_signing_secret_key.pem", True),
    "signing_cert": ("ed25519_signing_cert", False),
    "rsa_identity": ("secret_id_key.pem", True),
    "rsa_identity_cert": ("rsa_id_cert.der", False),
    "cross_cert": ("rsa_ed_crosscert", False),
    "onion_key": ("secret_onion_key_ntor.pem", True),
    "onion_key_old": ("secret_onion_key_ntor.old.pem", True),
    "tls_key": ("link_tls_secret_key.pem", True),
    "tls_cert": ("link_tls_cert.pem", False),
    "tls_link_cert": ("ed25519_link_cert", False),
    "link_auth_key": ("ed25519_auth_secret_key.pem", True),
    "link_auth_cert": ("ed25519_auth_cert", False),
    "state": ("state.json", False),
}

_log = get_logger(__name__)


# ---------------------------------------------------------------------------
# File helpers


def _pem_private(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _raw_public(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _load_private(path: Path, data: bytes, kind: type, what: str) -> Any:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"key file {path} is corrupt or not an unencrypted PEM {what} key: "
                           f"{exc}") from None
    if not isinstance(key, kind):
        raise KeyFileError(f"key file {path} holds a {type(key).__name__}, expected an {what} key")
    return key


# ---------------------------------------------------------------------------


class RelayKeys:
    """Every key and certificate of one relay, backed by a private key directory.

    Build with :meth:`load_or_create`; call :meth:`maybe_rotate` periodically.
    Attributes hold the current objects (cryptography keys, parsed certificates).
    """

    identity: ed25519.Ed25519PrivateKey
    signing: ed25519.Ed25519PrivateKey
    signing_cert: Ed25519Cert
    rsa_identity: rsa.RSAPrivateKey
    rsa_identity_cert_der: bytes
    cross_cert: RsaCrossCert
    onion_key: x25519.X25519PrivateKey
    onion_key_created: float
    previous_onion_key: x25519.X25519PrivateKey | None
    previous_onion_key_retired: float | None
    tls_key: rsa.RSAPrivateKey
    tls_cert_der: bytes
    tls_link_cert: Ed25519Cert
    link_auth_key: ed25519.Ed25519PrivateKey
    link_auth_cert: Ed25519Cert

    def __init__(self, keys_dir: Path, *, onion_key_lifetime: float, onion_key_grace: float) -> None:
        self.keys_dir = keys_dir
        self.onion_key_lifetime = float(onion_key_lifetime)
        self.onion_key_grace = float(onion_key_grace)
        #: Incremented whenever the TLS key/certificate is replaced (rebuild SSL contexts).
        self.tls_generation = 0

    # -- public construction -------------------------------------------------

    @classmethod
    def load_or_create(
        cls,
        data_dir: Path | str,
        *,
        now: float | None = None,
        onion_key_lifetime: float = ONION_KEY_LIFETIME,
        onion_key_grace: float = ONION_KEY_GRACE,
    ) -> RelayKeys:
        """Load the keys in ``data_dir`` (the key directory, e.g. ``<DataDirectory>/keys``).

        Missing keys are generated and expiring certificates re-issued; the directory
        (and any parent created here) gets mode 0700. Raises KeyFileError on unsafe
        permissions, unreadable or corrupt files, or a partial identity.
        """
        if onion_key_lifetime <= 0 or onion_key_grace < 0:
            raise KeyFileError("onion_key_lifetime must be > 0 and onion_key_grace >= 0")
        now = time.time() if now is None else float(now)
        keys_dir = Path(data_dir)
        for parent in reversed(keys_dir.parents):
            if not parent.exists():
                _ensure_private_dir(parent)
        _ensure_private_dir(keys_dir)
        self = cls(keys_dir, onion_key_lifetime=onion_key_lifetime, onion_key_grace=onion_key_grace)
        self._load_identity(now)
        self._refresh(now, loading=True)
        return self

    @classmethod
    def check_files(cls, data_dir: Path | str) -> None:
        """Check the key files that exist in ``data_dir`` (the key directory) without creating
        or changing anything (``--verify-config``): readable regular files, secrets not open
        to group/others, private keys that parse as the right kind. KeyFileError if not."""
        keys_dir = Path(data_dir)
        if not keys_dir.exists():
            return
        if not keys_dir.is_dir():
            raise KeyFileError(f"{keys_dir} is not a directory")
        kinds = {"identity": (ed25519.Ed25519PrivateKey, "Ed25519"), "signing": (ed25519.Ed25519PrivateKey, "Ed25519"),
                 "link_auth_key": (ed25519.Ed25519PrivateKey, "Ed25519"), "rsa_identity": (rsa.RSAPrivateKey, "RSA"),
                 "tls_key": (rsa.RSAPrivateKey, "RSA"), "onion_key": (x25519.X25519PrivateKey, "X25519"),
                 "onion_key_old": (x25519.X25519PrivateKey, "X25519")}
        for name, (filename, secret) in KEY_FILES.items():
            path = keys_dir / filename
            data = _read_file(path, secret)
            if data is not None and name in kinds:
                _load_private(path, data, *kinds[name])

    # -- derived values ------------------------------------------------------

    @property
    def identity_public(self) -> bytes:
        """The 32-byte Ed25519 master identity public key."""
        return _raw_public(self.identity)

    @property
    def signing_public(self) -> bytes:
        """The 32-byte Ed25519 signing public key."""
        return _raw_public(self.signing)

    @property
    def rsa_id_digest(self) -> bytes:
        """The 20-byte legacy identity digest (SHA-1 of the PKCS#1 DER RSA public key)."""
        return rsa_identity_digest(self.rsa_identity.public_key())

    @property
    def fingerprint(self) -> str:
        """The relay fingerprint: 40 upper-case hex digits of :attr:`rsa_id_digest`."""
        return self.rsa_id_digest.hex().upper()

    @property
    def onion_key_public(self) -> bytes:
        """The current 32-byte ntor onion key (what descriptors publish)."""
        return _raw_public(self.onion_key)

    @property
    def link_auth_public(self) -> bytes:
        """The 32-byte Ed25519 link authentication public key (type-6 subject)."""
        return _raw_public(self.link_auth_key)

    @property
    def tls_cert_path(self) -> Path:
        """PEM file of the TLS certificate (for ``SSLContext.load_cert_chain``)."""
        return self._path("tls_cert")

    @property
    def tls_key_path(self) -> Path:
        """PEM file of the TLS private key (for ``SSLContext.load_cert_chain``)."""
        return self._path("tls_key")

    def onion_keys(self, now: float | None = None) -> dict[bytes, x25519.X25519PrivateKey]:
        """ntor keys a server handshake may use, by public key: current plus previous in grace.

        With ``now``, a previous key whose grace period has ended is left out even if
        :meth:`maybe_rotate` has not run yet.
        """
        keys = {self.onion_key_public: self.onion_key}
        old, retired = self.previous_onion_key, self.previous_onion_key_retired
        if old is not None and (now is None or retired is None or now < retired + self.onion_key_grace):
            keys.setdefault(_raw_public(old), old)
        return keys

    def certs_for_responder(self) -> list[tuple[int, bytes]]:
        """CERTS-cell entries a responding relay sends: types 2, 4, 5, 7."""
        return [
            (CertType.RSA_ID_X509, self.rsa_identity_cert_der),
            (CertType.IDENTITY_V_SIGNING, self.signing_cert.encode()),
            (CertType.SIGNING_V_TLS_CERT, self.tls_link_cert.encode()),
            (CertType.RSA_ID_V_IDENTITY, self.cross_cert.encode()),
        ]

    def certs_for_initiator(self) -> list[tuple[int, bytes]]:
        """CERTS-cell entries an authenticating initiator sends: types 2, 4, 6, 7."""
        return [
            (CertType.RSA_ID_X509, self.rsa_identity_cert_der),
            (CertType.IDENTITY_V_SIGNING, self.signing_cert.encode()),
            (CertType.SIGNING_V_LINK_AUTH, self.link_auth_cert.encode()),
            (CertType.RSA_ID_V_IDENTITY, self.cross_cert.encode()),
        ]

    def maybe_rotate(self, now: float | None = None) -> bool:
        """Rotate the onion key and renew expiring keys/certificates. True if anything changed.

        If :attr:`tls_generation` changed, SSL contexts built from the old TLS files
        must be rebuilt.
        """
        now = time.time() if now is None else float(now)
        return self._refresh(now, loading=False)

    # -- internals -------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self.keys_dir / KEY_FILES[name][0]

    def _read(self, name: str) -> bytes | None:
        return _read_file(self._path(name), KEY_FILES[name][1])

    def _write(self, name: str, data: bytes) -> None:
        _write_file(self._path(name), data)

    def _load_key(self, name: str, kind: type, what: str) -> Any:
        data = self._read(name)
        return None if data is None else _load_private(self._path(name), data, kind, what)

    def _parse_cert(self, name: str, data: bytes | None, parser: Any = Ed25519Cert.parse) -> Any:
        try:
            return None if data is None else parser(data)
        except CertificateError as exc:
            raise KeyFileError(f"certificate file {self._path(name)} is corrupt: {exc}") from None

    def _load_cert(self, name: str, parser: Any = Ed25519Cert.parse) -> Any:
        return self._parse_cert(name, self._read(name), parser)

    def _load_identity(self, now: float) -> None:
        ed = self._load_key("identity", ed25519.Ed25519PrivateKey, "Ed25519")
        rsa_key = self._load_key("rsa_identity", rsa.RSAPrivateKey, "RSA")
        if rsa_key is not None and (rsa_key.key_size != 1024 or rsa_key.public_key().public_numbers().e != 65537):
            raise KeyFileError(f"{self._path('rsa_identity')}: RSA identity must be 1024 bits with e=65537")
        if ed is None and rsa_key is None:
            others = [KEY_FILES[n][0] for n in ("signing", "onion_key", "link_auth_key")
                      if self._path(n).exists()]
            if others:
                raise KeyFileError(
                    f"identity keys are missing from {self.keys_dir} but other keys exist ({', '.join(others)}); "
                    "restore the identity files, or empty the directory to create a new identity")
            ed = ed25519.Ed25519PrivateKey.generate()
            rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
            self._write("rsa_identity", _pem_private(rsa_key))
            self._write("identity", _pem_private(ed))
            _log.info("generated new relay identity", fingerprint=rsa_identity_digest(rsa_key).hex().upper())
        elif ed is None or rsa_key is None:
            missing = "identity" if ed is None else "rsa_identity"
            raise KeyFileError(
                f"identity key file {self._path(missing)} is missing while the other identity key exists; "
                "restore it from a backup (a new one would change the relay's identity)")
        self.identity = ed
        self.rsa_identity = rsa_key

    def _refresh(self, now: float, *, loading: bool) -> bool:
        changed = False
        for step in (self._refresh_rsa_id_cert, self._refresh_cross_cert, self._refresh_signing,
                     self._refresh_tls, self._refresh_tls_link_cert, self._refresh_link_auth,
                     self._refresh_onion):
            changed |= step(now, loading)
        return changed

    def _refresh_rsa_id_cert(self, now: float, loading: bool) -> bool:
        if loading:
            self.rsa_identity_cert_der = self._read("rsa_identity_cert") or b""
        if self.rsa_identity_cert_der:
            cert = self._parse_cert("rsa_identity_cert", self.rsa_identity_cert_der, parse_x509)
            if (cert.public_key() == self.rsa_identity.public_key()
                    and cert.not_valid_before_utc.timestamp() <= now
                    and cert.not_valid_after_utc.timestamp() - now >= RSA_ID_CERT_RENEW):
                return False
        self.rsa_identity_cert_der = make_rsa_identity_cert(self.rsa_identity, now, lifetime=RSA_ID_CERT_LIFETIME)
        self._write("rsa_identity_cert", self.rsa_identity_cert_der)
        return True

    def _refresh_cross_cert(self, now: float, loading: bool) -> bool:
        if loading:
            self.cross_cert = self._load_cert("cross_cert", RsaCrossCert.parse)
        cc = self.cross_cert
        if cc is not None and cc.ed25519_key == self.identity_public and cc.expires_at - now >= CROSS_CERT_RENEW:
            try:
                cc.verify(self.rsa_identity.public_key(), now)
                return False
            except CertificateError:
                pass
        self.cross_cert = RsaCrossCert.create(self.rsa_identity, self.identity_public,
                                              expiry_hours(now + CROSS_CERT_LIFETIME))
        self._write("cross_cert", self.cross_cert.encode())
        return True

    @staticmethod
    def _ed_cert_ok(cert: Ed25519Cert | None, subject: bytes, issuer: bytes, cert_type: int,
                    now: float, renew: float) -> bool:
        if cert is None or cert.cert_type != cert_type or cert.certified_key != subject:
            return False
        if cert.expires_at - now < renew:
            return False
        try:
            cert.verify(issuer, now=now)
        except CertificateError:
            return False
        return True

    def _refresh_signing(self, now: float, loading: bool) -> bool:
        return self._refresh_ed_key(
            "signing", "signing_cert", CertType.IDENTITY_V_SIGNING, self.identity, self.identity_public,
            SIGNING_KEY_LIFETIME, SIGNING_KEY_RENEW, now, loading, include_signer=True, label="signing key")

    def _refresh_ed_key(self, key_name: str, cert_name: str, cert_type: int, issuer, issuer_public: bytes,
                        lifetime: float, renew: float, now: float, loading: bool, *,
                        include_signer: bool, label: str) -> bool:
        """Load (``loading``) an Ed25519 key and the certificate ``issuer`` made for it, and
        make new ones if they are missing or due (within ``renew`` of expiry)."""
        if loading:
            setattr(self, key_name, self._load_key(key_name, ed25519.Ed25519PrivateKey, "Ed25519"))
            setattr(self, cert_name, self._load_cert(cert_name))
        key = getattr(self, key_name)
        if key is not None and self._ed_cert_ok(getattr(self, cert_name), _raw_public(key), issuer_public,
                                                cert_type, now, renew):
            return False
        key = ed25519.Ed25519PrivateKey.generate()
        cert = Ed25519Cert.create(cert_type, _raw_public(key), issuer, expires_hours=expiry_hours(now + lifetime),
                                  include_signer=include_signer)
        setattr(self, key_name, key)
        setattr(self, cert_name, cert)
        self._write(key_name, _pem_private(key))
        self._write(cert_name, cert.encode())
        if not loading:
            _log.info(f"renewed {label}", expires=cert.expires_at)
        return True

    def _refresh_tls(self, now: float, loading: bool) -> bool:
        if loading:
            self.tls_key = self._load_key("tls_key", rsa.RSAPrivateKey, "RSA")
            pem = self._read("tls_cert")
            self.tls_cert_der = b""
            if pem is not None:
                try:
                    cert = load_pem_x509_certificate(pem)
                    self.tls_cert_der = cert.public_bytes(serialization.Encoding.DER)
                    parse_x509(self.tls_cert_der)
                except (ValueError, TypeError, UnsupportedAlgorithm, CertificateError) as exc:
                    raise KeyFileError(f"certificate file {self.tls_cert_path} is corrupt: {exc}") from None
        if self.tls_key is not None and self.tls_cert_der:
            cert = parse_x509(self.tls_cert_der)
            if (cert.public_key() == self.tls_key.public_key()
                    and cert.not_valid_before_utc.timestamp() <= now
                    and cert.not_valid_after_utc.timestamp() - now >= TLS_CERT_RENEW):
                return False
        self.tls_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.tls_cert_der = make_self_signed_x509(self.tls_key, now=now, lifetime=TLS_CERT_LIFETIME)
        pem = parse_x509(self.tls_cert_der).public_bytes(serialization.Encoding.PEM)
        self._write("tls_key", _pem_private(self.tls_key))
        self._write("tls_cert", pem)
        self.tls_generation += 1
        return True

    def _refresh_tls_link_cert(self, now: float, loading: bool) -> bool:
        if loading:
            self.tls_link_cert = self._load_cert("tls_link_cert")
        cert = self.tls_link_cert
        if self._ed_cert_ok(cert, x509_sha256(self.tls_cert_der), self.signing_public,
                            CertType.SIGNING_V_TLS_CERT, now, LINK_CERT_RENEW) \
                and cert.key_type == KeyType.SHA256_OF_X509:
            return False
        self.tls_link_cert = Ed25519Cert.create(
            CertType.SIGNING_V_TLS_CERT, x509_sha256(self.tls_cert_der), self.signing,
            expires_hours=expiry_hours(now + LINK_CERT_LIFETIME), key_type=KeyType.SHA256_OF_X509,
            include_signer=False)
        self._write("tls_link_cert", self.tls_link_cert.encode())
        return True

    def _refresh_link_auth(self, now: float, loading: bool) -> bool:
        return self._refresh_ed_key(
            "link_auth_key", "link_auth_cert", CertType.SIGNING_V_LINK_AUTH, self.signing, self.signing_public,
            LINK_CERT_LIFETIME, LINK_CERT_RENEW, now, loading, include_signer=False,
            label="link authentication key")

    # -- onion keys --------------------------------------------------------------

    def _load_state(self) -> dict[str, Any]:
        data = self._read("state")
        if data is None:
            return {}
        try:
            state = json.loads(data.decode("utf-8"))
            if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
                raise ValueError("unknown format")
            for k in ("onion_key_created", "onion_key_old_retired"):
                v = state.get(k)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise ValueError(f"{k} is not a number")
        except (UnicodeDecodeError, ValueError) as exc:
            raise KeyFileError(f"state file {self._path('state')} is corrupt: {exc}") from None
        return state

    def _save_state(self) -> None:
        state = {
            "format": _STATE_FORMAT,
            "onion_key_created": self.onion_key_created,
            "onion_key_old_retired": self.previous_onion_key_retired,
        }
        self._write("state", (json.dumps(state, indent=1, sort_keys=True) + "\n").encode())

    def _refresh_onion(self, now: float, loading: bool) -> bool:
        changed = False
        if loading:
            state = self._load_state()
            self.onion_key = self._load_key("onion_key", x25519.X25519PrivateKey, "X25519")
            self.previous_onion_key = self._load_key("onion_key_old", x25519.X25519PrivateKey, "X25519")
            created = state.get("onion_key_created")
            if self.onion_key is not None and created is None:
                created = self._path("onion_key").stat().st_mtime
            self.onion_key_created = float(created) if created is not None else now
            retired = state.get("onion_key_old_retired")
            self.previous_onion_key_retired = float(retired) if retired is not None else None
            if self.previous_onion_key is not None and self.previous_onion_key_retired is None:
                self.previous_onion_key_retired = self._path("onion_key_old").stat().st_mtime
            if self.onion_key is None:
                self.onion_key = x25519.X25519PrivateKey.generate()
                self.onion_key_created = now
                self._write("onion_key", _pem_private(self.onion_key))
                changed = True
        if now - self.onion_key_created >= self.onion_key_lifetime:
            self.previous_onion_key = self.onion_key
            self.previous_onion_key_retired = now
            self._write("onion_key_old", _pem_private(self.onion_key))
            self.onion_key = x25519.X25519PrivateKey.generate()
            self.onion_key_created = now
            self._write("onion_key", _pem_private(self.onion_key))
            _log.info("rotated ntor onion key")
            changed = True
        if self.previous_onion_key is not None and self.previous_onion_key_retired is not None \
                and now >= self.previous_onion_key_retired + self.onion_key_grace:
            self.previous_onion_key = None
            self.previous_onion_key_retired = None
            try:
                self._path("onion_key_old").unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise KeyFileError(f"cannot remove {self._path('onion_key_old')}: {exc.strerror}") from None
            changed = True
        if self.previous_onion_key is None and self.previous_onion_key_retired is not None:
            self.previous_onion_key_retired = None
            changed = True
        if changed or (loading and self._read("state") is None):
            self._save_state()
        return changed
