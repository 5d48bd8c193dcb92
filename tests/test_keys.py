"""Tests for onionp2p.relay.keys: the relay key store."""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.x509 import load_pem_x509_certificate

from onionp2p.errors import KeyFileError
from onionp2p.proto.certs import (
    CertType,
    Ed25519Cert,
    KeyType,
    RsaCrossCert,
    rsa_identity_digest,
    verify_rsa_identity_cert,
)
from onionp2p.relay.keys import (
    CROSS_CERT_LIFETIME,
    KEY_FILES,
    LINK_CERT_LIFETIME,
    ONION_KEY_GRACE,
    ONION_KEY_LIFETIME,
    SIGNING_KEY_LIFETIME,
    TLS_CERT_LIFETIME,
    RelayKeys,
)

T0 = 1_700_000_000.0
DAY = 86400.0


@pytest.fixture
def keydir(tmp_path):
    return tmp_path / "data" / "keys"


@pytest.fixture
def keys(keydir):
    return RelayKeys.load_or_create(keydir, now=T0)


def assert_chain_valid(k: RelayKeys, now: float) -> None:
    """Everything a peer checks in our CERTS cells holds at ``now``."""
    k.signing_cert.verify(k.identity_public, now=now)
    assert k.signing_cert.cert_type == CertType.IDENTITY_V_SIGNING
    assert k.signing_cert.signed_with == k.identity_public
    assert k.signing_cert.certified_key == k.signing_public

    k.tls_link_cert.verify(k.signing_public, now=now)
    assert k.tls_link_cert.key_type == KeyType.SHA256_OF_X509
    assert k.tls_link_cert.certified_key == hashlib.sha256(k.tls_cert_der).digest()
    pem_der = load_pem_x509_certificate(k.tls_cert_path.read_bytes()).public_bytes(serialization.Encoding.DER)
    assert pem_der == k.tls_cert_der

    k.link_auth_cert.verify(k.signing_public, now=now)
    assert k.link_auth_cert.certified_key == k.link_auth_public

    k.cross_cert.verify(k.rsa_identity.public_key(), now)
    assert k.cross_cert.ed25519_key == k.identity_public

    id_key = verify_rsa_identity_cert(k.rsa_identity_cert_der, now=now)
    assert rsa_identity_digest(id_key) == k.rsa_id_digest


def test_create_layout_and_attributes(keys, keydir):
    assert len(keys.identity_public) == 32
    assert len(keys.rsa_id_digest) == 20
    assert keys.fingerprint == keys.rsa_id_digest.hex().upper() and len(keys.fingerprint) == 40
    assert keys.rsa_identity.key_size == 1024
    assert keys.tls_key.key_size == 2048
    assert len(keys.onion_key_public) == 32
    assert keys.onion_keys() == {keys.onion_key_public: keys.onion_key}
    assert {p.name for p in keydir.iterdir()} == {
        name for key, (name, _) in KEY_FILES.items() if key != "onion_key_old"}
    assert_chain_valid(keys, T0)


def test_permissions(keys, keydir):
    assert stat.S_IMODE(keydir.stat().st_mode) == 0o700
    assert stat.S_IMODE(keydir.parent.stat().st_mode) == 0o700  # created by us
    for p in keydir.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert not [p for p in keydir.iterdir() if p.name.endswith(".tmp")]


def test_reload_gives_same_keys(keys, keydir):
    again = RelayKeys.load_or_create(keydir, now=T0 + 60)
    assert again.fingerprint == keys.fingerprint
    assert again.identity_public == keys.identity_public
    assert again.signing_public == keys.signing_public
    assert again.signing_cert == keys.signing_cert
    assert again.onion_key_public == keys.onion_key_public
    assert again.tls_cert_der == keys.tls_cert_der
    assert again.tls_link_cert == keys.tls_link_cert
    assert again.link_auth_cert == keys.link_auth_cert
    assert again.cross_cert == keys.cross_cert
    assert again.rsa_identity_cert_der == keys.rsa_identity_cert_der
    assert again.maybe_rotate(T0 + 120) is False


