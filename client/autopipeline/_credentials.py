"""Connection security: TLS channel credentials from PEM files, and bearer tokens."""

from __future__ import annotations

import os
import re

import grpc

__all__ = ["tls_credentials", "with_token"]

# Metadata values are printable ASCII; a space would break "Bearer <token>" apart.
_TOKEN = re.compile(r"^[\x21-\x7e]+$")


def tls_credentials(
    *,
    ca_file: str | os.PathLike[str] | None = None,
    cert_file: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
) -> grpc.ChannelCredentials:
    """TLS channel credentials for `Client` and `AsyncClient`, read from PEM files.

    Args:
        ca_file: The root certificate(s) to trust the server by; None trusts the system's roots.
        cert_file: This client's certificate chain, for a server that requires mutual TLS.
        key_file: The private key of ``cert_file``; the two go together.

    Raises:
        ValueError: Only one of ``cert_file`` and ``key_file`` was given.
        OSError: A file cannot be read.

    Example:
        >>> from autopipeline import Client, tls_credentials
        >>> credentials = tls_credentials(ca_file="ca.pem", cert_file="client.pem", key_file="client.key")
        >>> with Client("models.example.com:443", credentials=credentials, token="s3cret") as client:
        ...     client.inspect()
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("cert_file and key_file go together: give both or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file),
        private_key=_read(key_file),
        certificate_chain=_read(cert_file),
    )


def _read(path: str | os.PathLike[str] | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as file:
        return file.read()


def with_token(
    credentials: grpc.ChannelCredentials | None,
    metadata: tuple[tuple[str, str], ...],
    token: str | None,
) -> tuple[grpc.ChannelCredentials | None, tuple[tuple[str, str], ...]]:
    """The channel credentials and per-call metadata that send ``token`` with every call.

    Over TLS the token becomes call credentials, which gRPC attaches to every call and never
    sends in plain text. gRPC refuses call credentials on an insecure channel, so there it
    travels as plain metadata instead: readable by anyone on the path, fit only for a trusted
    network such as localhost or a pod's sidecar.
    """
    if token is None:
        return credentials, metadata
    if not _TOKEN.match(token):
        # The message does not quote the token: it is a secret.
        raise ValueError("token must be non-empty printable ASCII without whitespace")
    if any(key.lower() == "authorization" for key, _ in metadata):
        raise ValueError("give either token= or an 'authorization' metadata entry, not both")
    if credentials is None:
        return None, (*metadata, ("authorization", f"Bearer {token}"))
    call_credentials = grpc.access_token_call_credentials(token)
    return grpc.composite_channel_credentials(credentials, call_credentials), metadata
