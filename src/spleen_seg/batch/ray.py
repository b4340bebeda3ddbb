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

Cluster shapes: the actors reserve CPUs (or GPUs) and every case task one CPU. When the
cluster leaves no CPU for a case task beside the actors (nodes of one CPU each: the actor
takes it), the actors read, segment and write their cases themselves (``segment_case``,
the plain ``segment_one``) instead of waiting forever for a task slot; a cluster without
a CPU for an actor on a CPU plan, or too small for the actors asked for, is refused at
start. A run that makes no progress for ``RaySettings.stall_seconds`` says on stderr what
it waits for (each stage's cases, the actors' and tasks' resource demands, the cluster's
free and total resources) and says it again at that interval; it keeps waiting (the plan
and the stall watch: ``batch.ray_cluster``).

Signals: ``ray.init`` replaces the process's SIGTERM handling (a Python handler that exits
with status 15, and the core worker's failure-signal handler that prints a native stack
dump); the driver restores the handler it had, so SIGTERM stops a ``--ray`` run like the
local batch's (the summary with the cases in flight ``interrupted``, exit 143).

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
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
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
    segment_one,
    start_case,
    write_run_info,
)
from spleen_seg.batch.inputs import InputItem, input_source
from spleen_seg.batch.ray_cluster import (
    CASE_TASK_CPUS,
    ActorPlan,
    RaySettings,
    StallWatch,
    actor_plan,
    demand_text,
    in_flight_text,
    resources_text,
    wait_ready,
)
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
# After Ctrl-C/SIGTERM, how long the driver waits to learn which cases in flight finished
# before it stopped them (the others are recorded as interrupted).
INTERRUPT_GRACE_S = 10.0


@dataclass(frozen=True)
class RayCase:
    """One case to compute: its input index in the batch, the input, its case id (output folder name)."""

    index: int
    item: InputItem
    case: str


# ----------------------------------------------------------------------------- driver


def segment_on_ray(cases: list[RayCase], out_dir: Path, weights: Path, device: str, *, backend: str,
                   options: SegmentOptions, convention: str, identity: dict[str, Any], settings: RaySettings,
                   record: Callable[[int, CaseResult], None], all_inputs: list[InputItem],
                   started: Callable[[int], None] | None = None) -> None:
    """Compute ``cases`` on Ray into ``out_dir``; ``record(index, result)`` as each finishes (in any order).

    ``device``: auto, cpu or cuda, resolved by each actor on its own node. ``identity``:
    the batch's resume identity (``batch_identity``). ``started(index)`` as each case is
    sent to the cluster: a case started and not recorded is in flight, and on Ctrl-C or
    SIGTERM (``KeyboardInterrupt``, re-raised) those that finished before the driver could
    stop them are still recorded, the others are the caller's to record as interrupted.
    Raises ``ConfigError`` when Ray is not installed, the cluster cannot be reached or has
    nowhere to run the actors, and ``ResourceError`` when every inference actor died more
    often than allowed.
    """
    ray = _import_ray()
    _init(ray, settings)
    try:
        plan = actor_plan(ray, device, settings)
        actors, described = _start_actors(ray, plan, weights, device, backend, options, convention, settings)
        model = model_record(identity, weights, convention, described["device"], described["backend"])
        write_run_info(out_dir, weights, described["device"], described["backend"], all_inputs,
                       orientation_convention=convention)
        _run_window(ray, cases, actors, plan, out_dir, options, model, identity, settings, convention, record,
                    started)
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
    handler = signal.getsignal(signal.SIGTERM)
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
    finally:
        _restore_sigterm(handler)


def _restore_sigterm(handler: Any) -> None:
    """Give SIGTERM back to the handler the program had before ``ray.init``.

    ``ray.init`` installs a Python handler that exits with status 15 (no summary, no 143),
    and the core worker installs its failure-signal handler (a native stack dump on stderr,
    then the Python one). ``signal.signal`` sets the C-level handler as well, which removes
    the core worker's for SIGTERM; its handlers for crashes (SIGSEGV, SIGABRT...) stay.
    ``handler`` None (set outside Python) becomes the default action.
    """
    if threading.current_thread() is threading.main_thread():  # signal.signal works only there
        signal.signal(signal.SIGTERM, signal.SIG_DFL if handler is None else handler)


