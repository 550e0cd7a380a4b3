"""fwknop's SPA packets (FKO protocol 3.0.0, fwknop 2.x): the format, pure.

Facts from fwknop's source (lib/fko_encryption.c, lib/cipher_funcs.c,
lib/fko_hmac.c, lib/fko_decode.c, lib/fko_message.c, server/incoming_spa.c):
- A packet is base64 text (standard alphabet, '=' stripped) of
  "Salted__" + salt(8) + AES-256-CBC(plaintext, PKCS#7), sent without the
  first 10 characters ("U2FsdGVkX1", the base64 of "Salted__"), then the
  HMAC's base64 appended.  The HMAC is taken over the text *with* those 10
  characters put back ("hQ" for GnuPG mode).
- Key and IV come from the Rijndael key and the salt as OpenSSL's
  EVP_BytesToKey with MD5 and one round (D1 = MD5(key+salt), Di =
  MD5(Di-1+key+salt); key = D1+D2, IV = D3).  Legacy IV mode first pads a key
  shorter than 16 bytes with '0' characters.
- The plaintext is "rand(16 digits):user_b64:timestamp:version:type:message_b64
  [:nat_b64][:server_auth_b64][:client_timeout]:digest_b64", the digest a hash
  of everything before it.  fwknopd takes 400 base64 characters or more (HMAC
  removed) for GnuPG.
- A NAT access message (types 2 and 4, `fwknop -N HOST:PORT`) carries
  "HOST,PORT" (lib/fko_message.c validate_nat_access_msg: one comma, HOST at
  most 70 characters, a port after it); its access message's first
  proto/port is the port fwknopd DNATs on its own host to HOST:PORT
  (server/fw_util_iptables.c process_spa_request).  Local NAT (types 5 and 6,
  `--nat-local`) redirects a port of fwknopd's own host: never served here.

Invariants (docs/protocol.md, "fwknop compatibility"; docs/threat-model.md,
"fwknop clients"):
- Nothing here reads a clock or draws randomness: the salt and the random
  value are arguments of `seal` (tests and benchmarks make packets with it).
- `split`, `decrypt` and `decode` raise `PacketError` and nothing else, for
  any bytes.  `decode` is strict: every field checked, no field ignored
  but the username and the version string.
- The text the HMAC covers fixes every byte of the packet: the HMAC is
  checked in its canonical base64 only, so a replayed packet is the same
  bytes (the replay cache keys on them).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import ipaddress
import re
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from spa.core.errors import PacketError, Reason
from spa.core.wire import check_address

MIN_PACKET = 140  # fwknopd's MIN_SPA_DATA_SIZE (server/fwknopd_common.h)
MAX_PACKET = 1500  # fwknopd's MAX_SPA_PACKET_LEN
GPG_MIN = 400  # fwknop's MIN_GNUPG_MSG_SIZE: this much text (HMAC removed) is GnuPG
SALTED_B64 = b"U2FsdGVkX1"  # base64 of "Salted__", stripped by the client
GPG_B64 = b"hQ"  # the base64 prefix of a GnuPG message, stripped by the client
SALTED = b"Salted__"
SALT_SIZE = 8
BLOCK = 16  # AES block
MAX_KEY = 32  # fwknop's RIJNDAEL_MAX_KEYSIZE: a longer Rijndael key is refused
HMAC_B64 = 43  # characters of a base64 HMAC-SHA256 (32 bytes, '=' stripped)
# base64 lengths of the other HMACs fwknop can append (refused; diagnosed)
OTHER_HMAC_B64 = {22: "md5", 27: "sha1", 64: "sha384", 86: "sha512"}
RAND_DIGITS = 16  # fwknop's FKO_RAND_VAL_SIZE
MAX_MESSAGE_B64 = 256  # fwknop's MAX_SPA_MESSAGE_SIZE
MAX_USER_B64 = 64  # MAX_SPA_USERNAME_SIZE
MAX_TIMESTAMP_DIGITS = 12  # MAX_SPA_TIMESTAMP_SIZE
MAX_VERSION = 8  # MAX_SPA_VERSION_SIZE
MAX_TIMEOUT = 2 << 15  # fwknop's bound on a client timeout (65536 seconds)
MAX_NAT_B64 = 128  # fwknop's MAX_SPA_NAT_ACCESS_SIZE
MAX_NAT_HOST = 70  # fwknop's MAX_HOSTNAME_LEN
# digest lengths (base64) -> the hashes fwknop may have used (SHA3 shares lengths);
# MD5 and SHA-1 (-m md5, -m sha1) are refused WEAK_DIGEST
_DIGESTS = {43: ("sha256", "sha3_256"), 64: ("sha384",), 86: ("sha512", "sha3_512")}
_WEAK_DIGESTS = {22: "md5", 27: "sha1"}
_B64_TEXT = re.compile(rb"[A-Za-z0-9+/]+\Z")
_ACCESS = re.compile(r"([0-9]{1,3}(?:\.[0-9]{1,3}){3}),(.+)\Z")
_PORT_SPEC = re.compile(r"([a-z]{1,4})/([0-9]{1,5})\Z")
_VERSION = re.compile(r"[0-9A-Za-z.]{1,8}\Z")
# HOST,PORT: an address or a name (fwknop's hostname characters), then a port
_NAT = re.compile(rf"([A-Za-z0-9._-]{{1,{MAX_NAT_HOST}}}),([0-9]{{1,5}})\Z")
UNSPECIFIED = ipaddress.IPv4Address("0.0.0.0")  # noqa: S104 (fwknop's "use my source")


class Message(enum.IntEnum):
    """fwknop's message types (lib/fko.h fko_message_type_t)."""

    COMMAND = 0
    ACCESS = 1
    NAT_ACCESS = 2
    CLIENT_TIMEOUT_ACCESS = 3
    CLIENT_TIMEOUT_NAT_ACCESS = 4
    LOCAL_NAT_ACCESS = 5
    CLIENT_TIMEOUT_LOCAL_NAT_ACCESS = 6