def test_string_path_and_default_clock(tmp_path):
    k = RelayKeys.load_or_create(str(tmp_path / "k"))
    assert k.keys_dir == tmp_path / "k"
    assert k.maybe_rotate() is False


def test_loose_key_dir_is_tightened(tmp_path):
    d = tmp_path / "keys"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    RelayKeys.load_or_create(d, now=T0)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


@pytest.mark.parametrize("name", [k for k, (_, secret) in KEY_FILES.items() if secret and k != "onion_key_old"])
def test_group_readable_secret_refused(keys, keydir, name):
    path = keydir / KEY_FILES[name][0]
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError) as err:
        RelayKeys.load_or_create(keydir, now=T0)
    assert str(path) in str(err.value) and "chmod 600" in str(err.value)


def test_public_file_mode_not_enforced(keys, keydir):
    os.chmod(keydir / KEY_FILES["signing_cert"][0], 0o644)
    RelayKeys.load_or_create(keydir, now=T0)


@pytest.mark.parametrize("name", ["identity", "rsa_identity", "signing", "onion_key", "tls_key",
                                  "link_auth_key", "signing_cert", "tls_link_cert", "link_auth_cert",
                                  "cross_cert", "rsa_identity_cert", "tls_cert", "state"])
def test_corrupt_file_is_key_file_error(keys, keydir, name):
    path = keydir / KEY_FILES[name][0]
    path.write_bytes(b"\x00garbage\xff")
    with pytest.raises(KeyFileError) as err:
        RelayKeys.load_or_create(keydir, now=T0)
    assert str(path) in str(err.value)


def test_wrong_key_type_in_file(keys, keydir):
    path = keydir / KEY_FILES["identity"][0]
    other = x25519.X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(other)
    with pytest.raises(KeyFileError, match="expected an Ed25519"):
        RelayKeys.load_or_create(keydir, now=T0)


def test_rsa_identity_must_be_1024(keys, keydir):
    tls_pem = (keydir / KEY_FILES["tls_key"][0]).read_bytes()  # an RSA-2048 key
    (keydir / KEY_FILES["rsa_identity"][0]).write_bytes(tls_pem)
    with pytest.raises(KeyFileError, match="1024"):
        RelayKeys.load_or_create(keydir, now=T0)


def test_state_bad_values(keys, keydir):
    path = keydir / KEY_FILES["state"][0]
    path.write_text(json.dumps({"format": 1, "onion_key_created": "yesterday"}))
    with pytest.raises(KeyFileError, match="corrupt"):
        RelayKeys.load_or_create(keydir, now=T0)
    path.write_text(json.dumps({"format": 99}))
    with pytest.raises(KeyFileError, match="corrupt"):
        RelayKeys.load_or_create(keydir, now=T0)


def test_not_a_regular_file(keys, keydir):
    path = keydir / KEY_FILES["signing_cert"][0]
    path.unlink()
    path.mkdir()
    with pytest.raises(KeyFileError, match="not a regular file"):
        RelayKeys.load_or_create(keydir, now=T0)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read mode-000 files")
def test_unreadable_file(keys, keydir):
    path = keydir / KEY_FILES["identity"][0]
    os.chmod(path, 0)
    with pytest.raises(KeyFileError, match="cannot open"):
        RelayKeys.load_or_create(keydir, now=T0)


@pytest.mark.parametrize("missing", ["identity", "rsa_identity"])
def test_half_identity_refused(keys, keydir, missing):
    (keydir / KEY_FILES[missing][0]).unlink()
    with pytest.raises(KeyFileError, match="restore"):
        RelayKeys.load_or_create(keydir, now=T0)


