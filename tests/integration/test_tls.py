"""TLS and mutual TLS over real gRPC on loopback: who gets in, who is refused, and
what the SDK says when it is refused."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from client_sdk import Client, ClientTLS, RetryPolicy, ServerUnavailable, TLSError
from server import TLSConfig
from server.app import RunningServer
from server.certs import Layout, write_layout
from tests.conftest import small_model

# Refusals are retried as UNAVAILABLE (a server that closes the connection looks
# like one that went away), so these tests keep the retry budget small.
QUICK = RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.01)
Serve = Callable[..., RunningServer]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    layout = Layout(tmp_path_factory.mktemp("certs"))
    write_layout(layout.root, client_ids=["alice"])
    return layout


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """A second, unrelated CA with a client of its own."""
    layout = Layout(tmp_path_factory.mktemp("other"))
    write_layout(layout.root, client_ids=["mallory"])
    return layout


def mutual(certs: Layout) -> TLSConfig:
    return TLSConfig(certs.server_cert, certs.server_key, client_ca_file=certs.ca_cert)


def alice(certs: Layout, **overrides: object) -> ClientTLS:
    settings: dict[str, object] = {"ca_file": certs.ca_cert, "cert_file": certs.client_cert("alice"), "key_file": certs.client_key("alice")}
    settings.update(overrides)
    return ClientTLS(**settings)  # type: ignore[arg-type]


def assert_unchanged(running: RunningServer) -> None:
    job = running.core.job("default")
    assert job.stats.updates_accepted == 0
    assert job.snapshot().version == 0


def push_one(client: Client) -> None:
    model = client.pull()
    ack = client.push(model.version, {name: np.ones_like(t) for name, t in model.tensors.items()})
    assert ack.staleness == 0


# -- getting in ------------------------------------------------------------------


def test_client_with_the_right_ca_and_certificate_pushes_and_pulls_over_mutual_tls(serve: Serve, certs: Layout) -> None:
    running = serve(models={"default": small_model()}, tls=mutual(certs))
    assert running.tls is True
    with Client(running.address, tls=alice(certs), client_id="alice") as client:
        pulled = client.pull()
        assert pulled.version == 0
        np.testing.assert_array_equal(pulled.tensors["layer.bias"], small_model()["layer.bias"])
        client.push(pulled.version, {name: np.ones_like(t) for name, t in pulled.tensors.items()}, num_samples=3)
        assert client.job_info().updates_accepted == 1
    assert running.core.job("default").stats.updates_per_client["alice"] == 1


def test_server_only_tls_needs_no_client_certificate(serve: Serve, certs: Layout) -> None:
    running = serve(tls=TLSConfig(certs.server_cert, certs.server_key))
    with Client(running.address, tls=ClientTLS(ca_file=certs.ca_cert)) as client:
        push_one(client)
    assert running.core.job("default").stats.updates_accepted == 1


def test_server_name_checks_the_certificate_against_another_name(serve: Serve, tmp_path: Path) -> None:
    """A certificate for a DNS name only: connecting by IP fails the name check,
    unless server_name says which name to expect."""
    layout = Layout(tmp_path)
    write_layout(tmp_path, server_names=["fl.internal"])
    running = serve(tls=TLSConfig(layout.server_cert, layout.server_key))
    with Client(running.address, tls=ClientTLS(ca_file=layout.ca_cert), retry=QUICK) as client, pytest.raises(TLSError) as caught:
        client.job_info()
    assert "does not name the host in the address" in str(caught.value)
    assert "server_name" in str(caught.value)
    with Client(running.address, tls=ClientTLS(ca_file=layout.ca_cert, server_name="fl.internal")) as client:
        push_one(client)


# -- refused by the server ------------------------------------------------------------


def test_client_without_a_certificate_is_refused(serve: Serve, certs: Layout) -> None:
    running = serve(tls=mutual(certs))
    with Client(running.address, tls=ClientTLS(ca_file=certs.ca_cert), retry=QUICK) as client, pytest.raises(ServerUnavailable) as caught:
        client.pull()
    message = str(caught.value)
    assert "requires client certificates" in message and "cert_file" in message
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert_unchanged(running)


def test_client_certificate_from_another_ca_is_refused(serve: Serve, certs: Layout, other: Layout) -> None:
    running = serve(tls=mutual(certs))
    impostor = alice(certs, cert_file=other.client_cert("mallory"), key_file=other.client_key("mallory"))
    with Client(running.address, tls=impostor, retry=QUICK) as client, pytest.raises(ServerUnavailable) as caught:
        push_one(client)
    assert "may have refused this client's certificate" in str(caught.value)
    assert_unchanged(running)
    with Client(running.address, tls=alice(certs)) as client:  # and the server keeps serving
        push_one(client)


def test_plaintext_client_cannot_talk_to_a_tls_server(serve: Serve, certs: Layout) -> None:
    running = serve(tls=mutual(certs))
    with Client(running.address, insecure=True, retry=QUICK) as client, pytest.raises(ServerUnavailable) as caught:
        client.job_info()
    assert "talks plaintext (insecure=True): if the server serves TLS" in str(caught.value)
    assert_unchanged(running)


# -- refused by the client --------------------------------------------------------------


def test_client_that_does_not_trust_the_servers_ca_refuses_it_at_once(serve: Serve, certs: Layout, other: Layout) -> None:
    running = serve(tls=mutual(certs))
    patient = RetryPolicy(max_attempts=8, initial_backoff_s=5.0)  # a handshake failure is not retried
    with Client(running.address, tls=alice(certs, ca_file=other.ca_cert), retry=patient) as client, pytest.raises(TLSError) as caught:
        client.pull()
    assert "the server's certificate is not signed by a CA this client trusts" in str(caught.value)
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
    assert isinstance(caught.value, ServerUnavailable)
    assert_unchanged(running)


def test_by_default_the_client_trusts_only_public_cas(serve: Serve, certs: Layout) -> None:
    """No tls and no insecure is TLS against gRPC's default roots: a private CA's
    server is not trusted until the client names that CA."""
    running = serve(tls=TLSConfig(certs.server_cert, certs.server_key))
    with Client(running.address, retry=QUICK) as client, pytest.raises(TLSError, match="not signed by a CA this client trusts"):
        client.job_info()


def test_tls_client_against_a_plaintext_server_says_so(serve: Serve, certs: Layout) -> None:
    running = serve()
    with Client(running.address, tls=ClientTLS(ca_file=certs.ca_cert), retry=QUICK) as client, pytest.raises(TLSError) as caught:
        client.job_info()
    assert "the server does not speak TLS" in str(caught.value)


# -- misuse and warnings ---------------------------------------------------------------


def test_tls_and_insecure_together_are_refused(certs: Layout) -> None:
    with pytest.raises(ValueError, match="give tls=ClientTLS\\(...\\) or insecure=True, not both"):
        Client("127.0.0.1:1", tls=ClientTLS(ca_file=certs.ca_cert), insecure=True)
    with pytest.raises(ValueError, match="give channel, or tls/insecure, not both"):
        Client("127.0.0.1:1", insecure=True, channel=grpc.insecure_channel("127.0.0.1:1"))


def test_bad_client_tls_files_are_named(certs: Layout, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="got cert_file without key_file"):
        ClientTLS(cert_file=certs.client_cert("alice"))
    with pytest.raises(ValueError, match="got key_file without cert_file"):
        ClientTLS(key_file=certs.client_key("alice"))
    with pytest.raises(ValueError, match="ClientTLS ca_file .*nope.pem does not exist"):
        Client("127.0.0.1:1", tls=ClientTLS(ca_file=tmp_path / "nope.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ValueError, match="ClientTLS ca_file .*junk.pem holds no PEM certificate"):
        Client("127.0.0.1:1", tls=ClientTLS(ca_file=junk))
    with pytest.raises(ValueError, match="ClientTLS key_file .*junk.pem holds no PEM private key"):
        Client("127.0.0.1:1", tls=alice(certs, key_file=junk))
    with pytest.raises(ValueError, match="key_file .*server.key does not belong to cert_file .*alice.pem"):
        Client("127.0.0.1:1", tls=alice(certs, key_file=certs.server_key))
    with pytest.raises(ValueError, match="server_name must be a non-empty host name"):
        ClientTLS(server_name="")


def test_plaintext_is_logged_as_a_warning_on_both_sides(serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        running = serve()
        with Client(running.address, insecure=True) as client:
            push_one(client)
    server_warnings = [r for r in caplog.records if r.name == "tributary.server" and r.levelno == logging.WARNING]
    client_warnings = [r for r in caplog.records if r.name == "tributary.client" and r.levelno == logging.WARNING]
    assert len(server_warnings) == 1 and f"serving plaintext on {running.address} " in server_warnings[0].getMessage()
    assert len(client_warnings) == 1 and f"talking plaintext to {running.address}" in client_warnings[0].getMessage()
    assert running.tls is False


def test_tls_logs_no_plaintext_warning(serve: Serve, certs: Layout, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        running = serve(tls=mutual(certs))
        with Client(running.address, tls=alice(certs)) as client:
            push_one(client)
    assert not [r for r in caplog.records if r.name.startswith("tributary.")]
