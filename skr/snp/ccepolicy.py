"""Decode an ACI / confidential-containers security policy (CCE policy, Rego) without a Rego engine.

``acipolicygen`` writes the policy as a Rego module whose interesting parts are top-level assignments with
JSON-like values — ``api_version := "0.10.0"``, ``fragments := [...]``, ``containers := [...]``,
``allow_dump_stacks := false`` — followed by the enforcement points, each either delegated to the framework
(``exec_in_container := data.framework.exec_in_container``) or allowed outright
(``exec_in_container := {"allowed": true}``, as in the allow-all policy). This module reads those
assignments (Rego literals: JSON plus back-quoted raw strings and trailing commas), describes each
container and setting, and lists every setting that weakens confidentiality as a warning.

Pure: no I/O and no evaluation; rules with bodies are ignored. The HOST_DATA is
:func:`skr.snp.hostdata.host_data_of_policy` of the same input.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from skr.errors import BadRequest
from skr.snp.hostdata import decode_cce_policy, host_data_of_policy

#: The enforcement points of the policy framework: whether allowing one outright lets the host see or change
#: what runs (else it only costs availability), and what it gives the host.
ENFORCEMENT_POINTS: dict[str, tuple[bool, str]] = {
    "mount_device": (True, "mount any device into the UVM"),
    "unmount_device": (False, "unmount any device"),
    "mount_overlay": (True, "assemble any container file system"),
    "unmount_overlay": (False, "remove any container file system"),
    "create_container": (True, "start any container, with any command and environment"),
    "exec_in_container": (True, "run any process inside any container"),
    "exec_external": (True, "run any process in the UVM"),
    "shutdown_container": (False, "stop any container"),
    "signal_container_process": (False, "send any signal to any process"),
    "plan9_mount": (True, "share any host directory into the UVM"),
    "plan9_unmount": (False, "remove any host share"),
    "get_properties": (False, "read container properties and statistics"),
    "dump_stacks": (True, "dump the stacks of guest processes"),
    "runtime_logging": (True, "receive the guest runtime's logs"),
    "load_fragment": (True, "load any policy fragment, from any issuer"),
    "scratch_mount": (True, "mount scratch storage, encrypted or not"),
    "scratch_unmount": (False, "unmount scratch storage"),
}

#: The policy-wide settings, and (when true) whether each weakens confidentiality and why.
SETTINGS: dict[str, tuple[bool, str]] = {
    "allow_properties_access": (False, "the host can read container properties and statistics"),
    "allow_dump_stacks": (True, "the host can dump the stacks of guest processes, which may hold secrets"),
    "allow_runtime_logging": (True, "the guest runtime's logs go to the host"),
    "allow_environment_variable_dropping": (
        False,
        "environment variables that match no rule are dropped instead of failing the container",
    ),
    "allow_unencrypted_scratch": (True, "container scratch storage may be unencrypted, readable by the host"),
    "allow_capability_dropping": (False, "capabilities outside the policy are dropped instead of refused"),
}

_ASSIGNMENT_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)[ \t]*:=[ \t]*", re.MULTILINE)
_NUMBER_RE = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_LITERAL_LISTS = frozenset({"containers", "fragments", "external_processes"})
_OPEN_ENV_PATTERNS = (".*", ".+", ".*=.*", ".+=.+", ".*=.+", ".+=.*", "(.*)", "(.+)")


class _Unparsable(ValueError):
    """The value is not a Rego literal (a reference, a comprehension, ...)."""


class _LiteralReader:
    """A Rego literal: JSON plus back-quoted raw strings, trailing commas and ``#`` comments."""

    def __init__(self, text: str, pos: int) -> None:
        self.text = text
        self.pos = pos

    def _skip(self) -> None:
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char in " \t\r\n":
                self.pos += 1
            elif char == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            else:
                return

    def _peek(self) -> str:
        self._skip()
        if self.pos >= len(self.text):
            raise _Unparsable("unexpected end of the policy")
        return self.text[self.pos]

    def value(self, depth: int = 0) -> Any:
        if depth > 64:
            raise _Unparsable("nested too deeply")
        char = self._peek()
        if char == "[":
            return self._sequence(depth)
        if char == "{":
            return self._mapping(depth)
        if char == '"':
            return self._string()
        if char == "`":
            end = self.text.find("`", self.pos + 1)
            if end < 0:
                raise _Unparsable("an unterminated raw string")
            raw = self.text[self.pos + 1 : end]
            self.pos = end + 1
            return raw
        for word, result in (("true", True), ("false", False), ("null", None)):
            if self.text.startswith(word, self.pos) and not _ident_char(self.text, self.pos + len(word)):
                self.pos += len(word)
                return result
        match = _NUMBER_RE.match(self.text, self.pos)
        if match and not _ident_char(self.text, match.end()):
            self.pos = match.end()
            return json.loads(match.group())
        raise _Unparsable(f"not a literal at {self.text[self.pos : self.pos + 30]!r}")

    def _string(self) -> str:
        match = re.compile(r'"(?:[^"\\\n]|\\.)*"').match(self.text, self.pos)
        if match is None:
            raise _Unparsable("an unterminated string")
        self.pos = match.end()
        try:
            value: str = json.loads(match.group())
        except ValueError as exc:
            raise _Unparsable(f"a bad string escape ({exc})") from None
        return value

    def _separator(self, closing: str) -> None:
        if self._peek() == ",":
            self.pos += 1
        elif self._peek() != closing:
            raise _Unparsable(f"expected ',' or '{closing}' at {self.text[self.pos : self.pos + 30]!r}")

    def _sequence(self, depth: int) -> list[Any]:
        self.pos += 1
        items: list[Any] = []
        while self._peek() != "]":
            items.append(self.value(depth + 1))
            self._separator("]")
        self.pos += 1
        return items

    def _mapping(self, depth: int) -> dict[str, Any]:
        self.pos += 1
        result: dict[str, Any] = {}
        while self._peek() != "}":
            key = self.value(depth + 1)
            if not isinstance(key, str):
                raise _Unparsable("an object key that is not a string")
            if self._peek() != ":":
                raise _Unparsable(f"expected ':' after {key!r}")
            self.pos += 1
            result[key] = self.value(depth + 1)
            self._separator("}")
        self.pos += 1
        return result


