"""Make reBEN model folders with timm itself, and check that our Keras import computes what timm does.

Two steps in two Python environments (bigearthnet-tf never needs PyTorch):

    # 1. where torch, timm, safetensors, tifffile and bigearthnet-common are installed (no TensorFlow):
    python tools/reben_parity.py generate tests/data/reben            # the small committed fixtures
    python tools/reben_parity.py generate /tmp/reben-full --full       # the published sizes
    # 2. where bigearthnet-tf is installed:
    python tools/reben_parity.py check tests/data/reben
    python tools/reben_parity.py check /tmp/reben-full

`generate` writes, per model, a folder in the exact Hugging Face hub layout of the reBEN models
(`config.json` as ConfigILM writes it, `model.safetensors` with keys `model.vision_encoder.<timm key>`)
built by `timm.create_model(name, in_chans=C, num_classes=19, drop_rate=0.15, drop_path_rate=0.15[,
img_size=120])` with seeded random weights (batch-norm and layer-norm statistics and the GRN made
non-trivial, so no layer is an identity), and `reference.npz` with timm's logits:

- `image_logits`: on `image(seed, channels)`, a seeded standard-normal batch (NumPy's PCG64 gives the
  same numbers in both environments), for the network alone;
- `patch_logits`: on the six real example patches of bigearthnet-common, preprocessed as reBEN does
  (each band as float32, `F.interpolate(..., size=120, mode="nearest")`, stacked in the weights
  version's channel order, standardised with the "120_nearest" statistics), for the whole chain;
  `patch_names` gives their order.

The small fixtures are the published architectures with fewer blocks and channels (timm's own model
constructors with `layers`/`depths`/`dims`/`embed_dim`/... overridden); their folder names start with
`tiny-` and otherwise follow the hub's `<timm name>-<s1|s2|all>-<version>`.

`check` imports each folder with `bigearthnet import reben`, then compares (float32) our network's
logits on the same image, and our `predict` on the example patch folders, with timm's; it prints the
largest differences and exits 1 when one exceeds the tolerance (1e-4).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

TOLERANCE = 1e-4
IMAGE_BATCH = 2
CHANNELS = {"s1": 2, "s2": 10, "all": 12}
SIZED_FAMILIES = ("vit_", "mixer_")  # take img_size=120; timm's ResNet and ConvNeXt take none
_S2_V011 = ["B02", "B03", "B04", "B08", "B05", "B06", "B07", "B11", "B12", "B8A"]
_S2_V020 = ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
BAND_ORDERS = {
    "v0.1.1": {"s1": ["VH", "VV"], "s2": _S2_V011, "all": [*_S2_V011, "VH", "VV"]},
    "v0.2.0": {"s1": ["VV", "VH"], "s2": _S2_V020, "all": ["VV", "VH", *_S2_V020]},
}
STATISTICS = {  # ConfigILM "120_nearest"
    "B02": (438.3720703125, 607.02685546875),
    "B03": (614.0556640625, 603.2968139648438),
    "B04": (588.4096069335938, 684.56884765625),
    "B05": (942.8433227539062, 738.4326782226562),
    "B06": (1769.931640625, 1100.4560546875),
    "B07": (2049.551513671875, 1275.805419921875),
    "B08": (2193.2919921875, 1369.3717041015625),
    "B8A": (2235.556640625, 1356.5440673828125),
    "B11": (1568.226806640625, 1070.1612548828125),
    "B12": (997.7324829101562, 813.5276489257812),
    "VV": (-12.643863677978516, 5.133493900299072),
    "VH": (-19.352558135986328, 5.590505599975586),
}

# (folder name, timm name, timm constructor overrides) of the committed fixtures: every family, every
# modality, both versions, both ResNet block kinds.
TINY_MODELS = [
    (
        "tiny-resnet50-all-v0.2.0",
        "resnet50",
        {"layers": (2, 1, 1, 1), "channels": (8, 12, 16, 24), "stem_width": 8},
    ),
    (
        "tiny-resnet50-all-v0.1.1",
        "resnet50",
        {"layers": (1, 1, 1, 1), "channels": (8, 12, 16, 24), "stem_width": 8},
    ),
    (
        "tiny-resnet18-s1-v0.1.1",
        "resnet18",
        {"layers": (1, 2, 1, 1), "channels": (8, 12, 16, 24), "stem_width": 8},
    ),
    ("tiny-convnextv2_base-s2-v0.2.0", "convnextv2_base", {"depths": (1, 2, 1, 1), "dims": (8, 16, 24, 32)}),
    (
        "tiny-vit_base_patch8_224-all-v0.2.0",
        "vit_base_patch8_224",
        {"embed_dim": 128, "depth": 2, "num_heads": 2, "mlp_ratio": 1.0},
    ),
    ("tiny-mixer_b16_224-s2-v0.1.1", "mixer_b16_224", {"num_blocks": 2, "embed_dim": 32}),
    ("tiny-mobilevit_s-all-v0.1.1", "mobilevit_s", {"cfg": "tiny"}),
    ("tiny-mobilevit_s-s1-v0.2.0", "mobilevit_s", {"cfg": "tiny"}),
]
FULL_MODELS = [
    ("resnet50-s1-v0.2.0", "resnet50", {}),
    ("resnet50-s2-v0.2.0", "resnet50", {}),
    ("resnet50-all-v0.2.0", "resnet50", {}),
    ("resnet18-all-v0.1.1", "resnet18", {}),
    ("resnet101-all-v0.2.0", "resnet101", {}),
    ("convnextv2_base-all-v0.2.0", "convnextv2_base", {}),
    ("vit_base_patch8_224-all-v0.2.0", "vit_base_patch8_224", {}),
    ("mixer_b16_224-all-v0.2.0", "mixer_b16_224", {}),
    ("mobilevit_s-all-v0.1.1", "mobilevit_s", {}),
    ("mobilevit_s-all-v0.2.0", "mobilevit_s", {}),
]


def image(seed: int, channels: int) -> np.ndarray:
    """The network-level test input, channels last (the same in both environments)."""
    return np.random.default_rng(seed).standard_normal((IMAGE_BATCH, 120, 120, channels), dtype=np.float32)


def _parts(folder_name: str) -> tuple[str, str]:
    *_, modality, version = folder_name.split("-")
    return modality, version


# ---------------------------------------------------------------------------------------------
# generate (torch, timm)


def example_patch_bands(examples) -> tuple[list[str], dict[str, dict[str, np.ndarray]]]:
    """Each real example patch's 10 S2 bands and its S1 twin's VV, VH, read with tifffile."""
    import tifffile

    s1_of = {}
    for folder in sorted(p for p in examples.s1.iterdir() if p.is_dir()):
        labels = json.loads((folder / f"{folder.name}_labels_metadata.json").read_text())
        s1_of[labels["corresponding_s2_patch"]] = folder
    names = sorted(folder.name for folder in examples.s2.iterdir() if folder.is_dir())
    bands = {}
    for name in names:
        bands[name] = {band: tifffile.imread(examples.s2 / name / f"{name}_{band}.tif") for band in _S2_V020}
        s1 = s1_of[name]
        bands[name] |= {band: tifffile.imread(s1 / f"{s1.name}_{band}.tif") for band in ("VV", "VH")}
    return names, bands


def reben_input(patch: dict[str, np.ndarray], order: list[str]):
    """reBEN's preprocessing of one patch: float32 bands, nearest upsampling to 120, standardisation."""
    import torch
    import torch.nn.functional as F

    channels = []
    for band in order:
        tensor = torch.from_numpy(patch[band].astype(np.float32))[None, None]
        channels.append(F.interpolate(tensor, size=(120, 120), mode="nearest")[0, 0])
    stacked = torch.stack(channels)
    mean = torch.tensor([STATISTICS[band][0] for band in order], dtype=torch.float32)[:, None, None]
    std = torch.tensor([STATISTICS[band][1] for band in order], dtype=torch.float32)[:, None, None]
    return (stacked - mean) / std


