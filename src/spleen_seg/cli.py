"""Command-line interface: parsing and validation only; each command calls one function.

Heavy imports (torch, MONAI) happen inside the command functions so ``--help`` and
flag errors answer at once.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spleen_seg import __version__
from spleen_seg.errors import SpleenSegError

if TYPE_CHECKING:
    from spleen_seg.batch.case import CaseResult

EXIT_USER_ERROR = 2
# 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C; 128 + SIGTERM after SIGTERM.
EXIT_SIGNAL_BASE = 128
EXIT_INTERRUPTED = 130


def _existing_dir(value: str) -> Path:
    path = Path(value)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"folder not found: {value}")
    return path


def _existing_file(value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file not found: {value}")
    return path


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{value}'") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {number}")
    return number


def _non_negative_int(value: str) -> int:
    return 0 if value.strip() == "0" else _positive_int(value)


# ``--ray`` without an address: start a local Ray instance for the run.
RAY_LOCAL = "local"
RAY_ADDRESS = re.compile(r"^(auto|local|ray://\S+|[A-Za-z0-9._-]+:\d{1,5}|\[[0-9A-Fa-f:]+\]:\d{1,5})$")


def _ray_address(value: str) -> str:
    if not RAY_ADDRESS.match(value):
        raise argparse.ArgumentTypeError(f"'{value}' is not a Ray cluster address (host:port, ray://host:port or auto); "
                                         "to start a local instance put --ray after the inputs, or write --ray=local")
    return value


def _gpu_share(value: str) -> float:
    try:
        share = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a GPU share in (0, 1], got '{value}'") from None
    if not 0.0 < share <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a GPU share in (0, 1], got {value}")
    return share


def _device(value: str) -> str:
    from spleen_seg.config import DEVICE_PATTERN

    if not DEVICE_PATTERN.match(value):
        raise argparse.ArgumentTypeError(f"device must be auto, cpu, cuda or cuda:N, got '{value}'")
    return value


def _tta_axes(value: str) -> str:
    from spleen_seg.pipeline.tta import parse_tta_axes

    try:
        axes = parse_tta_axes(value)
    except SpleenSegError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if not axes:
        raise argparse.ArgumentTypeError("expected at least one of x, y, z (or leave out --tta-axes)")
    return axes


def _tta_options(args: argparse.Namespace) -> dict[str, Any]:
    """SegmentOptions' TTA fields: --tta-axes as named, --tta alone all three (checked against the weights)."""
    from spleen_seg.pipeline.tta import TTA_AXES

    if args.tta_axes:
        return {"tta_axes": args.tta_axes, "tta_axes_explicit": True}
    return {"tta_axes": TTA_AXES if args.tta else "", "tta_axes_explicit": False}


def _override(value: str) -> tuple[str, Any]:
    """``key=value`` with a JSON/Python-literal value, as ``monai.bundle run --key value``."""
    import ast

    if "=" not in value:
        raise argparse.ArgumentTypeError(f"override must be KEY=VALUE, got '{value}'")
    key, raw = value.split("=", 1)
    try:
        parsed: Any = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        parsed = raw
    return key, parsed


def _seconds_or_days(value: str, minimum: float) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{value}'") from None
    if not minimum <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= {minimum:g}, got {value}")
    return number


def _stall_seconds(value: str) -> float:
    from spleen_seg.batch.ray_cluster import MIN_STALL_SECONDS

    return _seconds_or_days(value, MIN_STALL_SECONDS)


def _non_negative_float(value: str) -> float:
    return _seconds_or_days(value, 0.0)


def _quiet_seconds(value: str) -> float:
    from spleen_seg.node.settings import MIN_QUIET_SECONDS

    return _seconds_or_days(value, MIN_QUIET_SECONDS)


def _idle_seconds(value: str) -> float:
    from spleen_seg.node.settings import MIN_IDLE_TIMEOUT_SECONDS

    return _seconds_or_days(value, MIN_IDLE_TIMEOUT_SECONDS)


def _node_value(parse):
    """An argparse ``type=`` from a ``node.settings`` parser (its NodeError becomes a flag error)."""
    def convert(value: str):
        from spleen_seg.errors import NodeError

        try:
            return parse(value)
        except NodeError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = parse.__name__.removeprefix("parse_")
    return convert


# The subcommands' parsers, one function each; ``build_parser`` calls them in the order ``--help`` lists them.
# ``quiet`` is the parent parser that accepts -q/-v after the subcommand too.

def _add_verbosity_flags(parser: argparse.ArgumentParser, **default: Any) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines", **default)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug log lines, library warnings and tracebacks of unexpected errors", **default)


