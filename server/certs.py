"""Certificates for TLS and mutual TLS: a CA, a server certificate, client certificates.

`tributary certs` (tributary/_certs_cmd.py) is the front end; this module holds
the work, and also reads and checks the PEM files a server is started with.

Keys are ECDSA P-256 and certificates are signed with SHA-256: both are what
every TLS stack gRPC builds on (BoringSSL, OpenSSL) accepts, and P-256 keys are
small and fast to handshake with. The CA is constrained to sign end-entity
certificates only (pathlen 0); the server certificate carries serverAuth and
its names as SubjectAltNames (TLS clients ignore the CN); a client certificate
carries clientAuth, and its CN is the client id.

Files are PEM. Private keys are written with mode 0600, and every file is
written atomically (a temporary file in the same folder, then renamed or
linked into place), so a crash never leaves half a key behind, and an existing
file is replaced only when the caller asks for it.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_DAYS = 365
DEFAULT_CA_DAYS = 3650
DEFAULT_SERVER_NAMES = ("localhost",)
DEFAULT_IP_ADDRESSES = ("127.0.0.1",)
CLOCK_SKEW = datetime.timedelta(minutes=5)
"""Certificates start this long before they are made, for peers whose clocks run behind."""
"""Certificates start this long before they are made, so a peer whose clock
runs a little behind does not refuse a brand-new certificate."""
CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""Client ids become file names (clients/<id>.pem): no separators, no leading dot."""
_DNS_NAME = re.compile(r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


class CertificateError(ValueError):
    """A certificate request or a PEM file that cannot work; the message names it."""


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def private_key_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


# -- issuing ----------------------------------------------------------------


def create_ca(common_name: str = "Tributary CA", *, days: int = DEFAULT_CA_DAYS) -> Issued:
    """A self-signed CA that may sign end-entity certificates only."""
    _check_days(days)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public = key.public_key()
    builder = (
        _validity(x509.CertificateBuilder(), days)
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    return Issued(builder.sign(key, hashes.SHA256()), key)


def issue_server_certificate(
    ca: Issued,
    *,
    dns_names: Sequence[str] = DEFAULT_SERVER_NAMES,
    ip_addresses: Sequence[str] = DEFAULT_IP_ADDRESSES,
    days: int = DEFAULT_DAYS,
) -> Issued:
    """A serverAuth certificate for the given names; clients check the name
    they connect to against these SubjectAltNames."""
    if not dns_names and not ip_addresses:
        raise CertificateError("a server certificate needs at least one DNS name or IP address to be checked against")
    alt_names: list[x509.GeneralName] = [x509.DNSName(_check_dns_name(name)) for name in dns_names]
    alt_names += [x509.IPAddress(_parse_ip(address)) for address in ip_addresses]
    common_name = dns_names[0] if dns_names else ip_addresses[0]
    return _issue(ca, common_name, alt_names, ExtendedKeyUsageOID.SERVER_AUTH, days)


def issue_client_certificate(ca: Issued, client_id: str, *, days: int = DEFAULT_DAYS) -> Issued:
    """A clientAuth certificate whose CN is `client_id`."""
    check_client_id(client_id)
    return _issue(ca, client_id, [], ExtendedKeyUsageOID.CLIENT_AUTH, days)


def check_client_id(client_id: str) -> str:
    if not isinstance(client_id, str) or not CLIENT_ID.match(client_id):
        raise CertificateError(
            f"client id {client_id!r} must be 1-64 characters of letters, digits, '_', '.', '-', "
            "starting with a letter or digit (it names the certificate's files)"
        )
    return client_id


def _issue(ca: Issued, common_name: str, alt_names: list[x509.GeneralName], usage: x509.ObjectIdentifier, days: int) -> Issued:
    _check_days(days)
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    ca_public = ca.certificate.public_key()
    assert isinstance(ca_public, ec.EllipticCurvePublicKey)
    builder = (
        _validity(x509.CertificateBuilder(), days)
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(public)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False)
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return Issued(builder.sign(ca.private_key, hashes.SHA256()), key)


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        builder.serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _key_usage(*, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _check_days(days: int) -> None:
    if not (isinstance(days, int) and not isinstance(days, bool) and 1 <= days <= 100 * 365):
        raise CertificateError(f"days must be a whole number of days between 1 and {100 * 365}, got {days!r}")


def _check_dns_name(name: str) -> str:
    if not isinstance(name, str) or len(name) > 253 or not _DNS_NAME.match(name):
        raise CertificateError(f"server name {name!r} is not a DNS name (letters, digits, '-' in dot-separated labels)")
    return name


def _parse_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(address)
    except ValueError as error:
        raise CertificateError(f"{address!r} is not an IPv4 or IPv6 address") from error


# -- files ------------------------------------------------------------------


def write_file(path: Path, data: bytes, *, private: bool = False, overwrite: bool = False) -> None:
    """Write `data` to `path` atomically: readers see the old file or the whole
    new one. `private` files get mode 0600 from the moment they exist. Without
    `overwrite`, an existing file is left alone and FileExistsError raised."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; a certificate is public and may be read by anyone
        os.fchmod(descriptor, 0o600 if private else 0o644)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if overwrite:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)  # fails, atomically, if `path` exists
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def load_certificates(path: Path, what: str) -> list[x509.Certificate]:
    """Every certificate in a PEM file, or a CertificateError that says what is wrong with it."""
    data = _read(path, what)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as error:
        raise CertificateError(f"{what} {path} holds no PEM certificate (expected '-----BEGIN CERTIFICATE-----'): {error}") from error
    return certificates


def load_private_key(path: Path, what: str) -> PrivateKeyTypes:
    data = _read(path, what)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError as error:
        raise CertificateError(f"{what} {path} is encrypted; give an unencrypted PEM private key") from error
    except (ValueError, UnsupportedAlgorithm) as error:
        raise CertificateError(f"{what} {path} holds no PEM private key (expected '-----BEGIN PRIVATE KEY-----'): {error}") from error


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as error:
        raise CertificateError(f"{what} {path} does not exist") from error
    except IsADirectoryError as error:
        raise CertificateError(f"{what} {path} is a directory, not a PEM file") from error
    except OSError as error:
        raise CertificateError(f"cannot read {what} {path}: {error.strerror}") from error


def check_key_pair(certificate: x509.Certificate, key: PrivateKeyTypes, cert_path: Path, key_path: Path) -> None:
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
        raise CertificateError(f"private key {key_path} does not belong to the certificate {cert_path}")


def load_ca(cert_path: Path, key_path: Path) -> Issued:
    """A CA written by `write_layout` (or any EC CA), checked to be usable for signing."""
    certificates = load_certificates(cert_path, "CA certificate")
    key = load_private_key(key_path, "CA key")
    certificate = certificates[0]
    check_key_pair(certificate, key, cert_path, key_path)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"CA key {key_path} is not an elliptic-curve key; `tributary certs` signs with EC keys only")
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CertificateError(f"{cert_path} is not a CA certificate (no basicConstraints CA:TRUE)")
    return Issued(certificate, key)


def verify_issued_by(certificate: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether `ca` signed `certificate` (signature only; no dates or names)."""
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# -- the server's files -----------------------------------------------------


@dataclass(frozen=True)
class ServerTLSMaterial:
    """What grpc.ssl_server_credentials takes, read and checked."""

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None


def read_server_files(cert_file: Path, key_file: Path, client_ca_file: Path | None) -> ServerTLSMaterial:
    """Read the server's PEM files, failing with a message naming the file when
    one is missing, unreadable, not PEM, or the key does not fit the certificate."""
    chain = load_certificates(cert_file, "TLS certificate (tls.cert, --tls-cert)")
    key = load_private_key(key_file, "TLS key (tls.key, --tls-key)")
    check_key_pair(chain[0], key, cert_file, key_file)
    client_ca = None
    if client_ca_file is not None:
        load_certificates(client_ca_file, "client CA (tls.client_ca, --tls-client-ca)")
        client_ca = Path(client_ca_file).read_bytes()
    return ServerTLSMaterial(Path(cert_file).read_bytes(), Path(key_file).read_bytes(), client_ca)


# -- the layout `tributary certs` writes ------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where `tributary certs OUT_DIR` puts its files."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    def client_cert(self, client_id: str) -> Path:
        return self.root / "clients" / f"{client_id}.pem"

    def client_key(self, client_id: str) -> Path:
        return self.root / "clients" / f"{client_id}.key"


@dataclass(frozen=True)
class Written:
    path: Path
    what: str


def write_layout(
    out_dir: Path,
    *,
    server_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    client_ids: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> list[Written]:
    """Create or extend a certificate folder; returns what was written.

    A folder without a CA gets a new CA and a server certificate (for
    `server_names` and `ip_addresses`, default localhost and 127.0.0.1), plus
    a certificate for each client id. A folder that holds a CA keeps it: the
    requested client certificates are signed with it, and the server
    certificate is written only if it is missing or names were given.
    Existing files are replaced only with `force`; every conflict is found
    before anything is written. The CA itself is never replaced (its
    signatures are what every issued certificate rests on): to start over,
    use a new folder.
    """
    layout = Layout(Path(out_dir))
    _check_days(days)
    ids = [check_client_id(client_id) for client_id in client_ids]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise CertificateError(f"client id(s) given more than once: {', '.join(repeated)}")
    for name in server_names:
        _check_dns_name(name)
    for address in ip_addresses:
        _parse_ip(address)
    if layout.root.exists() and not layout.root.is_dir():
        raise CertificateError(f"{layout.root} exists and is not a directory")

    has_cert, has_key = layout.ca_cert.exists(), layout.ca_key.exists()
    if has_cert != has_key:
        present, missing = (layout.ca_cert, layout.ca_key) if has_cert else (layout.ca_key, layout.ca_cert)
        raise CertificateError(f"{present} exists but {missing} does not; a CA needs both (or neither, to make a new one)")
    new_ca = not has_cert
    names_given = bool(server_names or ip_addresses)
    server_exists = layout.server_cert.exists() or layout.server_key.exists()
    # A new CA invalidates any server certificate left in the folder, so it is re-issued;
    # otherwise the server's names are never changed behind the operator's back: --force
    # alone (to re-issue a client) leaves the server certificate as it is.
    write_server = new_ca or names_given or not server_exists

    targets: list[Path] = []
    if write_server:
        targets += [layout.server_cert, layout.server_key]
    for client_id in ids:
        targets += [layout.client_cert(client_id), layout.client_key(client_id)]
    if not new_ca and not targets:
        raise CertificateError(
            f"nothing to write: {layout.root} already holds a CA and a server certificate. "
            "Name clients to sign with --client ID, give --server-name/--ip with --force to re-issue the server certificate"
        )
    existing = [path for path in targets if path.exists()]
    if existing and not force:
        raise CertificateError(
            f"{', '.join(str(p) for p in existing)} already exist{'s' if len(existing) == 1 else ''}; "
            "pass --force to replace them (nothing was written)"
        )

    ca = create_ca(days=max(days, DEFAULT_CA_DAYS)) if new_ca else load_ca(layout.ca_cert, layout.ca_key)
    written: list[Written] = []

    def put(path: Path, issued: Issued, what: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        key_path = path.with_suffix(".key")
        write_file(key_path, issued.private_key_pem(), private=True, overwrite=force)
        write_file(path, issued.certificate_pem(), overwrite=force)
        written.extend([Written(path, what), Written(key_path, "its private key (mode 0600)")])

    layout.root.mkdir(parents=True, exist_ok=True)
    if new_ca:
        put(layout.ca_cert, ca, "CA certificate: give it to the server (--tls-client-ca) and to clients (--ca)")
    if write_server:
        names = tuple(server_names) or (() if ip_addresses else DEFAULT_SERVER_NAMES)
        ips = tuple(ip_addresses) or (() if server_names else DEFAULT_IP_ADDRESSES)
        server = issue_server_certificate(ca, dns_names=names, ip_addresses=ips, days=days)
        put(layout.server_cert, server, f"server certificate for {', '.join((*names, *ips))}")
    for client_id in ids:
        put(layout.client_cert(client_id), issue_client_certificate(ca, client_id, days=days), f"client certificate for {client_id!r}")
    return written
