"""Microsoft Azure Attestation: client, runtime data, token verification."""
