"""Training through the bundle configs (``train.json``), the same files the bundle runs.

``spleen-seg train`` writes the generated bundle into ``<bundle_root>/configs`` (so the
run folder records exactly what ran) and executes it with MONAI's ConfigWorkflow.

How a run ends (:class:`TrainingOutcome`): the best validated weights are
``models/model.pt`` (saved by the validation's CheckpointSaver); a run that ended before
its first validation (fewer epochs than the validation interval) has none, and its last
weights are written to ``models/model_unvalidated.pt``, named so that nobody mistakes them
for validated ones. After each validation one line gives the epoch, the mean Dice, the best
so far, the elapsed time and the run's expected remaining time and end (:func:`attach_progress`).
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
        elapsed = time.monotonic() - started["time"]
        done = epoch - started["epoch"]
        remaining = elapsed / done * (last - epoch) if done > 0 else 0.0
        finish = (datetime.datetime.now() + datetime.timedelta(seconds=remaining)).strftime("%H:%M:%S")
        metric = engine.state.metrics.get(engine.state.key_metric_name or "", float("nan"))
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


def _record_run(bundle_root: Path, config_names: list[str], overrides: dict[str, Any]) -> None:
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
    }
    name = "run_" + "_".join(Path(n).stem for n in config_names) + ".json"
    atomic_write_text(bundle_root / name, json.dumps(info, indent=2, default=str) + "\n")


def run_workflow(bundle_root: str | Path, config_names: list[str], overrides: dict[str, Any]) -> Any:
    """Write the generated bundle into ``bundle_root/configs`` and run it like ``monai.bundle run``.

    ``overrides`` are bundle ids (``dataset_dir``, ``epochs``, ``train#dataset#cache_rate``...)
    and their values, exactly as ``--key value`` on the ``monai.bundle run`` command line.
    Returns the workflow (its ``parser`` gives access to the trainer/evaluator state).
    """
    from monai.bundle import ConfigWorkflow

    from spleen_seg.training.bundle import write_bundle_configs

    root = Path(bundle_root).resolve()
    config_dir = write_bundle_configs(root / "configs")
    overrides = {"bundle_root": str(root), **overrides}
    _record_run(root, config_names, overrides)
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

    The weights get a sidecar ``<weights>.json`` (:func:`weights_record`): whether the run
    mirrored its training images, and with ``fix_msd_orientation`` that they learned true anatomy.
    """
    workflow = run_workflow(bundle_root, ["train.json"], overrides)
    outcome = _outcome(workflow, Path(bundle_root).resolve() / "models")
    from spleen_seg.pipeline.network import write_weights_record

    write_weights_record(outcome.weights, weights_record(workflow.parser.get(RANDOM_TRANSFORMS_ID) or [],
                                                         bool(overrides.get("fix_msd_orientation"))))
    return outcome


def weights_record(random_transforms: list[Any], fix_msd_orientation: bool) -> dict[str, Any]:
    """What ``segment`` needs to know about weights trained with these random transforms.

    ``trained_with_flips`` and ``safe_tta_axes`` from the flips among ``random_transforms``
    (the run's ``train#random_transforms``: the recipe's, or an override), so flip TTA is
    allowed exactly on the axes training mirrored; the orientation convention only when the
    MSD headers were corrected (otherwise the default applies, as before).
    """
    from spleen_seg.pipeline.network import CONVENTION_TRUE, FLIPS_KEY, SAFE_TTA_AXES_KEY, SIDECAR_KEY
    from spleen_seg.training.transforms import mirrored_axes

    axes = mirrored_axes(random_transforms)
    record: dict[str, Any] = {FLIPS_KEY: bool(axes), SAFE_TTA_AXES_KEY: axes}
    if fix_msd_orientation:
        record[SIDECAR_KEY] = CONVENTION_TRUE
    return record
