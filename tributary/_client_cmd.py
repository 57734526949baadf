"""`tributary client`: train a built-in task against a server."""

from __future__ import annotations

import signal
from typing import Any

import click


def run_client(options: dict[str, Any]) -> None:
    if options["updates"] is None and options["duration"] is None:
        raise click.UsageError("give --updates N or --duration SECONDS")
    if options["updates"] is not None and options["updates"] < 1:
        raise click.BadParameter(f"must be >= 1, got {options['updates']}", param_hint="--updates")
    if options["duration"] is not None and options["duration"] <= 0:
        raise click.BadParameter(f"must be > 0, got {options['duration']}", param_hint="--duration")
    if options["num_shards"] < 1:
        raise click.BadParameter(f"must be >= 1, got {options['num_shards']}", param_hint="--num-shards")
    if options["round_seconds"] < 0:
        raise click.BadParameter(f"must be >= 0, got {options['round_seconds']}", param_hint="--round-seconds")
    if not 0 <= options["shard"] < options["num_shards"]:
        raise click.BadParameter(f"shard {options['shard']} is not in [0, {options['num_shards']})", param_hint="--shard")
    for name in ("epochs", "batch_size"):
        if options[name] < 1:
            raise click.BadParameter(f"must be >= 1, got {options[name]}", param_hint="--" + name.replace("_", "-"))
    if options["federated_eval"] and not 0 < options["eval_fraction"] < 1:
        raise click.BadParameter(f"must be a fraction in (0, 1), got {options['eval_fraction']}", param_hint="--eval-fraction")
    if options["federated_eval"] and options["eval_every"] < 1:
        raise click.BadParameter(f"must be >= 1, got {options['eval_every']}", param_hint="--eval-every")
    if options["lr"] <= 0:
        raise click.BadParameter(f"must be > 0, got {options['lr']}", param_hint="--lr")
    tls_flags = [flag for flag, key in (("--ca", "ca_file"), ("--cert", "cert_file"), ("--key", "key_file")) if options[key] is not None]
    if options["insecure"] and tls_flags:
        raise click.UsageError(f"--insecure talks plaintext; drop it to use {', '.join(tls_flags)}, or drop {', '.join(tls_flags)}")
    if (options["cert_file"] is None) != (options["key_file"] is None):
        raise click.UsageError("a client certificate needs both --cert FILE and --key FILE")
    if options["quantize_bits"] is not None and options["quantize_bits"] not in (4, 8):
        raise click.BadParameter(f"must be 8 or 4, got {options['quantize_bits']}", param_hint="--quantize-bits")
    if options["top_k"] is not None and not 0 < options["top_k"] <= 1:
        raise click.BadParameter(f"must be a fraction in (0, 1], got {options['top_k']}", param_hint="--top-k")
    token = None
    if options["token_file"] is not None:
        if options["client_id"] is None:
            raise click.UsageError("--token-file needs --client-id: the id the token was enrolled for")
        try:
            token = options["token_file"].read_text().strip()
        except OSError as error:
            raise click.BadParameter(f"cannot read {options['token_file']}: {error.strerror}", param_hint="--token-file") from error

    import torch

    from client_sdk import Client, ClientTLS, Compression, TributaryError, pick_device
    from edge.tasks import build_model, dirichlet_shards, hold_out, load_digits_split, make_evaluate_fn, make_train_fn

    try:
        device = pick_device(options["device"])
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--device") from error

    torch.set_num_threads(1)  # many clients share few cores; one thread each avoids oversubscription
    signal.signal(signal.SIGTERM, _raise_interrupt)
    data = load_digits_split(options["seed"])
    try:
        shard = dirichlet_shards(data.y_train, options["num_shards"], options["dirichlet_alpha"], options["seed"])[options["shard"]]
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    evaluate = None
    if options["federated_eval"]:
        try:
            kept, held = hold_out(len(shard), options["eval_fraction"], options["seed"] * 1000 + options["shard"])
        except ValueError as error:
            raise click.UsageError(f"--federated-eval: shard {options['shard']}: {error}") from error
        evaluate = make_evaluate_fn(data.x_train[shard[held]], data.y_train[shard[held]])
        shard = shard[kept]
    train = make_train_fn(
        data.x_train[shard],
        data.y_train[shard],
        epochs=options["epochs"],
        batch_size=options["batch_size"],
        lr=options["lr"],
        seed=options["seed"] * 1000 + options["shard"],
        round_seconds=options["round_seconds"],
    )
    model = build_model(options["seed"])
    tls = ClientTLS(ca_file=options["ca_file"], cert_file=options["cert_file"], key_file=options["key_file"]) if tls_flags else None
    try:
        client = Client(options["address"], job=options["job"], client_id=options["client_id"], tls=tls, insecure=options["insecure"], token=token)
    except ValueError as error:  # a TLS file or a token that cannot work, named
        raise click.ClickException(str(error)) from error
    compression = None
    if options["quantize_bits"] is not None or options["top_k"] is not None:
        compression = Compression(quantize_bits=options["quantize_bits"], top_k=options["top_k"], seed=options["seed"] * 1000 + options["shard"])
    from rich.console import Console

    from tributary._progress import FitBar

    bar = FitBar(Console(stderr=True), options["updates"], options["duration"])
    try:
        with client, bar.shown():
            summary = client.fit(
                model, train, updates=options["updates"], duration_s=options["duration"], device=str(device), compression=compression,
                progress=bar, evaluate_fn=evaluate, evaluate_every=options["eval_every"],
            )  # fmt: skip
    except KeyboardInterrupt:
        return
    except TributaryError as error:
        raise click.ClickException(str(error)) from error
    except ValueError as error:  # compression the job cannot take (e.g. top-k under secure aggregation)
        raise click.UsageError(str(error)) from error
    click.echo(
        f"client {client.client_id}: {summary.updates_pushed} updates accepted, {summary.updates_refused} refused, "
        f"last version {summary.last_version}, {summary.seconds:.1f}s"
        + (f", {summary.evaluations_reported} evaluations reported" if evaluate is not None else "")
    )


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt
