"""Encrypted images for the owner of the data: create one from a directory, and inspect one.

``create``: ``mkfs.ext4 -d`` then ``cryptsetup reencrypt --encrypt`` (no device-mapper needed) with the Go
tools' cipher, sector size and PBKDF settings, built next to the output and renamed into place only when
complete. ``inspect``: the LUKS2 header summary and whether a key opens it (skr's own unlock; nothing is
mounted).

The key is passed to cryptsetup on stdin only; never written, logged or printed.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skr.encfs.errors import EncfsConfigError, LuksWrongKey
from skr.encfs.luks2 import Header, ReadAt, read_header, unlock
from skr.encfs.system import REDUCE_DEVICE, System

MiB = 1024 * 1024
MIN_FS = 8 * MiB


def content_bytes(content: Path) -> int:
    total = 0
    for root, dirs, files in os.walk(content):
        total += 4096 * (len(dirs) + 1)
        for name in files:
            with contextlib.suppress(OSError):
                total += -(-os.lstat(os.path.join(root, name)).st_size // 4096) * 4096
    return total


def default_fs_size(content: Path) -> int:
    """Room for the content plus ext4's own metadata and some slack, in whole MiB."""
    need = int(content_bytes(content) * 1.25) + 8 * MiB
    return max(MIN_FS, -(-need // MiB) * MiB)


def parse_size(value: str) -> int:
    """``64M``, ``1G``, ``512K`` or bytes."""
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1024, "M": MiB, "G": 1024 * MiB}
    try:
        return int(text[:-1]) * units[text[-1]] if text and text[-1] in units else int(text)
    except ValueError:
        raise EncfsConfigError(f"size {value!r} is not a number with an optional K, M or G") from None


@dataclass(frozen=True)
class Created:
    path: Path
    size: int  # of the image file
    fs_size: int


def create_image(content: Path, out: Path, key: bytes, *, size: int | None = None, system: System) -> Created:
    """Build the encrypted ext4 image of ``content`` at ``out`` (``size``: the whole image file)."""
    if not content.is_dir():
        raise EncfsConfigError(f"--from {content} is not a directory")
    if len(key) != 32:
        raise EncfsConfigError(f"the key is {len(key)} bytes; an encfs key is exactly 32 bytes")
    fs_size = default_fs_size(content) if size is None else size - REDUCE_DEVICE
    if fs_size < MIN_FS or fs_size % 4096:
        raise EncfsConfigError(
            f"--size must be a multiple of 4 KiB and at least {(MIN_FS + REDUCE_DEVICE) // MiB} MiB "
            "(32 MiB of it holds the LUKS2 header)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        system.mkfs_ext4(content, partial, fs_size)
        with partial.open("r+b") as f:
            f.truncate(fs_size + REDUCE_DEVICE)
        system.luks_encrypt_in_place(partial, key)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return Created(out, out.stat().st_size, fs_size)


def file_reader(path: Path) -> ReadAt:
    """``read_at`` over a local file."""

    def read_at(offset: int, size: int) -> bytes:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read(size)

    return read_at


def summary(header: Header, image_size: int | None = None) -> dict[str, Any]:
    """What ``skr encfs inspect`` prints (no key material: salts and digests are left out)."""
    seg = header.data_segment
    data_size = (
        seg.size if seg.size is not None else (None if image_size is None else image_size - seg.offset)
    )
    return {
        "version": header.version,
        "uuid": header.uuid,
        "label": header.label,
        "header_size": header.hdr_size,
        "header_copy": "secondary (the primary is damaged)" if header.from_secondary else "primary",
        "cipher": seg.encryption,
        "sector_size": seg.sector_size,
        "data_offset": seg.offset,
        "data_size": data_size,
        "keyslots": [
            {
                "id": s.id,
                "kdf": s.kdf.type,
                **({"hash": s.kdf.hash, "iterations": s.kdf.iterations} if s.kdf.type == "pbkdf2" else {}),
                **(
                    {"time": s.kdf.time, "memory_kib": s.kdf.memory, "lanes": s.kdf.cpus}
                    if s.kdf.type.startswith("argon2")
                    else {}
                ),
                "volume_key_bits": s.key_size * 8,
                "af_stripes": s.af_stripes,
            }
            for s in header.keyslots
        ],
    }


def inspect_image(read_at: ReadAt, *, image_size: int | None, key: bytes | None) -> dict[str, Any]:
    header = read_header(read_at)
    result = summary(header, image_size)
    if key is not None:
        try:
            result.update(key_opens=True, keyslot=unlock(header, key, read_at).keyslot)
        except LuksWrongKey:
            result["key_opens"] = False
    return result
