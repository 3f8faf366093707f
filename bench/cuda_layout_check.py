"""Fused vs plain supernet gradients on CUDA in each memory layout, with cuDNN on and off; and the
ops that could be behind a wrong channels-last gradient, one at a time against float64.

    python bench/cuda_layout_check.py [--device cuda|cpu] [--json]

Prints, for the DA2S search space (C=8, 5 cells, 16x16 inputs, batch 16, IEEE float32), the
relative difference ||g_fused - g_plain|| / ||g_plain|| over all gradients and the worst tensors.
On an H200 (PyTorch 2.11, cu130) the channels-last layout with cuDNN gave 0.49 (the grouped 1x1
convolutions' weight gradients), every other combination 7e-7: the reason a fused search on CUDA
uses the contiguous layout (docs/gpu.md).

The isolated checks tell the two candidate causes apart: the weight gradient of a grouped 1x1
convolution (the fused path's point-wise convolutions, E edges as E groups; cuDNN) and the input
gradient of a 3x3 average pooling with padding on channels-last input (CUDA's avg_pool2d backward;
pytorch#188344 reports one such defect), plus max pooling for completeness. Each is computed in
float32 in both layouts and compared with float64 on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
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


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu().flatten(), want.double().cpu().flatten()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def isolated(device: torch.device) -> dict[str, float]:
    """Relative error against float64 on the CPU of each candidate op's gradient, per layout."""
    g = torch.Generator().manual_seed(0)
    edges, channels = 4, 16
    x = torch.randn(8, edges * channels, 8, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(edges * channels, channels, 1, 1, generator=g, dtype=torch.float64)
    upstream = torch.randn(8, edges * channels, 8, 8, generator=g, dtype=torch.float64)
    cases = {
        "grouped_1x1_conv_weight_grad": (
            lambda x, w: torch.nn.functional.conv2d(x, w, groups=edges),
            lambda out, x, w: torch.autograd.grad(out, w, upstream_of(out))[0],
        ),
        "avg_pool_3x3_pad1_input_grad": (
            lambda x, w: torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False),
            lambda out, x, w: torch.autograd.grad(out, x, upstream_of(out))[0],
        ),
        "avg_pool_3x3_stride2_pad1_input_grad": (
            lambda x, w: torch.nn.functional.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
            lambda out, x, w: torch.autograd.grad(out, x, upstream_of(out))[0],
        ),
        "max_pool_3x3_pad1_input_grad": (
            lambda x, w: torch.nn.functional.max_pool2d(x, 3, 1, 1),
            lambda out, x, w: torch.autograd.grad(out, x, upstream_of(out))[0],
        ),
    }

    def upstream_of(out: torch.Tensor) -> torch.Tensor:
        return (
            upstream[..., : out.shape[-2], : out.shape[-1]]
            .to(out.device, out.dtype)
            .contiguous(
                memory_format=torch.channels_last
                if out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
                else torch.contiguous_format
            )
        )

    results = {}
    for name, (forward, gradient) in cases.items():
        xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
        want = gradient(forward(xr, wr), xr, wr)
        for layout_name, layout in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
            xd = x.float().to(device).contiguous(memory_format=layout).requires_grad_()
            wd = weight.float().to(device).contiguous(memory_format=layout).requires_grad_()
            with ieee_float32():
                got = gradient(forward(xd, wd), xd, wd)
            results[f"{name}/{layout_name}"] = _rel(got, want)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    figures: dict = {"isolated": isolated(device), "supernet": {}}
    for name, value in figures["isolated"].items():
        print(f"{name:50s} relative error {value:.2e}")
    for use_cudnn in (True, False):
        torch.backends.cudnn.enabled = use_cudnn
        torch.manual_seed(0)
        space = SearchSpace(DA2S_OPS, nodes=4, cells=5)
        plain = Supernet(space, channels=8).to(device).train()
        arch = Architecture(space, Target.parse("3 of 14", space), edge_params=True, alpha=AlphaConfig(init_std=1.0),
                            beta=BetaConfig(init_noise=0.5)).to(device)  # fmt: skip
        x = torch.randn(16, 3, 16, 16, device=device)
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
                figures["supernet"][f"cudnn={use_cudnn}/{name}"] = {"fused_vs_plain": total, "worst": worst[::-1]}
        if device.type != "cuda":
            break  # cuDNN is CUDA's
    torch.backends.cudnn.enabled = True
    figures["torch"] = torch.__version__
    figures["cudnn"] = torch.backends.cudnn.version()
    figures["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"torch {figures['torch']}, cuDNN {figures['cudnn']}, {figures['device']}")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
