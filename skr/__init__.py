"""skr — the Secure Key Release sidecar for Azure confidential containers."""

__version__ = "0.1.0"
