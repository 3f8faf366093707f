"""The metrics a search reports: every name, and the functions that compute them.

Names are the search's own and never change (results, MLflow runs and sweep files store them);
`tuning.presentation` maps them to MLflow's display names. Grepping a name finds its constant here,
and the constant finds its producer.

Per epoch (`EpochEvent.metrics`, flat scalars; `epoch_metrics` flattens the epoch's record):
training accuracy and loss, the architecture step's cross-entropy, the supernet's accuracy on the
evaluation set (`valid_acc`) and the discretized network's (`discretized_acc`, `drop`), learning
rates, seconds, the loss terms and their weights, and per level the diagnostics of
docs/science.md D7 (`skip_connect/normal`, ...).

At the end (`discretization_metrics`, `convergence_metrics`, `derived_params`): the supernet and
discretized accuracies with trained and unit edge weights, with and without BN recalibration, the
drops (docs/science.md D4), how far the architecture converged, and the derived network's size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .data import ImageSet
from .discretize import BoundSupernet, DiscretizedNetwork, accuracy, recalibrated_accuracy
from .genotype import Genotype
from .losses import entropy
from .network import PROTOCOLS, EvalNetwork, count_parameters
from .supernet import Architecture, ArchWeights, Supernet

# ----------------------------------------------------------------------- per epoch
TRAIN_ACC = "train_acc"
TRAIN_LOSS = "train_loss"
ARCH_CE = "arch_ce"  # cross-entropy of the architecture step on the validation batches
VALID_ACC = "valid_acc"  # the supernet's accuracy on the evaluation set
VALID_LOSS = "valid_loss"
LR = "lr"
ALPHA_LR = "alpha_lr"
BETA_LR = "beta_lr"
SECONDS = "seconds"
# Flat names of the epoch's loss weights and phase times: `weight_op_entropy`, `seconds_train`.
LOSS_WEIGHT_PREFIX = "weight_"
PHASE_SECONDS_PREFIX = "seconds_"
# Diagnostics per level, flattened as `NAME/LEVEL` (e.g. `skip_connect/normal`).
SKIP_CONNECT = "skip_connect"
OP_ENTROPY_PER_EDGE = "op_entropy_per_edge"
MAX_OP_WEIGHT = "max_op_weight"  # also the final mean over levels (convergence_metrics)
LEVEL_METRICS = (SKIP_CONNECT, OP_ENTROPY_PER_EDGE, MAX_OP_WEIGHT)

# ----------------------------------------------------------------------- discretization
SUPERNET_ACC = "supernet_acc"
SUPERNET_LOSS = "supernet_loss"
SUPERNET_BN_RECAL_ACC = "supernet_bn_recal_acc"
# Every epoch with trained edge weights and stored BN statistics; the final value at the end.
DISCRETIZED_ACC = "discretized_acc"
DROP = "drop"
DISCRETIZED_BN_RECAL_ACC = "discretized_bn_recal_acc"
DROP_BN_RECAL = "drop_bn_recal"
DISCRETIZED_UNIT_EDGES_ACC = "discretized_unit_edges_acc"
DROP_UNIT_EDGES = "drop_unit_edges"
DISCRETIZED_UNIT_EDGES_BN_RECAL_ACC = "discretized_unit_edges_bn_recal_acc"
DROP_UNIT_EDGES_BN_RECAL = "drop_unit_edges_bn_recal"
KEPT_EDGE_SHARE = "kept_edge_share"
PARAMS = "params"  # the derived network's parameters (derived_params)

# An evaluation (nas/evaluate.py): its per-epoch record and its final metrics (errors in %).
TEST_TOP1_ERROR = "test_top1_error"
TEST_TOP5_ERROR = "test_top5_error"
TEST_LOSS = "test_loss"
DROP_PATH = "drop_path"
MACS = "macs"

# What a sweep can rank trials by: the final metrics of a trial, and those it reports every epoch.
FINAL_METRICS = (
    SUPERNET_ACC,
    DISCRETIZED_ACC,
    DROP,
    DISCRETIZED_BN_RECAL_ACC,
    DROP_BN_RECAL,
    DISCRETIZED_UNIT_EDGES_ACC,
    DROP_UNIT_EDGES,
    DISCRETIZED_UNIT_EDGES_BN_RECAL_ACC,
    DROP_UNIT_EDGES_BN_RECAL,
    SUPERNET_BN_RECAL_ACC,
    MAX_OP_WEIGHT,
    KEPT_EDGE_SHARE,
    PARAMS,
)
EPOCH_METRICS = (VALID_ACC, VALID_LOSS, TRAIN_ACC, TRAIN_LOSS, ARCH_CE, DISCRETIZED_ACC, DROP)
# Those measured on the search's evaluation images (data.eval_split): what selects on them, selects
# on those images. The others depend on the training images or on the architecture alone.
EVAL_SET_METRICS = tuple(
    m for m in dict.fromkeys((*FINAL_METRICS, *EPOCH_METRICS))
    if m not in (TRAIN_ACC, TRAIN_LOSS, ARCH_CE, MAX_OP_WEIGHT, KEPT_EDGE_SHARE, PARAMS)
)  # fmt: skip
# A final metric under a further target of the same search (docs/science.md D14): `discretized_acc@3of14`.
DERIVED_SEPARATOR = "@"


def derived_metric_name(name: str, slug: str) -> str:
    """The flat name of metric `name` under the derived target whose slug is `slug`."""
    return f"{name}{DERIVED_SEPARATOR}{slug}"


def split_derived(name: str) -> tuple[str, str]:
    """(`discretized_acc`, `3of14`) for `discretized_acc@3of14`; (name, "") for a plain name."""
    base, _, slug = name.partition(DERIVED_SEPARATOR)
    return base, slug


def trained_edge_weights(arch_weights: ArchWeights) -> list[torch.Tensor | None]:
    """The edge weights the method trained, per level, detached (None: no edge parameters)."""
    return [None if w is None else w.detach() for w in arch_weights.edges]


def discretized_accuracy(
    supernet: Supernet, genotype: Genotype, arch_weights: ArchWeights, eval_set: ImageSet
) -> float:
    """`discretized_acc`: the discretized network's accuracy with the trained edge weights and the
    supernet's stored BN statistics (docs/science.md D4)."""
    acc, _ = accuracy(DiscretizedNetwork(supernet, genotype, trained_edge_weights(arch_weights)), eval_set)
    return acc


