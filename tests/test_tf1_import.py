"""Import of 2019 TF1 checkpoints: written here with the 2019 variable names, then imported.

The expected names and shapes are derived in this file from the 2019 architectures (TF-Slim
`resnet_v1` / `vgg`, the 2019 `K-BranchCNN.py` scopes), never read back from our models, and the
Keras weight each name must land in is found by a reverse rule written here too. Checkpoints are
written either by TF1's own `Saver` in graph mode with an Adam optimizer (as the 2019 `train.py`
did: slots, beta powers and all) or, for the large ones, by the `SaveV2` op the Saver uses.
"""

from __future__ import annotations

import re
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from bigearthnet_tf.errors import UserError
from bigearthnet_tf.models import build_model, parameter_count
from bigearthnet_tf.tf1_import import (
    TF1ImportError,
    import_tf1_checkpoint,
    importable_models,
    resolve_tf1_checkpoint,
    save_imported,
    tf1_variable_map,
    unnamed_weights,
)

S2_CHANNELS = 10
BATCH_NORM = ("beta", "gamma", "moving_mean", "moving_variance")

# ---------------------------------------------------------------------------------------------
# The 2019 variable names and shapes, from the architecture descriptions (BIGEARTHNET.md section 4)


def slim_resnet_variables(scope, units, classes, base_depths=(64, 128, 256, 512), root=64):
    """TF-Slim resnet_v1 under resnet_arg_scope: conv weights without biases, each followed by BatchNorm."""
    variables = {}

    def conv_bn(path, kernel, channels_in, channels_out):
        variables[f"{scope}/{path}/weights"] = (kernel, kernel, channels_in, channels_out)
        for leaf in BATCH_NORM:
            variables[f"{scope}/{path}/BatchNorm/{leaf}"] = (channels_out,)

    conv_bn("conv1", 7, S2_CHANNELS, root)
    depth_in = root
    for block, (unit_count, base) in enumerate(zip(units, base_depths, strict=True), start=1):
        for unit in range(1, unit_count + 1):
            prefix = f"block{block}/unit_{unit}/bottleneck_v1"
            if depth_in != 4 * base:  # slim: projection shortcut only where the depth changes
                conv_bn(f"{prefix}/shortcut", 1, depth_in, 4 * base)
            conv_bn(f"{prefix}/conv1", 1, depth_in, base)
            conv_bn(f"{prefix}/conv2", 3, base, base)
            conv_bn(f"{prefix}/conv3", 1, base, 4 * base)
            depth_in = 4 * base
    variables[f"{scope}/logits/weights"] = (1, 1, depth_in, classes)
    variables[f"{scope}/logits/biases"] = (classes,)
    return variables


def slim_vgg_variables(scope, convs, classes, widths=(64, 128, 256, 512, 512), fc=4096):
    """TF-Slim vgg: conv<s>/conv<s>_<i> with biases, fc6 7x7, fc7 and fc8 1x1 convolutions."""
    variables = {}
    channels_in = S2_CHANNELS
    for stage, (count, width) in enumerate(zip(convs, widths, strict=True), start=1):
        for index in range(1, count + 1):
            variables[f"{scope}/conv{stage}/conv{stage}_{index}/weights"] = (3, 3, channels_in, width)
            variables[f"{scope}/conv{stage}/conv{stage}_{index}/biases"] = (width,)
            channels_in = width
    for name, kernel, units_in, units_out in (
        ("fc6", 7, channels_in, fc),
        ("fc7", 1, fc, fc),
        ("fc8", 1, fc, classes),
    ):
        variables[f"{scope}/{name}/weights"] = (kernel, kernel, units_in, units_out)
        variables[f"{scope}/{name}/biases"] = (units_out,)
    return variables


