"""The AMD SEV-SNP ATTESTATION_REPORT (versions 2, 3, 4 and 5): parse, serialize, decode fields.

Owns the 1184-byte wire layout (AMD SEV-SNP firmware ABI, "ATTESTATION_REPORT Structure"), the
per-product TCB_VERSION layout, and the named bits of GUEST_POLICY and KEY_INFO. It is the ``abi``
layer: bytes in, fields out, and back again byte for byte.

Must never: verify anything (see :mod:`skr.snp.verify`), do I/O, or let anything but
:class:`skr.errors.ReportError` escape when given untrusted bytes.

Strictness: the size, the version, the signature algorithm, the signing-key selector and every reserved byte
range are checked (reserved bytes must be zero, which also makes :meth:`serialize` an exact inverse of
:meth:`parse`). Bit fields that are kept as integers (``policy``, ``platform_info``, ``key_info``) are
preserved exactly and their unknown bits are left to :func:`skr.snp.verify.validate_report` to judge.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, fields
from typing import Any, Literal

from skr.errors import ReportError

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
SIGNATURE_COMPONENT_SIZE = 72
SIGNATURE_ALGO_ECDSA_P384_SHA384 = 1
SUPPORTED_VERSIONS = frozenset({2, 3, 4, 5})

_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF
_SIG_MAX = (1 << (8 * SIGNATURE_COMPONENT_SIZE)) - 1

# The whole report in wire order: (field, struct code); None marks reserved bytes (the ranges in _RESERVED).
# "s" fields are bytes and B/I/Q unsigned integers, except the signature's R and S: 72-byte little-endian
# integers.
_WIRE: tuple[tuple[str | None, str], ...] = (
    ("version", "I"),  # 0x000
    ("guest_svn", "I"),  # 0x004
    ("policy", "Q"),  # 0x008
    ("family_id", "16s"),  # 0x010
    ("image_id", "16s"),  # 0x020
    ("vmpl", "I"),  # 0x030
    ("signature_algo", "I"),  # 0x034
    ("current_tcb", "Q"),  # 0x038
    ("platform_info", "Q"),  # 0x040
    ("key_info", "I"),  # 0x048 (author_key_en, mask_chip_key, signing_key)
    (None, "4x"),  # 0x04C
    ("report_data", "64s"),  # 0x050
    ("measurement", "48s"),  # 0x090
    ("host_data", "32s"),  # 0x0C0
    ("id_key_digest", "48s"),  # 0x0E0
    ("author_key_digest", "48s"),  # 0x110
    ("report_id", "32s"),  # 0x140
    ("report_id_ma", "32s"),  # 0x160
    ("reported_tcb", "Q"),  # 0x180
    ("cpuid_fam_id", "B"),  # 0x188 (the CPUID bytes: v3+; reserved in v2)
    ("cpuid_mod_id", "B"),  # 0x189
    ("cpuid_step", "B"),  # 0x18A
    (None, "21x"),  # 0x18B
    ("chip_id", "64s"),  # 0x1A0
    ("committed_tcb", "Q"),  # 0x1E0
    ("current_build", "B"),  # 0x1E8
    ("current_minor", "B"),  # 0x1E9
    ("current_major", "B"),  # 0x1EA
    (None, "x"),  # 0x1EB
    ("committed_build", "B"),  # 0x1EC
    ("committed_minor", "B"),  # 0x1ED
    ("committed_major", "B"),  # 0x1EE
    (None, "x"),  # 0x1EF
    ("launch_tcb", "Q"),  # 0x1F0
    ("launch_mit_vector", "Q"),  # 0x1F8 (v5; reserved before)
    ("current_mit_vector", "Q"),  # 0x200 (v5; reserved before)
    (None, "152x"),  # 0x208
    ("signature_r", "72s"),  # 0x2A0
    ("signature_s", "72s"),  # 0x2E8
    (None, "368x"),  # 0x330
)
_LAYOUT = struct.Struct("<" + "".join(code for _, code in _WIRE))
if _LAYOUT.size != REPORT_SIZE:  # pragma: no cover - a typo in the layout above
    raise RuntimeError(f"report layout is {_LAYOUT.size} bytes, expected {REPORT_SIZE}")

# Reserved (must-be-zero) byte ranges [start, end) common to every supported version.
_RESERVED: tuple[tuple[int, int], ...] = (
    (0x04C, 0x050),
    (0x18B, 0x1A0),
    (0x1EB, 0x1EC),
    (0x1EF, 0x1F0),
    (0x208, 0x2A0),
    (0x330, 0x4A0),
)
_CPUID_RANGE = (0x188, 0x18B)
_MIT_VECTOR_RANGE = (0x1F8, 0x208)

_FIELDS = tuple((name, code) for name, code in _WIRE if name is not None)
_BYTE_FIELDS = {
    name: int(code[:-1]) for name, code in _FIELDS if code.endswith("s") and "signature" not in name
}
_INT_LIMITS = {  # every other field: an unsigned integer of its code's width, or a signature component
    name: {"B": 0xFF, "I": _U32, "Q": _U64}.get(code, _SIG_MAX)
    for name, code in _FIELDS
    if name not in _BYTE_FIELDS
}
_TCB_FIELDS = ("current_tcb", "reported_tcb", "committed_tcb", "launch_tcb")

SigningKey = Literal["vcek", "vlek", "none"]
_SIGNING_KEYS: dict[int, SigningKey] = {0: "vcek", 1: "vlek", 7: "none"}


class Product(enum.StrEnum):
    """AMD EPYC product lines with SEV-SNP, named as AMD KDS names them."""

    MILAN = "Milan"
    GENOA = "Genoa"
    TURIN = "Turin"


def product_from_cpuid(family: int, model: int) -> Product | None:
    """The product line for a CPUID family/model pair, or ``None`` when it is not known.

    Family 0x19: models 0x00-0x0F Milan; 0x10-0x1F and 0xA0-0xAF Genoa (incl. Bergamo/Siena).
    Family 0x1A: models 0x00-0x11 Turin.
    """
    if family == 0x19:
        if model <= 0x0F:
            return Product.MILAN
        if 0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF:
            return Product.GENOA
    if family == 0x1A and model <= 0x11:
        return Product.TURIN
    return None


# --- TCB_VERSION -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TcbVersion:
    """A TCB_VERSION (u64, little-endian on the wire), decoded for one product line.

    Milan/Genoa bytes: ``[bl, tee, 0, 0, 0, 0, snp, ucode]``.
    Turin bytes: ``[fmc, bl, tee, snp, 0, 0, 0, ucode]``.
    """

    raw: int
    product: Product

    def __post_init__(self) -> None:
        if not isinstance(self.raw, int) or not 0 <= self.raw <= _U64:
            raise ReportError(f"a TCB_VERSION is a 64-bit unsigned value, found {self.raw!r}")
        if not isinstance(self.product, Product):
            raise ReportError(f"a TCB_VERSION needs a Product, found {self.product!r}")

    @classmethod
    def from_raw(cls, raw: int, product: Product) -> TcbVersion:
        """Decode ``raw`` with the layout of ``product``."""
        return cls(raw=raw, product=Product(product))

    @classmethod
    def from_parts(
        cls, product: Product, *, bl: int, tee: int, snp: int, ucode: int, fmc: int | None = None
    ) -> TcbVersion:
        """Compose a TCB_VERSION from its security patch levels (each 0-255; ``fmc`` only on Turin)."""
        product = Product(product)
        parts = {"bl": bl, "tee": tee, "snp": snp, "ucode": ucode, "fmc": 0 if fmc is None else fmc}
        for name, value in parts.items():
            if not 0 <= value <= 0xFF:
                raise ReportError(f"TCB part {name} must be 0-255, found {value}")
        layout = [0] * 8
        if product is Product.TURIN:
            layout[0], layout[1], layout[2], layout[3] = parts["fmc"], bl, tee, snp
        else:
            if fmc is not None:
                raise ReportError(
                    f"an FMC security patch level exists on Turin only, found fmc={fmc} for {product}"
                )
            layout[0], layout[1], layout[6] = bl, tee, snp
        layout[7] = ucode
        return cls(raw=int.from_bytes(bytes(layout), "little"), product=product)

    def _byte(self, index: int) -> int:
        return (self.raw >> (8 * index)) & 0xFF

    @property
    def bl(self) -> int:
        """BOOT_LOADER security patch level."""
        return self._byte(1 if self.product is Product.TURIN else 0)

    @property
    def tee(self) -> int:
        """TEE (PSP OS) security patch level."""
        return self._byte(2 if self.product is Product.TURIN else 1)

    @property
    def snp(self) -> int:
        """SNP firmware security patch level."""
        return self._byte(3 if self.product is Product.TURIN else 6)

    @property
    def ucode(self) -> int:
        """Microcode security patch level."""
        return self._byte(7)

    @property
    def fmc(self) -> int | None:
        """FMC security patch level (Turin only; ``None`` on Milan/Genoa)."""
        return self._byte(0) if self.product is Product.TURIN else None

    def is_at_least(self, minimum: TcbVersion) -> bool:
        """True when every component is at least the matching component of ``minimum``."""
        mine = (self.bl, self.tee, self.snp, self.ucode, self.fmc or 0)
        theirs = (minimum.bl, minimum.tee, minimum.snp, minimum.ucode, minimum.fmc or 0)
        return all(a >= b for a, b in zip(mine, theirs, strict=True))

    def to_dict(self) -> dict[str, Any]:
        """``{"raw": "0x…", "bl": …, "tee": …, "snp": …, "ucode": …}`` plus ``"fmc"`` on Turin."""
        out: dict[str, Any] = {"raw": f"0x{self.raw:016x}"}
        if self.fmc is not None:
            out["fmc"] = self.fmc
        out.update(bl=self.bl, tee=self.tee, snp=self.snp, ucode=self.ucode)
        return out

    def __str__(self) -> str:
        parts = ", ".join(f"{k}={v}" for k, v in self.to_dict().items() if k != "raw")
        return f"0x{self.raw:016x} ({parts})"


# --- GUEST_POLICY ----------------------------------------------------------------------------------

_POLICY_BITS: dict[str, int] = {
    "smt": 16,
    "migrate_ma": 18,
    "debug": 19,
    "single_socket": 20,
    "cxl_allow": 21,
    "mem_aes_256_xts": 22,
    "rapl_dis": 23,
    "ciphertext_hiding": 24,
    "page_swap_disable": 25,
}
POLICY_RESERVED_ONE_BIT = 17
POLICY_KNOWN_MASK = 0xFFFF | (1 << POLICY_RESERVED_ONE_BIT) | sum(1 << b for b in _POLICY_BITS.values())


@dataclass(frozen=True)
class GuestPolicy:
    """The guest policy u64 the guest was launched with, bit by bit."""

    raw: int
    abi_minor: int
    abi_major: int
    smt: bool
    migrate_ma: bool
    debug: bool
    single_socket: bool
    cxl_allow: bool
    mem_aes_256_xts: bool
    rapl_dis: bool
    ciphertext_hiding: bool
    page_swap_disable: bool

    @classmethod
    def from_raw(cls, raw: int) -> GuestPolicy:
        """Decode the POLICY field."""
        bits = {name: bool(raw >> bit & 1) for name, bit in _POLICY_BITS.items()}
        return cls(raw=raw, abi_minor=raw & 0xFF, abi_major=raw >> 8 & 0xFF, **bits)

    @property
    def reserved_one_set(self) -> bool:
        """Bit 17 is reserved and must be 1 in every valid policy."""
        return bool(self.raw >> POLICY_RESERVED_ONE_BIT & 1)

    @property
    def unknown_bits(self) -> int:
        """Bits this codec does not know (must be zero per the ABI)."""
        return self.raw & ~POLICY_KNOWN_MASK

    def to_dict(self) -> dict[str, Any]:
        """The named parts, for JSON."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "raw"}


