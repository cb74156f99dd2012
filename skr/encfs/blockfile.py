"""The decrypted view of an encrypted image: a block cache over ranged reads, with dirty-block tracking.

The image's data segment is read in blocks (512 KiB by default, like azmount), decrypted once and kept in
an LRU of ``cache_blocks`` blocks (32 by default). Writes change cached plaintext and mark the block dirty;
:meth:`BlockFile.flush` (fsync, eviction, unmount) encrypts only the dirty blocks and hands them to
``store`` — whole sectors, so every write is 512-byte aligned as page blobs need.

Sequential reads start a read-ahead: on a miss that follows the previous block, the next ``read_ahead``
blocks are requested through ``prefetch`` (which returns a future) while the current one is served.

Thread-safe (FUSE calls from several threads). I/O is the caller's: ``fetch(offset, length)``,
``prefetch(offset, length)`` and ``store(offset, data)`` take *image* offsets. Stores are synchronous, and
a block is prefetched only while it is neither cached nor pending, so a prefetch never returns data older
than a store. Plaintext stays in memory; nothing here logs data.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol

Fetch = Callable[[int, int], bytes]
Store = Callable[[int, bytes], None]
Prefetch = Callable[[int, int], "Future[bytes]"]

DEFAULT_BLOCK_SIZE = 512 * 1024
DEFAULT_CACHE_BLOCKS = 32


class SectorCipher(Protocol):
    """:class:`skr.encfs.luks2.DataCipher`, or :class:`Plain` for a raw image (the dm-crypt backend)."""

    sector_size: int

    def decrypt(self, offset: int, ciphertext: bytes) -> bytes: ...

    def encrypt(self, offset: int, plaintext: bytes) -> bytes: ...


class Plain:
    """No encryption: the image as it is (dm-crypt decrypts in the kernel)."""

    sector_size = 512

    def decrypt(self, offset: int, ciphertext: bytes) -> bytes:
        return ciphertext

    def encrypt(self, offset: int, plaintext: bytes) -> bytes:
        return plaintext


class BlockFile:
    """``size`` plaintext bytes at ``data_offset`` of the image, through ``cipher``."""

    def __init__(
        self,
        cipher: SectorCipher,
        *,
        data_offset: int,
        size: int,
        fetch: Fetch,
        store: Store | None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        cache_blocks: int = DEFAULT_CACHE_BLOCKS,
        prefetch: Prefetch | None = None,
        read_ahead: int = 2,
    ) -> None:
        if block_size % cipher.sector_size or block_size <= 0:
            raise ValueError(f"the block size must be a multiple of the {cipher.sector_size}-byte sector")
        if cache_blocks < 1:
            raise ValueError("the cache needs at least one block")
        self.cipher = cipher
        self.data_offset = data_offset
        self.size = size - size % cipher.sector_size
        self.block_size = block_size
        self.cache_blocks = cache_blocks
        self._fetch = fetch
        self._store = store
        self._cache: OrderedDict[int, bytearray] = OrderedDict()
        self._dirty: set[int] = set()
        self._prefetch = prefetch
        self.read_ahead = max(0, min(read_ahead, cache_blocks - 1))
        self._pending: dict[int, Future[bytes]] = {}
        self._last_miss = -2
        self._lock = threading.RLock()
        self.fetches = 0

    @property
    def writable(self) -> bool:
        return self._store is not None

    def _span(self, index: int) -> tuple[int, int]:
        start = index * self.block_size
        return start, min(self.block_size, self.size - start)

    def _block(self, index: int) -> bytearray:
        block = self._cache.get(index)
        if block is not None:
            self._cache.move_to_end(index)
            return block
        start, length = self._span(index)
        pending = self._pending.pop(index, None)
        sequential = index == self._last_miss + 1
        self._last_miss = index
        if sequential:
            self._start_read_ahead(index)
        ciphertext = (
            pending.result() if pending is not None else self._fetch(self.data_offset + start, length)
        )
        if len(ciphertext) != length:
            raise OSError(f"short read from the image: {len(ciphertext)} of {length} bytes")
        self.fetches += 1
        block = bytearray(self.cipher.decrypt(start, ciphertext))
        self._cache[index] = block
        while len(self._cache) > self.cache_blocks:
            oldest = next(iter(self._cache))
            self._write_back(oldest)
            del self._cache[oldest]
        return block

    def _start_read_ahead(self, index: int) -> None:
        if self._prefetch is None:
            return
        blocks = -(-self.size // self.block_size)
        for ahead in range(index + 1, min(index + 1 + self.read_ahead, blocks)):
            if ahead not in self._cache and ahead not in self._pending:
                start, length = self._span(ahead)
                self._pending[ahead] = self._prefetch(self.data_offset + start, length)

    def _write_back(self, index: int) -> None:
        if index not in self._dirty:
            return
        assert self._store is not None
        start, _ = self._span(index)
        self._store(self.data_offset + start, self.cipher.encrypt(start, bytes(self._cache[index])))
        self._dirty.discard(index)

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            end = min(offset + size, self.size)
            out = bytearray()
            while offset < end:
                index, within = divmod(offset, self.block_size)
                block = self._block(index)
                take = min(end - offset, len(block) - within)
                out += block[within : within + take]
                offset += take
            return bytes(out)

    def write(self, offset: int, data: bytes) -> int:
        if self._store is None:
            raise PermissionError("the image is mounted read-only")
        with self._lock:
            if offset + len(data) > self.size:
                raise OSError("write past the end of the image")
            done = 0
            while done < len(data):
                index, within = divmod(offset + done, self.block_size)
                block = self._block(index)
                take = min(len(data) - done, len(block) - within)
                block[within : within + take] = data[done : done + take]
                self._dirty.add(index)
                done += take
            return done

    @property
    def dirty_blocks(self) -> int:
        return len(self._dirty)

    def flush(self) -> None:
        """Encrypt and store every dirty block (only those)."""
        with self._lock:
            for index in sorted(self._dirty):
                self._write_back(index)