# NAT access is decoded, then served only for a gateway service (spa.core.fwknop_verify)
ACCEPTED_TYPES = frozenset({Message.ACCESS, Message.CLIENT_TIMEOUT_ACCESS, Message.NAT_ACCESS,
                            Message.CLIENT_TIMEOUT_NAT_ACCESS})
NAT_TYPES = frozenset({Message.NAT_ACCESS, Message.CLIENT_TIMEOUT_NAT_ACCESS})
_TIMEOUT_TYPES = frozenset({Message.CLIENT_TIMEOUT_ACCESS, Message.CLIENT_TIMEOUT_NAT_ACCESS,
                            Message.CLIENT_TIMEOUT_LOCAL_NAT_ACCESS})


@dataclass(frozen=True, slots=True)
class FwknopKeys:
    """One compat client's keys, as fwknop's KEY_BASE64 and HMAC_KEY_BASE64 decode."""

    rijndael: bytes = field(repr=False)
    hmac: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not 1 <= len(self.rijndael) <= MAX_KEY:
            raise ValueError(f"an fwknop Rijndael key is 1 to {MAX_KEY} bytes")
        if not 1 <= len(self.hmac) <= 128:  # fwknop's MAX_DIGEST_BLOCK_LEN
            raise ValueError("an fwknop HMAC key is 1 to 128 bytes")


@dataclass(frozen=True, slots=True)
class SpaData:
    """A decrypted, checked fwknop packet."""

    rand: str
    username: str
    timestamp: int  # Unix seconds
    version: str
    message_type: Message
    allow_ip: ipaddress.IPv4Address  # 0.0.0.0: the packet's source
    ports: tuple[tuple[str, int], ...]  # (protocol, port) asked for
    client_timeout: int = 0  # seconds (types 3, 4, 6); 0: the service's default
    # NAT access (types 2, 4): the destination as sent, (HOST, PORT); HOST is
    # text (fwknop allows a name), never resolved here
    nat: tuple[str, int] | None = None


def b64(raw: bytes) -> bytes:
    """fwknop's base64: standard alphabet, '=' stripped."""
    return base64.b64encode(raw).rstrip(b"=")


def unb64(text: bytes) -> bytes:
    """Decode fwknop's base64 (no '=').  Raises PacketError(MALFORMED)."""
    if len(text) % 4 == 1 or not _B64_TEXT.match(text):
        raise PacketError(Reason.MALFORMED, "not base64")
    try:
        return base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise PacketError(Reason.MALFORMED, "not base64") from None


def check_shape(packet: bytes) -> None:
    """The checks before any cryptography: length and alphabet (fwknopd's
    preprocess_spa_data).  Raises PacketError(BAD_LENGTH, MALFORMED)."""
    if not MIN_PACKET <= len(packet) <= MAX_PACKET:
        raise PacketError(Reason.BAD_LENGTH)
    if not _B64_TEXT.match(packet):
        raise PacketError(Reason.MALFORMED, "not base64")
    if packet.startswith(SALTED_B64):  # fwknopd: a prefix put back is a replay trick
        raise PacketError(Reason.MALFORMED, "prefix not stripped")


