"""Example app: release a key from the skr sidecar (aiohttp) and decrypt a file with it.

    app.py decrypt FILE.jwe [--out FILE]           release the file's key, verify and decrypt
    app.py encrypt FILE --kid K --out FILE.jwe     (demo) release K through the sidecar and encrypt
    app.py encrypt FILE --kid K --key-file KEY ... (data owner) encrypt under a local key, no sidecar
    app.py keygen --out KEY                        (data owner) a fresh 256-bit key, file mode 0600

The sidecar URL comes from ``--skr-url`` or ``SKR_URL`` (default http://127.0.0.1:8080); a client token,
if the sidecar requires one, from ``--client-token-file`` or ``SKR_CLIENT_TOKEN_FILE``. Files are JWEs
(see jwe.py). The released key lives only in this process's memory: it is never printed, logged or
written. Exit codes: 0 done, 1 the sidecar refused the release or the file failed authentication,
2 unusable input or no sidecar.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwe

DEFAULT_URL = "http://127.0.0.1:8080"
EXIT_REFUSED = 1
EXIT_UNUSABLE = 2


class AppError(Exception):
    """A failure to report in one line; ``exit_code`` says which kind."""

    def __init__(self, message: str, exit_code: int = EXIT_UNUSABLE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Sidecar:
    """Where the sidecar listens, and the client token it may require (kept out of the repr)."""

    base_url: str
    client_token: str | None = field(default=None, repr=False)

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.client_token:
            headers["Authorization"] = f"Bearer {self.client_token}"
        return headers


async def wait_ready(session: aiohttp.ClientSession, sidecar: Sidecar, wait: float) -> None:
    """Poll ``/readyz`` until the sidecar is ready (it may start after this app), at most ``wait`` s.

    A 404 means a sidecar without ``/readyz`` (Microsoft's Go sidecar): it is taken as ready.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            async with session.get(
                sidecar.base_url + "/readyz", timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
                if resp.status in (200, 404):
                    return
                reason = f"/readyz answered HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            raise AppError(f"the sidecar at {sidecar.base_url} is not ready after {wait:g} s ({reason})")
        await asyncio.sleep(0.5)


async def release_key(session: aiohttp.ClientSession, sidecar: Sidecar, kid: str) -> dict[str, Any]:
    """``POST /key/release {"kid": kid}`` → the released JWK (a dict). Refusals raise :class:`AppError`."""
    body = json.dumps({"kid": kid})
    try:
        async with session.post(
            sidecar.base_url + "/key/release",
            data=body,
            headers=sidecar.headers(),
            timeout=aiohttp.ClientTimeout(total=60),
        ) as resp:
            raw = await resp.read()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise AppError(f"cannot reach the sidecar at {sidecar.base_url}: {type(exc).__name__}") from None
    try:
        answer = json.loads(raw)
    except ValueError:
        raise AppError(f"the sidecar answered HTTP {status} with a body that is not JSON") from None
    if status != 200:
        error = answer if isinstance(answer, dict) else {}
        raise AppError(
            f"release of {kid} refused: HTTP {status} {error.get('code', 'error')}: {error.get('error', '')}"
            f" (request id {error.get('request_id', '?')})",
            EXIT_REFUSED,
        )
    # The JWK arrives as a JSON *string* inside the JSON body, exactly as with the Go sidecar.
    try:
        jwk = json.loads(answer["key"])
    except (KeyError, TypeError, ValueError):
        raise AppError('the sidecar answered 200 without a JWK string in "key"') from None
    if not isinstance(jwk, dict):
        raise AppError('the sidecar\'s "key" is not a JWK object')
    return jwk


def oct_key(jwk: dict[str, Any], operation: str) -> bytes:
    """The raw bytes of a released symmetric key permitted for ``operation`` ("encrypt"/"decrypt")."""
    if jwk.get("kty") != "oct":
        raise AppError(f"the released key is {jwk.get('kty')!r}; this example needs an oct (AES) key")
    ops = jwk.get("key_ops")
    if isinstance(ops, list) and operation not in ops:
        raise AppError(f"the released key's key_ops {ops} do not permit {operation}", EXIT_REFUSED)
    k = jwk.get("k")
    if not isinstance(k, str):
        raise AppError('the released oct key has no "k"')
    try:
        return base64.urlsafe_b64decode(k + "=" * (-len(k) % 4))
    except (binascii.Error, ValueError):
        raise AppError('the released key\'s "k" is not base64url') from None


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` atomically with mode 0600 (never briefly readable by others)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AppError(f"cannot read {path}: {exc.strerror}") from None


async def released(args: argparse.Namespace, kid: str, operation: str) -> bytes:
    """Wait for the sidecar, release ``kid`` and return the key bytes for ``operation``."""
    token = None
    if args.client_token_file:
        token = read_file(Path(args.client_token_file)).decode().strip()
    sidecar = Sidecar(args.skr_url.rstrip("/"), token)
    async with aiohttp.ClientSession() as session:  # trust_env=False: loopback, never through a proxy
        await wait_ready(session, sidecar, args.wait)
        jwk = await release_key(session, sidecar, kid)
    key = oct_key(jwk, operation)
    print(f"released {kid} ({jwk['kty']}, {len(key) * 8} bits)", file=sys.stderr)
    return key


async def cmd_decrypt(args: argparse.Namespace) -> int:
    token = read_file(args.file).decode("ascii", errors="replace")
    header = jwe.read_header(token)
    kid = args.kid or header.kid
    if not kid:
        raise AppError(f"{args.file} names no key (no kid in its header): pass --kid")
    plaintext = jwe.decrypt(token, await released(args, kid, "decrypt"))
    if args.out is None:
        sys.stdout.buffer.write(plaintext)
        sys.stdout.flush()
    else:
        write_private(args.out, plaintext)
        print(f"decrypted {len(plaintext)} bytes to {args.out}", file=sys.stderr)
    return 0


async def cmd_encrypt(args: argparse.Namespace) -> int:
    plaintext = read_file(args.file)
    if args.key_file is not None:
        key = read_file(args.key_file)
    else:
        key = await released(args, args.kid, "encrypt")
    sealed = jwe.encrypt(plaintext, key, kid=args.kid, enc=args.enc)
    args.out.write_text(sealed + "\n")
    print(f"encrypted {len(plaintext)} bytes to {args.out} ({args.enc}, kid {args.kid})", file=sys.stderr)
    return 0


async def cmd_keygen(args: argparse.Namespace) -> int:
    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise AppError(f"{args.out} exists; refusing to overwrite a key") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(os.urandom(jwe.KEY_BYTES))
    print(f"wrote a fresh 256-bit key to {args.out} (mode 0600)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="app.py", description="Release a key from skr and decrypt a file.")
    parser.add_argument("--skr-url", default=os.environ.get("SKR_URL") or DEFAULT_URL, help="sidecar URL")
    parser.add_argument(
        "--client-token-file",
        default=os.environ.get("SKR_CLIENT_TOKEN_FILE") or None,
        help="bearer token for the sidecar (env SKR_CLIENT_TOKEN_FILE)",
    )
    parser.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the sidecar (30)")
    sub = parser.add_subparsers(dest="command", required=True)

    dec = sub.add_parser("decrypt", help="release the file's key and decrypt it (stdout or --out)")
    dec.add_argument("file", type=Path, help="a JWE file (alg dir)")
    dec.add_argument("--out", type=Path, help="write the plaintext here (mode 0600)")
    dec.add_argument("--kid", help="release this key instead of the header's kid")
    dec.set_defaults(func=cmd_decrypt)

    enc = sub.add_parser("encrypt", help="encrypt a file for --kid")
    enc.add_argument("file", type=Path)
    enc.add_argument("--kid", required=True, help="the Key Vault key name the file is for")
    enc.add_argument("--out", type=Path, required=True, help="the JWE to write")
    enc.add_argument("--key-file", type=Path, help="a local 256-bit key (keygen); default: release --kid")
    enc.add_argument("--enc", choices=jwe.ENCS, default=jwe.A256GCM, help="content encryption (A256GCM)")
    enc.set_defaults(func=cmd_encrypt)

    gen = sub.add_parser("keygen", help="write a fresh 256-bit key (raw bytes, mode 0600)")
    gen.add_argument("--out", type=Path, required=True)
    gen.set_defaults(func=cmd_keygen)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = asyncio.run(args.func(args))
    except AppError as exc:
        print(f"app: {exc}", file=sys.stderr)
        return exc.exit_code
    except jwe.AuthenticationFailed as exc:
        print(f"app: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except jwe.JweError as exc:
        print(f"app: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    except OSError as exc:
        print(f"app: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_UNUSABLE
    return code


if __name__ == "__main__":
    sys.exit(main())
