"""v3 onion-service descriptors (onionp2p/proto/hs/desc.py): tor's descriptors parse, ours parse in
stem (an independent implementation), and every strict check refuses what it should.

Vectors: tests/data/hs/vectors.json "descriptor_1" / "descriptor_2_client_auth" and the C-tor-made
descriptors arti-hsdesc1.txt / arti-hsdesc2.txt copied from Arti's test data.
"""

from __future__ import annotations

import base64
import calendar
import json
import os
import re
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from onionp2p.errors import (
    HsClientAuthError,
    HsDescriptorDecryptError,
    HsDescriptorError,
    HsDescriptorSignatureError,
)
from onionp2p.proto.ed25519x import ExpandedKey
from onionp2p.proto.hs import desc as hd
from onionp2p.proto.hs.address import encode_onion_address
from onionp2p.proto.hs.blinding import TimePeriod, blind_public_key, blind_secret_key, subcredential
from onionp2p.proto.relaycell import LinkSpec

DATA = Path(__file__).parent / "data" / "hs"
V = json.loads((DATA / "vectors.json").read_text())
D1, D2 = V["descriptor_1"], V["descriptor_2_client_auth"]


def ts(text: str) -> int:
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def x25519_public() -> bytes:
    return X25519PrivateKey.generate().public_key().public_bytes_raw()


def intro_point(i: int) -> hd.IntroPoint:
    specs = (LinkSpec.ipv4(f"127.0.0.{i + 1}", 5000 + i), LinkSpec.legacy_id(os.urandom(20)),
             LinkSpec.ed25519_id(os.urandom(32)), LinkSpec.ipv6("::1", 6000 + i))
    return hd.IntroPoint(specs, x25519_public(), ExpandedKey.from_seed(os.urandom(32)).public, x25519_public())


class Service:
    """A service identity and its keys for the current period."""

    def __init__(self, now: float = 1_765_000_000.0):
        self.now = now
        self.identity = ExpandedKey.from_seed(os.urandom(32))
        self.period = TimePeriod.at(now)
        self.blinded = blind_secret_key(self.identity, self.period)
        self.subcred = subcredential(self.identity.public, self.blinded.public)
        self.signing = ed25519.Ed25519PrivateKey.generate()
        self.address = encode_onion_address(self.identity.public)

    def build(self, **kw) -> str:
        kw.setdefault("intro_points", [intro_point(i) for i in range(3)])
        return hd.build_descriptor(blinded=self.blinded, subcred=self.subcred, revision_counter=kw.pop("rev", 42),
                                   now=self.now, signing_key=self.signing, **kw)

    def parse(self, text: str, **kw) -> hd.HsDescriptor:
        return hd.parse_descriptor(text, blinded_key=self.blinded.public, subcred=self.subcred, now=self.now, **kw)

    def resign(self, text: str) -> str:
        """``text`` with its signature line replaced by a valid one (to test checks behind it)."""
        body = text[:text.rindex("signature ")]
        sig = self.signing.sign(hd.SIG_PREFIX + body.encode())
        return body + "signature " + base64.b64encode(sig).decode().rstrip("=") + "\n"


# -- tor's descriptors -----------------------------------------------------------------------------


def test_c_tor_descriptor_parses_with_its_vectors():
    text = (DATA / D1["file"]).read_text()
    now = ts(D1["valid_at"])
    outer = hd.parse_outer(text, now=now, blinded_key=h(D1["blinded_public"]))
    assert outer.lifetime == D1["lifetime_minutes"] and outer.revision_counter == D1["revision_counter"]
    assert outer.signing_key_cert.expires_at == ts(D1["signing_cert_expires"])
    assert outer.blinded_key == h(D1["blinded_public"])
    desc = hd.parse_descriptor(text, blinded_key=outer.blinded_key, subcred=h(D1["subcredential"]), now=now)
    assert len(desc.intro_points) == D1["intro_points"] and not desc.client_auth
    assert desc.create2_formats == (2,) and not desc.single_onion_service and desc.intro_auth_required == ()
    inner_text = _tor_inner()
    first = inner_text.split("introduction-point ")[1].split("\n")[0]
    ip = desc.intro_points[0]
    assert hd.encode_link_specs(ip.link_specifiers) == base64.b64decode(first)
    onion_key = re.search(r"onion-key ntor (\S+)", inner_text).group(1)
    enc_key = re.search(r"enc-key ntor (\S+)", inner_text).group(1)
    assert ip.onion_key == base64.b64decode(onion_key) and ip.enc_key == base64.b64decode(enc_key)
    assert ip.auth_key_cert.signed_with == outer.signing_key


