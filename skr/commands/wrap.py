"""``skr wrap``: the Go sidecar's one-shot wrap mode (``skr -infile F -keypath DIR/NAME -outfile OUT``).

Reads ``DIR/NAME-info.json`` (``public_key_path``, ``kms_endpoint``, ``attester_endpoint``), RSA-OAEP-SHA256
encrypts the whole infile to that public key, and writes standard base64 of the annotation packet JSON
``{"kid":"NAME","wrapped_data",...}`` to the outfile — byte for byte what the Go tool writes. No key is
released: wrapping needs only the public key.

Never prints the plaintext; refuses one over the OAEP-SHA256 limit of the key size with a sentence.
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "wrap",
        help="wrap a short secret to an image key (the Go sidecar's one-shot wrap mode)",
        description="RSA-OAEP-SHA256-wrap INFILE to the public key of KEYPATH-info.json and write the "
        "annotation packet (std base64 of its JSON) to OUTFILE, as the Go sidecar's -infile mode does.",
    )
    parser.add_argument("--infile", "-infile", required=True, type=Path, help="the secret to wrap")
    parser.add_argument(
        "--keypath", "-keypath", required=True, help="DIR/NAME: reads DIR/NAME-info.json; the kid is NAME"
    )
    parser.add_argument("--outfile", "-outfile", required=True, type=Path, help="where the packet goes")
    parser.set_defaults(func=_wrap)


def _wrap(args: argparse.Namespace) -> int:
    from skr.files import write_atomically
    from skr.keyprovider.keyinfo import wrap_for_keypath

    plaintext = args.infile.read_bytes()
    annotation = wrap_for_keypath(args.keypath, plaintext)
    write_atomically(args.outfile, base64.b64encode(annotation), 0o644)
    return 0
