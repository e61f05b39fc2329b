"""Peak memory and training throughput of Flow++ at the paper's CIFAR-10 configuration.

Each (variant, batch size) runs in a fresh subprocess, so peak figures do not leak between
runs: one data-dependent initialisation, one warm-up step, then ``--steps`` timed training
steps (Adam, dequantized-ELBO loss, model and variational dequantizer together).

Variants, all from ``recipes/flowpp.toml --preset paper`` (3x32x32 input, 31.4M parameters):

- ``ours``: gradient checkpointing per flow step (model and dequantizer) and
  ``F.scaled_dot_product_attention`` with whatever fused kernel the backend offers;
- ``ours-bf16``: the same under bf16 autocast (nets in bf16, log-dets in float32; CUDA only);
- ``naive``: no checkpointing and attention forced onto the math kernel, which stores the
  ``T x T`` weights: the memory profile of the public PyTorch Flow++ implementation
  (about 50 GiB at batch 64 on an 80 GB card, failing at batch 256).

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the process's peak resident set
on CPU (which includes about 0.3-0.5 GiB of interpreter and libraries). On CPU (or with
``--projection``) the script also counts the bytes autograd saves for the backward pass per image
and projects the activation memory of both variants at batch 64 and 256: a model, not a
measurement, for machines without a GPU.

Usage::

    python benchmarks/flowpp_memory.py                                   # CPU, batch 2
    python benchmarks/flowpp_memory.py --device cuda --batch-sizes 64,256
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from _child import add_child_options, answer_as_child, measure_in_child

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "flowpp.toml"
VARIANTS = ("ours", "ours-bf16", "naive")
GIB = 2**30


def run_one(device: str, variant: str, batch: int, steps: int, preset: str) -> dict:
    """One measurement, in this process (called in a child)."""
    import resource
    from contextlib import nullcontext

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import flowkit
    from flowkit.api import default_plugins
    from flowkit.build import Builder
    from flowkit.runs.bpd import bits_per_dim

    torch.manual_seed(0)
    dev = torch.device(device)
    overrides = [] if variant != "naive" else ["model.checkpoint=false", "dequantizer.checkpoint=false"]
    if variant != "naive":
        overrides += ["model.checkpoint=true", "dequantizer.checkpoint=true"]
    recipe = flowkit.load_recipe(RECIPE, preset=preset or None, overrides=overrides)
    build = Builder(default_plugins().registries)
    shape = (3, 32, 32)
    model = build(recipe.model, in_shape=shape).to(dev)
    deq = build(recipe.dequantizer, in_shape=shape).to(dev)
    params = [*model.parameters(), *deq.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    n_bits, dims = 8, math.prod(shape)

    def attention():  # a fresh context manager per step: these are not re-entrant
        return sdpa_kernel([SDPBackend.MATH]) if variant == "naive" else nullcontext()

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16) if variant == "ours-bf16" else nullcontext()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    x = torch.randint(0, 256, (batch, *shape), dtype=torch.uint8, device=dev)
    with torch.no_grad():
        init = x[: min(batch, 16)]
        deq.initialize(init, n_bits)
        model.initialize(deq(init, n_bits)[0])

    def step() -> float:
        with attention(), autocast():
            y, log_q = deq(x, n_bits)
            log_p = model.log_prob(y)
        loss = bits_per_dim(log_p, dims, n_bits, log_q).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss)

    result = {"device": device, "variant": variant, "batch": batch, "params": sum(p.numel() for p in params)}
    try:
        step()  # warm-up: kernels chosen, optimizer state allocated
        sync()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        tick = time.perf_counter()
        losses = [step() for _ in range(steps)]
        sync()
        seconds = time.perf_counter() - tick
    except torch.OutOfMemoryError:
        result.update(status="out of memory")
        if dev.type == "cuda":
            result["peak_bytes"] = int(torch.cuda.max_memory_allocated(dev))
        return result
    if dev.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(dev))
        result["gpu"] = torch.cuda.get_device_name(dev)
    else:
        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    result.update(status="ok", peak_bytes=peak, seconds_per_step=seconds / steps,
                  images_per_s=batch * steps / seconds, loss_bpd=losses[-1], torch=torch.__version__)
    return result


def saved_per_image(preset: str, batch: int = 2) -> dict[str, float]:
    """Bytes autograd saves for the backward pass, per image, by attention kernel (CPU, no checkpointing).

    Counted with ``saved_tensors_hooks`` (each storage once, parameters excluded), per top-level
    flow step of the model and the dequantizer. Device-independent up to kernel workspaces, so
    it projects the activation memory of a GPU run: the naive variant holds ``total`` per
    image; with per-step checkpointing only the largest step (``max_step``) is live at once.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import flowkit
    from flowkit.api import default_plugins
    from flowkit.build import Builder

    torch.manual_seed(0)
    recipe = flowkit.load_recipe(RECIPE, preset=preset or None,
                                 overrides=["model.checkpoint=false", "dequantizer.checkpoint=false"])
    build = Builder(default_plugins().registries)
    model = build(recipe.model, in_shape=(3, 32, 32))
    deq = build(recipe.dequantizer, in_shape=(3, 32, 32))
    weights = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *deq.parameters()]}
    label, seen, per_step = ["other"], set(), {}

    def pack(t):  # noqa: ANN001, ANN202
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights and ptr not in seen:
            seen.add(ptr)
            per_step[label[0]] = per_step.get(label[0], 0) + t.untyped_storage().nbytes()
        return t

    for name, steps in (("dequantizer", deq.flow.transforms), ("model", model.flow.chains()[0].transforms)):
        for i, step in enumerate(steps):
            step.register_forward_pre_hook(lambda *_, n=f"{name}{i}": label.__setitem__(0, n))
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    out = {}
    for key, backend in (("math", SDPBackend.MATH), ("fused", SDPBackend.FLASH_ATTENTION)):
        seen.clear()
        per_step.clear()
        label[0] = "other"
        with sdpa_kernel([backend]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y, _ = deq(x, 8)
            model.log_prob(y)
        out[f"{key}_total"] = sum(per_step.values()) / batch
        out[f"{key}_max_step"] = max(per_step.values()) / batch
    out["params"] = sum(p.numel() for p in [*model.parameters(), *deq.parameters()])
    return out


def projection(saved: dict[str, float], batches: list[int]) -> str:
    """Activation memory at each batch size from `saved_per_image`, plus weights, grads and Adam."""
    states = 16 * saved["params"]  # float32 weights, gradients and two Adam moments
    lines = [f"Projection from saved-for-backward bytes (autograd hooks, batch 2, float32; weights + grads + "
             f"Adam = {states / GIB:.2f} GiB):",
             f"  naive (math attention, no checkpointing): {saved['math_total'] / 2**20:.0f} MiB/image",
             f"  fused attention, no checkpointing:        {saved['fused_total'] / 2**20:.0f} MiB/image",
             f"  ours (fused attention, one step live):    {saved['fused_max_step'] / 2**20:.0f} MiB/image"]
    for b in batches:
        naive = states + b * saved["math_total"]
        ours = states + b * saved["fused_max_step"]
        lines.append(f"  batch {b:>4}: naive ~{naive / GIB:6.1f} GiB, ours ~{ours / GIB:5.1f} GiB (+ allocator slack)")
    return "\n".join(lines)


def measure(device: str, variant: str, batch: int, steps: int, preset: str, timeout: float, threads: int) -> dict:
    found = measure_in_child(__file__, [device, variant, batch, steps, preset], threads, timeout, tail=120)
    return {"device": device, "variant": variant, "batch": batch, **found}


def table(rows: list[dict]) -> str:
    head = f"{'device':<7} {'variant':<10} {'batch':>5} {'peak memory':>12} {'images/s':>9} {'s/step':>8}  status"
    out = [head, "-" * len(head)]
    for r in rows:
        peak = f"{r['peak_bytes'] / GIB:.2f} GiB" if "peak_bytes" in r else "-"
        ips = f"{r['images_per_s']:.1f}" if "images_per_s" in r else "-"
        sps = f"{r['seconds_per_step']:.3f}" if "seconds_per_step" in r else "-"
        out.append(f"{r['device']:<7} {r['variant']:<10} {r['batch']:>5} {peak:>12} {ips:>9} {sps:>8}  {r['status']}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated; default 2 on CPU, 64,256 on CUDA")
    parser.add_argument("--variants", default=None, help=f"comma-separated from {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 1 on CPU, 5 on CUDA)")
    parser.add_argument("--preset", default="paper", help="preset of recipes/flowpp.toml ('' for the default)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    parser.add_argument("--projection", action="store_true",
                        help="also project GPU memory from saved-for-backward bytes (default on CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    add_child_options(parser)
    args = parser.parse_args()
    if answer_as_child(args, run_one):
        return
    cuda = args.device.startswith("cuda")
    batches = [int(b) for b in (args.batch_sizes or ("64,256" if cuda else "2")).split(",")]
    variants = (args.variants or ("ours,ours-bf16,naive" if cuda else "ours,naive")).split(",")
    steps = args.steps or (5 if cuda else 1)
    rows = []
    for batch in batches:
        for variant in variants:
            row = measure(args.device, variant, batch, steps, args.preset, args.timeout, args.threads)
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    print(f"\nFlow++ ({args.preset or 'default'} preset of {RECIPE.name}), {steps} timed steps after 1 warm-up:\n")
    print(table(rows))
    report = {"rows": rows}
    if args.projection or not cuda:
        saved = saved_per_image(args.preset)
        report["saved_per_image"] = saved
        print()
        print(projection(saved, sorted({*batches, 64, 256})))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