def _ident_char(text: str, pos: int) -> bool:
    return pos < len(text) and (text[pos].isalnum() or text[pos] in "_.")


def read_assignments(rego: str) -> tuple[dict[str, Any], dict[str, str]]:
    """``(literal values, other expressions)`` of the module's top-level ``name := value`` assignments."""
    literals: dict[str, Any] = {}
    expressions: dict[str, str] = {}
    for match in _ASSIGNMENT_RE.finditer(rego):
        name = match.group(1)
        reader = _LiteralReader(rego, match.end())
        try:
            literals[name] = reader.value()
        except _Unparsable as exc:
            line = rego[match.end() :].split("\n", 1)[0].strip()
            if name in _LITERAL_LISTS:  # the parts this module describes must parse: do not guess
                raise BadRequest(f"the policy's '{name} :=' value does not parse: {exc}") from None
            expressions[name] = line
    return literals, expressions


# --- the description ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContainerRules:
    """What the policy lets one container be."""

    name: str
    image: str
    layers: int
    command: list[str]
    env_rules: list[dict[str, Any]]
    mounts: list[dict[str, Any]]
    exec_processes: list[list[str]]
    working_dir: str
    allow_elevated: bool
    allow_stdio_access: bool
    no_new_privileges: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CcePolicy:
    """A decoded CCE policy and the warnings about it."""

    host_data: str
    api_version: str | None
    framework_version: str | None
    rules: dict[str, str]
    settings: dict[str, Any]
    fragments: list[dict[str, Any]]
    containers: list[ContainerRules]
    external_processes: list[list[str]]
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def allow_all(self) -> bool:
        """Every enforcement point is allowed outright: nothing in the group is enforced."""
        return bool(self.rules) and all(v == "allow-all" for v in self.rules.values())

    def to_dict(self) -> dict[str, Any]:
        """Every field (containers as dicts), with ``allow_all`` after the versions."""
        items = list(asdict(self).items())
        return dict([*items[:3], ("allow_all", self.allow_all), *items[3:]])


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _command(value: Any) -> list[str]:
    return [_text(part) for part in value] if isinstance(value, list) else []