def test_missing_identities_with_other_keys_refused(keys, keydir):
    (keydir / KEY_FILES["identity"][0]).unlink()
    (keydir / KEY_FILES["rsa_identity"][0]).unlink()
    with pytest.raises(KeyFileError, match="identity keys are missing"):
        RelayKeys.load_or_create(keydir, now=T0)


def test_missing_derived_files_are_recreated(keys, keydir):
    for name in ("signing_cert", "tls_link_cert", "cross_cert", "rsa_identity_cert", "state"):
        (keydir / KEY_FILES[name][0]).unlink()
    again = RelayKeys.load_or_create(keydir, now=T0 + 10)
    assert again.fingerprint == keys.fingerprint
    assert again.identity_public == keys.identity_public
    assert again.onion_key_public == keys.onion_key_public
    assert again.signing_public != keys.signing_public  # uncertified signing key replaced
    assert again.tls_cert_der == keys.tls_cert_der
    assert_chain_valid(again, T0 + 10)


# ---------------------------------------------------------------------------
# Onion key rotation


def test_onion_key_rotation_and_grace(keys, keydir):
    first = keys.onion_key_public
    keys.maybe_rotate(T0 + ONION_KEY_LIFETIME - 1)
    assert keys.onion_key_public == first

    t_rot = T0 + ONION_KEY_LIFETIME
    assert keys.maybe_rotate(t_rot) is True
    second = keys.onion_key_public
    assert second != first
    assert set(keys.onion_keys()) == {first, second}
    assert (keydir / KEY_FILES["onion_key_old"][0]).exists()
    assert stat.S_IMODE((keydir / KEY_FILES["onion_key_old"][0]).stat().st_mode) == 0o600

    # The old key survives a restart during the grace period.
    again = RelayKeys.load_or_create(keydir, now=t_rot + ONION_KEY_GRACE - 60)
    assert again.onion_key_public == second
    assert set(again.onion_keys()) == {first, second}
    assert again.onion_keys()[first].public_key().public_bytes_raw() == first
    # onion_keys(now) already hides it once the grace period is over ...
    assert set(again.onion_keys(now=t_rot + ONION_KEY_GRACE)) == {second}

    # ... and maybe_rotate drops it for good.
    assert again.maybe_rotate(t_rot + ONION_KEY_GRACE) is True
    assert set(again.onion_keys()) == {second}
    assert not (keydir / KEY_FILES["onion_key_old"][0]).exists()
    third = RelayKeys.load_or_create(keydir, now=t_rot + ONION_KEY_GRACE + 1)
    assert set(third.onion_keys()) == {second}


def test_custom_onion_lifetime(keydir):
    k = RelayKeys.load_or_create(keydir, now=T0, onion_key_lifetime=3600, onion_key_grace=600)
    first = k.onion_key_public
    k.maybe_rotate(T0 + 3600)
    assert k.onion_key_public != first and first in k.onion_keys()
    k.maybe_rotate(T0 + 4200)
    assert first not in k.onion_keys()
    with pytest.raises(KeyFileError):
        RelayKeys.load_or_create(keydir, now=T0, onion_key_lifetime=0)


def test_onion_state_missing_uses_file_mtime(keys, keydir):
    path = keydir / KEY_FILES["onion_key"][0]
    (keydir / KEY_FILES["state"][0]).unlink()
    os.utime(path, (T0 - ONION_KEY_LIFETIME, T0 - ONION_KEY_LIFETIME))
    again = RelayKeys.load_or_create(keydir, now=T0)
    assert again.onion_key_public != keys.onion_key_public  # old enough: rotated at load
    assert keys.onion_key_public in again.onion_keys()


# ---------------------------------------------------------------------------
# Certificate renewal


