"""Fused vs plain supernet gradients on CUDA in each memory layout, with cuDNN on and off.

    python bench/cuda_layout_check.py

Prints, for the DA2S search space (C=8, 5 cells, 16x16 inputs, batch 16, IEEE float32), the
relative difference ||g_fused - g_plain|| / ||g_plain|| over all gradients and the worst tensors.
On an H200 (PyTorch 2.11, cu130) the channels-last layout with cuDNN gave 0.49 (the grouped 1x1
convolutions' weight gradients), every other combination 7e-7: the reason a fused search on CUDA
uses the contiguous layout (docs/gpu.md).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nas.ops import DA2S_OPS
from nas.space import SearchSpace, Target
from nas.supernet import AlphaConfig, Architecture, BetaConfig, Supernet, ieee_float32


def gradients(net: Supernet, arch: Architecture, x: torch.Tensor) -> dict[str, torch.Tensor]:
    loss = net(x, arch()).square().mean()
    names = [n for n, _ in net.named_parameters()] + [f"arch.{n}" for n, _ in arch.named_parameters()]
    return dict(zip(names, torch.autograd.grad(loss, [*net.parameters(), *arch.parameters()])))


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    for use_cudnn in (True, False):
        torch.backends.cudnn.enabled = use_cudnn
        torch.manual_seed(0)
        space = SearchSpace(DA2S_OPS, nodes=4, cells=5)
        plain = Supernet(space, channels=8).cuda().train()
        arch = Architecture(space, Target.parse("3 of 14", space), edge_params=True, alpha=AlphaConfig(init_std=1.0),
                            beta=BetaConfig(init_noise=0.5)).cuda()  # fmt: skip
        x = torch.randn(16, 3, 16, 16, device="cuda")
        with ieee_float32():
            reference = gradients(plain, arch, x)
            for layout in (torch.channels_last, torch.contiguous_format):
                fused = copy.deepcopy(plain).set_fused(True).set_memory_format(layout).train()
                got = gradients(fused, arch, x)
                flat = lambda g: torch.cat([t.flatten() for t in g.values()])  # noqa: E731
                total = ((flat(got) - flat(reference)).norm() / flat(reference).norm()).item()
                worst = sorted(
                    (((got[k] - reference[k]).norm() / reference[k].norm().clamp_min(1e-30)).item(), k) for k in got
                )[-3:]
                name = "channels_last" if layout == torch.channels_last else "contiguous"
                print(f"cudnn={use_cudnn!s:5s} {name:13s} relative difference {total:.2e}  worst: {worst[::-1]}")
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
