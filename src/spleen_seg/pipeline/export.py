"""Export the network: TorchScript, ONNX, OpenVINO IR, TensorRT engines.

All exports except TorchScript wrap the UNet as the spleen-margin model
(``margin_module``: logits[:, 1] - logits[:, 0]); TorchScript exports the
bundle's plain 2-channel network so ``model.ts`` drops into the MONAI bundle as the
official one does. Every file is written atomically.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from spleen_seg.config import RECIPE
from spleen_seg.errors import ConfigError
from spleen_seg.io.atomic import atomic_path

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "openvino", "tensorrt")
ONNX_OPSET = 17
TRT_WORKSPACE_BYTES = 4 << 30
TRT_MAX_BATCH = 4


def _example_input():
    import torch

    return torch.zeros(1, 1, *RECIPE.inference.roi_size)


def margin_module(weights: Path, device: str):
    """The bundle UNet wrapped to output the spleen margin (torch module, eval mode)."""
    import torch

    from spleen_seg.pipeline.network import load_network

    network = load_network(weights, torch.device(device))

    class SpleenMargin(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = self.net(x)
            return logits[:, 1:2] - logits[:, 0:1]

    return SpleenMargin(network).eval()


def export_onnx(weights: Path, dest: Path) -> Path:
    """ONNX graph of the margin model, dynamic batch, fp32."""
    import torch

    module = margin_module(weights, "cpu")
    with atomic_path(dest) as tmp, torch.inference_mode():
        # The TorchScript-based exporter: one self-contained file, no onnxscript needed.
        torch.onnx.export(module, (_example_input(),), str(tmp), input_names=["image"], output_names=["margin"],
                          dynamic_axes={"image": {0: "batch"}, "margin": {0: "batch"}}, opset_version=ONNX_OPSET,
                          dynamo=False)
    return dest


def export_openvino(weights: Path, dest: Path) -> Path:
    """OpenVINO IR (``.xml`` + ``.bin``) converted from the ONNX export."""
    import openvino as ov

    # A fresh intermediate ONNX each time: one left beside ``dest`` could hold other weights.
    with tempfile.TemporaryDirectory(prefix="spleen-seg-export-") as work:
        model = ov.convert_model(str(export_onnx(weights, Path(work) / "margin.onnx")))
        # The .bin is renamed first and the .xml last: a present .xml means a complete pair.
        with atomic_path(dest) as tmp_xml, atomic_path(dest.with_suffix(".bin")) as tmp_bin:
            ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
            tmp_xml.with_suffix(".bin").replace(tmp_bin)
    return dest


def export_torchscript(weights: Path, dest: Path) -> Path:
    """TorchScript of the bundle's 2-channel UNet (the bundle's ``models/model.ts``)."""
    import torch

    from spleen_seg.pipeline.network import load_network

    network = load_network(weights, torch.device("cpu"))
    with atomic_path(dest) as tmp:
        torch.jit.script(network).save(str(tmp))
    return dest


def export_torchscript_margin(weights: Path, dest: Path) -> Path:
    """Traced TorchScript of the margin model: the torch backend's cached form."""
    import torch

    module = margin_module(weights, "cpu")
    with atomic_path(dest) as tmp, torch.inference_mode():
        torch.jit.trace(module, _example_input()).save(str(tmp))
    return dest


def export_tensorrt(weights: Path, dest: Path, precision: str) -> Path:
    """TensorRT engine (fp32 or fp16) built from the ONNX export; needs CUDA and tensorrt."""
    try:
        import tensorrt as trt
    except ImportError as err:
        raise ConfigError("TensorRT export needs the 'tensorrt' package and a CUDA GPU (pip install tensorrt)") from err
    with tempfile.TemporaryDirectory(prefix="spleen-seg-export-") as work:
        serialized = _build_tensorrt(trt, export_onnx(weights, Path(work) / "margin.onnx"), precision)
    with atomic_path(dest) as tmp:
        tmp.write_bytes(bytes(serialized))
    return dest


def _build_tensorrt(trt, onnx_path: Path, precision: str):
    roi = RECIPE.inference.roi_size
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse(onnx_path.read_bytes()):
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {parser.get_error(0)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, TRT_WORKSPACE_BYTES)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    profile.set_shape("image", (1, 1, *roi), (TRT_MAX_BATCH, 1, *roi), (TRT_MAX_BATCH, 1, *roi))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT engine build failed")
    return serialized


def load_tensorrt_engine(engine_path: Path, device: str) -> Callable[[np.ndarray], np.ndarray]:
    """A callable running a serialized engine on ``device``, with torch CUDA buffers."""
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    context = engine.create_execution_context()
    stream = torch.cuda.Stream(device=device)

    def predict(batch: np.ndarray) -> np.ndarray:
        image = torch.from_numpy(batch).to(device)
        out = torch.empty_like(image)
        context.set_input_shape("image", tuple(image.shape))
        context.set_tensor_address("image", image.data_ptr())
        context.set_tensor_address("margin", out.data_ptr())
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return out.cpu().numpy()

    return predict


def export_model(weights: Path, dest: Path, fmt: str, precision: str = "fp32") -> Path:
    """Export ``weights`` (bundle state dict or TorchScript) to ``dest`` in ``fmt``."""
    if fmt not in (*FORMATS, "torchscript_margin"):
        raise ConfigError(f"export format '{fmt}' is not one of {', '.join(FORMATS)}")
    if precision == "fp16" and fmt != "tensorrt":
        raise ConfigError(f"--precision fp16 applies to tensorrt exports; {fmt} is exported in fp32")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    exporters: dict[str, Callable[[], Path]] = {
        "onnx": lambda: export_onnx(Path(weights), dest),
        "openvino": lambda: export_openvino(Path(weights), dest),
        "torchscript": lambda: export_torchscript(Path(weights), dest),
        "torchscript_margin": lambda: export_torchscript_margin(Path(weights), dest),
        "tensorrt": lambda: export_tensorrt(Path(weights), dest, precision),
    }
    return exporters[fmt]()
