"""The `bigearthnet` command: each subcommand parses its arguments and calls one library function.

Library modules are imported inside each command so that `bigearthnet --help` and the data commands
start without loading TensorFlow. A `UserError` becomes one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bigearthnet_tf.errors import UserError


def _prepare(args: argparse.Namespace) -> None:
    from bigearthnet_tf.prepare import prepare

    prepare(
        root=args.root_folder,
        out=args.out_folder,
        split_files=args.splits,
        official_splits=args.official,
        record_format=args.format,
        workers=args.workers,
        shard_size=args.shard_size,
        exclude_snow_cloud=args.exclude_snow_cloud,
        include_snow_cloud=args.include_snow_cloud,
        skip_bad=args.skip_bad,
        overwrite=args.overwrite,
        version=args.version,
        s1_root=args.s1_root,
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


def _train(args: argparse.Namespace) -> None:
    from bigearthnet_tf.config import load_config
    from bigearthnet_tf.train import train

    train(load_config(args.config, purpose="train"))


def _evaluate(args: argparse.Namespace) -> None:
    from bigearthnet_tf.config import load_config
    from bigearthnet_tf.evaluate import evaluate

    evaluate(load_config(args.config, purpose="evaluate"))


def _models(args: argparse.Namespace) -> None:
    from bigearthnet_tf.models import print_model_table

    print_model_table(
        label_type=args.label_type, as_json=args.json, names=args.names or None, parameters=args.parameters
    )


def _stats(args: argparse.Namespace) -> None:
    from bigearthnet_tf.stats import format_statistics_table, write_band_statistics

    stats = write_band_statistics(args.files, args.out, modality=args.modality, overwrite=args.overwrite)
    print(format_statistics_table(stats))
    print(f"written to {args.out}")


def _predict(args: argparse.Namespace) -> None:
    from bigearthnet_tf.predict import predict, tune_thresholds

    if args.choose_thresholds:
        tune_thresholds(args.model, args.choose_thresholds, batch_size=args.batch_size)
        if not (args.patch_folders or args.archive):
            return
    predict(
        args.model,
        args.patch_folders,
        archive=args.archive,
        split_files=args.splits,
        official_splits=args.official,
        s1_root=args.s1_root,
        out=args.out,
        overwrite=args.overwrite,
        threshold=args.threshold,
        thresholds_file=args.thresholds,
        batch_size=args.batch_size,
        workers=args.workers,
        skip_bad=args.skip_bad,
    )


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


def _demo(args: argparse.Namespace) -> None:
    from bigearthnet_tf.demo import run_demo

    run_demo(args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigearthnet",
        description="Prepare BigEarthNet archives and train, evaluate and apply classifiers on them.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prep = commands.add_parser("prepare", help="convert an archive into TFRecord files")
    add_prepare_arguments(prep)
    prep.set_defaults(run=_prepare)

    synth = commands.add_parser("synth", help="write a learnable synthetic archive in the real layout")
    synth.add_argument("--out", type=Path, required=True, help="folder to create")
    synth.add_argument("--patches", type=int, default=600, help="number of patches (default 600)")
    synth.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes")
    synth.add_argument("--version", type=int, choices=(1, 2), default=1, help="archive layout version")
    synth.add_argument("--s1", action="store_true", help="also write the matching Sentinel-1 patches")
    synth.set_defaults(run=_synth)

    examples = commands.add_parser("examples", help="extract the six real example patches")
    examples.add_argument("--out", type=Path, default=None, help="folder (default: the user cache)")
    examples.set_defaults(run=_examples)

    for name, run, help_text in (
        ("train", _train, "train a model from a JSON config (as the 2019 train.py)"),
        ("evaluate", _evaluate, "evaluate a model from a JSON config (as the 2019 eval.py)"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("config", type=Path, help="JSON configuration file")
        command.set_defaults(run=run)

    models = commands.add_parser(
        "models",
        help="list the registered models (and their sizes)",
        description="List the registered model names; with --parameters, build each to count its weights.",
        epilog="example: bigearthnet models ResNet50 VGG16 --parameters",
    )
    models.add_argument("names", nargs="*", help="only these models (default: all)")
    models.add_argument(
        "--parameters", action="store_true", help="build each model and count its parameters (slower)"
    )
    models.add_argument("--label-type", default="BigEarthNet-19", help="original or BigEarthNet-19")
    models.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    models.set_defaults(run=_models)

    stats = commands.add_parser("stats", help="per-band mean and std of prepared records, as a JSON file")
    stats.add_argument("files", nargs="+", help="TFRecord files, globs or folders (e.g. a split's shards)")
    stats.add_argument("--out", type=Path, required=True, help="statistics file to write (.json)")
    stats.add_argument(
        "--modality", choices=("S2", "S1", "MM"), default=None, help="bands (default: all the files hold)"
    )
    stats.add_argument("--overwrite", action="store_true", help="replace an existing statistics file")
    stats.set_defaults(run=_stats)

    predict = commands.add_parser("predict", help="apply a trained model to patch folders or an archive")
    predict.add_argument("patch_folders", nargs="*", type=Path, help="S2 patch folders (v1 or v2 layout)")
    predict.add_argument(
        "--model", required=True, help="checkpoint (base name, e.g. out/models/best), out_dir, or .keras"
    )
    predict.add_argument("--archive", type=Path, default=None, help="archive root, instead of patch folders")
    predict_splits = predict.add_mutually_exclusive_group()
    predict_splits.add_argument("--splits", nargs="+", type=Path, help="with --archive: split CSV files")
    predict_splits.add_argument("--official", action="store_true", help="with --archive: the official splits")
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
    predict.add_argument("--thresholds", type=Path, default=None, help="JSON file: class name -> threshold")
    predict.add_argument(
        "--choose-thresholds",
        nargs="+",
        metavar="RECORDS",
        help="validation TFRecords: choose per-class thresholds (max F1) and store them with the checkpoint",
    )
    predict.add_argument("--batch-size", type=int, default=64, help="patches per model call (default 64)")
    predict.add_argument("--workers", type=int, default=None, help="reading threads (default: 2 per core)")
    predict.add_argument("--skip-bad", action="store_true", help="skip unreadable patches and list them")
    predict.set_defaults(run=_predict)

    export = commands.add_parser("export", help="export a model (raw bands in, probabilities out)")
    export.add_argument(
        "--model", required=True, help="checkpoint (base name, e.g. out/models/best) or .keras"
    )
    export.add_argument("--format", required=True, choices=("saved_model", "onnx", "keras"), help="format")
    export.add_argument("--out", type=Path, required=True, help="SavedModel folder, .onnx or .keras file")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output")
    export.set_defaults(run=_export)

    importer = commands.add_parser("import", help="turn pretrained weights into a checkpoint of ours")
    sources = importer.add_subparsers(dest="source_kind", required=True, metavar="SOURCE_KIND")
    tf1 = sources.add_parser(
        "tf1",
        help="a 2019 TF1 checkpoint (model_file base name)",
        description="Import a checkpoint of the 2019 BigEarthNet TF1 code (TF-Slim ResNet/VGG, K-BranchCNN).",
        epilog="example: bigearthnet import tf1 ResNet50/iteration-6000 --model ResNet50 "
        "--label-type BigEarthNet-19 --out imported/models/iteration-6000",
    )
    tf1.add_argument("checkpoint", help="the 2019 model_file base name, e.g. ResNet50/iteration-6000")
    tf1.add_argument("--model", required=True, help="registered model name, e.g. ResNet50 or K-BranchCNN")
    tf1.add_argument("--label-type", required=True, help="original (43 classes) or BigEarthNet-19")
    tf1.add_argument("--out", type=Path, required=True, help="base name of the checkpoint to write")
    tf1.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    tf1.set_defaults(run=_import_tf1)
    reben = sources.add_parser(
        "reben",
        help="a reBEN (BigEarthNet v2.0) pretrained model: folder, hub cache or hf://",
        description="Import a reBEN model (BIFOLD-BigEarthNetv2-0 on the Hugging Face hub) into Keras.",
        epilog="example: bigearthnet import reben hf://BIFOLD-BigEarthNetv2-0/resnet50-all-v0.2.0 "
        "--out reben/resnet50-all",
    )
    reben.add_argument(
        "source",
        help="a folder with config.json and model.safetensors, a hub cache folder, or hf://ORG/NAME",
    )
    reben.add_argument("--out", type=Path, required=True, help="base name of the checkpoint to write")
    reben.add_argument(
        "--version",
        choices=("v0.1.1", "v0.2.0"),
        default=None,
        help="weights version (decides the band order); default: read from the repository name",
    )
    reben.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    reben.set_defaults(run=_import_reben)

    demo = commands.add_parser("demo", help="synthesise, prepare, train and evaluate end to end")
    demo.add_argument("--out", type=Path, default=None, help="output folder (default: a new one here)")
    demo.set_defaults(run=_demo)
    return parser


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `prepare`; the 2019 prep_splits.py flags keep their names."""
    parser.add_argument("-r", "--root_folder", "--root", type=Path, required=True, help="archive root")
    parser.add_argument("-o", "--out_folder", "--out", type=Path, required=True, help="output folder")
    splits = parser.add_mutually_exclusive_group(required=True)
    splits.add_argument(
        "-n", "--splits", nargs="+", type=Path, help="split CSV files; each file's base name names its split"
    )
    splits.add_argument(
        "--official",
        action="store_true",
        help="use the official splits (v1: bigearthnet-common; v2: parquet)",
    )
    parser.add_argument("--format", choices=("default", "legacy"), default="default", help="record format")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--shard-size", type=int, default=None, help="patches per shard (default format)")
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
    parser.add_argument("--s1-root", type=Path, default=None, help="Sentinel-1 archive root (adds VV, VH)")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `bigearthnet` console command."""
    argv = sys.argv[1:] if argv is None else argv
    # TensorFlow's C++ start-up chatter (CPU features, missing CUDA) is noise to a user; errors stay.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # `--splits official` is the documented spelling; argparse sees it as a flag.
    if "official" in argv and ("--splits" in argv or "-n" in argv):
        at = argv.index("official")
        if argv[at - 1] in ("--splits", "-n"):
            argv = [*argv[: at - 1], "--official", *argv[at + 1 :]]
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(error.exit_code) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
