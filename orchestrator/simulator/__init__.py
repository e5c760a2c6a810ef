"""The bundled Marketo Bulk Import simulator: a program of its own.

It imports only the leaves (constants, models, errors), so it shares no code
path with the client it tests. `server` is the HTTP face; `bulk` the Bulk
Import operations; `gate` tokens, call limits, faults and the call log;
`queue` the subscription's import queue; `records` the stored rows; `config`
its knobs.
"""

from orchestrator.simulator.knobs import SimulatorConfig
from orchestrator.simulator.server import Simulator, add_arguments, config_from_args, serve

__all__ = ["Simulator", "SimulatorConfig", "add_arguments", "config_from_args", "serve"]