def discretization_metrics(
    supernet: Supernet,
    arch: Architecture,
    genotype: Genotype,
    eval_set: ImageSet,
    recal_set: ImageSet,
    recal_batches: int = 20,
    batch_size: int = 64,
    seed: int = 0,
    supernet_metrics: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Supernet accuracy and the discretized accuracy of `genotype`, with trained and unit edge
    weights, each with and without BN recalibration, and the drops (percentage points).
    `supernet_metrics`: the supernet's own accuracies from an earlier call on the same supernet and
    data (they do not depend on the genotype), reused instead of measured again."""
    with torch.no_grad():
        arch_weights = arch()
    supernet_model = BoundSupernet(supernet, arch_weights)
    trained = DiscretizedNetwork(supernet, genotype, trained_edge_weights(arch_weights))
    unit_edges = DiscretizedNetwork(supernet, genotype, None)

    def recalibrated(model: torch.nn.Module) -> float:
        return recalibrated_accuracy(model, supernet, eval_set, recal_set, recal_batches, batch_size, seed)

    if supernet_metrics is None:
        supernet_acc, supernet_loss = accuracy(supernet_model, eval_set)
    else:
        supernet_acc, supernet_loss = supernet_metrics[SUPERNET_ACC], supernet_metrics[SUPERNET_LOSS]
    discretized_acc, _ = accuracy(trained, eval_set)
    discretized_bn_recal_acc = recalibrated(trained)
    discretized_unit_edges_acc, _ = accuracy(unit_edges, eval_set)
    discretized_unit_edges_bn_recal_acc = recalibrated(unit_edges)
    if supernet_metrics is None:
        supernet_bn_recal_acc = recalibrated(supernet_model)
    else:
        supernet_bn_recal_acc = supernet_metrics[SUPERNET_BN_RECAL_ACC]
    supernet.eval()
    return {
        SUPERNET_ACC: supernet_acc,
        SUPERNET_LOSS: supernet_loss,
        DISCRETIZED_ACC: discretized_acc,
        DISCRETIZED_BN_RECAL_ACC: discretized_bn_recal_acc,
        DISCRETIZED_UNIT_EDGES_ACC: discretized_unit_edges_acc,
        DISCRETIZED_UNIT_EDGES_BN_RECAL_ACC: discretized_unit_edges_bn_recal_acc,
        SUPERNET_BN_RECAL_ACC: supernet_bn_recal_acc,
        DROP: supernet_acc - discretized_acc,
        DROP_BN_RECAL: supernet_acc - discretized_bn_recal_acc,
        DROP_UNIT_EDGES: supernet_acc - discretized_unit_edges_acc,
        DROP_UNIT_EDGES_BN_RECAL: supernet_acc - discretized_unit_edges_bn_recal_acc,
    }


def convergence_metrics(arch: Architecture, genotype: Genotype) -> dict[str, float]:
    """How far the architecture moved: `max_op_weight`, the mean over edges and levels of the
    largest op weight (1: one-hot, 1/ops: uniform); with beta, `kept_edge_share`, the mean over edge
    groups of the share of the group's edge weight that its kept edges hold (1: the dropped edges
    already weigh nothing, as discretization assumes)."""
    with torch.no_grad():
        op_weights = arch.op_weights()
        metrics = {MAX_OP_WEIGHT: torch.stack([w.max(dim=1).values.mean() for w in op_weights]).mean().item()}
        shares = []
        for level, cell in enumerate(genotype.levels.values()):
            kept = {arch.space.node_edges(j).start + i for j, node in enumerate(cell.nodes) for _, i in node}
            edge_weights = arch.level_edge_weights(level)
            for group, _ in arch.beta_groups(level):
                total = sum(float(edge_weights[e]) for e in group.edges)
                shares.append(sum(float(edge_weights[e]) for e in group.edges if e in kept) / total)
        if shares:
            metrics[KEPT_EDGE_SHARE] = sum(shares) / len(shares)
    return metrics


def derived_params(genotype: Genotype) -> int:
    """`params`: parameters of the genotype's CIFAR-10 evaluation network in the published
    protocol's size (nas.network.PROTOCOLS; auxiliary head excluded, the published convention)."""
    layers, channels, classes, _ = PROTOCOLS["cifar10"]
    return count_parameters(EvalNetwork(genotype, channels, layers, classes, auxiliary=False))


