"""The three methods' published settings as overlays on SearchConfig's defaults, which are the
DARTS search settings (docs/science.md §2.6). A YAML file and `--set` overrides go on top."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # quark0/darts train_search.py: 8 ops with `none`, shared alpha, no regulariser, first order.
    "darts": {},
    # sunsmarterjie/DAAS (docs/science.md §5.2-5.6): 7 ops, sharpened alpha initialised at 1e-4 N(0,1) and
    # frozen until the warm-up epoch (8 of 50), beta per node, and
    # CE + 0.1 l(e) [log_(e) H_alpha + 4 (0.2 count + H_beta)].
    "da2s": {
        "ops": "da2s",
        "edge_params": True,
        "alpha": {"init_std": 1e-4, "sharpen": True, "warmup": 0.16},
        "loss": {
            "op_entropy": {"weight": 0.1, "schedule": "linear*log_", "warmup": 0.16},
            "edge_entropy": {"weight": 0.4, "schedule": "linear"},
            "edge_count": {"weight": 0.08, "schedule": "linear"},
        },
    },
    # Multi-level entropy search (docs/science.md §6.2, a proposal consistent with the HIT 2021 abstract):
    # one alpha per stage, the architecture entropy ramped linearly to 0.1 after a 10-of-50-epoch
    # warm-up, DARTS derivation per level.
    "multilevel": {
        "alpha_sharing": "stage",
        "loss": {"op_entropy": {"weight": 0.1, "schedule": "linear_", "warmup": 0.2}},
    },
}
