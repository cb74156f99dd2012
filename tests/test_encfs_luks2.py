"""LUKS2 in userspace against images made by the real cryptsetup (an independent implementation)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from skr.encfs.errors import LuksError, LuksWrongKey
from skr.encfs.luks2 import DataCipher, read_header, unlock
from tests.encfstools import MiB, encrypted_ext4, luks_format, volume_key_of

KEY = bytes(range(32))


def reader(path: Path):
    data = path.read_bytes()
    return lambda offset, size: data[offset : offset + size]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("luks")


@pytest.fixture(scope="module")
def pbkdf2_image(workdir: Path) -> Path:
    return luks_format(workdir / "pbkdf2.img", KEY)


@pytest.fixture(scope="module")
def ext4_image(workdir: Path) -> tuple[Path, Path]:
    content = workdir / "content"
    (content / "sub").mkdir(parents=True)
    (content / "hello.txt").write_bytes(b"hello encfs\n")
    (content / "sub" / "random.bin").write_bytes(bytes((i * 7919) % 251 for i in range(300_000)))
    return encrypted_ext4(workdir, content, KEY)


def test_header_matches_cryptsetups_own_dump(pbkdf2_image: Path) -> None:
    dumped = json.loads(
        subprocess.run(
            ["cryptsetup", "luksDump", "--dump-json-metadata", str(pbkdf2_image)],
            capture_output=True,
            check=True,
        ).stdout
    )
    header = read_header(reader(pbkdf2_image))
    assert header.metadata == dumped
    (slot,) = header.keyslots
    assert (slot.kdf.type, slot.kdf.hash, slot.kdf.iterations) == ("pbkdf2", "sha256", 1000)
    assert (slot.af_stripes, slot.af_hash, slot.key_size) == (4000, "sha256", 64)
    seg = header.data_segment
    assert (seg.offset, seg.size, seg.sector_size, seg.encryption) == (
        16 * MiB,
        None,
        4096,
        "aes-xts-plain64",
    )
    assert not header.from_secondary


@pytest.mark.parametrize("pbkdf", ["pbkdf2", "argon2id", "argon2i"])
def test_unlock_yields_the_volume_key_cryptsetup_dumps(workdir: Path, pbkdf: str) -> None:
    image = luks_format(workdir / f"{pbkdf}-vk.img", KEY, pbkdf=pbkdf)
    opened = unlock(read_header(reader(image)), KEY, reader(image))
    assert opened.key == volume_key_of(image, KEY)
    assert opened.keyslot == "0"
    assert KEY.hex() not in repr(opened) and opened.key.hex() not in repr(opened)


def test_wrong_key_fails_the_digest_check(pbkdf2_image: Path) -> None:
    with pytest.raises(LuksWrongKey) as info:
        unlock(read_header(reader(pbkdf2_image)), bytes(32), reader(pbkdf2_image))
    assert info.value.code == "luks_wrong_key"


def test_second_keyslot_opens_too(workdir: Path) -> None:
    image = luks_format(workdir / "two.img", KEY)
    other = b"another passphrase"
    # luksAddKey reads the new passphrase from a file argument
    newkey = workdir / "newkey"
    newkey.write_bytes(other)
    subprocess.run(
        ["cryptsetup", "luksAddKey", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
         "--key-file", "-", "--batch-mode", str(image), str(newkey)],
        input=KEY, capture_output=True, check=True,
    )  # fmt: skip
    opened = unlock(read_header(reader(image)), other, reader(image))
    assert opened.keyslot != "0"
    assert opened.key == volume_key_of(image, KEY)


def test_damaged_primary_header_falls_back_to_the_secondary(workdir: Path, pbkdf2_image: Path) -> None:
    data = bytearray(pbkdf2_image.read_bytes())
    data[4096 + 10] ^= 0xFF  # inside the primary JSON area: its checksum no longer matches
    damaged = workdir / "damaged.img"
    damaged.write_bytes(bytes(data))
    header = read_header(reader(damaged))
    assert header.from_secondary
    assert unlock(header, KEY, reader(damaged)).key == volume_key_of(pbkdf2_image, KEY)


def test_not_luks_and_truncated_are_clear_errors(workdir: Path, pbkdf2_image: Path) -> None:
    with pytest.raises(LuksError, match="not a LUKS2 image"):
        read_header(lambda offset, size: bytes(size))
    head = pbkdf2_image.read_bytes()[:6000]
    with pytest.raises(LuksError, match="truncated"):
        read_header(lambda offset, size: head[offset : offset + size])


def test_data_decrypts_to_the_plaintext_cryptsetup_encrypted(ext4_image: tuple[Path, Path]) -> None:
    image, plain = ext4_image
    header = read_header(reader(image))
    cipher = DataCipher(unlock(header, KEY, reader(image)), header.data_segment)
    start = header.data_segment.offset
    ciphertext = image.read_bytes()[start : start + 32 * MiB]
    plaintext = cipher.decrypt(0, ciphertext)
    assert plaintext == plain.read_bytes()
    assert plaintext[1080:1082] == b"\x53\xef"  # the ext4 superblock magic


def test_encrypting_a_sector_reproduces_cryptsetups_ciphertext(ext4_image: tuple[Path, Path]) -> None:
    image, plain = ext4_image
    header = read_header(reader(image))
    cipher = DataCipher(unlock(header, KEY, reader(image)), header.data_segment)
    offset = 4096 * 37
    start = header.data_segment.offset + offset
    assert (
        cipher.encrypt(offset, plain.read_bytes()[offset : offset + 8192])
        == image.read_bytes()[start : start + 8192]
    )
    with pytest.raises(LuksError, match="aligned"):
        cipher.decrypt(100, bytes(4096))