def test_c_tor_descriptor_refuses_wrong_key_subcredential_and_time():
    text = (DATA / D1["file"]).read_text()
    now = ts(D1["valid_at"])
    with pytest.raises(HsDescriptorSignatureError):
        hd.parse_outer(text, now=now, blinded_key=bytes([12]) * 32)
    with pytest.raises(HsDescriptorDecryptError):
        hd.parse_descriptor(text, blinded_key=h(D1["blinded_public"]), subcred=bytes(32), now=now)
    with pytest.raises(HsDescriptorSignatureError, match="expired"):
        hd.parse_outer(text, now=ts(D1["signing_cert_expires"]) + 1, blinded_key=h(D1["blinded_public"]))


def test_c_tor_client_auth_descriptor():
    text = (DATA / D2["file"]).read_text()
    tp = TimePeriod.at(ts(D2["time"]))
    assert tp.number == D2["period_number"]
    assert blind_public_key(h(D2["identity_public"]), tp) == h(D2["blinded_public"])
    assert subcredential(h(D2["identity_public"]), h(D2["blinded_public"])) == h(D2["subcredential"])
    args = {"blinded_key": h(D2["blinded_public"]), "subcred": h(D2["subcredential"]), "now": ts(D2["valid_at"])}
    desc = hd.parse_descriptor(text, client_secret=X25519PrivateKey.from_private_bytes(h(D2["client_secret"])),
                               **args)
    assert desc.client_auth and len(desc.intro_points) == D2["intro_points"]
    with pytest.raises(HsClientAuthError) as missing:
        hd.parse_descriptor(text, **args)
    assert missing.value.missing
    with pytest.raises(HsClientAuthError) as wrong:
        hd.parse_descriptor(text, client_secret=X25519PrivateKey.generate(), **args)
    assert not wrong.value.missing


# -- ours: round trip, stem, shape -----------------------------------------------------------------


def test_round_trip_without_client_auth():
    svc = Service()
    ips = [intro_point(i) for i in range(3)]
    text = svc.build(intro_points=ips, single_onion=True, intro_auth_required=("ed25519",))
    desc = svc.parse(text)
    assert desc.intro_points == tuple(ips) and desc.outer.revision_counter == 42 and desc.outer.lifetime == 180
    assert desc.single_onion_service and desc.intro_auth_required == ("ed25519",) and not desc.client_auth
    assert desc.outer.blinded_key == svc.blinded.public
    assert text.startswith("hs-descriptor 3\ndescriptor-lifetime 180\n") and text.endswith("\n")
    # the middle layer is padded to 10000 bytes and carries 16 fake auth-client lines
    outer = desc.outer
    assert (len(outer.superencrypted) - 16 - 32) % 10000 == 0
    middle = hd.decrypt_layer(outer.superencrypted, svc.blinded.public, svc.subcred, 42,
                              b"hsdir-superencrypted-data").rstrip(b"\0").decode()
    assert middle.count("\nauth-client ") == 16 and middle.startswith("desc-auth-type x25519\n")
    assert not middle.endswith("\n")  # like tor