def _add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    """The network runtime flags ``compare`` and ``serve`` share, worded as for ``segment``."""
    parser.add_argument("--weights-convention", choices=("msd", "true"), help="as for segment")
    parser.add_argument("--device", type=_device, default="auto", help="auto|cpu|cuda|cuda:N")
    parser.add_argument("--backend", choices=("auto", "torch", "onnx", "openvino", "tensorrt"), default="auto",
                        help="network runtime (auto: OpenVINO on CPU, torch on CUDA)")
    parser.add_argument("--largest-component", action="store_true", help="keep only the largest connected component")


def _add_bundle_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset-dir", type=_existing_dir, required=True, help="MSD Task09 folder (imagesTr/, labelsTr/)")
    parser.add_argument("--bundle-root", type=Path, default=Path("runs/spleen"), help="run folder: configs/, models/, eval/")
    parser.add_argument("--val-count", type=_positive_int, help="last N labelled cases validate (bundle: 9)")
    parser.add_argument("--num-workers", type=_non_negative_int, help="data loader workers (bundle: 4)")
    parser.add_argument("--device", type=_device, default="auto", help="auto|cpu|cuda|cuda:N")
    parser.add_argument("--set", dest="overrides", type=_override, action="append", default=[],
                        metavar="ID=VALUE", help="any bundle override, e.g. --set train#dataloader#batch_size=4")


def _add_segment_parser(sub, quiet: argparse.ArgumentParser) -> None:
    seg = sub.add_parser("segment", parents=[quiet], help="segment CT volumes: NIfTI files, folders of them, or DICOM folders")
    seg.add_argument("inputs", nargs="*", help="NIfTI files (.nii, .nii.gz), folders of them, or DICOM folders")
    seg.add_argument("-o", "--output", type=Path, required=True,
                     help="output folder: <case>/spleen.nii.gz, report.json, preview.png; summary.csv, index.html")
    seg.add_argument("--manifest", type=_existing_file, metavar="CSV",
                     help="CSV listing inputs: a 'path' column (relative to the CSV's folder), optionally 'case_id'")
    seg.add_argument("--num-parts", type=_positive_int, metavar="K",
                     help="split the cases into K parts (job array tasks); with --part-id")
    seg.add_argument("--part-id", type=_non_negative_int, metavar="I",
                     help="segment part I (0..K-1) of --num-parts K, e.g. --part-id $SLURM_ARRAY_TASK_ID")
    seg.add_argument("--weights", type=_existing_file,
                     help="state dict (models/model.pt) or TorchScript (.ts); default: the cached official weights")
    seg.add_argument("--weights-convention", choices=("msd", "true"),
                     help="orientation the weights were trained under (default: official weights msd, "
                          "else <weights>.json sidecar, else true)")
    seg.add_argument("--largest-component", action="store_true", help="keep only the largest connected component")
    seg.add_argument("--stl", action="store_true", help="also write <case>/spleen.stl (LPS mm)")
    seg.add_argument("--strict", action="store_true", help="refuse inputs whose intensities do not look like CT")
    seg.add_argument("--device", type=_device, default="auto", help="auto|cpu|cuda|cuda:N")
    seg.add_argument("--backend", choices=("auto", "torch", "onnx", "openvino", "tensorrt"), default="auto",
                     help="network runtime (auto: OpenVINO on CPU, torch on CUDA)")
    seg.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                     help="fp16: AMP for torch on CUDA, fp16 engine for TensorRT (CPU backends run fp32)")
    seg.add_argument("--all-windows", action="store_true",
                     help="compute every sliding window (the bundle's exact average everywhere; slower)")
    seg.add_argument("--ray", nargs="?", const=RAY_LOCAL, type=_ray_address, metavar="ADDRESS",
                     help="run on a Ray cluster: reading, preprocessing and writing in CPU workers, the network in "
                          "long-lived actors; ADDRESS of a running cluster (host:port from 'ray start --head'), or "
                          "none to start a local instance (pip install \"spleen-seg[ray]\")")
    seg.add_argument("--ray-gpus-per-actor", type=_gpu_share, default=1.0, metavar="SHARE",
                     help="GPU share of each inference actor on GPU nodes (0.5: two actors per GPU; default 1)")
    seg.add_argument("--ray-stall-seconds", type=_stall_seconds, metavar="SECONDS",
                     help="after this long without progress, and again at this interval, say on stderr what the Ray "
                          "run waits for (cases per stage, their resources, the cluster's free resources); default 300")
    seg.add_argument("--tta", action="store_true",
                     help="flip test-time augmentation: average the network over the scan and its 7 mirror images "
                          "(about 8x the network's time; the quality score becomes the mirrored predictions' "
                          "disagreement). Only for weights trained with mirroring (\"trained_with_flips\": true in "
                          "<weights>.json): refused for others, the official weights and the bundle's recipe among "
                          "them, whose masks left-right mirroring breaks")
    seg.add_argument("--tta-axes", type=_tta_axes, metavar="AXES",
                     help="flip TTA over these axes only, e.g. x,y (x left-right, y front-back, z head-feet); implies "
                          "--tta; on axes the weights' record does not declare safe it runs with a warning")
    seg.add_argument("--overwrite", action="store_true",
                     help="recompute every case (default: skip cases an earlier run finished with the same input, "
                          "weights, options and spleen-seg version)")


