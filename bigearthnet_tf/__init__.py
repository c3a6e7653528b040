"""bigearthnet-tf: BigEarthNet archives to TFRecords, and multi-label classifiers trained on them."""

__version__ = "0.2.0"
