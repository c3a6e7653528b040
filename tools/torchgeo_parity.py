"""Make TorchGeo-style Sentinel backbone files with timm itself, and check that our import computes what
timm does on the weights' own input protocol.

Two steps in two Python environments (bigearthnet-tf never needs PyTorch):

    # 1. where torch, timm, tifffile and bigearthnet-common are installed (no TensorFlow):
    python tools/torchgeo_parity.py generate tests/data/torchgeo            # the small committed fixtures
    python tools/torchgeo_parity.py generate /tmp/torchgeo-full --full       # the published sizes
    python tools/torchgeo_parity.py generate /tmp/softcon --full --only softcon  # some of them
    # 2. where bigearthnet-tf is installed:
    python tools/torchgeo_parity.py check tests/data/torchgeo
    python tools/torchgeo_parity.py check /tmp/torchgeo-full

`generate` writes, per weights name, `<name>.pth`: `torch.save` of a timm ResNet's state dict without
its head (as TorchGeo serves them), built by `timm.create_model(..., in_chans=C)` with seeded random
weights (`reben_parity.randomise`), and `<name>.npz` with timm's pooled features (`num_classes=0`):

- `image_features`: on a seeded standard-normal 224 x 224 batch, for the network alone;
- `patch_features`: on the six real example patches of bigearthnet-common, preprocessed as the
  protocol says (each band as float32 from its native grid, `F.interpolate(size=224, mode="bilinear",
  align_corners=False)`, stacked in the weights' channel order with a zero B10 for S2, scaled by
  1/10000 or standardised with the weights' statistics), for the whole chain.

SoftCon's files are torchvision ResNet50 state dicts; torchvision and timm name a ResNet's tensors
alike and compute the same network, so timm writes them here too.

`check` imports each file with `bigearthnet import torchgeo`, then compares (float32) our network's
pooled features on the same image, and our `embed` on the example patch folders, with timm's; it
prints the largest differences and exits 1 when one exceeds the tolerance (1e-4).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOLERANCE = 1e-4
IMAGE_BATCH = 2
IMAGE_SIZE = 224
L1C_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]
STATISTICS = {  # (mean, std) per channel of the standardised protocols
    "ssl4eo-s1": ([-12.54847273, -20.19237134], [5.25697717, 5.91150917]),
    "decur-s1": ([-12.59, -20.26], [5.26, 5.91]),
    "softcon-s2": (  # TorchGeo's _mean_s2 / _std_s2, over the 13 L1C bands
        [1612.9, 1397.6, 1322.3, 1373.1, 1561.0, 2108.4, 2390.7, 2318.7, 2581.0, 837.7, 22.0, 2195.2, 1537.4],
        [791.0, 854.3, 878.7, 1144.9, 1127.5, 1164.2, 1276.0, 1249.5, 1345.9, 577.5, 47.5, 1340.0, 1142.9],
    ),
}
# (file stem, TorchGeo weights name, timm name, timm constructor overrides)
TINY = [
    (
        "tiny-resnet18_sentinel2_all_moco",
        "ResNet18_Weights.SENTINEL2_ALL_MOCO",
        "resnet18",
        {"layers": (1, 2, 1, 1), "channels": (8, 12, 16, 24), "stem_width": 8},
    ),
    (
        "tiny-resnet50_sentinel1_all_moco",
        "ResNet50_Weights.SENTINEL1_ALL_MOCO",
        "resnet50",
        {"layers": (1, 1, 1, 1), "channels": (8, 12, 16, 24), "stem_width": 8},
    ),
    (
        "tiny-vit_small_patch16_224_sentinel2_all_dino",
        "ViTSmall16_Weights.SENTINEL2_ALL_DINO",
        "vit_small_patch16_224",
        {"embed_dim": 64, "depth": 2, "num_heads": 1, "mlp_ratio": 2.0},
    ),
    (
        "tiny-B13_rn50_softcon",
        "ResNet50_Weights.SENTINEL2_ALL_SOFTCON",
        "resnet50",
        {"layers": (1, 1, 1, 1), "channels": (8, 12, 16, 24), "stem_width": 8},
    ),
]
FULL = [
    ("resnet50_sentinel2_all_moco", "ResNet50_Weights.SENTINEL2_ALL_MOCO", "resnet50", {}),
    ("resnet18_sentinel2_all_moco", "ResNet18_Weights.SENTINEL2_ALL_MOCO", "resnet18", {}),
    ("resnet50_sentinel1_all_moco", "ResNet50_Weights.SENTINEL1_ALL_MOCO", "resnet50", {}),
    ("rn50_ssl4eo-s12_sar_decur_ep100", "ResNet50_Weights.SENTINEL1_ALL_DECUR", "resnet50", {}),
    ("vit_small_patch16_224_sentinel2_all_moco", "ViTSmall16_Weights.SENTINEL2_ALL_MOCO", "vit_small_patch16_224", {}),
    ("B2_vits16_fgmae_ep99_enc", "ViTSmall16_Weights.SENTINEL1_GRD_FGMAE", "vit_small_patch16_224", {}),
    ("B13_rn50_softcon", "ResNet50_Weights.SENTINEL2_ALL_SOFTCON", "resnet50", {}),
    ("B2_rn50_softcon", "ResNet50_Weights.SENTINEL1_GRD_SOFTCON", "resnet50", {}),
]
PROTOCOL_OF = {
    "ResNet18_Weights.SENTINEL2_ALL_MOCO": "ssl4eo-s2",
    "ResNet50_Weights.SENTINEL2_ALL_MOCO": "ssl4eo-s2",
    "ResNet50_Weights.SENTINEL1_ALL_MOCO": "ssl4eo-s1",
    "ResNet50_Weights.SENTINEL1_ALL_DECUR": "decur-s1",
    "ViTSmall16_Weights.SENTINEL2_ALL_DINO": "ssl4eo-s2",
    "ViTSmall16_Weights.SENTINEL2_ALL_MOCO": "ssl4eo-s2",
    "ViTSmall16_Weights.SENTINEL1_GRD_FGMAE": "decur-s1",
    "ResNet50_Weights.SENTINEL2_ALL_SOFTCON": "softcon-s2",
    "ResNet50_Weights.SENTINEL1_GRD_SOFTCON": "decur-s1",
}


def channels_of(weights: str) -> int:
    return 13 if PROTOCOL_OF[weights].endswith("-s2") else 2


def image(seed: int, channels: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((IMAGE_BATCH, IMAGE_SIZE, IMAGE_SIZE, channels), np.float32)


def example_bands(examples) -> tuple[list[str], dict[str, dict[str, np.ndarray]]]:
    """Each real example patch's 12 S2 bands (native grids) and its S1 twin's VV, VH."""
    import json

    import tifffile

    s1_of = {}
    for folder in sorted(p for p in examples.s1.iterdir() if p.is_dir()):
        labels = json.loads((folder / f"{folder.name}_labels_metadata.json").read_text())
        s1_of[labels["corresponding_s2_patch"]] = folder
    names = sorted(folder.name for folder in examples.s2.iterdir() if folder.is_dir())
    bands = {}
    for name in names:
        bands[name] = {
            band: tifffile.imread(examples.s2 / name / f"{name}_{band}.tif")
            for band in L1C_BANDS
            if band != "B10"
        }
        s1 = s1_of[name]
        bands[name] |= {band: tifffile.imread(s1 / f"{s1.name}_{band}.tif") for band in ("VV", "VH")}
    return names, bands


def protocol_input(patch: dict[str, np.ndarray], protocol: str):
    """The weights' preprocessing of one patch (channels first), in PyTorch."""
    import torch
    import torch.nn.functional as F

    def resized(values):
        tensor = torch.from_numpy(values.astype(np.float32))[None, None]
        return F.interpolate(tensor, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)[0, 0]

    if protocol.endswith("-s2"):
        zero = torch.zeros(IMAGE_SIZE, IMAGE_SIZE)  # BigEarthNet has no B10
        stacked = torch.stack([zero if band == "B10" else resized(patch[band]) for band in L1C_BANDS])
    else:
        stacked = torch.stack([resized(patch[band]) for band in ("VV", "VH")])
    if protocol == "ssl4eo-s2":
        return stacked / 10000
    mean, std = STATISTICS[protocol]
    return (stacked - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def generate(out: Path, full: bool, only: str | None = None) -> None:
    import timm
    import torch
    from reben_parity import randomise

    from bigearthnet_tf.examples import example_archive

    names, bands = example_bands(example_archive(Path(tempfile.mkdtemp())))
    out.mkdir(parents=True, exist_ok=True)
    for seed, (stem, weights, timm_name, overrides) in enumerate(FULL if full else TINY, start=100):
        if only and only not in stem:
            continue
        protocol = PROTOCOL_OF[weights]
        channels = channels_of(weights)
        model = timm.create_model(timm_name, in_chans=channels, num_classes=0, **overrides)
        randomise(model, seed)
        model.eval()
        with torch.no_grad():
            batch = torch.from_numpy(image(seed, channels)).permute(0, 3, 1, 2).contiguous()
            image_features = model(batch).numpy()
            patches = torch.stack([protocol_input(bands[name], protocol) for name in names])
            patch_features = model(patches).numpy()
        torch.save(model.state_dict(), out / f"{stem}.pth")
        np.savez(
            out / f"{stem}.npz",
            weights=np.array(weights),
            image_seed=np.int64(seed),
            image_features=image_features.astype(np.float32),
            patch_names=np.array(names),
            patch_features=patch_features.astype(np.float32),
        )
        print(f"{out / stem}.pth: {timm_name} {channels} channels, {sum(p.numel() for p in model.parameters()):,} parameters")


def our_features(base: Path, images: dict[str, np.ndarray] | np.ndarray):
    """Our pooled features: of the network on a ready image, or of the whole model on raw bands."""
    import keras

    from bigearthnet_tf import checkpoints
    from bigearthnet_tf.backbones import feature_model
    from bigearthnet_tf.models.ssl4eo import NETWORK_LAYER

    model, _, _ = checkpoints.load_checkpoint(base)
    pooled = feature_model(model.get_layer(NETWORK_LAYER))
    return keras.ops.convert_to_numpy(pooled(images, training=False))


def check(directory: Path) -> int:
    from bigearthnet_tf.embed import embed
    from bigearthnet_tf.examples import example_archive
    from bigearthnet_tf.torchgeo_import import import_torchgeo

    worst = 0.0
    work = Path(tempfile.mkdtemp())
    examples = example_archive(work / "examples")
    folders = sorted(p for p in examples.s2.iterdir() if p.is_dir())
    for reference_file in sorted(directory.glob("*.npz")):
        reference = np.load(reference_file)
        weights = str(reference["weights"])
        base = work / reference_file.stem
        import_torchgeo(reference_file.with_suffix(".pth"), weights, base)
        ours = our_features(base, image(int(reference["image_seed"]), channels_of(weights)))
        network = float(np.abs(ours - reference["image_features"]).max())
        embedded = embed(base, folders, s1_root=examples.s1)  # S1 models read the S2 folders' twins
        order = [embedded.names.index(str(name)) for name in reference["patch_names"]]
        chain = float(np.abs(embedded.features[order] - reference["patch_features"]).max())
        scale = float(reference["patch_features"].std())
        print(f"{reference_file.stem}: network {network:.1e}, whole chain {chain:.1e} (feature std {scale:.2f})")
        worst = max(worst, network, chain)
    print(f"largest difference {worst:.1e} (tolerance {TOLERANCE:g})")
    return 0 if worst <= TOLERANCE else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("generate")
    make.add_argument("out", type=Path)
    make.add_argument("--full", action="store_true")
    make.add_argument("--only", help="only the files whose name contains this")
    sub.add_parser("check").add_argument("directory", type=Path)
    args = parser.parse_args()
    if args.command == "generate":
        generate(args.out, args.full, args.only)
    else:
        sys.exit(check(args.directory))


if __name__ == "__main__":
    main()