def kbranch_2019_variables(classes, divisor=1, feature=128):
    """The 2019 K-BranchCNN.py: tf.layers conv_layer / fc_layer / batch_norm inside named scopes."""
    variables = {}

    def block(scope, kernel_shape, units):
        variables[f"{scope}/{'conv_layer' if len(kernel_shape) == 4 else 'fc_layer'}/kernel"] = kernel_shape
        variables[f"{scope}/{'conv_layer' if len(kernel_shape) == 4 else 'fc_layer'}/bias"] = (units,)
        for leaf in BATCH_NORM:
            variables[f"{scope}/batch_norm/{leaf}"] = (units,)

    f32, f64 = 32 // divisor, 64 // divisor
    # (branch, channels in, [(kernel, filters)], flattened size)
    branches = (
        ("10m", 4, [(5, f32), (5, f32), (3, f64)], 30 * 30 * f64),
        ("20m", 6, [(3, f32), (3, f32), (3, f64)], 30 * 30 * f64),
        ("60m", 2, [(2, f32), (2, f32), (2, f32)], 20 * 20 * f32),
    )
    for resolution, channels_in, convs, flat in branches:
        for index, (kernel, filters) in enumerate(convs):
            block(
                f"CNN_{resolution}_branch/conv_block_{index}", (kernel, kernel, channels_in, filters), filters
            )
            channels_in = filters
        block(f"CNN_{resolution}_branch/fc_block_0", (flat, feature), feature)
    block("feature_fusion/fc_block_0", (3 * feature, feature), feature)
    variables["classification/fc_layer/kernel"] = (feature, classes)
    variables["classification/fc_layer/bias"] = (classes,)
    return variables


TINY_VARIABLES = {
    "ResNet-Tiny": lambda classes: slim_resnet_variables(
        "resnet_v1_tiny", (2, 1, 1, 1), classes, base_depths=(8, 16, 32, 64), root=8
    ),
    "VGG-Tiny": lambda classes: slim_vgg_variables(
        "vgg_tiny", (1, 1, 1, 1, 1), classes, widths=(8, 16, 32, 32, 32), fc=64
    ),
    "K-BranchCNN-Tiny": lambda classes: kbranch_2019_variables(classes, divisor=4, feature=32),
}

# ---------------------------------------------------------------------------------------------
# Reverse rule: 2019 name -> (Keras layer name, weight attribute), independent of the module's rule

_LEAF_ATTRIBUTE = {"weights": "kernel", "biases": "bias", "kernel": "kernel", "bias": "bias"} | {
    leaf: leaf for leaf in BATCH_NORM
}


def keras_target(name: str) -> tuple[str, str]:
    parts = name.split("/")
    attribute = _LEAF_ATTRIBUTE[parts[-1]]
    if parts[0].startswith("resnet_v1"):
        batch_norm = parts[-2] == "BatchNorm"
        path = parts[1:-2] if batch_norm else parts[1:-1]
        layer = f"{path[0]}_{path[1]}_{path[3]}" if path[0].startswith("block") else path[0]
        return layer + ("_bn" if batch_norm else ""), attribute
    if parts[0].startswith("vgg"):
        return parts[-2], attribute
    suffix = {"conv_layer": "conv", "fc_layer": "fc", "batch_norm": "bn"}[parts[-2]]
    if parts[0] == "classification":
        return "logits", attribute
    if parts[0] == "feature_fusion":
        return f"fusion_fc_block_{suffix}", attribute
    resolution = re.fullmatch(r"CNN_(\d+m)_branch", parts[0]).group(1)
    if parts[1] == "fc_block_0":
        return f"branch_{resolution}_fc_block_{suffix}", attribute
    return f"branch_{resolution}_{parts[1]}_{suffix}", attribute


# ---------------------------------------------------------------------------------------------
# Writing checkpoints


def random_values(shapes, seed=0):
    """Distinct random values per variable; variances positive, as a trained network's are."""
    rng = np.random.default_rng(seed)
    values = {}
    for name, shape in shapes.items():
        value = rng.normal(0.0, 0.1, shape).astype("float32")
        values[name] = np.abs(value) + 0.5 if name.endswith("moving_variance") else value
    return values


