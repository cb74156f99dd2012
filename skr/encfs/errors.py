"""The errors of ``skr encfs``, each with a stable ``code`` (see the README's troubleshooting table).

Messages name the filesystem, the step and what to check; they never contain key material, passphrases
or storage tokens.
"""

from __future__ import annotations

from skr.errors import BadRequest, Code, ConfigError, Forbidden, SkrError, UpstreamError


class EncfsConfigError(ConfigError):
    """``EncfsSideCarArgs`` / ``--config`` that cannot be used."""

    default_code = Code.ENCFS_CONFIG_INVALID


class EncfsKeyError(BadRequest):
    """The released key cannot be a filesystem key (wrong type, wrong length, bad derivation input)."""

    default_code = Code.ENCFS_KEY_INVALID


class LuksError(BadRequest):
    """The image is not a LUKS2 image skr can open (bad magic, damaged header, unsupported cipher)."""

    default_code = Code.LUKS_HEADER_INVALID


class LuksUnsupported(LuksError):
    default_code = Code.LUKS_UNSUPPORTED


class LuksWrongKey(Forbidden):
    """No keyslot opens with this key (the digest check failed for every keyslot)."""

    default_code = Code.LUKS_WRONG_KEY


class BlobError(UpstreamError):
    """The blob holding the image could not be read or written."""

    default_code = Code.BLOB_UNAVAILABLE


class BlobLeased(Forbidden):
    """Another writer holds the blob's lease: two writers would corrupt the image."""

    default_code = Code.BLOB_LEASED


class MountError(SkrError):
    """A privileged step (FUSE, loop device, cryptsetup, mount) failed."""

    default_code = Code.ENCFS_MOUNT_FAILED
