"""Evaluation networks built from a genotype (docs/science.md §4.1-4.2, §6.2).

The cells use the same op registry as the search, with affine BN and no BN after pooling. Each
cell of the network takes the cell description of the level it belongs to: `normal` / `reduce` for
a genotype of shared alpha; for a multi-level genotype the normal cells of stage s (s = 1, 2, 3,
separated by the two reductions) take level `normal{s}` and the k-th reduction `reduce{k}`; for a
genotype with one level per search cell, the cells of a stage are spread evenly over the search
cells of the same stage.

Nodes that a target left without inputs output zeros; they are left out of the cell's output
concatenation here (the discretized supernet keeps them, as zeros, to match its trained weights).
"""

from __future__ import annotations

import torch
from torch import nn

from .genotype import CellGenotype, Genotype
from .ops import FactorizedReduce, GlobalAverage, Identity, ReLUConvBN, build_op


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zeroes whole samples with probability `drop_prob`, rescaling the kept ones by 1/(1 - p)."""
    keep = 1.0 - drop_prob
    mask = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x * mask / keep


def reduction_indices(layers: int) -> tuple[int, int]:
    return layers // 3, 2 * layers // 3


def cell_levels(genotype: Genotype, layers: int) -> list[str]:
    """The level of the genotype that each of the network's `layers` cells uses."""
    names = list(genotype.levels)
    reductions = reduction_indices(layers)
    if genotype.alpha_sharing == "global" or set(names) == {"normal", "reduce"}:
        return ["reduce" if i in reductions else "normal" for i in range(layers)]
    if genotype.alpha_sharing == "stage":
        levels, stage = [], 1
        for i in range(layers):
            if i in reductions:
                levels.append(f"reduce{stage}")
                stage += 1
            else:
                levels.append(f"normal{stage}")
        missing = sorted(set(levels) - set(names))
        if missing:
            raise ValueError(f"genotype has no level {missing[0]}; its levels: {names}")
        return levels
    # One level per search cell ("cell0", "cell1", ...): map stage by stage.
    search = [genotype.levels[name].reduction for name in names]
    search_stages = _stages(search)
    net_stages = _stages([i in reductions for i in range(layers)])
    levels = []
    for (net_normals, net_reduction), (search_normals, search_reduction) in zip(net_stages, search_stages):
        for k in range(len(net_normals)):
            levels.append(names[search_normals[k * len(search_normals) // len(net_normals)]])
        if net_reduction is not None:
            levels.append(names[search_reduction])
    return levels


def _stages(is_reduction: list[bool]) -> list[tuple[list[int], int | None]]:
    """[(normal cell indices of the stage, index of the reduction that ends it or None), ...]"""
    stages, normals = [], []
    for i, reduction in enumerate(is_reduction):
        if reduction:
            stages.append((normals, i))
            normals = []
        else:
            normals.append(i)
    stages.append((normals, None))
    return stages


class EvalCell(nn.Module):
    def __init__(self, genotype: CellGenotype, c_pp: int, c_p: int, c: int, reduction_prev: bool):
        super().__init__()
        self.reduction = genotype.reduction
        self.preprocess0 = (
            FactorizedReduce(c_pp, c, affine=True) if reduction_prev else ReLUConvBN(c_pp, c, 1, 1, 0, True)
        )
        self.preprocess1 = ReLUConvBN(c_p, c, 1, 1, 0, affine=True)
        self.ops = nn.ModuleList()
        self.inputs: list[list[int]] = []  # per node, indices into self.ops and their input states
        self.sources: list[list[int]] = []
        for node in genotype.nodes:
            index, sources = [], []
            for op, source in node:
                stride = 2 if self.reduction and source < 2 else 1
                index.append(len(self.ops))
                sources.append(source)
                self.ops.append(build_op(op, c, stride, affine=True))
            self.inputs.append(index)
            self.sources.append(sources)
        self.concat = [n for n in genotype.concat if genotype.nodes[n - 2]]
        self.multiplier = len(self.concat)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.0) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        n, c, h, w = states[1].shape
        if self.reduction:
            h, w = (h + 1) // 2, (w + 1) // 2
        for index, sources in zip(self.inputs, self.sources):
            total = states[1].new_zeros(n, c, h, w) if not index else 0
            for i, source in zip(index, sources):
                op = self.ops[i]
                out = op(states[source])
                if self.training and drop_prob > 0 and not isinstance(op, Identity):
                    out = drop_path(out, drop_prob)
                total = total + out
            states.append(total)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """The DARTS auxiliary classifier: 8x8 input on CIFAR; 14x14 on ImageNet, where the BN after the
    768-channel conv is omitted as in the paper runs."""

    def __init__(self, channels: int, num_classes: int, imagenet: bool = False):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.AvgPool2d(5, stride=2 if imagenet else 3, padding=0, count_include_pad=False),
            nn.Conv2d(channels, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            *([] if imagenet else [nn.BatchNorm2d(768)]),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class EvalNetwork(nn.Module):
    """A network of `layers` discrete cells for CIFAR (32x32, stem 3x3 conv) or ImageNet (224x224,
    two stride-2 stems). `forward` returns (logits, auxiliary logits or None)."""

    def __init__(
        self,
        genotype: Genotype,
        channels: int = 36,
        layers: int = 20,
        num_classes: int = 10,
        auxiliary: bool = True,
        dataset: str = "cifar10",
    ):
        super().__init__()
        self.imagenet = dataset == "imagenet"
        self.drop_path_prob = 0.0
        levels = cell_levels(genotype, layers)
        reductions = reduction_indices(layers)
        if self.imagenet:
            self.stem0 = nn.Sequential(
                nn.Conv2d(3, channels // 2, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels // 2),
                nn.ReLU(inplace=True),
                nn.Conv2d(channels // 2, channels, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels),
            )
            self.stem1 = nn.Sequential(
                nn.ReLU(inplace=True),
                nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels),
            )
            c_pp, c_p, reduction_prev = channels, channels, True
        else:
            c_stem = 3 * channels
            self.stem = nn.Sequential(nn.Conv2d(3, c_stem, 3, padding=1, bias=False), nn.BatchNorm2d(c_stem))
            c_pp, c_p, reduction_prev = c_stem, c_stem, False
        c = channels
        self.cells = nn.ModuleList()
        self.auxiliary = None
        for i, level in enumerate(levels):
            cell_genotype = genotype.levels[level]
            if (i in reductions) != cell_genotype.reduction:
                kind = "reduction" if i in reductions else "normal"
                raise ValueError(f"cell {i} is a {kind} cell but level {level!r} is not")
            if i in reductions:
                c *= 2
            cell = EvalCell(cell_genotype, c_pp, c_p, c, reduction_prev)
            self.cells.append(cell)
            reduction_prev = cell.reduction
            c_pp, c_p = c_p, cell.multiplier * c
            if i == 2 * layers // 3 and auxiliary:
                self.auxiliary = AuxiliaryHead(c_p, num_classes, self.imagenet)
                self.auxiliary_after = i
        self.global_pooling = GlobalAverage()
        self.classifier = nn.Linear(c_p, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.imagenet:
            s0 = self.stem0(x)
            s1 = self.stem1(s0)
        else:
            s0 = s1 = self.stem(x)
        aux = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if self.auxiliary is not None and i == self.auxiliary_after and self.training:
                aux = self.auxiliary(s1)
        return self.classifier(self.global_pooling(s1)), aux


def count_parameters(model: nn.Module) -> int:
    """Parameters without the auxiliary head (the convention of the published figures)."""
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("auxiliary"))


@torch.no_grad()
def count_macs(model: EvalNetwork, image_size: int) -> int:
    """Multiply-adds of convolutions and linear layers for one image, auxiliary head excluded."""
    total = 0

    def conv_hook(module: nn.Conv2d, inputs, output):
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() // output.shape[0] * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, inputs, output):
        nonlocal total
        total += module.in_features * module.out_features

    hooks = []
    for name, module in model.named_modules():
        if name.startswith("auxiliary"):
            continue
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    model(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    return total


PROTOCOLS = {
    # (layers, channels, classes, input size) of the published evaluation networks.
    "cifar10": (20, 36, 10, 32),
    "imagenet": (14, 48, 1000, 224),
}


def network_info(
    genotype: Genotype, dataset: str = "cifar10", layers: int | None = None, channels: int | None = None
) -> dict:
    """Parameters and multiply-adds of the evaluation network of `genotype` (paper settings unless
    `layers` / `channels` are given)."""
    default_layers, default_channels, classes, size = PROTOCOLS[dataset]
    model = EvalNetwork(genotype, channels or default_channels, layers or default_layers, classes, True, dataset)
    return {
        "dataset": dataset,
        "layers": layers or default_layers,
        "channels": channels or default_channels,
        "params": count_parameters(model),
        "macs": count_macs(model, size),
    }
