"""`tributary server`: build a ServerConfig from flags or TOML, serve until a signal."""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from server import ConfigError, ServerConfig
from server.config import SERVER_KEYS
from server.app import load_initial_models, running_server

_JOB_FLAGS = (
    "job_id", "initial_model", "task", "strategy", "alpha", "buffer_size", "server_lr", "weight_by_samples",
    "normalizer", "clients_per_round", "staleness", "staleness_a", "staleness_b", "max_staleness", "max_update_bytes",
    "keep_versions_for_resume",
    "secure_aggregation", "cohort_size", "min_survivors", "neighbours", "ring_bits", "clip_bound",
    "forming_timeout_s", "phase_timeout_s", "upload_timeout_s",
    "max_concurrent_trainers", "prefer_charging", "min_battery", "slot_lease_s",
    "quantize_bits", "value_bound", "accept_compression", "evaluator", "evaluate_every",
)

DIGITS_EVALUATOR = "edge.tasks:digits_evaluator"
"""`--task digits` evaluates each version on the digits' held-out split unless --evaluator says otherwise."""

_SERVER_FLAGS = tuple(sorted(SERVER_KEYS - {"insecure"}))  # --insecure goes with the TLS flags
"""Server-wide flags: they also apply with --config, overriding the file."""

_FLAG_NAMES = {"job_id": "--job", "forming_timeout_s": "--forming-timeout", "phase_timeout_s": "--phase-timeout", "upload_timeout_s": "--upload-timeout", "slot_lease_s": "--slot-lease", "resume_expiry_s": "--resume-expiry"}


def _flag(option: str) -> str:
    """The command-line spelling of an option's parameter name."""
    return _FLAG_NAMES.get(option, "--" + option.replace("_", "-"))


def _transport(options: dict[str, Any]) -> dict[str, Any]:
    """The --tls-* and --insecure flags as ServerConfig.from_mapping keys ({} when none is given)."""
    tls = {key: options.get(flag) for key, flag in (("cert", "tls_cert"), ("key", "tls_key"), ("client_ca", "tls_client_ca"))}
    transport: dict[str, Any] = {}
    if any(value is not None for value in tls.values()):
        transport["tls"] = tls
    if options.get("insecure"):
        transport["insecure"] = True
    return transport


def build_config(options: dict[str, Any]) -> tuple[ServerConfig, dict[str, Any] | None]:
    """The server config and, with --task, the initial model it names."""
    config_path: Path | None = options["config_path"]
    given_job_flags = [f for f in _JOB_FLAGS if options.get(f) is not None]
    transport = _transport(options)
    if config_path is not None:
        if given_job_flags:
            flags = ", ".join(_flag(f) for f in given_job_flags)
            raise click.UsageError(f"--config sets the jobs; drop {flags} or move them into {config_path}")
        overrides = {k: options[k] for k in _SERVER_FLAGS if options.get(k) is not None}
        if transport:  # the flags replace the file's choice of TLS or plaintext as a whole
            overrides |= {"tls": transport.get("tls"), "insecure": transport.get("insecure")}
        return ServerConfig.from_toml(config_path, overrides), None
    if options["task"] and options["initial_model"]:
        raise click.UsageError("give --initial-model or --task, not both")
    if not options["task"] and not options["initial_model"]:
        raise click.UsageError("the job needs a starting model: --initial-model model.safetensors or --task digits")
    options = dict(options)
    if options.get("evaluator") is None and options["task"] == "digits":
        options["evaluator"] = DIGITS_EVALUATOR
    if options.get("evaluator") == "none":
        options["evaluator"] = None
    job = {
        "id": options["job_id"],
        "initial_model": options["initial_model"],
        **{k: options[k] for k in _JOB_FLAGS[3:]},
    }
    config = ServerConfig.from_mapping({**{k: options.get(k) for k in _SERVER_FLAGS}, "jobs": [job], **transport})
    models = None
    if options["task"]:
        from edge.tasks import initial_weights

        models = {config.jobs[0].job_id: initial_weights(options["seed"])}
    return config, models


def run_server(options: dict[str, Any]) -> None:
    try:
        config, models = build_config(options)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        with running_server(config, models if models is not None else load_initial_models(config)) as running:
            for job in config.jobs:
                strategy = job.strategy
                secure = job.secure_aggregation
                click.echo(
                    f"job {job.job_id!r}: {strategy.name}, staleness {job.staleness.describe()}, "
                    f"max_staleness {job.max_staleness if job.max_staleness is not None else 'none'}"
                    + (f", secure aggregation in cohorts of {secure.cohort_size}" if secure else "")
                    + (f" quantized to {secure.quantize_bits} bits" if secure and secure.quantize_bits else "")
                    + (f", evaluator {job.evaluator} every {job.evaluate_every} version(s)" if job.evaluator else "")
                )
            for job_id in running.recovered:
                resumed = running.core.job(job_id)
                click.echo(
                    f"job {job_id!r}: resumed from {config.state_dir} at version {resumed.snapshot().version} "
                    f"({resumed.pending_updates} buffered updates); its initial model was not used"
                )
            if running.registry is not None:
                enrolled = sum(1 for c in running.registry.clients() if c.active)
                how = "generated now, keep it secret" if running.admin_token_generated else "keep it secret"
                click.echo(f"auth on: {enrolled} enrolled client(s); admin token in {running.admin_token_file} ({how})")
            mode = "plaintext" if config.tls is None else ("mutual TLS" if config.tls.mutual else "TLS")
            click.echo(f"tributary server listening on {running.address} ({mode})", nl=True)
            if running.http_address is not None:
                scheme = "http" if config.tls is None else "https"
                guard = "; admin token required" if config.auth else ""
                click.echo(f"dashboard on {scheme}://{running.http_address}/ (metrics: /metrics{guard})")
            sys.stdout.flush()
            stop.wait()
            click.echo(f"shutting down (grace period {config.grace_period_s:g}s)")
            sys.stdout.flush()
        click.echo("stopped" + (f"; state saved in {config.state_dir}" if config.state_dir else ""))
    except ConfigError as error:
        raise click.ClickException(str(error)) from error
