"""The scalars a training run's TensorBoard event files hold (train.json's TensorBoardStatsHandlers)."""

from __future__ import annotations

from pathlib import Path


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the run's TensorBoard event files: tag -> [(step, value)] by step."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util.tensor_util import make_ndarray

    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                # The loader turns simple_value scalars into tensor summaries.
                number = value.simple_value if value.HasField("simple_value") else make_ndarray(value.tensor).item()
                found.setdefault(value.tag, []).append((event.step, float(number)))
    return {tag: sorted(values) for tag, values in found.items()}
