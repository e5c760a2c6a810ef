"""Settings loader: defaults, TOML, environment, and errors that name their key."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from orchestrator import constants
from orchestrator.config import (
    MIN_CHUNK_BYTES,
    RANGES,
    SECTIONS,
    Secret,
    Settings,
    chunk_bytes_problem,
    env_warnings,
    load_settings,
    resolve_config_path,
)
from orchestrator.errors import ConfigError
from orchestrator.models import ObjectType

REPO = Path(__file__).resolve().parent.parent
CREDS = {
    "MARKETO_BASE_URL": "https://123-abc-456.mktorest.com",
    "MARKETO_CLIENT_ID": "id-1",
    "MARKETO_CLIENT_SECRET": "s3cr3t-value",
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "o.toml"
    path.write_text(text)
    return path


def error_key(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), {**CREDS, **(env or {})})
    return info.value.key


def test_defaults_match_spec() -> None:
    s = load_settings(None, CREDS)
    assert s.data_dir == Path("./orchestrator-data")
    assert s.limits.concurrent_jobs == 2
    assert s.limits.queued_jobs == 10
    assert s.limits.max_chunk_bytes == 9_500_000 < constants.MAX_FILE_BYTES
    # Adobe: "limit each third-party integration to 50 calls per 20 seconds or fewer".
    assert (s.limits.api_calls_per_window, s.limits.api_window_seconds) == (50, 20.0)
    assert s.limits.concurrent_api_calls == 5
    assert s.limits.max_resubmits == 2
    assert (s.limits.daily_quota, s.limits.daily_reserve) == (50_000, 5_000)
    assert s.limits.quota_reset_tz == "America/Chicago"
    assert s.limits.pack_wait_seconds == 5.0
    assert (s.polling.interval, s.polling.max_interval) == (5.0, 30.0)
    assert (s.backoff.initial, s.backoff.max) == (2.0, 300.0)
    assert (s.watch.settle_seconds, s.watch.force_polling) == (2.0, False)
    assert s.http.listen == "127.0.0.1:9400"
    assert s.http.host_port == ("127.0.0.1", 9400)
    assert (s.logging.format, s.logging.level) == ("auto", "info")
    assert s.routes == ()


def test_example_config_loads_with_one_route_per_object_type() -> None:
    s = load_settings(REPO / "config" / "orchestrator.toml", CREDS)
    assert {r.object for r in s.routes} == set(ObjectType)
    cars = s.route("cars")
    assert cars is not None
    assert cars.api_name == "car_c"
    assert all(r.pack for r in s.routes), "packing is on unless a route turns it off"


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'data_dir = "/from/file"\n[http]\nlisten = "127.0.0.1:1"\n')
    env = {
        **CREDS,
        "ORCHESTRATOR_DATA_DIR": "/from/env",
        "ORCHESTRATOR_HTTP_LISTEN": "0.0.0.0:9400",
        "ORCHESTRATOR_LIMITS_QUEUED_JOBS": "7",
        "ORCHESTRATOR_WATCH_FORCE_POLLING": "true",
        "ORCHESTRATOR_PORT": "tcp://10.0.0.1:9400",  # injected by Kubernetes: ignored
    }
    s = load_settings(path, env)
    assert s.data_dir == Path("/from/env")
    assert s.http.listen == "0.0.0.0:9400"
    assert s.limits.queued_jobs == 7
    assert s.watch.force_polling is True


def test_command_line_flags_win_over_the_environment_and_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'data_dir = "/from/file"\n[logging]\nlevel = "error"\nformat = "json"\n',
    )
    env = {
        **CREDS,
        "ORCHESTRATOR_DATA_DIR": "/from/env",
        "ORCHESTRATOR_LOGGING_LEVEL": "warning",
    }
    flags = {"data_dir": ("--data-dir", "/from/flag"), "logging.level": ("--log-level", "debug")}

    s = load_settings(path, env, flags=flags)
    assert s.data_dir == Path("/from/flag")
    assert s.logging.level == "debug"
    assert s.logging.format == "json", "a setting no flag names keeps the file's value"
    without = load_settings(path, env)
    assert (without.data_dir, without.logging.level) == (Path("/from/env"), "warning")


def test_a_bad_flag_value_names_the_flag() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, CREDS, flags={"logging.format": ("--log-format", "yaml")})
    assert info.value.key == "--log-format (sets logging.format)"


def test_secret_from_file_and_never_shown(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("file-secret-xyz\n")
    env = {k: v for k, v in CREDS.items() if k != "MARKETO_CLIENT_SECRET"}
    env["MARKETO_CLIENT_SECRET_FILE"] = str(secret_file)
    s = load_settings(None, env)
    assert s.marketo.client_secret == Secret("file-secret-xyz")
    assert s.marketo.client_secret.reveal() == "file-secret-xyz"
    for text in (repr(s), str(s), f"{s.marketo}", repr(s.marketo.client_secret)):
        assert "file-secret-xyz" not in text
    # The client reads it again from there when Marketo refuses it (a rotated secret).
    assert s.marketo.client_secret_file == str(secret_file)


def test_secret_file_as_a_key(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("key-secret-abc\n")
    path = write(tmp_path, f'[marketo]\nclient_secret_file = "{secret_file}"\n')
    env = {k: v for k, v in CREDS.items() if k != "MARKETO_CLIENT_SECRET"}
    s = load_settings(path, env)
    assert s.marketo.client_secret.reveal() == "key-secret-abc"
    missing = write(tmp_path, f'[marketo]\nclient_secret_file = "{tmp_path / "nope"}"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(missing, env)
    assert info.value.key == "marketo.client_secret_file"


def test_missing_secret_file_names_variable(tmp_path: Path) -> None:
    env = {**CREDS, "MARKETO_CLIENT_SECRET_FILE": str(tmp_path / "nope")}
    del env["MARKETO_CLIENT_SECRET"]
    with pytest.raises(ConfigError) as info:
        load_settings(None, env)
    assert info.value.key == "MARKETO_CLIENT_SECRET_FILE"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("bogus = 1\n", "bogus"),
        ("[limits]\nqueued_jobz = 3\n", "limits.queued_jobz"),
        ('[limits]\nqueued_jobs = "ten"\n', "limits.queued_jobs"),
        ("[limits]\nqueued_jobs = true\n", "limits.queued_jobs"),
        ("[limits]\nqueued_jobs = 1\nconcurrent_jobs = 2\n", "limits.queued_jobs"),
        ("[limits]\nmax_chunk_bytes = 10000001\n", "limits.max_chunk_bytes"),
        ("[limits]\nmax_chunk_bytes = 9999000\n", "limits.max_chunk_bytes"),
        ("[limits]\nconcurrent_jobs = 3\nqueued_jobs = 10\n", "limits.concurrent_jobs"),
        ("[limits]\nqueued_jobs = 11\n", "limits.queued_jobs"),
        ("[limits]\napi_calls_per_window = 101\n", "limits.api_calls_per_window"),
        ("[limits]\nconcurrent_api_calls = 11\n", "limits.concurrent_api_calls"),
        ("[limits]\nmax_resubmits = -1\n", "limits.max_resubmits"),
        ('[limits]\nquota_reset_tz = "Mars/Olympus"\n', "limits.quota_reset_tz"),
        ("[polling]\ninterval = 0\n", "polling.interval"),
        ("[polling]\ninterval = 10.0\nmax_interval = 5.0\n", "polling.max_interval"),
        ("[backoff]\ninitial = 5.0\nmax = 1.0\n", "backoff.max"),
        ('[watch]\nforce_polling = "yes"\n', "watch.force_polling"),
        ('[http]\nlisten = "nope"\n', "http.listen"),
        ('[logging]\nformat = "xml"\n', "logging.format"),
        ('[marketo]\nidentity_url = "ftp://x"\n', "marketo.identity_url"),
        ("marketo = 3\n", "marketo"),
        ('[[routes]]\nobject = "leads"\n', "routes[0].dir"),
        ('[[routes]]\ndir = "a"\nobject = "opportunities"\n', "routes[0].object"),
        ('[[routes]]\ndir = "a"\nobject = "customobject"\n', "routes[0].api_name"),
        (
            '[[routes]]\ndir = "a"\nobject = "programmembers"\nprogram_member_status = "x"\n',
            "routes[0].program_id",
        ),
        (
            '[[routes]]\ndir = "a"\nobject = "programmembers"\nprogram_id = 5\n',
            "routes[0].program_member_status",
        ),
        (
            '[[routes]]\ndir = "a"\nobject = "customobject"\napi_name = "c"\nlist_id = 3\n',
            "routes[0].list_id",
        ),
        ('[[routes]]\ndir = "a"\nobject = "leads"\napi_name = "c"\n', "routes[0].api_name"),
        ('[[routes]]\ndir = "a"\nobject = "leads"\nformat = "xls"\n', "routes[0].format"),
        ('[[routes]]\ndir = "a/b"\nobject = "leads"\n', "routes[0].dir"),
        ('[[routes]]\ndir = "a"\nobject = "leads"\ncolour = 1\n', "routes[0].colour"),
        ('[[routes]]\ndir = "a"\nobject = "leads"\npack = "no"\n', "routes[0].pack"),
        ('[[routes]]\ndir = "a"\nobject = "leads"\npack = 0\n', "routes[0].pack"),
        (
            '[[routes]]\ndir = "a"\nobject = "leads"\nkey_columns = "email"\n',
            "routes[0].key_columns",
        ),
        ('[[routes]]\ndir = "a"\nobject = "leads"\nkey_columns = [" "]\n', "routes[0].key_columns"),
        (
            '[[routes]]\ndir = "a"\nobject = "leads"\nkey_columns = ["email", "Email"]\n',
            "routes[0].key_columns",
        ),
        (
            '[[routes]]\ndir = "a"\nobject = "leads"\nunknown_columns = "ignore"\n',
            "routes[0].unknown_columns",
        ),
        (
            '[[routes]]\ndir = "a"\nobject = "leads"\n[[routes]]\ndir = "a"\nobject = "leads"\n',
            "routes[1].dir",
        ),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    assert error_key(tmp_path, text) == key


def test_bad_environment_value_names_variable(tmp_path: Path) -> None:
    key = error_key(tmp_path, "", {"ORCHESTRATOR_LIMITS_QUEUED_JOBS": "many"})
    assert key == "ORCHESTRATOR_LIMITS_QUEUED_JOBS"


@pytest.mark.parametrize(
    "missing", ["MARKETO_BASE_URL", "MARKETO_CLIENT_ID", "MARKETO_CLIENT_SECRET"]
)
def test_missing_credentials(missing: str) -> None:
    env = {k: v for k, v in CREDS.items() if k != missing}
    with pytest.raises(ConfigError) as info:
        load_settings(None, env)
    assert info.value.key == "marketo." + missing.removeprefix("MARKETO_").lower()
    assert load_settings(None, env, require_credentials=False) == Settings(
        marketo=load_settings(None, env, require_credentials=False).marketo
    )


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[limits\n"), CREDS)
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "absent.toml", CREDS)


def test_route_format_from_extension() -> None:
    s = load_settings(REPO / "config" / "orchestrator.toml", CREDS)
    leads = s.route("leads")
    assert leads is not None
    assert leads.format_for("a.TSV") == "tsv"
    assert leads.format_for("a.ssv") == "ssv"
    assert leads.format_for("a.txt") == "csv"


def test_config_path_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path(None, {}) is None
    assert resolve_config_path(None, {"ORCHESTRATOR_CONFIG": "/x.toml"}) == Path("/x.toml")
    assert resolve_config_path("/y.toml", {"ORCHESTRATOR_CONFIG": "/x.toml"}) == Path("/y.toml")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "orchestrator.toml").write_text("")
    assert resolve_config_path(None, {}) == Path("config/orchestrator.toml")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[marketo]\nrequest_timeout = 0\n", "marketo.request_timeout"),
        ("[marketo]\nrequest_timeout = 3600\n", "marketo.request_timeout"),
        ("[polling]\ninterval = 5000.0\nmax_interval = 6000.0\n", "polling.interval"),
        ("[polling]\nmax_interval = 7200\n", "polling.max_interval"),
        ("[backoff]\ninitial = 0\n", "backoff.initial"),
        ("[backoff]\nmax = 100000\n", "backoff.max"),
        ("[watch]\nsettle_seconds = -1\n", "watch.settle_seconds"),
        ("[watch]\nsettle_seconds = 7200\n", "watch.settle_seconds"),
        ("[polling]\ninterval = inf\nmax_interval = inf\n", "polling.interval"),
        ("[limits]\napi_window_seconds = 0\n", "limits.api_window_seconds"),
        ("[limits]\ndaily_quota = 0\n", "limits.daily_quota"),
        ("[limits]\ndaily_reserve = -1\n", "limits.daily_reserve"),
        ("[limits]\ndaily_quota = 1000\ndaily_reserve = 1000\n", "limits.daily_reserve"),
        ("[limits]\nmax_chunk_bytes = 255\n", "limits.max_chunk_bytes"),
        ("[retention]\nkeep_days = -1\n", "retention.keep_days"),
        ("[retention]\ninterval = 0\n", "retention.interval"),
        ("[limits]\npack_wait_seconds = -0.5\n", "limits.pack_wait_seconds"),
        ("[limits]\npack_wait_seconds = 7200\n", "limits.pack_wait_seconds"),
        (
            '[[routes]]\ndir = "l"\nobject = "leads"\nlist_id = 99999999999\n',
            "routes[0].list_id",
        ),
    ],
)
def test_numeric_keys_out_of_range_are_named(tmp_path: Path, text: str, key: str) -> None:
    assert error_key(tmp_path, text) == key


@pytest.mark.parametrize("where", ["file", "variable"])
def test_the_old_daily_api_calls_key_is_an_error_naming_the_new_keys(
    tmp_path: Path, where: str
) -> None:
    """The daily quota is the subscription's: `daily_api_calls` (our own budget) gave way
    to `daily_quota` and `daily_reserve`, and a config still naming it says so."""
    path = write(tmp_path, "[limits]\ndaily_api_calls = 40000\n") if where == "file" else None
    env = {} if where == "file" else {"ORCHESTRATOR_LIMITS_DAILY_API_CALLS": "40000"}
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {**CREDS, **env})
    expected = {
        "file": "limits.daily_api_calls",
        "variable": "ORCHESTRATOR_LIMITS_DAILY_API_CALLS (sets limits.daily_api_calls)",
    }
    assert caught.value.key == expected[where]
    assert "limits.daily_quota" in caught.value.problem
    assert "limits.daily_reserve" in caught.value.problem
    assert "unknown key" not in str(caught.value)


def test_the_new_quota_keys_load_from_file_and_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "[limits]\ndaily_quota = 200000\ndaily_reserve = 20000\n")
    s = load_settings(path, {**CREDS, "ORCHESTRATOR_LIMITS_DAILY_RESERVE": "0"})
    assert (s.limits.daily_quota, s.limits.daily_reserve) == (200_000, 0)


def test_every_numeric_key_has_a_range() -> None:
    numeric = {
        f"{section}.{f.name}"
        for section, cls in SECTIONS.items()
        for f in fields(cls)
        if str(f.type) in ("int", "float")
    }
    assert numeric == set(RANGES)


def test_limit_above_marketos_says_so_and_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, "[limits]\napi_calls_per_window = 120\n"), CREDS)
    assert caught.value.key == "limits.api_calls_per_window"
    assert "at most 100" in caught.value.problem
    assert "100 calls per 20 s" in caught.value.problem
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {**CREDS, "ORCHESTRATOR_LIMITS_MAX_CHUNK_BYTES": "10000000"})
    assert caught.value.key == ("ORCHESTRATOR_LIMITS_MAX_CHUNK_BYTES (sets limits.max_chunk_bytes)")
    assert "at most 9995904 bytes" in caught.value.problem


@pytest.mark.parametrize(
    "max_bytes",
    [constants.MAX_CHUNK_BYTES_CAP + 1, constants.MAX_FILE_BYTES, 255, 0],
)
def test_one_chunk_size_bound_for_the_config_and_split(tmp_path: Path, max_bytes: int) -> None:
    """`split --max-bytes` is checked by `chunk_bytes_problem`, limits.max_chunk_bytes by
    the range table: the same range, the same words."""
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, f"[limits]\nmax_chunk_bytes = {max_bytes}\n"), CREDS)
    assert caught.value.problem == chunk_bytes_problem(max_bytes)
    assert chunk_bytes_problem(constants.MAX_CHUNK_BYTES_CAP) is None
    assert chunk_bytes_problem(MIN_CHUNK_BYTES) is None


def test_range_error_from_the_environment_names_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "[polling]\ninterval = 1.0\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {"ORCHESTRATOR_POLLING_MAX_INTERVAL": "0.5"}, require_credentials=False)
    assert caught.value.key == "ORCHESTRATOR_POLLING_MAX_INTERVAL (sets polling.max_interval)"
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"ORCHESTRATOR_WATCH_SETTLE_SECONDS": "nan"}, require_credentials=False)
    assert caught.value.key.startswith("ORCHESTRATOR_WATCH_SETTLE_SECONDS")
    # The same value from the file names the key.
    assert error_key(tmp_path, "[watch]\nsettle_seconds = nan\n") == "watch.settle_seconds"


def test_misspelt_variables_are_named_and_injected_ones_are_not() -> None:
    env = {
        "ORCHESTRATOR_LIMIT_QUEUED_JOBS": "5",
        "ORCHESTRATOR_HTTP_LISTN": "0.0.0.0:9400",
        "ORCHESTRATOR_PORT": "tcp://10.0.0.1:9400",  # Kubernetes, for a Service "orchestrator"
        "ORCHESTRATOR_PORT_9400_TCP_ADDR": "10.0.0.1",
        "ORCHESTRATOR_SERVICE_HOST": "10.0.0.1",
        "ORCHESTRATOR_LIMITS_QUEUED_JOBS": "5",
    }
    warnings = env_warnings(env)
    assert warnings == [
        "ORCHESTRATOR_HTTP_LISTN is not a known variable and is ignored: "
        "did you mean ORCHESTRATOR_HTTP_LISTEN?",
        "ORCHESTRATOR_LIMIT_QUEUED_JOBS is not a known variable and is ignored: "
        "did you mean ORCHESTRATOR_LIMITS_QUEUED_JOBS?",
    ]


def test_packing_keys(tmp_path: Path) -> None:
    text = (
        "[limits]\npack_wait_seconds = 0\n"
        '[[routes]]\ndir = "a"\nobject = "leads"\npack = false\n'
        '[[routes]]\ndir = "b"\nobject = "leads"\n'
    )
    s = load_settings(write(tmp_path, text), CREDS)
    assert s.limits.pack_wait_seconds == 0.0, "0 is allowed: seal when nothing waits"
    assert [r.pack for r in s.routes] == [False, True]
    env = {**CREDS, "ORCHESTRATOR_LIMITS_PACK_WAIT_SECONDS": "0.25"}
    assert load_settings(write(tmp_path, text), env).limits.pack_wait_seconds == 0.25
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, ""), {**CREDS, "ORCHESTRATOR_LIMITS_PACK_WAIT_SECONDS": "-1"})
    assert caught.value.key.startswith("ORCHESTRATOR_LIMITS_PACK_WAIT_SECONDS")
    assert "at least 0 seconds" in str(caught.value)


def test_header_keys(tmp_path: Path) -> None:
    text = (
        '[[routes]]\ndir = "a"\nobject = "customobject"\napi_name = "car_c"\n'
        'key_columns = [" vin ", "make"]\nunknown_columns = "fail"\n'
        '[[routes]]\ndir = "b"\nobject = "leads"\n'
    )
    strict, default = load_settings(write(tmp_path, text), CREDS).routes
    assert (strict.key_columns, strict.unknown_columns) == (("vin", "make"), "fail")
    assert (default.key_columns, default.unknown_columns) == ((), "warn")


def test_coordination_url_from_the_environment_and_never_shown(tmp_path: Path) -> None:
    url = "postgresql://orch:pg-s3cret@db.example:5432/coord"
    s = load_settings(None, {**CREDS, "ORCHESTRATOR_COORDINATION_URL": url})
    assert s.coordination.url == url
    assert s.coordination.lease_seconds == 30.0
    assert "pg-s3cret" not in repr(s)
    with pytest.raises(ConfigError) as info:
        load_settings(None, {**CREDS, "ORCHESTRATOR_COORDINATION_URL": "mysql://u:pg-s3cret@h/db"})
    assert info.value.key == "ORCHESTRATOR_COORDINATION_URL (sets coordination.url)"
    assert "pg-s3cret" not in str(info.value)
    assert error_key(tmp_path, "[coordination]\nlease_seconds = 0.5\n") == (
        "coordination.lease_seconds"
    )


def test_key_columns(tmp_path: Path) -> None:
    text = (
        '[[routes]]\ndir = "a"\nobject = "customobject"\napi_name = "car_c"\n'
        'key_columns = [" vin ", "plate"]\n'
        '[[routes]]\ndir = "b"\nobject = "leads"\n'
    )
    s = load_settings(write(tmp_path, text), CREDS)
    assert [r.key_columns for r in s.routes] == [("vin", "plate"), ()]
    for bad in ('"vin"', "[1]", '["vin", " "]'):
        text = f'[[routes]]\ndir = "a"\nobject = "leads"\nkey_columns = {bad}\n'
        assert error_key(tmp_path, text) == "routes[0].key_columns"
