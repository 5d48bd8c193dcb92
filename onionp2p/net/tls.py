"""TLS for links: contexts, the peer's certificate and the RFC 5705 exporter (specs/link.md §2).

Theory of operation
-------------------
A link is TLS 1.2 or newer over TCP. Trust never comes from X.509 chains: the
responder presents a self-signed *link certificate* and the initiator presents
none. Who is on the other end is proved afterwards, inside the Tor protocol, by the
CERTS / AUTHENTICATE cells (:mod:`onionp2p.proto.link`). So the client context does no CA
verification and no hostname check, and the server context does not ask for client
certificates.

Link authentication (AUTH0003) binds itself to the TLS session with an RFC 5705
keying-material exporter. Python's :mod:`ssl` does not expose one, so
:func:`export_keying_material` calls OpenSSL's ``SSL_export_keying_material``
through :mod:`ctypes`, resolving the symbol through the very ``_ssl`` extension
module (hence the same libssl) that Python uses. The ``SSL *`` is read out of
CPython's ``PySSLSocket`` object (layout: ``PyObject_HEAD``, a socket weakref, then
``SSL *ssl``). Before the pointer is used it is checked two ways: CPython stores the
``PySSLSocket`` itself as the ``SSL`` object's app data (ex-data index 0), and
``SSL_get_version`` must name the same protocol as ``ssl_object.version()``. If
anything is off the function raises :class:`OnionError` ("TLS exporter
unavailable") rather than guessing.
"""

from __future__ import annotations

import ctypes
import ssl
import sys
import threading
from typing import Any

from onionp2p.errors import OnionError

__all__ = [
    "server_context",
    "client_context",
    "export_keying_material",
    "peer_cert_der",
    "exporter_available",
]

_UNAVAILABLE = "TLS exporter unavailable"


def server_context(keys: Any) -> ssl.SSLContext:
    """A TLS 1.2+ server context presenting ``keys``' self-signed link certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_NONE  # never request a client certificate
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
    ctx.num_tickets = 0  # no TLS 1.3 session tickets: no resumption (tor-spec "TLS security")
    ctx.load_cert_chain(str(keys.tls_cert_path), str(keys.tls_key_path))
    return ctx


def client_context() -> ssl.SSLContext:
    """A TLS 1.2+ client context without CA or hostname checks (CERTS cells carry trust)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def peer_cert_der(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> bytes | None:
    """DER bytes of the certificate the peer presented, or None."""
    if ssl_object is None:
        return None
    return ssl_object.getpeercert(binary_form=True)


# ---------------------------------------------------------------------------
# RFC 5705 exporter via ctypes


class _Lib:
    """The three OpenSSL functions we need, looked up once."""

    def __init__(self) -> None:
        import _ssl  # the extension module Python's ssl is built on

        lib = ctypes.CDLL(_ssl.__file__)
        export = lib.SSL_export_keying_material
        export.argtypes = [
            ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
            ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int,
        ]
        export.restype = ctypes.c_int
        get_version = lib.SSL_get_version
        get_version.argtypes = [ctypes.c_void_p]
        get_version.restype = ctypes.c_char_p
        get_ex_data = lib.SSL_get_ex_data
        get_ex_data.argtypes = [ctypes.c_void_p, ctypes.c_int]
        get_ex_data.restype = ctypes.c_void_p
        self.export = export
        self.get_version = get_version
        self.get_ex_data = get_ex_data


_lib: _Lib | None = None
_lib_error: str | None = None
_lib_lock = threading.Lock()
# PyObject_HEAD (refcount, type) + the socket weakref, then ``SSL *ssl``.
_SSL_PTR_OFFSET = 3 * ctypes.sizeof(ctypes.c_void_p)


def _load() -> _Lib:
    global _lib, _lib_error
    with _lib_lock:
        if _lib is None and _lib_error is None:
            if sys.implementation.name != "cpython" or hasattr(sys, "gettotalrefcount"):
                # Other interpreters and debug builds lay out PySSLSocket differently.
                _lib_error = "unsupported interpreter"
            else:
                try:
                    _lib = _Lib()
                except (OSError, AttributeError, ImportError) as exc:
                    _lib_error = f"{type(exc).__name__}: {exc}"
        if _lib is None:
            raise OnionError(f"{_UNAVAILABLE} ({_lib_error})")
        return _lib


def _ssl_pointer(lib: _Lib, ssl_object: Any) -> int:
    """The verified ``SSL *`` behind ``ssl_object`` (an SSLObject or SSLSocket)."""
    inner = getattr(ssl_object, "_sslobj", None)
    if inner is None or type(inner).__name__ != "_SSLSocket":
        raise OnionError(f"{_UNAVAILABLE} (not a connected TLS object)")
    ptr = ctypes.c_void_p.from_address(id(inner) + _SSL_PTR_OFFSET).value
    if not ptr:
        raise OnionError(f"{_UNAVAILABLE} (no SSL pointer)")
    # CPython does SSL_set_app_data(ssl, self): the SSL object must point back at us.
    if lib.get_ex_data(ptr, 0) != id(inner):
        raise OnionError(f"{_UNAVAILABLE} (SSL pointer check failed)")
    expected = ssl_object.version()
    got = lib.get_version(ptr)
    if expected is None or got is None or got.decode("ascii", "replace") != expected:
        raise OnionError(f"{_UNAVAILABLE} (TLS version check failed)")
    return ptr


def export_keying_material(ssl_object: Any, label: bytes, context: bytes, length: int = 32) -> bytes:
    """RFC 5705 keying material of the established TLS session (context always used).

    Raises:
        OnionError: the exporter cannot be reached safely, or OpenSSL refused.
    """
    if not 0 < length <= 1024:
        raise OnionError("exporter length out of range")
    lib = _load()
    ptr = _ssl_pointer(lib, ssl_object)
    out = ctypes.create_string_buffer(length)
    ok = lib.export(ptr, out, length, label, len(label), context, len(context), 1)
    if ok != 1:
        raise OnionError(f"{_UNAVAILABLE} (SSL_export_keying_material failed)")
    return out.raw


def exporter_available() -> bool:
    """True when :func:`export_keying_material` can be used in this interpreter."""
    try:
        _load()
    except OnionError:
        return False
    return True
