"""server.certs: what the CA, server and client certificates hold, how files are written,
and how `write_layout` creates and extends a certificate folder."""

from __future__ import annotations

import datetime
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.certs import (
    CLOCK_SKEW,
    CertificateError,
    Layout,
    create_ca,
    issue_client_certificate,
    issue_server_certificate,
    load_ca,
    read_server_files,
    verify_issued_by,
    write_file,
    write_layout,
)


@pytest.fixture(scope="module")
def ca():  # type: ignore[no-untyped-def]
    return create_ca()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def extension(certificate: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType:
    return certificate.extensions.get_extension_for_class(kind).value


# -- what the certificates hold ------------------------------------------------


def test_ca_is_a_self_signed_p256_ca_for_end_entities_only(ca) -> None:  # type: ignore[no-untyped-def]
    certificate = ca.certificate
    assert isinstance(ca.private_key.curve, ec.SECP256R1)
    assert isinstance(certificate.signature_hash_algorithm, hashes.SHA256)
    constraints = extension(certificate, x509.BasicConstraints)
    assert constraints.ca is True and constraints.path_length == 0
    usage = extension(certificate, x509.KeyUsage)
    assert usage.key_cert_sign and usage.crl_sign
    assert certificate.issuer == certificate.subject
    assert verify_issued_by(certificate, certificate)


def test_server_certificate_names_localhost_and_loopback_by_default(ca) -> None:  # type: ignore[no-untyped-def]
    issued = issue_server_certificate(ca)
    certificate = issued.certificate
    names = extension(certificate, x509.SubjectAlternativeName)
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert extension(certificate, x509.ExtendedKeyUsage) == x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    assert extension(certificate, x509.BasicConstraints).ca is False
    assert isinstance(issued.private_key.curve, ec.SECP256R1)
    assert isinstance(certificate.signature_hash_algorithm, hashes.SHA256)
    assert verify_issued_by(certificate, ca.certificate)


def test_server_certificate_takes_dns_names_and_ipv4_and_ipv6_addresses(ca) -> None:  # type: ignore[no-untyped-def]
    certificate = issue_server_certificate(ca, dns_names=["fl.example.com", "*.edge.example.com"], ip_addresses=["10.0.0.7", "::1"]).certificate
    names = extension(certificate, x509.SubjectAlternativeName)
    assert names.get_values_for_type(x509.DNSName) == ["fl.example.com", "*.edge.example.com"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7"), ipaddress.ip_address("::1")]
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "fl.example.com"


def test_client_certificate_carries_its_id_and_client_auth(ca) -> None:  # type: ignore[no-untyped-def]
    certificate = issue_client_certificate(ca, "phone-17").certificate
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "phone-17"
    assert extension(certificate, x509.ExtendedKeyUsage) == x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    assert verify_issued_by(certificate, ca.certificate)
    assert not verify_issued_by(certificate, create_ca().certificate)


def test_validity_is_the_days_asked_for(ca) -> None:  # type: ignore[no-untyped-def]
    certificate = issue_client_certificate(ca, "c", days=30).certificate
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert lifetime == datetime.timedelta(days=30) + CLOCK_SKEW  # valid from CLOCK_SKEW before it was made


@pytest.mark.parametrize("client_id", ["", "../evil", "a/b", ".hidden", "-flag", "x" * 65, "white space", 7])
def test_bad_client_ids_are_refused(ca, client_id) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CertificateError, match="client id .* must be 1-64 characters"):
        issue_client_certificate(ca, client_id)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dns_names": ["bad name"]}, "server name 'bad name' is not a DNS name"),
        ({"dns_names": ["-lead.example"]}, "is not a DNS name"),
        ({"ip_addresses": ["300.1.1.1"]}, "'300.1.1.1' is not an IPv4 or IPv6 address"),
        ({"ip_addresses": ["localhost"]}, "'localhost' is not an IPv4 or IPv6 address"),
        ({"dns_names": [], "ip_addresses": []}, "at least one DNS name or IP address"),
        ({"days": 0}, "days must be a whole number of days"),
        ({"days": True}, "days must be a whole number of days"),
        ({"days": 1.5}, "days must be a whole number of days"),
    ],
)
def test_bad_server_certificate_requests_are_refused(ca, kwargs, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CertificateError, match=message):
        issue_server_certificate(ca, **kwargs)


# -- writing files ------------------------------------------------------------


