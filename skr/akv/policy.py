"""Key Vault / Managed HSM key release policies: grammar, evaluation with a trace, and the ACI builder.

Owns the policy grammar (``{"version": "1.0.0" | "0.2", "anyOf": [{"authority", "anyOf" | "allOf": [...]}]}``
with nested ``anyOf``/``allOf``, claim conditions ``{"claim", <operator>: value}`` and the legacy
``{"claim", "condition", "value"}``), its evaluation against attestation-token claims the way Key Vault
does it (authority matched against ``iss``; ``equals``/``notEquals`` compare as strings, so ``"false"``
matches ``false`` and ``"0"`` matches ``0``; ordering operators compare numbers; a missing claim is not
met), and the canonical confidential-containers policy.

Every malformed policy raises :class:`PolicyError` naming the JSON path of the bad part
(e.g. ``anyOf[0].allOf[2]``); every decision carries a trace with, for each condition, the expected and
actual value — the reason of a denial names the failing claims, because that is what a user sees in a 403.

Pure: no I/O. Claims are not secret, but the policy code never sees tokens or keys.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from skr.errors import PolicyError

#: Policy versions Key Vault and Managed HSM accept ("0.2" is still used by Microsoft's tooling).
POLICY_VERSIONS = ("1.0.0", "0.2")

#: How an absent claim is rendered in a trace.
ABSENT = "<absent>"

_MAX_DEPTH = 32
_MAX_RENDERED = 120
_NUMBER_RE = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]{1,4})?")
_HEX64_RE = re.compile(r"[0-9a-fA-F]{64}")

Scalar = str | int | float | bool


class Operator(StrEnum):
    """Claim operators of the release policy grammar."""

    EQUALS = "equals"
    NOT_EQUALS = "notEquals"
    LESS = "less"
    LESS_OR_EQUALS = "lessOrEquals"
    GREATER = "greater"
    GREATER_OR_EQUALS = "greaterOrEquals"
    EXISTS = "exists"


_OPERATOR_NAMES = tuple(o.value for o in Operator)

#: Ordering operators: (wording for reasons, test on the sign of actual - expected).
_ORDERING: Mapping[Operator, tuple[str, Callable[[int], bool]]] = {
    Operator.LESS: ("less than", lambda sign: sign < 0),
    Operator.LESS_OR_EQUALS: ("at most", lambda sign: sign <= 0),
    Operator.GREATER: ("greater than", lambda sign: sign > 0),
    Operator.GREATER_OR_EQUALS: ("at least", lambda sign: sign >= 0),
}


# --- model ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimCondition:
    """One claim check. ``path`` is its JSON path in the policy (``anyOf[0].allOf[2]``)."""

    path: str
    claim: str
    operator: Operator
    value: Scalar


@dataclass(frozen=True)
class AllOf:
    """Met when every condition is met."""

    path: str
    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class AnyOf:
    """Met when at least one condition is met."""

    path: str
    conditions: tuple[Condition, ...]


Condition = ClaimCondition | AllOf | AnyOf


@dataclass(frozen=True)
class AuthorityRule:
    """The conditions a token from one attestation authority (its ``iss``) must meet."""

    path: str
    authority: str
    condition: AllOf | AnyOf


@dataclass(frozen=True)
class ReleasePolicy:
    """A parsed release policy: met when any rule whose authority issued the token is met.

    ``version`` is ``None`` for the legacy form that has no version member.
    """

    version: str | None
    rules: tuple[AuthorityRule, ...]

    @property
    def authorities(self) -> tuple[str, ...]:
        """The authorities the policy names, in order."""
        return tuple(rule.authority for rule in self.rules)


@dataclass(frozen=True)
class TraceEntry:
    """What one condition expected and what the token had.

    ``expected``/``actual`` are JSON renderings (``actual`` is :data:`ABSENT` for a missing claim);
    ``note`` explains a condition that could not be compared.
    """

    path: str
    claim: str
    operator: str
    expected: str
    actual: str
    met: bool
    note: str = ""

    def describe(self) -> str:
        """One line for humans: ``[met] anyOf[0].allOf[1] x-ms-… equals "a" (actual "a")``."""
        mark = "met" if self.met else "NOT met"
        note = f" — {self.note}" if self.note else ""
        return (
            f"[{mark}] {self.path}: {self.claim} {self.operator} {self.expected} (actual {self.actual}){note}"
        )

    def to_dict(self) -> dict[str, Any]:
        """The entry as JSON-ready data."""
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`evaluate`. ``reason`` names the failing claims when denied."""

    allowed: bool
    trace: tuple[TraceEntry, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """The decision as JSON-ready data."""
        return {"allowed": self.allowed, "reason": self.reason, "trace": [e.to_dict() for e in self.trace]}


# --- parsing ------------------------------------------------------------------------------------------------


def _fail(path: str, problem: str, hint: str | None = None) -> PolicyError:
    where = f"release policy {path}" if path else "release policy"
    return PolicyError(
        f"{where}: {problem}",
        hint=hint
        or 'see the key release policy grammar: {"version":"1.0.0","anyOf":[{"authority",'
        ' "allOf"|"anyOf":[{"claim", "<operator>": value}]}]}',
    )


def _kind(value: object) -> str:
    """The JSON type of a value with its article, for messages ("an array", "a string", "null")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    return f"a {type(value).__name__}"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _object(value: object, path: str, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(path, f"is {_kind(value)}; expected {what}")
    for key in value:
        if not isinstance(key, str):
            raise _fail(path, f"has a non-string member name {key!r}")
    return value


def _unknown(obj: Mapping[str, Any], allowed: set[str], path: str) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        shown = ", ".join(repr(k[:40]) for k in extra[:3])
        raise _fail(path, f"has unknown member(s) {shown}; allowed here: {', '.join(sorted(allowed))}")


def _list(value: object, path: str, what: str) -> Sequence[Any]:
    if not isinstance(value, list | tuple):
        raise _fail(path, f"is {_kind(value)}; expected a list of {what}s")
    if not value:
        raise _fail(path, f"is an empty list; expected at least one {what}")
    return value


def _scalar(value: object, path: str) -> Scalar:
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(path, "is not a finite number")
    if isinstance(value, bool | str | int | float):
        return value
    raise _fail(path, f"is {_kind(value)}; a claim value must be a string, number or boolean")


def _number(value: object) -> Decimal | None:
    """A claim or policy value as a number: numbers and numeric strings; never booleans."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value)) if math.isfinite(value) else None
    if isinstance(value, str) and _NUMBER_RE.fullmatch(value.strip()):
        return Decimal(value.strip())
    return None


def _operand(operator: Operator, value: object, path: str) -> Scalar:
    scalar = _scalar(value, path)
    if operator is Operator.EXISTS:
        if isinstance(scalar, bool):
            return scalar
        if isinstance(scalar, str) and scalar.lower() in ("true", "false"):
            return scalar.lower() == "true"
        raise _fail(path, f"exists takes true or false, not {_render(scalar)}")
    if operator in _ORDERING and _number(scalar) is None:
        raise _fail(path, f"{operator.value} needs a number or a numeric string, not {_render(scalar)}")
    return scalar


def _claim_name(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, f"is {_kind(value)}; expected a non-empty claim name")
    if any(not segment for segment in value.split(".")):
        raise _fail(path, f"claim {value[:80]!r} has an empty segment in its dot path")
    return value


def _parse_claim(obj: Mapping[str, Any], path: str) -> ClaimCondition:
    claim = _claim_name(obj.get("claim"), _join(path, "claim"))
    if "condition" in obj or "value" in obj:  # legacy form
        _unknown(obj, {"claim", "condition", "value"}, path)
        name = obj.get("condition")
        if not isinstance(name, str) or name not in _OPERATOR_NAMES:
            raise _fail(
                _join(path, "condition"), f"is {_render(name)}; expected one of {', '.join(_OPERATOR_NAMES)}"
            )
        operator = Operator(name)
        if "value" not in obj:
            raise _fail(path, "has 'condition' but no 'value'")
        return ClaimCondition(path, claim, operator, _operand(operator, obj["value"], _join(path, "value")))
    operators = [o for o in Operator if o.value in obj]
    _unknown(obj, {"claim", *_OPERATOR_NAMES}, path)
    if len(operators) != 1:
        found = ", ".join(o.value for o in operators) or "none"
        raise _fail(path, f"needs exactly one operator ({', '.join(_OPERATOR_NAMES)}); found {found}")
    operator = operators[0]
    return ClaimCondition(
        path, claim, operator, _operand(operator, obj[operator.value], _join(path, operator.value))
    )


def _parse_group(obj: Mapping[str, Any], path: str, depth: int) -> AllOf | AnyOf:
    present = [name for name in ("anyOf", "allOf") if name in obj]
    if len(present) != 1:
        raise _fail(path, "needs exactly one of 'anyOf' or 'allOf'" + (", not both" if present else ""))
    name = present[0]
    items = _list(obj[name], _join(path, name), "condition")
    conditions = tuple(
        _parse_condition(item, f"{_join(path, name)}[{index}]", depth + 1) for index, item in enumerate(items)
    )
    return AnyOf(path, conditions) if name == "anyOf" else AllOf(path, conditions)


def _parse_condition(value: object, path: str, depth: int) -> Condition:
    if depth > _MAX_DEPTH:
        raise _fail(path, f"nests deeper than {_MAX_DEPTH} levels")
    obj = _object(value, path, "a condition object")
    if "claim" in obj:
        return _parse_claim(obj, path)
    if "anyOf" in obj or "allOf" in obj:
        _unknown(obj, {"anyOf", "allOf"}, path)
        return _parse_group(obj, path, depth)
    raise _fail(path, "is neither a claim condition ({'claim', '<operator>': value}) nor an anyOf/allOf")


def _parse_rule(value: object, path: str) -> AuthorityRule:
    obj = _object(value, path, 'an authority object {"authority", "allOf"|"anyOf"}')
    _unknown(obj, {"authority", "anyOf", "allOf"}, path)
    authority = obj.get("authority")
    if not isinstance(authority, str) or not authority.strip():
        raise _fail(_join(path, "authority"), f"is {_kind(authority)}; expected the attestation service URL")
    return AuthorityRule(path, authority, _parse_group(obj, path, 1))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _fail("", f"has the member {key[:40]!r} twice in one object")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise _fail("", f"contains {name}, which is not JSON")


def _load(data: bytes | str) -> object:
    try:
        return json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except PolicyError:
        raise
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail("", f"is not valid JSON ({str(exc)[:80]})") from None
    except RecursionError:
        raise _fail("", f"nests deeper than {_MAX_DEPTH} levels") from None


def parse_policy(data: bytes | str | Mapping[str, Any]) -> ReleasePolicy:
    """Parse and validate a release policy (JSON bytes/text or already-decoded data)."""
    document = _load(data) if isinstance(data, bytes | bytearray | str) else data
    obj = _object(document, "", "a JSON object")
    _unknown(obj, {"version", "anyOf"}, "")
    version = obj.get("version")
    if version is not None and version not in POLICY_VERSIONS:
        raise _fail("version", f"is {_render(version)}; expected one of {', '.join(POLICY_VERSIONS)}")
    if "anyOf" not in obj:
        raise _fail("", "has no top-level 'anyOf' (the list of attestation authorities)")
    rules = tuple(
        _parse_rule(item, f"anyOf[{index}]")
        for index, item in enumerate(_list(obj["anyOf"], "anyOf", "authority"))
    )
    return ReleasePolicy(version=version, rules=rules)


# --- evaluation -------------------------------------------------------------------------------------------


def _render(value: object) -> str:
    """A JSON rendering of a value for traces, shortened when long."""
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _MAX_RENDERED else text[: _MAX_RENDERED - 1] + "…"


def _as_string(value: object) -> str | None:
    """A value the way Key Vault compares it: booleans as true/false, numbers as decimal text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    return value if isinstance(value, str) else None


_MISSING = object()


@dataclass(frozen=True)
class _Lookup:
    value: object = _MISSING
    note: str = ""

    @property
    def present(self) -> bool:
        return self.value is not _MISSING


def _lookup(claims: Mapping[str, Any], claim: str) -> _Lookup:
    current: object = claims
    walked: list[str] = []
    for segment in claim.split("."):
        if isinstance(current, list | tuple) and walked:
            return _Lookup(note=f"{'.'.join(walked)} is an array; arrays are not supported in claim paths")
        if not isinstance(current, Mapping) or segment not in current:
            return _Lookup()
        current = current[segment]
        walked.append(segment)
    return _Lookup(current)


def _check(condition: ClaimCondition, claims: Mapping[str, Any]) -> TraceEntry:
    found = _lookup(claims, condition.claim)
    actual = _render(found.value) if found.present else ABSENT
    entry = {
        "path": condition.path,
        "claim": condition.claim,
        "operator": condition.operator.value,
        "expected": _render(condition.value),
        "actual": actual,
    }
    met, note = _compare(condition, found)
    return TraceEntry(**entry, met=met, note=note or found.note)


def _compare(condition: ClaimCondition, found: _Lookup) -> tuple[bool, str]:
    operator = condition.operator
    if operator is Operator.EXISTS:
        return found.present is condition.value, ""
    if not found.present:
        return False, ""
    value = found.value
    if isinstance(value, Mapping | list | tuple):
        return False, f"the claim is {_kind(value)}; only strings, numbers and booleans can be compared"
    if operator in (Operator.EQUALS, Operator.NOT_EQUALS):
        actual = _as_string(value)
        if actual is None:
            return False, f"the claim is {_kind(value)} and cannot be compared"
        equal = actual == _as_string(condition.value)
        return (equal if operator is Operator.EQUALS else not equal), ""
    actual_number = _number(value)
    expected_number = _number(condition.value)
    if actual_number is None or expected_number is None:
        return False, "the claim is not a number"
    _, test = _ORDERING[operator]
    return test((actual_number > expected_number) - (actual_number < expected_number)), ""


def _failure(entry: TraceEntry) -> str:
    operator = Operator(entry.operator)
    if operator is Operator.EXISTS:
        wanted = "to be present" if entry.expected == "true" else "to be absent"
    elif operator is Operator.EQUALS:
        wanted = entry.expected
    elif operator is Operator.NOT_EQUALS:
        wanted = f"anything but {entry.expected}"
    else:
        wanted = f"{_ORDERING[operator][0]} {entry.expected}"
    note = f" ({entry.note})" if entry.note else ""
    return f"{entry.claim}: expected {wanted}, found {entry.actual}{note}"


def _walk(condition: Condition, claims: Mapping[str, Any], trace: list[TraceEntry]) -> tuple[bool, list[str]]:
    """(met, failure descriptions) of a condition; appends every claim check to ``trace``."""
    if isinstance(condition, ClaimCondition):
        entry = _check(condition, claims)
        trace.append(entry)
        return entry.met, [] if entry.met else [_failure(entry)]
    results = [_walk(child, claims, trace) for child in condition.conditions]
    if isinstance(condition, AllOf):
        return all(met for met, _ in results), [text for _, texts in results for text in texts]
    if any(met for met, _ in results):
        return True, []
    alternatives = ["; ".join(texts) for _, texts in results]
    if len(alternatives) == 1:
        return False, alternatives
    return False, ["none of: " + " | ".join(f"({text})" for text in alternatives)]


def normalize_authority(value: str) -> str:
    """An authority URL in comparable form: lower-case scheme and host, no default port, no trailing slash.

    A bare host name means ``https://<host>``.
    """
    text = value.strip()
    if "://" not in text:
        text = "https://" + text
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    try:
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        return text.rstrip("/")
    shown = f"[{host}]" if ":" in host else host
    netloc = shown if port in (None, {"https": 443, "http": 80}.get(scheme)) else f"{shown}:{port}"
    path = parts.path.rstrip("/")
    query = f"?{parts.query}" if parts.query else ""
    return f"{scheme}://{netloc}{path}{query}"


def _authority_entry(rule: AuthorityRule, issuer: object, met: bool) -> TraceEntry:
    return TraceEntry(
        path=_join(rule.path, "authority"),
        claim="iss",
        operator="authority",
        expected=_render(rule.authority),
        actual=_render(issuer) if issuer is not None else ABSENT,
        met=met,
    )


def evaluate(policy: ReleasePolicy, claims: Mapping[str, Any]) -> Decision:
    """Decide whether a token with ``claims`` satisfies ``policy``, with a trace and a reason."""
    issuer = claims.get("iss")
    seen = normalize_authority(issuer) if isinstance(issuer, str) and issuer.strip() else None
    trace: list[TraceEntry] = []
    failures: list[str] = []
    matched = 0
    for rule in policy.rules:
        if seen is None or normalize_authority(rule.authority) != seen:
            trace.append(_authority_entry(rule, issuer, met=False))
            continue
        matched += 1
        trace.append(_authority_entry(rule, issuer, met=True))
        met, texts = _walk(rule.condition, claims, trace)
        if met:
            return Decision(True, tuple(trace), f"the token meets {rule.path} (authority {rule.authority})")
        failures.extend(texts)
    if not matched:
        expected = ", ".join(repr(a) for a in dict.fromkeys(policy.authorities))
        shown = repr(issuer) if isinstance(issuer, str) else "no iss claim"
        reason = f"the token issuer {shown} matches no authority of the release policy (expected {expected})"
        return Decision(False, tuple(trace), reason)
    return Decision(
        False, tuple(trace), "release policy not satisfied: " + "; ".join(dict.fromkeys(failures))
    )


# --- building -------------------------------------------------------------------------------------------


def build_confidential_containers_policy(
    *,
    authority: str,
    host_data: str | Sequence[str],
    compliance: str | None = "azure-compliant-uvm",
    allow_debug: bool = False,
    vmpl: int | None = 0,
    attestation_type: str | None = None,
) -> dict[str, Any]:
    """The release policy for a confidential container (ACI / AKS) bound to its CCE policy.

    ``host_data`` is the 64-hex-digit SHA-256 of the CCE policy (``x-ms-sevsnpvm-hostdata``), or several of
    them for a rollout: one ``anyOf`` entry per value, each with the same other conditions; ``allow_debug``
    drops the is-debuggable condition; ``vmpl=None`` drops the VMPL condition; ``compliance=None`` drops the
    compliance-status condition. Values are strings, like Microsoft's examples.
    """
    if not isinstance(authority, str) or not authority.strip():
        raise PolicyError("the attestation authority is empty", hint="give the MAA endpoint URL")
    text = authority.strip()
    url = (text if "://" in text else "https://" + text).rstrip("/")
    values = [host_data] if isinstance(host_data, str) else list(host_data)
    if not values:
        raise PolicyError("give at least one host data value (the SHA-256 of the CCE policy)")
    digests = dict.fromkeys(value.strip().lower().removeprefix("0x") for value in values)
    if not all(_HEX64_RE.fullmatch(digest) for digest in digests):
        raise PolicyError(
            "host data must be 64 hex digits (the SHA-256 of the CCE policy)",
            hint="compute it with `skr policy hash --cce-policy FILE`",
        )
    if vmpl is not None and (isinstance(vmpl, bool) or not isinstance(vmpl, int) or not 0 <= vmpl <= 3):
        raise PolicyError(f"vmpl must be 0 to 3, not {vmpl!r}")
    others: list[dict[str, Any]] = []
    if compliance:
        others.append({"claim": "x-ms-compliance-status", "equals": compliance})
    if not allow_debug:
        others.append({"claim": "x-ms-sevsnpvm-is-debuggable", "equals": "false"})
    if vmpl is not None:
        others.append({"claim": "x-ms-sevsnpvm-vmpl", "equals": str(vmpl)})
    if attestation_type:
        others.append({"claim": "x-ms-attestation-type", "equals": attestation_type})
    entries = [
        {"authority": url, "allOf": [{"claim": "x-ms-sevsnpvm-hostdata", "equals": d}, *others]}
        for d in digests
    ]
    policy = {"version": "1.0.0", "anyOf": entries}
    parse_policy(policy)
    return policy


def encode_policy_for_wire(policy: Mapping[str, Any]) -> bytes:
    """Compact JSON bytes of a (validated) policy, as ``KeyReleasePolicy(encoded_policy=...)`` takes them."""
    parse_policy(policy)
    return json.dumps(policy, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
