"""Training through the bundle configs (``train.json``), the same files the bundle runs.

``spleen-seg train`` writes the generated bundle into ``<bundle_root>/configs`` (so the
run folder records exactly what ran) and executes it with MONAI's ConfigWorkflow.

How a run ends (:class:`TrainingOutcome`): the best validated weights are
``models/model.pt`` (saved by the validation's CheckpointSaver); a run that ended before
its first validation (fewer epochs than the validation interval) has none, and its last
weights are written to ``models/model_unvalidated.pt``, named so that nobody mistakes them
for validated ones. After each validation one line gives the epoch, the mean Dice, the best
so far, the elapsed time and the run's expected remaining time and end (:func:`attach_progress`).

Fine-tuning (``init_weights``, :func:`start_from`): the network starts from existing weights
(a state dict or checkpoint, ``pipeline.network.load_weights_into``'s rules) and the first
validation runs before the first update (epoch 0), so ``models/model.pt`` is never worse on
the validation cases than the weights it started from. ``models/init_weights.json`` records
them (path, sha256, orientation convention), and the orientation convention they were trained
under carries over to the new weights' sidecar (``<weights>.json``).
"""

from __future__ import annotations

import datetime
import json
import logging
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spleen_seg import __version__
from spleen_seg.errors import ConfigError

RESUME_PATTERN = "resume_checkpoint_epoch=*.pt"
BEST_WEIGHTS = "model.pt"
UNVALIDATED_WEIGHTS = "model_unvalidated.pt"
# MONAI's evaluator state before any validation.
NO_METRIC = -1
# The bundle id of the training's per-iteration augmentation (training/bundle.py).
RANDOM_TRANSFORMS_ID = "train#random_transforms"
# The trainer's epoch before its first: a validation at this epoch saw the init weights alone.
START_EPOCH = 0
INIT_RECORD = "init_weights.json"
INIT_OVERRIDE = "init_weights"

logger = logging.getLogger(__name__)


def resume_checkpoint(ckpt_dir: str | Path) -> str:
    """The newest every-epoch checkpoint in ``ckpt_dir`` (for ``resume=True``)."""
    candidates = sorted(Path(ckpt_dir).glob(RESUME_PATTERN), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ConfigError(f"{ckpt_dir}: no {RESUME_PATTERN} to resume from; start without --resume")
    return str(candidates[-1])


def attach_resume(trainer: Any, network: Any, optimizer: Any, ckpt_dir: str, resume: bool) -> None:
    """Save model, optimiser and trainer state atomically after every epoch; with ``resume``
    first load the newest such checkpoint, so a killed run continues where it stopped."""
    from monai.handlers import CheckpointLoader, CheckpointSaver

    state = {"model": network, "optimizer": optimizer, "trainer": trainer}
    if resume:
        CheckpointLoader(load_path=resume_checkpoint(ckpt_dir), load_dict=state).attach(trainer)
    # ignite's DiskSaver renames a finished temp file, and saves on rank 0 only.
    CheckpointSaver(save_dir=ckpt_dir, save_dict=state, file_prefix="resume", save_interval=1, n_saved=1).attach(trainer)
    if resume:
        # The new saver does not know the files of the run it resumed: drop them once
        # a newer checkpoint exists, so a resumed run keeps one file as a fresh one does.
        from ignite.engine import Events

        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: _keep_newest_resume_checkpoint(ckpt_dir))


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def attach_progress(trainer: Any, evaluator: Any) -> None:
    """After each validation, one line on the trainer's logger (rank 0's alone under torchrun): the
    epoch, the mean Dice, the best so far, the elapsed time and the run's remaining time and end.

    The remaining time extrapolates the epochs this process ran (a resumed run counts from
    where it resumed) to the run's last epoch, so it includes the validations to come.
    """
    from ignite.engine import Events

    started: dict[str, float] = {}

    def start(engine: Any) -> None:
        # Attached after the resume checkpoint's loader: the epoch is the restored one.
        started.update(time=time.monotonic(), epoch=engine.state.epoch)

    def report(engine: Any) -> None:
        epoch, last = trainer.state.epoch, trainer.state.max_epochs
        metric = engine.state.metrics.get(engine.state.key_metric_name or "", float("nan"))
        if "time" not in started:  # the validation before the first update (init weights): no time yet
            trainer.logger.info(f"validation before training (the init weights): mean Dice {metric:.4f}")
            return
        elapsed = time.monotonic() - started["time"]
        done = epoch - started["epoch"]
        remaining = elapsed / done * (last - epoch) if done > 0 else 0.0
        finish = (datetime.datetime.now() + datetime.timedelta(seconds=remaining)).strftime("%H:%M:%S")
        trainer.logger.info(
            f"validation at epoch {epoch}/{last}: mean Dice {metric:.4f} (best {engine.state.best_metric:.4f} at "
            f"epoch {engine.state.best_metric_epoch}); elapsed {_duration(elapsed)}, remaining about "
            f"{_duration(remaining)} (ETA {finish})")

    trainer.add_event_handler(Events.STARTED, start)
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, report)