def split(packet: bytes) -> tuple[bytes, bytes]:
    """(the text the HMAC covers, with its prefix put back; the HMAC) of a
    packet whose shape passed.  Raises PacketError: GPG_MODE (fwknop's own
    rule: that much text is GnuPG), MALFORMED (a non-canonical HMAC)."""
    text, tail = packet[:-HMAC_B64], packet[-HMAC_B64:]
    if len(text) >= GPG_MIN:
        raise PacketError(Reason.GPG_MODE)
    mac = unb64(tail)
    if b64(mac) != tail:  # the last character's spare bits: one spelling only
        raise PacketError(Reason.MALFORMED, "non-canonical HMAC")
    return SALTED_B64 + text, mac


def derive(key: bytes, salt: bytes, *, legacy: bool = False) -> tuple[bytes, bytes]:
    """(AES-256 key, IV) from a Rijndael key and a packet's salt (EVP_BytesToKey, MD5)."""
    if legacy and len(key) < BLOCK:
        key = key.ljust(BLOCK, b"0")
    material, block = b"", b""
    while len(material) < 48:
        block = hashlib.md5(block + key + salt).digest()  # noqa: S324 (fwknop's KDF)
        material += block
    return material[:32], material[32:48]


def raw_ciphertext(signed: bytes) -> bytes:
    """"Salted__" + salt + ciphertext from the signed text.
    Raises PacketError(BAD_CIPHERTEXT)."""
    try:
        raw = unb64(signed)
    except PacketError:
        raise PacketError(Reason.BAD_CIPHERTEXT) from None
    if (len(raw) % BLOCK or len(raw) < 2 * BLOCK or not raw.startswith(SALTED)):
        raise PacketError(Reason.BAD_CIPHERTEXT)
    return raw


def decrypt(signed: bytes, key: bytes, *, legacy: bool = False) -> bytes:
    """The plaintext of the signed text under a Rijndael key (strict PKCS#7).
    Raises PacketError(BAD_CIPHERTEXT)."""
    raw = raw_ciphertext(signed)
    aes_key, iv = derive(key, raw[SALT_SIZE:BLOCK], legacy=legacy)
    decryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).decryptor()
    plain = decryptor.update(raw[BLOCK:]) + decryptor.finalize()
    pad = plain[-1]
    if not 1 <= pad <= BLOCK or plain[-pad:] != bytes([pad]) * pad:
        raise PacketError(Reason.BAD_CIPHERTEXT)
    return plain[:-pad]


def is_fwknop_plaintext(signed: bytes, key: bytes, *, legacy: bool = False) -> bool:
    """Whether `signed` decrypts under `key` to something that starts with
    fwknop's 16-digit random value and a ':' (the first block is tried
    first: one AES block, three MD5s): a diagnosis, never an authentication."""
    try:
        raw = raw_ciphertext(signed)
    except PacketError:
        return False
    aes_key, iv = derive(key, raw[SALT_SIZE:BLOCK], legacy=legacy)
    decryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).decryptor()
    if not (decryptor.update(raw[BLOCK:2 * BLOCK]) + decryptor.finalize()).isdigit():
        return False
    try:
        plain = decrypt(signed, key, legacy=legacy)
    except PacketError:
        return False
    return plain[RAND_DIGITS:RAND_DIGITS + 1] == b":"


def decode(plain: bytes) -> SpaData:
    """Parse and check a plaintext.  Raises PacketError: MALFORMED,
    WEAK_DIGEST (an MD5 or SHA-1 digest), COMMAND_MESSAGE for a command,
    NAT_MESSAGE for local NAT (types 5, 6).  A NAT access message decodes
    with its destination (`nat`); the verifier decides whether it is served."""
    if not plain.isascii() or not all(32 <= c < 127 for c in plain):
        raise PacketError(Reason.MALFORMED, "not printable")
    text = plain.decode("ascii")
    encoded, _, digest = text.rpartition(":")
    _check_digest(encoded, digest)
    fields = encoded.split(":")
    if len(fields) < 6:
        raise PacketError(Reason.MALFORMED, "too few fields")
    rand, user, stamp, version, kind = fields[:5]
    if len(rand) != RAND_DIGITS or not rand.isdigit():
        raise PacketError(Reason.MALFORMED, "random value")
    if not 1 <= len(stamp) <= MAX_TIMESTAMP_DIGITS or not stamp.isdigit():
        raise PacketError(Reason.MALFORMED, "timestamp")
    if not _VERSION.match(version):
        raise PacketError(Reason.MALFORMED, "version")
    if len(kind) > 2 or not kind.isdigit() or int(kind) > max(Message):
        raise PacketError(Reason.MALFORMED, "message type")
    message_type = Message(int(kind))
    if message_type is Message.COMMAND:
        raise PacketError(Reason.COMMAND_MESSAGE)
    if message_type not in ACCEPTED_TYPES:
        raise PacketError(Reason.NAT_MESSAGE)
    rest = fields[6:]
    nat = None
    if message_type in NAT_TYPES:
        if not rest:
            raise PacketError(Reason.MALFORMED, "NAT access")
        nat = _nat(rest.pop(0))
    timeout = 0
    if message_type in _TIMEOUT_TYPES:
        if len(rest) != 1 or not rest[0].isdigit() or len(rest[0]) > 5:
            raise PacketError(Reason.MALFORMED, "client timeout")
        timeout = int(rest[0])
        if timeout > MAX_TIMEOUT:
            raise PacketError(Reason.MALFORMED, "client timeout")
    elif rest:  # server_auth, a legacy feature fwknopd never uses for access
        raise PacketError(Reason.MALFORMED, "extra fields")
    allow_ip, ports = _access(fields[5])
    return SpaData(rand, _text(user, MAX_USER_B64, "username"), int(stamp), version,
                   message_type, allow_ip, ports, timeout, nat)


