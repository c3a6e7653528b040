"""The `bigearthnet` command: each subcommand parses its arguments and calls one library function.

Library modules are imported inside each command so that `bigearthnet --help` and the data commands
start without loading TensorFlow. A `UserError` becomes one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

from bigearthnet_tf import __version__
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.layout import MODALITIES
from bigearthnet_tf.quiet import import_tensorflow_quietly
from bigearthnet_tf.record_formats import FORMATS

DEFAULT_TEST_RUN_BATCHES = 3
MAX_ERROR_CHARACTERS = 1000
MODEL_FORMS = (
    "checkpoint: a base name (runs/r50/models/best), one of its files, a run folder (its best, else its "
    "newest checkpoint), or an exported .keras file"
)
# Commands that never load TensorFlow (they start fast; preparation workers stay light).
WITHOUT_TENSORFLOW = frozenset({"prepare", "synth", "examples"})


def needs_tensorflow(args: argparse.Namespace) -> bool:
    """Whether the command will load TensorFlow (then it is imported quietly first): not for the
    commands of data preparation, `config keys`, or `inspect` of an archive (folder or file)."""
    if args.command in WITHOUT_TENSORFLOW:
        return False
    if args.command == "config":
        from bigearthnet_tf.model_catalogue import plugins_configured

        # A built-in model_name is checked without Keras; a plug-in's needs the registry.
        return args.action != "keys" and plugins_configured()
    if args.command == "models":
        return not lists_models_without_keras(args)
    if args.command == "inspect":
        from bigearthnet_tf.inspect_data import reads_records

        return reads_records(args.sources)
    return True


def _prepare(args: argparse.Namespace) -> None:
    from bigearthnet_tf.prepare import prepare

    split_files, official = split_choice(args)
    if split_files is None and not official:
        raise UserError("prepare needs the splits: -n/--splits CSV [CSV ...], or --splits official")
    prepare(
        root=args.root_folder,
        out=args.out_folder,
        split_files=split_files,
        official_splits=official,
        record_format=args.format,
        workers=args.workers,
        shard_size=args.shard_size,
        exclude_snow_cloud=args.exclude_snow_cloud,
        include_snow_cloud=args.include_snow_cloud,
        skip_bad=args.skip_bad,
        overwrite=args.overwrite,
        version=args.version,
        s1_root=args.s1_root,
        inflate_threads=args.inflate_threads,
    )


def _synth(args: argparse.Namespace) -> None:
    from bigearthnet_tf.synth import write_synthetic_archive

    root = write_synthetic_archive(
        args.out, patches=args.patches, seed=args.seed, version=args.version, with_s1=args.s1
    )
    print(f"synthetic BigEarthNet v{args.version} archive written to {root}")


def _examples(args: argparse.Namespace) -> None:
    from bigearthnet_tf.examples import example_archive

    paths = example_archive(args.out)
    print(f"Sentinel-2 example patches: {paths.s2}\nSentinel-1 example patches: {paths.s1}")


def _run_config(args: argparse.Namespace) -> None:
    from bigearthnet_tf.config import load_config

    overrides = [*args.set, *(["resume=auto"] if args.resume else [])]
    config = load_config(args.config, purpose=args.command, overrides=overrides)
    if args.test_run is not None:
        from bigearthnet_tf.trial import test_run

        test_run(config, args.test_run)
    elif args.command == "train":
        from bigearthnet_tf.train import train

        train(config)
    else:
        from bigearthnet_tf.evaluate import evaluate

        evaluate(config, overwrite=args.overwrite)


def _config(args: argparse.Namespace) -> None:
    from bigearthnet_tf.config import format_key_docs, load_config

    if args.action == "keys":
        print(format_key_docs())
        return
    if args.config is None:
        raise UserError("bigearthnet config show needs a CONFIG file")
    config = load_config(args.config, purpose=args.purpose, overrides=args.set)
    print(json.dumps(config.to_dict(), indent=2))


def _models(args: argparse.Namespace) -> None:
    from bigearthnet_tf.constants import parse_label_type

    label_type = parse_label_type(args.label_type)
    if not lists_models_without_keras(args):
        from bigearthnet_tf.models import print_model_table

        names = args.names or None
        print_model_table(label_type=label_type, as_json=args.json, names=names, parameters=args.parameters)
        return
    from bigearthnet_tf.model_catalogue import builtin_rows, print_model_rows

    print_model_rows(builtin_rows(args.names), label_type, as_json=args.json, parameters=False)


def lists_models_without_keras(args: argparse.Namespace) -> bool:
    """`models` without `--parameters` names only built-ins when no plug-in is configured."""
    from bigearthnet_tf.model_catalogue import is_builtin, plugins_configured

    return not args.parameters and not plugins_configured() and all(map(is_builtin, args.names or ()))


def _stats(args: argparse.Namespace) -> None:
    from bigearthnet_tf.stats import format_statistics_table, write_band_statistics

    stats = write_band_statistics(args.files, args.out, modality=args.modality, overwrite=args.overwrite)
    print(format_statistics_table(stats))
    print(f"written to {args.out}")


def _predict(args: argparse.Namespace) -> None:
    from bigearthnet_tf.predict import predict, tune_thresholds

    split_files, official = split_choice(args)
    if args.choose_thresholds:
        tune_thresholds(args.model, args.choose_thresholds, batch_size=args.batch_size)
        if not (args.patch_folders or args.archive):
            return
    predict(
        args.model,
        args.patch_folders,
        archive=args.archive,
        split_files=split_files,
        official_splits=official,
        split=args.split,
        s1_root=args.s1_root,
        out=args.out,
        overwrite=args.overwrite,
        threshold=args.threshold,
        thresholds_file=args.thresholds,
        batch_size=args.batch_size,
        workers=args.workers,
        skip_bad=args.skip_bad,
    )


def _map(args: argparse.Namespace) -> None:
    from bigearthnet_tf.mapping import MapOptions, map_scenes

    options = MapOptions(
        stride=args.stride,
        bbox=args.bbox,
        aoi=args.aoi,
        bands=tuple(args.bands.split(",")) if args.bands else None,
        s1=tuple(args.s1 or ()),
        s1_linear=args.s1_linear,
        boa_offset=args.boa_offset,
        allow_l1c=args.allow_l1c,
        max_nodata=args.max_nodata,
        dtype=args.dtype,
        threshold=args.threshold,
        thresholds_file=args.thresholds,
        reference=args.reference,
        windows_format=args.windows_format,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
    )
    map_scenes(args.scenes, args.model, args.out, options, shard=args.shard)


def _bbox(text: str) -> tuple[float, float, float, float]:
    try:
        west, south, east, north = (float(part) for part in text.split(","))
    except ValueError:  # not numbers, or not four of them
        raise argparse.ArgumentTypeError(f"expected WEST,SOUTH,EAST,NORTH in degrees, got {text!r}") from None
    return west, south, east, north


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N (e.g. 0/4), got {text!r}") from None
    return index, count


def _export(args: argparse.Namespace) -> None:
    from bigearthnet_tf.export import export_model

    result = export_model(args.model, args.format, args.out, overwrite=args.overwrite)
    print(f"{result.format} model written to {result.path} (inputs: raw bands; outputs: probabilities)")
    if result.metadata_file is not None:
        print(f"metadata: {result.metadata_file}")


def _import_tf1(args: argparse.Namespace) -> None:
    from bigearthnet_tf.tf1_import import convert_tf1_checkpoint

    base = convert_tf1_checkpoint(
        args.checkpoint, args.model, args.label_type, args.out, overwrite=args.overwrite
    )
    print(f"2019 checkpoint {args.checkpoint} imported as {base} ({args.model}, {args.label_type})")


def _import_reben(args: argparse.Namespace) -> None:
    from bigearthnet_tf.reben_import import import_reben

    imported = import_reben(args.source, args.out, version=args.version, overwrite=args.overwrite)
    print(
        f"reBEN model {imported.repository} ({imported.timm_model_name}, {imported.version}, "
        f"{imported.modality}) imported as {imported.base}"
    )


def _import_torchgeo(args: argparse.Namespace) -> None:
    from bigearthnet_tf.torchgeo_import import import_torchgeo, weights_table

    if args.list:
        print(weights_table())
        return
    if args.file is None or args.weights is None or args.out is None:
        raise UserError("import torchgeo needs FILE, --weights NAME and --out BASE (or --list)")
    imported = import_torchgeo(args.file, args.weights, args.out, overwrite=args.overwrite)
    check = (
        "the published file"
        if imported.is_published_file
        else "SHA-256 matches its name"
        if imported.hash_checked
        else "no SHA-256 prefix in its name to check"
    )
    print(
        f"{args.weights} backbone imported as {imported.base} ({check}); fine-tune it with "
        f'"model_name": "{imported.model_name}", "backbone_weights": "{imported.base}"'
    )


def _embed(args: argparse.Namespace) -> None:
    from bigearthnet_tf.embed import embed

    embed(
        args.model,
        args.patch_folders,
        archive=args.archive,
        records=args.records,
        s1_root=args.s1_root,
        out=args.out,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        workers=args.workers,
    )


def _inspect(args: argparse.Namespace) -> None:
    from bigearthnet_tf.inspect_data import inspect

    split_files, official = split_choice(args)
    inspect(args.sources, splits=split_files, official=official, png=args.png, overwrite=args.overwrite)


def _show(args: argparse.Namespace) -> None:
    from bigearthnet_tf.quicklook import show

    show(
        args.sources,
        args.out,
        model=args.model,
        s1_root=args.s1_root,
        limit=args.limit,
        overwrite=args.overwrite,
    )


def _demo(args: argparse.Namespace) -> None:
    from bigearthnet_tf.demo import run_demo

    run_demo(args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigearthnet",
        description="Prepare BigEarthNet archives and train, evaluate and apply classifiers on them.",
        epilog="example: bigearthnet demo    (each command has --help)",
    )
    parser.add_argument("--version", action="version", version=f"bigearthnet-tf {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_data_and_training_commands(commands)
    _add_map_command(commands)
    _add_apply_commands(commands)
    _add_import_commands(commands)
    _add_look_commands(commands)
    return parser


def _command(group, name: str, summary: str, example: str, run, description: str = ""):
    """A subcommand of `group` with a description, its defaults in --help, and an example."""
    sub = group.add_parser(
        name,
        help=summary,
        description=description or summary[0].upper() + summary[1:] + ".",
        epilog=f"example: {example}",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub.set_defaults(run=run)
    return sub


def _add_data_and_training_commands(commands) -> None:
    """The commands prepare, synth, examples, train, evaluate, config, models, stats."""
    command = functools.partial(_command, commands)

    prep = command(
        "prepare",
        "convert an archive into TFRecord files (as the 2019 prep_splits.py)",
        "bigearthnet prepare -r BigEarthNet-v1.0 -o prepared --splits official",
        _prepare,
    )
    add_prepare_arguments(prep)

    synth = command(
        "synth",
        "write a learnable synthetic archive in the real layout",
        "bigearthnet synth --out synthetic --patches 600 --version 2 --s1",
        _synth,
    )
    synth.add_argument("--out", type=Path, required=True, help="folder to create")
    synth.add_argument("--patches", type=int, default=600, help="number of patches")
    synth.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes")
    synth.add_argument("--version", type=int, choices=(1, 2), default=1, help="archive layout version")
    synth.add_argument("--s1", action="store_true", help="also write the matching Sentinel-1 patches")

    examples = command(
        "examples",
        "extract the six real example patches of bigearthnet-common",
        "bigearthnet examples --out examples",
        _examples,
    )
    examples.add_argument("--out", type=Path, default=None, help="folder (default: the user cache)")

    for name, summary, example in (
        (
            "train",
            "train a model from a JSON config (as the 2019 train.py)",
            "bigearthnet train configs/ResNet50-BigEarthNet-19.json --set batch_size=64 --set nb_epoch=10",
        ),
        (
            "evaluate",
            "evaluate a model from a JSON config (as the 2019 eval.py)",
            "bigearthnet evaluate configs/ResNet50-BigEarthNet-19.json --set model_file=runs/r50",
        ),
    ):
        run = command(
            name,
            summary,
            example,
            _run_config,
            summary[0].upper() + summary[1:] + "; keys: bigearthnet config keys.",
        )
        add_config_arguments(run)
        if name == "evaluate":
            run.add_argument(
                "--overwrite", action="store_true", help="replace the results of the same checkpoint and data"
            )

    config_command = command(
        "config",
        "list the config keys, or print a resolved config",
        "bigearthnet config show configs/ResNet50-BigEarthNet-19.json --set batch_size=64",
        _config,
        "List every config key with its type, default and meaning (keys), or print the config a file "
        "and --set overrides resolve to (show).",
    )
    config_command.add_argument(
        "action", choices=("keys", "show"), help="keys: every key; show: CONFIG resolved"
    )
    config_command.add_argument("config", type=Path, nargs="?", help="JSON configuration file (show)")
    config_command.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key (repeatable)"
    )
    config_command.add_argument(
        "--purpose", choices=("train", "evaluate"), default="train", help="resolve for training or evaluation"
    )

    models = command(
        "models",
        "list the registered models (and their sizes)",
        "bigearthnet models ResNet50 VGG16 --parameters",
        _models,
        "List the registered model names; with --parameters, build each to count its weights.",
    )
    models.add_argument("names", nargs="*", help="only these models (default: all)")
    models.add_argument("--parameters", action="store_true", help="build each model and count its parameters")
    models.add_argument("--label-type", default="BigEarthNet-19", help="original or BigEarthNet-19")
    models.add_argument("--json", action="store_true", help="print a JSON list instead of a table")

    stats = command(
        "stats",
        "per-band mean and std of prepared records, as a JSON file",
        "bigearthnet stats prepared/train-*.tfrecord --out stats.json",
        _stats,
    )
    stats.add_argument("files", nargs="+", help="TFRecord files, globs or folders (e.g. a split's shards)")
    stats.add_argument("--out", type=Path, required=True, help="statistics file to write (.json)")
    stats.add_argument(
        "--modality", choices=MODALITIES, default=None, help="bands (default: all the files hold)"
    )
    stats.add_argument("--overwrite", action="store_true", help="replace an existing statistics file")


def _add_map_command(commands) -> None:
    """The commands map."""
    command = functools.partial(_command, commands)

    mapper = command(
        "map",
        "map land cover over whole Sentinel-2 scenes as georeferenced rasters",
        "bigearthnet map S2A_MSIL2A_20220315T101021_N0400_R022_T32UQD_20220315T123456.zip "
        "--model runs/r50/models/best --out maps",
        _map,
        description="Apply a model over whole scenes: windows of 120 x 120 px every --stride pixels; window "
        "(i, j) becomes output pixel (i, j) of DIR/<scene>/probabilities.tif (one band per class), "
        "labels.tif, "
        "quicklook.png, windows.csv and map.json. A scene is a .SAFE folder or .zip, a folder of band files "
        "(B02.tif ...), or a multi-band GeoTIFF (--bands). Scenes whose complete output exists are skipped.",
    )
    mapper.add_argument("scenes", nargs="+", help="Sentinel-2 L2A scenes (.SAFE, .zip, band folder, GeoTIFF)")
    mapper.add_argument("--model", required=True, help=MODEL_FORMS)
    mapper.add_argument("--out", type=Path, required=True, help="output folder (one folder per scene in it)")
    mapper.add_argument("--stride", type=int, default=120, help="pixels between windows (120, 60, 30, ...)")
    mapper.add_argument(
        "--bbox", type=_bbox, default=None, help="map part of the scene: WEST,SOUTH,EAST,NORTH (lon/lat)"
    )
    mapper.add_argument("--aoi", type=Path, default=None, help="map the extent of a GeoJSON file (lon/lat)")
    mapper.add_argument("--bands", default=None, help="band order of a multi-band GeoTIFF: B02,B03,...")
    mapper.add_argument(
        "--s1",
        nargs="+",
        default=None,
        metavar="FILE",
        help="Sentinel-1 VV.tif VH.tif (or one two-band file), in dB",
    )
    mapper.add_argument(
        "--s1-linear", action="store_true", help="--s1 holds linear backscatter: convert to dB"
    )
    mapper.add_argument(
        "--boa-offset",
        type=int,
        default=None,
        help="offset added to the DN of a scene without product metadata (-1000 for baseline 04.00+)",
    )
    mapper.add_argument("--allow-l1c", action="store_true", help="map a Level-1C product (models expect L2A)")
    mapper.add_argument(
        "--max-nodata", type=float, default=0.1, help="largest nodata fraction of a mapped window"
    )
    mapper.add_argument(
        "--dtype", choices=("float32", "uint8"), default="float32", help="of probabilities.tif"
    )
    mapper.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="probability at which a class is predicted (default 0.5)",
    )
    mapper.add_argument(
        "--thresholds",
        default=None,
        metavar="FILE|stored",
        help="per-class thresholds: a JSON file, or 'stored'",
    )
    mapper.add_argument(
        "--reference", type=Path, default=None, help="CORINE Land Cover raster: evaluate the map against it"
    )
    mapper.add_argument(
        "--windows-format", choices=("csv", "parquet"), default="csv", help="of the per-window table"
    )
    mapper.add_argument("--batch-size", type=int, default=64, help="windows per model call")
    mapper.add_argument(
        "--shard",
        type=_shard,
        default=None,
        metavar="I/N",
        help="map every N-th scene from the I-th (0-based)",
    )
    mapper.add_argument("--overwrite", action="store_true", help="redo scenes whose output exists")


def _add_apply_commands(commands) -> None:
    """The commands predict, export."""
    command = functools.partial(_command, commands)

    predict = command(
        "predict",
        "apply a trained model to patch folders or an archive",
        "bigearthnet predict patches/*/ --model runs/r50/models/best --out predictions.csv",
        _predict,
    )
    predict.add_argument("patch_folders", nargs="*", type=Path, help="S2 patch folders (v1 or v2 layout)")
    predict.add_argument("--model", required=True, help=MODEL_FORMS)
    predict.add_argument("--archive", type=Path, default=None, help="archive root, instead of patch folders")
    add_split_arguments(predict, "with --archive: ")
    predict.add_argument(
        "--split", default=None, help="with --archive and --splits: only the split of this name (e.g. test)"
    )
    predict.add_argument("--s1-root", type=Path, default=None, help="Sentinel-1 root (models reading S1)")
    predict.add_argument(
        "--out", type=Path, default=None, help="output .csv or .json (default: CSV on stdout)"
    )
    predict.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    predict.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="probability at which a class is predicted (default 0.5)",
    )
    predict.add_argument(
        "--thresholds",
        default=None,
        metavar="FILE|stored",
        help="per-class thresholds: a JSON file of class name -> threshold, or 'stored' for those chosen "
        "with --choose-thresholds (default: --threshold for every class)",
    )
    predict.add_argument(
        "--choose-thresholds",
        nargs="+",
        metavar="RECORDS",
        help="validation TFRecords: choose per-class thresholds (max F1) and store them with the checkpoint",
    )
    predict.add_argument("--batch-size", type=int, default=64, help="patches per model call")
    predict.add_argument("--workers", type=int, default=None, help="reading threads (default: 2 per core)")
    predict.add_argument("--skip-bad", action="store_true", help="skip unreadable patches and list them")

    export = command(
        "export",
        "export a model (raw bands in, probabilities out)",
        "bigearthnet export --model runs/r50/models/best --format onnx --out r50.onnx",
        _export,
    )
    export.add_argument("--model", required=True, help=MODEL_FORMS)
    export.add_argument("--format", required=True, choices=("saved_model", "onnx", "keras"), help="format")
    export.add_argument("--out", type=Path, required=True, help="SavedModel folder, .onnx or .keras file")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output")


def _add_import_commands(commands) -> None:
    """The commands import tf1 / reben / torchgeo."""
    importer = commands.add_parser(
        "import",
        help="turn pretrained weights into a checkpoint of ours",
        description="Import pretrained weights: a 2019 TF1 checkpoint (tf1), a reBEN model (reben) or a "
        "TorchGeo Sentinel backbone (torchgeo).",
        epilog="example: bigearthnet import reben hf://BIFOLD-BigEarthNetv2-0/resnet50-all-v0.2.0 --out r50",
    )
    sources = importer.add_subparsers(dest="source_kind", required=True, metavar="SOURCE_KIND")
    command = functools.partial(_command, sources)
    tf1 = command(
        "tf1",
        "a 2019 TF1 checkpoint (model_file base name)",
        "bigearthnet import tf1 ResNet50/iteration-6000 --model ResNet50 --label-type BigEarthNet-19 "
        "--out imported/models/iteration-6000",
        _import_tf1,
        "Import a checkpoint of the 2019 BigEarthNet TF1 code (TF-Slim ResNet/VGG, K-BranchCNN).",
    )
    tf1.add_argument("checkpoint", help="the 2019 model_file base name, e.g. ResNet50/iteration-6000")
    tf1.add_argument("--model", required=True, help="registered model name, e.g. ResNet50 or K-BranchCNN")
    tf1.add_argument("--label-type", required=True, help="original (43 classes) or BigEarthNet-19")
    tf1.add_argument("--out", type=Path, required=True, help="base name of the checkpoint to write")
    tf1.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    reben = command(
        "reben",
        "a reBEN (BigEarthNet v2.0) pretrained model: folder, hub cache or hf://",
        "bigearthnet import reben hf://BIFOLD-BigEarthNetv2-0/resnet50-all-v0.2.0 --out reben/resnet50-all",
        _import_reben,
        "Import a reBEN model (BIFOLD-BigEarthNetv2-0 on the Hugging Face hub) into Keras.",
    )
    reben.add_argument(
        "source", help="a folder with config.json and model.safetensors, a hub cache folder, or hf://ORG/NAME"
    )
    reben.add_argument("--out", type=Path, required=True, help="base name of the checkpoint to write")
    reben.add_argument(
        "--version",
        choices=("v0.1.1", "v0.2.0"),
        default=None,
        help="weights version (decides the band order); default: read from the repository name",
    )
    reben.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")

    torchgeo = command(
        "torchgeo",
        "a Sentinel backbone served by TorchGeo (SSL4EO-S12, DeCUR): .pth file and weights name",
        "bigearthnet import torchgeo resnet50_sentinel2_all_moco-df8b932e.pth "
        "--weights ResNet50_Weights.SENTINEL2_ALL_MOCO --out backbones/ssl4eo-r50",
        _import_torchgeo,
        "Import a TorchGeo backbone (timm ResNet state dict, read without PyTorch) as a backbone checkpoint "
        "for backbone_weights.",
    )
    torchgeo.add_argument("file", nargs="?", type=Path, help="the downloaded .pth file")
    torchgeo.add_argument("--weights", default=None, help="TorchGeo's name of the weights (see --list)")
    torchgeo.add_argument("--out", type=Path, default=None, help="base name of the backbone checkpoint")
    torchgeo.add_argument("--list", action="store_true", help="print the supported weights names and exit")
    torchgeo.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")


def _add_look_commands(commands) -> None:
    """The commands embed, inspect, show, demo."""
    command = functools.partial(_command, commands)

    embedder = command(
        "embed",
        "pooled backbone features of a model for patch folders or an archive",
        "bigearthnet embed patches/*/ --model runs/r50/models/best --out features.npy",
        _embed,
    )
    embedder.add_argument("patch_folders", nargs="*", type=Path, help="S2 patch folders (v1 or v2 layout)")
    embedder.add_argument("--model", required=True, help=MODEL_FORMS)
    embedder.add_argument(
        "--archive", type=Path, default=None, help="archive root or file, instead of folders"
    )
    embedder.add_argument(
        "--records", nargs="+", default=(), help="TFRecord files, globs or folders, instead of folders"
    )
    embedder.add_argument("--s1-root", type=Path, default=None, help="Sentinel-1 root (models reading S1)")
    embedder.add_argument("--out", type=Path, required=True, help=".npy (+ .names.txt) or .parquet file")
    embedder.add_argument("--overwrite", action="store_true", help="replace an existing output")
    embedder.add_argument("--batch-size", type=int, default=64, help="patches per model call")
    embedder.add_argument("--workers", type=int, default=None, help="reading threads (default: 2 per core)")

    inspect_command = command(
        "inspect",
        "patches per split, label frequencies and labels per patch of records or an archive",
        "bigearthnet inspect prepared/ --png prepared-labels.png",
        _inspect,
    )
    inspect_command.add_argument(
        "sources", nargs="+", help="TFRecord files, globs or folders; or one archive root"
    )
    add_split_arguments(inspect_command, "with an archive root: ")
    inspect_command.add_argument("--png", type=Path, default=None, help="also write the chart to this PNG")
    inspect_command.add_argument("--overwrite", action="store_true", help="replace an existing --png")

    show_command = command(
        "show",
        "true- and false-colour quick-looks of patches (folders or records) with their labels",
        "bigearthnet show patches/S2A_MSIL2A_20170613T101031_0_45 --out looks --model runs/r50/models/best",
        _show,
    )
    show_command.add_argument("sources", nargs="+", help="S2 patch folders, or TFRecord files / folders")
    show_command.add_argument("--out", type=Path, required=True, help="folder for the PNGs (created)")
    show_command.add_argument("--model", default=None, help="also show this model's predicted labels")
    show_command.add_argument(
        "--s1-root", type=Path, default=None, help="Sentinel-1 root (models reading S1)"
    )
    show_command.add_argument("--limit", type=int, default=16, help="at most this many patches of records")
    show_command.add_argument("--overwrite", action="store_true", help="replace existing PNGs")

    demo = command(
        "demo",
        "synthesise, prepare, train and evaluate end to end",
        "bigearthnet demo --out demo",
        _demo,
        "Synthesise an archive in the real layout (plus the six real example patches), prepare it, train "
        "and evaluate a small model; an interrupted demo continues when run again with the same --out.",
    )
    demo.add_argument("--out", type=Path, default=None, help="output folder (default: a new one here)")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `train` and `evaluate` (and of the 2019 train.py / eval.py)."""
    parser.add_argument("config", type=Path, help="JSON configuration file (the 2019 keys and more)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, checked as in the file (repeatable; VALUE is JSON or a plain string)",
    )
    parser.add_argument(
        "--resume", action="store_true", help='continue from the newest checkpoint (as "resume": "auto")'
    )
    parser.add_argument(
        "--test-run",
        nargs="?",
        type=int,
        const=DEFAULT_TEST_RUN_BATCHES,
        default=None,
        metavar="N",
        help=f"run N batches (default {DEFAULT_TEST_RUN_BATCHES}) of training and evaluation in a temporary "
        "folder, report the time per iteration, keep nothing",
    )


