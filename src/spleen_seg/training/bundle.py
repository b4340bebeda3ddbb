"""The MONAI bundle (``configs/*.json``), generated from the recipe in ``spleen_seg.config``.

The bundle JSON files are *generated* by :func:`bundle_configs`
(``python -m spleen_seg.training.bundle configs``), and a unit test fails when the
committed JSON drifts from the generator. The CLI writes the same generated files into
each run's folder and runs them with MONAI's ConfigWorkflow, so the bundle commands and
``spleen-seg`` execute one and the same configuration, also when the package is
installed outside this repository.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spleen_seg import __version__
from spleen_seg.config import RECIPE, TRAINING_RUN, Recipe, TrainingRun
from spleen_seg.training.transforms import (
    inference_preprocessing_config,
    inversion_config,
    training_deterministic_config,
    training_random_config,
)

BUNDLE_NAME = "spleen_ct_segmentation"
DEFAULT_DATASET_DIR = "/workspace/data/Task09_Spleen"
CONFIG_FILES = (
    "metadata.json",
    "train.json",
    "evaluate.json",
    "inference.json",
    "multi_gpu_train.json",
    "multi_gpu_evaluate.json",
    "inference_trt.json",
)


# Bundle expressions call functions by their full dotted names (spleen_seg.pipeline.network...):
# "$import spleen_seg" binds the package, and importing each submodule sets it as an attribute.
# Every-epoch resumable checkpoint (and --resume): attached in code, since a handler in
# train#handlers cannot reference the trainer that holds it.
_ATTACH_RESUME = "$spleen_seg.training.train.attach_resume(@train#trainer, @network, @optimizer, @ckpt_dir, @resume)"
# One line per validation with elapsed time and ETA; after the resume loader (the restored epoch).
_ATTACH_PROGRESS = "$spleen_seg.training.train.attach_progress(@train#trainer, @validate#evaluator)"
# --init_weights: copy them into the network before the trainer starts (nothing without them). Last
# before the run: the trainer (and with it the network's random initialisation) is built first, in
# the order the reference builds it, so a run without init weights is the same run as before.
_START_FROM = "$spleen_seg.training.train.start_from(@network, @init_weights, @ckpt_dir, @fix_msd_orientation)"
# With init weights the first validation runs before the first update (not when resuming: the
# network then continues from its checkpoint).
_VALIDATE_AT_START = "$@init_weights is not None and not @resume"


def _common(recipe: Recipe) -> dict[str, Any]:
    """Keys shared by train.json and inference.json (each file must run alone)."""
    return {
        "bundle_root": ".",
        "ckpt_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": DEFAULT_DATASET_DIR,
        "device_name": "auto",
        "device": "$spleen_seg.pipeline.network.resolve_device(@device_name)",
        # AMP as in the bundle, where it exists: autocast is a CUDA feature here.
        "amp": "$@device.type == 'cuda'",
        "network_def": {"_target_": "UNet", **recipe.network.kwargs()},
        "network": "$@network_def.to(@device)",
    }


def _sliding_window(recipe: Recipe) -> dict[str, Any]:
    inf = recipe.inference
    return {
        "_target_": "SlidingWindowInferer",
        "roi_size": list(inf.roi_size),
        "sw_batch_size": inf.sw_batch_size,
        "overlap": inf.overlap,
    }


def _train_section(recipe: Recipe) -> dict[str, Any]:
    tr = recipe.training
    return {
        "deterministic_transforms": training_deterministic_config(recipe.preprocessing, recipe.inference.roi_size),
        "random_transforms": training_random_config(recipe, tr),
        "preprocessing": {
            "_target_": "Compose",
            "transforms": "$@train#deterministic_transforms + @train#random_transforms",
        },
        "datalist": {
            "_target_": "spleen_seg.training.data.msd_datalist",
            "dataset_dir": "@dataset_dir",
            "split": "training",
            "val_count": "@val_count",
        },
        "dataset": {
            "_target_": "CacheDataset",
            "data": "@train#datalist",
            "transform": "@train#preprocessing",
            "cache_rate": tr.cache_rate,
            "num_workers": "@num_workers",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@train#dataset",
            "batch_size": tr.batch_size,
            "shuffle": True,
            "num_workers": "@num_workers",
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {
                    "_target_": "AsDiscreted",
                    "keys": ["pred", "label"],
                    "argmax": [True, False],
                    "to_onehot": recipe.network.out_channels,
                },
            ],
        },
        "handlers": [
            {
                "_target_": "ValidationHandler",
                "validator": "@validate#evaluator",
                "epoch_level": True,
                "interval": "@val_interval",
                "exec_at_start": _VALIDATE_AT_START,
            },
            {
                "_target_": "StatsHandler",
                "tag_name": "train_loss",
                "output_transform": "$monai.handlers.from_engine(['loss'], first=True)",
            },
            {
                "_target_": "TensorBoardStatsHandler",
                "log_dir": "@output_dir",
                "tag_name": "train_loss",
                "output_transform": "$monai.handlers.from_engine(['loss'], first=True)",
            },
        ],
        "key_metric": {
            "train_accuracy": {
                "_target_": "ignite.metrics.Accuracy",
                "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
            }
        },
        "trainer": {
            "_target_": "SupervisedTrainer",
            "max_epochs": "@epochs",
            "device": "@device",
            "train_data_loader": "@train#dataloader",
            "network": "@network",
            "loss_function": "@loss",
            "optimizer": "@optimizer",
            "inferer": "@train#inferer",
            "postprocessing": "@train#postprocessing",
            "key_train_metric": "@train#key_metric",
            "train_handlers": "@train#handlers",
            "amp": "@amp",
        },
    }


def _validate_section(recipe: Recipe) -> dict[str, Any]:
    return {
        "preprocessing": {"_target_": "Compose", "transforms": "%train#deterministic_transforms"},
        "datalist": {
            "_target_": "spleen_seg.training.data.msd_datalist",
            "dataset_dir": "@dataset_dir",
            "split": "validation",
            "val_count": "@val_count",
        },
        "dataset": {
            "_target_": "CacheDataset",
            "data": "@validate#datalist",
            "transform": "@validate#preprocessing",
            "cache_rate": recipe.training.cache_rate,
            "num_workers": "@num_workers",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@validate#dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": "@num_workers",
        },
        "inferer": _sliding_window(recipe),
        "postprocessing": "%train#postprocessing",
        "handlers": [
            {"_target_": "StatsHandler", "iteration_log": False},
            {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "iteration_log": False},
            {
                # ignite's DiskSaver writes atomically (temp file + rename); a single-entry
                # save_dict stores the plain state dict, as the official models/model.pt.
                "_target_": "CheckpointSaver",
                "save_dir": "@ckpt_dir",
                "save_dict": {"model": "@network"},
                "save_key_metric": True,
                "key_metric_filename": "model.pt",
            },
        ],
        "key_metric": {
            "val_mean_dice": {
                "_target_": "MeanDice",
                "include_background": False,
                "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
            }
        },
        "additional_metrics": {
            "val_accuracy": {
                "_target_": "ignite.metrics.Accuracy",
                "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
            }
        },
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@validate#dataloader",
            "network": "@network",
            "inferer": "@validate#inferer",
            "postprocessing": "@validate#postprocessing",
            "key_val_metric": "@validate#key_metric",
            "additional_metrics": "@validate#additional_metrics",
            "val_handlers": "@validate#handlers",
            "amp": "@amp",
        },
    }


def train_config(recipe: Recipe = RECIPE, run: TrainingRun = TRAINING_RUN) -> dict[str, Any]:
    tr = recipe.training
    return {
        "imports": ["$import glob", "$import os", "$import ignite", "$import spleen_seg",
                    "$import spleen_seg.pipeline.network",
                    "$import spleen_seg.training.train", "$import spleen_seg.training.distributed"],
        **_common(recipe),
        "epochs": tr.max_epochs,
        "val_interval": tr.val_interval,
        "val_count": tr.val_count,
        "num_workers": tr.num_workers,
        "resume": run.resume,
        "fix_msd_orientation": run.fix_msd_orientation,
        "init_weights": run.init_weights,
        "loss": {
            "_target_": "DiceCELoss",
            "to_onehot_y": True,
            "softmax": True,
            "squared_pred": True,
            "batch": True,
        },
        "optimizer": {"_target_": "Novograd", "params": "$@network.parameters()", "lr": tr.learning_rate},
        "train": _train_section(recipe),
        "validate": _validate_section(recipe),
        "initialize": [f"$monai.utils.set_determinism(seed={tr.seed})"],
        "run": [_ATTACH_RESUME, _ATTACH_PROGRESS, _START_FROM, "$@train#trainer.run()"],
    }


def evaluate_config(recipe: Recipe = RECIPE) -> dict[str, Any]:
    """Overrides train.json: metrics in the original image space (inverted transforms)."""
    return {
        "validate#dataset#cache_rate": 0,
        "validate#postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                inversion_config(["pred", "label"], "@validate#preprocessing", nearest=[False, True]),
                {
                    "_target_": "AsDiscreted",
                    "keys": ["pred", "label"],
                    "argmax": [True, False],
                    "to_onehot": recipe.network.out_channels,
                },
            ],
        },
        "validate#handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "$@ckpt_dir + '/model.pt'",
                "load_dict": {"model": "@network"},
            },
            {"_target_": "StatsHandler", "iteration_log": False},
            {
                # The reference lists "val_acc" here, a metric that does not exist
                # (it is named val_accuracy), so its accuracy was never saved.
                "_target_": "MetricsSaver",
                "save_dir": "@output_dir",
                "metrics": ["val_mean_dice", "val_accuracy"],
                "metric_details": ["val_mean_dice"],
                # Names each row of val_mean_dice_raw.csv after its image.
                "batch_transform": "$lambda x: [xx['image'].meta for xx in x]",
                "summary_ops": "*",
            },
            {"_target_": "spleen_seg.training.evaluate.CaseMetricsWriter", "output_path": "$@output_dir + '/case_metrics.csv'"},
        ],
        "run": ["$@validate#evaluator.run()"],
    }


def inference_config(recipe: Recipe = RECIPE) -> dict[str, Any]:
    return {
        "imports": ["$import glob", "$import os", "$import spleen_seg", "$import spleen_seg.pipeline.network",
                    "$import spleen_seg.pipeline.tta"],
        **_common(recipe),
        # Flip test-time augmentation, e.g. --tta_axes xyz (pipeline/tta.py); "" = none, as the reference.
        "tta_axes": "",
        "output_ext": ".nii.gz",
        # The reference writes masks as float32; a label map is uint8.
        "output_dtype": "$numpy.uint8",
        "output_postfix": "trans",
        "separate_folder": True,
        "datalist": {"_target_": "spleen_seg.training.data.msd_datalist", "dataset_dir": "@dataset_dir", "split": "test"},
        "preprocessing": {
            "_target_": "Compose",
            "transforms": inference_preprocessing_config(recipe.preprocessing),
        },
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": _sliding_window(recipe),
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                inversion_config("pred", "@preprocessing", nearest=False),
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_ext": "@output_ext",
                    "output_dtype": "@output_dtype",
                    "output_postfix": "@output_postfix",
                    "separate_folder": "@separate_folder",
                },
            ],
        },
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            # The weights' record decides what --tta_axes risks (pipeline/tta.py, check_tta_axes).
            "inferer": "$spleen_seg.pipeline.tta.bundle_inferer(@inferer, @tta_axes, @checkpointloader#load_path)",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": "@amp",
        },
        "checkpointloader": {
            "_target_": "CheckpointLoader",
            "load_path": "$@bundle_root + '/models/model.pt'",
            "load_dict": {"model": "@network"},
        },
        "initialize": [
            f"$monai.utils.set_determinism(seed={recipe.training.seed})",
            "$@checkpointloader(@evaluator)",
        ],
        "run": ["$@evaluator.run()"],
    }


def inference_trt_config(recipe: Recipe = RECIPE) -> dict[str, Any]:
    """Overrides inference.json to run the TorchScript/TensorRT module written by
    ``python -m monai.bundle trt_export ... --filepath models/model_trt.ts`` (needs torch_tensorrt)."""
    return {
        "imports": ["$import glob", "$import os", "$import spleen_seg", "$import spleen_seg.pipeline.network",
                    "$import torch_tensorrt"],
        "network_def": "$torch.jit.load(@bundle_root + '/models/model_trt.ts')",
        # The engine already holds its precision; its weights need no checkpoint loader.
        "evaluator#amp": False,
        "initialize": [f"$monai.utils.set_determinism(seed={recipe.training.seed})"],
    }


def _ddp_network() -> dict[str, Any]:
    return {
        "_target_": "spleen_seg.training.distributed.wrap_ddp",
        "module": "$@network_def.to(@device)",
        "device": "@device",
    }


def multi_gpu_train_config(recipe: Recipe = RECIPE) -> dict[str, Any]:
    """Overrides train.json for torchrun: NCCL + one GPU per rank, or gloo on CPU."""
    return {
        "device": "$spleen_seg.training.distributed.rank_device()",
        "network": _ddp_network(),
        "train#sampler": {
            "_target_": "DistributedSampler",
            "dataset": "@train#dataset",
            "even_divisible": True,
            "shuffle": True,
        },
        "train#dataloader#sampler": "@train#sampler",
        "train#dataloader#shuffle": False,
        # Rank 0 alone logs (StatsHandler, TensorBoard: the last two handlers).
        "train#trainer#train_handlers": "$@train#handlers[: -2 if dist.get_rank() > 0 else None]",
        "validate#sampler": {
            "_target_": "DistributedSampler",
            "dataset": "@validate#dataset",
            "even_divisible": False,
            "shuffle": False,
        },
        "validate#dataloader#sampler": "@validate#sampler",
        "validate#evaluator#val_handlers": "$None if dist.get_rank() > 0 else @validate#handlers",
        "initialize": [
            "$import torch.distributed as dist",
            "$spleen_seg.training.distributed.init_process_group()",
            f"$monai.utils.set_determinism(seed={recipe.training.seed})",
            "$import logging",
            "$@train#trainer.logger.setLevel(logging.WARNING if dist.get_rank() > 0 else logging.INFO)",
            "$@validate#evaluator.logger.setLevel(logging.WARNING if dist.get_rank() > 0 else logging.INFO)",
        ],
        "run": [_ATTACH_RESUME, _ATTACH_PROGRESS, _START_FROM, "$@train#trainer.run()"],
        "finalize": ["$spleen_seg.training.distributed.destroy_process_group(@network)"],
    }


def multi_gpu_evaluate_config(recipe: Recipe = RECIPE) -> dict[str, Any]:
    """Overrides train.json + evaluate.json for torchrun evaluation."""
    return {
        "device": "$spleen_seg.training.distributed.rank_device()",
        "network": _ddp_network(),
        "validate#sampler": {
            "_target_": "DistributedSampler",
            "dataset": "@validate#dataset",
            "even_divisible": False,
            "shuffle": False,
        },
        "validate#dataloader#sampler": "@validate#sampler",
        # StatsHandler on rank 0 only; MetricsSaver and CaseMetricsWriter gather to rank 0.
        "validate#handlers#1#_disabled_": "$dist.get_rank() > 0",
        "initialize": [
            "$import torch.distributed as dist",
            "$spleen_seg.training.distributed.init_process_group()",
            "$import logging",
            "$@validate#evaluator.logger.setLevel(logging.WARNING if dist.get_rank() > 0 else logging.INFO)",
        ],
        "run": ["$@validate#evaluator.run()"],
        "finalize": ["$spleen_seg.training.distributed.destroy_process_group(@network)"],
    }


def metadata(recipe: Recipe = RECIPE) -> dict[str, Any]:
    pre = recipe.preprocessing
    roi = list(recipe.inference.roi_size)
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": __version__,
        "changelog": {__version__: "spleen-seg bundle, equal to spleen_ct_segmentation 0.5.9 in network and recipe"},
        "monai_version": "1.6.1",
        "pytorch_version": "2.13.0",
        "numpy_version": "2.4.6",
        "required_packages_version": {"nibabel": "5.4.2", "pytorch-ignite": "0.5.5", "tensorboard": "2.21.0"},
        "name": "Spleen CT segmentation",
        "task": "Decathlon spleen segmentation",
        "description": "A pre-trained model for volumetric (3D) segmentation of the spleen from CT image",
        "authors": "spleen-seg developers",
        "copyright": "Copyright (c) spleen-seg developers",
        "data_source": "Task09_Spleen.tar from http://medicaldecathlon.com/",
        "data_type": "nibabel",
        "image_classes": "single channel data, intensity scaled to [0, 1]",
        "label_classes": "single channel data, 1 is spleen, 0 is everything else",
        "pred_classes": "2 channels OneHot data, channel 1 is spleen, channel 0 is background",
        "eval_metrics": {"mean_dice": 0.96},
        "intended_use": "This is an example, not to be used for diagnostic purposes",
        "references": [
            "Xia, Yingda, et al. 3D Semi-Supervised Learning with Uncertainty-Aware Multi-View Co-Training. "
            "arXiv preprint arXiv:1811.12506 (2018).",
            "Kerfoot E., Clough J., Oksuz I., Lee J., King A.P., Schnabel J.A. (2019) Left-Ventricle "
            "Quantification Using Residual U-Net. STACOM 2018. LNCS 11395.",
        ],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": roi,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                    "preprocessing": {
                        "spacing_mm": list(pre.spacing_mm),
                        "hu_window": list(pre.hu_window),
                        "axcodes": pre.axcodes,
                    },
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": recipe.network.out_channels,
                    "spatial_shape": roi,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "background", "1": "spleen"},
                }
            },
        },
    }


LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def bundle_configs(recipe: Recipe = RECIPE) -> dict[str, dict[str, Any]]:
    """All bundle JSON files, by file name, generated from ``recipe``."""
    return {
        "metadata.json": metadata(recipe),
        "train.json": train_config(recipe),
        "evaluate.json": evaluate_config(recipe),
        "inference.json": inference_config(recipe),
        "multi_gpu_train.json": multi_gpu_train_config(recipe),
        "multi_gpu_evaluate.json": multi_gpu_evaluate_config(recipe),
        "inference_trt.json": inference_trt_config(recipe),
    }


def render_json(content: dict[str, Any]) -> str:
    return json.dumps(content, indent=4) + "\n"


def write_bundle_configs(config_dir: str | Path, recipe: Recipe = RECIPE) -> Path:
    """Write every bundle file (JSON + logging.conf) into ``config_dir``; returns it."""
    from spleen_seg.io.atomic import atomic_write_text

    out = Path(config_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, content in bundle_configs(recipe).items():
        atomic_write_text(out / name, render_json(content))
    atomic_write_text(out / "logging.conf", LOGGING_CONF)
    return out


if __name__ == "__main__":  # python -m spleen_seg.training.bundle configs
    import argparse

    cli = argparse.ArgumentParser(prog="python -m spleen_seg.training.bundle",
                                  description="write the bundle's configs/*.json from the recipe (config.py)")
    cli.add_argument("folder", nargs="?", default="configs", help="where to write them (default: configs)")
    write_bundle_configs(cli.parse_args().folder)