def _nat(field_b64: str) -> tuple[str, int]:
    """"HOST,PORT" of a NAT access message.  Raises PacketError(MALFORMED)."""
    found = _NAT.match(_text(field_b64, MAX_NAT_B64, "NAT access"))
    if found is None or not 1 <= int(found.group(2)) <= 65535:
        raise PacketError(Reason.MALFORMED, "NAT access")
    return found.group(1), int(found.group(2))


def _check_digest(encoded: str, digest: str) -> None:
    if len(digest) in _WEAK_DIGESTS:
        raise PacketError(Reason.WEAK_DIGEST)
    names = _DIGESTS.get(len(digest))
    if names is None:
        raise PacketError(Reason.MALFORMED, "digest")
    data = encoded.encode("ascii")
    for name in names:
        if b64(hashlib.new(name, data).digest()).decode() == digest:
            return
    raise PacketError(Reason.MALFORMED, "digest")


def _text(field_b64: str, most: int, what: str) -> str:
    if not 1 <= len(field_b64) <= most:
        raise PacketError(Reason.MALFORMED, what)
    raw = unb64(field_b64.encode("ascii"))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PacketError(Reason.MALFORMED, what) from None


def _access(message_b64: str) -> tuple[ipaddress.IPv4Address, tuple[tuple[str, int], ...]]:
    """"1.2.3.4,tcp/22[,udp/53...]" (lib/fko_message.c validate_access_msg)."""
    found = _ACCESS.match(_text(message_b64, MAX_MESSAGE_B64, "message"))
    if found is None:
        raise PacketError(Reason.MALFORMED, "access message")
    try:
        address = ipaddress.IPv4Address(found.group(1))
        if address != UNSPECIFIED:
            check_address(address)  # never loopback, multicast, broadcast, 0/8
    except ValueError:
        raise PacketError(Reason.MALFORMED, "allow address") from None
    ports = []
    for spec in found.group(2).split(","):
        port = _PORT_SPEC.match(spec)
        if port is None or not 1 <= int(port.group(2)) <= 65535:
            raise PacketError(Reason.MALFORMED, "protocol/port")
        ports.append((port.group(1), int(port.group(2))))
    return address, tuple(ports)


# ---- making packets (tests, benchmarks; the real client is fwknop) --------------

def plaintext(data: SpaData, *, digest: str = "sha256") -> bytes:
    """The encoded message and its digest, as fwknop's client makes them."""
    access = ",".join([str(data.allow_ip), *(f"{p}/{n}" for p, n in data.ports)])
    fields = [data.rand, b64(data.username.encode()).decode(), str(data.timestamp),
              data.version, str(int(data.message_type)), b64(access.encode()).decode()]
    if data.nat is not None:
        fields.append(b64(f"{data.nat[0]},{data.nat[1]}".encode()).decode())
    if data.message_type in _TIMEOUT_TYPES:
        fields.append(str(data.client_timeout))
    encoded = ":".join(fields).encode("ascii")
    return encoded + b":" + b64(hashlib.new(digest, encoded).digest())


def seal(plain: bytes, keys: FwknopKeys, *, salt: bytes, hmac_name: str | None = "sha256",
         legacy: bool = False) -> bytes:
    """A packet as fwknop's client sends it (`hmac_name` None: no HMAC)."""
    import hmac as hmac_mod

    aes_key, iv = derive(keys.rijndael, salt, legacy=legacy)
    pad = BLOCK - len(plain) % BLOCK
    encryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).encryptor()
    raw = SALTED + salt + encryptor.update(plain + bytes([pad]) * pad) + encryptor.finalize()
    text = b64(raw)
    if hmac_name is None:
        return text[len(SALTED_B64):]
    mac = hmac_mod.new(keys.hmac, text, hmac_name).digest()
    return text[len(SALTED_B64):] + b64(mac)
