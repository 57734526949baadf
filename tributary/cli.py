"""Wires the subcommands; each one's work lives in its own module, imported
only when that subcommand runs."""

from __future__ import annotations

from pathlib import Path

import click

STRATEGIES = ("fedasync", "fedbuff", "fedavg")
STALENESS = ("constant", "polynomial", "hinge")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="tributary")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", envvar="TRIBUTARY_LOG_FORMAT", help="Log lines on stderr: human-readable text, or one JSON object per line (timestamp, level, logger, message, job, client, version, cohort); or set TRIBUTARY_LOG_FORMAT.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False), default="info", envvar="TRIBUTARY_LOG_LEVEL", help="Least severe log events shown; or set TRIBUTARY_LOG_LEVEL.")
def main(log_format: str, log_level: str) -> None:
    """Tributary: asynchronous federated learning over gRPC."""
    from tributary._logging import configure

    configure(log_format, log_level)


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help="TOML file with the server and its jobs (instead of the job flags below).")
@click.option("--address", default=None, help="host:port to listen on; port 0 picks a free one.  [default: 127.0.0.1:50051]")
@click.option("--max-workers", type=int, default=None, help="RPC threads; each open stream holds one.  [default: 256]")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Keep jobs, accepted updates and checkpoints here (SQLite + safetensors); a restart resumes from it.  [default: memory only]")
@click.option("--checkpoint-every", type=int, default=None, help="With --state-dir: checkpoint the model every this many versions.  [default: 10]")
@click.option("--keep-checkpoints", type=int, default=None, help="With --state-dir: checkpoints kept per job (0: all).  [default: 3]")
@click.option("--keep-log-entries", type=int, default=None, help="With --state-dir: update records kept per job.  [default: 1000000]")
@click.option("--grace-period", "grace_period_s", type=float, default=None, help="On SIGTERM: seconds in-flight requests may take before they are cancelled.  [default: 10]")
@click.option("--max-concurrent-streams", type=int, default=None, help="Pushes, pulls, masked uploads and cohort joins in flight at once; more are refused (RESOURCE_EXHAUSTED, retry later).  [default: max workers - 16]")
@click.option("--rate-limit", "rate_limit_per_s", type=float, default=None, help="Pushes and cohort joins per second each client id may make.  [default: no limit]")
@click.option("--rate-burst", "rate_limit_burst", type=int, default=None, help="Requests a client may save up under --rate-limit.  [default: one second's worth]")
@click.option("--stream-timeout", "stream_timeout_s", type=float, default=None, help="Seconds a push, pull or masked upload may stay open.  [default: 600]")
@click.option("--stream-idle-timeout", "stream_idle_timeout_s", type=float, default=None, help="Seconds a stream may go without a message before it is cut off.  [default: 60]")
@click.option("--resume-budget-bytes", type=int, default=None, help="Bytes of interrupted pushes kept for their clients to resume (oldest dropped first; 0: none).  [default: 1 GiB]")
@click.option("--resume-expiry", "resume_expiry_s", type=float, default=None, help="Seconds an interrupted push is kept after its last byte.  [default: 600]")
@click.option("--job", "job_id", default=None, help="Job id clients name.  [default: default]")
@click.option("--initial-model", type=click.Path(dir_okay=False, path_type=Path), help="Initial model (.safetensors).")
@click.option("--task", type=click.Choice(["digits"]), help="Start from a fresh model of this built-in task instead of --initial-model.")
@click.option("--seed", type=int, default=0, help="Seed for --task's initial model.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default=None, help="Aggregation rule.  [default: fedbuff]")
@click.option("--alpha", type=float, default=None, help="fedasync mixing weight in (0, 1].  [default: 0.6]")
@click.option("--buffer-size", type=int, default=None, help="fedbuff: updates per aggregate (K).  [default: 10]")
@click.option("--server-lr", type=float, default=None, help="fedbuff/fedavg server learning rate.  [default: 1.0]")
@click.option("--weight-by-samples/--no-weight-by-samples", default=None, help="fedbuff: weight updates by their sample counts too.  [default: no]")
@click.option("--normalizer", type=click.Choice(["count", "weight_sum"]), default=None, help="fedbuff: divide the buffer by K or by the weight sum.  [default: count]")
@click.option("--clients-per-round", type=int, default=None, help="fedavg: distinct clients per synchronous round.  [default: 4]")
@click.option("--staleness", type=click.Choice(STALENESS), default=None, help="Staleness function s(tau).  [default: polynomial]")
@click.option("--staleness-a", type=float, default=None, help="Exponent of polynomial, slope of hinge.  [default: 0.5]")
@click.option("--staleness-b", type=float, default=None, help="hinge: staleness up to which updates count fully.  [default: 4]")
@click.option("--max-staleness", type=int, default=None, help="Reject updates more stale than this.  [default: no bound]")
@click.option("--max-update-bytes", type=int, default=None, help="Largest update accepted.  [default: 2 GiB]")
@click.option("--keep-versions-for-resume", type=int, default=None, help="Versions kept besides the current one for interrupted pulls to resume.  [default: 2]")
@click.option("--secure-aggregation", is_flag=True, default=None, help="Aggregate in SecAgg+ cohorts: the server sees only sums (fedbuff only).")
@click.option("--cohort-size", type=int, default=None, help="Secure aggregation: members per cohort.  [default: 8]")
@click.option("--min-survivors", type=int, default=None, help="Secure aggregation: members that must finish for a cohort to count.  [default: 2/3 of the cohort]")
@click.option("--neighbours", type=int, default=None, help="Secure aggregation: neighbours each member masks with.  [default: about 2 log2(cohort size)]")
@click.option("--ring-bits", type=int, default=None, help="Secure aggregation: fixed-point ring Z_2^bits.  [default: 32]")
@click.option("--clip-bound", type=float, default=None, help="Secure aggregation: clip each weighted value to +-this before quantizing.  [default: 1024]")
@click.option("--forming-timeout", "forming_timeout_s", type=float, default=None, help="Secure aggregation: seconds to wait for a full cohort.  [default: 10]")
@click.option("--phase-timeout", "phase_timeout_s", type=float, default=None, help="Secure aggregation: seconds per key or unmasking phase.  [default: 30]")
@click.option("--upload-timeout", "upload_timeout_s", type=float, default=None, help="Secure aggregation: seconds members may train before the cohort goes on without them.  [default: 300]")
@click.option("--max-concurrent-trainers", type=int, default=None, help="Training slots: clients that may train at once; others wait (AcquireTrainingSlot).  [default: no slots]")
@click.option("--prefer-charging", is_flag=True, default=None, help="With training slots: charging devices get scarce slots first.")
@click.option("--min-battery", type=float, default=None, help="With training slots: turn away devices on battery below this charge, in [0, 1].  [default: none]")
@click.option("--slot-lease", "slot_lease_s", type=float, default=None, help="With training slots: seconds a slot lasts without a heartbeat renewing it.  [default: 120]")
@click.option("--quantize-bits", type=click.IntRange(0), default=None, help="Secure aggregation: members quantize each value to 8 or 4 bits; the ring shrinks to what the cohort's sum needs and masked inputs travel as uint8/uint16.  [default: full ring precision]")
@click.option("--value-bound", type=float, default=None, help="Secure aggregation with --quantize-bits: clip each w * delta value to +-this (--clip-bound then bounds the weight w).  [default: --clip-bound]")
@click.option("--accept-compression", default=None, help="Compressed pushes a plaintext job takes: comma-separated of quantize, top_k, or none.  [default: quantize,top_k]")
@click.option("--evaluator", default=None, help="Evaluate each new model version on the server with this \"module:function\" (tensors -> {metric: number}); none: no evaluator.  [default: with --task digits, edge.tasks:digits_evaluator; otherwise none]")
@click.option("--evaluate-every", type=int, default=None, help="With --evaluator: evaluate at most every this many versions (the newest; slower evaluators skip versions).  [default: 1]")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Serve TLS with this PEM certificate (chain); needs --tls-key.")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), default=None, help="PEM private key of --tls-cert.")
@click.option("--tls-client-ca", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Require client certificates signed by this PEM CA (mutual TLS).")
@click.option("--insecure", is_flag=True, default=None, help="Serve plaintext instead of TLS (a trusted network only).")
@click.option("--auth", is_flag=True, default=None, help="Serve only enrolled clients (bearer tokens, `tributary admin enrol`); needs --state-dir.")
@click.option("--admin-token-file", type=click.Path(dir_okay=False, path_type=Path), default=None, help="File holding the admin token.  [default: generated into <state-dir>/admin.token]")
@click.option("--http-address", default=None, help="host:port of the HTTP endpoint with /metrics and the live dashboard (admin token required with --auth; HTTPS with --tls-*); port 0 picks a free one.  [default: none]")
def server(**options: object) -> None:
    """Run the aggregation server until interrupted (Ctrl-C or SIGTERM)."""
    from tributary._server_cmd import run_server

    run_server(options)


@main.command()
@click.option("--server", "address", default="127.0.0.1:50051", help="Server host:port.")
@click.option("--job", default="default", help="Job to join.")
@click.option("--task", type=click.Choice(["digits"]), default="digits", help="Built-in task to train.")
@click.option("--shard", type=int, default=0, help="Which shard of the task's training data this client holds.")
@click.option("--num-shards", type=int, default=1, help="Number of shards the data is cut into.")
@click.option("--dirichlet-alpha", type=float, default=0.5, help="Label skew of the shards (smaller: more skewed).")
@click.option("--seed", type=int, default=0, help="Seed of the data split and shards (same for every client).")
@click.option("--updates", type=int, default=None, help="Stop after this many accepted updates.")
@click.option("--duration", type=float, default=None, help="Stop after this many seconds.")
@click.option("--epochs", type=int, default=1, help="Local epochs per update.")
@click.option("--lr", type=float, default=0.05, help="Local SGD learning rate.")
@click.option("--batch-size", type=int, default=32, help="Local batch size.")
@click.option("--round-seconds", type=float, default=0.0, help="Pad each local round to this long (emulates a slower device).")
@click.option("--device", default=None, help="torch device (cuda, mps, cpu); default: the best available.")
@click.option("--client-id", default=None, help="Client id the server sees; default: random (with --token-file: give the enrolled id).")
@click.option("--ca", "ca_file", type=click.Path(dir_okay=False, path_type=Path), default=None, help="PEM CA the server's certificate must be signed by; default: gRPC's public roots.")
@click.option("--cert", "cert_file", type=click.Path(dir_okay=False, path_type=Path), default=None, help="This client's PEM certificate, for servers that require one (mutual TLS); needs --key.")
@click.option("--key", "key_file", type=click.Path(dir_okay=False, path_type=Path), default=None, help="PEM private key of --cert.")
@click.option("--insecure", is_flag=True, default=False, help="Talk plaintext instead of TLS (a trusted network only).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None, help="File holding this client's token (from `tributary admin enrol`), for servers run with --auth.")
@click.option("--quantize-bits", type=int, default=None, help="Compress each update by stochastic quantization to 8 or 4 bits (under secure aggregation: the job's cohort setting).")
@click.option("--top-k", type=float, default=None, help="Send only this fraction (0, 1] of each tensor's largest elements, with error feedback (plaintext jobs only).")
@click.option("--federated-eval", is_flag=True, default=False, help="Hold out part of the shard, and report accuracy and loss of pulled versions on it (ReportEvaluation).")
@click.option("--eval-every", type=int, default=1, help="With --federated-eval: evaluate the first pulled version and every N-th pull after.")
@click.option("--eval-fraction", type=float, default=0.2, help="With --federated-eval: fraction of the shard held out, in (0, 1) (at least 1 example).")
def client(**options: object) -> None:
    """Join a job and train a built-in task (pull -> train -> push, repeatedly)."""
    from tributary._client_cmd import run_client

    run_client(options)


@main.group()
@click.option("--server", "address", default="127.0.0.1:50051", help="Server host:port.")
@click.option("--admin-token-file", type=click.Path(dir_okay=False, path_type=Path), required=True, envvar="TRIBUTARY_ADMIN_TOKEN_FILE", help="File holding the admin token (the server's --admin-token-file, or <state-dir>/admin.token); or set TRIBUTARY_ADMIN_TOKEN_FILE.")
@click.option("--ca", "ca_file", type=click.Path(dir_okay=False, path_type=Path), default=None, help="PEM CA the server's certificate must be signed by; default: gRPC's public roots.")
@click.option("--cert", "cert_file", type=click.Path(dir_okay=False, path_type=Path), default=None, help="PEM certificate to show a server that requires one (mutual TLS); needs --key.")
@click.option("--key", "key_file", type=click.Path(dir_okay=False, path_type=Path), default=None, help="PEM private key of --cert.")
@click.option("--insecure", is_flag=True, default=False, help="Talk plaintext instead of TLS (a trusted network only).")
@click.pass_context
def admin(context: click.Context, address: str, admin_token_file: Path, ca_file: Path | None, cert_file: Path | None, key_file: Path | None, insecure: bool) -> None:
    """Administer a server run with --auth: status, enrol and revoke clients."""
    context.obj = {"address": address, "admin_token_file": admin_token_file, "ca_file": ca_file, "cert_file": cert_file, "key_file": key_file, "insecure": insecure}


@admin.command("status")
@click.pass_obj
def admin_status(settings: dict[str, object]) -> None:
    """Each job's strategy, version, updates and enrolled clients."""
    from tributary._admin_cmd import show_status

    show_status(settings)


@admin.command("enrol")
@click.argument("client_id")
@click.option("--job", "jobs", multiple=True, required=True, help="Job the client may act in (repeat for several).")
@click.option("--rotate", is_flag=True, default=False, help="Replace the token (and jobs) of a client that is already enrolled.")
@click.option("--token-out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the token to this file (mode 0600) instead of printing it.")
@click.pass_obj
def admin_enrol(settings: dict[str, object], /, **options: object) -> None:
    """Enrol CLIENT_ID in jobs and print its token (shown once)."""
    from tributary._admin_cmd import enrol

    enrol(settings, options)


@admin.command("revoke")
@click.argument("client_id")
@click.pass_obj
def admin_revoke(settings: dict[str, object], client_id: str) -> None:
    """Revoke CLIENT_ID's token: its next call is refused."""
    from tributary._admin_cmd import revoke

    revoke(settings, client_id)


@admin.command("clients")
@click.pass_obj
def admin_clients(settings: dict[str, object]) -> None:
    """List enrolled clients, their jobs, and whether they are revoked."""
    from tributary._admin_cmd import list_clients

    list_clients(settings)


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--server-name", "server_names", multiple=True, help="DNS name the server certificate is for (repeatable).  [default: localhost, with 127.0.0.1]")
@click.option("--ip", "ip_addresses", multiple=True, help="IP address the server certificate is for (repeatable).  [default: 127.0.0.1, with localhost]")
@click.option("--client", "client_ids", multiple=True, help="Make a client certificate with this id as its CN (repeatable).")
@click.option("--days", type=int, default=365, help="Validity of the server and client certificates (the CA gets at least 10 years).")
@click.option("--force", is_flag=True, default=False, help="Replace server and client files that exist (the CA is kept).")
def certs(**options: object) -> None:
    """Make a CA, a server certificate and client certificates in OUT_DIR for
    TLS and mutual TLS; run it again with --client ID to sign more clients with
    the same CA."""
    from tributary._certs_cmd import run_certs

    run_certs(options)


@main.command()
@click.option("--clients", type=int, default=8, help="Client processes to start.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="fedbuff", help="Aggregation rule.")
@click.option("--buffer-size", type=int, default=4, help="fedbuff: updates per aggregate (K).")
@click.option("--max-versions", type=int, default=150, help="Stop once the server has produced this many model versions.")
@click.option("--time-limit", type=float, default=120.0, help="Wall-time limit in seconds (exit non-zero if the target is not reached within it).")
@click.option("--target-accuracy", type=float, default=0.92, help="Test accuracy the run must reach.")
@click.option("--dirichlet-alpha", type=float, default=0.5, help="Label skew of the client shards.")
@click.option("--seed", type=int, default=0, help="Seed of data split, shards and initial model.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), help="Where to write the run's results.")
@click.option("--keep-versions-for-resume", type=int, default=None, help="Versions kept besides the current one for interrupted pulls to resume.  [default: 2]")
@click.option("--secure-aggregation", is_flag=True, default=False, help="Aggregate in SecAgg+ cohorts of --buffer-size clients.")
@click.option("--http-address", default=None, help="Serve the live dashboard and /metrics here while the demo runs (host:port; port 0 picks a free one).  [default: none]")
def demo(**options: object) -> None:
    """Run a whole federation on this machine: a server, a fleet of clients of
    mixed speeds on non-IID digits shards, fedbuff; print what happened."""
    from server.errors import ConfigError
    from tributary._demo import run_demo

    try:
        run_demo(options)
    except ConfigError as error:  # e.g. a bad or taken --http-address
        raise click.ClickException(str(error)) from error



@main.command()
@click.argument("config_path", metavar="CONFIG.toml", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", help="Run the devices in local worker processes or as Ray actors.")
@click.option("--devices", type=int, default=None, help="Number of emulated devices.  [default: the config's]")
@click.option("--seed", type=int, default=None, help="Seed of partition, fleet, schedules and model.  [default: the config's]")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), help="Where to write the run's results.")
@click.option("--http-address", default=None, help="Serve the live dashboard and /metrics here while the simulation runs (host:port; port 0 picks a free one).  [default: none]")
def simulate(**options: object) -> None:
    """Run an experiment described by CONFIG.toml: a fleet of emulated devices
    (speeds, availability, battery, dropouts) against a real server on loopback."""
    from server.errors import ConfigError
    from tributary._simulate_cmd import run_simulate

    try:
        run_simulate(options)
    except ConfigError as error:  # e.g. a bad or taken --http-address
        raise click.ClickException(str(error)) from error

@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Folder for the plots and summary.  [default: RUN/report]")
@click.option("--format", "fmt", type=click.Choice(["md", "html", "both"]), default="both", help="Summary as Markdown (index.md), HTML (index.html) or both.")
@click.option("--target", type=float, default=None, help="Accuracy whose time to reach the summary reports.  [default: the run's target, if it had one]")
def report(**options: object) -> None:
    """Plot a run and summarise it: RUN is a server state directory
    (tributary.db) or a folder `tributary simulate` or `tributary demo` wrote."""
    from tributary._report_cmd import run_report

    run_report(options)


if __name__ == "__main__":
    main()
