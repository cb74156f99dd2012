"""Azure Key Vault / Managed HSM secure key release: key wrap, JWK, release JWS, policies, client."""
