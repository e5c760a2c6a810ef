"""The `marketo-orchestrator` command, the composition root: it owns `asyncio.run`,
loads the settings, takes data_dir's lock for a daemon and builds it, and is the only
part of the product that starts the simulator.

- `main`: the parser, dispatch, and errors as one line and an exit code.
- `flags`: what every command shares: the common flags, their types, the settings.
- `usage`: what each --help says below the flags: examples and exit codes.
- `run`: `run` and `simulator`; the data-dir lock (`lock_data_dir`).
- `submit`: `submit` and its waiting display.
- `inspect`: `status`, `check` (and its data-dir checks), `split`.
"""

from orchestrator.cli.main import build_parser, main
from orchestrator.cli.run import lock_data_dir

__all__ = ["build_parser", "lock_data_dir", "main"]