def _start_actors(ray, plan: ActorPlan, weights: Path, device: str, backend: str, options: SegmentOptions,
                  convention: str, settings: RaySettings) -> tuple[list[Any], dict[str, Any]]:
    """Start the inference actors and wait until each has loaded the model; returns them and actor 0's description."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from spleen_seg.pipeline.network import CONVENTION_MSD

    actor_class = ray.remote(InferenceActor)
    actors = []
    for number in range(plan.count):
        placement = {}
        if plan.nodes:  # one per node; soft: a restart after the node is lost goes elsewhere
            placement["scheduling_strategy"] = NodeAffinitySchedulingStrategy(plan.nodes[number], soft=True)
        actors.append(actor_class.options(max_restarts=settings.max_retries, max_task_retries=0, **plan.resources,
                                          **placement).remote(
            str(Path(weights).resolve()), device, backend, convention == CONVENTION_MSD, options.all_windows,
            options.precision, options.tta_axes))
    if plan.whole_cases:
        logger.info("no CPU is left for case tasks beside the %d inference actors (cluster: %s): each actor reads, "
                    "segments and writes its own cases", plan.count, resources_text(ray.cluster_resources()))
    calls = {actor.describe.remote(): number for number, actor in enumerate(actors)}
    watch = StallWatch(ray, settings.stall_seconds)
    described: dict[int, dict[str, Any]] = {}

    def waiting_for() -> str:
        return (f"{len(actors) - len(described)} of {len(actors)} inference actors to start (each needs "
                f"{demand_text(plan.resources)})")

    try:
        while len(described) < len(actors):
            ref = wait_ready(ray, [ref for ref, number in calls.items() if number not in described], watch,
                              waiting_for)
            described[calls[ref]] = ray.get(ref)
    except ray.exceptions.RayActorError as err:
        raise ConfigError(f"--ray: an inference actor could not load the model: {_cause(err)}") from None
    for number, info in sorted(described.items()):
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
    """A case in flight: its actor, the object references of its stages (task mode: the prepare task's job and
    image; the actor's call), how often its network was retried."""

    case: RayCase
    actor: int
    job: Any = None
    image: Any = None
    network: Any = None
    attempt: int = 0


class _Window:
    """At most ``size`` cases in flight: prepare task -> actor -> finish task, chained by object references
    (or, ``plan.whole_cases``, one actor call per case).

    No worker waits on another: a case holds a CPU only while it is read, prepared or
    written, and its arrays wait in the object store between the stages.
    """

    def __init__(self, ray, actors: list[Any], plan: ActorPlan, out_dir: Path, options: SegmentOptions,
                 model: dict[str, Any], identity: dict[str, Any], settings: RaySettings, mirror_xy: bool) -> None:
        task_options = {"num_cpus": CASE_TASK_CPUS, "max_retries": settings.max_retries, "retry_exceptions": False}
        self.ray, self.actors, self.plan, self.settings = ray, actors, plan, settings
        self.prepare = ray.remote(prepare_case_task).options(num_returns=2, **task_options)
        self.finish = ray.remote(finish_case_task).options(**task_options)
        self.arguments = (out_dir, options, model, identity)
        self.mirror_xy = mirror_xy
        free_cpus = max(int(ray.cluster_resources().get("CPU", 1)) - len(actors), 1)
        self.size = CASES_PER_ACTOR * len(actors) + (0 if plan.whole_cases else free_cpus)
        self.pending: dict[Any, _Flight] = {}
        self.watch = StallWatch(ray, settings.stall_seconds)
        self.stages_done: set[Any] = set()

    def submit(self, number: int, case: RayCase) -> None:
        flight = _Flight(case=case, actor=number % len(self.actors))
        if not self.plan.whole_cases:
            flight.job, flight.image = self.prepare.remote(case, *self.arguments, self.mirror_xy)
        self._send(flight)

    def _send(self, flight: _Flight) -> None:
        actor = self.actors[flight.actor]
        method = actor.segment_case if self.plan.whole_cases else actor.margin
        if flight.attempt:  # waits for a restarting actor (when it is the only one) instead of failing at once
            method = method.options(max_task_retries=self.settings.max_retries)
        if self.plan.whole_cases:
            flight.network = result = method.remote(flight.case, *self.arguments)
        else:
            flight.network = method.remote(flight.image)
            result = self.finish.remote(flight.job, flight.network, self.mirror_xy)
        self.pending[result] = flight

    def next_result(self) -> tuple[int, CaseResult] | None:
        """Wait for a case to finish: (input index, result); None when a case went back to another actor."""
        ray = self.ray
        ref = wait_ready(ray, list(self.pending), self.watch, self._waiting_for, self._advanced)
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

    def _advanced(self) -> bool:
        """Whether a stage of a case in flight (its preparation, its network) finished since the last look."""
        if self.plan.whole_cases:
            return False
        refs = [ref for flight in self.pending.values() for ref in (flight.job, flight.network)]
        ready = set(self.ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)[0]) if refs else set()
        advanced = bool(ready - self.stages_done)
        self.stages_done = ready
        return advanced

    def _waiting_for(self) -> str:
        """The cases in flight by stage, with what each stage needs, for a stall line."""
        if self.plan.whole_cases:
            return in_flight_text({"whole": [flight.actor for flight in self.pending.values()]}, self.plan.resources)
        stages: dict[str, list[int]] = {"prepare": [], "network": [], "finish": []}
        for flight in self.pending.values():
            stage = ("finish" if flight.network in self.stages_done else "network" if flight.job in self.stages_done
                     else "prepare")
            stages[stage].append(flight.actor)
        return in_flight_text(stages, self.plan.resources)

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
        self._send(replace(flight, actor=following, attempt=flight.attempt + 1, network=None))

    def stop(self, record: Callable[[int, CaseResult], None]) -> None:
        """Ctrl-C, SIGTERM or lost actors: stop the cases in flight and record those that finished before they
        could be stopped; the rest stay in flight for the caller (a stopped worker's half-written hidden work
        folder is removed by the next run, ``remove_stale_work_dirs``)."""
        ray = self.ray
        # No ray.cancel of the stage tasks: a cancel racing the task's reply aborts the driver in Ray's
        # core worker ("Check failed: ... Tried to complete task that was not pending", seen in our SIGTERM
        # test on Ray 2.60; ray-project/ray#54798 fixed one path of that race). Killing the actors fails
        # every case still waiting for its network at once; a stage already running (reading, writing)
        # finishes within the grace and its case is recorded.
        for actor in self.actors:  # its case, if any, stops now: no folder appears after the summary
            ray.kill(actor, no_restart=True)
        ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=INTERRUPT_GRACE_S,
                            fetch_local=False) if self.pending else ([], [])
        for ref in ready:
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError:  # stopped before it finished
                continue
            record(self.pending.pop(ref).case.index, result)


