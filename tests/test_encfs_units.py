"""The encfs pieces below the mount: the block cache, the dm-crypt command lines (against a recording fake
cryptsetup), the blob URL and its allowlist, the backend choice and the atomic symlink."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

import pytest

from skr.encfs.blob import blob_allowlist, parse_blob_url, proposed_lease_id
from skr.encfs.blockfile import BlockFile
from skr.encfs.errors import EncfsConfigError, MountError
from skr.encfs.image import file_reader
from skr.encfs.luks2 import DataCipher, read_header, unlock
from skr.encfs.mount import dm_open, publish
from skr.encfs.run import resolve_backend
from skr.encfs.system import DEFAULT_TIMEOUT, Completed, System, has_device_mapper
from skr.endpoints import DEFAULT_ALLOWED
from tests.encfstools import MiB, encrypted_ext4, luks_format

KEY = bytes(range(7, 39))


# --- the block cache --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    work = tmp_path_factory.mktemp("blockfile")
    content = work / "content"
    content.mkdir()
    (content / "f.bin").write_bytes(os.urandom(200_000))
    encrypted, plain = encrypted_ext4(work, content, KEY)
    return encrypted.read_bytes(), plain.read_bytes()


class FakeBlob:
    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int]] = []

    def fetch(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return bytes(self.data[offset : offset + length])

    def store(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, len(data)))
        self.data[offset : offset + len(data)] = data


def open_blockfile(blob: FakeBlob, *, writable: bool, cache_blocks: int = 2) -> BlockFile:
    data = bytes(blob.data)
    header = read_header(lambda o, s: data[o : o + s])
    seg = header.data_segment
    cipher = DataCipher(unlock(header, KEY, lambda o, s: data[o : o + s]), seg)
    return BlockFile(
        cipher,
        data_offset=seg.offset,
        size=len(data) - seg.offset,
        fetch=blob.fetch,
        store=blob.store if writable else None,
        block_size=64 * 1024,
        cache_blocks=cache_blocks,
    )


def test_reads_decrypt_to_the_plaintext_across_blocks(image: tuple[bytes, bytes]) -> None:
    encrypted, plain = image
    blob = FakeBlob(encrypted)
    bf = open_blockfile(blob, writable=False)
    assert bf.read(1000, 300_000) == plain[1000:301_000]
    assert bf.read(0, 4096)[1080:1082] == b"\x53\xef"
    assert all(offset >= 16 * MiB for offset, _ in blob.reads)  # never the header area


def test_the_cache_holds_at_most_cache_blocks(image: tuple[bytes, bytes]) -> None:
    blob = FakeBlob(image[0])
    bf = open_blockfile(blob, writable=False, cache_blocks=2)
    bf.read(0, 64 * 1024)
    bf.read(0, 64 * 1024)
    assert bf.fetches == 1  # a hit
    bf.read(64 * 1024, 2 * 64 * 1024)  # blocks 1 and 2: block 0 is evicted
    bf.read(0, 10)
    assert bf.fetches == 4


def test_writes_upload_only_dirty_blocks_in_aligned_pages(image: tuple[bytes, bytes]) -> None:
    encrypted, plain = image
    blob = FakeBlob(encrypted)
    bf = open_blockfile(blob, writable=True, cache_blocks=4)
    bf.read(0, 4 * 64 * 1024)  # four clean blocks cached
    bf.write(70_000, b"hello" * 10)  # inside block 1
    assert bf.dirty_blocks == 1 and blob.writes == []
    bf.flush()
    assert blob.writes == [(16 * MiB + 64 * 1024, 64 * 1024)]
    assert all(off % 512 == 0 and n % 512 == 0 for off, n in blob.writes)
    assert bf.dirty_blocks == 0
    bf.flush()
    assert len(blob.writes) == 1  # nothing dirty, nothing uploaded
    fresh = open_blockfile(FakeBlob(bytes(blob.data)), writable=False)
    assert fresh.read(70_000, 50) == b"hello" * 10
    assert fresh.read(0, 70_000) == plain[:70_000]


def test_an_evicted_dirty_block_is_written_back(image: tuple[bytes, bytes]) -> None:
    blob = FakeBlob(image[0])
    bf = open_blockfile(blob, writable=True, cache_blocks=1)
    bf.write(10, b"x")
    bf.read(5 * 64 * 1024, 1)  # evicts block 0
    assert blob.writes == [(16 * MiB, 64 * 1024)]


def test_sequential_reads_prefetch_the_next_blocks(image: tuple[bytes, bytes]) -> None:
    encrypted, plain = image
    blob = FakeBlob(encrypted)
    prefetched: list[tuple[int, int]] = []

    def prefetch(offset: int, length: int) -> Future[bytes]:
        prefetched.append((offset, length))
        done: Future[bytes] = Future()
        done.set_result(bytes(blob.data[offset : offset + length]))
        return done

    data = bytes(blob.data)
    header = read_header(lambda o, s: data[o : o + s])
    cipher = DataCipher(unlock(header, KEY, lambda o, s: data[o : o + s]), header.data_segment)
    bf = BlockFile(
        cipher, data_offset=16 * MiB, size=len(data) - 16 * MiB, fetch=blob.fetch, store=None,
        block_size=64 * 1024, cache_blocks=4, prefetch=prefetch, read_ahead=2,
    )  # fmt: skip
    assert bf.read(0, 6 * 64 * 1024) == plain[: 6 * 64 * 1024]
    # block 0 is a first miss, block 1 shows the pattern: 2 and 3 are requested ahead, and so on
    assert blob.reads == [(16 * MiB, 64 * 1024), (16 * MiB + 64 * 1024, 64 * 1024)]
    assert [off for off, _ in prefetched] == [16 * MiB + b * 64 * 1024 for b in range(2, 8)]
    bf.read(40 * 64 * 1024, 10)  # a jump is not sequential: no read-ahead
    assert len(prefetched) == 6


def test_read_only_refuses_writes(image: tuple[bytes, bytes]) -> None:
    bf = open_blockfile(FakeBlob(image[0]), writable=False)
    with pytest.raises(PermissionError):
        bf.write(0, b"x")


# --- the privileged steps, against a recording fake -------------------------------------------------------


class Recorder:
    """A fake Runner: records argv and stdin, answers from a script of return codes."""

    def __init__(self, *codes: int) -> None:
        self.calls: list[tuple[list[str], bytes | None]] = []
        self.codes = list(codes)

    def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> Completed:
        self.calls.append((list(argv), stdin))
        code = self.codes.pop(0) if self.codes else 0
        return Completed(code, b"/dev/loop7\n", b"" if code == 0 else b"Device remote-crypt-0 is busy.\n")


def test_dm_open_passes_the_key_on_stdin_never_as_a_file(tmp_path: Path) -> None:
    source = tmp_path / "data"
    source.write_bytes(b"L" * 4096)
    fake = Recorder(0)
    dm_open(System(fake), source, "remote-crypt-0", KEY, header_size=1024, work_dir=tmp_path)
    ((argv, stdin),) = fake.calls
    assert argv == ["cryptsetup", "open", "--type", "luks2", str(source), "remote-crypt-0", "--key-file", "-",
                    "--integrity-no-journal", "--persistent"]  # fmt: skip
    assert stdin == KEY
    assert KEY.hex() not in " ".join(argv)


def test_dm_open_falls_back_to_a_detached_header(tmp_path: Path) -> None:
    source = tmp_path / "data"
    source.write_bytes(bytes(range(256)) * 16)
    seen: list[bytes] = []

    class Peek(Recorder):
        def run(
            self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float = DEFAULT_TIMEOUT
        ) -> Completed:
            if "--header" in argv:
                seen.append(Path(argv[argv.index("--header") + 1]).read_bytes())
            return super().run(argv, stdin=stdin, timeout=timeout)

    fake = Peek(1, 0)
    dm_open(System(fake), source, "remote-crypt-0", KEY, header_size=1024, work_dir=tmp_path)
    (first, _), (second, stdin) = fake.calls
    assert "--header" not in first
    header = Path(second[second.index("--header") + 1])
    assert seen == [source.read_bytes()[:1024]]  # the first header_size bytes, as the Go sidecar's head -c
    assert not header.exists()  # removed at once
    assert stdin == KEY


def test_dm_open_failing_twice_is_one_clear_error(tmp_path: Path) -> None:
    source = tmp_path / "data"
    source.write_bytes(b"x" * 2048)
    with pytest.raises(MountError, match="cryptsetup open failed: Device remote-crypt-0 is busy"):
        dm_open(System(Recorder(1, 1)), source, "remote-crypt-0", KEY, header_size=512, work_dir=tmp_path)
    assert list(tmp_path.iterdir()) == [source]


def test_userspace_command_lines() -> None:
    fake = Recorder()
    system = System(fake)
    assert system.losetup_attach(Path("/w/0/data"), read_only=True) == "/dev/loop7"
    system.mount_ext4("/dev/loop7", Path("/m/.filesystem-0"), read_only=True)
    system.mount_ext4("/dev/loop7", Path("/m/.filesystem-0"), read_only=False)
    system.luks_encrypt_in_place(Path("/i.img"), KEY)
    argvs = [argv for argv, _ in fake.calls]
    assert argvs[0] == ["losetup", "-f", "--show", "-r", "/w/0/data"]
    assert argvs[1] == ["mount", "-t", "ext4", "-o", "ro,noload", "/dev/loop7", "/m/.filesystem-0"]
    assert argvs[2] == ["mount", "-t", "ext4", "/dev/loop7", "/m/.filesystem-0"]
    reencrypt = argvs[3]
    for flag, value in (("--cipher", "aes-xts-plain64"), ("--sector-size", "4096"), ("--pbkdf", "pbkdf2"),
                        ("--pbkdf-force-iterations", "1000"), ("--key-file", "-")):  # fmt: skip
        assert reencrypt[reencrypt.index(flag) + 1] == value
    assert fake.calls[3][1] == KEY


def test_a_failed_step_names_itself() -> None:
    with pytest.raises(MountError, match=r"^mount failed: Device remote-crypt-0 is busy"):
        System(Recorder(32)).mount_ext4("/dev/loop7", Path("/m"), read_only=True)


@pytest.mark.skipif(
    not has_device_mapper(), reason="no device-mapper in this kernel (/proc/misc): dm-crypt cannot run"
)
def test_real_cryptsetup_open_where_device_mapper_exists(tmp_path: Path) -> None:
    image = luks_format(tmp_path / "dm.img", KEY)
    system = System()
    dm_open(system, image, "skr-encfs-test", KEY, header_size=16 * MiB, work_dir=tmp_path)
    try:
        assert Path("/dev/mapper/skr-encfs-test").exists()
    finally:
        system.cryptsetup_close("skr-encfs-test")


def test_backend_auto_follows_proc_misc(tmp_path: Path) -> None:
    misc = tmp_path / "misc"
    misc.write_text(" 58 memory_bandwidth\n229 fuse\n")
    assert resolve_backend("auto", proc_misc=misc) == "userspace"
    misc.write_text(" 58 memory_bandwidth\n236 device-mapper\n229 fuse\n")
    assert resolve_backend("auto", proc_misc=misc) == "dm-crypt"
    assert resolve_backend("userspace", proc_misc=misc) == "userspace"
    with pytest.raises(EncfsConfigError):
        resolve_backend("kernel")


# --- blob URLs and the allowlist ----------------------------------------------------------------------------


def test_blob_urls_are_https_and_allowlisted() -> None:
    default = blob_allowlist({})
    url = parse_blob_url(
        "https://acct.blob.core.windows.net/c/dir/img.bin?sv=1&sig=SECRET", allowlist=default
    )
    assert url.url == "https://acct.blob.core.windows.net/c/dir/img.bin"
    assert "SECRET" not in repr(url) and "SECRET" not in str(url)
    assert url.url_with_sas.endswith("?sv=1&sig=SECRET")
    for bad, message in (
        ("http://acct.blob.core.windows.net/c/b", "https"),
        ("https://acct.blob.core.windows.net/onlycontainer", "container and a blob"),
        ("https://127.0.0.1:10000/devstoreaccount1/c/b", "allowlist"),
        ("https://evil.example.com/c/b", "allowlist"),
        ("https://[acct.blob.core.windows.net/c/b", "not a valid URL"),
        ("https://user@acct.blob.core.windows.net/c/b", "user information"),
    ):
        with pytest.raises(EncfsConfigError, match=message):
            parse_blob_url(bad, allowlist=default)
    local = blob_allowlist({"SKR_ALLOWED_BLOB_ENDPOINTS": "127.0.0.1:10000"})
    assert (
        parse_blob_url("https://127.0.0.1:10000/devstoreaccount1/c/b", allowlist=local).endpoint.port == 10000
    )


def test_storage_domains_stay_out_of_the_sidecar_allowlist() -> None:
    assert not [p for p in DEFAULT_ALLOWED if "blob" in p]


def test_the_proposed_lease_id_is_stable_per_host_and_mount_point() -> None:
    url = parse_blob_url("https://a.blob.core.windows.net/c/b", allowlist=blob_allowlist({}))
    assert proposed_lease_id(url, "/mnt/a") == proposed_lease_id(url, "/mnt/a")
    assert proposed_lease_id(url, "/mnt/a") != proposed_lease_id(url, "/mnt/b")


# --- publishing ------------------------------------------------------------------------------------------


def test_publish_swaps_a_relative_symlink_in_atomically(tmp_path: Path) -> None:
    (tmp_path / ".filesystem-0").mkdir()
    (tmp_path / ".filesystem-0" / "f").write_text("new")
    link = tmp_path / "share"
    os.symlink("elsewhere", link)  # a stale link from a crash is replaced, not merged
    publish(link, ".filesystem-0")
    assert os.readlink(link) == ".filesystem-0"
    assert (link / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".filesystem-0", "share"]


def test_inspect_reader_reads_ranges(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(range(100)))
    assert file_reader(path)(10, 5) == bytes(range(10, 15))
