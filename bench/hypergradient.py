"""How close the first- and second-order architecture gradients come to the exact unrolled one.

    python bench/hypergradient.py [--trials 10] [--radii 1e-2 1e-3 1e-4 1e-5] [--preset darts da2s]
                                  [--nodes 2] [--cells 3] [--channels 8] [--resolution 16] [--batch 16] [--json]

The exact unrolled hypergradient (docs/science.md §2.5, the virtual step included) is taken by
double backward in float64. Against it, per trial (a fresh network, architecture and batches from
seed 0, 1, ...): the first-order gradient, and the second-order gradient with the Hessian-vector
product by central differences at R = radius / ||v|| for each radius, in float32 (the search's
precision) and float64. Printed: the mean, standard deviation, minimum and maximum over the trials
of the cosine and of the relative error ||g - exact|| / ||exact||.

The network is a small but well-conditioned supernet (5 ops, 2 nodes, 3 cells, C=8, 16x16 images, batch 16, after
three real weight steps so that the momentum buffer exists); the architecture is initialised as the
search does (alpha ~ 1e-3 N(0, 1)) and perturbed by 0.3 N(0, 1) so that the op weights are not
uniform, as they are not after a few epochs of search.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nas.architect import Architect
from nas.losses import regularisers
from nas.settings import SearchConfig
from nas.space import SearchSpace, Target
from nas.supernet import AlphaConfig, Architecture, Supernet

ETA, MU, WD = 0.025, 0.9, 3e-4


def step_config(order: str = "second", radius: float | None = None, momentum: float = MU, decay: float = WD):
    """The settings an Architect takes: the order, the weights' SGD momentum and decay, the radius."""
    overrides = [f"order={order}", f"weights.momentum={momentum}", f"weights.weight_decay={decay}"]
    return SearchConfig.resolve(overrides=overrides + ([f"arch_optim.hvp_radius={radius}"] if radius else []))


# Five of the eight DARTS ops (every kind: none, pooling, identity, separable and dilated convolution)
# and two nodes: the exact double backward of the full space is too slow for a CPU benchmark.
OPS = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3")


def build(seed: int, preset: str, nodes: int, cells: int, channels: int, resolution: int, batch: int):
    """A supernet after three weight steps, its architecture, and a training and a validation batch."""
    torch.manual_seed(seed)
    ops = OPS if preset == "darts" else tuple(op for op in OPS if op != "none")
    space = SearchSpace(ops, nodes, cells)
    net = Supernet(space, channels).double()
    arch = Architecture(
        space,
        Target.parse([2] * nodes, space),
        edge_params=preset == "da2s",
        alpha=AlphaConfig(init_std=1e-3),
        generator=torch.Generator().manual_seed(seed),
    ).double()
    with torch.no_grad():
        for p in arch.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype))
    g = torch.Generator().manual_seed(10_000 + seed)

    def draw():
        x = torch.randn(batch, 3, resolution, resolution, generator=g, dtype=torch.float64)
        return x, torch.randint(0, 10, (batch,), generator=g)

    w_opt = torch.optim.SGD(net.parameters(), lr=ETA, momentum=MU, weight_decay=WD)
    net.train()
    for _ in range(3):
        x, y = draw()
        w_opt.zero_grad()
        F.cross_entropy(net(x, arch()), y).backward()
        w_opt.step()
    w_opt.zero_grad(set_to_none=True)
    return net, arch, w_opt, draw(), draw()


