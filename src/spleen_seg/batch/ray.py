"""``segment --ray``: the batch on a Ray cluster, with Ray Core tasks and actors.

What runs where, per case (chained by object references; no worker waits on another):

* **prepare task** (a CPU worker, one CPU): reads the input, checks it and preprocesses it
  (``batch.case.read_case``: ``Segmenter.prepare``); returns the case's job and, apart,
  the windowed image.
* **inference actor** (long-lived: one per GPU, or per GPU share, on GPU nodes; one per
  node on CPU-only clusters): loaded the model once, runs the sliding-window network on
  the image (``Segmenter.compute_margin``).
* **finish task** (a CPU worker): inverts the margin, measures and writes the case folder
  atomically (``batch.case.finish_case``).
* **driver** (the ``spleen-seg segment`` process): resume before anything starts
  (``batch.resume``), a bounded window of cases in flight, each result recorded as it
  comes (``summary.csv``, the progress bar, the per-case line).

The stages are the local batch's functions, so the outputs are the same files. Inputs,
outputs and weights must be at the same paths on every node (a shared filesystem, as
cohorts usually are), with the same spleen-seg version installed on every node.

Faults: a bad file fails its case inside the tasks (``batch.case`` turns any exception
into a failed result) and the job goes on. A task whose worker dies (killed, node lost,
out of memory) is retried by Ray up to ``max_retries`` times (its inputs rebuilt from
lineage when their node is gone), then fails its case. An inference actor that dies is
restarted by Ray (``max_restarts``), and the driver sends the network of every case it
held to the next actor, up to ``max_retries`` times per case (logged); beyond that the
job stops with an error, and the same command resumes it.

Why Ray Core rather than Ray Data: every case's result is needed in the driver as soon as
it is known (resume bookkeeping, ``summary.csv``, per-case error lines), one error must
fail one case and never the job, a lost actor's cases must go to another actor, and the
data is a few large 3D volumes, not a table of rows. With Ray Data each of these is a
workaround (``max_errored_blocks``, collecting rows back, blocks of one row), and it
needs pyarrow and pandas. Tasks, actors and ``ray.wait`` express the same pipeline
directly, with backpressure by the window.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spleen_seg import __version__
from spleen_seg.batch.case import (
    CaseJob,
    CaseResult,
    SegmentOptions,
    describe_failure,
    finish_case,
    model_record,
    read_case,
    start_case,
    write_run_info,
)
from spleen_seg.batch.inputs import InputItem, input_source
from spleen_seg.batch.resume import case_identity, input_sha256
from spleen_seg.errors import ConfigError, ResourceError

if TYPE_CHECKING:
    from spleen_seg.pipeline.segmenter import PreparedImage, Segmenter

logger = logging.getLogger(__name__)

# Ray sends usage statistics unless told not to; a hospital cluster must not call out.
RAY_ENV_DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0"}
# Object store of a local instance: the window keeps a few images and margins in it
# (~50 MB each for an MSD-sized CT); Ray spills to disk beyond.
LOCAL_OBJECT_STORE_BYTES = 1 << 30
# Cases in flight per inference actor: one computing, one with its image ready.
CASES_PER_ACTOR = 2
ACTOR_CPUS = 1
CASE_TASK_CPUS = 1


@dataclass(frozen=True)
class RaySettings:
    """How ``segment --ray`` uses the cluster.

    ``address``: a running cluster (``host:port``, ``ray://host:port`` or ``auto``); None
    starts a local instance for this run. ``gpus_per_actor``: the GPU share of each
    inference actor on GPU nodes (0.5: two actors per GPU). ``actors``: how many inference
    actors (None: one per GPU share on GPU clusters, one per node otherwise).
    ``max_retries``: how often a case survives the death of its worker or its actor.
    """

    address: str | None = None
    gpus_per_actor: float = 1.0
    actors: int | None = None
    max_retries: int = 3


@dataclass(frozen=True)
class RayCase:
    """One case to compute: its input index in the batch, the input, its case id (output folder name)."""

    index: int
    item: InputItem
    case: str


# ----------------------------------------------------------------------------- driver


def segment_on_ray(cases: list[RayCase], out_dir: Path, weights: Path, device: str, *, backend: str,
                   options: SegmentOptions, convention: str, identity: dict[str, Any], settings: RaySettings,
                   record: Callable[[int, CaseResult], None], all_inputs: list[InputItem]) -> None:
    """Compute ``cases`` on Ray into ``out_dir``; ``record(index, result)`` as each finishes (in any order).

    ``device``: auto, cpu or cuda, resolved by each actor on its own node. ``identity``:
    the batch's resume identity (``batch_identity``). Raises ``ConfigError`` when Ray is
    not installed, the cluster cannot be reached or has nowhere to run the actors, and
    ``ResourceError`` when every inference actor died more often than allowed.
    """
    ray = _import_ray()
    _init(ray, settings)
    try:
        actors, described = _start_actors(ray, weights, device, backend, options, convention, settings)
        model = model_record(identity, weights, convention, described["device"], described["backend"])
        write_run_info(out_dir, weights, described["device"], described["backend"], all_inputs,
                       orientation_convention=convention)
        _run_window(ray, cases, actors, out_dir, options, model, identity, settings, convention, record)
    finally:
        ray.shutdown()  # a local instance stops; from a cluster the driver disconnects, its actors end


def _import_ray():
    for name, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    try:
        import ray
    except ImportError:
        raise ConfigError('--ray needs Ray: pip install "spleen-seg[ray]"') from None
    return ray


def _init(ray, settings: RaySettings) -> None:
    try:
        if settings.address is None:
            ray.init(address="local", num_cpus=os.cpu_count() or 1, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                     include_dashboard=False, configure_logging=False)
        else:
            ray.init(address=settings.address, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = settings.address or "a local instance"
        raise ConfigError(f"--ray {where}: could not start or join the Ray cluster ({err}); start one with "
                          "'ray start --head' and pass its address (host:port)") from None


def _actor_plan(ray, device: str, settings: RaySettings) -> tuple[int, dict[str, Any], list[str]]:
    """(how many actors, their resource options, the node of each (CPU clusters; else empty))."""
    if device.startswith("cuda:"):
        raise ConfigError(f"--device {device} with --ray: Ray assigns each actor its GPU; use --device cuda or auto")
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    if device != "cpu" and gpus > 0:
        count = settings.actors or max(1, int(gpus / settings.gpus_per_actor + 1e-9))
        return count, {"num_gpus": settings.gpus_per_actor, "num_cpus": 0}, []
    if device.startswith("cuda"):
        raise ConfigError("--device cuda with --ray: the cluster has no GPU (start its nodes with GPUs, or use "
                          "--device cpu)")
    nodes = [node["NodeID"] for node in ray.nodes() if node.get("Alive") and node["Resources"].get("CPU", 0) >= 1]
    if not nodes:
        raise ConfigError("--ray: the cluster has no node with a CPU to run an inference actor")
    count = settings.actors or len(nodes)
    return count, {"num_cpus": ACTOR_CPUS}, [nodes[i % len(nodes)] for i in range(count)]


def _start_actors(ray, weights: Path, device: str, backend: str, options: SegmentOptions, convention: str,
                  settings: RaySettings) -> tuple[list[Any], dict[str, Any]]:
    """Start the inference actors and wait until each has loaded the model; returns them and actor 0's description."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from spleen_seg.pipeline.network import CONVENTION_MSD

    count, resources, nodes = _actor_plan(ray, device, settings)
    actor_class = ray.remote(InferenceActor)
    actors = []
    for number in range(count):
        placement = {}
        if nodes:  # one per node; soft: a restart after the node is lost goes elsewhere
            placement["scheduling_strategy"] = NodeAffinitySchedulingStrategy(nodes[number], soft=True)
        actors.append(actor_class.options(max_restarts=settings.max_retries, max_task_retries=0, **resources,
                                          **placement).remote(
            str(Path(weights).resolve()), device, backend, convention == CONVENTION_MSD, options.all_windows,
            options.precision, options.tta_axes))
    try:
        described = ray.get([actor.describe.remote() for actor in actors])
    except ray.exceptions.RayActorError as err:
        raise ConfigError(f"--ray: an inference actor could not load the model: {_cause(err)}") from None
    for number, info in enumerate(described):
        logger.info("inference actor %d: pid %d on node %s (%s), %s on %s", number, info["pid"], info["node_ip"],
                    info["hostname"], info["backend"], info["device"])
        if info["version"] != __version__:
            raise ConfigError(f"--ray: node {info['hostname']} runs spleen-seg {info['version']}, this driver "
                              f"{__version__}: install the same version on every node")
    return actors, described[0]


def _actor_error_name(ray, err: BaseException) -> str:
    """``ActorDiedError`` or ``ActorUnavailableError``, also when Ray wraps it for a dependent task."""
    kinds = [kind for kind in type(err).__mro__ if issubclass(kind, ray.exceptions.RayActorError)
             and not issubclass(kind, ray.exceptions.RayTaskError)]
    return kinds[0].__name__ if kinds else type(err).__name__


def _cause(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err
    return (str(cause).strip().splitlines() or [type(cause).__name__])[-1]


@dataclass
class _Flight:
    """A case in flight: its task outputs (prepared job and image), its actor, how often its network was retried."""

    case: RayCase
    job: Any
    image: Any
    actor: int
    attempt: int = 0


class _Window:
    """At most ``size`` cases in flight: prepare task -> actor -> finish task, chained by object references.

    No worker waits on another: a case holds a CPU only while it is read, prepared or
    written, and its arrays wait in the object store between the stages.
    """

    def __init__(self, ray, actors: list[Any], out_dir: Path, options: SegmentOptions, model: dict[str, Any],
                 identity: dict[str, Any], settings: RaySettings, mirror_xy: bool) -> None:
        task_options = {"num_cpus": CASE_TASK_CPUS, "max_retries": settings.max_retries, "retry_exceptions": False}
        self.ray, self.actors, self.settings = ray, actors, settings
        self.prepare = ray.remote(prepare_case_task).options(num_returns=2, **task_options)
        self.finish = ray.remote(finish_case_task).options(**task_options)
        self.arguments = (out_dir, options, model, identity, mirror_xy)
        self.mirror_xy = mirror_xy
        self.size = CASES_PER_ACTOR * len(actors) + max(int(ray.cluster_resources().get("CPU", 1)) - len(actors), 1)
        self.pending: dict[Any, _Flight] = {}

    def submit(self, number: int, case: RayCase) -> None:
        job, image = self.prepare.remote(case, *self.arguments)
        self._network(_Flight(case=case, job=job, image=image, actor=number % len(self.actors)))

    def _network(self, flight: _Flight) -> None:
        actor = self.actors[flight.actor].margin
        if flight.attempt:  # waits for a restarting actor (when it is the only one) instead of failing at once
            actor = actor.options(max_task_retries=self.settings.max_retries)
        self.pending[self.finish.remote(flight.job, actor.remote(flight.image), self.mirror_xy)] = flight

    def next_result(self) -> tuple[int, CaseResult] | None:
        """Wait for a case to finish: (input index, result); None when a case went back to another actor."""
        ray = self.ray
        (ref,), _ = ray.wait(list(self.pending), num_returns=1)
        flight = self.pending.pop(ref)
        try:
            return flight.case.index, ray.get(ref)
        except ray.exceptions.RayActorError as err:
            self._retry(flight, err)
            return None
        except ray.exceptions.RayTaskError as err:  # the network or a stage raised outside the case's own handling
            error = err.cause if isinstance(err.cause, BaseException) else err
        except ray.exceptions.RayError as err:  # the worker or its node died more than max_retries times
            error = err
        path = input_source(flight.case.item)
        logger.debug("case %s failed in Ray: %r", flight.case.case, error)
        return flight.case.index, CaseResult(source=path, case=flight.case.case, status="failed",
                                             error=describe_failure(path, error))

    def _retry(self, flight: _Flight, err: BaseException) -> None:
        """The case's actor died: its network goes to the next actor, up to ``max_retries`` times."""
        if flight.attempt >= self.settings.max_retries:
            raise ResourceError(f"--ray: inference actors died {flight.attempt + 1} times while computing "
                                f"{flight.case.case} ({_cause(err)}); the finished cases are kept: run the same "
                                "command again to resume") from None
        following = (flight.actor + 1) % len(self.actors)
        logger.warning("%s: inference actor %d died or is unreachable (%s); retrying on actor %d (attempt %d of %d)",
                       flight.case.case, flight.actor, _actor_error_name(self.ray, err), following, flight.attempt + 2,
                       self.settings.max_retries + 1)
        self._network(_Flight(case=flight.case, job=flight.job, image=flight.image, actor=following,
                              attempt=flight.attempt + 1))

    def cancel(self) -> None:
        for ref in self.pending:
            self.ray.cancel(ref, force=True)


def _run_window(ray, cases: list[RayCase], actors: list[Any], out_dir: Path, options: SegmentOptions,
                model: dict[str, Any], identity: dict[str, Any], settings: RaySettings, convention: str,
                record: Callable[[int, CaseResult], None]) -> None:
    """Keep a bounded number of cases in flight; record each result as it comes."""
    from spleen_seg.pipeline.network import CONVENTION_MSD

    window = _Window(ray, actors, out_dir, options, model, identity, settings, convention == CONVENTION_MSD)
    upcoming = iter(enumerate(cases))
    try:
        while True:
            while len(window.pending) < window.size and (following := next(upcoming, None)) is not None:
                window.submit(*following)
            if not window.pending:
                return
            finished = window.next_result()
            if finished is not None:
                record(*finished)
    except BaseException:  # Ctrl-C or lost actors: stop the cases in flight (their work folders are discarded)
        window.cancel()
        raise


# ----------------------------------------------------------------------------- workers


class InferenceActor:
    """The network, loaded once: ``margin`` runs the sliding window on one prepared image (``compute_margin``)."""

    def __init__(self, weights: str, device: str, backend: str, mirror_xy: bool, all_windows: bool,
                 precision: str, tta_axes: str = "") -> None:
        import ray

        from spleen_seg.pipeline.backends import resolve_device_name
        from spleen_seg.pipeline.segmenter import load_segmenter

        if not Path(weights).is_file():
            raise ConfigError(f"{weights}: weights not found on this node; put weights, inputs and outputs on a "
                              "filesystem every node mounts at the same path")
        if device == "auto":
            device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.device = resolve_device_name(device)
        self.segmenter = load_segmenter(Path(weights), self.device, backend, mirror_xy=mirror_xy, progress=False,
                                        all_windows=all_windows, precision=precision, tta_axes=tta_axes)

    def describe(self) -> dict[str, Any]:
        import socket

        import ray

        return {"pid": os.getpid(), "node_ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname(),
                "device": self.device, "backend": self.segmenter.runner.backend, "version": __version__}

    def margin(self, prepared: PreparedImage | None) -> PreparedImage | None:
        """The margin of one prepared image (None: the case failed before the network; passed on)."""
        return None if prepared is None else self.segmenter.compute_margin(prepared)


_WORKER_SEGMENTERS: dict[bool, Segmenter] = {}


def _worker_segmenter(mirror_xy: bool) -> Segmenter:
    """Preprocessing and inversion in a case task (the network is the actors'): one per worker process."""
    from spleen_seg.pipeline.segmenter import Segmenter

    if mirror_xy not in _WORKER_SEGMENTERS:
        _WORKER_SEGMENTERS[mirror_xy] = Segmenter.without_network(mirror_xy=mirror_xy)
    return _WORKER_SEGMENTERS[mirror_xy]


def prepare_case_task(case: RayCase, out_dir: Path, options: SegmentOptions, model: dict[str, Any],
                      identity: dict[str, Any], mirror_xy: bool) -> tuple[CaseJob, PreparedImage | None]:
    """CPU worker: read, check and preprocess one case. Returns the job and, apart, the image for the network
    (None when the case already failed: the job carries its error)."""
    job = start_case(case.item, out_dir, case=case.case, options=options, model=model,
                     identity=case_identity(identity, input_sha256(case.item)))
    read_case(job, _worker_segmenter(mirror_xy))
    prepared, job.prepared = job.prepared, None
    return job, prepared


def finish_case_task(job: CaseJob, prepared: PreparedImage | None, mirror_xy: bool) -> CaseResult:
    """CPU worker: invert the actor's margin, measure, write the case folder (``batch.case.finish_case``)."""
    job.prepared = prepared
    if prepared is not None and prepared.windows is not None:
        job.timings["network"] = round(prepared.windows.seconds, 4)
    return finish_case(job, _worker_segmenter(mirror_xy))