def _objects(value: Any, what: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise BadRequest(f"the policy's {what} is not a list of objects")
    return value


def _rule_kind(name: str, literals: dict[str, Any], expressions: dict[str, str]) -> str | None:
    if name in literals:
        value = literals[name]
        if isinstance(value, dict) and value.get("allowed") is True:
            return "allow-all"
        if isinstance(value, dict) and value.get("allowed") is False:
            return "deny-all"
        return json.dumps(value)
    expression = expressions.get(name)
    if expression is None:
        return None
    return "framework" if expression == f"data.framework.{name}" else expression


def _container(index: int, doc: dict[str, Any]) -> ContainerRules:
    env_rules = [
        {
            "pattern": _text(rule.get("pattern", "")),
            "strategy": _text(rule.get("strategy", "string")),
            "required": bool(rule.get("required", False)),
        }
        for rule in _objects(doc.get("env_rules"), f"containers[{index}].env_rules")
    ]
    mounts = [
        {
            "destination": _text(m.get("destination", "")),
            "source": _text(m.get("source", "")),
            "type": _text(m.get("type", "")),
            "options": _command(m.get("options")),
        }
        for m in _objects(doc.get("mounts"), f"containers[{index}].mounts")
    ]
    processes = [
        _command(p.get("command"))
        for p in _objects(doc.get("exec_processes"), f"containers[{index}].exec_processes")
    ]
    layers = doc.get("layers")
    return ContainerRules(
        name=_text(doc.get("name", f"container {index}")),
        image=_text(doc.get("id", "")),
        layers=len(layers) if isinstance(layers, list) else 0,
        command=_command(doc.get("command")),
        env_rules=env_rules,
        mounts=mounts,
        exec_processes=processes,
        working_dir=_text(doc.get("working_dir", "")),
        allow_elevated=doc.get("allow_elevated") is True,
        allow_stdio_access=doc.get("allow_stdio_access") is True,
        no_new_privileges=doc.get("no_new_privileges") is True,
    )


def _open_env_rule(rule: dict[str, Any]) -> bool:
    """An env rule that admits variables of any name (so the host can inject e.g. LD_PRELOAD)."""
    pattern = str(rule["pattern"])
    return rule["strategy"] == "re2" and (pattern in _OPEN_ENV_PATTERNS or pattern.startswith((".*=", ".+=")))


def decode_policy(data: bytes) -> CcePolicy:
    """Decode a CCE policy given in base64 (as ACI ships it) or as raw Rego."""
    raw = decode_cce_policy(data)
    try:
        rego = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the security policy is neither base64 nor UTF-8 Rego text") from None
    if not re.search(r"^\s*package\s+[A-Za-z_]", rego, re.MULTILINE):
        raise BadRequest("the security policy is not a Rego module (it has no 'package' line)")
    literals, expressions = read_assignments(rego)

    def version(*names: str) -> str | None:
        return next((_text(literals[name]) for name in names if name in literals), None)

    rules = {
        name: kind
        for name in ENFORCEMENT_POINTS
        if (kind := _rule_kind(name, literals, expressions)) is not None
    }
    settings = {name: literals[name] for name in SETTINGS if name in literals}
    fragments = [
        {
            "feed": _text(f.get("feed", "")),
            "issuer": _text(f.get("issuer", f.get("iss", ""))),
            "minimum_svn": _text(f.get("minimum_svn", "")),
            "includes": _command(f.get("includes")),
        }
        for f in _objects(literals.get("fragments"), "fragments")
    ]
    containers = [_container(i, c) for i, c in enumerate(_objects(literals.get("containers"), "containers"))]
    external = [
        _command(p.get("command")) for p in _objects(literals.get("external_processes"), "external_processes")
    ]
    policy = CcePolicy(
        host_data=host_data_of_policy(data).hex(),
        api_version=version("api_version", "api_svn"),
        framework_version=version("framework_version", "framework_svn"),
        rules=rules,
        settings=settings,
        fragments=fragments,
        containers=containers,
        external_processes=external,
    )
    _judge(policy)
    return policy


def _judge(policy: CcePolicy) -> None:
    """Fill ``warnings`` (settings that weaken confidentiality) and ``notes`` (the rest worth knowing)."""
    warn, note = policy.warnings.append, policy.notes.append
    if policy.allow_all:
        warn(
            "allow-all policy: every enforcement point is allowed outright, so the host can run any "
            "container, exec into it and read its logs; its HOST_DATA only proves that nothing is enforced"
        )
    for name, kind in policy.rules.items():
        if kind == "allow-all":
            weakens, gives = ENFORCEMENT_POINTS[name]
            (warn if weakens else note)(f"{name} is allowed outright: the host can {gives}")
    if not policy.rules:
        note("no enforcement points are assigned: the framework's defaults apply")
    for name, value in policy.settings.items():
        weakens, meaning = SETTINGS[name]
        if value is True:
            (warn if weakens else note)(f"{name} is true: {meaning}")
    for container in policy.containers:
        label = f"container {container.name!r}"
        for process in container.exec_processes:
            warn(f"{label}: the host can exec {' '.join(process) or '(any command)'} in it")
        if container.allow_elevated:
            warn(f"{label} runs privileged (allow_elevated): it can reach the UVM and other containers")
        for rule in container.env_rules:
            if _open_env_rule(rule):
                warn(f"{label}: env rule {rule['pattern']!r} lets the host set variables of any name")
        if container.allow_stdio_access:
            note(f"{label}: its stdout/stderr go to the host (allow_stdio_access); do not print secrets")
    for process in policy.external_processes:
        warn(f"the host can run {' '.join(process) or '(any command)'} in the UVM (external_processes)")
    for fragment in policy.fragments:
        note(
            f"fragment {fragment['feed']} from issuer {fragment['issuer']} (minimum svn "
            f"{fragment['minimum_svn']}) adds {', '.join(fragment['includes']) or 'nothing'}"
        )