def _keep_newest_resume_checkpoint(ckpt_dir: str) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    files = sorted(Path(ckpt_dir).glob(RESUME_PATTERN), key=lambda p: p.stat().st_mtime)
    for stale in files[:-1]:
        stale.unlink(missing_ok=True)


def _record_run(bundle_root: Path, config_names: list[str], overrides: dict[str, Any],
                extra: dict[str, Any] | None = None) -> None:
    import monai
    import torch

    from spleen_seg.io.atomic import atomic_write_text

    info = {
        "spleen_seg_version": __version__,
        "monai_version": monai.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "command": sys.argv,
        "config_files": config_names,
        "overrides": overrides,
        **(extra or {}),
    }
    name = "run_" + "_".join(Path(n).stem for n in config_names) + ".json"
    atomic_write_text(bundle_root / name, json.dumps(info, indent=2, default=str) + "\n")


def run_workflow(bundle_root: str | Path, config_names: list[str], overrides: dict[str, Any],
                 record: dict[str, Any] | None = None) -> Any:
    """Write the generated bundle into ``bundle_root/configs`` and run it like ``monai.bundle run``.

    ``overrides`` are bundle ids (``dataset_dir``, ``epochs``, ``train#dataset#cache_rate``...)
    and their values, exactly as ``--key value`` on the ``monai.bundle run`` command line;
    ``record`` adds entries to the run's record (``run_<configs>.json``).
    Returns the workflow (its ``parser`` gives access to the trainer/evaluator state).
    """
    from monai.bundle import ConfigWorkflow

    from spleen_seg.training.bundle import write_bundle_configs

    root = Path(bundle_root).resolve()
    config_dir = write_bundle_configs(root / "configs")
    overrides = {"bundle_root": str(root), **overrides}
    _record_run(root, config_names, overrides, record)
    workflow = ConfigWorkflow(
        config_file=[str(config_dir / name) for name in config_names],
        meta_file=str(config_dir / "metadata.json"),
        logging_file=str(config_dir / "logging.conf"),
        workflow_type=None,
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


@dataclass(frozen=True)
class InitWeights:
    """Weights a run starts from: the file, its sha256 and the orientation convention they were trained under."""

    path: Path
    sha256: str
    orientation_convention: str

    def record(self) -> dict[str, str]:
        return {"path": str(self.path), "sha256": self.sha256, "orientation_convention": self.orientation_convention}


def describe_init_weights(path: str | Path) -> InitWeights:
    """sha256 and orientation convention (sidecar, official md5, else true) of a weights file.

    Raises ``ConfigError`` for an unreadable or invalid sidecar."""
    from spleen_seg.io.download import file_sha256
    from spleen_seg.pipeline.network import weights_orientation_convention

    path = Path(path).expanduser().resolve()
    return InitWeights(path=path, sha256=file_sha256(path), orientation_convention=weights_orientation_convention(path))


def check_init_weights(path: str | Path) -> InitWeights:
    """Load ``path`` into a fresh network as :func:`start_from` will, before any data is read:
    a bad file is a one-line ``WeightsError`` (missing, TorchScript, unreadable, not the bundle's UNet)."""
    from spleen_seg.pipeline.network import build, load_weights_into

    load_weights_into(build(), Path(path).expanduser())
    return describe_init_weights(path)


def trained_convention(init: InitWeights | None, fix_msd_orientation: bool, dataset_convention: str | None) -> str | None:
    """The orientation convention the run's weights learn, for their sidecar; None: the default (no sidecar).

    What the network sees decides it: a dataset that declares its convention (``dataset.json``'s
    ``orientation_convention``: a corrections export holds true anatomy) teaches that one, the MSD header
    fix teaches true anatomy, and otherwise fine-tuning keeps the init weights' convention.

    Raises ``ConfigError`` when the choices contradict each other: the header fix on a dataset with true
    headers (it would mirror them), or init weights of the other convention than the data teaches (the
    network would learn mirrored and true anatomy at once).
    """
    from spleen_seg.pipeline.network import CONVENTION_TRUE

    if dataset_convention == CONVENTION_TRUE and fix_msd_orientation:
        raise ConfigError("the dataset declares true headers (dataset.json orientation_convention: true): "
                          "--fix-msd-orientation would mirror them; leave it out")
    taught = CONVENTION_TRUE if fix_msd_orientation else dataset_convention
    if init is not None and taught is not None and init.orientation_convention != taught:
        raise ConfigError(f"{init.path}: these weights were trained under the {init.orientation_convention!r} "
                          f"orientation convention but the dataset teaches {taught!r} anatomy: fine-tuning would mix "
                          "mirrored and true anatomy; start from weights of the same convention")
    if taught is not None:
        return taught
    return init.orientation_convention if init is not None else None


def start_from(network: Any, init_weights: str | None, ckpt_dir: str, fix_msd_orientation: bool = False) -> None:
    """train.json's glue for ``init_weights``: copy them into ``network`` (a DDP wrapper's module), and record
    them in ``<ckpt_dir>/init_weights.json`` and in the sidecar of ``<ckpt_dir>/model.pt``; nothing when None.

    Every rank loads the same file (the ranks stay equal); rank 0 alone writes.
    """
    if init_weights is None:
        return
    import torch.distributed as dist

    from spleen_seg.io.atomic import atomic_write_text
    from spleen_seg.pipeline.network import load_weights_into, write_weights_record

    load_weights_into(getattr(network, "module", network), Path(init_weights).expanduser())
    init = describe_init_weights(init_weights)
    logger.info("starting from %s (sha256 %s, orientation convention %s)", init.path, init.sha256,
                init.orientation_convention)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    models = Path(ckpt_dir)
    atomic_write_text(models / INIT_RECORD, json.dumps(init.record(), indent=2) + "\n")
    # The flips are not known here (a bundle run has no spleen-seg train after it): without them the
    # record allows no plain --tta, the safe side; spleen-seg train rewrites it whole at the end.
    write_weights_record(models / BEST_WEIGHTS,
                         weights_record(None, trained_convention(init, fix_msd_orientation, None), init))


@dataclass(frozen=True)
class TrainingOutcome:
    """How a training run ended: its weights file (which exists) and whether they were validated."""

    weights: Path
    validated: bool
    epochs: int  # the last epoch trained
    max_epochs: int
    val_interval: int
    best_dice: float | None = None  # None when nothing was validated
    best_epoch: int | None = None

    def message(self) -> str:
        if self.validated and self.best_epoch == START_EPOCH:
            return (f"best validation mean Dice {self.best_dice:.4f} at epoch {START_EPOCH}, before training: no "
                    f"later validation ({self.epochs} epochs trained) improved on the init weights; weights (theirs): "
                    f"{self.weights}")
        if self.validated:
            return (f"best validation mean Dice {self.best_dice:.4f} at epoch {self.best_epoch} of {self.epochs}; "
                    f"weights: {self.weights}")
        return (f"training ended after epoch {self.epochs} of {self.max_epochs}, before its first validation "
                f"(every {self.val_interval} epochs): no validated weights; the last weights, NOT validated, are in "
                f"{self.weights} (give --val-interval at most --epochs to validate and save models/{BEST_WEIGHTS})")


def _outcome(workflow: Any, models: Path) -> TrainingOutcome:
    """Check what the run left; without a validation, save the network's last weights as unvalidated."""
    import torch

    from spleen_seg.io.atomic import atomic_path

    trainer = workflow.parser.get_parsed_content("train#trainer")
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    common = {"epochs": int(trainer.state.epoch), "max_epochs": int(trainer.state.max_epochs),
              "val_interval": int(workflow.parser.get_parsed_content("val_interval"))}
    if evaluator.state.best_metric_epoch != NO_METRIC:
        best = models / BEST_WEIGHTS
        if not best.is_file():
            raise RuntimeError(f"validation ran but {best} was not saved")
        return TrainingOutcome(weights=best, validated=True, best_dice=float(evaluator.state.best_metric),
                               best_epoch=int(evaluator.state.best_metric_epoch), **common)
    network = workflow.parser.get_parsed_content("network")
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    dest = models / UNVALIDATED_WEIGHTS
    with atomic_path(dest) as tmp:
        torch.save(state, tmp)
    logger.warning("no validation ran: the last weights were saved, not validated, as %s", dest)
    return TrainingOutcome(weights=dest, validated=False, **common)


def train(bundle_root: str | Path, overrides: dict[str, Any]) -> TrainingOutcome:
    """Run ``train.json``; returns how it ended: the best validated weights (``models/model.pt``) and
    their mean Dice, or, when no validation ran, the last weights in ``models/model_unvalidated.pt``.

    ``overrides["init_weights"]`` (fine-tuning) is checked before anything is written or read: a
    bad file, or a convention the dataset contradicts, raises a one-line error. The weights get
    one sidecar ``<weights>.json`` (:func:`weights_record`): the flips training mirrored (which
    TTA axes are safe), the convention they learned (:func:`trained_convention`: true with
    ``fix_msd_orientation``, the dataset's declared one, else the init weights'), and the init
    weights' sha256, which the run's ``run_train.json`` records too.
    """
    from spleen_seg.pipeline.network import write_weights_record
    from spleen_seg.training.data import dataset_orientation_convention

    init_path = overrides.get(INIT_OVERRIDE)
    init = check_init_weights(init_path) if init_path is not None else None
    dataset = overrides.get("dataset_dir")
    convention = trained_convention(init, bool(overrides.get("fix_msd_orientation")),
                                    dataset_orientation_convention(dataset) if dataset is not None else None)
    if init is not None:
        overrides = {**overrides, INIT_OVERRIDE: str(init.path)}
    record = {INIT_OVERRIDE: init.record()} if init is not None else None
    workflow = run_workflow(bundle_root, ["train.json"], overrides, record)
    outcome = _outcome(workflow, Path(bundle_root).resolve() / "models")
    write_weights_record(outcome.weights, weights_record(workflow.parser.get(RANDOM_TRANSFORMS_ID) or [],
                                                         convention, init))
    return outcome


def weights_record(random_transforms: list[Any] | None, convention: str | None,
                   init: InitWeights | None = None) -> dict[str, Any]:
    """The one record ``segment`` reads about weights trained with these random transforms.

    ``trained_with_flips`` and ``safe_tta_axes`` from the flips among ``random_transforms``
    (the run's ``train#random_transforms``: the recipe's, or an override), so flip TTA is
    allowed exactly on the axes training mirrored (None: not known, no flip keys, so no plain
    ``--tta``); ``orientation_convention`` when the run
    taught one (:func:`trained_convention`; otherwise the default applies, as before); the
    init weights' path and sha256 when it fine-tuned.
    """
    from spleen_seg.pipeline.network import FLIPS_KEY, SAFE_TTA_AXES_KEY, SIDECAR_KEY
    from spleen_seg.training.transforms import mirrored_axes

    record: dict[str, Any] = {}
    if random_transforms is not None:
        axes = mirrored_axes(random_transforms)
        record.update({FLIPS_KEY: bool(axes), SAFE_TTA_AXES_KEY: axes})
    if convention is not None:
        record[SIDECAR_KEY] = convention
    if init is not None:
        record.update(init_weights=str(init.path), init_weights_sha256=init.sha256)
    return record