def exact_unrolled(net, arch, w_opt, train, valid, loss_weights, eta=ETA, mu=MU, wd=WD, flat=True):
    """The exact unrolled hypergradient (docs/science.md §2.5): the gradient of the validation loss
    after one virtual SGD step (lr `eta`, momentum `mu`, weight decay `wd`) with respect to alpha and
    beta, by double backward; one flat vector, or a tensor per parameter with flat=False."""
    names, weights = zip(*net.named_parameters())
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    train_loss = F.cross_entropy(
        functional_call(net, {**dict(zip(names, weights)), **buffers}, (train[0], arch())), train[1]
    )
    grads = torch.autograd.grad(train_loss, weights, create_graph=True)
    virtual = {
        n: w - eta * (mu * w_opt.state[w]["momentum_buffer"] + g + wd * w) for n, w, g in zip(names, weights, grads)
    }
    valid_loss = F.cross_entropy(functional_call(net, {**virtual, **buffers}, (valid[0], arch())), valid[1])
    reg, _ = regularisers(arch, loss_weights)
    grads = torch.autograd.grad(valid_loss + reg, list(arch.parameters()), allow_unused=True, materialize_grads=True)
    return _flat(grads) if flat else grads


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.detach().double().flatten() for g in grads])


def compare(approx: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    cosine = F.cosine_similarity(approx, exact, dim=0).item()
    return cosine, ((approx - exact).norm() / exact.norm()).item()


def _cast(net, arch, w_opt, batches, dtype):
    """Copies of the network, architecture, optimiser state and batches in `dtype`."""
    import copy

    net2, arch2 = copy.deepcopy(net).to(dtype), copy.deepcopy(arch).to(dtype)
    opt2 = torch.optim.SGD(net2.parameters(), lr=ETA, momentum=MU, weight_decay=WD)
    for p, p2 in zip(net.parameters(), net2.parameters()):
        opt2.state[p2]["momentum_buffer"] = w_opt.state[p]["momentum_buffer"].to(dtype)
    return net2, arch2, opt2, [(x.to(dtype), y) for x, y in batches]


def run(args) -> dict[str, dict[str, list[float]]]:
    figures: dict[str, dict[str, list[float]]] = {}

    def add(name, cosine, error):
        entry = figures.setdefault(name, {"cosine": [], "rel_error": []})
        entry["cosine"].append(cosine)
        entry["rel_error"].append(error)

    for preset in args.preset:
        weights = {"op_entropy": 0.0, "edge_entropy": 0.0, "edge_count": 0.0}
        for seed in range(args.trials):
            net, arch, w_opt, train, valid = build(
                seed, preset, args.nodes, args.cells, args.channels, args.resolution, args.batch
            )
            exact = exact_unrolled(net, arch, w_opt, train, valid, weights)
            for dtype in (torch.float32, torch.float64):
                name = str(dtype).replace("torch.", "")
                n2, a2, o2, (t2, v2) = _cast(net, arch, w_opt, [train, valid], dtype)
                a_opt = torch.optim.Adam(a2.parameters(), lr=1e-3)
                first, _ = Architect(n2, a2, a_opt, step_config("first")).first_order_grads(v2, weights)
                add(f"{preset} {name} first order", *compare(_flat(first), exact))
                for radius in args.radii:
                    architect = Architect(n2, a2, a_opt, step_config("second", radius))
                    second, _ = architect.second_order_grads(v2, t2, weights, ETA, o2)
                    add(f"{preset} {name} second order, R = {radius:g}/||v||", *compare(_flat(second), exact))
            if args.progress:
                done = {k: (v["cosine"][-1], v["rel_error"][-1]) for k, v in figures.items() if k.startswith(preset)}
                print(json.dumps({"trial": seed, **done}), file=sys.stderr, flush=True)
    return figures


def _summary(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):+.4f} ± {sd:.4f} [{min(values):+.4f}, {max(values):+.4f}]"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--radii", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4, 1e-5])
    parser.add_argument("--preset", nargs="+", choices=("darts", "da2s"), default=["darts"])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cells", type=int, default=3)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--progress", action="store_true", help="each trial's figures on stderr as it ends")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    figures = run(args)
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(f"n = {args.trials} per row; mean ± sd [min, max]")
    print(f"{'gradient':<48} {'cosine to exact':<38} relative error")
    for name, entry in figures.items():
        print(f"{name:<48} {_summary(entry['cosine']):<38} {_summary(entry['rel_error'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
