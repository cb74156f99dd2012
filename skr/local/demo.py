"""The demo content of local mode: the security policy the virtual TEE is launched with, and the keys.

The policy text has the shape of a confidential-containers (CCE) Rego policy; its SHA-256 is the virtual
TEE's HOST_DATA, and the demo keys' release policies are bound to that value — exactly how a real ACI
deployment binds keys to its ``ccePolicy``. One extra key is bound to a *different* policy hash so that
a denial can be seen. The demo release policies (``skr.akv.policy.build_confidential_containers_policy``)
also require ``x-ms-compliance-status: azure-compliant-uvm``, which the local attestation service emits
only for a verified UVM endorsement — so ``skr local --no-uvm-endorsement`` denies every demo key.
"""

from __future__ import annotations

from dataclasses import dataclass

DEMO_SECURITY_POLICY = b"""package policy

import future.keywords.every
import future.keywords.in

api_version := "0.10.0"
framework_version := "0.2.3"

# skr local mode: a demo confidential-computing security policy. Its SHA-256 is the virtual TEE's
# HOST_DATA; the demo keys' release policies require exactly that value.
containers := [{"id": "skr-demo-app", "command": ["python3", "app.py"], "allow_elevated": false}]

mount_device := {"allowed": true}
create_container := {"allowed": true}
exec_in_container := {"allowed": false}
allow_properties_access := false
allow_dump_stacks := false
allow_runtime_logging := false
allow_environment_variable_dropping := false
allow_unencrypted_scratch := false
"""

OTHER_SECURITY_POLICY = b"""package policy

# A different container group's policy: keys bound to its hash are never released to the demo TEE.
api_version := "0.10.0"
containers := [{"id": "some-other-app"}]
"""


@dataclass(frozen=True)
class DemoKey:
    name: str
    kty: str  # Key Vault kty
    size: int | None = None
    curve: str | None = None
    granted: bool = True  # False: bound to OTHER_SECURITY_POLICY's hash, so release is denied


DEMO_KEYS = (
    DemoKey("demo-oct", "oct-HSM", size=256),
    DemoKey("demo-rsa", "RSA-HSM", size=2048),
    DemoKey("demo-ec", "EC-HSM", curve="P-256"),
    DemoKey("demo-denied", "oct-HSM", size=256, granted=False),
)