def randomise(model, seed: int) -> None:
    """Perturb every weight, and make norm statistics non-trivial, so that no layer is an identity or
    a zero (timm zero-initialises some heads and the GRN); timm's initial scale is kept otherwise."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if key.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.ndim == 1 or key in ("cls_token", "pos_embed"):
                tensor.add_(noise * 0.1)
            else:  # kernels: noise at the scale of fan-in initialisation
                fan_in = tensor[0].numel()
                tensor.add_(noise * 0.5 / fan_in**0.5)


def tiny_mobilevit(**kwargs):
    """mobilevit_s's layout (timm's own helpers) with fewer channels and transformer layers; at 120 px
    its first MobileViT block sees 15 x 15, so timm's interpolation to a multiple of the patch is used."""
    from timm.models.byobnet import ByobNet, ByoModelCfg
    from timm.models.mobilevit import _inverted_residual_block, _mobilevit_block

    cfg = ByoModelCfg(
        blocks=(
            _inverted_residual_block(d=1, c=8, s=1),
            _inverted_residual_block(d=2, c=12, s=2),
            _mobilevit_block(d=1, c=16, s=2, transformer_dim=24, transformer_depth=1, patch_size=2),
            _mobilevit_block(d=1, c=20, s=2, transformer_dim=32, transformer_depth=2, patch_size=2),
            _mobilevit_block(d=1, c=24, s=2, transformer_dim=32, transformer_depth=1, patch_size=2),
        ),
        stem_chs=8,
        stem_type="3x3",
        stem_pool="",
        downsample="",
        act_layer="silu",
        num_features=48,
    )
    return ByobNet(cfg, **kwargs)


