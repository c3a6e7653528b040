"""Convert a BigEarthNet archive into TFRecords (the 2019 prep_splits.py command line)."""

import sys

from bigearthnet_tf.cli import main

if __name__ == "__main__":
    main(["prepare", *sys.argv[1:]])
