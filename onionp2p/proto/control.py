"""Tor control protocol: framing and the authentication state machine, sans-IO (specs/control.md).

Theory of operation
-------------------
:class:`ControlSession` is one control connection without the socket: bytes in, actions
out. :meth:`ControlSession.feed` takes whatever arrived and returns, in order,

* :class:`Send` — reply bytes to write (answers the session produced itself),
* :class:`Dispatch` — an authenticated command for the node-facing layer to execute,
* :class:`Close` — write what came before, then close the connection.

The caller must carry the actions out strictly in order: that keeps replies in command
order (control-spec: "servers respond to messages in the order messages are received").

**Framing** (:class:`CommandReader`). Lines end in LF (CRLF preferred, bare LF accepted as
tor does). A line longer than ``max_line`` bytes, or a multi-line (``+KEYWORD``) command
whose data exceeds ``max_body``, raises :class:`LineTooLong` (a
:class:`~onionp2p.errors.ProtocolError`); the session still executes the commands completed
before it, then answers ``500 Line too long.`` and closes. Input is decoded as Latin-1,
so every byte sequence is a string and passwords round-trip byte for byte.

**Authentication** follows tor's rules exactly:

* before authentication only PROTOCOLINFO (once, and not after AUTHCHALLENGE),
  AUTHCHALLENGE (once), AUTHENTICATE and QUIT are valid; anything else gets
  ``514 Authentication required.`` and the connection is closed — so a flood of
  unauthenticated commands costs one reply;
* methods: NULL (only when nothing else is configured), COOKIE and SAFECOOKIE (a 32-byte
  cookie file), HASHEDPASSWORD (tor's ``16:`` RFC 2440 iterated+salted S2K, see
  :func:`secret_to_key`); after AUTHCHALLENGE only the SAFECOOKIE response is accepted;
* a failed AUTHENTICATE gets ``515 Authentication failed: ...`` (tor's wording, which stem
  parses) and the connection is closed. Secrets are compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from onionp2p.errors import ConfigError, LocalProtocolError, OnionError, ProtocolError

__all__ = [
    "TOKEN",
    "KEYWORD",
    "check_line",
    "ControlError",
    "Data",
    "format_reply",
    "format_event",
    "echo",
    "qecho",
    "one_line",
    "words",
    "quote",
    "maybe_quote",
    "unquote",
    "split_args",
    "split_keyword",
    "Command",
    "CommandReader",
    "LineTooLong",
    "Send",
    "Dispatch",
    "Close",
    "Action",
    "AuthConfig",
    "ControlSession",
    "COOKIE_LEN",
    "S2K_SPECIFIER_LEN",
    "secret_to_key",
    "hash_password",
    "decode_hashed_password",
    "SAFECOOKIE_SERVER_KEY",
    "SAFECOOKIE_CLIENT_KEY",
]


class ControlError(OnionError):
    """A control command cannot be carried out; ``code`` is the control-spec status code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# -- quoting, tokens and replies (control-spec §2) ------------------------------------

#: a control-protocol token: printable ASCII except space, '"' and '\'
TOKEN = re.compile(r"[!#-\[\]-~]+")
KEYWORD = re.compile(r"[A-Za-z0-9_]+")
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}



def quote(s: str) -> str:
    """A QuotedString for output: backslash, quote and control characters escaped (C style)."""
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def maybe_quote(s: str) -> str:
    """``s`` as is if it is a plain token, else :func:`quote`\\ d."""
    return s if TOKEN.fullmatch(s) else quote(s)


def echo(s: str, limit: int = 200) -> str:
    """Controller-supplied text made safe to repeat inside a reply line: printable ASCII
    kept, backslash and quote escaped, anything else as ``\\xNN``; at most ``limit`` chars."""
    out = []
    for ch in s[:limit]:
        if ch in '\\"':
            out.append("\\" + ch)
        elif 0x20 <= ord(ch) < 0x7F:
            out.append(ch)
        else:
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
    return "".join(out)


