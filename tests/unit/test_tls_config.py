"""ServerConfig's transport: TLS, mutual TLS, or plaintext only when asked for."""

from __future__ import annotations

from pathlib import Path

import pytest

from server import ConfigError, ServerConfig, TLSConfig
from server.certs import Layout, write_layout


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    layout = Layout(tmp_path_factory.mktemp("certs"))
    write_layout(layout.root, client_ids=["alice"])
    return layout


def test_neither_tls_nor_insecure_is_refused_with_the_way_out() -> None:
    with pytest.raises(ConfigError) as caught:
        ServerConfig()
    message = str(caught.value)
    assert "--tls-cert FILE --tls-key FILE" in message
    assert "--insecure" in message and "insecure = true" in message and "[tls]" in message
    with pytest.raises(ConfigError, match="--tls-cert"):
        ServerConfig.from_mapping({})
    with pytest.raises(ConfigError, match="--tls-cert"):
        ServerConfig.from_mapping({"insecure": False})


def test_tls_and_insecure_together_are_refused(certs: Layout) -> None:
    with pytest.raises(ConfigError, match="TLS files and insecure exclude each other"):
        ServerConfig(tls=TLSConfig(certs.server_cert, certs.server_key), insecure=True)
    with pytest.raises(ConfigError, match="exclude each other"):
        ServerConfig.from_mapping({"insecure": True, "tls": {"cert": str(certs.server_cert), "key": str(certs.server_key)}})


@pytest.mark.parametrize("value", ["yes", 1, "true"])
def test_insecure_must_be_a_boolean(value: object) -> None:
    with pytest.raises(ConfigError, match="insecure must be true or false"):
        ServerConfig.from_mapping({"insecure": value})


def test_insecure_alone_is_plaintext() -> None:
    config = ServerConfig.from_mapping({"insecure": True})
    assert config.insecure is True and config.tls is None


def test_tls_from_mapping(certs: Layout) -> None:
    config = ServerConfig.from_mapping({"tls": {"cert": str(certs.server_cert), "key": str(certs.server_key)}})
    assert config.tls == TLSConfig(certs.server_cert, certs.server_key, None)
    assert config.tls is not None and not config.tls.mutual and config.insecure is False
    mutual = ServerConfig.from_mapping({"tls": {"cert": certs.server_cert, "key": certs.server_key, "client_ca": certs.ca_cert}})
    assert mutual.tls is not None and mutual.tls.mutual and mutual.tls.client_ca_file == certs.ca_cert


def test_tls_files_are_read_when_the_config_is_built(certs: Layout) -> None:
    material = TLSConfig(certs.server_cert, certs.server_key, certs.ca_cert).read()
    assert material.certificate_chain == certs.server_cert.read_bytes()
    assert material.private_key == certs.server_key.read_bytes()
    assert material.client_ca == certs.ca_cert.read_bytes()


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        ({"cert": "server.pem"}, "tls.key is missing: give --tls-cert FILE and --tls-key FILE"),
        ({"key": "server.key"}, "tls.cert is missing"),
        ({"client_ca": "ca.pem"}, "tls.cert is missing"),
        ({"cert": "server.pem", "key": "server.key", "ca": "ca.pem"}, "unknown tls setting\\(s\\): ca \\(known: cert, key, client_ca\\)"),
        ({"cert": 3, "key": "server.key"}, "tls.cert must be a file path, got 3"),
        ({"cert": "", "key": "server.key"}, "tls.cert must be a file path"),
    ],
)
def test_bad_tls_tables_are_named(tls: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig.from_mapping({"tls": tls})


def test_tls_must_be_a_table() -> None:
    with pytest.raises(ConfigError, match="tls must be a table with cert, key and client_ca"):
        ServerConfig.from_mapping({"tls": "server.pem"})


def test_unusable_tls_files_stop_the_config(certs: Layout, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--tls-cert.*missing.pem does not exist"):
        TLSConfig(tmp_path / "missing.pem", certs.server_key)
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="junk.pem holds no PEM certificate"):
        TLSConfig(junk, certs.server_key)
    with pytest.raises(ConfigError, match="alice.key does not belong to the certificate"):
        TLSConfig(certs.server_cert, certs.client_key("alice"))
    with pytest.raises(ConfigError, match="client CA .*junk.pem holds no PEM certificate"):
        TLSConfig(certs.server_cert, certs.server_key, junk)
    with pytest.raises(ConfigError, match="tls cert_file must be a path"):
        TLSConfig("server.pem", certs.server_key)  # type: ignore[arg-type]


def test_toml_tls_paths_are_relative_to_the_file(certs: Layout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_dir = certs.root  # the TOML sits next to the certificates and names them relatively
    path = config_dir / "server.toml"
    path.write_text('address = "127.0.0.1:0"\n[tls]\ncert = "server.pem"\nkey = "server.key"\nclient_ca = "ca.pem"\n')
    monkeypatch.chdir(tmp_path)
    config = ServerConfig.from_toml(path)
    assert config.tls == TLSConfig(certs.server_cert.resolve(), certs.server_key.resolve(), certs.ca_cert.resolve())


def test_toml_insecure_key(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text("insecure = true\n")
    assert ServerConfig.from_toml(path).insecure is True
    path.write_text('address = "127.0.0.1:0"\n')
    with pytest.raises(ConfigError, match="--insecure \\(TOML: insecure = true\\)"):
        ServerConfig.from_toml(path)


def test_toml_overrides_replace_the_files_transport(certs: Layout, tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text('insecure = true\naddress = "127.0.0.1:1"\n')
    tls = {"cert": certs.server_cert, "key": certs.server_key, "client_ca": None}
    config = ServerConfig.from_toml(path, {"tls": tls, "insecure": None, "address": "127.0.0.1:2"})
    assert config.tls == TLSConfig(certs.server_cert, certs.server_key) and config.insecure is False
    assert config.address == "127.0.0.1:2"