def _add_train_parser(sub, quiet: argparse.ArgumentParser) -> None:
    train = sub.add_parser("train", parents=[quiet], help="train with the bundle's train.json")
    _add_bundle_run_flags(train)
    train.add_argument("--epochs", type=_positive_int, help="maximum epochs (bundle: 600)")
    train.add_argument("--val-interval", type=_positive_int, help="validate every N epochs (bundle: 5)")
    train.add_argument("--resume", action="store_true", help="continue from the last every-epoch checkpoint")
    train.add_argument("--fix-msd-orientation", action="store_true",
                       help="correct MSD Task09 headers (voxels LPS, headers RAS) so the weights learn true anatomy")
    train.add_argument("--init-weights", type=_existing_file, metavar="WEIGHTS",
                       help="fine-tune: start from these weights (state dict, checkpoint or the official model.pt); "
                            "the first validation runs before the first update")


def _add_evaluate_parser(sub, quiet: argparse.ArgumentParser) -> None:
    ev = sub.add_parser("evaluate", parents=[quiet], help="evaluate with the bundle's evaluate.json (original image space)")
    _add_bundle_run_flags(ev)
    ev.add_argument("--weights", type=_existing_file, help="weights to evaluate (default: <bundle-root>/models/model.pt)")


def _add_demo_parser(sub, quiet: argparse.ArgumentParser) -> None:
    demo = sub.add_parser("demo", parents=[quiet], help="segment a built-in synthetic phantom with the demo weights")
    demo.add_argument("--seed", type=int, default=2026, help="phantom seed")
    demo.add_argument("-o", "--output", type=Path, default=Path("out/demo"), help="output folder")
    demo.add_argument("--device", type=_device, default="auto", help="auto|cpu|cuda|cuda:N")


def _add_export_parser(sub, quiet: argparse.ArgumentParser) -> None:
    export = sub.add_parser("export", parents=[quiet], help="export the network: onnx, torchscript, openvino, tensorrt")
    export.add_argument("--weights", type=_existing_file, required=True, help="state dict (models/model.pt) or TorchScript")
    export.add_argument("--format", choices=("onnx", "torchscript", "openvino", "tensorrt"), required=True)
    export.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="fp16 applies to tensorrt")
    export.add_argument("-o", "--output", type=Path, required=True, help="destination file (.onnx, .ts, .xml, .engine)")


def _add_benchmark_parser(sub, quiet: argparse.ArgumentParser) -> None:
    bench = sub.add_parser("benchmark", parents=[quiet], help="time the network and end-to-end inference per available backend")
    bench.add_argument("--weights", type=_existing_file, required=True, help="weights to time (any bundle state dict)")
    bench.add_argument("--device", type=_device, default="auto", help="auto|cpu|cuda|cuda:N")
    bench.add_argument("--volume", type=_existing_file, help="NIfTI CT for the end-to-end time (default: a phantom)")
    bench.add_argument("--repeats", type=_positive_int, default=5, help="timed network calls per backend")


def _add_data_parser(sub, quiet: argparse.ArgumentParser) -> None:
    data = sub.add_parser("data", parents=[quiet], help="datasets: download MSD Task09, make phantoms")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    phantom = data_sub.add_parser("phantom", parents=[quiet], help="write synthetic CT phantoms in the MSD layout")
    phantom.add_argument("--out", type=Path, required=True, help="dataset folder to create")
    phantom.add_argument("-n", "--num-cases", type=_positive_int, default=24, help="labelled cases (imagesTr)")
    phantom.add_argument("--num-test", type=_non_negative_int, default=0, help="unlabelled cases (imagesTs)")
    phantom.add_argument("--seed", type=int, default=0, help="dataset seed")
    download = data_sub.add_parser("download", parents=[quiet], help="download and extract MSD Task09_Spleen")
    download.add_argument("--root", type=Path, help="cache folder (default: $SPLEEN_SEG_DATA or ~/.cache/spleen-seg/data)")


def _add_weights_parser(sub, quiet: argparse.ArgumentParser) -> None:
    weights = sub.add_parser("weights", parents=[quiet], help="official model weights")
    weights_sub = weights.add_subparsers(dest="weights_command", required=True)
    fetch = weights_sub.add_parser("download", parents=[quiet], help="download the official bundle weights into the cache "
                                                    "($SPLEEN_SEG_WEIGHTS or ~/.cache/spleen-seg/weights)")
    fetch.add_argument("--url", help="weights URL (default: the MONAI model zoo's)")
    fetch.add_argument("--md5", help="expected md5 of the file (default: the official weights')")


