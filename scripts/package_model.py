#!/usr/bin/env python3
"""Package the best-validation seed of a trained experiment as a shipped model: galpipe/models/NAME/.

Usage (from the project root, after running the config once per seed and keeping each results folder)::

    python scripts/package_model.py --name gz1 --config config/gz1-sdss-jpeg.yaml --experiment vgg_like \\
        --run results/gz1-seed42 --run results/gz1-seed43 --run results/gz1-seed44 [--limits limits.md]

Writes model.json, weights.npz, test_split.csv, card.json and MODEL_CARD.md (see
:mod:`galpipe.modelcard`); ``galpipe predict --model gz1`` then finds the model by name.
"""

from __future__ import annotations

import sys

from galpipe.modelcard import main

if __name__ == "__main__":
    sys.exit(main())