def test_private_files_are_0600_and_public_ones_0644(tmp_path: Path) -> None:
    write_file(tmp_path / "k.key", b"secret", private=True)
    write_file(tmp_path / "c.pem", b"public")
    assert mode(tmp_path / "k.key") == 0o600
    assert mode(tmp_path / "c.pem") == 0o644
    assert (tmp_path / "k.key").read_bytes() == b"secret"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pem", "k.key"]  # no temporary files left


def test_existing_files_are_replaced_only_when_asked(tmp_path: Path) -> None:
    target = tmp_path / "k.key"
    write_file(target, b"first", private=True)
    with pytest.raises(FileExistsError):
        write_file(target, b"second", private=True)
    assert target.read_bytes() == b"first"
    write_file(target, b"second", private=True, overwrite=True)
    assert target.read_bytes() == b"second"
    assert mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["k.key"]


# -- the folder `tributary certs` writes ---------------------------------------


def test_layout_holds_a_ca_a_server_and_clients_that_belong_together(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "certs")
    written = write_layout(layout.root, client_ids=["alice", "bob.laptop"])
    paths = {item.path for item in written}
    assert paths == {
        layout.ca_cert, layout.ca_key, layout.server_cert, layout.server_key,
        layout.client_cert("alice"), layout.client_key("alice"),
        layout.client_cert("bob.laptop"), layout.client_key("bob.laptop"),
    }  # fmt: skip
    for path in paths:
        assert mode(path) == (0o600 if path.suffix == ".key" else 0o644), path
    ca = load_ca(layout.ca_cert, layout.ca_key)
    for path in (layout.server_cert, layout.client_cert("alice"), layout.client_cert("bob.laptop")):
        assert verify_issued_by(x509.load_pem_x509_certificate(path.read_bytes()), ca.certificate)
    material = read_server_files(layout.server_cert, layout.server_key, layout.ca_cert)
    assert material.client_ca == layout.ca_cert.read_bytes()


