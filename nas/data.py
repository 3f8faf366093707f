"""Data: CIFAR-10 (torchvision, or `train.npz`/`test.npz` arrays), a generated stand-in, ImageNet
through ImageFolder, the search split, and augmentation on batches of tensors.

Images are held as one uint8 tensor (N, 3, H, W) per split, on the device that trains, and batches
are cropped, flipped and normalised as tensors: no per-image PIL transforms, no loader workers.
Batch order and augmentation come from a generator seeded by (seed, epoch, stream), so an epoch
is the same whether or not the search was stopped before it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError

log = logging.getLogger(__name__)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR_TRAIN_SIZE = 50_000
DATA_ROOT_ENV = "NAS_DATA_ROOT"


class DataNotFoundError(FileNotFoundError):
    pass


class DataError(DataNotFoundError):
    """A data file that is there but cannot be used (truncated, other arrays, other shapes)."""


@dataclass
class DataConfig:
    dataset: Literal["cifar10", "synthetic"] = "cifar10"
    root: str | None = None
    download: bool = True
    # Images of the 50k training set used by the search (both halves); null: all of them.
    subset: int | None = field(default=None, metadata={"min": 2})
    train_portion: float = field(default=0.5, metadata={"gt": 0.0, "max": 1.0})
    # Where supernet and discretized accuracy are measured: `holdout`, training images outside the
    # search subset; `test`, the test set; `valid`, the half that trains the architecture (the DARTS
    # code's protocol: the architecture is measured on images it was fitted to, so only by name).
    # `auto`: images that trained neither weights nor architecture, holdout when the subset leaves
    # training images, else the test set (the full 25k/25k split).
    eval_split: Literal["auto", "valid", "holdout", "test"] = "auto"
    # Images measured (unset with `auto` holdout: as many as one half of the search trains on, at least
    # 1,000 and at most 10,000, so that a small search is not dominated by its measurement).
    eval_subset: int | None = field(default=None, metadata={"min": 1})
    # 16 averages 2x2 pixels: a cheaper search for CPU-scale studies (docs/science.md §8).
    resolution: Literal[32, 16, 8] = 32
    split_seed: int = 0

    def __post_init__(self) -> None:
        # `auto` is resolved at once, so that every written config names the split it measured on.
        if self.eval_split == "auto":
            used = min(self.subset or CIFAR_TRAIN_SIZE, CIFAR_TRAIN_SIZE)
            self.eval_split = "holdout" if used < CIFAR_TRAIN_SIZE else "test"
            if self.eval_split == "holdout" and self.eval_subset is None:
                half = round(used * min(self.train_portion, 1 - self.train_portion))
                self.eval_subset = min(10_000, CIFAR_TRAIN_SIZE - used, max(1_000, half))

    def validate(self, path: str) -> None:
        prefix = f"{path}." if path else ""
        if self.subset is not None and self.subset > CIFAR_TRAIN_SIZE:
            raise ConfigError(prefix + "subset", self.subset, f"must be at most {CIFAR_TRAIN_SIZE}")
        if self.train_portion >= 1.0:
            raise ConfigError(
                prefix + "train_portion", self.train_portion, "must be below 1: the architecture needs a valid half"
            )
        if self.eval_split == "holdout":
            used = self.subset or CIFAR_TRAIN_SIZE
            if used >= CIFAR_TRAIN_SIZE:
                raise ConfigError(
                    prefix + "eval_split",
                    "holdout",
                    "needs data.subset below 50000 so that training images remain for it",
                )
            if self.eval_subset is not None and used + self.eval_subset > CIFAR_TRAIN_SIZE:
                raise ConfigError(
                    prefix + "eval_subset", self.eval_subset, f"subset + eval_subset must be at most {CIFAR_TRAIN_SIZE}"
                )


@dataclass
class ImageSet:
    """Images as uint8 (N, 3, H, W) and labels as int64 (N,), on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device))

    def take(self, index: torch.Tensor) -> ImageSet:
        index = index.to(self.images.device)
        return ImageSet(self.images[index], self.labels[index])