def write_with_tf1_saver(prefix, values, iteration):
    """As the 2019 train.py: variables in a graph, Adam minimising a loss, Saver(global_variables)."""
    graph = tf.Graph()
    with graph.as_default():
        variables = [
            tf.compat.v1.get_variable(
                name,
                initializer=tf.constant(value),
                trainable=not name.endswith(("moving_mean", "moving_variance")),
            )
            for name, value in values.items()
        ]
        loss = tf.add_n([tf.reduce_sum(tf.square(v)) for v in tf.compat.v1.trainable_variables()])
        tf.compat.v1.train.AdamOptimizer(1e-3).minimize(loss)  # creates the slots; never run
        saver = tf.compat.v1.train.Saver(tf.compat.v1.global_variables())
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.variables_initializer(tf.compat.v1.global_variables()))
            assert len(variables) == len(values)
            return saver.save(session, str(prefix), global_step=iteration)


def write_with_save_op(prefix, values):
    """The SaveV2 op the TF1 Saver runs, eagerly: same files, no graph copy of large values."""
    names = list(values)
    tf.raw_ops.SaveV2(
        prefix=str(prefix),
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[values[name] for name in names],
    )
    return str(prefix)


def assert_imported_exactly(model, values):
    """Every Keras weight holds the value written under its 2019 name, and nothing else is left."""
    filled = set()
    for name, value in values.items():
        layer_name, attribute = keras_target(name)
        variable = getattr(model.get_layer(layer_name), attribute)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), value, err_msg=name)
        filled.add(id(variable))
    assert filled == {id(weight) for weight in model.weights}


# ---------------------------------------------------------------------------------------------
# Successful imports


@pytest.mark.parametrize("name", ["ResNet-Tiny", "VGG-Tiny", "K-BranchCNN-Tiny"])
def test_tf1_saver_checkpoint_with_adam_state(tmp_path, name):
    values = random_values(TINY_VARIABLES[name](19), seed=1)
    prefix = write_with_tf1_saver(tmp_path / "models" / "iteration", values, iteration=600)
    stored = dict(tf.train.list_variables(prefix))
    assert {"beta1_power", "beta2_power"} <= set(stored)
    assert sum(key.endswith("/Adam_1") for key in stored) == sum(
        not key.endswith(("moving_mean", "moving_variance")) for key in values
    )
    model = import_tf1_checkpoint(prefix, name, "BigEarthNet-19")
    assert model.name == name and model.output.shape == (None, 19)
    assert_imported_exactly(model, values)


def test_resnet50_2019_checkpoint(tmp_path):
    values = random_values(slim_resnet_variables("resnet_v1_50", (3, 4, 6, 3), 43), seed=2)
    prefix = write_with_save_op(tmp_path / "iteration-6000", values)
    model = import_tf1_checkpoint(prefix + ".index", "ResNet50", "original")
    assert parameter_count(model) == sum(value.size for value in values.values())
    assert_imported_exactly(model, values)


def test_kbranch_2019_checkpoint(tmp_path):
    values = random_values(kbranch_2019_variables(19), seed=3)
    prefix = write_with_save_op(tmp_path / "iteration-3000", values)
    model = import_tf1_checkpoint(prefix, "K-BranchCNN", "BigEarthNet-19")
    assert_imported_exactly(model, values)
    inputs = {key.name: np.full((1, *key.shape[1:]), 500.0, "float32") for key in model.inputs}
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(model(inputs, training=False))))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("VGG16", lambda: slim_vgg_variables("vgg_16", (2, 2, 3, 3, 3), 19)),  # VGG-Tiny has no conv<s>_2
        pytest.param(
            "ResNet101",
            lambda: slim_resnet_variables("resnet_v1_101", (3, 4, 23, 3), 19),
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "ResNet152",
            lambda: slim_resnet_variables("resnet_v1_152", (3, 8, 36, 3), 19),
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "VGG19", lambda: slim_vgg_variables("vgg_19", (2, 2, 4, 4, 4), 19), marks=pytest.mark.slow
        ),
    ],
)
def test_names_and_shapes_of_the_other_2019_models(name, expected):
    """Every weight of the model has exactly the 2019 name and shape (no checkpoint written: size)."""
    model = build_model(name, 19)
    mapping = tf1_variable_map(model, name)
    assert {key: tuple(variable.shape) for key, variable in mapping.items()} == expected()
    assert len(mapping) == len(model.weights)
    for key, variable in mapping.items():
        layer_name, attribute = keras_target(key)
        assert getattr(model.get_layer(layer_name), attribute) is variable, key