def test_round_trip_with_client_auth():
    svc = Service()
    clients = [X25519PrivateKey.generate() for _ in range(17)]
    text = svc.build(client_keys=[c.public_key().public_bytes_raw() for c in clients])
    for c in (clients[0], clients[16]):
        assert svc.parse(text, client_secret=c).client_auth
    with pytest.raises(HsClientAuthError) as missing:
        svc.parse(text)
    assert missing.value.missing
    with pytest.raises(HsClientAuthError) as wrong:
        svc.parse(text, client_secret=X25519PrivateKey.generate())
    assert not wrong.value.missing
    middle = hd.decrypt_layer(svc.parse(text, client_secret=clients[3]).outer.superencrypted, svc.blinded.public,
                              svc.subcred, 42, b"hsdir-superencrypted-data").rstrip(b"\0").decode()
    assert middle.count("\nauth-client ") == 32  # 17 real padded to a multiple of 16


def test_stem_reads_our_descriptor():
    """stem (its own blinding, KDF, AES and signature check) decrypts what we build."""
    from stem.descriptor.hidden_service import HiddenServiceDescriptorV3
    svc = Service(now=time.time())
    ips = [intro_point(i) for i in range(2)]
    text = svc.build(intro_points=ips)
    parsed = HiddenServiceDescriptorV3.from_str(text, validate=True)
    assert parsed.revision_counter == 42 and parsed.lifetime == 180
    inner = parsed.decrypt(svc.address)
    assert inner.formats == [2] and len(inner.introduction_points) == 2
    got = inner.introduction_points[1]
    assert base64.b64decode(got.onion_key_raw) == ips[1].onion_key
    assert base64.b64decode(got.enc_key_raw) == ips[1].enc_key
    assert [s.pack() for s in got.link_specifiers] == [bytes([s.lstype, len(s.data)]) + s.data
                                                       for s in ips[1].link_specifiers]


# -- strictness ----------------------------------------------------------------------------------


def test_signature_is_checked():
    svc = Service()
    text = svc.build()
    with pytest.raises(HsDescriptorSignatureError):
        svc.parse(text.replace("revision-counter 42", "revision-counter 43"))
    with pytest.raises(HsDescriptorSignatureError):  # a valid signature by another key
        other = Service()
        other.blinded = svc.blinded
        svc.parse(other.resign(text))


def test_mac_is_checked():
    svc = Service()
    text = svc.build()
    lines = text.split("\n")
    i = lines.index("superencrypted") + 5
    lines[i] = ("B" if lines[i][0] != "B" else "C") + lines[i][1:]
    with pytest.raises(HsDescriptorDecryptError):
        svc.parse(svc.resign("\n".join(lines)))
    with pytest.raises(HsDescriptorDecryptError):  # the revision counter keys the layers too
        svc.parse(svc.resign(text.replace("revision-counter 42", "revision-counter 41")))


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.replace("descriptor-lifetime 180\n", "descriptor-lifetime 180\ndescriptor-lifetime 180\n"),
     "exactly once"),
    (lambda t: t.replace("revision-counter 42\n", "revision-counter 42\nrevision-counter 43\n"), "exactly once"),
    (lambda t: t.replace("descriptor-lifetime 180", "descriptor-lifetime 721"), "out of range"),
    (lambda t: t.replace("revision-counter 42", "revision-counter -1"), "non-negative"),
    (lambda t: t.replace("revision-counter 42", "revision-counter 18446744073709551616"), "out of range"),
    (lambda t: t.replace("hs-descriptor 3", "hs-descriptor 2"), "version"),
    (lambda t: "x-extra 1\n" + t, "start with"),
    (lambda t: t.replace("-----END MESSAGE-----", "-----END SIGNATURE-----"), "wrong label"),
    (lambda t: t.replace("descriptor-lifetime 180", "descriptor-lifetime  180"), "malformed line"),
    (lambda t: t.replace("descriptor-lifetime 180", "descriptor-lifetime 180\r"), "non-printable"),
])
def test_outer_strictness(edit, match):
    svc = Service()
    with pytest.raises(HsDescriptorError, match=match):
        svc.parse(svc.resign(edit(svc.build())))