def generate(out: Path, full: bool, only: str = "") -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bigearthnet_tf.examples import example_archive

    torch.manual_seed(0)
    paths = example_archive(Path(tempfile.mkdtemp()))
    names, bands = example_patch_bands(paths)
    for seed, (folder_name, timm_name, overrides) in enumerate(FULL_MODELS if full else TINY_MODELS):
        if only not in folder_name:
            continue
        modality, version = _parts(folder_name)
        channels = CHANNELS[modality]
        # timm's mixer_b16_224 fixes its size; the tiny one comes from the same class.
        create = timm.models.mlp_mixer.MlpMixer if timm_name.startswith("mixer_") and overrides else None
        if create is not None:
            overrides = {"patch_size": 16, **overrides}
        if overrides.get("cfg") == "tiny":
            create, overrides = tiny_mobilevit, {}
        model = (create or functools.partial(timm.create_model, timm_name))(
            in_chans=channels,
            num_classes=19,
            drop_rate=0.15,
            drop_path_rate=0.15,
            **({"img_size": 120} if timm_name.startswith(SIZED_FAMILIES) else {}),
            **overrides,
        )
        randomise(model, seed)
        model.eval()
        with torch.no_grad():
            batch = torch.from_numpy(image(seed, channels)).permute(0, 3, 1, 2).contiguous()
            image_logits = model(batch).numpy()
            patches = torch.stack(
                [reben_input(bands[name], BAND_ORDERS[version][modality]) for name in names]
            )
            patch_logits = model(patches).numpy()
        folder = out / folder_name
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.vision_encoder.{k}": v.contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, folder / "model.safetensors")
        config = {  # ConfigILM's ILMConfiguration as PyTorchModelHubMixin saves it (sorted keys)
            "channels": channels,
            "class_names": [str(i) for i in range(19)],
            "classes": 19,
            "drop_path_rate": 0.15,
            "drop_rate": 0.15,
            "image_size": 120,
            "network_type": "VISION_CLASSIFICATION",
            "timm_model_name": timm_name,
        }
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        np.savez(
            folder / "reference.npz",
            image_seed=np.int64(seed),
            image_logits=image_logits.astype(np.float32),
            patch_names=np.array(names),
            patch_logits=patch_logits.astype(np.float32),
        )
        parameters = sum(p.numel() for p in model.parameters())
        print(f"{folder}: {timm_name} {channels} channels, {parameters:,} parameters")


# ---------------------------------------------------------------------------------------------
# check (bigearthnet-tf)


def check_folder(folder: Path, examples, work: Path) -> dict[str, float]:
    """Import `folder`, run our network and our `predict` on timm's inputs; the largest differences."""
    import keras

    from bigearthnet_tf import cli
    from bigearthnet_tf.checkpoints import load_checkpoint
    from bigearthnet_tf.constants import BIGEARTHNET_19_LABELS
    from bigearthnet_tf.models.reben import NETWORK_LAYER

    reference = np.load(folder / "reference.npz")
    alphabetical = sorted(BIGEARTHNET_19_LABELS)
    ours_in_theirs = [alphabetical.index(name) for name in BIGEARTHNET_19_LABELS]
    base = work / folder.name
    cli.main(["import", "reben", str(folder), "--out", str(base)])
    model = load_checkpoint(base).model
    network = model.get_layer(NETWORK_LAYER)
    channels = network.inputs[0].shape[-1]
    logits = keras.ops.convert_to_numpy(
        network(image(int(reference["image_seed"]), channels), training=False)
    )
    network_difference = np.abs(logits - reference["image_logits"][:, ours_in_theirs]).max()

    out = work / f"{folder.name}-predictions.json"
    names = [str(name) for name in reference["patch_names"]]
    cli.main(
        [
            "predict",
            *[str(examples.s2 / n) for n in names],
            "--model",
            str(base),
            "--s1-root",
            str(examples.s1),
            "--out",
            str(out),
        ]
    )
    predicted = {row["patch_name"]: row["probabilities"] for row in json.loads(out.read_text())}
    ours = np.array([[predicted[name][label] for label in BIGEARTHNET_19_LABELS] for name in names])
    theirs = 1 / (1 + np.exp(-reference["patch_logits"][:, ours_in_theirs].astype(np.float64)))
    return {
        "network logits": float(network_difference),
        "predict probabilities": float(np.abs(ours - theirs).max()),
    }


def check(directory: Path) -> int:
    from bigearthnet_tf.examples import example_archive

    work = Path(tempfile.mkdtemp())
    examples = example_archive(work / "examples")
    worst = 0.0
    for folder in sorted(p for p in directory.iterdir() if (p / "reference.npz").is_file()):
        differences = check_folder(folder, examples, work)
        worst = max(worst, *differences.values())
        print(
            f"{folder.name}: "
            + ", ".join(f"{key} max |diff| {value:.2e}" for key, value in differences.items())
        )
    print(f"largest difference {worst:.2e} (tolerance {TOLERANCE:.0e})")
    return 0 if worst <= TOLERANCE else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("generate", help="write model folders and timm's logits (needs torch, timm)")
    make.add_argument("out", type=Path)
    make.add_argument("--full", action="store_true", help="the published sizes instead of the tiny fixtures")
    make.add_argument("--only", default="", help="only the models whose folder name contains this")
    verify = commands.add_parser("check", help="import each folder and compare (needs bigearthnet-tf)")
    verify.add_argument("directory", type=Path)
    args = parser.parse_args()
    if args.command == "generate":
        generate(args.out, args.full, args.only)
    else:
        raise SystemExit(check(args.directory))


if __name__ == "__main__":
    main()
