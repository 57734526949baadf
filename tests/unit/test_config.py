"""Server configuration: from_mapping, from_toml and the checks each dataclass makes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from server.config import JobConfig, ServerConfig, StalenessConfig, StrategyConfig
from server.errors import ConfigError

EVERY_JOB_KEY: dict[str, Any] = {
    "id": "mnist-v2",
    "initial_model": "models/start.safetensors",
    "strategy": "fedbuff",
    "alpha": 0.3,
    "buffer_size": 5,
    "server_lr": 0.25,
    "weight_by_samples": True,
    "normalizer": "weight_sum",
    "clients_per_round": 7,
    "staleness": "hinge",
    "staleness_a": 2,
    "staleness_b": 3,
    "max_staleness": 20,
    "max_update_bytes": 1000,
    "idempotency_window": 50,
}


def test_from_mapping_with_every_key() -> None:
    config = ServerConfig.from_mapping({"insecure": True, "address": "0.0.0.0:6000", "max_workers": 8, "jobs": [EVERY_JOB_KEY]})
    assert config.address == "0.0.0.0:6000"
    assert config.max_workers == 8
    assert len(config.jobs) == 1
    job = config.jobs[0]
    assert job.job_id == "mnist-v2"
    assert job.initial_model == Path("models/start.safetensors")
    assert isinstance(job.initial_model, Path)
    assert job.strategy == StrategyConfig(
        name="fedbuff",
        alpha=0.3,
        buffer_size=5,
        server_lr=0.25,
        weight_by_samples=True,
        normalizer="weight_sum",
        clients_per_round=7,
    )
    assert job.staleness == StalenessConfig(kind="hinge", a=2.0, b=3.0)
    assert isinstance(job.staleness.a, float) and isinstance(job.staleness.b, float)
    assert job.max_staleness == 20
    assert job.max_update_bytes == 1000
    assert job.idempotency_window == 50


def test_from_mapping_defaults() -> None:
    config = ServerConfig.from_mapping({"insecure": True})
    assert config.address == "127.0.0.1:50051"
    assert config.max_workers == 256
    assert config.jobs == (JobConfig(),)
    job = config.jobs[0]
    assert job.job_id == "default"
    assert job.strategy.name == "fedbuff" and job.strategy.buffer_size == 10 and job.strategy.normalizer == "count"
    assert job.staleness.kind == "polynomial" and job.staleness.a == 0.5
    assert job.max_staleness is None
    assert job.initial_model is None


def test_none_values_mean_not_given() -> None:
    # CLI flags that were not passed arrive as None and leave the defaults alone.
    config = ServerConfig.from_mapping(
        {"insecure": True, "address": None, "max_workers": None, "jobs": [{"id": None, "strategy": None, "buffer_size": None, "staleness_a": None, "max_staleness": None}]}
    )
    assert config == ServerConfig.from_mapping({"insecure": True})


def test_several_jobs() -> None:
    config = ServerConfig.from_mapping({"insecure": True, "jobs": [{"id": "a", "strategy": "fedasync"}, {"id": "b", "strategy": "fedavg", "clients_per_round": 2}]})
    assert [j.job_id for j in config.jobs] == ["a", "b"]
    assert config.jobs[0].strategy.name == "fedasync"
    assert config.jobs[1].strategy.synchronous is True
    assert config.jobs[0].strategy.synchronous is False


def test_unknown_job_key_is_rejected_by_name() -> None:
    with pytest.raises(ConfigError, match="unknown job setting 'bufer_size'"):
        ServerConfig.from_mapping({"insecure": True, "jobs": [{"id": "a", "bufer_size": 3}]})


def test_unknown_server_keys_are_rejected_by_name() -> None:
    with pytest.raises(ConfigError, match="unknown server setting.*max_worker, port"):
        ServerConfig.from_mapping({"insecure": True, "port": 1, "max_worker": 3})


def test_job_key_at_server_level_is_rejected() -> None:
    with pytest.raises(ConfigError, match="buffer_size"):
        ServerConfig.from_mapping({"insecure": True, "buffer_size": 3})


INVALID_JOB_VALUES = [
    ({"strategy": "fedprox"}, "strategy must be one of fedasync, fedbuff, fedavg, got 'fedprox'"),
    ({"strategy": "FedAvg"}, "strategy must be one of"),
    ({"alpha": 0}, "alpha must be in"),
    ({"alpha": -0.1}, "alpha must be in"),
    ({"alpha": 1.5}, "alpha must be in"),
    ({"buffer_size": 0}, "buffer_size must be an integer >= 1"),
    ({"buffer_size": -2}, "buffer_size must be an integer >= 1"),
    ({"buffer_size": 2.5}, "buffer_size must be an integer >= 1"),
    ({"buffer_size": True}, "buffer_size must be an integer >= 1"),
    ({"clients_per_round": 0}, "clients_per_round must be an integer >= 1"),
    ({"clients_per_round": -1}, "clients_per_round must be an integer >= 1"),
    ({"server_lr": 0}, "server_lr must be a positive number"),
    ({"server_lr": -1.0}, "server_lr must be a positive number"),
    ({"server_lr": math.nan}, "server_lr must be a positive number"),
    ({"server_lr": math.inf}, "server_lr must be a positive number"),
    ({"server_lr": "1"}, "server_lr must be a positive number"),
    ({"normalizer": "mean"}, "normalizer must be one of count, weight_sum"),
    ({"weight_by_samples": True}, "weight_by_samples with normalizer='count'"),
    ({"weight_by_samples": True, "normalizer": "count"}, "use normalizer='weight_sum'"),
    ({"staleness": "linear"}, "staleness must be one of constant, polynomial, hinge"),
    ({"staleness_a": 0}, "staleness_a must be a positive number"),
    ({"staleness_a": -1}, "staleness_a must be a positive number"),
    ({"staleness": "hinge", "staleness_a": -0.5}, "staleness_a"),
    ({"staleness": "hinge", "staleness_b": -1}, "staleness_b must be >= 0"),
    ({"max_staleness": -1}, "max_staleness must be an integer >= 0"),
    ({"max_staleness": 1.5}, "max_staleness must be an integer >= 0"),
    ({"max_update_bytes": 0}, "max_update_bytes must be an integer >= 1"),
    ({"max_update_bytes": -5}, "max_update_bytes must be an integer >= 1"),
    ({"idempotency_window": 0}, "idempotency_window must be an integer >= 1"),
    ({"keep_versions_for_resume": -1}, "keep_versions_for_resume must be an integer from 0 to 100"),
    ({"keep_versions_for_resume": 101}, "keep_versions_for_resume must be an integer from 0 to 100"),
    ({"keep_versions_for_resume": 1.5}, "keep_versions_for_resume must be an integer"),
    ({"id": ""}, "job id '' must be"),
    ({"id": "has space"}, "job id 'has space' must be"),
    ({"id": "-leading-dash"}, "job id"),
    ({"id": "x" * 65}, "job id"),
    ({"id": "a/b"}, "job id"),
]


@pytest.mark.parametrize(("values", "message"), INVALID_JOB_VALUES, ids=[repr(v) for v, _ in INVALID_JOB_VALUES])
def test_invalid_job_values_are_rejected_with_a_message_naming_them(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ServerConfig.from_mapping({"insecure": True, "jobs": [values]})


def test_weight_by_samples_is_fine_with_weight_sum_and_for_other_strategies() -> None:
    assert JobConfig.from_mapping({"weight_by_samples": True, "normalizer": "weight_sum"}).strategy.weight_by_samples
    # only fedbuff reads weight_by_samples, so the count normalizer does not matter elsewhere
    assert JobConfig.from_mapping({"strategy": "fedasync", "weight_by_samples": True}).strategy.name == "fedasync"


def test_boundary_values_are_accepted() -> None:
    job = JobConfig.from_mapping(
        {"id": "A" + "x" * 63, "alpha": 1, "buffer_size": 1, "clients_per_round": 1, "max_staleness": 0, "max_update_bytes": 1, "idempotency_window": 1}
    )
    assert job.max_staleness == 0
    assert job.strategy.alpha == 1
    assert JobConfig.from_mapping({"id": "a_b.c-9"}).job_id == "a_b.c-9"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"staleness_a": "steep"}, "staleness_a"),
        ({"staleness": "hinge", "staleness_b": "late"}, "staleness_b"),
        ({"max_staleness": True}, "max_staleness"),
    ],
    ids=["staleness_a-string", "staleness_b-string", "max_staleness-bool"],
)
def test_wrongly_typed_job_values_raise_config_error_naming_the_key(values: dict[str, Any], message: str) -> None:
    """BUG (server/config.py, JobConfig.from_mapping and __post_init__):
    - staleness_a/_b are coerced with a bare float(value), so a TOML string raises
      a plain `ValueError: could not convert string to float: 'steep'`, which is
      not a ConfigError (`tributary server` only turns ConfigError into a
      message) and does not name the key;
    - max_staleness = true is accepted as 1, because bool is an int and, unlike
      buffer_size / max_update_bytes / idempotency_window, the check does not
      exclude bool."""
    with pytest.raises(ConfigError, match=message):
        ServerConfig.from_mapping({"insecure": True, "jobs": [values]})


# -- server-level values ------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    ["localhost", "localhost:", ":50051", "localhost:http", "localhost:70000", "host:-1", ""],
)
def test_bad_addresses_are_rejected(address: str) -> None:
    with pytest.raises(ConfigError, match="address must be host:port"):
        ServerConfig.from_mapping({"insecure": True, "address": address})


@pytest.mark.parametrize("address", ["127.0.0.1:0", "0.0.0.0:65535", "[::]:50051", "my-host.example:443"])
def test_good_addresses_are_accepted(address: str) -> None:
    assert ServerConfig.from_mapping({"insecure": True, "address": address}).address == address


def test_non_string_address_is_a_config_error() -> None:
    """BUG (server/config.py, ServerConfig.__post_init__): `address = 50051` in TOML
    reaches `self.address.rpartition(":")` and raises AttributeError instead of
    ConfigError."""
    with pytest.raises(ConfigError, match="address"):
        ServerConfig.from_mapping({"insecure": True, "address": 50051})


@pytest.mark.parametrize("workers", [1, 0, -4, 2.5])
def test_bad_max_workers_are_rejected(workers: Any) -> None:
    with pytest.raises(ConfigError, match="max_workers must be an integer >= 2"):
        ServerConfig.from_mapping({"insecure": True, "max_workers": workers})


def test_duplicate_job_ids_are_rejected_by_name() -> None:
    with pytest.raises(ConfigError, match="job ids must be unique; repeated: a, b"):
        ServerConfig.from_mapping({"insecure": True, "jobs": [{"id": "b"}, {"id": "a"}, {"id": "b"}, {"id": "c"}, {"id": "a"}]})


def test_two_unnamed_jobs_collide_on_the_default_id() -> None:
    with pytest.raises(ConfigError, match="repeated: default"):
        ServerConfig.from_mapping({"insecure": True, "jobs": [{}, {}]})


def test_empty_job_list_is_rejected() -> None:
    with pytest.raises(ConfigError, match="at least one job"):
        ServerConfig.from_mapping({"insecure": True, "jobs": []})


def test_jobs_must_be_a_list() -> None:
    with pytest.raises(ConfigError, match="jobs must be a list"):
        ServerConfig.from_mapping({"insecure": True, "jobs": {"id": "a"}})


def test_configs_are_frozen() -> None:
    config = ServerConfig.from_mapping({"insecure": True})
    with pytest.raises(AttributeError):
        config.address = "x:1"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.jobs[0].strategy.buffer_size = 3  # type: ignore[misc]


# -- TOML ---------------------------------------------------------------------

TOML = """
address = "127.0.0.1:7000"
insecure = true
max_workers = 16

