#!/usr/bin/env python
"""Build per-segment TFRecord shards from a manifest: a thin script over ``mammodg build-tfrecords``.

    python pipelines/build_tfrecords.py --manifest manifest.csv --out data/ [--config C] [--set k=v]
"""
import sys

from mammodg.cli import main

if __name__ == "__main__":
    sys.exit(main(["build-tfrecords", *sys.argv[1:]]))