def _run_window(ray, cases: list[RayCase], actors: list[Any], plan: ActorPlan, out_dir: Path, options: SegmentOptions,
                model: dict[str, Any], identity: dict[str, Any], settings: RaySettings, convention: str,
                record: Callable[[int, CaseResult], None], started: Callable[[int], None] | None) -> None:
    """Keep a bounded number of cases in flight; record each result as it comes."""
    from spleen_seg.pipeline.network import CONVENTION_MSD

    window = _Window(ray, actors, plan, out_dir, options, model, identity, settings, convention == CONVENTION_MSD)
    upcoming = iter(enumerate(cases))
    try:
        while True:
            while len(window.pending) < window.size and (following := next(upcoming, None)) is not None:
                window.submit(*following)
                if started is not None:
                    started(following[1].index)
            if not window.pending:
                return
            finished = window.next_result()
            if finished is not None:
                record(*finished)
    except BaseException:
        window.stop(record)
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

    def segment_case(self, case: RayCase, out_dir: Path, options: SegmentOptions, model: dict[str, Any],
                     identity: dict[str, Any]) -> CaseResult:
        """A whole case here: read, network, write (``batch.case.segment_one``), for clusters that leave no CPU
        for case tasks beside the actors (``ActorPlan.whole_cases``)."""
        return segment_one(self.segmenter, case.item, out_dir, case=case.case, options=options, model=model,
                           identity=case_identity(identity, input_sha256(case.item)))


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