def one_line(s: str, limit: int = 1000) -> str:
    """``s`` cut to ``limit`` characters with every non-printable character replaced by '?'."""
    return "".join(ch if ch.isprintable() else "?" for ch in s[:limit])


def qecho(s: str) -> str:
    """:func:`echo` inside double quotes, as tor prints names in error replies."""
    return f'"{echo(s)}"'


def words(text: str) -> list[str]:
    """Space/tab separated words (tor splits plain arguments on these only)."""
    return [w for w in text.replace("\t", " ").split(" ") if w]


def unquote(token: str) -> str:
    """Decode one ``"..."`` QuotedString (backslash + any character = that character)."""
    if len(token) < 2 or token[0] != '"' or token[-1] != '"':
        raise ControlError(512, f"Expected a quoted string, got {qecho(token)}")
    out = []
    i, end = 1, len(token) - 1
    while i < end:
        ch = token[i]
        if ch == "\\":
            if i + 1 >= end:
                raise ControlError(512, "Bad escape at end of quoted string")
            out.append(token[i + 1])
            i += 2
            continue
        if ch == '"':
            raise ControlError(512, "Unescaped quote inside quoted string")
        out.append(ch)
        i += 1
    return "".join(out)


def split_args(text: str) -> list[str]:
    """Split an argument string on spaces/tabs; quoted parts (also ``K="a b"``) stay whole."""
    tokens: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] in " \t":
            i += 1
            continue
        start = i
        while i < n and text[i] not in " \t":
            if text[i] == '"':
                i += 1
                while i < n and text[i] != '"':
                    i += 2 if text[i] == "\\" else 1
                if i >= n:
                    raise ControlError(512, "Unterminated quoted string")
            i += 1
        tokens.append(text[start:i])
    return tokens


def split_keyword(token: str) -> tuple[str, str | None]:
    """``KEY=value`` / ``KEY="quoted"`` / ``KEY`` -> (KEY, value or None)."""
    key, eq, value = token.partition("=")
    if not KEYWORD.fullmatch(key):
        raise ControlError(513, f"Bad keyword {qecho(key)}")
    if not eq:
        return key, None
    if value.startswith('"'):
        return key, unquote(value)
    if '"' in value:
        raise ControlError(513, f"Stray quote in value of {key}")
    return key, value


# -- replies ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Data:
    """A data reply line: ``NNN+header`` then ``body`` as dot-escaped CmdData."""

    header: str
    body: str


def check_line(text: str) -> str:
    if "\r" in text or "\n" in text:
        raise LocalProtocolError("reply line contains CR or LF")
    return text


def _dot_escape(body: str) -> str:
    lines = body.replace("\r\n", "\n").replace("\r", "").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return "".join(("." + ln if ln.startswith(".") else ln) + "\r\n" for ln in lines) + ".\r\n"


def format_reply(code: int, lines: Sequence[str | Data]) -> bytes:
    """One complete reply. All but the last line are ``NNN-`` (or ``NNN+`` data blocks);
    the last must be text and becomes the ``NNN `` end line."""
    if not lines or isinstance(lines[-1], Data):
        raise LocalProtocolError("a reply must end with a text line")
    out = []
    for i, line in enumerate(lines):
        if isinstance(line, Data):
            out.append(f"{code}+{check_line(line.header)}\r\n{_dot_escape(line.body)}")
        else:
            out.append(f"{code}{' ' if i == len(lines) - 1 else '-'}{check_line(line)}\r\n")
    return "".join(out).encode("utf-8", "replace")


def format_event(event_type: str, text: str = "") -> bytes:
    """One single-line asynchronous event: ``650 TYPE text``."""
    return format_reply(650, [f"{event_type} {text}" if text else event_type])

COOKIE_LEN = 32
S2K_SPECIFIER_LEN = 9  # 8-byte salt + 1 count byte
SAFECOOKIE_SERVER_KEY = b"Tor safe cookie authentication server-to-controller hash"
SAFECOOKIE_CLIENT_KEY = b"Tor safe cookie authentication controller-to-server hash"
_PRE_AUTH = frozenset({"PROTOCOLINFO", "AUTHCHALLENGE", "AUTHENTICATE", "QUIT"})