def test_unknown_outer_keywords_are_ignored_and_size_is_limited():
    svc = Service()
    text = svc.build()
    assert svc.parse(svc.resign(text.replace("revision-counter 42\n", "revision-counter 42\nx-future 1 2\n")))
    pad = "x-pad " + "a" * 60 + "\n"
    big = text.replace("revision-counter 42\n", "revision-counter 42\n" + pad * 700)
    assert len(big) > hd.MAX_DESCRIPTOR_SIZE
    with pytest.raises(HsDescriptorError, match="limit"):
        svc.parse(svc.resign(big))


def test_certificate_types_and_signers_are_checked():
    svc = Service()
    # a type-08 certificate signed by the identity key instead of the blinded key
    from onionp2p.proto.hs.blinding import desc_signing_cert
    text = svc.build()
    bad_cert = desc_signing_cert(svc.identity, svc.signing.public_key().public_bytes_raw(), now=svc.now)
    start = text.index("-----BEGIN ED25519 CERT-----")
    end = text.index("-----END ED25519 CERT-----") + len("-----END ED25519 CERT-----")
    forged = text[:start] + hd.format_object("ED25519 CERT", bad_cert.encode()) + text[end:]
    with pytest.raises(HsDescriptorSignatureError, match="different key"):
        svc.parse(svc.resign(forged))


def _tor_outer() -> hd.OuterDescriptor:
    return hd.parse_outer((DATA / D1["file"]).read_text(), now=ts(D1["valid_at"]))


def _tor_inner() -> str:
    """The inner layer of C tor's descriptor_1, decrypted by hand (padding checked on the way)."""
    outer = _tor_outer()
    sub = h(D1["subcredential"])
    middle = hd.decrypt_layer(outer.superencrypted, outer.blinded_key, sub, outer.revision_counter,
                              b"hsdir-superencrypted-data")
    assert len(middle) % hd.PAD_MULTIPLE == 0
    blob = base64.b64decode("".join(re.search(r"encrypted\n-----BEGIN MESSAGE-----\n(.*?)-----END MESSAGE-----",
                                              middle.rstrip(b"\0").decode(), re.DOTALL).group(1).split()))
    return hd.decrypt_layer(blob, outer.blinded_key, sub, outer.revision_counter, b"hsdir-encrypted-data").decode()


def _inner_signer() -> bytes:
    return _tor_outer().signing_key


@pytest.mark.parametrize("edit, match", [
    (lambda t: "create2-formats 2\n" + t, "exactly once"),
    (lambda t: t.replace("create2-formats 2", "create2-formats 1"), "ntor"),
    (lambda t: t.replace("create2-formats 2\n", "create2-formats 2\nsingle-onion-service\nsingle-onion-service\n"),
     "at most once"),
    (lambda t: t.replace("enc-key-cert\n", "x-gone\n", 1), "exactly once"),
    (lambda t: t.replace("onion-key ntor ", "onion-key other ", 1), "onion-key ntor"),
    (lambda t: t.replace("CERT-----\nAQkA", "CERT-----\nAQsA", 1), "certificate"),  # auth-key cert says type 0B
    (lambda t: t.replace("introduction-point Aw", "introduction-point Bw", 1), "link specifiers"),  # NSPEC 7
    (lambda t: t.replace(re.findall(r"enc-key ntor \S+", t)[0], re.findall(r"enc-key ntor \S+", t)[1], 1),
     "does not certify enc-key"),  # intro point 1 lists intro point 2's key under its own certificate
])
def test_inner_strictness(edit, match):
    signer = _inner_signer()
    now = ts(D1["valid_at"])
    inner = _tor_inner()
    hd._parse_inner(inner, signer, now)  # the unedited text is fine
    with pytest.raises(HsDescriptorError, match=match):
        hd._parse_inner(edit(inner), signer, now)


