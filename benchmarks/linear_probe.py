"""Which offline backbone and resolution to use: linear-probe accuracy of frozen ImageNet features on Fashion-MNIST.

Side by side in one run: logistic regression on raw pixels, and on the pooled features of each
offline backbone (``weights: offline``) at each resolution, trained on a seeded few-shot draw of the
training split (``--shots`` per class, all 10 classes) and tested on a draw of the test split. The
power-law recipes use the winner. Also prints the feature-extraction throughput (images per second).

    python benchmarks/linear_probe.py [--shots 200] [--test_shots 100] [--sizes 64 96]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mia_lightning.data.images import ImageSpec

BACKBONES = ("mobilenetv2_100", "efficientnet_lite0")


def spec(split: str, shots: int, backbone: str, size: int) -> ImageSpec:
    return ImageSpec(source="fashion_mnist", split=split, shots=shots, n_classes=10, classes=None, subset_seed=0, max_samples=None,
                     backbone=backbone, weights="offline", img_size=size, queries=("identity",))


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Test accuracy of a standardised L2 logistic regression (lbfgs, C=1)."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return float(model.fit(train_x, train_y).score(test_x, test_y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, default=200, help="training images per class (10 classes)")
    parser.add_argument("--test_shots", type=int, default=100, help="test images per class")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96])
    args = parser.parse_args()
    # few_shot_pool draws 2 x shots per class; halve so that --shots is the count used
    train, test = spec("train", args.shots // 2, BACKBONES[0], args.sizes[0]), spec("test", args.test_shots // 2, BACKBONES[0], args.sizes[0])
    flat = lambda s: s.pool.images.reshape(len(s.pool.labels), -1).astype(np.float64)  # noqa: E731
    rows = [("raw pixels", 28, probe(flat(train), train.pool.labels, flat(test), test.pool.labels), float("nan"))]
    for backbone in BACKBONES:
        for size in args.sizes:
            train, test = spec("train", args.shots // 2, backbone, size), spec("test", args.test_shots // 2, backbone, size)
            start = time.perf_counter()
            train_x, test_x = train.features(None)[:, 0], test.features(None)[:, 0]
            rate = (len(train_x) + len(test_x)) / (time.perf_counter() - start)
            rows.append((backbone, size, probe(train_x, train.pool.labels, test_x, test.pool.labels), rate))
    print(f"Fashion-MNIST linear probe: {len(train.pool.labels)} train / {len(test.pool.labels)} test images, 10 classes")
    print(f"{'features':<20} {'px':>4} {'accuracy':>9} {'images/s':>9}")
    for name, size, accuracy, rate in rows:
        print(f"{name:<20} {size:>4} {accuracy:>9.3f} {rate:>9.1f}")


if __name__ == "__main__":
    main()
