"""Training through the bundle configs (``train.json``), the same files the bundle runs.

``spleen-seg train`` writes the generated bundle into ``<bundle_root>/configs`` (so the
run folder records exactly what ran) and executes it with MONAI's ConfigWorkflow.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

from spleen_seg import __version__
from spleen_seg.errors import ConfigError

RESUME_PATTERN = "resume_checkpoint_epoch=*.pt"


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


def train(bundle_root: str | Path, overrides: dict[str, Any]) -> float:
    """Run ``train.json``; returns the best validation mean Dice (``models/model.pt``).

    With ``fix_msd_orientation`` the weights learned true anatomy: a sidecar
    ``models/model.pt.json`` records that convention for ``segment``.
    """
    workflow = run_workflow(bundle_root, ["train.json"], overrides)
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    if overrides.get("fix_msd_orientation"):
        from spleen_seg.io.atomic import atomic_write_text
        from spleen_seg.pipeline.network import CONVENTION_TRUE, SIDECAR_KEY, sidecar_path

        weights = Path(bundle_root).resolve() / "models" / "model.pt"
        atomic_write_text(sidecar_path(weights), json.dumps({SIDECAR_KEY: CONVENTION_TRUE}) + "\n")
    return float(evaluator.state.best_metric)
