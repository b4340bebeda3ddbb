"""How a training run ends, as the user reads it: validated weights with their Dice, or unvalidated weights
named as such, never -1.0; evaluate without validated weights says which file there is instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from spleen_seg.errors import ConfigError
from spleen_seg.training.evaluate import evaluate
from spleen_seg.training.train import TrainingOutcome


def test_outcome_messages_name_the_weights_and_never_minus_one():
    models = Path("/runs/phantoms/models")
    validated = TrainingOutcome(weights=models / "model.pt", validated=True, epochs=10, max_epochs=10,
                                val_interval=5, best_dice=0.91234, best_epoch=5)
    assert validated.message() == f"best validation mean Dice 0.9123 at epoch 5 of 10; weights: {validated.weights}"
    short = TrainingOutcome(weights=models / "model_unvalidated.pt", validated=False, epochs=3,
                            max_epochs=3, val_interval=5)
    text = short.message()
    assert "-1" not in text and "before its first validation (every 5 epochs)" in text
    assert f"NOT validated, are in {short.weights}" in text and "--val-interval" in text


def test_evaluate_without_validated_weights_names_the_unvalidated_ones(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"model\.pt does not exist: train first"):
        evaluate(tmp_path, {"dataset_dir": str(tmp_path)})
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model_unvalidated.pt").write_bytes(b"weights")
    with pytest.raises(ConfigError, match=r"ended before its first validation.*--weights .*model_unvalidated\.pt"):
        evaluate(tmp_path, {"dataset_dir": str(tmp_path)})
