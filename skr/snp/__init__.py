"""AMD SEV-SNP: the attestation report, AMD certificates, verification and collateral."""
