"""MNIST test digits as 32x32 RGB images (2 black pixels of padding on each side, the grey value in
all three channels): the out-of-distribution set of docs/scoring.md's CIFAR-10 example.

    python benchmarks/padded_mnist.py ../shared/data/mnist.npz mnist_padded_rgb.npz --count 1000
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mnist", help="an npz with uint8 x_test (N, 28, 28) and y_test, as ../shared/data/mnist.npz")
    parser.add_argument("out", help="the npz to write: x_test (N, 32, 32, 3) uint8 and y_test")
    parser.add_argument("--count", type=int, default=1000, help="the first N test digits")
    args = parser.parse_args()
    with np.load(args.mnist, allow_pickle=False) as data:
        x, y = data["x_test"][: args.count], data["y_test"][: args.count]
    x = np.repeat(np.pad(x, ((0, 0), (2, 2), (2, 2)))[..., None], 3, axis=-1)
    np.savez_compressed(args.out, x_test=x, y_test=y)
    print(f"wrote {args.out}: {x.shape} {x.dtype}")


if __name__ == "__main__":
    main()