def test_checkpoint_named_by_folder_or_file(tmp_path):
    values = random_values(TINY_VARIABLES["VGG-Tiny"](19))
    folder = tmp_path / "models"
    for iteration in (300, 900, 600):
        write_with_save_op(folder / f"iteration-{iteration}", values)
    assert resolve_tf1_checkpoint(folder) == str(folder / "iteration-900")
    for suffix in ("", ".index", ".data-00000-of-00001"):
        assert resolve_tf1_checkpoint(f"{folder}/iteration-300{suffix}") == str(folder / "iteration-300")
    write_with_save_op(folder / "other", values)
    with pytest.raises(UserError, match="several checkpoints"):
        resolve_tf1_checkpoint(folder)


# ---------------------------------------------------------------------------------------------
# Refusals


@pytest.fixture
def tiny_resnet_values():
    return random_values(TINY_VARIABLES["ResNet-Tiny"](19), seed=4)


def test_every_kind_of_mismatch_is_reported(tmp_path, tiny_resnet_values):
    values = dict(tiny_resnet_values)
    del values["resnet_v1_tiny/block2/unit_1/bottleneck_v1/conv2/BatchNorm/gamma"]
    values["resnet_v1_tiny/block5/unit_1/bottleneck_v1/conv1/weights"] = np.zeros((1, 1, 256, 64), "float32")
    values["resnet_v1_tiny/conv1/weights/Momentum"] = np.zeros((7, 7, 10, 8), "float32")  # not 2019 Adam
    values["resnet_v1_tiny/conv1/weights"] = np.zeros((7, 7, 3, 8), "float32")  # an RGB stem
    values["global_step"] = np.zeros((), "float32")
    prefix = write_with_save_op(tmp_path / "iteration-1", values)
    with pytest.raises(TF1ImportError) as caught:
        import_tf1_checkpoint(prefix, "ResNet-Tiny", "BigEarthNet-19")
    report = caught.value.report
    assert report.unmapped == (
        "resnet_v1_tiny/block5/unit_1/bottleneck_v1/conv1/weights",
        "resnet_v1_tiny/conv1/weights/Momentum",
    )
    assert report.unfilled == ("resnet_v1_tiny/block2/unit_1/bottleneck_v1/conv2/BatchNorm/gamma",)
    assert report.mismatched == (
        "resnet_v1_tiny/conv1/weights: checkpoint (7, 7, 3, 8) float32, model (7, 7, 10, 8)",
    )
    assert report.ignored == ("global_step",)
    message = str(caught.value)
    assert (
        "\n" not in message
        and prefix in message
        and "model ResNet-Tiny (BigEarthNet-19, 19 classes)" in message
    )
    assert "2 checkpoint variable(s) with no place in the model" in message
    assert "1 model weight(s) missing from the checkpoint" in message
    assert "1 shape/dtype mismatch(es): resnet_v1_tiny/conv1/weights: checkpoint (7, 7, 3, 8)" in message
    assert isinstance(caught.value, UserError)


def test_wrong_label_type_gets_a_hint(tmp_path):
    values = random_values(TINY_VARIABLES["K-BranchCNN-Tiny"](43))
    prefix = write_with_save_op(tmp_path / "iteration-1", values)
    with pytest.raises(TF1ImportError, match=r"classifier has 43 outputs; label_type 'original'\?") as caught:
        import_tf1_checkpoint(prefix, "K-BranchCNN-Tiny", "BigEarthNet-19")
    assert caught.value.report.mismatched == (
        "classification/fc_layer/bias: checkpoint (43,) float32, model (19,)",
        "classification/fc_layer/kernel: checkpoint (32, 43) float32, model (32, 19)",
    )
    assert import_tf1_checkpoint(prefix, "K-BranchCNN-Tiny", "original").output.shape == (None, 43)


