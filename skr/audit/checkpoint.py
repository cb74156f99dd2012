"""Hardware-signed checkpoints: an SEV-SNP report over the audit head, written into the chain.

Owns when checkpoints are made (at start sealing the previous head, every ``interval`` seconds when
records were added, every ``every_records`` records, at graceful stop), the ``audit.start`` and
``audit.stop`` records, the stdout copy of each checkpoint (``{"skr_audit_checkpoint": {...}}``, written
even without ``--audit-stdout`` so the platform's log pipeline holds an independent copy), and the
statements ``GET /audit/head`` answers without writing them.

Evidence comes from a callable the daemon passes in (the evidence provider's ``collect``): this module
never opens a device or a network connection itself, and never writes key material or tokens.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar, Protocol

from skr.audit.chain import CHECKPOINT_EVENT, canonical, rfc3339_now, statement, statement_report_data
from skr.audit.writer import AsyncAuditLog
from skr.errors import Code, SkrError

log = logging.getLogger("skr.audit")


START_SEAL_TIMEOUT = 10.0  # seconds the start checkpoint may take before the sidecar starts without it


class CheckpointEvidence(Protocol):
    """What a checkpoint needs from the evidence provider (``skr.evidence.base.Evidence`` fits)."""

    @property
    def report(self) -> bytes: ...
    @property
    def vcek_chain_pem(self) -> bytes: ...
    @property
    def provider(self) -> str: ...
    @property
    def uvm_endorsements(self) -> bytes | None: ...


Collect = Callable[[bytes], Awaitable[CheckpointEvidence]]


class AuditRateLimited(SkrError):
    """``GET /audit/head`` asked again within a second (each answer costs a hardware report)."""

    default_code: ClassVar[Code] = Code.RATE_LIMITED


def evidence_fields(evidence: CheckpointEvidence) -> dict[str, Any]:
    """The evidence as a checkpoint keeps it: everything needed to verify the report offline."""
    fields: dict[str, Any] = {
        "provider": evidence.provider,
        "report": base64.b64encode(evidence.report).decode("ascii"),
        "vcek_chain": evidence.vcek_chain_pem.decode("ascii", "replace"),
    }
    if evidence.uvm_endorsements:
        fields["uvm_endorsement_sha256"] = hashlib.sha256(evidence.uvm_endorsements).hexdigest()
    return fields


def stdout_copy(record: Mapping[str, Any]) -> str:
    """The independent copy of a checkpoint for the platform's log pipeline: one JSON line."""
    return json.dumps({"skr_audit_checkpoint": record}, sort_keys=True, separators=(",", ":")) + "\n"


def _report_fields(report: bytes) -> dict[str, str]:
    if len(report) < 0xE0:
        return {}
    return {"host_data": report[0xC0:0xE0].hex(), "measurement": report[0x90:0xC0].hex()}


class Checkpointer:
    """Seals the audit head with hardware reports for one sidecar run (``instance``)."""

    def __init__(
        self,
        audit: AsyncAuditLog,
        collect: Collect,
        *,
        interval: float = 60.0,
        every_records: int = 1000,
        emit: Callable[[str], None] | None = None,
    ) -> None:
        self.audit = audit
        self.collect = collect
        self.interval = interval
        self.every_records = every_records
        self.instance = audit.instance
        self._emit = emit
        self._sealed = -1  # the seq the newest checkpoint covers
        self._own = -1  # the seq of the newest checkpoint record itself (nothing new to seal after it)
        self._lock = asyncio.Lock()
        self._timer: asyncio.Task[None] | None = None
        self._triggered: asyncio.Future[dict[str, Any] | None] | None = None
        self._last_statement = 0.0
        self._stopped = False
        self.started = False

    async def _statement(self) -> tuple[dict[str, Any], CheckpointEvidence]:
        seq, head = self.audit.head
        stmt = statement(seq, head, self.instance, rfc3339_now())
        return stmt, await self.collect(statement_report_data(stmt))

    async def seal(self) -> dict[str, Any] | None:
        """Write a checkpoint for the current head (unless it is already sealed); the record or None."""
        async with self._lock:
            if self.audit.head[0] in (self._sealed, self._own):
                return None
            stmt, evidence = await self._statement()
            record = await self.audit.append(
                {"event": CHECKPOINT_EVENT, **stmt, "evidence": evidence_fields(evidence)}
            )
            self._sealed, self._own = stmt["covers_seq"], record["seq"]
            if self._emit is not None:
                try:
                    self._emit(stdout_copy(record))
                except OSError as exc:  # the copy is extra; the checkpoint itself is durable
                    log.warning("cannot write the checkpoint copy to stdout", extra={"error": str(exc)})
            return record

    async def _seal_quietly(self) -> dict[str, Any] | None:
        try:
            return await self.seal()
        except SkrError as exc:
            log.warning("cannot write an audit checkpoint", extra={"error": exc.diagnostics()})
            return None

    async def start(self, *, version: str, evidence_kind: str, settings: Mapping[str, Any]) -> None:
        """Seal the previous head, write ``audit.start``, and start the interval and record triggers."""
        # the first report may wait on collateral (THIM, KDS): the sidecar does not wait for it forever
        sealing = asyncio.ensure_future(self._seal_quietly())
        try:
            record = await asyncio.wait_for(asyncio.shield(sealing), START_SEAL_TIMEOUT)
        except TimeoutError:
            log.warning("the start checkpoint is still waiting for evidence; starting without it")
            record = None
        report = _report_fields(base64.b64decode(record["evidence"]["report"])) if record is not None else {}
        await self.audit.append(
            {
                "event": "audit.start",
                "instance": self.instance,
                "version": version,
                "evidence_kind": evidence_kind,
                **report,
                "settings": dict(settings),
                "settings_sha256": hashlib.sha256(canonical(dict(settings))).hexdigest(),
            }
        )
        if self.every_records > 0:
            self.audit.add_listener(self._on_record)
        if self.interval > 0:
            self._timer = asyncio.ensure_future(self._tick())
        self.started = True

    def _on_record(self, record: Mapping[str, Any]) -> None:
        seq = record.get("seq")
        if (
            not self._stopped
            and isinstance(seq, int)
            and seq - max(self._sealed, 0) >= self.every_records
            and (self._triggered is None or self._triggered.done())
        ):
            self._triggered = asyncio.ensure_future(self._seal_quietly())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            # shielded: stopping mid-seal must not lose the stdout copy of a checkpoint already written
            await asyncio.shield(self._seal_quietly())

    async def head_statement(self) -> dict[str, Any]:
        """A fresh statement over the current head with its evidence, not written (``GET /audit/head``)."""
        now = time.monotonic()
        if now - self._last_statement < 1.0:
            raise AuditRateLimited(
                "an audit head statement was made less than a second ago", hint="retry after a second"
            )
        self._last_statement = now
        stmt, evidence = await self._statement()
        return {**stmt, "evidence": evidence_fields(evidence)}

    async def stop(self) -> None:
        """Write ``audit.stop`` with this run's counts, then the final checkpoint sealing it."""
        if not self.started or self._stopped:
            return
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        if self._triggered is not None:
            await self._triggered  # a seal in progress finishes (it never raises: _seal_quietly)
        try:
            await self.audit.append(
                {"event": "audit.stop", "instance": self.instance, "counts": dict(self.audit.counts)}
            )
            await self.seal()
        except SkrError as exc:
            log.warning("cannot close the audit trail cleanly", extra={"error": exc.diagnostics()})