def _add_compare_parser(sub, quiet: argparse.ArgumentParser) -> None:
    from spleen_seg.config import GROWTH_THRESHOLD_PERCENT

    cmp = sub.add_parser("compare", parents=[quiet], help="follow-up: segment two CTs of one patient (or reuse OUT's "
                         "earlier results) and measure the spleen's volume change")
    cmp.add_argument("prior", help="the earlier CT: a NIfTI file or a DICOM series folder")
    cmp.add_argument("current", help="the later CT of the same patient")
    cmp.add_argument("-o", "--output", type=Path, required=True,
                     help="output folder: prior/ and current/ (masks, reports), compare.json, compare.png")
    cmp.add_argument("--growth-threshold-percent", type=_non_negative_float, default=GROWTH_THRESHOLD_PERCENT,
                     metavar="P", help=f"flag a volume growth above P %% (default {GROWTH_THRESHOLD_PERCENT:g})")
    cmp.add_argument("--force", action="store_true", help="compare even when the DICOM PatientIDs differ")
    cmp.add_argument("--weights", type=_existing_file, help="as for segment; default: the cached official weights")
    _add_runtime_flags(cmp)
    cmp.add_argument("--tta", action="store_true", help="flip test-time augmentation, as for segment")
    cmp.add_argument("--tta-axes", type=_tta_axes, metavar="AXES", help="as for segment")
    cmp.add_argument("--overwrite", action="store_true", help="segment both scans again even if OUT holds them")


def _add_merge_summaries_parser(sub, quiet: argparse.ArgumentParser) -> None:
    merge = sub.add_parser("merge-summaries", parents=[quiet],
                           help="rebuild OUT/summary.csv and OUT/index.html from the part summaries of "
                                "segment --num-parts (and the journals of killed runs)")
    merge.add_argument("output", type=_existing_dir, help="the -o folder of spleen-seg segment")


def _add_serve_parser(sub, quiet: argparse.ArgumentParser) -> None:
    from spleen_seg.node import settings as node

    serve = sub.add_parser("serve", parents=[quiet], help="run a DICOM node: receive CT series from a PACS, "
                           "segment them, send the DICOM SEG back")
    serve.add_argument("--spool", type=Path, required=True,
                       help="folder for received instances, results and the job table (created, owner-only)")
    serve.add_argument("--ae-title", type=_node_value(node.parse_ae_title), default=node.DEFAULT_AE_TITLE,
                       help=f"this node's AE title (default {node.DEFAULT_AE_TITLE})")
    serve.add_argument("--host", default=node.DEFAULT_HOST, help=f"address to listen on (default {node.DEFAULT_HOST}: all)")
    serve.add_argument("--port", type=_node_value(node.parse_port), default=node.DEFAULT_PORT,
                       help=f"DICOM port (default {node.DEFAULT_PORT})")
    serve.add_argument("--allowed-callers", type=_node_value(node.parse_ae_list), default=(), metavar="AE1,AE2",
                       help="accept associations only from these calling AE titles (default: any); a peer "
                            "chooses its title, so this routes, it does not authenticate (see --allowed-hosts, --tls-ca)")
    serve.add_argument("--max-associations", type=_positive_int, default=node.DEFAULT_MAX_ASSOCIATIONS,
                       help=f"simultaneous incoming associations (default {node.DEFAULT_MAX_ASSOCIATIONS})")
    serve.add_argument("--quiet-seconds", type=_quiet_seconds, default=node.DEFAULT_QUIET_SECONDS,
                       help="a series is complete when none of its instances arrived for this long "
                            f"(default {node.DEFAULT_QUIET_SECONDS:g})")
    serve.add_argument("--destination", dest="destinations", type=_node_value(node.parse_destination),
                       action="append", default=[], metavar="AE@HOST:PORT",
                       help="send results here by C-STORE (repeatable), e.g. ORTHANC@pacs:4242")
    serve.add_argument("--stow-url", type=_node_value(node.parse_stow_url), metavar="URL",
                       help="also send results by STOW-RS to this DICOMweb root, e.g. http://pacs:8042/dicom-web")
    serve.add_argument("--send-report", action="store_true",
                       help="also send the spleen volume as a DICOM SR (TID 1500) and the preview as a Secondary Capture")
    serve.add_argument("--keep-days", type=_non_negative_float, default=node.DEFAULT_KEEP_DAYS,
                       help="delete a series' files this many days after it was done or failed "
                            f"(default {node.DEFAULT_KEEP_DAYS:g}; 0: at once)")
    serve.add_argument("--tls-cert", type=_existing_file, help="PEM certificate: accept DICOM over TLS only")
    serve.add_argument("--tls-key", type=_existing_file, help="PEM private key of --tls-cert")
    serve.add_argument("--tls-ca", type=_existing_file, help="PEM CA bundle: require client certificates it signed "
                       "(the way to authenticate peers: AE titles are not checked credentials)")
    _add_serve_limit_flags(serve)
    serve.add_argument("--weights", type=_existing_file,
                       help="state dict or TorchScript; default: the cached official weights")
    _add_runtime_flags(serve)