def test_another_models_checkpoint_is_refused_with_truncated_lists(tmp_path):
    values = random_values(TINY_VARIABLES["VGG-Tiny"](19))
    prefix = write_with_save_op(tmp_path / "iteration-1", values)
    with pytest.raises(TF1ImportError) as caught:
        import_tf1_checkpoint(prefix, "ResNet-Tiny", "BigEarthNet-19")
    report = caught.value.report
    assert report.unmapped == tuple(sorted(values))
    assert len(report.unfilled) == len(TINY_VARIABLES["ResNet-Tiny"](19)) and report.assigned == ()
    message = str(caught.value)
    assert f"... and {len(values) - 6} more" in message
    assert f"... and {len(report.unfilled) - 6} more" in message


def test_non_float_variable_is_a_mismatch(tmp_path, tiny_resnet_values):
    values = dict(tiny_resnet_values)
    values["resnet_v1_tiny/logits/biases"] = np.arange(19, dtype="int64")
    prefix = write_with_save_op(tmp_path / "iteration-1", values)
    with pytest.raises(TF1ImportError, match=r"logits/biases: checkpoint \(19,\) int64, model \(19,\)"):
        import_tf1_checkpoint(prefix, "ResNet-Tiny", "BigEarthNet-19")


def test_unknown_model_label_type_or_path(tmp_path, tiny_resnet_values):
    prefix = write_with_save_op(tmp_path / "iteration-1", tiny_resnet_values)
    importable = r"importable models: K-BranchCNN, ResNet50, .*, VGG-Tiny$"
    with pytest.raises(UserError, match=r"'ViT-S8' has no 2019 TF1 checkpoints to import; " + importable):
        import_tf1_checkpoint(prefix, "ViT-S8", "BigEarthNet-19")
    with pytest.raises(UserError, match="label_type 'nineteen'"):
        import_tf1_checkpoint(prefix, "ResNet-Tiny", "nineteen")
    missing = tmp_path / "models" / "iteration-5"
    with pytest.raises(UserError, match=rf"{missing}: not found \({missing}.index does not exist\)"):
        import_tf1_checkpoint(missing, "ResNet-Tiny", "BigEarthNet-19")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no checkpoint"):
        import_tf1_checkpoint(tmp_path / "empty", "ResNet-Tiny", "BigEarthNet-19")
    broken = tmp_path / "broken"
    (tmp_path / "broken.index").write_bytes(b"not a checkpoint index")
    with pytest.raises(UserError, match=rf"{broken}: cannot be read"):
        import_tf1_checkpoint(broken, "ResNet-Tiny", "BigEarthNet-19")


def test_the_2019_models_and_their_test_twins_are_importable():
    """Each architecture module registers its 2019 naming beside its builder."""
    assert set(importable_models()) == {
        "ResNet50",
        "ResNet101",
        "ResNet152",
        "VGG16",
        "VGG19",
        "K-BranchCNN",
        "ResNet-Tiny",
        "VGG-Tiny",
        "K-BranchCNN-Tiny",
    }


def test_weights_without_a_2019_name_are_reported_as_unfilled():
    """The 2019 K-BranchCNN had no Sentinel-1 branch: those weights must never pass silently."""
    model = build_model("K-BranchCNN-Tiny", 19, modality="MM")
    unnamed = unnamed_weights(model, tf1_variable_map(model, "K-BranchCNN-Tiny"))
    assert unnamed and all(path.startswith("branch_s1_") for path in unnamed)


# ---------------------------------------------------------------------------------------------
# Saving as our checkpoint


def test_save_imported_loads_with_our_checkpoints(tmp_path):
    from bigearthnet_tf.checkpoints import load_checkpoint

    values = random_values(TINY_VARIABLES["K-BranchCNN-Tiny"](43), seed=6)
    prefix = write_with_tf1_saver(tmp_path / "tf1" / "iteration", values, iteration=3000)
    model = import_tf1_checkpoint(prefix, "K-BranchCNN-Tiny", "original")
    base = save_imported(model, tmp_path / "run" / "models" / "iteration-3000")
    loaded = load_checkpoint(base, label_type="original", model_name="K-BranchCNN-Tiny")
    assert loaded.meta.iteration == 3000 and loaded.meta.modality == "S2"
    assert loaded.meta.label_type == "original"
    assert_imported_exactly(loaded.model, values)
    with pytest.raises(UserError, match="43 outputs but label_type 'BigEarthNet-19' has 19 classes"):
        save_imported(model, tmp_path / "run" / "models" / "iteration-1", label_type="BigEarthNet-19")


