"""What a ``segment --ray`` run asks of the cluster, and what it says while it waits.

* :func:`actor_plan`: how many inference actors, with which resources, on which nodes, and
  whether case tasks fit beside them (else the actors do whole cases), from the cluster's
  total resources; a shape that can never run is refused here, at start.
* :class:`StallWatch` and :func:`wait_ready`: the driver's waits, which say on stderr what
  they wait for (the cases per stage, the resources each needs, the cluster's free and total
  resources) once nothing has progressed for ``RaySettings.stall_seconds``.

Only ``ray.cluster_resources``, ``ray.available_resources``, ``ray.nodes`` and ``ray.wait``
are used (the GCS answers them; no dashboard needed), on the ``ray`` module passed in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spleen_seg.errors import ConfigError

logger = logging.getLogger(__name__)

ACTOR_CPUS = 1
CASE_TASK_CPUS = 1
# A run with no case, stage or actor finished for this long says what it waits for; a stage
# of a large CT with flip TTA on a CPU can take minutes, so the default is not shorter.
DEFAULT_STALL_SECONDS = 300.0
MIN_STALL_SECONDS = 1.0
# How often the driver looks at the cases in flight while none finishes.
WAIT_POLL_S = 1.0
# GPU shares are floats: 3 actors of 1/3 GPU fit in one GPU.
GPU_SHARE_TOLERANCE = 1e-9
# Resources of Ray's own bookkeeping, not demands a case waits on (not shown in stall lines).
HIDDEN_RESOURCE_PREFIXES = ("node:", "accelerator_type:", "memory", "object_store_memory")


@dataclass(frozen=True)
class RaySettings:
    """How ``segment --ray`` uses the cluster.

    ``address``: a running cluster (``host:port``, ``ray://host:port`` or ``auto``); None
    starts a local instance for this run. ``gpus_per_actor``: the GPU share of each
    inference actor on GPU nodes (0.5: two actors per GPU). ``actors``: how many inference
    actors (None: one per GPU share on GPU clusters, one per node otherwise).
    ``max_retries``: how often a case survives the death of its worker or its actor.
    ``stall_seconds``: after this long without progress, and again at this interval, say
    on stderr what the run waits for.
    """

    address: str | None = None
    gpus_per_actor: float = 1.0
    actors: int | None = None
    max_retries: int = 3
    stall_seconds: float = DEFAULT_STALL_SECONDS


@dataclass(frozen=True)
class ActorPlan:
    """How a run uses the cluster: ``count`` inference actors with ``resources`` (``ray.remote`` options), placed
    on ``nodes`` (CPU clusters: soft affinity; else empty, Ray places them). ``whole_cases``: no CPU is left for a
    case task beside the actors, so the actors read, segment and write their cases themselves."""

    count: int
    resources: dict[str, Any]
    nodes: list[str]
    whole_cases: bool = False


def actor_plan(ray, device: str, settings: RaySettings) -> ActorPlan:
    """The actors and where case work runs, from the cluster's total resources; refuses a shape that cannot run.

    Why whole cases in the actors rather than fractional CPUs when the actors leave no CPU
    for a task: a fractional (or zero) reservation only hides the CPU the network uses, so
    on a large node Ray would start a case task on every CPU beside the network, which is
    the bottleneck, and Ray sets ``OMP_NUM_THREADS=1`` for a fraction of a CPU; leaving a
    CPU free by starting fewer actors halves a cluster of one-CPU nodes. Whole cases only
    serialise each actor's reading and writing with its network, on nodes that have no
    second CPU to overlap them on; a cluster with a CPU to spare keeps the task pipeline.
    """
    if device.startswith("cuda:"):
        raise ConfigError(f"--device {device} with --ray: Ray assigns each actor its GPU; use --device cuda or auto")
    totals = ray.cluster_resources()
    alive = [node for node in ray.nodes() if node.get("Alive")]
    cpus = {node["NodeID"]: float(node["Resources"].get("CPU", 0.0)) for node in alive}
    gpus = float(totals.get("GPU", 0.0))
    if device != "cpu" and gpus > 0:
        share = settings.gpus_per_actor
        count = settings.actors or max(1, int(gpus / share + GPU_SHARE_TOLERANCE))
        if count * share > gpus + GPU_SHARE_TOLERANCE:
            raise ConfigError(f"--ray: {count} inference actors of {share:g} GPU need {count * share:g} GPUs; the "
                              f"cluster has {resources_text(totals)}")
        return ActorPlan(count, {"num_gpus": share, "num_cpus": 0}, [],
                     whole_cases=max(cpus.values(), default=0.0) < CASE_TASK_CPUS)
    if device.startswith("cuda"):
        raise ConfigError("--device cuda with --ray: the cluster has no GPU (start its nodes with GPUs, or use "
                          "--device cpu)")
    nodes = [node for node, count in cpus.items() if count >= ACTOR_CPUS]
    if not nodes:
        raise ConfigError(f"--ray: the cluster has no node with a CPU to run an inference actor (each needs CPU "
                          f"{ACTOR_CPUS}; the cluster has {resources_text(totals) or 'nothing'}): start its nodes "
                          "with 'ray start --num-cpus N', N >= 1")
    count = settings.actors or len(nodes)
    capacity = sum(int(cpus[node] // ACTOR_CPUS) for node in nodes)
    if count > capacity:
        raise ConfigError(f"--ray: {count} inference actors need CPU {count * ACTOR_CPUS} ({ACTOR_CPUS} each); the "
                          f"cluster's nodes hold {capacity} ({resources_text(totals)})")
    free_cpus = sum(cpus.values()) - count * ACTOR_CPUS
    return ActorPlan(count, {"num_cpus": ACTOR_CPUS}, [nodes[i % len(nodes)] for i in range(count)],
                 whole_cases=free_cpus < CASE_TASK_CPUS)


def _shown(name: str) -> bool:
    return not name.startswith(HIDDEN_RESOURCE_PREFIXES)


def resources_text(totals: dict[str, float], available: dict[str, float] | None = None) -> str:
    """``"CPU 2, GPU 1"``, or with ``available`` free/total: ``"CPU 0/2, GPU 1/1"`` (Ray's bookkeeping left out)."""
    def number(value: float) -> str:
        return f"{value:g}"

    return ", ".join(f"{name} {number(available.get(name, 0.0)) + '/' if available is not None else ''}"
                     f"{number(total)}" for name, total in sorted(totals.items()) if _shown(name))


def demand_text(options: dict[str, Any]) -> str:
    """An actor's or task's resource options as ``"CPU 1"`` / ``"GPU 0.5"``."""
    names = {"num_cpus": "CPU", "num_gpus": "GPU"}
    return ", ".join(f"{names[key]} {value:g}" for key, value in options.items() if key in names and value) or "nothing"


def in_flight_text(stages: dict[str, list[int]], actor_resources: dict[str, Any]) -> str:
    """``"3 cases in flight: 1 in prepare tasks (each needs CPU 1), 2 at inference actors 0, 1 (each needs
    CPU 1)"``: ``stages`` maps prepare, network, finish (or whole: whole cases at the actors) to the actor
    of each case at that stage."""
    task_needs, actor_needs = demand_text({"num_cpus": CASE_TASK_CPUS}), demand_text(actor_resources)

    def at_actors(actors: list[int]) -> str:
        return f"at inference actors {', '.join(map(str, sorted(set(actors))))} (each needs {actor_needs})"

    described = {"prepare": lambda actors: f"in prepare tasks (each needs {task_needs})", "network": at_actors,
                 "whole": at_actors, "finish": lambda actors: f"in finish tasks (each needs {task_needs})"}
    parts = [f"{len(actors)} {described[stage](actors)}" for stage, actors in stages.items() if actors]
    return f"{sum(map(len, stages.values()))} cases in flight: {', '.join(parts)}"


class StallWatch:
    """Says on stderr what the run waits for once it has made no progress for ``seconds``, and again every
    ``seconds`` while that lasts.

    It only reports, it does not give up: what a run waits for can come (an autoscaler adds
    nodes for pending demands, which is why Ray itself keeps infeasible tasks waiting;
    another job frees its CPUs; a restarting actor comes back), one stage can take long on
    its own (flip TTA of a large CT on a CPU), and a cluster that can never run the plan is
    refused at start (:func:`actor_plan`). Ctrl-C or SIGTERM stops the run with its
    summary, and the same command resumes it.
    """

    def __init__(self, ray, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ray, self.seconds, self.clock = ray, seconds, clock
        self.since = self.reported = clock()

    def progressed(self) -> None:
        self.since = self.reported = self.clock()

    def idle(self, advanced: bool, waiting_for: Callable[[], str]) -> None:
        """Nothing came back in the last poll; ``advanced``: yet a stage did finish."""
        if advanced:
            self.progressed()
            return
        now = self.clock()
        if now - self.reported < self.seconds:
            return
        self.reported = now
        logger.warning("--ray: no progress for %.0f s: waiting for %s; cluster resources free/total: %s; still "
                       "waiting (Ctrl-C or SIGTERM stops the run, the same command resumes it)", now - self.since,
                       waiting_for(), resources_text(self.ray.cluster_resources(), self.ray.available_resources()))


def wait_ready(ray, refs: list[Any], watch: StallWatch, waiting_for: Callable[[], str],
                advanced: Callable[[], bool] = lambda: False) -> Any:
    """The first of ``refs`` to be ready; while none is, ``watch`` is told every ``WAIT_POLL_S``."""
    while True:
        ready, _ = ray.wait(refs, num_returns=1, timeout=WAIT_POLL_S, fetch_local=False)
        if ready:
            watch.progressed()
            return ready[0]
        watch.idle(advanced(), waiting_for)