# -- tor's secret-to-key (RFC 2440 iterated and salted S2K, SHA-1) ------------------------

def secret_to_key(secret: bytes, specifier: bytes) -> bytes:
    """The 20-byte key tor derives from ``secret`` and a 9-byte specifier (salt + count byte).

    SHA-1 over ``salt || secret`` repeated until exactly ``count`` bytes were hashed,
    ``count = (16 + (c & 15)) << ((c >> 4) + 6)``.
    """
    if len(specifier) != S2K_SPECIFIER_LEN:
        raise ConfigError("S2K specifier must be 9 bytes")
    c = specifier[8]
    count = (16 + (c & 15)) << ((c >> 4) + 6)
    data = specifier[:8] + secret
    chunk = data * max(1, 65536 // len(data))  # whole copies, so chunk boundaries stay aligned
    digest = hashlib.sha1()
    while count >= len(chunk):
        digest.update(chunk)
        count -= len(chunk)
    digest.update(chunk[:count])
    return digest.digest()


def hash_password(secret: str | bytes, *, salt: bytes | None = None, count_byte: int = 96) -> str:
    """``tor --hash-password``: ``16:`` + hex(salt || count byte || S2K key)."""
    raw = secret.encode() if isinstance(secret, str) else secret
    salt = os.urandom(8) if salt is None else salt
    if len(salt) != 8 or not 0 <= count_byte <= 255:
        raise ConfigError("salt must be 8 bytes and the count byte 0..255")
    spec = salt + bytes([count_byte])
    return "16:" + (spec + secret_to_key(raw, spec)).hex().upper()


def decode_hashed_password(value: str) -> bytes:
    """Parse a HashedControlPassword value (``16:HEX`` or base64) into specifier || key."""
    want = S2K_SPECIFIER_LEN + 20
    try:
        if value.startswith("16:"):
            raw = bytes.fromhex(value[3:])
        else:
            raw = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (ValueError, binascii.Error):
        raise ConfigError("hashed control password is not valid hex/base64") from None
    if len(raw) != want:
        raise ConfigError(f"hashed control password must decode to {want} bytes")
    return raw


# -- framing ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    """One controller command: ``keyword`` upper-cased (without ``+``), ``args`` the rest of
    the first line, ``body`` the dot-unescaped data of a multi-line command (else None)."""

    keyword: str
    args: str
    body: str | None = None


class LineTooLong(ProtocolError):
    """A line or multi-line command exceeded its bound; ``commands`` holds the commands
    completed earlier in the same chunk (they are still executed, in order)."""

    def __init__(self, message: str, commands: list[Command]):
        super().__init__(message)
        self.commands = commands


class CommandReader:
    """Reassembles commands from a byte stream (see the module docstring)."""

    def __init__(self, *, max_line: int = 64 * 1024, max_body: int = 1024 * 1024):
        self.max_line = max_line
        self.max_body = max_body
        self._buf = bytearray()
        self._multi: tuple[str, str, list[str], int] | None = None

    def feed(self, data: bytes) -> list[Command]:
        """Commands completed by ``data``. Raises :class:`LineTooLong` on an over-long line/body."""
        self._buf += data
        out: list[Command] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0 and len(self._buf) <= self.max_line:
                return out
            if nl < 0 or nl > self.max_line:
                self._buf.clear()
                raise LineTooLong("Line too long.", out)
            line = bytes(self._buf[:nl]).decode("latin-1")
            del self._buf[: nl + 1]
            if line.endswith("\r"):
                line = line[:-1]
            cmd = self._line(line, out)
            if cmd is not None:
                out.append(cmd)

    def _line(self, line: str, done: list[Command]) -> Command | None:
        if self._multi is not None:
            keyword, args, body, size = self._multi
            if line == ".":
                self._multi = None
                return Command(keyword, args, "\n".join(body))
            if line.startswith("."):
                line = line[1:]
            size += len(line) + 1
            if size > self.max_body:
                self._buf.clear()
                raise LineTooLong("Command too long.", done)
            body.append(line)
            self._multi = (keyword, args, body, size)
            return None
        multi = line.startswith("+")
        if multi:
            line = line[1:]
        keyword, _, args = line.replace("\t", " ").partition(" ")
        keyword, args = keyword.upper(), args.lstrip(" ")
        if multi:
            self._multi = (keyword, args, [], 0)
            return None
        return Command(keyword, args)


# -- the session ------------------------------------------------------------------------------

class Send(NamedTuple):
    data: bytes


class Dispatch(NamedTuple):
    command: Command


class Close(NamedTuple):
    reason: str


Action = Send | Dispatch | Close


@dataclass(frozen=True)
class AuthConfig:
    """What the control port accepts. No cookie and no password means NULL authentication
    (allowed only when the server was told so)."""

    cookie: bytes | None = None
    cookie_path: str | None = None
    hashed_passwords: tuple[bytes, ...] = ()  # decode_hashed_password() values
    version: str = ""

    def methods(self) -> list[str]:
        m = ["COOKIE", "SAFECOOKIE"] if self.cookie is not None else []
        if self.hashed_passwords:
            m.append("HASHEDPASSWORD")
        return m or ["NULL"]


def _reply(code: int, text: str) -> Send:
    return Send(format_reply(code, [text]))


@dataclass
class ControlSession:
    """Framing plus the authentication state machine for one connection (sans-IO)."""

    auth: AuthConfig
    max_line: int = 64 * 1024
    max_body: int = 1024 * 1024
    random: Callable[[int], bytes] = os.urandom
    authenticated: bool = False
    closed: bool = False
    _reader: CommandReader = field(init=False)
    _sent_protocolinfo: bool = field(default=False, init=False)
    _safecookie_hash: bytes | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._reader = CommandReader(max_line=self.max_line, max_body=self.max_body)

    def feed(self, data: bytes) -> list[Action]:
        """Actions for the bytes received (see the module docstring)."""
        if self.closed:
            return []
        try:
            commands, failure = self._reader.feed(data), None
        except LineTooLong as exc:
            commands, failure = exc.commands, str(exc)
        actions: list[Action] = []
        for cmd in commands:
            if self.closed:
                break
            actions.extend(self._command(cmd))
        if failure is not None and not self.closed:
            self.closed = True
            actions += [_reply(500, failure), Close(failure)]
        return actions

    def _close(self, code: int, text: str) -> list[Action]:
        self.closed = True
        return [_reply(code, text), Close(text)]

    def _command(self, cmd: Command) -> list[Action]:
        kw = cmd.keyword
        if kw == "QUIT":
            return self._close(250, "closing connection")
        if not self.authenticated:
            allowed = kw in _PRE_AUTH and not (
                kw == "PROTOCOLINFO" and (self._sent_protocolinfo or self._safecookie_hash is not None)
            ) and not (kw == "AUTHCHALLENGE" and self._safecookie_hash is not None)
            if not allowed:
                return self._close(514, "Authentication required.")
        try:
            if kw == "PROTOCOLINFO":
                return self._protocolinfo(cmd.args)
            if kw == "AUTHCHALLENGE":
                return self._authchallenge(cmd.args)
            if kw == "AUTHENTICATE":
                return self._authenticate(cmd.args)
        except ControlError as exc:
            return self._close(exc.code, exc.message)
        return [Dispatch(cmd)]

    def _protocolinfo(self, args: str) -> list[Action]:
        self._sent_protocolinfo = True
        for arg in args.split():
            if not arg.isdigit():
                if self.authenticated:
                    return [_reply(513, f"No such version {qecho(arg)}")]
                return self._close(513, f"No such version {qecho(arg)}")
        auth = "AUTH METHODS=" + ",".join(self.auth.methods())
        if self.auth.cookie is not None and self.auth.cookie_path is not None:
            auth += " COOKIEFILE=" + quote(self.auth.cookie_path)
        return [Send(format_reply(250, ["PROTOCOLINFO 1", auth, f"VERSION Tor={quote(self.auth.version)}",
                                        "OK"]))]

    def _authchallenge(self, args: str) -> list[Action]:
        tokens = split_args(args)
        if not tokens or tokens[0].upper() != "SAFECOOKIE":
            raise ControlError(513, "AUTHCHALLENGE only supports SAFECOOKIE authentication")
        if self.auth.cookie is None:
            raise ControlError(515, "Cookie authentication is disabled")
        if len(tokens) != 2:
            raise ControlError(512, "Wrong number of arguments for AUTHCHALLENGE")
        nonce_text = tokens[1]
        if nonce_text.startswith('"'):
            client_nonce = unquote(nonce_text).encode("latin-1")
        else:
            if "=" in nonce_text:
                raise ControlError(512, "AUTHCHALLENGE does not accept keyword arguments.")
            try:
                client_nonce = bytes.fromhex(nonce_text)
            except ValueError:
                raise ControlError(513, "Invalid base16 client nonce") from None
        server_nonce = self.random(32)
        material = self.auth.cookie + client_nonce + server_nonce
        server_hash = hmac.new(SAFECOOKIE_SERVER_KEY, material, hashlib.sha256).digest()
        self._safecookie_hash = hmac.new(SAFECOOKIE_CLIENT_KEY, material, hashlib.sha256).digest()
        return [_reply(250, f"AUTHCHALLENGE SERVERHASH={server_hash.hex().upper()} "
                            f"SERVERNONCE={server_nonce.hex().upper()}")]

    def _authenticate(self, args: str) -> list[Action]:
        tokens = split_args(args)
        if len(tokens) > 1:
            raise ControlError(512, "Too many arguments to AUTHENTICATE.")
        quoted = bool(tokens) and tokens[0].startswith('"')
        if not tokens:
            secret = b""
        elif quoted:
            secret = unquote(tokens[0]).encode("latin-1")
        elif "=" in tokens[0]:
            raise ControlError(512, "AUTHENTICATE does not accept keyword arguments.")
        else:
            try:
                secret = bytes.fromhex(tokens[0])
            except ValueError:
                raise ControlError(551, "Invalid hexadecimal encoding.  Maybe you tried a plain text "
                                        "password?  If so, the standard requires that you put it in "
                                        "double quotes.") from None
        error = self._check_secret(secret, quoted)
        if error is not None:
            return self._close(515, f"Authentication failed: {error}")
        self.authenticated = True
        self._safecookie_hash = None
        return [_reply(250, "OK")]

    def _check_secret(self, secret: bytes, quoted: bool) -> str | None:
        """None if ``secret`` authenticates, else tor's error text."""
        if self._safecookie_hash is not None:
            if len(secret) != 32:
                return "Wrong length for safe cookie response."
            if not hmac.compare_digest(secret, self._safecookie_hash):
                return "Safe cookie response did not match expected value."
            return None
        cookie, passwords = self.auth.cookie, self.auth.hashed_passwords
        if cookie is None and not passwords:
            return None  # NULL authentication
        if cookie is not None:
            if len(secret) == COOKIE_LEN and hmac.compare_digest(secret, cookie):
                return None
            if not passwords:
                if len(secret) != COOKIE_LEN:
                    return "Wrong length on authentication cookie."
                return "Authentication cookie did not match expected value."
        for expected in passwords:
            key = secret_to_key(secret, expected[:S2K_SPECIFIER_LEN])
            if hmac.compare_digest(key, expected[S2K_SPECIFIER_LEN:]):
                return None
        if cookie is not None:
            return "Password did not match HashedControlPassword *or* authentication cookie."
        if quoted:
            return "Password did not match HashedControlPassword value from configuration"
        return ("Password did not match HashedControlPassword value from configuration. Maybe you "
                "tried a plain text password? If so, the standard requires that you put it in "
                "double quotes.")