def test_running_again_with_clients_signs_them_with_the_same_ca_and_touches_nothing_else(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    write_layout(tmp_path, client_ids=["alice"])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    written = write_layout(tmp_path, client_ids=["carol"])
    assert {item.path for item in written} == {layout.client_cert("carol"), layout.client_key("carol")}
    assert {p: p.read_bytes() for p in before} == before
    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    assert verify_issued_by(x509.load_pem_x509_certificate(layout.client_cert("carol").read_bytes()), ca)


def test_nothing_to_write_is_refused(tmp_path: Path) -> None:
    write_layout(tmp_path)
    with pytest.raises(CertificateError, match="nothing to write: .* already holds a CA and a server certificate"):
        write_layout(tmp_path)


def test_existing_client_files_are_not_overwritten_and_nothing_is_written(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    write_layout(tmp_path, client_ids=["alice"])
    alice = layout.client_cert("alice").read_bytes()
    with pytest.raises(CertificateError, match="alice.pem, .*alice.key already exist; pass --force"):
        write_layout(tmp_path, client_ids=["dave", "alice"])
    assert layout.client_cert("alice").read_bytes() == alice
    assert not layout.client_cert("dave").exists()  # every conflict is found before anything is written


def test_force_reissues_but_keeps_the_ca(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    write_layout(tmp_path, client_ids=["alice"])
    ca_key, server = layout.ca_key.read_bytes(), layout.server_cert.read_bytes()
    alice = layout.client_key("alice").read_bytes()
    write_layout(tmp_path, client_ids=["alice"], server_names=["fl.example.com"], force=True)
    assert layout.ca_key.read_bytes() == ca_key
    assert layout.server_cert.read_bytes() != server
    assert layout.client_key("alice").read_bytes() != alice
    assert mode(layout.client_key("alice")) == 0o600
    certificate = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    assert extension(certificate, x509.SubjectAlternativeName).get_values_for_type(x509.DNSName) == ["fl.example.com"]
    assert extension(certificate, x509.SubjectAlternativeName).get_values_for_type(x509.IPAddress) == []


def test_new_server_names_for_an_existing_server_need_force(tmp_path: Path) -> None:
    write_layout(tmp_path)
    with pytest.raises(CertificateError, match="server.pem, .*server.key already exist; pass --force"):
        write_layout(tmp_path, ip_addresses=["10.0.0.9"])


def test_a_new_ca_does_not_leave_an_old_server_certificate_behind(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    write_layout(tmp_path)
    layout.ca_cert.unlink()
    layout.ca_key.unlink()
    with pytest.raises(CertificateError, match="server.pem.* already exist"):
        write_layout(tmp_path)
    write_layout(tmp_path, force=True)
    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    assert verify_issued_by(x509.load_pem_x509_certificate(layout.server_cert.read_bytes()), ca)


@pytest.mark.parametrize("present", ["ca.pem", "ca.key"])
def test_half_a_ca_is_refused(tmp_path: Path, present: str) -> None:
    write_layout(tmp_path)
    (tmp_path / ("ca.key" if present == "ca.pem" else "ca.pem")).unlink()
    with pytest.raises(CertificateError, match=f"{present} exists but .* does not; a CA needs both"):
        write_layout(tmp_path, client_ids=["a"])


def test_bad_layout_requests_write_nothing(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="given more than once: a"):
        write_layout(tmp_path / "x", client_ids=["a", "b", "a"])
    with pytest.raises(CertificateError, match="is not an IPv4 or IPv6 address"):
        write_layout(tmp_path / "x", ip_addresses=["nope"])
    with pytest.raises(CertificateError, match="days must be"):
        write_layout(tmp_path / "x", days=-1)
    assert not (tmp_path / "x").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(CertificateError, match="exists and is not a directory"):
        write_layout(tmp_path / "file")


# -- reading a server's files --------------------------------------------------


@pytest.fixture
def folder(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path)
    write_layout(tmp_path, client_ids=["alice"])
    return layout


def test_missing_files_are_named(folder: Layout) -> None:
    with pytest.raises(CertificateError, match=r"TLS certificate \(tls.cert, --tls-cert\) .*nope.pem does not exist"):
        read_server_files(folder.root / "nope.pem", folder.server_key, None)
    with pytest.raises(CertificateError, match=r"TLS key \(tls.key, --tls-key\) .*nope.key does not exist"):
        read_server_files(folder.server_cert, folder.root / "nope.key", None)
    with pytest.raises(CertificateError, match=r"client CA .*missing-ca.pem does not exist"):
        read_server_files(folder.server_cert, folder.server_key, folder.root / "missing-ca.pem")
    with pytest.raises(CertificateError, match="is a directory, not a PEM file"):
        read_server_files(folder.root / "clients", folder.server_key, None)


def test_files_that_are_not_pem_are_named(folder: Layout) -> None:
    junk = folder.root / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(CertificateError, match="junk.pem holds no PEM certificate"):
        read_server_files(junk, folder.server_key, None)
    with pytest.raises(CertificateError, match="junk.pem holds no PEM private key"):
        read_server_files(folder.server_cert, junk, None)
    with pytest.raises(CertificateError, match="client CA .*junk.pem holds no PEM certificate"):
        read_server_files(folder.server_cert, folder.server_key, junk)
    # a key where the certificate belongs
    with pytest.raises(CertificateError, match="server.key holds no PEM certificate"):
        read_server_files(folder.server_key, folder.server_key, None)


def test_a_key_of_another_certificate_is_refused(folder: Layout) -> None:
    with pytest.raises(CertificateError, match="private key .*alice.key does not belong to the certificate .*server.pem"):
        read_server_files(folder.server_cert, folder.client_key("alice"), None)


def test_an_encrypted_key_is_refused_with_the_reason(folder: Layout) -> None:
    key = serialization.load_pem_private_key(folder.server_key.read_bytes(), None)
    encrypted = folder.root / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw"))
    )
    with pytest.raises(CertificateError, match="encrypted.key is encrypted"):
        read_server_files(folder.server_cert, encrypted, None)


def test_load_ca_refuses_a_certificate_that_is_not_a_ca(folder: Layout) -> None:
    with pytest.raises(CertificateError, match="server.pem is not a CA certificate"):
        load_ca(folder.server_cert, folder.server_key)


def test_force_to_reissue_a_client_leaves_the_server_certificate_alone(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    write_layout(tmp_path, server_names=["fl.example.com"], client_ids=["alice"])
    server = layout.server_cert.read_bytes()
    written = write_layout(tmp_path, client_ids=["alice"], force=True)
    assert {item.path for item in written} == {layout.client_cert("alice"), layout.client_key("alice")}
    assert layout.server_cert.read_bytes() == server
    with pytest.raises(CertificateError, match="nothing to write"):
        write_layout(tmp_path, force=True)