def architecture_diagnostics(arch: Architecture, genotype: Genotype) -> dict[str, Any]:
    """Softmax(alpha), beta, edge weights, entropies and skip counts per level (docs/science.md D7):
    the architecture part of an epoch's record."""
    space = arch.space
    with torch.no_grad():
        op_weights = arch.op_weights()
        record: dict[str, Any] = {
            "softmax_alpha": {name: op_weights[i].cpu().tolist() for i, name in enumerate(space.level_names)},
            OP_ENTROPY_PER_EDGE: {
                name: entropy(op_weights[i]).mean().item() for i, name in enumerate(space.level_names)
            },
            MAX_OP_WEIGHT: {
                name: op_weights[i].max(dim=1).values.mean().item() for i, name in enumerate(space.level_names)
            },
            "genotype": genotype.to_dict()["levels"],
            SKIP_CONNECT: genotype.skip_counts(),
        }
        if arch.betas:
            record["beta"] = {
                name: [arch.betas[slot].cpu().tolist() for _, slot in arch.beta_groups(i)]
                for i, name in enumerate(space.level_names)
            }
            record["edge_weights"] = {
                name: (w.cpu().tolist() if (w := arch.level_edge_weights(i)) is not None else [1.0] * space.num_edges)
                for i, name in enumerate(space.level_names)
            }
    return record


def epoch_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """An epoch's record (run_search's history) as the flat scalars its EpochEvent carries."""
    metrics = {
        key: float(record[key])
        for key in (
            TRAIN_ACC,
            TRAIN_LOSS,
            ARCH_CE,
            VALID_ACC,
            VALID_LOSS,
            DISCRETIZED_ACC,
            DROP,
            LR,
            ALPHA_LR,
            BETA_LR,
            SECONDS,
        )
    }
    for name, value in record["loss_terms"].items():
        metrics[name] = float(value)
    for name, value in record["loss_weights"].items():
        metrics[f"{LOSS_WEIGHT_PREFIX}{name}"] = float(value)
    for phase, seconds in record.get("phase_seconds", {}).items():
        metrics[f"{PHASE_SECONDS_PREFIX}{phase}"] = float(seconds)
    for key in LEVEL_METRICS:
        for level, value in record[key].items():
            metrics[f"{key}/{level}"] = float(value)
    return metrics