def _add_serve_limit_flags(serve: argparse.ArgumentParser) -> None:
    """What a peer may cost the node (docs/node.md, "What authenticates a peer, and the limits")."""
    from spleen_seg.node import settings as node

    serve.add_argument("--allowed-hosts", type=_node_value(node.parse_host_list), default=(), metavar="ADDR,NET",
                       help="accept TCP connections only from these addresses or networks, e.g. 10.1.2.3,192.168.0.0/24 "
                            "(checked at accept, before any DICOM byte is read; default: any)")
    serve.add_argument("--max-connections", type=_positive_int,
                       help=f"simultaneous TCP connections, associated or not (default {node.CONNECTIONS_PER_ASSOCIATION} "
                            "x --max-associations); more are closed at accept")
    serve.add_argument("--idle-timeout", type=_idle_seconds, default=node.DEFAULT_IDLE_TIMEOUT_SECONDS, metavar="S",
                       help="close a connection silent for this long; the TLS handshake, then the association request, "
                            f"must each be complete within this long (default {node.DEFAULT_IDLE_TIMEOUT_SECONDS:g})")
    serve.add_argument("--max-instance-size", type=_node_value(node.parse_size), default=node.DEFAULT_MAX_INSTANCE_BYTES,
                       metavar="SIZE", help="drop a peer sending a larger dataset (held in memory while it arrives; "
                                            f"default {node.format_size(node.DEFAULT_MAX_INSTANCE_BYTES)})")
    serve.add_argument("--spool-quota", type=_node_value(node.parse_size), default=node.DEFAULT_SPOOL_QUOTA_BYTES,
                       metavar="SIZE", help="received instances the spool holds at most; beyond, C-STOREs are answered "
                                            f"Out of Resources (default {node.format_size(node.DEFAULT_SPOOL_QUOTA_BYTES)})")
    serve.add_argument("--max-series-instances", type=_positive_int, default=node.DEFAULT_MAX_SERIES_INSTANCES,
                       metavar="N", help="instances one series may hold in the spool; beyond, Out of Resources "
                                         f"(default {node.DEFAULT_MAX_SERIES_INSTANCES})")


def _add_status_parser(sub, quiet: argparse.ArgumentParser) -> None:
    status = sub.add_parser("status", parents=[quiet], help="show a DICOM node's job table: what happened to "
                            "each received series")
    status.add_argument("--spool", type=_existing_dir, required=True, help="the --spool folder of spleen-seg serve")
    status.add_argument("--json", action="store_true", help="machine-readable output (every job and result)")
    status.add_argument("--limit", type=_positive_int, help="show only the newest N jobs")


# --- spleen-seg review (review/server.py) ---

def _port(value: str) -> int:
    port = 0 if value.strip() == "0" else _positive_int(value)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535, got {port}")
    return port


def _add_review_parser(sub, quiet: argparse.ArgumentParser) -> None:
    from spleen_seg.review.server import DEFAULT_HOST, DEFAULT_MAX_VIEW_VOXELS, DEFAULT_PORT

    review = sub.add_parser("review", parents=[quiet], help="review and correct the masks of an output folder in the "
                            "browser (a local web app with a 3D viewer); prints the URL to open")
    review.add_argument("output", type=_existing_dir, help="the -o folder of spleen-seg segment, or a node's --spool")
    review.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    review.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free one)")
    review.add_argument("--reviewer", help="the name decisions are recorded under (default: the login name)")
    review.add_argument("--view-voxels", type=_positive_int, default=DEFAULT_MAX_VIEW_VOXELS, metavar="N",
                        help="most voxels the viewer is sent per case; larger ones are averaged over blocks "
                             f"(default {DEFAULT_MAX_VIEW_VOXELS}; raise it where the browser has a GPU)")


def cmd_review(args: argparse.Namespace) -> int:
    from spleen_seg.review.server import ReviewSettings, review

    return review(ReviewSettings(out_dir=args.output, host=args.host, port=args.port, reviewer=args.reviewer or "",
                                 max_view_voxels=args.view_voxels))

# --- end of spleen-seg review ---


