"""CLI command groups. Each module exposes ``register(subparsers)``; :mod:`skr.cli` wires them."""
