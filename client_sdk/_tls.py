"""How a Client reaches its server: TLS (the default), mutual TLS, or plaintext
when the app asks for it.

The PEM files are read and checked when the Client is made, so a wrong path or
a key that does not belong to its certificate fails at once, naming the file,
rather than later as an opaque handshake failure.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

logger = logging.getLogger("tributary.client")
PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class ClientTLS:
    """TLS settings for a Client.

    ca_file      PEM CA certificate(s) the server's certificate must be signed by;
                 None: gRPC's default roots (its bundled public CAs, or the file
                 named by GRPC_DEFAULT_SSL_ROOTS_FILE_PATH)
    cert_file,   this client's certificate and private key, for servers that
    key_file     require client certificates (mutual TLS); both or neither
    server_name  the name to check the server's certificate against, when it is
                 not the host in the address (e.g. connecting by IP to a
                 certificate that names only a DNS name)
    """

    ca_file: PathLike | None = None
    cert_file: PathLike | None = None
    key_file: PathLike | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            given, missing = ("cert_file", "key_file") if self.cert_file is not None else ("key_file", "cert_file")
            raise ValueError(f"ClientTLS got {given} without {missing}: a client certificate needs both the certificate and its key")
        if self.server_name is not None and (not isinstance(self.server_name, str) or not self.server_name):
            raise ValueError(f"server_name must be a non-empty host name, got {self.server_name!r}")

    @property
    def mutual(self) -> bool:
        return self.cert_file is not None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Read and check the files; ValueError naming the file when one cannot work."""
        root = None
        if self.ca_file is not None:
            root = _read(self.ca_file, "ca_file")
            _certificates(root, self.ca_file, "ca_file")
        key = chain = None
        if self.cert_file is not None and self.key_file is not None:
            chain = _read(self.cert_file, "cert_file")
            key = _read(self.key_file, "key_file")
            _check_pair(_certificates(chain, self.cert_file, "cert_file")[0], key, self.cert_file, self.key_file)
        return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


RECONNECT_OPTIONS = (
    # gRPC's own reconnect backoff grows to 120 s by default: a client that
    # lost its server (restart, crash) would sit out minutes after the server
    # is back. Our retries pace the calls; the channel should just reconnect.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


def channel_for(address: str, tls: ClientTLS | None, insecure: bool, channel: grpc.Channel | None) -> grpc.Channel:
    """`channel` as it is (it carries its own credentials), else a new one; see `open_channel`."""
    if channel is None:
        return open_channel(address, tls, insecure)
    if tls is not None or insecure:
        raise ValueError("a channel of your own carries its own credentials: give channel, or tls/insecure, not both")
    return channel


def open_channel(address: str, tls: ClientTLS | None, insecure: bool) -> grpc.Channel:
    """A channel to `address`: TLS unless `insecure`; see Client."""
    if tls is not None and insecure:
        raise ValueError("give tls=ClientTLS(...) or insecure=True, not both: insecure means no TLS at all")
    if not isinstance(insecure, bool):
        raise ValueError(f"insecure must be True or False, got {insecure!r}")
    if insecure:
        logger.warning(
            "talking plaintext to %s (insecure=True): models and updates travel unencrypted and the server "
            "is not authenticated; pass tls=ClientTLS(ca_file=...) outside a trusted network",
            address,
        )
        return grpc.insecure_channel(address, options=RECONNECT_OPTIONS)
    tls = tls if tls is not None else ClientTLS()
    if not isinstance(tls, ClientTLS):
        raise ValueError(f"tls must be a ClientTLS, got {tls!r}")
    return grpc.secure_channel(address, tls.channel_credentials(), options=[*RECONNECT_OPTIONS, *tls.channel_options()])


def _read(path: PathLike, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"ClientTLS {field} {os.fspath(path)} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"ClientTLS {field} {os.fspath(path)} is a directory, not a PEM file") from None
    except OSError as error:
        raise ValueError(f"cannot read ClientTLS {field} {os.fspath(path)}: {error.strerror}") from None


def _certificates(data: bytes, path: PathLike, field: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"ClientTLS {field} {os.fspath(path)} holds no PEM certificate ('-----BEGIN CERTIFICATE-----')") from None


def _check_pair(certificate: x509.Certificate, key_pem: bytes, cert_path: PathLike, key_path: PathLike) -> None:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ValueError(f"ClientTLS key_file {os.fspath(key_path)} is encrypted; give an unencrypted PEM key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"ClientTLS key_file {os.fspath(key_path)} holds no PEM private key ('-----BEGIN PRIVATE KEY-----')") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
        raise ValueError(f"ClientTLS key_file {os.fspath(key_path)} does not belong to cert_file {os.fspath(cert_path)}")
