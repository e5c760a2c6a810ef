"""Simulated Marketo subscriptions on loopback, and readers of their call logs.

`Simulators` starts simulators and stops them all at `close()`: the `make_simulator`
fixture (tests/conftest.py) and bench/soak.py use it alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from orchestrator.simulator import Simulator, SimulatorConfig

# The `simulator` fixture's knobs: jobs finish in tens of milliseconds, Marketo's rate window.
FAST_KNOBS: dict[str, Any] = {"job_overhead": 0.05, "rows_per_second": 100_000.0}

MakeSimulator = Callable[..., Awaitable[Simulator]]


class Simulators:
    """Factory: `await simulators.start(**knobs)` starts one on 127.0.0.1, port 0.

    Knobs not given keep the defaults of a fresh Marketo subscription.
    """

    def __init__(self) -> None:
        self.started: list[Simulator] = []

    async def start(self, **knobs: Any) -> Simulator:
        simulator = Simulator(SimulatorConfig().with_knobs(**knobs))
        await simulator.start()
        self.started.append(simulator)
        return simulator

    async def close(self) -> None:
        """Stop every simulator started, the last one first."""
        for simulator in reversed(self.started):
            await simulator.stop()


def imports(sim: Simulator) -> list[dict[str, Any]]:
    """Import calls that created a job (a batch id came back)."""
    return [c for c in sim.calls() if str(c["operation"]).startswith("import") and c["batch_id"]]


def call_count(sim: Simulator) -> int:
    """Calls the simulator has answered (or dropped) so far."""
    return sum(sim.stats()["calls"].values())
