"""The bundled Marketo Bulk Import simulator: a program of its own.

It imports only the leaves (constants, models, errors, durable, delimited), so it
shares no code path with the client it tests. `server` is the HTTP face; `control`
the test API (in process and under /_sim/); `arguments` the standalone command;
`handlers` the Bulk Import operations and describe calls; `fields` the
subscription's objects and their fields; `gate` tokens, call limits, faults and the
call log; `queue` the subscription's import queue; `records` the stored rows;
`knobs` its settings; `state` its state file.
"""

from orchestrator.simulator.arguments import add_arguments, config_from_args, serve
from orchestrator.simulator.knobs import SimulatorConfig
from orchestrator.simulator.server import Simulator

__all__ = ["Simulator", "SimulatorConfig", "add_arguments", "config_from_args", "serve"]