# --------------------------------------------------------------------------- corrections (review/corrections.py)
# Its own block: the parser and the command (registered in SUBCOMMAND_PARSERS and COMMANDS).

def _add_corrections_parser(sub, quiet: argparse.ArgumentParser) -> None:
    corrections = sub.add_parser("corrections", parents=[quiet], help="the reviewed cases as training data")
    corrections_sub = corrections.add_subparsers(dest="corrections_command", required=True)
    export = corrections_sub.add_parser(
        "export", parents=[quiet], help="write the accepted and corrected cases of an output folder in the MSD "
        "layout (imagesTr/, labelsTr/, dataset.json) for spleen-seg train")
    export.add_argument("output_folder", type=_existing_dir, metavar="OUT", help="the -o folder of spleen-seg segment")
    export.add_argument("-o", "--output", type=Path, required=True, metavar="DATASET",
                        help="dataset folder: new, empty, or one this command wrote")
    export.add_argument("--convention", choices=("auto", "true", "msd"), default="auto",
                        help="orientation convention of the written headers, that of the weights you will fine-tune: "
                             "true (the anatomy where the headers say), msd (mirrored as in MSD Task09, what the "
                             "official weights learned); auto (default): that of the weights that made the masks")


def cmd_corrections(args: argparse.Namespace) -> int:
    """``corrections export``: one line per case left out or failed, then the summary; exit 2 when a case
    failed or none was exported."""
    from spleen_seg.review.corrections import export_corrections

    summary = export_corrections(args.output_folder, args.output, convention=args.convention, progress=not args.quiet,
                                 on_line=lambda text: _line(text, sys.stderr))
    _line(summary.line())
    return EXIT_USER_ERROR if summary.failed or not summary.exported else 0


