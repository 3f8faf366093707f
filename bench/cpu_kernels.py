"""Times the C kernels of the CPU search against PyTorch's own form of the same computation.

    python bench/cpu_kernels.py [--threads 2] [--repeats 15]

Prints, per shape, the median time of the depthwise convolution's weight gradient (PyTorch's
`convolution_backward` against nas/native.py's C kernel, batch 64) and of one edge mixture,
forward + backward (PyTorch's broadcast ops against nas/mixture.py: three shared terms, four conv
terms, four edges). docs/cpu.md gives the figures of one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nas import mixture, native

CL = torch.channels_last


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def weight_gradients(repeats: int) -> None:
    print("depthwise weight gradient, batch 64 (ms)")
    print(f"{'kernel':<28} {'forward':>8} {'PyTorch':>8} {'C':>8}")
    # (label, channels, size, kernel, stride, padding, dilation)
    shapes = [
        ("5x5, 64 ch, 32x32", 64, 32, 5, 1, 2, 1),
        ("5x5, 128 ch, 16x16", 128, 16, 5, 1, 2, 1),
        ("5x5 dil 2, 64 ch, 32x32", 64, 32, 5, 1, 4, 2),
        ("3x3 dil 2, 64 ch, 32x32", 64, 32, 3, 1, 2, 2),
        ("5x5 stride 2, 128 ch, 32x32", 128, 32, 5, 2, 2, 1),
        ("3x3, 64 ch, 32x32", 64, 32, 3, 1, 1, 1),
    ]
    for shape in shapes:
        print(weight_gradient_row(*shape, repeats))


def weight_gradient_row(label, c, size, k, stride, pad, dil, repeats) -> str:
    x = torch.randn(64, c, size, size).contiguous(memory_format=CL)
    w = torch.randn(c, 1, k, k)
    g = torch.randn_like(F.conv2d(x, w, None, stride, pad, dil, c)).contiguous(memory_format=CL)

    def pytorch():
        return torch.ops.aten.convolution_backward(
            g, x, w, None, (stride,) * 2, (pad,) * 2, (dil,) * 2, False, (0, 0), c, (False, True, False)
        )

    forward = median_ms(lambda: F.conv2d(x, w, None, stride, pad, dil, c), repeats)
    torch_ms = median_ms(pytorch, repeats)
    c_ms = median_ms(lambda: native.depthwise_weight_grad(x, g, k, stride, pad, dil), repeats)
    return f"{label:<28} {forward:8.2f} {torch_ms:8.2f} {c_ms:8.2f}"


def mixtures(repeats: int) -> None:
    print("\nedge mixture, 3 shared + 4 conv terms, 4 edges, forward + backward (ms)")
    print(f"{'images, size, channels':<28} {'PyTorch':>8} {'C':>8}")
    for b, size, c in [(32, 32, 8), (32, 16, 16), (32, 8, 32), (64, 32, 16), (64, 16, 32)]:
        print(mixture_row(b, size, c, 4, repeats))


def mixture_row(b, size, c, edges, repeats) -> str:
    shared = [torch.randn(b, c, size, size).contiguous(memory_format=CL).requires_grad_() for _ in range(3)]
    terms = [torch.randn(b, size, size, edges, c, requires_grad=True) for _ in range(4)]
    weights = torch.randn(edges, 3, requires_grad=True)
    grad = torch.randn(b, size, size, edges, c)
    inputs = [weights, *shared, *terms]

    def pytorch():
        out = None
        for k, s in enumerate(shared):
            y, w = s.permute(0, 2, 3, 1).unsqueeze(3), weights[:, k].view(1, 1, 1, edges, 1)
            out = y * w if out is None else torch.addcmul(out, y, w)
        for t in terms:
            out = out + t
        return torch.autograd.grad(out, inputs, grad)

    def kernels():
        return torch.autograd.grad(mixture.mix(weights, shared, terms), inputs, grad)

    label = f"{b}, {size}x{size}, {c}"
    return f"{label:<28} {median_ms(pytorch, repeats):8.2f} {median_ms(kernels, repeats):8.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit("the C kernels are not built here (no C compiler, or NAS_NATIVE_KERNELS=0)")
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}")
    weight_gradients(args.repeats)
    mixtures(args.repeats)


if __name__ == "__main__":
    main()
