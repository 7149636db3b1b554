"""The network's commands: ``extract`` (features of a folder into a store) and ``export`` (the
network for deployment)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..extraction.config import EXPORT_FORMATS, EXPORT_PRECISIONS, ExtractConfig, ExtractRun
from .errors import finish_run, reports_errors
from .options import (
    DETECTOR,
    FILE,
    FOLDER,
    backend_option,
    cluster_options,
    config_from,
    device_option,
    extract_options,
    masks_option,
    option_from,
    out_option,
    precision_option,
    run_options,
    tile_option,
    weights_option,
)
from .runs import CLUSTER_OPTIONS, run_here_or_on_cluster


@click.command()
@click.argument("images_dir", type=FOLDER)
@out_option(None, "HDF5 feature store to create or extend (hloc layout).", required=True)
@extract_options(*DETECTOR, "resize_force", "fp32_descriptors", "subpixel", "reduced_decode", "orientation")
@masks_option
@tile_option
@option_from(ExtractRun, "batch_size")
@option_from(ExtractRun, "num_workers")
@device_option()
@backend_option
@precision_option()
@weights_option
@option_from(ExtractRun, "image_list", type=FILE)
@cluster_options
@run_options
@reports_errors
def extract(images_dir: Path, out: Path, json_report: Path | None, **options: Any) -> None:
    """Extract SuperPoint features of every image below IMAGES_DIR into --out.

    Image names are paths relative to IMAGES_DIR, as COLMAP records them. Re-running extracts
    only the images not yet in the store; a store made with other settings is refused.
    """
    from ..cluster.dask import extract_on_cluster
    from ..extraction.pipeline import extract as run_extract

    config = config_from(ExtractConfig, options)
    cluster = {name: options.pop(name) for name in CLUSTER_OPTIONS}
    run = ExtractRun(**options)  # the rest: weights, device, batch size, ...
    summary = run_here_or_on_cluster(
        run_extract, extract_on_cluster, (images_dir,), out, config, run, cluster
    )
    finish_run(summary, json_report)


@click.command()
@click.argument("out", type=FILE)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(EXPORT_FORMATS),
    default=None,
    help="onnx: one .onnx file; openvino: OUT (.xml) and its .bin (needs the [openvino] extra) "
    "[default: from OUT's extension, .onnx or .xml].",
)
@weights_option
@precision_option(
    EXPORT_PRECISIONS,
    help="int8: the network statically quantized (QDQ), as extract --precision int8 runs it on this "
    "CPU (u8s8, or u8u8 on x86 without VNNI; Env: SP_EXTRACT_INT8_VARIANT=u8s8|u8u8 picks one).",
)
@click.option(
    "--calibrate",
    type=click.Path(path_type=Path),
    help="With --precision int8: calibrate the quantization on up to 64 images of this folder "
    "[default: the built-in generated set].",
)
@reports_errors
def export(out: Path, fmt: str | None, weights: str | None, precision: str, calibrate: Path | None) -> None:
    """Write the SuperPoint network to OUT for deployment (ONNX or OpenVINO IR, float32 or int8).

    \b
    input   image        float32 [batch, 1, height, width], grayscale in [0, 1]
    output  scores       float32 [batch, 8*(height//8), 8*(width//8)], keypoint probability per pixel
    output  descriptors  float32 [batch, 256, height//8, width//8], unit-norm descriptor per 8x8 cell
    Batch, height and width are dynamic. Keypoint selection (NMS, border, threshold, top-k,
    descriptor sampling) is not in the graph; docs/export.md describes it. The weights'
    licence applies to the exported model.
    """
    from ..extraction.backends import export_model

    for path in export_model(out, fmt, weights, precision, calibrate):
        click.echo(f"wrote {path}", err=True)
