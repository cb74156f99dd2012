"""LUKS2 in userspace: header and metadata, keyslot unlock, and the AES-XTS-plain64 data cipher.

Owns: the binary header (magic, version, size, checksum, primary with the secondary as fallback), the
JSON metadata (keyslots, segments, digests), keyslot unlock (PBKDF2 or Argon2i/Argon2id → AES-XTS in
512-byte sectors over the keyslot area → AF-merge → digest check) and sector encryption for the data
segment (IV = sector in 512-byte units + ``iv_tweak``), as cryptsetup 2.x writes them.

Pure: bytes in, bytes out (the caller reads the image); the primitives are ``cryptography``'s. The volume
key lives only in memory, is kept out of reprs and never logged.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from skr.encfs.errors import LuksError, LuksUnsupported, LuksWrongKey

MAGIC_PRIMARY = b"LUKS\xba\xbe"
MAGIC_SECONDARY = b"SKUL\xba\xbe"
BINARY_HEADER_SIZE = 4096
# Where cryptsetup may put the secondary header (offset = size of the primary header area).
SECONDARY_OFFSETS = (16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152, 4194304)
KEYSLOT_SECTOR = 512
SUPPORTED_CIPHER = "aes-xts-plain64"
_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha512": hashes.SHA512,
}

ReadAt = Callable[[int, int], bytes]  # (offset, size) -> bytes


@dataclass(frozen=True)
class Kdf:
    type: str  # "pbkdf2" | "argon2i" | "argon2id"
    salt: bytes = field(repr=False)
    hash: str = ""  # pbkdf2
    iterations: int = 0  # pbkdf2
    time: int = 0  # argon2
    memory: int = 0  # argon2, KiB
    cpus: int = 0  # argon2 lanes


@dataclass(frozen=True)
class Keyslot:
    id: str
    key_size: int
    area_offset: int
    area_size: int
    area_encryption: str
    area_key_size: int
    af_stripes: int
    af_hash: str
    kdf: Kdf
    priority: int = 1  # 0 = ignore, 1 = normal, 2 = high

    @property
    def material_size(self) -> int:
        """Bytes of split key material in the area, rounded up to whole 512-byte sectors."""
        size = self.key_size * self.af_stripes
        return -(-size // KEYSLOT_SECTOR) * KEYSLOT_SECTOR


@dataclass(frozen=True)
class Segment:
    id: str
    offset: int
    size: int | None  # None = "dynamic": up to the end of the device
    iv_tweak: int
    encryption: str
    sector_size: int


@dataclass(frozen=True)
class Digest:
    id: str
    type: str
    keyslots: tuple[str, ...]
    segments: tuple[str, ...]
    hash: str
    iterations: int
    salt: bytes = field(repr=False)
    digest: bytes = field(repr=False)


@dataclass(frozen=True)
class Header:
    """A parsed, checksum-verified LUKS2 header."""

    version: int
    hdr_size: int
    seqid: int
    label: str
    uuid: str
    checksum_alg: str
    json_size: int
    keyslots_size: int
    keyslots: tuple[Keyslot, ...]
    segments: tuple[Segment, ...]
    digests: tuple[Digest, ...]
    from_secondary: bool = False
    metadata: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def data_segment(self) -> Segment:
        crypt = [s for s in self.segments if s.id == "0"] or list(self.segments)
        if not crypt:
            raise LuksError("the LUKS2 header has no data segment")
        return crypt[0]


# --- binary header and JSON ---------------------------------------------------------------------------


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def _check_binary(area: bytes, *, magic: bytes, offset: int) -> tuple[int, str]:
    """Validate one header copy (magic, version 2, size, self offset, checksum); its (hdr_size, alg)."""
    if len(area) < BINARY_HEADER_SIZE or area[:6] != magic:
        raise LuksError("not a LUKS2 image (no LUKS header magic)")
    version = int.from_bytes(area[6:8], "big")
    if version != 2:
        raise LuksUnsupported(f"LUKS version {version} is not supported (only LUKS2)")
    hdr_size = int.from_bytes(area[8:16], "big")
    if hdr_size < 16384 or hdr_size > 4194304 or hdr_size & (hdr_size - 1):
        raise LuksError(f"the LUKS2 header size {hdr_size} is not valid")
    if int.from_bytes(area[256:264], "big") != offset:
        raise LuksError("the LUKS2 header does not sit at the offset it records")
    alg = _cstr(area[72:104])
    if len(area) < hdr_size:
        raise LuksError("the LUKS2 header is truncated")
    if alg not in ("sha256", "sha512", "sha1"):
        raise LuksUnsupported(f"LUKS2 header checksum {alg!r} is not supported")
    h = hashlib.new(alg)
    h.update(area[:448])
    h.update(bytes(64))
    h.update(area[512:hdr_size])
    if not hmac.compare_digest(h.digest(), area[448 : 448 + h.digest_size]):
        raise LuksError("the LUKS2 header checksum does not match (damaged header)")
    return hdr_size, alg


def read_header(read_at: ReadAt) -> Header:
    """Read and verify the primary header; on damage fall back to a valid secondary copy."""
    first = read_at(0, BINARY_HEADER_SIZE)
    if len(first) < BINARY_HEADER_SIZE:
        raise LuksError("the image is too small to hold a LUKS2 header")
    if first[:6] != MAGIC_PRIMARY:
        raise LuksError("not a LUKS2 image (no LUKS header magic at offset 0)")
    try:
        return _read_copy(read_at, first, offset=0)
    except LuksUnsupported:
        raise
    except LuksError as exc:
        primary_error = exc
    for offset in SECONDARY_OFFSETS:
        head = read_at(offset, BINARY_HEADER_SIZE)
        if head[:6] == MAGIC_SECONDARY:
            with contextlib.suppress(LuksError):
                return _read_copy(read_at, head, offset=offset)
    raise primary_error


def _read_copy(read_at: ReadAt, head: bytes, *, offset: int) -> Header:
    """The header copy at ``offset`` whose first 4096 bytes are ``head``: the rest of it read, then parsed."""
    hdr_size = int.from_bytes(head[8:16], "big")
    return parse_header(
        head + read_at(offset + BINARY_HEADER_SIZE, max(hdr_size - BINARY_HEADER_SIZE, 0)), offset=offset
    )


def parse_header(area: bytes, *, offset: int = 0) -> Header:
    """One header copy (binary header + JSON area) at ``offset`` (0 = primary)."""
    magic = MAGIC_PRIMARY if offset == 0 else MAGIC_SECONDARY
    hdr_size, alg = _check_binary(area, magic=magic, offset=offset)
    raw_json = area[BINARY_HEADER_SIZE:hdr_size].split(b"\0", 1)[0]
    try:
        meta = json.loads(raw_json)
    except (ValueError, UnicodeDecodeError):
        raise LuksError("the LUKS2 JSON metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise LuksError("the LUKS2 JSON metadata is not an object")
    try:
        config = meta["config"]
        header = Header(
            version=2,
            hdr_size=hdr_size,
            seqid=int.from_bytes(area[16:24], "big"),
            label=_cstr(area[24:72]),
            uuid=_cstr(area[168:208]),
            checksum_alg=alg,
            json_size=int(config["json_size"]),
            keyslots_size=int(config.get("keyslots_size", 0)),
            keyslots=tuple(_keyslot(k, v) for k, v in sorted(meta.get("keyslots", {}).items())),
            segments=tuple(_segment(k, v) for k, v in sorted(meta.get("segments", {}).items())),
            digests=tuple(_digest(k, v) for k, v in sorted(meta.get("digests", {}).items())),
            from_secondary=offset != 0,
            metadata=meta,
        )
    except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as exc:
        raise LuksError(
            f"the LUKS2 JSON metadata is incomplete or malformed ({type(exc).__name__})"
        ) from None
    if header.json_size + BINARY_HEADER_SIZE != hdr_size:
        raise LuksError("the LUKS2 json_size does not match the header size")
    return header


def _b64(value: str) -> bytes:
    return base64.b64decode(value, validate=True)


def _keyslot(slot_id: str, doc: dict[str, Any]) -> Keyslot:
    kdf_doc, area, af = doc["kdf"], doc["area"], doc["af"]
    kdf = Kdf(
        type=kdf_doc["type"],
        salt=_b64(kdf_doc["salt"]),
        hash=kdf_doc.get("hash", ""),
        iterations=int(kdf_doc.get("iterations", 0)),
        time=int(kdf_doc.get("time", 0)),
        memory=int(kdf_doc.get("memory", 0)),
        cpus=int(kdf_doc.get("cpus", 0)),
    )
    return Keyslot(
        id=slot_id,
        key_size=int(doc["key_size"]),
        area_offset=int(area["offset"]),
        area_size=int(area["size"]),
        area_encryption=area["encryption"],
        area_key_size=int(area["key_size"]),
        af_stripes=int(af["stripes"]),
        af_hash=af["hash"],
        kdf=kdf,
        priority=int(doc.get("priority", 1)),
    )


def _segment(seg_id: str, doc: dict[str, Any]) -> Segment:
    size = doc["size"]
    return Segment(
        id=seg_id,
        offset=int(doc["offset"]),
        size=None if size == "dynamic" else int(size),
        iv_tweak=int(doc.get("iv_tweak", "0")),
        encryption=doc["encryption"],
        sector_size=int(doc.get("sector_size", 512)),
    )


def _digest(digest_id: str, doc: dict[str, Any]) -> Digest:
    return Digest(
        id=digest_id,
        type=doc["type"],
        keyslots=tuple(doc["keyslots"]),
        segments=tuple(doc["segments"]),
        hash=doc["hash"],
        iterations=int(doc["iterations"]),
        salt=_b64(doc["salt"]),
        digest=_b64(doc["digest"]),
    )


# --- keyslots -------------------------------------------------------------------------------------------


def _hash(name: str) -> hashes.HashAlgorithm:
    try:
        return _HASHES[name]()
    except KeyError:
        raise LuksUnsupported(f"hash {name!r} is not supported") from None


def _pbkdf2(passphrase: bytes, salt: bytes, iterations: int, hash_name: str, length: int) -> bytes:
    kdf = PBKDF2HMAC(algorithm=_hash(hash_name), length=length, salt=salt, iterations=iterations)
    return kdf.derive(passphrase)


def derive_slot_key(kdf: Kdf, passphrase: bytes, length: int) -> bytes:
    """The keyslot area key from the passphrase: PBKDF2, Argon2i or Argon2id."""
    if kdf.type == "pbkdf2":
        return _pbkdf2(passphrase, kdf.salt, kdf.iterations, kdf.hash, length)
    if kdf.type in ("argon2i", "argon2id"):
        from cryptography.hazmat.primitives.kdf import argon2

        argon = argon2.Argon2id if kdf.type == "argon2id" else argon2.Argon2i
        return argon(
            salt=kdf.salt, length=length, iterations=kdf.time, lanes=kdf.cpus, memory_cost=kdf.memory
        ).derive(passphrase)
    raise LuksUnsupported(f"keyslot KDF {kdf.type!r} is not supported")


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _diffuse(block: bytes, hash_name: str) -> bytes:
    size = hashlib.new(hash_name).digest_size
    out = bytearray()
    for i in range(0, len(block), size):
        chunk = block[i : i + size]
        out += hashlib.new(hash_name, (i // size).to_bytes(4, "big") + chunk).digest()[: len(chunk)]
    return bytes(out)


def af_merge(material: bytes, key_size: int, stripes: int, hash_name: str) -> bytes:
    """LUKS anti-forensic merge: d = H(d ⊕ s_i) over the first stripes-1 blocks, key = d ⊕ s_last."""
    if len(material) < key_size * stripes:
        raise LuksError("the keyslot area is shorter than its split key material")
    _hash(hash_name)
    d = bytes(key_size)
    for i in range(stripes - 1):
        d = _diffuse(_xor(d, material[i * key_size : (i + 1) * key_size]), hash_name)
    return _xor(d, material[(stripes - 1) * key_size : stripes * key_size])


def xts_crypt(
    key: bytes, data: bytes, *, sector_size: int, first_iv: int, iv_step: int, encrypt: bool
) -> bytes:
    """AES-XTS-plain64 over whole sectors: sector ``k`` of ``data`` uses IV ``first_iv + k·iv_step``
    (little-endian, 16 bytes)."""
    if len(data) % sector_size:
        raise LuksError("data is not a whole number of sectors")
    out = bytearray()
    algo = algorithms.AES(key)
    for k in range(len(data) // sector_size):
        cipher = Cipher(algo, modes.XTS((first_iv + k * iv_step).to_bytes(16, "little")))
        ctx = cipher.encryptor() if encrypt else cipher.decryptor()
        out += ctx.update(data[k * sector_size : (k + 1) * sector_size])
        out += ctx.finalize()
    return bytes(out)


def open_keyslot(slot: Keyslot, passphrase: bytes, area: bytes) -> bytes:
    """The candidate volume key from one keyslot (not yet checked against the digest)."""
    if slot.area_encryption != SUPPORTED_CIPHER:
        raise LuksUnsupported(f"keyslot {slot.id} uses {slot.area_encryption!r}; only {SUPPORTED_CIPHER}")
    area_key = derive_slot_key(slot.kdf, passphrase, slot.area_key_size)
    material = xts_crypt(
        area_key, area[: slot.material_size], sector_size=KEYSLOT_SECTOR, first_iv=0, iv_step=1, encrypt=False
    )
    return af_merge(material, slot.key_size, slot.af_stripes, slot.af_hash)


def digest_matches(digest: Digest, volume_key: bytes) -> bool:
    if digest.type != "pbkdf2":
        raise LuksUnsupported(f"digest type {digest.type!r} is not supported")
    check = _pbkdf2(volume_key, digest.salt, digest.iterations, digest.hash, len(digest.digest))
    return hmac.compare_digest(check, digest.digest)


@dataclass(frozen=True)
class VolumeKey:
    """The unlocked volume key and the keyslot that opened it."""

    key: bytes = field(repr=False)
    keyslot: str


def unlock(header: Header, passphrase: bytes, read_at: ReadAt) -> VolumeKey:
    """Try each keyslot (high priority first, ignored ones never) until the digest check passes."""
    segment = header.data_segment
    digests = [d for d in header.digests if segment.id in d.segments]
    if not digests:
        raise LuksError("no digest covers the data segment")
    order = sorted((s for s in header.keyslots if s.priority != 0), key=lambda s: (-s.priority, int(s.id)))
    if not order:
        raise LuksWrongKey("the LUKS2 image has no usable keyslot")
    for slot in order:
        for digest in digests:
            if slot.id not in digest.keyslots:
                continue
            area = read_at(slot.area_offset, slot.material_size)
            if len(area) < slot.material_size:
                raise LuksError(f"keyslot {slot.id}'s area is truncated")
            candidate = open_keyslot(slot, passphrase, area)
            if digest_matches(digest, candidate):
                return VolumeKey(candidate, slot.id)
    raise LuksWrongKey(
        "the key does not open any keyslot of this LUKS2 image",
        hint="the released key (or its HKDF salt and label) is not the one the image was made with",
    )


class DataCipher:
    """Encrypts and decrypts the data segment in its sectors (offsets relative to the segment start)."""

    def __init__(self, volume_key: VolumeKey, segment: Segment) -> None:
        if segment.encryption != SUPPORTED_CIPHER:
            raise LuksUnsupported(f"the data segment uses {segment.encryption!r}; only {SUPPORTED_CIPHER}")
        if segment.sector_size not in (512, 1024, 2048, 4096):
            raise LuksUnsupported(f"sector size {segment.sector_size} is not supported")
        self._key = volume_key.key
        self.segment = segment
        self.sector_size = segment.sector_size

    def __repr__(self) -> str:
        return f"DataCipher(segment={self.segment.id!r}, sector_size={self.sector_size})"

    def _crypt(self, offset: int, data: bytes, *, encrypt: bool) -> bytes:
        if offset % self.sector_size:
            raise LuksError("data access is not sector-aligned")
        step = self.sector_size // 512
        first_iv = (offset // self.sector_size) * step + self.segment.iv_tweak
        return xts_crypt(
            self._key, data, sector_size=self.sector_size, first_iv=first_iv, iv_step=step, encrypt=encrypt
        )

    def decrypt(self, offset: int, ciphertext: bytes) -> bytes:
        return self._crypt(offset, ciphertext, encrypt=False)

    def encrypt(self, offset: int, plaintext: bytes) -> bytes:
        return self._crypt(offset, plaintext, encrypt=True)
