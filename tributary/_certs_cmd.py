"""`tributary certs`: a CA, a server certificate and client certificates, as PEM files."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import click


def run_certs(options: dict[str, Any]) -> None:
    from server.certs import CertificateError, Layout, write_layout

    out_dir: Path = options["out_dir"]
    try:
        written = write_layout(
            out_dir,
            server_names=options["server_names"],
            ip_addresses=options["ip_addresses"],
            client_ids=options["client_ids"],
            days=options["days"],
            force=options["force"],
        )
    except CertificateError as error:
        raise click.ClickException(str(error)) from error
    except OSError as error:
        raise click.ClickException(f"cannot write into {out_dir}: {error.strerror} ({error.filename})") from error
    width = max(len(str(item.path)) for item in written)
    for item in written:
        click.echo(f"wrote {str(item.path):<{width}}  {item.what}")
    layout = Layout(out_dir)
    quoted = {name: shlex.quote(str(path)) for name, path in (("ca", layout.ca_cert), ("cert", layout.server_cert), ("key", layout.server_key))}
    client_id = options["client_ids"][0] if options["client_ids"] else "ID"
    click.echo(
        "\nserve with mutual TLS:\n"
        f"  tributary server --tls-cert {quoted['cert']} --tls-key {quoted['key']} --tls-client-ca {quoted['ca']} ...\n"
        "join as a client:\n"
        f"  tributary client --ca {quoted['ca']} --cert {shlex.quote(str(layout.client_cert(client_id)))} "
        f"--key {shlex.quote(str(layout.client_key(client_id)))} ..."
    )
