"""The layering of ``skr/``, checked on the import graph (every import, lazy and type-only ones included).

    errors ← base (endpoints, http, files, config, identity, ...) ← snp ← evidence, audit ← maa/akv
        ← service ← server ← daemon ← commands/cli

``skr.local``'s services (virtual-TEE helpers, attestation, key and identity services, CA) may use
everything below the service; only ``skr.local.stack``, which assembles local mode around a real
sidecar, may use the daemon. Nothing below the commands imports ``skr.local``. A new subpackage must be
placed in :data:`LAYERS` before it can be imported from anywhere.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SKR = Path(__file__).resolve().parents[1] / "skr"

# Lower numbers are lower layers; a module may import its own layer's modules and lower layers only.
LAYERS: dict[str, int] = {
    "skr": 0,  # the package itself: __version__
    "skr.errors": 0,
    "skr.b64": 0,  # base64url, pure
    "skr.endpoints": 1,
    "skr.files": 1,
    "skr.upstream": 1,
    "skr.logs": 1,
    "skr.metrics": 1,
    "skr.identity": 1,
    "skr.sdk": 1,  # the transport of the commands' Azure SDK clients (azure-core)
    "skr.hostcheck": 1,
    "skr.process": 1,
    "skr.config": 2,
    "skr.snp": 3,
    "skr.evidence": 4,
    "skr.audit": 4,  # its checkpoint proofs verify SNP reports
    "skr.maa": 5,
    "skr.akv": 5,
    "skr.service": 6,
    "skr.ports": 6,  # the release use case's Protocols, clock and audit record
    "skr.attestations": 6,  # the wrapping-key pool and attestation-token cache of the use case
    "skr.openapi": 7,
    "skr.server": 7,
    "skr.connections": 7,
    "skr.keyprovider": 7,  # the gRPC and ocicrypt faces of the service, beside the HTTP one
    "skr.daemon": 8,
    "skr.encfs": 9,  # a daemon of its own around the release service (mounts, FUSE, blob I/O)
    "skr.local": 5,  # the local services: below the service (see LOCAL_ASSEMBLY)
    "skr.commands": 10,
    "skr.cli": 10,
}
LOCAL_ASSEMBLY = {"skr.local.stack": 9}


def module_name(path: Path) -> str:
    parts = path.relative_to(SKR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every ``skr`` module ``path`` imports, at any depth of the file (lazy imports count)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "skr":  # `from skr import errors` is a module, `__version__` is not
                found.update(
                    f"skr.{a.name}" if (SKR / f"{a.name}.py").exists() or (SKR / a.name).is_dir() else "skr"
                    for a in node.names
                )
            elif node.module.startswith("skr."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "skr")
    return found


def unit_of(module: str) -> str:
    """The layered unit a module belongs to: ``skr.local.stack`` on its own, else its subpackage."""
    for name in LOCAL_ASSEMBLY:
        if module == name or module.startswith(name + "."):
            return name
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def layer_of(unit: str) -> int | None:
    return LOCAL_ASSEMBLY.get(unit, LAYERS.get(unit))


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in sorted(SKR.rglob("*.py")):
        source = module_name(path)
        for target in imports_of(path):
            edges[source].add(target)
    return edges


def test_every_module_belongs_to_a_layer():
    unplaced = sorted(
        {unit_of(m) for m in graph()} - set(LAYERS) - set(LOCAL_ASSEMBLY)
        | {unit_of(t) for ts in graph().values() for t in ts} - set(LAYERS) - set(LOCAL_ASSEMBLY)
    )
    assert not unplaced, f"place these in tests/test_architecture.py LAYERS: {unplaced}"


def test_no_module_imports_upward():
    upward = []
    for source, targets in graph().items():
        src_unit = unit_of(source)
        src_layer = layer_of(src_unit)
        for target in targets:
            tgt_unit = unit_of(target)
            tgt_layer = layer_of(tgt_unit)
            if src_layer is None or tgt_layer is None or tgt_unit == src_unit:
                continue
            if tgt_layer > src_layer:
                upward.append(f"{source} (layer {src_layer}) imports {target} (layer {tgt_layer})")
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_subpackages_have_no_import_cycles():
    units: dict[str, set[str]] = defaultdict(set)
    for source, targets in graph().items():
        for target in targets:
            if unit_of(target) != unit_of(source):
                units[unit_of(source)].add(unit_of(target))
    cycles = []
    for start in sorted(units):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(units.get(node, ())):
                if nxt == start:
                    cycles.append(" → ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert not cycles, "import cycles between subpackages:\n" + "\n".join(cycles)


def test_nothing_below_the_commands_imports_local_mode():
    offenders = sorted(
        f"{source} imports {target}"
        for source, targets in graph().items()
        for target in targets
        if unit_of(target).startswith("skr.local")
        and not unit_of(source).startswith("skr.local")
        and (layer_of(unit_of(source)) or 0) < LAYERS["skr.commands"]
    )
    assert not offenders, "\n".join(offenders)


def test_the_checker_sees_lazy_and_type_only_imports(tmp_path):
    # the checker itself must not miss the imports that hide inside functions or TYPE_CHECKING blocks
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from skr.service import ReleaseService\n"
        "def f():\n    from skr.local.demo import DEMO_KEYS\n    import skr.daemon\n"
        "from skr import errors, __version__\n"
    )
    assert imports_of(sample) == {"skr.service", "skr.local.demo", "skr.daemon", "skr.errors", "skr"}
