"""Shared fixtures: real example patches, small seeded synthetic archives, and prepared records.

Everything is session-scoped and written under pytest's temporary folder, so each artefact is
made once per run and tests never touch the user's files.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow 2.21's oneDNN gradient of a 1x1 stride-2 convolution over fewer than 16 channels corrupts
# the heap on some AVX-512 CPUs (seen on AMD EPYC: a crash a few steps later); the tiny test networks
# have such convolutions, published sizes do not. TensorFlow's own kernels are exact there, and no
# slower for networks this small. Set before TensorFlow is imported; children inherit it.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import pytest


@pytest.fixture(autouse=True)
def _ctrl_c_handler_is_left_as_found():
    """A test that leaves SIGINT ignored in this process would make every later child ignore Ctrl-C
    (dispositions are inherited). Put it back, and warn naming the test, so the leak is found."""
    import signal
    import warnings

    yield
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        warnings.warn("this test left SIGINT ignored in the test process; restored", stacklevel=1)


@pytest.fixture(scope="session")
def example_paths(tmp_path_factory):
    """The six real S2 patches (and their S1 twins) of bigearthnet-common, extracted once."""
    from bigearthnet_tf.examples import example_archive

    return example_archive(tmp_path_factory.mktemp("examples"))


@pytest.fixture(scope="session")
def synthetic_v1(tmp_path_factory):
    """A small seeded v1 synthetic archive with split CSVs (see bigearthnet_tf.synth)."""
    from bigearthnet_tf.synth import write_synthetic_archive

    return write_synthetic_archive(tmp_path_factory.mktemp("synth_v1"), patches=48, seed=7, version=1)


@pytest.fixture(scope="session")
def synthetic_v1_s1(tmp_path_factory):
    """A small seeded v1 synthetic archive with its Sentinel-1 twins (BigEarthNet-S1-v1.0) and split CSVs."""
    from bigearthnet_tf.synth import write_synthetic_archive

    return write_synthetic_archive(
        tmp_path_factory.mktemp("synth_v1_s1"), patches=24, seed=5, version=1, with_s1=True
    )


@pytest.fixture(scope="session")
def synthetic_v2(tmp_path_factory):
    """A small seeded v2 synthetic archive with Sentinel-1 (BigEarthNet-S2, -S1 and both parquet files)."""
    from bigearthnet_tf.synth import write_synthetic_archive

    return write_synthetic_archive(
        tmp_path_factory.mktemp("synth_v2"), patches=48, seed=11, version=2, with_s1=True
    )
