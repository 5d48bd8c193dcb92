"""onionp2p — an onion-routed overlay network in Python that speaks Tor's tor-spec.

Layers, one module each (see specs/overview.md):

* :mod:`onionp2p.proto.cells` — channel cells and link-level payloads (wire formats)
* :mod:`onionp2p.proto.relaycell` — relay cells and relay messages (wire formats)
* :mod:`onionp2p.proto.certs` — Ed25519 certificates (cert-spec) and the RSA cross-certificate
* :mod:`onionp2p.relay.keys` — long-term and medium-term keys, persisted in a data directory
* :mod:`onionp2p.proto.handshake` — the ntor circuit handshake (sans-IO)
* :mod:`onionp2p.proto.relaycrypto` — tor1 relay cell crypto (AES-128-CTR + running SHA-1)
"""

__version__ = "0.1.0"
