"""Images per second per CPU core of the ImageNet training pipeline (decode, random-resized crop to 224,
flip, colour jitter, tensor, normalise), stage by stage, and of faster decode paths.

    python bench/imagenet_pipeline.py [--images 48] [--repeats 3] [--imagenet DIR] [--json OUT.json]

One process on one thread (a data loader's worker process is one core). The images: DIR/train's
JPEGs where --imagenet names a copy of ImageNet, else generated ones of ImageNet's typical size and
JPEG weight (500x375 and 375x500, quality 90, smooth shapes, edges and grain: about 106 kB each,
near ImageNet's training set, 138 GB for 1.28M images; their sizes are printed). Pipelines:

    protocol      PIL decode, torchvision's RandomResizedCrop(224), flip, ColorJitter(0.4, 0.4, 0.4,
                  hue 0.2), ToTensor, Normalize: nas/evaluate.py's ImageNet training transform
    draft         the same, but the JPEG decoded at 1/2, 1/4 or 1/8 scale where the random crop is
                  that much larger than 224 (libjpeg's DCT scaling: DraftRandomResizedCrop below)

and the time of each stage. Cores a GPU needs: its training images/s divided by these figures.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torchvision.transforms as T
from PIL import Image, ImageDraw, ImageFilter

from nas.evaluate import IMAGENET_MEAN, IMAGENET_STD


class DraftRandomResizedCrop(torch.nn.Module):
    """torchvision's RandomResizedCrop(size) on a JPEG that is not decoded yet (`Image.open` without
    `convert`): the crop is drawn on the full image, with the same distribution, and the JPEG is
    decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, `Image.draft`) where the crop is still at
    least `size` pixels on each side at that scale, then resized to size x size as usual. What a
    decode at full size would give, up to the small difference of the two downscalings. Other images
    are decoded in full."""

    def __init__(
        self, size: int, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
    ):
        super().__init__()
        self.size, self.scale, self.ratio = size, scale, ratio

    def forward(self, image):
        width, height = image.size
        top, left, h, w = T.RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        shrink = min(w, h) / self.size
        if image.format == "JPEG" and shrink >= 2:
            reduce = min(8, 2 ** int(math.log2(shrink)))
            image.draft("RGB", (math.ceil(width / reduce), math.ceil(height / reduce)))
        image = image.convert("RGB")
        sx, sy = image.width / width, image.height / height
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        return image.resize((self.size, self.size), Image.BILINEAR, box=box)


def generated_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs: a smooth background, shapes with edges, blur and grain, quality 90."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    images = []
    for i in range(count):
        w, h = (500, 375) if i % 2 == 0 else (375, 500)
        base = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(h, w), mode="bicubic")
        pixels = (base[0].permute(1, 2, 0).clamp(0, 1) * 255).to(torch.uint8).numpy()
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(40):
            x, y = rng.randrange(w), rng.randrange(h)
            size = rng.randrange(8, 120)
            colour = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + size, y + size], fill=colour)
        image = image.filter(ImageFilter.GaussianBlur(1.2))
        grain = (torch.randn(h, w, 3, generator=g) * 24).to(torch.int16)
        noisy = (torch.from_numpy(__import__("numpy").asarray(image)).to(torch.int16) + grain).clamp(0, 255)
        buffer = io.BytesIO()
        Image.fromarray(noisy.to(torch.uint8).numpy()).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def folder_jpegs(root: Path, count: int) -> list[bytes]:
    files = (
        sorted((root / "train").glob("*/*.JPEG"))[: count * 50 : 50] or sorted((root / "train").rglob("*.*"))[:count]
    )
    return [f.read_bytes() for f in files[:count]]


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def pipelines() -> dict[str, tuple]:
    """name -> (how a file is opened, the transform after it)."""
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    rest = [T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4, 0.2), T.ToTensor(), norm]
    return {
        "protocol": (decode, T.Compose([T.RandomResizedCrop(224), *rest])),
        "draft": (lambda data: Image.open(io.BytesIO(data)), T.Compose([DraftRandomResizedCrop(224), *rest])),
    }


def per_second(fn, items: list, repeats: int) -> list[float]:
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for item in items:
            fn(item)
        rates.append(len(items) / (time.perf_counter() - started))
    return rates


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--imagenet", type=Path, help="a copy of ImageNet (train/<class>/<image>.JPEG)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    data = folder_jpegs(args.imagenet, args.images) if args.imagenet else generated_jpegs(args.images)
    sizes = [Image.open(io.BytesIO(b)).size for b in data]
    print(
        f"{len(data)} JPEGs, {statistics.mean(len(b) for b in data) / 1e3:.0f} kB and "
        f"{statistics.mean(w * h for w, h in sizes) / 1e3:.0f} kpixels on average "
        f"({'from ' + str(args.imagenet) if args.imagenet else 'generated'}); one core"
    )
    decoded = [decode(b) for b in data]
    cropped = [T.RandomResizedCrop(224)(image) for image in decoded]
    stages = {
        "decode (PIL, full size)": (decode, data),
        "random-resized crop 224": (T.RandomResizedCrop(224), decoded),
        "flip": (T.RandomHorizontalFlip(), cropped),
        "colour jitter": (T.ColorJitter(0.4, 0.4, 0.4, 0.2), cropped),
        "  of which brightness": (T.ColorJitter(brightness=0.4), cropped),
        "  of which contrast": (T.ColorJitter(contrast=0.4), cropped),
        "  of which saturation": (T.ColorJitter(saturation=0.4), cropped),
        "  of which hue": (T.ColorJitter(hue=0.2), cropped),
        "to tensor + normalise": (T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]), cropped),
    }
    figures: dict[str, list[float]] = {}
    for name, (fn, items) in stages.items():
        figures[f"stage: {name}"] = per_second(fn, items, args.repeats)
    for name, (opener, transform) in pipelines().items():
        figures[f"pipeline: {name}"] = per_second(lambda b, o=opener, t=transform: t(o(b)), data, args.repeats)
    print(f"\n{'':40s} {'images/s per core (median [min-max])':>38s} {'ms per image':>13s}")
    for name, rates in figures.items():
        median = statistics.median(rates)
        print(f"{name:40s} {median:20.1f} [{min(rates):.1f}-{max(rates):.1f}] {1000 / median:13.2f}")
    protocol = statistics.median(figures["pipeline: protocol"])
    draft = statistics.median(figures["pipeline: draft"])
    print(f"\ndraft / protocol: {draft / protocol:.2f}x")
    for gpu_rate in (500, 1000, 2000):
        print(
            f"a GPU training {gpu_rate} images/s needs {gpu_rate / protocol:.0f} cores (protocol decode), "
            f"{gpu_rate / draft:.0f} (draft decode)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"jpegs": len(data), "figures": figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
