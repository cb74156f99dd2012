"""The errors of ``skr encfs``, each with a stable ``code`` (see the README's troubleshooting table).

Messages name the filesystem, the step and what to check; they never contain key material, passphrases
or storage tokens.
"""

from __future__ import annotations

from skr.errors import BadRequest, ConfigError, Forbidden, SkrError, UpstreamError


class EncfsConfigError(ConfigError):
    """``EncfsSideCarArgs`` / ``--config`` that cannot be used."""

    default_code = "encfs_config_invalid"


class EncfsKeyError(BadRequest):
    """The released key cannot be a filesystem key (wrong type, wrong length, bad derivation input)."""

    default_code = "encfs_key_invalid"


class LuksError(BadRequest):
    """The image is not a LUKS2 image skr can open (bad magic, damaged header, unsupported cipher)."""

    default_code = "luks_header_invalid"


class LuksUnsupported(LuksError):
    default_code = "luks_unsupported"


class LuksWrongKey(Forbidden):
    """No keyslot opens with this key (the digest check failed for every keyslot)."""

    default_code = "luks_wrong_key"


class BlobError(UpstreamError):
    """The blob holding the image could not be read or written."""

    default_code = "blob_unavailable"


class BlobLeased(Forbidden):
    """Another writer holds the blob's lease: two writers would corrupt the image."""

    default_code = "blob_leased"


class MountError(SkrError):
    """A privileged step (FUSE, loop device, cryptsetup, mount) failed."""

    status = 500
    default_code = "encfs_mount_failed"