def test_signing_key_renewal(keys, keydir):
    old_signing = keys.signing_public
    old_link, old_auth = keys.tls_link_cert, keys.link_auth_cert
    # Comfortably before the 2-day renewal margin nothing about the signing key changes.
    keys.maybe_rotate(T0 + SIGNING_KEY_LIFETIME - 3 * DAY)
    assert keys.signing_public == old_signing
    t = T0 + SIGNING_KEY_LIFETIME - 1.5 * DAY
    assert keys.maybe_rotate(t) is True
    assert keys.signing_public != old_signing
    assert keys.signing_cert.expires_at >= t + SIGNING_KEY_LIFETIME
    assert keys.tls_link_cert != old_link and keys.link_auth_cert != old_auth
    assert_chain_valid(keys, t)
    again = RelayKeys.load_or_create(keydir, now=t + 1)
    assert again.signing_public == keys.signing_public
    assert again.signing_cert == keys.signing_cert


def test_link_certs_renewed_daily(keys):
    first_link = keys.tls_link_cert
    first_auth = keys.link_auth_public
    assert keys.tls_link_cert.expires_at >= T0 + LINK_CERT_LIFETIME
    t = T0 + LINK_CERT_LIFETIME - 0.5 * DAY
    assert keys.maybe_rotate(t) is True
    assert keys.tls_link_cert != first_link
    assert keys.link_auth_public != first_auth
    assert_chain_valid(keys, t)


def test_tls_cert_regenerated_before_expiry(keys, keydir):
    der, gen = keys.tls_cert_der, keys.tls_generation
    t = T0 + TLS_CERT_LIFETIME - 3 * DAY
    assert keys.maybe_rotate(t) is True
    assert keys.tls_cert_der != der and keys.tls_generation == gen + 1
    assert_chain_valid(keys, t)
    assert RelayKeys.load_or_create(keydir, now=t + 1).tls_cert_der == keys.tls_cert_der


def test_long_downtime_everything_reissued(keys, keydir):
    t = T0 + 2 * 365 * DAY
    again = RelayKeys.load_or_create(keydir, now=t)
    assert again.fingerprint == keys.fingerprint
    assert again.identity_public == keys.identity_public
    assert again.cross_cert != keys.cross_cert
    assert again.cross_cert.expires_at >= t + CROSS_CERT_LIFETIME
    assert again.onion_key_public != keys.onion_key_public
    assert_chain_valid(again, t)


def test_tampered_cert_is_reissued(keys, keydir):
    path = keydir / KEY_FILES["tls_link_cert"][0]
    cert = Ed25519Cert.parse(path.read_bytes())
    forged = Ed25519Cert(cert.cert_type, cert.expires_hours, cert.key_type, b"\x00" * 32,
                         cert.extensions, cert.signature)
    path.write_bytes(forged.encode())
    again = RelayKeys.load_or_create(keydir, now=T0 + 5)
    assert again.tls_link_cert.certified_key == hashlib.sha256(again.tls_cert_der).digest()
    assert_chain_valid(again, T0 + 5)


# ---------------------------------------------------------------------------
# CERTS cell material and TLS files


def test_certs_for_responder_and_initiator(keys):
    resp = keys.certs_for_responder()
    assert [t for t, _ in resp] == [2, 4, 5, 7]
    init = keys.certs_for_initiator()
    assert [t for t, _ in init] == [2, 4, 6, 7]
    by_type = dict(resp) | dict(init)
    assert by_type[2] == keys.rsa_identity_cert_der
    c4 = Ed25519Cert.parse(by_type[4])
    c4.verify(now=T0)  # self-contained: signer embedded
    assert c4.signed_with == keys.identity_public
    Ed25519Cert.parse(by_type[5]).verify(c4.certified_key, now=T0)
    c6 = Ed25519Cert.parse(by_type[6])
    c6.verify(c4.certified_key, now=T0)
    assert c6.cert_type == CertType.SIGNING_V_LINK_AUTH
    cc = RsaCrossCert.parse(by_type[7])
    cc.verify(verify_rsa_identity_cert(by_type[2], now=T0), T0)
    assert cc.ed25519_key == keys.identity_public


def test_tls_files_load_into_ssl_context(keys):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(keys.tls_cert_path), str(keys.tls_key_path))