def test_inner_needs_the_descriptor_signing_key_and_caps_intro_points():
    now = ts(D1["valid_at"])
    inner = _tor_inner()
    with pytest.raises(HsDescriptorSignatureError):
        hd._parse_inner(inner, os.urandom(32), now)
    head, first = inner.split("introduction-point ", 2)[:2]
    many = head + ("introduction-point " + first) * 21
    with pytest.raises(HsDescriptorError, match="at most 20"):
        hd._parse_inner(many, _inner_signer(), now)
    unknown = inner.replace("create2-formats 2\n", "create2-formats 2\nflow-control 1-2 31\nx-new a\n")
    assert len(hd._parse_inner(unknown, _inner_signer(), now)[0]) == 3


def test_no_introduction_points_is_a_valid_descriptor():
    """A service between introduction points publishes none (tor accepts that)."""
    svc = Service()
    assert svc.parse(svc.build(intro_points=[])).intro_points == ()


def test_build_refuses_bad_arguments():
    svc = Service()
    with pytest.raises(ValueError):
        svc.build(lifetime=721)
    with pytest.raises(ValueError):
        svc.build(intro_points=[intro_point(i) for i in range(21)])


# -- hostile input: only typed errors escape ---------------------------------------------------------


def _mutants(text: str, rng, n: int):
    lines = text.split("\n")
    for _ in range(n):
        kind = rng.randrange(5)
        if kind == 0:  # flip a byte
            i = rng.randrange(len(text))
            yield text[:i] + chr(rng.randrange(32, 127)) + text[i + 1:]
        elif kind == 1:  # truncate
            yield text[:rng.randrange(len(text))]
        elif kind == 2:  # duplicate a line
            i = rng.randrange(len(lines))
            yield "\n".join(lines[:i + 1] + lines[i:])
        elif kind == 3:  # drop a line
            i = rng.randrange(len(lines))
            yield "\n".join(lines[:i] + lines[i + 1:])
        else:  # swap two lines
            i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
            m = list(lines)
            m[i], m[j] = m[j], m[i]
            yield "\n".join(m)


def test_mutated_descriptors_raise_only_typed_errors():
    import random
    rng = random.Random(15)
    text = (DATA / D1["file"]).read_text()
    args = {"blinded_key": h(D1["blinded_public"]), "subcred": h(D1["subcredential"]), "now": ts(D1["valid_at"])}
    for mutant in _mutants(text, rng, 300):
        try:
            hd.parse_descriptor(mutant, **args)
        except HsDescriptorError:
            pass
    # and behind the signature and the MACs: the decrypted inner layer, mutated
    inner, signer = _tor_inner(), _inner_signer()
    for mutant in _mutants(inner, rng, 300):
        try:
            hd._parse_inner(mutant, signer, args["now"])
        except HsDescriptorError:
            pass
    # a middle layer, mutated (its parser sits between the two MACs)
    svc = Service()
    outer = svc.parse(svc.build()).outer
    middle = hd.decrypt_layer(outer.superencrypted, svc.blinded.public, svc.subcred, 42,
                              b"hsdir-superencrypted-data").rstrip(b"\0").decode()
    for mutant in _mutants(middle, rng, 300):
        try:
            hd._parse_middle(mutant)
        except HsDescriptorError:
            pass


# -- a real tor network decodes our descriptor ---------------------------------------------------------