SUBCOMMAND_PARSERS = (_add_segment_parser, _add_train_parser, _add_evaluate_parser, _add_demo_parser,
                      _add_export_parser, _add_benchmark_parser, _add_data_parser, _add_weights_parser,
                      _add_compare_parser, _add_merge_summaries_parser, _add_serve_parser, _add_status_parser,
                      _add_review_parser, _add_corrections_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spleen-seg", description="3D spleen segmentation in CT (MONAI bundle compatible)")
    parser.add_argument("--version", action="version", version=f"spleen-seg {__version__}")
    _add_verbosity_flags(parser)
    # -q/-v also after the subcommand; SUPPRESS keeps a flag given before it.
    quiet = argparse.ArgumentParser(add_help=False)
    _add_verbosity_flags(quiet, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    for add_parser in SUBCOMMAND_PARSERS:
        add_parser(sub, quiet)
    return parser


def _bundle_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {"dataset_dir": str(args.dataset_dir.resolve()), "device_name": args.device}
    for flag, key in (("val_count", "val_count"), ("num_workers", "num_workers"), ("epochs", "epochs"),
                      ("val_interval", "val_interval")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    if getattr(args, "resume", False):
        overrides["resume"] = True
    if getattr(args, "fix_msd_orientation", False):
        overrides["fix_msd_orientation"] = True
    if getattr(args, "init_weights", None) is not None:
        overrides["init_weights"] = str(args.init_weights.resolve())
    overrides.update(dict(args.overrides))
    return overrides


def _segment_part(args: argparse.Namespace):
    """The ``--num-parts``/``--part-id`` pair as a ``Part`` (None without), or a ConfigError."""
    from spleen_seg.batch.inputs import Part
    from spleen_seg.errors import ConfigError

    if (args.num_parts is None) != (args.part_id is None):
        raise ConfigError("--num-parts and --part-id go together: --num-parts K --part-id I with I in 0..K-1")
    return None if args.num_parts is None else Part(args.part_id, args.num_parts)


def _interrupt_on_sigterm() -> list[int]:
    """Handle SIGTERM (a scheduler's time limit, preemption, scancel) like Ctrl-C; returns the signals caught."""
    import signal

    caught: list[int] = []

    def interrupt(signum: int, frame: object) -> None:
        caught.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    return caught


def cmd_segment(args: argparse.Namespace) -> int:
    from spleen_seg.batch.case import SegmentOptions
    from spleen_seg.batch.inputs import collect_cases, collect_part, read_manifest
    from spleen_seg.batch.run import segment_files
    from spleen_seg.batch.summary import SUMMARY_FILENAME
    from spleen_seg.errors import ConfigError
    from spleen_seg.pipeline.backends import resolve_device_name
    from spleen_seg.pipeline.network import default_segment_weights

    if not args.inputs and args.manifest is None:
        raise ConfigError("no inputs: give NIfTI files, folders or DICOM folders, or --manifest cases.csv")
    part = _segment_part(args)
    manifest = read_manifest(args.manifest) if args.manifest is not None else []
    weights = default_segment_weights(args.weights)
    ray = None
    if args.ray is not None:
        from spleen_seg.batch.ray import RaySettings

        stall = {} if args.ray_stall_seconds is None else {"stall_seconds": args.ray_stall_seconds}
        ray = RaySettings(address=None if args.ray == RAY_LOCAL else args.ray, gpus_per_actor=args.ray_gpus_per_actor,
                          **stall)
    # Under --ray each actor resolves "auto" on its own node (the driver may have no GPU).
    device = args.device if ray is not None else resolve_device_name(args.device)
    options = SegmentOptions(largest_component=args.largest_component, strict=args.strict, stl=args.stl,
                             weights_convention=args.weights_convention, all_windows=args.all_windows,
                             precision=args.precision, **_tta_options(args))
    terminated = _interrupt_on_sigterm()
    try:
        if part is None:
            inputs, cases = collect_cases(args.inputs, manifest)
        else:
            inputs, cases = collect_part(args.inputs, manifest, part)
            logging.getLogger(__name__).info("part %d of %d: %d cases", part.index, part.count, len(inputs))
        results = segment_files(inputs, args.output, weights, device, backend=args.backend, progress=not args.quiet,
                                options=options, overwrite=args.overwrite, on_result=_print_case, cases=cases,
                                part=part, ray=ray)
    except KeyboardInterrupt:
        discarded = "the cases in flight were" if ray is not None else "the current case was"
        print(f"interrupted: {discarded} discarded; {args.output / SUMMARY_FILENAME} lists the finished "
              "cases; run the same command again to resume", file=sys.stderr)
        return EXIT_SIGNAL_BASE + terminated[0] if terminated else EXIT_INTERRUPTED
    failures = [r for r in results if r.error]
    if failures:
        print(f"{len(results) - len(failures)} of {len(results)} inputs segmented; {len(failures)} failed", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def _line(text: str, stream=None) -> None:
    """Write one whole line in a single call, so that no other thread's output lands inside it."""
    stream = stream or sys.stdout
    stream.write(text + "\n")
    stream.flush()


def _print_case(result: CaseResult) -> None:
    """One line per case as it finishes: stdout for results and skips, stderr for warnings and errors."""
    if result.reused:
        _line(f"skipped, already done: {result.case}")
        return
    if result.error is not None:
        _line(f"error: {result.error}", sys.stderr)
        return
    found = f"spleen {result.spleen_ml:.1f} mL" if result.status == "ok" else "spleen not found"
    folder = result.output.parent if result.output is not None else result.case
    _line(f"{result.source}: {found} -> {folder} ({result.seconds:.1f} s)")
    for warning in result.report.warnings if result.report is not None else []:
        _line(f"warning: {result.case}: {warning}", sys.stderr)


def cmd_compare(args: argparse.Namespace) -> int:
    from spleen_seg.batch.case import SegmentOptions
    from spleen_seg.batch.compare import compare_followup
    from spleen_seg.outputs.compare import summary_line
    from spleen_seg.pipeline.backends import resolve_device_name
    from spleen_seg.pipeline.network import default_segment_weights

    weights = default_segment_weights(args.weights)
    device = resolve_device_name(args.device)
    options = SegmentOptions(largest_component=args.largest_component, weights_convention=args.weights_convention,
                             **_tta_options(args))
    result = compare_followup(args.prior, args.current, args.output, weights, device, backend=args.backend,
                              progress=not args.quiet, options=options, force=args.force, overwrite=args.overwrite,
                              growth_threshold_percent=args.growth_threshold_percent)
    for role, reused in zip(("prior", "current"), result.reused, strict=True):
        if reused:
            _line(f"reused the {role} scan's segmentation from {args.output / role}")
    _line(summary_line(result.comparison))
    for warning in result.comparison.warnings:
        _line(f"warning: {warning}", sys.stderr)
    _line(f"written: {result.json_path}, {result.preview_path}")
    return 0


def cmd_merge_summaries(args: argparse.Namespace) -> int:
    """Rebuild summary.csv and index.html; exit 2 while a part has not finished."""
    from collections import Counter

    from spleen_seg.batch.summary import SUMMARY_FILENAME, merge_summaries

    result = merge_summaries(args.output)
    statuses = Counter(row["status"] for row in result.rows)
    print(f"{args.output / SUMMARY_FILENAME}: {len(result.rows)} cases ("
          + ", ".join(f"{status} {count}" for status, count in sorted(statuses.items())) + "); index.html rewritten")
    if result.journal_rows:
        print(f"{result.journal_rows} of them only in the journals of runs that were killed")
    if result.count is None:
        return 0
    print(f"parts finished: {len(result.finished)} of {result.count}")
    for label, indices in (("interrupted", result.interrupted), ("not finished (running, or killed)", result.unfinished),
                           ("not started", result.missing)):
        if indices:
            print(f"warning: part(s) {', '.join(map(str, indices))} of {result.count} {label}: run the same command "
                  "with that --part-id to finish", file=sys.stderr)
    return 0 if len(result.finished) == result.count else EXIT_USER_ERROR


def cmd_train(args: argparse.Namespace) -> int:
    from spleen_seg.training.train import train

    overrides = _bundle_overrides(args)
    outcome = train(args.bundle_root, overrides)
    print(outcome.message(), file=sys.stdout if outcome.validated else sys.stderr)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from spleen_seg.training.evaluate import WEIGHTS_OVERRIDE, evaluate

    overrides = _bundle_overrides(args)
    if args.weights is not None:
        overrides[WEIGHTS_OVERRIDE] = str(args.weights.resolve())
    mean_dice = evaluate(args.bundle_root, overrides)
    print(f"mean Dice {mean_dice:.4f}; per-case metrics: {args.bundle_root / 'eval' / 'case_metrics.csv'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from spleen_seg.demo import run_demo

    summary = run_demo(args.output, seed=args.seed, device_name=args.device, progress=not args.quiet)
    print(summary)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "phantom":
        from spleen_seg.training.phantom import write_msd_dataset

        out = write_msd_dataset(args.out, args.num_cases, args.seed, n_test=args.num_test, progress=not args.quiet)
        print(f"wrote {args.num_cases} labelled + {args.num_test} test phantoms to {out}")
        return 0
    from spleen_seg.training.data import default_data_root, download_msd_spleen

    dataset = download_msd_spleen(args.root or default_data_root(), progress=not args.quiet)
    print(f"MSD Task09 Spleen ready at {dataset}")
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from spleen_seg.pipeline.network import OFFICIAL_WEIGHTS_MD5, OFFICIAL_WEIGHTS_URL, download_official_weights

    path = download_official_weights(args.url or OFFICIAL_WEIGHTS_URL, args.md5 or OFFICIAL_WEIGHTS_MD5,
                                     progress=not args.quiet)
    print(f"weights ready at {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from spleen_seg.pipeline.export import export_model

    dest = export_model(args.weights, args.output, args.format, args.precision)
    print(f"exported {args.format} ({args.precision}) to {dest}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from spleen_seg.benchmark import format_table, run_benchmark
    from spleen_seg.pipeline.backends import resolve_device_name

    device = resolve_device_name(args.device)
    print(format_table(run_benchmark(args.weights, device, args.volume, args.repeats)))
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    """``serve`` runs the node; ``status`` prints its job table."""
    if args.command == "status":
        from spleen_seg.node.bookkeeper import print_status

        print(print_status(args.spool, as_json=args.json, limit=args.limit))
        return 0
    from spleen_seg.node.service import serve
    from spleen_seg.node.settings import NodeSettings, check_connection_limit, check_tls

    settings = NodeSettings(
        spool=args.spool, ae_title=args.ae_title, host=args.host, port=args.port,
        allowed_callers=tuple(args.allowed_callers), max_associations=args.max_associations,
        allowed_hosts=tuple(args.allowed_hosts),
        max_connections=check_connection_limit(args.max_connections, args.max_associations),
        idle_timeout_seconds=args.idle_timeout, max_instance_bytes=args.max_instance_size,
        spool_quota_bytes=args.spool_quota, max_series_instances=args.max_series_instances,
        quiet_seconds=args.quiet_seconds, destinations=tuple(args.destinations), stow_url=args.stow_url,
        send_report=args.send_report, keep_days=args.keep_days, tls=check_tls(args.tls_cert, args.tls_key, args.tls_ca),
        weights=args.weights, weights_convention=args.weights_convention, device=args.device, backend=args.backend,
        largest_component=args.largest_component)
    return serve(settings)


COMMANDS = {"export": cmd_export, "benchmark": cmd_benchmark, "segment": cmd_segment, "train": cmd_train, "evaluate": cmd_evaluate, "demo": cmd_demo, "data": cmd_data,
            "weights": cmd_weights, "serve": cmd_node, "status": cmd_node, "merge-summaries": cmd_merge_summaries,
            "compare": cmd_compare, "review": cmd_review, "corrections": cmd_corrections}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    level = logging.DEBUG if verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s")
    # Library warnings (pydicom on a damaged header, nibabel...) go through logging, whose
    # handler writes whole records: printed by the warnings module from a reading thread
    # they could land inside another line. Shown with -v; what matters to the user is in
    # our own error and warning lines and in report.json.
    logging.captureWarnings(True)
    if not verbose:
        logging.getLogger("py.warnings").setLevel(logging.ERROR)
    try:
        return COMMANDS[args.command](args)
    except SpleenSegError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