# ---------------------------------------------------------------------------------------------
# The command line


def test_import_tf1_command_writes_a_checkpoint_the_tools_take(tmp_path, capsys):
    """`bigearthnet import tf1` on a checkpoint written by TF1's own Saver; the result evaluates like
    the imported model, carries the 2019 kernel, and is never written over without --overwrite."""
    from bigearthnet_tf import cli
    from bigearthnet_tf.checkpoints import load_checkpoint, read_metadata

    values = random_values(TINY_VARIABLES["ResNet-Tiny"](19), seed=9)
    prefix = write_with_tf1_saver(tmp_path / "ResNet" / "iteration", values, iteration=6000)
    out = tmp_path / "imported" / "models" / "iteration-6000"
    argv = [
        "import",
        "tf1",
        prefix,
        "--model",
        "ResNet-Tiny",
        "--label-type",
        "BigEarthNet-19",
        "--out",
        str(out),
    ]
    cli.main(argv)
    assert f"imported as {out}" in capsys.readouterr().out
    meta = read_metadata(out)
    assert meta["iteration"] == 6000 and meta["model_options"] == {"upsampling": "tf1_bicubic"}
    loaded = load_checkpoint(out, label_type="BigEarthNet-19", model_name="ResNet-Tiny")
    assert_imported_exactly(loaded.model, values)
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    cli.main([*argv, "--overwrite"])


def test_import_tf1_command_refuses_without_leaving_a_checkpoint(tmp_path, capsys, tiny_resnet_values):
    from bigearthnet_tf import cli

    prefix = write_with_save_op(tmp_path / "iteration-1", tiny_resnet_values)
    out = tmp_path / "imported" / "best"
    with pytest.raises(SystemExit) as stop:
        cli.main(
            [
                "import",
                "tf1",
                prefix,
                "--model",
                "VGG-Tiny",
                "--label-type",
                "BigEarthNet-19",
                "--out",
                str(out),
            ]
        )
    assert stop.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and len(error.strip().splitlines()) == 1
    assert not out.parent.exists() or not any(out.parent.iterdir())


def _import_error(capsys, prefix, out) -> str:
    from bigearthnet_tf import cli

    argv = ["import", "tf1", prefix, "--model", "ResNet-Tiny", "--label-type", "BigEarthNet-19", "--out", out]
    with pytest.raises(SystemExit) as stop:
        cli.main([str(arg) for arg in argv])
    assert stop.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and len(error.strip().splitlines()) == 1 and "Traceback" not in error
    assert not [path for path in Path(out).parent.iterdir() if not path.name.startswith(".bigearthnet-")]
    return error


def test_a_truncated_data_file_and_weights_that_are_not_finite(tmp_path, capsys, tiny_resnet_values):
    prefix = write_with_save_op(tmp_path / "cut" / "iteration-1", tiny_resnet_values)
    data = Path(f"{prefix}.data-00000-of-00001")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
    error = _import_error(capsys, prefix, tmp_path / "out" / "a")
    assert "cannot be read: the .data file is truncated or damaged" in error
    values = dict(tiny_resnet_values)
    name = "resnet_v1_tiny/conv1/weights"
    values[name] = values[name].copy()
    values[name].flat[0] = np.inf
    prefix = write_with_save_op(tmp_path / "inf" / "iteration-1", values)
    assert f"tensor {name} holds 1 NaN or infinite values" in _import_error(
        capsys, prefix, tmp_path / "out" / "b"
    )


def test_an_import_into_a_checkpoint_being_written_is_refused(tmp_path, capsys, tiny_resnet_values):
    from bigearthnet_tf.checkpoints import new_checkpoint

    prefix = write_with_save_op(tmp_path / "iteration-1", tiny_resnet_values)
    out = tmp_path / "out" / "best"
    with new_checkpoint(out, overwrite=False):  # another import holds it
        assert "is being written by another bigearthnet checkpoint-best" in _import_error(capsys, prefix, out)
