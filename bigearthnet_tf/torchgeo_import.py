"""`bigearthnet import torchgeo`: Sentinel foundation backbones served by TorchGeo, as backbone checkpoints.

TorchGeo serves the self-supervised Sentinel ResNets (and ViT-S/16s) of SSL4EO-S12, DeCUR and SoftCon as `.pth`
state dicts in timm's key layout (SoftCon's are torchvision's, which names a ResNet's tensors as timm does),
without a head. The file alone says neither its bands nor their scaling, so the
user names the weights as TorchGeo does (`ResNet50_Weights.SENTINEL2_ALL_MOCO`); `WEIGHTS` holds what
each name means (architecture, input protocol of `models.ssl4eo`, the published file name whose last
part is a SHA-256 prefix, method and paper).

The file is read by `tensor_files.TorchStateDict` (no PyTorch, no code from the file run). The import
builds `SSL4EO-ResNet` or `SSL4EO-ViT` with the architecture read from the tensors' shapes, fills every backbone
weight by its timm name (a head in the file is ignored: these are backbones) and writes a checkpoint
of kind `backbone`: its head is zeros and it is meant for `"backbone_weights"` in a training config,
which fine-tunes it with a new head of 19 or 43 classes (evaluate and predict refuse it).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from bigearthnet_tf import checkpoints
from bigearthnet_tf.constants import BIGEARTHNET_19_LABELS
from bigearthnet_tf.errors import UserError
from bigearthnet_tf.tensor_files import TorchStateDict

LABEL_TYPE = "BigEarthNet-19"  # the zero head's; a fine-tune picks its own label type
REPORT_LIMIT = 6
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,})\.pth$")


@dataclass(frozen=True)
class TorchGeoWeights:
    """One TorchGeo weights entry: what the file holds and how its network reads input."""

    timm_model: str
    band_order: str  # an input protocol of models.ssl4eo
    file_name: str  # as published; the part after the last '-' is a SHA-256 prefix
    method: str
    publication: str
    repository: str

    @property
    def family(self) -> str:
        return "vit" if self.timm_model.startswith("vit_") else "resnet"

    @property
    def model_name(self) -> str:
        return "SSL4EO-ViT" if self.family == "vit" else "SSL4EO-ResNet"


WEIGHTS = MappingProxyType(
    {
        "ResNet18_Weights.SENTINEL2_ALL_MOCO": TorchGeoWeights(
            "resnet18",
            "ssl4eo-s2",
            "resnet18_sentinel2_all_moco-59bfdff9.pth",
            "MoCo v3",
            "https://arxiv.org/abs/2211.07044",
            "zhu-xlab/SSL4EO-S12",
        ),
        "ResNet50_Weights.SENTINEL2_ALL_MOCO": TorchGeoWeights(
            "resnet50",
            "ssl4eo-s2",
            "resnet50_sentinel2_all_moco-df8b932e.pth",
            "MoCo v3",
            "https://arxiv.org/abs/2211.07044",
            "zhu-xlab/SSL4EO-S12",
        ),
        "ResNet50_Weights.SENTINEL2_ALL_DINO": TorchGeoWeights(
            "resnet50",
            "ssl4eo-s2",
            "resnet50_sentinel2_all_dino-d6c330e9.pth",
            "DINO",
            "https://arxiv.org/abs/2211.07044",
            "zhu-xlab/SSL4EO-S12",
        ),
        "ResNet50_Weights.SENTINEL2_ALL_DECUR": TorchGeoWeights(
            "resnet50",
            "ssl4eo-s2",
            "rn50_ssl4eo-s12_ms_decur_ep100-fc6b09ff.pth",
            "DeCUR",
            "https://arxiv.org/abs/2309.05300",
            "zhu-xlab/DeCUR",
        ),
        "ResNet50_Weights.SENTINEL1_ALL_MOCO": TorchGeoWeights(
            "resnet50",
            "ssl4eo-s1",
            "resnet50_sentinel1_all_moco-906e4356.pth",
            "MoCo v3",
            "https://arxiv.org/abs/2211.07044",
            "zhu-xlab/SSL4EO-S12",
        ),
        "ResNet50_Weights.SENTINEL1_ALL_DECUR": TorchGeoWeights(
            "resnet50",
            "decur-s1",
            "rn50_ssl4eo-s12_sar_decur_ep100-f0e69ba2.pth",
            "DeCUR",
            "https://arxiv.org/abs/2309.05300",
            "zhu-xlab/DeCUR",
        ),
        "ResNet50_Weights.SENTINEL2_ALL_SOFTCON": TorchGeoWeights(
            "resnet50",
            "softcon-s2",
            "B13_rn50_softcon.pth",
            "SoftCon",
            "https://arxiv.org/abs/2405.20462",
            "zhu-xlab/softcon",
        ),
        "ResNet50_Weights.SENTINEL1_GRD_SOFTCON": TorchGeoWeights(
            "resnet50",
            "decur-s1",
            "B2_rn50_softcon.pth",
            "SoftCon",
            "https://arxiv.org/abs/2405.20462",
            "zhu-xlab/softcon",
        ),
        "ViTSmall16_Weights.SENTINEL2_ALL_MOCO": TorchGeoWeights(
            "vit_small_patch16_224",
            "ssl4eo-s2",
            "vit_small_patch16_224_sentinel2_all_moco-67c9032d.pth",
            "MoCo v3",
            "https://arxiv.org/abs/2211.07044",
            "zhu-xlab/SSL4EO-S12",
        ),
        "ViTSmall16_Weights.SENTINEL2_ALL_DINO": TorchGeoWeights(
            "vit_small_patch16_224",
            "ssl4eo-s2",
            "vit_small_patch16_224_sentinel2_all_dino-36bcc127.pth",
            "DINO",
            "https://arxiv.org/abs/2211.07044",
            "zhu-xlab/SSL4EO-S12",
        ),
        "ViTSmall16_Weights.SENTINEL2_ALL_FGMAE": TorchGeoWeights(
            "vit_small_patch16_224",
            "ssl4eo-s2",
            "B13_vits16_fgmae_ep99_enc.pth",
            "FG-MAE",
            "https://arxiv.org/abs/2310.18653",
            "zhu-xlab/FGMAE",
        ),
        "ViTSmall16_Weights.SENTINEL1_GRD_FGMAE": TorchGeoWeights(
            "vit_small_patch16_224",
            "decur-s1",
            "B2_vits16_fgmae_ep99_enc.pth",
            "FG-MAE",
            "https://arxiv.org/abs/2310.18653",
            "zhu-xlab/FGMAE",
        ),
    }
)


def weights_table() -> str:
    """`import torchgeo --list`: one line per supported name, with its bands and source."""
    from bigearthnet_tf.models.ssl4eo import PROTOCOLS

    rows = [("name", "network", "input", "method", "source")]
    rows += [
        (name, w.timm_model, PROTOCOLS[w.band_order].description, w.method, w.repository)
        for name, w in WEIGHTS.items()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip()
                     + "  " + row[4] for row in rows)


@dataclass(frozen=True)
class ImportedBackbone:
    base: Path
    weights: str
    sha256: str
    hash_checked: bool  # the file name carried a SHA-256 prefix, and the file matches it
    is_published_file: bool  # the file is the one TorchGeo publishes under this name
    model_name: str  # what a training config names to fine-tune it


def import_torchgeo(
    source: str | os.PathLike[str], weights: str, out_base: str | os.PathLike[str], *, overwrite: bool = False
) -> ImportedBackbone:
    """Import the TorchGeo state dict `source` of weights `weights` as backbone checkpoint `out_base`."""
    entry = WEIGHTS.get(weights)
    if entry is None:
        raise UserError(
            f"unknown --weights {weights!r}; supported: {', '.join(WEIGHTS)} (bigearthnet import torchgeo --list)"
        )
    source = Path(source).expanduser()
    if not source.exists():
        raise UserError(f"weights file {source} does not exist")
    with checkpoints.new_checkpoint(out_base, overwrite):
        return _import(source, weights, entry, Path(out_base))


def _import(source: Path, weights: str, entry: TorchGeoWeights, out_base: Path) -> ImportedBackbone:
    from bigearthnet_tf.models import build_model, timm_nets
    from bigearthnet_tf.models.ssl4eo import DEFAULT_IMAGE_SIZE, NETWORK_LAYER, PROTOCOLS

    digest = checkpoints.file_sha256(source)
    named = _HASH_IN_NAME.search(source.name)
    if named is not None and not digest.startswith(named[1]):
        raise UserError(
            f"{source}: its SHA-256 {digest[:12]}... does not start with {named[1]}, as its name says; "
            "the download is damaged or incomplete: download it again"
        )
    published = _HASH_IN_NAME.search(entry.file_name)
    is_published = published is not None and digest.startswith(published[1])

    protocol = PROTOCOLS[entry.band_order]
    with TorchStateDict(source) as stored:
        shapes = {
            key: shape for key, shape in stored.shapes().items() if not timm_nets.SKIPPED_TENSORS.search(key)
        }
        try:
            architecture = timm_nets.architecture_from_tensors(entry.family, shapes, DEFAULT_IMAGE_SIZE)
        except timm_nets.ArchitectureError as error:
            raise UserError(f"{source}: not a {entry.timm_model} state dict ({weights}): {error}") from None
        model = build_model(
            entry.model_name,
            len(BIGEARTHNET_19_LABELS),
            protocol.modality,
            None,
            architecture=timm_nets.architecture_to_dict(architecture),
            band_order=entry.band_order,
        )
        network = model.get_layer(NETWORK_LAYER)
        targets = {
            key: value
            for key, value in timm_nets.timm_tensor_names(network).items()
            if not key.startswith(f"{timm_nets.HEAD_LAYERS[entry.family]}.")
        }
        head = f"{timm_nets.HEAD_LAYERS[entry.family]}."
        values = _backbone_values(stored, shapes, targets, source, weights, len(protocol.channels), head)
    for key, (variable, _) in targets.items():
        variable.assign(values[key])

    source_meta = {
        "kind": "torchgeo",
        "weights": weights,
        "timm_model_name": entry.timm_model,
        "published_file": entry.file_name,
        "method": entry.method,
        "publication": entry.publication,
        "repository": entry.repository,
        "file": str(source),
        "sha256": digest,
        "is_published_file": is_published,
        "band_order": entry.band_order,
    }
    checkpoints.save_checkpoint(
        out_base,
        model,
        model_name=entry.model_name,
        label_type=LABEL_TYPE,
        modality=protocol.modality,
        iteration=0,
        source=source_meta,
        kind=checkpoints.KIND_BACKBONE,
    )
    return ImportedBackbone(out_base, weights, digest, named is not None, is_published, entry.model_name)


def _backbone_values(stored: TorchStateDict, shapes, targets, source: Path, weights: str, channels: int, head: str):
    """Keras values for every backbone weight, or one line listing what does not fit (nothing assigned);
    tensors of the head (`head` prefix) are ignored: these are backbones."""
    from bigearthnet_tf.models.timm_nets import keras_shape, keras_value

    available = {key for key in shapes if not key.startswith(head)}
    missing = sorted(set(targets) - available)
    extra = sorted(available - set(targets))
    mismatched = [
        f"{key} {shapes[key]}"
        for key, (variable, layout) in targets.items()
        if key in shapes and tuple(keras_shape(shapes[key], layout)) != tuple(variable.shape)
    ]
    if missing or extra or mismatched:
        problems = [
            f"{label} {_truncated(items)}"
            for label, items in (("missing:", missing), ("unexpected:", extra), ("wrong shape:", mismatched))
            if items
        ]
        raise UserError(
            f"{source}: the weights do not fit {weights} (a {channels}-channel network); " + "; ".join(problems)
        )
    return {key: keras_value(stored.array(key), layout) for key, (_, layout) in targets.items()}


def _truncated(items: list[str]) -> str:
    shown = ", ".join(items[:REPORT_LIMIT])
    return f"{shown}, ... and {len(items) - REPORT_LIMIT} more" if len(items) > REPORT_LIMIT else shown