@pytest.mark.tor
@pytest.mark.slow
def test_tor_hsdirs_store_and_a_tor_client_decodes_our_descriptors(tmp_path):
    """In a private tor network (tools/tornet.py; tor relays are the HSDirs) a tor client uploads
    our descriptors with HSPOST and fetches them back with HSFETCH. tor decodes what it fetches:
    GETINFO hs/client/desc/id answers only for a descriptor whose outer and middle layers it
    decrypted, and ONION_CLIENT_AUTH_ADD answers 252 "decrypted desc" only when the new key opens
    a cached client-auth descriptor's inner layer. A descriptor made with another subcredential
    is refused (HS_DESC FAILED), so acceptance means something."""
    import base64
    import subprocess

    import stem
    import stem.control
    from conftest import free_port, require_tor
    tornet = require_tor()
    net = tornet.TorNet(tmp_path / "net", extra_authority_options=["TestingDirAuthVoteHSDir *"])
    net.start(n_relays=5, n_exits=1, timeout=240)
    client_dir = tmp_path / "client"
    client_dir.mkdir(mode=0o700)
    port = free_port()
    (client_dir / "torrc").write_text("\n".join([
        "TestingTorNetwork 1", f"DataDirectory {client_dir}", "SocksPort 0", f"ControlPort 127.0.0.1:{port}",
        "CookieAuthentication 0", f"Log notice file {client_dir}/notice.log", "SafeLogging 0",
        *net.dirauth_lines()]) + "\n")
    proc = subprocess.Popen([tornet._which("tor"), "-f", str(client_dir / "torrc")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    events: list[str] = []
    try:
        deadline = time.monotonic() + 180
        log = client_dir / "notice.log"
        while not (log.exists() and "Bootstrapped 100%" in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text() if log.exists() else ""
            time.sleep(1)
        with stem.control.Controller.from_port(port=port) as ctl:
            ctl.authenticate()
            ctl.add_event_listener(lambda e: events.append(str(e)), stem.control.EventType.HS_DESC)

            def period_now() -> TimePeriod:
                va = ts(ctl.get_info("consensus/valid-after").replace(" ", "T") + "Z")
                # a TestingTorNetwork's period is one shared-random run: 24 votes of 10 s = 4 minutes,
                # offset by 12 votes = 2 minutes (tor's get_time_period_length)
                return TimePeriod.at(va, length=4, offset=2)

            def publish(wrong_subcred: bool = False, **kw) -> tuple[Service, str]:
                svc = Service(now=time.time())
                svc.period = period_now()
                svc.blinded = blind_secret_key(svc.identity, svc.period)
                svc.subcred = subcredential(os.urandom(32) if wrong_subcred else svc.identity.public,
                                            svc.blinded.public)
                text = svc.build(intro_points=[intro_point(i) for i in range(3)], **kw)
                label = svc.address[:-len(".onion")]
                reply = ctl.msg(f"HSPOST HSADDRESS={label}\n" + text.rstrip("\n"))
                assert reply.is_ok(), str(reply)
                return svc, label

            def refused(label: str) -> bool:
                return any("FAILED" in e and label in e and "BAD_DESC" in e for e in events)

            def fetch(label: str) -> str | None:
                for _ in range(6):
                    time.sleep(2)
                    assert ctl.msg(f"HSFETCH {label}").is_ok()
                    time.sleep(3)
                    try:
                        return ctl.get_info(f"hs/client/desc/id/{label}")
                    except stem.ControllerError:
                        if refused(label):
                            return None
                return None

            def publish_and_fetch(**kw) -> tuple[str, str | None]:
                """Publish and fetch back. A period is 4 minutes here: when it turns between the
                upload and the fetch, the client looks under the next period's blinded key (and
                the next ring of HSDirs) and finds nothing, so publish again for the new period.
                A refusal (BAD_DESC) or a miss within one period is an answer, not retried."""
                for _ in range(3):
                    svc, label = publish(**kw)
                    got = fetch(label)
                    if got is not None or refused(label) or period_now() == svc.period:
                        return label, got
                return label, got

            label, got = publish_and_fetch()
            assert got is not None, "\n".join(events[-10:]) + log.read_text()[-2000:]
            assert f"HS_DESC RECEIVED {label}" in "\n".join(events)

            me = X25519PrivateKey.generate()
            label, got = publish_and_fetch(client_keys=[x25519_public(), me.public_key().public_bytes_raw()])
            assert got is not None, "\n".join(events[-10:]) + log.read_text()[-2000:]
            reply = ctl.msg(f"ONION_CLIENT_AUTH_ADD {label} x25519:"
                            + base64.b64encode(me.private_bytes_raw()).decode())
            assert "decrypted desc" in str(reply), str(reply)

            label, got = publish_and_fetch(wrong_subcred=True)
            assert got is None
            assert refused(label), "\n".join(events[-10:])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        net.stop()
