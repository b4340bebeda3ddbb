"""Flip TTA on weights not trained with flips, through each entry point below the CLI: segment's batch
(local and --ray), compare, and the Ray inference actor. Plain --tta is refused before any output
folder, cluster or model; named axes run with the warning in every report (pipeline/tta.py).

The real segmenter runs with a stand-in network (``make_runner`` is replaced): what is tested is
where the rule is applied and what each entry point records, in about a second each.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from threshold_network import sphere

import spleen_seg.pipeline.segmenter as segmenter_module
from spleen_seg.batch.case import SegmentOptions
from spleen_seg.batch.compare import compare_followup
from spleen_seg.batch.ray import InferenceActor, RaySettings
from spleen_seg.batch.run import segment_files
from spleen_seg.errors import ConfigError
from spleen_seg.outputs.compare import COMPARE_FILENAME
from spleen_seg.pipeline.backends import Runner
from spleen_seg.pipeline.tta import FLAG_TTA_UNTRAINED, TTA_AXES

PLAIN_TTA = SegmentOptions(preview=False, tta_axes=TTA_AXES, tta_axes_explicit=False)  # --tta
NAMED_Z = SegmentOptions(preview=False, tta_axes="z")  # --tta-axes z
# The windowed image (0..1) minus this: sphere()'s 150 HU ball is spleen, its -100 HU not.
STAND_IN_THRESHOLD = 0.5


@pytest.fixture
def loads(monkeypatch) -> list:
    """Every model ``load_segmenter`` loads; the stand-in network thresholds the windowed image."""
    loaded: list = []

    def make_runner(weights, *args, **kwargs):
        loaded.append(weights)
        return Runner(lambda batch: batch - STAND_IN_THRESHOLD, 4, "stand-in")

    monkeypatch.setattr(segmenter_module, "make_runner", make_runner)
    return loaded


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"stand-in weights without a record")
    return path


@pytest.mark.parametrize("ray", [None, RaySettings(address="127.0.0.1:1")], ids=["local", "ray"])
def test_plain_tta_is_refused_before_the_output_folder_a_cluster_or_a_model(tmp_path, weights, loads, ray):
    # An unreachable Ray address: the refusal comes first, so nothing tries to connect.
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="--tta refused: .* were not trained with flips \\(no record"):
        segment_files([sphere(tmp_path / "ball.nii.gz", 5)], out, weights, "cpu", progress=False, options=PLAIN_TTA,
                      ray=ray)
    assert not out.exists() and loads == []


def test_named_axes_run_and_every_report_records_the_warning(tmp_path, weights, loads):
    inputs = [sphere(tmp_path / f"ball{i}.nii.gz", 4 + i) for i in range(2)]
    results = segment_files(inputs, tmp_path / "out", weights, "cpu", progress=False, options=NAMED_Z)
    assert [r.status for r in results] == ["ok", "ok"] and loads == [weights]
    for result in results:
        report = json.loads((result.output.parent / "report.json").read_text())
        (warning,) = [w for w in report["warnings"] if w.startswith(FLAG_TTA_UNTRAINED)]
        assert "flip TTA along z" in warning and str(weights) in warning
        assert report["identity"]["options"]["tta_axes"] == "z"
        assert report["quality"]["predictions"] == 2  # the TTA ran


def test_compare_refuses_plain_tta_and_says_the_warning_once_for_named_axes(tmp_path, weights, loads):
    prior, current = sphere(tmp_path / "prior.nii.gz", 5), sphere(tmp_path / "current.nii.gz", 6)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="--tta refused"):
        compare_followup(prior, current, out, weights, "cpu", progress=False, options=PLAIN_TTA)
    assert not out.exists() and loads == []
    compare_followup(prior, current, out, weights, "cpu", progress=False, options=NAMED_Z)
    warnings = json.loads((out / COMPARE_FILENAME).read_text())["warnings"]
    assert len([w for w in warnings if w.startswith(FLAG_TTA_UNTRAINED)]) == 1


def test_the_ray_inference_actor_records_the_warning_with_its_margins(tmp_path, weights, loads):
    # The actor class itself, in this process: what each node's actor does with the options it gets.
    from spleen_seg.io.nifti import read_volume

    actor = InferenceActor(str(weights), "cpu", "auto", False, False, "fp32", "z")
    assert actor.segmenter.tta_warning is not None and loads == [weights]
    array, geometry = read_volume(sphere(tmp_path / "ball.nii.gz", 5))
    prepared = actor.margin(actor.segmenter.prepare(array, geometry))
    assert prepared is not None and prepared.warnings == [actor.segmenter.tta_warning]
    assert np.count_nonzero(prepared.margin > 0) > 0
