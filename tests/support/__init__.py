"""One support package for tests and benchmarks (bench/ imports it; never a test module).

- settings: fast_settings, the routes, SIM_KNOBS; settings as TOML; free_port.
- processes: clean_env; CliRunner / CliProcess, the CLI in subprocesses.
- daemons: LockedDaemon, a daemon in the test's process holding data_dir's lock.
- waiting: wait_until, a condition (sync or async) polled until a deadline.
- data: source files written, results and landed rows read back.
- simulators: Simulators (start, stop all), readers of the call log.
- faults: injected faults, kills and foreign load shared by tests/reliability and bench/soak.py.
- http: RecordingProxy, http_get, contains_any, metric_samples.
- postgres: private_server, a PostgreSQL cluster per session; PostgresServer, PostgresDatabase.
"""
