"""TarFlow's two inverses on a trained run: sequential decoding (key/value cache) against the Jacobi
fixed-point iteration at several tolerances, from the same latents: seconds, images/s, Jacobi
iterations per block, and how far each Jacobi sample is from the exact one (in data levels).

    python benchmarks/tarflow_solvers.py RUN_DIR --n 64 --tol 1e-2 --tol 1e-3 --tol 1e-4 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import flowkit
from flowkit.contracts.transform import InverseSolver, use_inverse_solver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--n", type=int, default=64, help="images per draw")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--tol", type=float, action="append", help="Jacobi tolerances (repeatable)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = flowkit.load_run(args.run_dir)
    model = run.model
    steps = [m for m in model.modules() if getattr(type(m), "sequential_inverse", False)]
    if not steps:
        raise SystemExit(f"{args.run_dir}: the model has no step with a sequential inverse (not a TarFlow).")
    torch.manual_seed(args.seed)
    z = model.flow.draw_top(args.n, args.temperature)
    levels = 2**run.n_bits
    rows = []
    with torch.no_grad():
        def timed(solver: InverseSolver) -> tuple[torch.Tensor, float, list[int]]:
            with use_inverse_solver(solver, model):
                tick = time.perf_counter()
                y = model.decode([z])
                seconds = time.perf_counter() - tick
            return y, seconds, [s.last_iterations for s in steps]

        exact, seconds, _ = timed(InverseSolver("sequential"))
        rows.append({"solver": "sequential", "seconds": seconds, "images_per_s": args.n / seconds})
        for tol in args.tol or [1e-3]:
            y, seconds, iterations = timed(InverseSolver("jacobi", tol=tol))
            # Compared where both are finite: a draw that overflows (exp(a) past float32) has no distance.
            finite = torch.isfinite(exact).flatten(1).all(1) & torch.isfinite(y).flatten(1).all(1)
            off = ((y - exact)[finite].abs() * levels).flatten(1).amax(1)  # per image, in data levels
            rows.append({"solver": f"jacobi tol {tol:g}", "seconds": seconds, "images_per_s": args.n / seconds,
                         "iterations_per_block": iterations, "tokens": steps[0].in_shape[1] * steps[0].in_shape[2],
                         "nonfinite_images": int((~finite).sum()),
                         "max_levels_off": float(off.max()) if len(off) else None,
                         "median_levels_off": float(off.median()) if len(off) else None})
    print(json.dumps({"run": args.run_dir, "n": args.n, "temperature": args.temperature, "threads": args.threads,
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