[[jobs]]
id = "relative"
initial_model = "models/m.safetensors"
strategy = "fedasync"
alpha = 0.4
staleness = "polynomial"
staleness_a = 0.5
max_staleness = 50

[[jobs]]
id = "absolute"
initial_model = "{absolute}"
strategy = "fedavg"
clients_per_round = 3
server_lr = 0.5

[[jobs]]
id = "no-model"
strategy = "fedbuff"
buffer_size = 4
normalizer = "weight_sum"
weight_by_samples = true
staleness = "constant"
"""


def write_toml(tmp_path: Path, absolute: Path) -> Path:
    path = tmp_path / "conf" / "server.toml"
    path.parent.mkdir()
    path.write_text(TOML.format(absolute=absolute.as_posix()))
    return path


def test_from_toml_reads_every_table(tmp_path: Path) -> None:
    absolute = tmp_path / "elsewhere" / "abs.safetensors"
    config = ServerConfig.from_toml(write_toml(tmp_path, absolute))
    assert config.address == "127.0.0.1:7000"
    assert config.max_workers == 16
    relative, absolute_job, no_model = config.jobs
    assert relative.strategy.name == "fedasync" and relative.strategy.alpha == 0.4
    assert relative.max_staleness == 50
    assert absolute_job.strategy.name == "fedavg" and absolute_job.strategy.clients_per_round == 3
    assert absolute_job.strategy.server_lr == 0.5
    assert no_model.initial_model is None
    assert no_model.strategy.weight_by_samples is True and no_model.strategy.buffer_size == 4
    assert no_model.staleness.kind == "constant"


def test_from_toml_resolves_relative_initial_model_against_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absolute = tmp_path / "elsewhere" / "abs.safetensors"
    path = write_toml(tmp_path, absolute)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # The config file is named relative to the working directory; the model relative to the file.
    config = ServerConfig.from_toml(Path("..") / "conf" / "server.toml")
    relative, absolute_job, _ = config.jobs
    assert relative.initial_model == path.parent.resolve() / "models" / "m.safetensors"
    assert relative.initial_model.is_absolute()
    assert absolute_job.initial_model == absolute


def test_from_toml_rejects_invalid_toml_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('address = "127.0.0.1:1"\n[[jobs]\nid = "a"\n')
    with pytest.raises(ConfigError, match="broken.toml is not valid TOML"):
        ServerConfig.from_toml(path)


def test_from_toml_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file .*missing.toml"):
        ServerConfig.from_toml(tmp_path / "missing.toml")


def test_from_toml_applies_the_same_checks_as_from_mapping(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[jobs]]\nid = "a"\nbuffer_size = 0\n')
    with pytest.raises(ConfigError, match="buffer_size must be an integer >= 1"):
        ServerConfig.from_toml(path)
    path.write_text('[[jobs]]\nid = "a"\nbatch_size = 3\n')
    with pytest.raises(ConfigError, match="unknown job setting 'batch_size'"):
        ServerConfig.from_toml(path)
    path.write_text('workers = 3\n')
    with pytest.raises(ConfigError, match="unknown server setting.*workers"):
        ServerConfig.from_toml(path)


def test_from_toml_without_jobs_gives_the_default_job(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('address = "127.0.0.1:9"\ninsecure = true\n')
    config = ServerConfig.from_toml(path)
    assert config.jobs == (JobConfig(),)


def test_fedavg_round_must_fit_the_thread_pool() -> None:
    from server import ConfigError, JobConfig, ServerConfig, StrategyConfig

    job = JobConfig(strategy=StrategyConfig(name="fedavg", clients_per_round=8))
    with pytest.raises(ConfigError, match="clients_per_round=8 needs more than max_workers=8"):
        ServerConfig(insecure=True, max_workers=8, jobs=(job,))
    assert ServerConfig(insecure=True, max_workers=9, jobs=(job,)).max_workers == 9


def test_missing_initial_model_is_named() -> None:
    import numpy as np

    from server import AggregationCore, JobConfig, ServerConfig

    config = ServerConfig(insecure=True, jobs=(JobConfig(job_id="a"), JobConfig(job_id="b")))
    with pytest.raises(ValueError, match="no initial model for job\\(s\\) b"):
        AggregationCore.from_config(config, {"a": {"w": np.zeros(2, np.float32)}})


def test_secure_aggregation_from_toml(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from server import ServerConfig

    path = tmp_path / "server.toml"
    path.write_text(
        'address = "127.0.0.1:0"\ninsecure = true\n[[jobs]]\nid = "private"\nstrategy = "fedbuff"\nsecure_aggregation = true\n'
        "cohort_size = 10\nneighbours = 6\nring_bits = 32\nclip_bound = 256.0\nupload_timeout_s = 60.0\n"
    )
    job = ServerConfig.from_toml(path).jobs[0]
    assert job.secure_aggregation is not None
    assert (job.secure_aggregation.cohort_size, job.secure_aggregation.neighbours) == (10, 6)
    assert job.secure_aggregation.clip_bound == 256.0
    # t defaults to the bound where any t survivors complete: 6 neighbours + self = 7 holders, 4 needed
    assert job.secure_aggregation.survivors_needed == 7


def test_secure_aggregation_settings_are_checked() -> None:
    from server import ConfigError, JobConfig

    with pytest.raises(ConfigError, match="min_survivors=5 is below a majority of the cohort \\(6\\)"):
        JobConfig.from_mapping({"secure_aggregation": True, "cohort_size": 10, "min_survivors": 5})
    with pytest.raises(ConfigError, match="secure aggregation runs with strategy 'fedbuff'"):
        JobConfig.from_mapping({"secure_aggregation": True, "strategy": "fedavg"})
    with pytest.raises(ConfigError, match="no scale >= 1 fits"):
        JobConfig.from_mapping({"secure_aggregation": True, "ring_bits": 8, "clip_bound": 100.0})


# -- server limits ---------------------------------------------------------------


def test_limits_default_and_from_mapping(tmp_path: Path) -> None:
    default = ServerConfig(insecure=True)
    assert (default.max_concurrent_streams, default.stream_limit) == (None, 240)
    assert (default.rate_limit_per_s, default.stream_timeout_s, default.stream_idle_timeout_s) == (None, 600.0, 60.0)
    assert ServerConfig(max_workers=8, insecure=True).stream_limit == 4  # small pools keep half their threads free
    config = ServerConfig.from_mapping(
        {
            "max_workers": 32,
            "max_concurrent_streams": 20,
            "rate_limit_per_s": 2.5,
            "rate_limit_burst": 4,
            "stream_timeout_s": 120,
            "stream_idle_timeout_s": 15.5,
            "insecure": True,
        }
    )
    assert (config.stream_limit, config.rate_limit_per_s, config.rate_burst) == (20, 2.5, 4)
    assert (config.stream_timeout_s, config.stream_idle_timeout_s) == (120, 15.5)
    assert ServerConfig(rate_limit_per_s=2.5, insecure=True).rate_burst == 3  # one second's worth
    assert ServerConfig(rate_limit_per_s=0.1, insecure=True).rate_burst == 1
    path = tmp_path / "limits.toml"
    path.write_text("insecure = true\nmax_workers = 64\nmax_concurrent_streams = 40\nrate_limit_per_s = 1\nstream_idle_timeout_s = 30\n")
    from_toml = ServerConfig.from_toml(path)
    assert (from_toml.stream_limit, from_toml.rate_limit_per_s, from_toml.stream_idle_timeout_s) == (40, 1, 30)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_concurrent_streams": 0}, r"max_concurrent_streams must be an integer from 1 to max_workers - 1 = 255 .* got 0"),
        ({"max_concurrent_streams": 256}, r"max_concurrent_streams must be .* got 256; lower it or raise max_workers"),
        ({"max_workers": 8, "max_concurrent_streams": 8}, r"from 1 to max_workers - 1 = 7"),
        ({"max_concurrent_streams": 2.5}, r"max_concurrent_streams must be an integer .* got 2.5"),
        ({"max_concurrent_streams": True}, r"max_concurrent_streams must be an integer"),
        ({"rate_limit_per_s": 0}, r"rate_limit_per_s must be a positive number, got 0"),
        ({"rate_limit_per_s": "fast"}, r"rate_limit_per_s must be a positive number, got 'fast'"),
        ({"rate_limit_per_s": math.inf}, r"rate_limit_per_s must be a positive number, got inf"),
        ({"rate_limit_burst": 3}, r"rate_limit_burst only applies with rate_limit_per_s"),
        ({"rate_limit_per_s": 1, "rate_limit_burst": 0}, r"rate_limit_burst must be an integer >= 1, got 0"),
        ({"rate_limit_per_s": 1, "rate_limit_burst": 1.5}, r"rate_limit_burst must be an integer >= 1, got 1.5"),
        ({"stream_timeout_s": 0}, r"stream_timeout_s must be a positive number, got 0"),
        ({"stream_idle_timeout_s": -1}, r"stream_idle_timeout_s must be a positive number, got -1"),
        ({"stream_idle_timeout_s": math.nan}, r"stream_idle_timeout_s must be a positive number, got nan"),
        ({"resume_budget_bytes": -1}, r"resume_budget_bytes must be an integer >= 0 .* got -1"),
        ({"resume_budget_bytes": 1.5}, r"resume_budget_bytes must be an integer >= 0 .* got 1.5"),
        ({"resume_expiry_s": 0}, r"resume_expiry_s must be a positive number, got 0"),
        ({"max_concurent_streams": 3}, r"unknown server setting\(s\): max_concurent_streams"),
    ],
)
def test_bad_limits_are_rejected_naming_the_key(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig.from_mapping(values)


def test_a_cohort_must_fit_the_stream_limit() -> None:
    from server.config import SecAggConfig

    job = JobConfig(secure_aggregation=SecAggConfig(cohort_size=8))
    with pytest.raises(ConfigError, match=r"cohort_size=8 members must wait in JoinCohort at once .* above max_concurrent_streams=7"):
        ServerConfig(max_workers=64, max_concurrent_streams=7, jobs=(job,), insecure=True)
    with pytest.raises(ConfigError, match=r"above max_concurrent_streams=6; raise max_concurrent_streams \(or max_workers\)"):
        ServerConfig(max_workers=12, jobs=(job,), insecure=True)
    assert ServerConfig(max_workers=64, max_concurrent_streams=8, jobs=(job,), insecure=True).stream_limit == 8


# -- the server command's flags ------------------------------------------------------


def command_options(**given: Any) -> dict[str, Any]:
    """What click hands `tributary server`: every option, None where not given."""
    from tributary.cli import server

    options: dict[str, Any] = {param.name: None for param in server.params if param.name is not None}
    options["seed"] = 0
    options["insecure"] = True
    options.update(given)
    return options


def test_limit_flags_reach_the_config() -> None:
    from tributary._server_cmd import build_config

    config, _ = build_config(
        command_options(
            task="digits",
            max_workers=32,
            max_concurrent_streams=10,
            rate_limit_per_s=3.0,
            rate_limit_burst=6,
            stream_timeout_s=90.0,
            stream_idle_timeout_s=9.0,
        )
    )
    assert (config.stream_limit, config.rate_limit_per_s, config.rate_burst) == (10, 3.0, 6)
    assert (config.stream_timeout_s, config.stream_idle_timeout_s) == (90.0, 9.0)


def test_limit_flags_override_a_config_file(tmp_path: Path) -> None:
    from tributary._server_cmd import build_config

    path = tmp_path / "server.toml"
    path.write_text('insecure = true\nmax_workers = 64\nmax_concurrent_streams = 40\nstream_timeout_s = 100\n[[jobs]]\nid = "a"\n')
    config, _ = build_config(command_options(config_path=path, max_concurrent_streams=20, rate_limit_per_s=1.0))
    assert (config.max_workers, config.stream_limit, config.stream_timeout_s, config.rate_limit_per_s) == (64, 20, 100, 1.0)
    assert [job.job_id for job in config.jobs] == ["a"]
    with pytest.raises(ConfigError, match="max_concurrent_streams must be an integer from 1 to max_workers - 1 = 63"):
        build_config(command_options(config_path=path, max_concurrent_streams=64))


def test_bad_limit_flags_are_named() -> None:
    from click.testing import CliRunner

    from tributary.cli import main

    result = CliRunner().invoke(main, ["server", "--task", "digits", "--rate-limit", "-1"])
    assert result.exit_code != 0
    assert "rate_limit_per_s must be a positive number, got -1.0" in result.output
    result = CliRunner().invoke(main, ["server", "--task", "digits", "--max-workers", "8", "--max-concurrent-streams", "8"])
    assert result.exit_code != 0
    assert "max_concurrent_streams must be an integer from 1 to max_workers - 1 = 7" in result.output
