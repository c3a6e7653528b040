"""Evaluate a model from a JSON config (the 2019 eval.py command line)."""

import sys

from bigearthnet_tf.cli import main

if __name__ == "__main__":
    main(["evaluate", *sys.argv[1:]])