@dataclass
class SearchData:
    """The three sets of a search: `train` trains the weights, `valid` the architecture, `eval`
    measures supernet and discretized accuracy."""

    train: ImageSet
    valid: ImageSet
    eval: ImageSet
    num_classes: int = 10
    resolution: int = 32

    def to(self, device: torch.device | str) -> SearchData:
        return SearchData(
            self.train.to(device), self.valid.to(device), self.eval.to(device), self.num_classes, self.resolution
        )

    def describe(self) -> str:
        return f"{len(self.train)} train / {len(self.valid)} valid / {len(self.eval)} eval images at {self.resolution}x{self.resolution}"


def resolve_root(root: str | None) -> str:
    """`root` if given, else $NAS_DATA_ROOT, else ./data."""
    return root or os.environ.get(DATA_ROOT_ENV) or "data"


NPZ_ARRAYS = {"train.npz": ("x_train", "y_train"), "test.npz": ("x_test", "y_test")}


def _from_npz(root: Path) -> tuple[ImageSet, ImageSet]:
    return tuple(_npz_set(root / name, *keys) for name, keys in NPZ_ARRAYS.items())  # type: ignore[return-value]


def _npz_set(path: Path, images_key: str, labels_key: str) -> ImageSet:
    """One split's arrays, checked: a file that is not such an array file says which and why."""

    def broken(reason: str) -> DataError:
        return DataError(
            f"{path} is not a usable CIFAR-10 array file ({reason}). It must hold uint8 {images_key} of shape "
            f"(N, 32, 32, 3) and {labels_key} of N labels 0-9 (np.savez); replace it with a good copy, or remove "
            "train.npz and test.npz to let torchvision download CIFAR-10 (data.download: true)"
        )

    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = [k for k in (images_key, labels_key) if k not in arrays.files]
            if missing:
                raise broken(f"no array {missing[0]}; it has {', '.join(arrays.files) or 'none'}")
            images, labels = arrays[images_key], arrays[labels_key]
    except DataError:
        raise
    except Exception as err:  # truncated, not a zip, pickled objects: numpy's many ways of saying it
        raise broken(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unreadable'}") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise broken(f"{images_key} is {images.dtype} of shape {images.shape}")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise broken(f"{labels_key} is {labels.dtype} of shape {labels.shape}, for {len(images)} images")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise broken(f"{labels_key} holds labels outside 0-9 ({labels.min()} to {labels.max()})")
    return _image_set(images, labels)


def _image_set(images_hwc: np.ndarray, labels: np.ndarray) -> ImageSet:
    images = torch.from_numpy(np.ascontiguousarray(images_hwc)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.as_tensor(np.asarray(labels), dtype=torch.int64))


def load_cifar10(root: str | None = None, download: bool = True) -> tuple[ImageSet, ImageSet]:
    """CIFAR-10 train and test sets from `root`: `train.npz`/`test.npz` arrays if present, else
    torchvision's copy (downloaded there when `download` is true)."""
    path = Path(resolve_root(root)).expanduser()
    if (path / "train.npz").is_file() and (path / "test.npz").is_file():
        return _from_npz(path)
    import torchvision

    try:
        train = torchvision.datasets.CIFAR10(str(path), train=True, download=download)
        test = torchvision.datasets.CIFAR10(str(path), train=False, download=download)
    except Exception as err:  # torchvision raises RuntimeError when absent, URLError when offline
        reason = "downloading failed" if download else "download is off (data.download: false)"
        raise DataNotFoundError(
            f"no CIFAR-10 at {path} ({reason}: {err}). Either point --data-root, data.root or "
            f"${DATA_ROOT_ENV} at a directory holding train.npz and test.npz (uint8 x_train/y_train, "
            "x_test/y_test), or let torchvision download CIFAR-10 there (data.download: true, needs internet)."
        ) from None
    return _image_set(train.data, train.targets), _image_set(test.data, test.targets)


def imagenet_folder(root: str, split: Literal["train", "val"], transform=None):
    """An ImageNet split through torchvision's ImageFolder at ROOT/train or ROOT/val (one folder per
    class, as the official tarballs unpack after the usual `val` reorganisation)."""
    import torchvision

    path = Path(root).expanduser() / split
    if not path.is_dir():
        raise DataNotFoundError(
            f"no ImageNet {split} split at {path}: expected {path}/<class>/<image>.JPEG. Point the ImageNet root "
            "(--data-root or data.root) at the directory holding train/ and val/."
        )
    return torchvision.datasets.ImageFolder(str(path), transform=transform)


def synthetic_cifar(n_train: int = CIFAR_TRAIN_SIZE, n_test: int = 10_000, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """A generated stand-in for CIFAR-10: each class is a smooth random colour pattern, each image
    that pattern at a random shift, contrast and noise. Learnable in a few hundred steps; for tests
    and demos on machines without the data set."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.randn(10, 3, 6, 6, generator=g), size=40, mode="bicubic", align_corners=False)

    def make(n: int) -> ImageSet:
        labels = torch.arange(n) % 10
        labels = labels[torch.randperm(n, generator=g)]
        dx, dy = torch.randint(0, 9, (2, n), generator=g)
        rows = (dy[:, None] + torch.arange(32))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(32))[:, None, None, :]
        patterns = templates[labels][
            torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols
        ]
        contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)
        noise = torch.randn(n, 3, 32, 32, generator=g)
        images = 128 + 45 * contrast * patterns + 40 * noise
        return ImageSet(images.round().clamp(0, 255).to(torch.uint8), labels)

    return make(n_train), make(n_test)


def downsample(images: ImageSet, resolution: int) -> ImageSet:
    size = images.images.shape[-1]
    if resolution == size:
        return images
    factor = size // resolution
    pooled = F.avg_pool2d(images.images.float(), factor).round().to(torch.uint8)
    return ImageSet(pooled, images.labels)


def make_search_data(config: DataConfig) -> SearchData:
    """The search split (docs/science.md §2.2, D10) of `config`: a seeded permutation of the training set,
    its first `subset` images split `train_portion` / rest into train and valid halves."""
    if config.dataset == "synthetic":
        # Generate only the training images the split can reach (the permutation covers all 50k).
        used = config.subset or CIFAR_TRAIN_SIZE
        needed = used + (config.eval_subset or CIFAR_TRAIN_SIZE - used) if config.eval_split == "holdout" else used
        n_test = (config.eval_subset or 10_000) if config.eval_split == "test" else 0
        full_train, test = synthetic_cifar(needed, n_test, seed=config.split_seed)
    else:
        full_train, test = load_cifar10(config.root, config.download)
    order = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(config.split_seed))
    used = config.subset or len(full_train)
    n_train = math.floor(config.train_portion * used)
    train, valid = full_train.take(order[:n_train]), full_train.take(order[n_train:used])
    if config.eval_split == "valid":
        eval_set = valid
        if config.eval_subset is not None:
            eval_set = valid.take(torch.arange(min(config.eval_subset, len(valid))))
    elif config.eval_split == "holdout":
        stop = used + config.eval_subset if config.eval_subset else len(full_train)
        eval_set = full_train.take(order[used:stop])
    else:
        eval_set = test
        if config.eval_subset is not None:
            pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(config.split_seed))
            eval_set = test.take(pick[: config.eval_subset])
    sets = [downsample(s, config.resolution) for s in (train, valid, eval_set)]
    return SearchData(*sets, num_classes=10, resolution=config.resolution)


_NORM_CACHE: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR mean and std as (1, 3, 1, 1) tensors, made once per device (no host copy per batch)."""
    key = (device, dtype)
    if key not in _NORM_CACHE:
        mean = torch.tensor(CIFAR_MEAN, dtype=dtype).view(1, 3, 1, 1).to(device)
        std = torch.tensor(CIFAR_STD, dtype=dtype).view(1, 3, 1, 1).to(device)
        _NORM_CACHE[key] = (mean, std)
    return _NORM_CACHE[key]


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    mean, std = _mean_std(images.device, dtype)
    return (images.to(dtype) / 255.0 - mean) / std


def crop_flip_draws(n: int, generator: torch.Generator, padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The random numbers of `random_crop_flip` for a batch of n: offsets (2, n) and flips (n,)."""
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    return offsets, flips


def random_crop_flip(
    images: torch.Tensor,
    generator: torch.Generator | None,
    padding: int,
    draws: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """RandomCrop(size, padding) with zero fill and a random horizontal flip, for a whole batch of
    uint8 images at once. `draws` (from `crop_flip_draws`, on any device) replaces the generator."""
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    offsets, flips = draws if draws is not None else crop_flip_draws(n, generator, padding)
    offsets, flips = offsets.to(images.device), flips.to(images.device)
    rows = (offsets[0, :, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = offsets[1, :, None] + torch.arange(w, device=images.device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def cutout_draws(n: int, generator: torch.Generator, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The random numbers of `cutout` for a batch of n: the squares' centre rows and columns."""
    return torch.randint(0, height, (n,), generator=generator), torch.randint(0, width, (n,), generator=generator)


def cutout(
    images: torch.Tensor,
    generator: torch.Generator | None,
    length: int,
    draws: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Zeroes one length x length square per (normalised) image: rows and columns
    [centre - length/2, centre + length/2), clipped at the borders (the DARTS Cutout). `draws`
    (from `cutout_draws`) replaces the generator."""
    n, _, h, w = images.shape
    rows, cols = draws if draws is not None else cutout_draws(n, generator, h, w)
    rows_at = rows.to(images.device)[:, None, None]
    cols_at = cols.to(images.device)[:, None, None]
    ys = torch.arange(h, device=images.device)[None, :, None]
    xs = torch.arange(w, device=images.device)[None, None, :]
    half = length // 2
    inside = (ys >= rows_at - half) & (ys < rows_at + half) & (xs >= cols_at - half) & (xs < cols_at + half)
    return images * (~inside)[:, None].to(images.dtype)


def stream_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A generator for one (seed, epoch, stream): the same batches however the run was resumed."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) * 1_009 + int(stream))


def batches(
    data: ImageSet,
    batch_size: int,
    generator: torch.Generator,
    augment: bool,
    shuffle: bool = True,
    cycle: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised (images, labels) batches in a random order; with `cycle` it starts a new
    permutation when one pass ends (for the architecture stream, which follows the weight stream's
    step count)."""
    padding = data.images.shape[-1] // 8
    device = data.images.device
    while True:
        order = torch.randperm(len(data), generator=generator) if shuffle else torch.arange(len(data))
        starts = range(0, len(data), batch_size)
        if augment:
            # Every batch's crop and flip numbers of this pass, drawn in the order a batch-by-batch
            # draw would take them (the same augmentation), then moved to the device in one copy:
            # on a GPU no batch waits for a host-to-device transfer.
            draws = [crop_flip_draws(len(order[s : s + batch_size]), generator, padding) for s in starts]
            offsets = torch.cat([o for o, _ in draws], dim=1).to(device, non_blocking=True)
            flips = torch.cat([f for _, f in draws]).to(device, non_blocking=True)
        order = order.to(device, non_blocking=True)
        for start in starts:
            index = order[start : start + batch_size]
            images = data.images[index]
            if augment:
                stop = start + len(index)
                images = random_crop_flip(images, None, padding, (offsets[:, start:stop], flips[start:stop]))
            yield normalize(images, dtype), data.labels[index]
        if not cycle:
            return
