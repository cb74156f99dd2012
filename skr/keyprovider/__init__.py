"""The key-provider side of skr: what apps and image tools that never call the HTTP API speak.

- :mod:`skr.keyprovider.ocicrypt`: the ocicrypt key-provider JSON (both byte encodings in, integer arrays
  out), the decrypt-parameter authorization, the Go sidecar's annotation packet, RSA-OAEP-SHA256 (pure).
- :mod:`skr.keyprovider.algorithms`: decryption of wrapped data by JOSE algorithm name with a released
  key (``/key/unwrap``; pure).
- :mod:`skr.keyprovider.provider`: ``WrapKey`` / ``UnWrapKey`` over :class:`skr.service.ReleaseService`
  (the same release path as ``/key/release``).
- :mod:`skr.keyprovider.grpc_server`: the gRPC server (both service names, reflection, health), optional
  extra ``grpc``.

Never logs, audits or returns key material other than the one plaintext a caller is entitled to.
"""
