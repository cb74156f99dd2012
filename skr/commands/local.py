"""``skr local``: run the whole flow on this machine (what ``make run`` starts)."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
from pathlib import Path

from skr.config import default_state_dir
from skr.daemon import on_signal
from skr.local.faults import FaultPlan
from skr.logs import setup_logging


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "local",
        help="start a virtual TEE, local attestation/key/identity services and the sidecar on 127.0.0.1",
    )
    parser.add_argument("--state-dir", type=Path, help="state directory (default ~/.local/state/skr/local)")
    parser.add_argument(
        "--port", "-port", type=int, default=8080, help="sidecar port (default 8080; 0 = any)"
    )
    parser.add_argument("--attestation-port", type=int, default=0, help="local attestation service port")
    parser.add_argument("--key-service-port", type=int, default=0, help="local key service port")
    parser.add_argument("--identity-port", type=int, default=0, help="local identity endpoint port")
    parser.add_argument("--faults", type=Path, help="a fault plan (JSON) for the local services")
    parser.add_argument("--audit-log", type=Path, help="audit log (default STATE_DIR/audit.log)")
    parser.add_argument("--token-reuse", choices=("on", "off"), default="on", help="reuse attestation tokens")
    parser.add_argument("--no-sidecar", action="store_true", help="start only the local services")
    parser.add_argument(
        "--no-uvm-endorsement",
        action="store_true",
        help="send no UVM endorsement: no x-ms-compliance-status, so the demo keys are denied, as on Azure",
    )
    parser.add_argument("--log-level", default="warning", help="log level (default warning)")
    parser.set_defaults(func=_local)


def _local(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("cbor2") is None:
        print(
            "skr: skr local needs the 'local' extra (cbor2, for UVM endorsements): pip install 'skr[local]'",
            file=sys.stderr,
        )
        return 2
    from skr.local.stack import LocalStack, StackOptions

    setup_logging(args.log_level)
    state_dir: Path = args.state_dir or default_state_dir() / "local"
    options = StackOptions(
        state_dir=state_dir,
        sidecar_port=args.port,
        attestation_port=args.attestation_port,
        key_service_port=args.key_service_port,
        identity_port=args.identity_port,
        with_sidecar=not args.no_sidecar,
        faults=FaultPlan.load(args.faults) if args.faults else None,
        audit_log=args.audit_log or state_dir / "audit.log",
        token_reuse=args.token_reuse == "on",  # noqa: S105 - an on/off switch, not a secret
        log_level=args.log_level,
        uvm_endorsement=not args.no_uvm_endorsement,
    )

    async def run() -> None:
        stop = asyncio.Event()
        on_signal(stop)
        stack = await LocalStack.start(options)
        try:
            info = stack.info
            print("skr local is up (nothing here is confidential: the TEE is virtual)")
            if "sidecar" in info:
                print(f"  sidecar          {info['sidecar']}")
            print(f"  attestation      {info['attestation_url']}")
            print(f"  key service      {info['key_vault_url']}")
            print(f"  identity         {info['identity_endpoint']}")
            print(f"  HOST_DATA        {info['host_data']}")
            if info["uvm_endorsement"]:
                print("  UVM endorsement  signed by the local UVM signing key (azure-compliant-uvm)")
            else:
                print(
                    "  UVM endorsement  NONE (--no-uvm-endorsement): no x-ms-compliance-status in tokens, so "
                    "every release policy that requires azure-compliant-uvm is denied, as on Azure"
                )
            print(f"  keys granted     {', '.join(info['keys']['granted']) or 'none'}")
            print(f"  keys denied      {', '.join(info['keys']['denied'])}")
            print(f"  manifest         {state_dir / 'local.json'}")
            print(f"  audit log        {options.audit_log}")
            if "sidecar" in info and not info["uvm_endorsement"]:
                print("\nSee the denial (no UVM endorsement, no compliance status):\n  " + stack.curl())
            elif "sidecar" in info:
                print("\nRelease a demo key:\n  " + stack.curl())
                print(
                    "See a denial (the key is bound to another policy hash):\n  " + stack.curl("demo-denied")
                )
            print("\nCtrl-C stops everything.", flush=True)
            await stop.wait()
        finally:
            await stack.stop()
            print("skr local stopped", file=sys.stderr)

    asyncio.run(run())
    return 0
