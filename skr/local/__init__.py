"""Local mode: a virtual TEE and local Azure-compatible services that speak the real wire formats."""