def add_split_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """`-n/--splits CSV [CSV ...]` or `--splits official` (`--official` is kept as an alias)."""
    parser.add_argument(
        "-n",
        "--splits",
        nargs="+",
        metavar="CSV|official",
        default=None,
        help=f"{prefix}split CSV files (each file's base name names its split), or `official`: the "
        "official splits (v1: bigearthnet-common's lists; v2: the metadata parquet)",
    )
    parser.add_argument("--official", action="store_true", help=argparse.SUPPRESS)  # = --splits official


def split_choice(args: argparse.Namespace) -> tuple[list[Path] | None, bool]:
    """(split CSV files, official) from `--splits`; `official` may not be mixed with files."""
    values = args.splits or []
    official = args.official or "official" in values
    if official and (len(values) > 1 or (args.official and values)):
        raise UserError("--splits takes either split CSV files or `official`, not both")
    return (None if official or not values else [Path(value) for value in values]), official


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `prepare`; the 2019 prep_splits.py flags keep their names."""
    parser.add_argument(
        "-r",
        "--root_folder",
        "--root",
        type=Path,
        required=True,
        help="archive root folder, or the downloaded archive file (.tar, .tar.gz, .tar.zst), not extracted",
    )
    parser.add_argument("-o", "--out_folder", "--out", type=Path, required=True, help="output folder")
    add_split_arguments(parser)
    parser.add_argument("--format", choices=tuple(FORMATS), default="default", help="record format")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument(
        "--inflate-threads",
        type=int,
        default=None,
        help="threads inflating a .tar.gz file (default: all cores; 1: one thread, memory bounded)",
    )
    parser.add_argument(
        "--shard-size", type=int, default=None, help="patches per shard, default format (default: 512)"
    )
    parser.add_argument(
        "--exclude-snow-cloud",
        action="store_true",
        help="drop patches on the seasonal-snow and cloud/shadow lists from user CSVs",
    )
    parser.add_argument(
        "--include-snow-cloud", action="store_true", help="v2: keep the snow/cloud/shadow patches"
    )
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable patches and report them")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--version", type=int, choices=(1, 2), default=None, help="archive version (auto)")
    parser.add_argument(
        "--s1-root",
        type=Path,
        default=None,
        help="Sentinel-1 archive root folder or archive file (adds VV, VH)",
    )


def next_step(args: argparse.Namespace, error: UserError) -> str | None:
    """What to do about `error` when there is one obvious step the message itself cannot know."""
    from bigearthnet_tf.archive import BadPatchError

    if isinstance(error, BadPatchError) and getattr(args, "skip_bad", True) is False:
        return (
            "--skip-bad "
            + ("predicts" if args.command == "predict" else "writes")
            + " the other patches and lists the bad ones"
        )
    return None


def os_error_message(error: OSError) -> str:
    """`<path>: <reason>` (both paths of a rename) for an OSError, as one line."""
    reason = error.strerror or str(error) or type(error).__name__
    paths = [os.fsdecode(path) for path in (error.filename, error.filename2) if path is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


def error_line(message: str) -> str:
    """`error: <message>` on one line, at most MAX_ERROR_CHARACTERS long (a bad value may be huge)."""
    message = " ".join(message.split())
    if len(message) > MAX_ERROR_CHARACTERS:
        message = (
            message[:MAX_ERROR_CHARACTERS] + f"... ({len(message) - MAX_ERROR_CHARACTERS:,} more characters)"
        )
    return f"error: {message}"


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `bigearthnet` console command."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if needs_tensorflow(args):
        # TensorFlow's start-up chatter (absl, oneDNN, cuInit without a GPU) is noise to a user.
        import_tensorflow_quietly()
    try:
        args.run(args)
    except UserError as error:
        hint = next_step(args, error)
        print(error_line(f"{error}{'; ' + hint if hint else ''}"), file=sys.stderr)
        raise SystemExit(error.exit_code) from None
    except OSError as error:
        # The operating system refused (permission, full disk, read-only, a file where a folder is
        # needed): the user's to fix, so one line naming the path, not a traceback.
        print(error_line(os_error_message(error)), file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