# --- the report ------------------------------------------------------------------------------------


def _check_version(version: int) -> None:
    if version not in SUPPORTED_VERSIONS:
        raise ReportError(
            f"unsupported report version {version}; expected one of 2, 3, 4, 5",
            hint="is this an SEV-SNP ATTESTATION_REPORT?",
        )


@dataclass(frozen=True)
class AttestationReport:
    """One ATTESTATION_REPORT. Integer fields hold u8/u32/u64 values, byte fields the raw bytes.

    Construction validates every field, so any instance serializes; reserved bytes are always zero.
    ``cpuid_*`` must be zero in version 2 and the mitigation vectors zero before version 5, since
    those bytes are reserved there.
    """

    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: int
    platform_info: int
    key_info: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: int
    cpuid_fam_id: int
    cpuid_mod_id: int
    cpuid_step: int
    chip_id: bytes
    committed_tcb: int
    current_build: int
    current_minor: int
    current_major: int
    committed_build: int
    committed_minor: int
    committed_major: int
    launch_tcb: int
    launch_mit_vector: int
    current_mit_vector: int
    signature_r: int
    signature_s: int

    def __post_init__(self) -> None:
        self._check_types_and_ranges()
        _check_version(self.version)
        if self.signature_algo != SIGNATURE_ALGO_ECDSA_P384_SHA384:
            raise ReportError(
                f"unsupported signature algorithm {self.signature_algo}; expected 1 (ECDSA P-384 SHA-384)"
            )
        selector = self.key_info >> 2 & 0x7
        if selector not in _SIGNING_KEYS:
            raise ReportError(f"reserved signing-key selector {selector} in KEY_INFO; expected 0, 1 or 7")
        if self.version < 3 and (self.cpuid_fam_id or self.cpuid_mod_id or self.cpuid_step):
            raise ReportError("CPUID fields are reserved (zero) in a version 2 report")
        if self.version < 5 and (self.launch_mit_vector or self.current_mit_vector):
            raise ReportError(f"mitigation vectors are reserved (zero) in a version {self.version} report")

    def _check_types_and_ranges(self) -> None:
        for name, size in _BYTE_FIELDS.items():
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != size:
                raise ReportError(f"report field {name} must be {size} bytes")
        for name, limit in _INT_LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
                raise ReportError(f"report field {name} must be an integer in 0..{limit:#x}, found {value!r}")

    # -- codec --

    @classmethod
    def parse(cls, data: bytes) -> AttestationReport:
        """Decode exactly 1184 bytes. Raises :class:`ReportError` for anything malformed."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ReportError(f"an attestation report is bytes, found {type(data).__name__}")
        data = bytes(data)
        if len(data) != REPORT_SIZE:
            raise ReportError(
                f"an attestation report is {REPORT_SIZE} bytes, found {len(data)}",
                hint="pass the raw binary report or its hex text",
            )
        version = int.from_bytes(data[0:4], "little")
        _check_version(version)
        reserved = list(_RESERVED)
        if version < 3:
            reserved.append(_CPUID_RANGE)
        if version < 5:
            reserved.append(_MIT_VECTOR_RANGE)
        for start, end in reserved:
            if any(data[start:end]):
                raise ReportError(
                    f"reserved bytes 0x{start:03X}-0x{end - 1:03X} are not zero in a version {version} report"
                )
        values = list(_LAYOUT.unpack(data))
        values[-2:] = [int.from_bytes(little_endian, "little") for little_endian in values[-2:]]  # R, S
        return cls(**dict(zip((name for name, _ in _FIELDS), values, strict=True)))

    def serialize(self) -> bytes:
        """The 1184-byte wire form; ``parse(serialize(r)) == r`` and byte-exact for parsed reports."""
        values: list[Any] = [getattr(self, name) for name, _ in _FIELDS]
        values[-2:] = [component.to_bytes(SIGNATURE_COMPONENT_SIZE, "little") for component in values[-2:]]
        return _LAYOUT.pack(*values)

    def signed_bytes(self) -> bytes:
        """Bytes 0x000-0x29F: what the VCEK/VLEK signature covers."""
        return self.serialize()[:SIGNED_SIZE]

    # -- decoded views --

    @property
    def guest_policy(self) -> GuestPolicy:
        """The POLICY field decoded."""
        return GuestPolicy.from_raw(self.policy)

    @property
    def author_key_en(self) -> bool:
        """KEY_INFO bit 0: AUTHOR_KEY_DIGEST is present."""
        return bool(self.key_info & 1)

    @property
    def mask_chip_key(self) -> bool:
        """KEY_INFO bit 1: the platform masks the chip key (MASK_CHIP_KEY)."""
        return bool(self.key_info >> 1 & 1)

    @property
    def signing_key(self) -> SigningKey:
        """KEY_INFO bits 4:2: which key signed the report: ``vcek``, ``vlek`` or ``none``."""
        return _SIGNING_KEYS[self.key_info >> 2 & 0x7]

    def product_hint(self) -> Product | None:
        """The product line named by CPUID fields (version 3 and later), else ``None``."""
        return None if self.version < 3 else product_from_cpuid(self.cpuid_fam_id, self.cpuid_mod_id)

    def reported_tcb_version(self, product: Product) -> TcbVersion:
        """REPORTED_TCB (the TCB the VCEK is derived for) decoded for ``product``."""
        return TcbVersion.from_raw(self.reported_tcb, product)

    def to_json_dict(self, product: Product | None = None) -> dict[str, Any]:
        """Every field by name: byte fields lowercase hex, TCBs as ``{"raw": …, parts}``.

        TCBs are decoded for ``product``, else :meth:`product_hint`, else the Milan/Genoa layout.
        Fields that a version does not have (CPUID in v2, mitigation vectors before v5) are ``None``.
        """
        layout = product or self.product_hint() or Product.MILAN
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _BYTE_FIELDS:
                out[f.name] = value.hex()
            elif f.name in _TCB_FIELDS:
                out[f.name] = TcbVersion.from_raw(value, layout).to_dict()
            elif f.name in ("signature_r", "signature_s"):
                out[f.name] = f"{value:096x}"
            else:
                out[f.name] = value
        if self.version < 3:
            out.update(cpuid_fam_id=None, cpuid_mod_id=None, cpuid_step=None)
        if self.version < 5:
            out.update(launch_mit_vector=None, current_mit_vector=None)
        out["tcb_layout"] = str(layout)
        out["product_hint"] = None if self.product_hint() is None else str(self.product_hint())
        out["guest_policy"] = self.guest_policy.to_dict()
        out["author_key_en"] = self.author_key_en
        out["mask_chip_key"] = self.mask_chip_key
        out["signing_key"] = self.signing_key
        return out
