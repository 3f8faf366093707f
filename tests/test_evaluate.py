"""Evaluation networks and training from scratch (docs/science.md §4)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import real_data_root

from nas import evaluate
from nas.data import DataNotFoundError, cutout
from nas.evaluate import EvalConfig, epoch_lr, make_eval_data, network_for, run_evaluation
from nas.genotype import PUBLISHED, CellGenotype, Genotype
from nas.network import EvalCell, EvalNetwork, cell_levels, network_info

# (genotype, dataset) -> published parameters (M) and multiply-adds (M, ImageNet only).
PUBLISHED_FIGURES = {
    ("darts_v1", "cifar10"): (3.3, None),
    ("darts_v2", "cifar10"): (3.3, None),
    ("darts_v2", "imagenet"): (4.7, 574),
    ("pdarts", "cifar10"): (3.4, None),
    ("pdarts", "imagenet"): (4.9, 557),
    ("pc_darts_cifar", "cifar10"): (3.6, None),
    ("pc_darts_imagenet", "imagenet"): (5.3, 597),
}


@pytest.mark.parametrize(("name", "dataset"), list(PUBLISHED_FIGURES))
def test_published_genotypes_match_their_papers(name, dataset):
    params, macs = PUBLISHED_FIGURES[(name, dataset)]
    info = network_info(PUBLISHED[name], dataset)
    assert info["params"] / 1e6 == pytest.approx(params, rel=0.05)
    if macs is not None:
        # Counting only convolutions and linear layers gives 2-8 % below the papers' figures
        # (quark0/darts#46 reports the same for DARTS); all stay in the 600M mobile setting.
        assert 0.9 * macs <= info["macs"] / 1e6 <= macs and info["macs"] < 600e6


def test_darts_v2_has_exactly_the_official_parameter_count():
    assert network_info(PUBLISHED["darts_v2"], "cifar10")["params"] == 3_349_342  # "param size = 3.349342MB"


def test_info_command_prints_numbers_as_json(tmp_path):
    path = tmp_path / "g.json"
    PUBLISHED["pdarts"].save(path)
    done = subprocess.run(
        [sys.executable, "-m", "nas", "info", str(path), "--dataset", "imagenet", "--json"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert isinstance(info["params"], int) and isinstance(info["macs"], int) and info["mobile_setting_ok"] is True


def test_over_600m_multiply_adds_is_flagged():
    info = subprocess.run(
        [sys.executable, "-m", "nas", "info", "darts_v2", "--dataset", "imagenet", "--channels", "64", "--json"],
        capture_output=True,
        text=True,
    )
    assert json.loads(info.stdout)["mobile_setting_ok"] is False


def test_auxiliary_head_at_two_thirds_and_only_in_training():
    model = EvalNetwork(PUBLISHED["darts_v2"], channels=8, layers=20)
    assert model.auxiliary_after == 13
    logits, aux = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and aux.shape == (2, 10)
    model.eval()
    assert model(torch.randn(2, 3, 32, 32))[1] is None


def test_drop_path_spares_identity_ops():
    torch.manual_seed(0)
    skips = CellGenotype(((("skip_connect", 0), ("skip_connect", 1)),) * 2, (2, 3))
    convs = CellGenotype(((("sep_conv_3x3", 0), ("sep_conv_3x3", 1)),) * 2, (2, 3))
    x0, x1 = torch.randn(4, 8, 8, 8), torch.randn(4, 8, 8, 8)
    for genotype, random in ((skips, False), (convs, True)):
        cell = EvalCell(genotype, 8, 8, 8, reduction_prev=False).train()
        a, b = cell(x0, x1, drop_prob=0.5), cell(x0, x1, drop_prob=0.5)
        assert (not torch.equal(a, b)) == random


def test_multi_level_genotype_maps_levels_onto_stages():
    cell = PUBLISHED["darts_v2"].normal
    red = PUBLISHED["darts_v2"].reduce
    genotype = Genotype({"normal1": cell, "reduce1": red, "normal2": cell, "reduce2": red, "normal3": cell}, "stage")
    assert cell_levels(genotype, 20) == ["normal1"] * 6 + ["reduce1"] + ["normal2"] * 6 + ["reduce2"] + ["normal3"] * 6
    per_cell = Genotype({f"cell{i}": (red if i in (2, 5) else cell) for i in range(8)}, "cell")
    levels = cell_levels(per_cell, 20)
    assert levels[6] == "cell2" and levels[13] == "cell5" and levels[:6] == ["cell0"] * 3 + ["cell1"] * 3
    EvalNetwork(genotype, channels=8, layers=20).eval()(torch.randn(1, 3, 32, 32))


def test_cutout_zeroes_one_square_clipped_at_the_border():
    g = torch.Generator().manual_seed(0)
    out = cutout(torch.ones(64, 3, 32, 32), g, 16)
    zeros = (out[:, 0] == 0).sum(dim=(1, 2))
    assert zeros.max() == 256 and zeros.min() >= 64  # a corner centre keeps a quarter
    assert torch.equal(out[:, 0] == 0, out[:, 2] == 0)  # the same square in every channel


def tiny(**extra) -> EvalConfig:
    settings = ["epochs=2", "layers=5", "channels=8", "batch_size=64", "data.subset=512", "data.test_subset=256",
                "device=cpu", "data.download=false"]  # fmt: skip
    settings += [f"{k}={v}" for k, v in extra.items()]
    return EvalConfig.resolve("cifar10", overrides=settings, data_root=real_data_root())


needs_cifar = pytest.mark.skipif(real_data_root() is None, reason="needs CIFAR-10 at $NAS_DATA_ROOT")


@needs_cifar
def test_a_few_epochs_reduce_the_loss_on_real_data():
    result = run_evaluation(PUBLISHED["darts_v2"], tiny(epochs=3))
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.metrics["test_top1_error"] < 90.0  # better than chance on 256 test images
    assert [round(h["drop_path"], 4) for h in result.history] == [0.0, round(0.2 / 3, 4), round(0.4 / 3, 4)]


@needs_cifar
def test_resume_equals_no_stop(tmp_path):
    class Stop(Exception):
        pass

    def stop(event):
        if event.epoch == 1:
            raise Stop

    config = tiny()
    straight = run_evaluation(PUBLISHED["darts_v1"], config, tmp_path / "a")
    with pytest.raises(Stop):
        run_evaluation(PUBLISHED["darts_v1"], config, tmp_path / "b", callbacks=[stop])
    resumed = run_evaluation(PUBLISHED["darts_v1"], config, tmp_path / "b")
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    def timeless(history):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert timeless(resumed.history) == timeless(straight.history)
    # the training's time counts the epoch run before the stop as well
    assert resumed.info["seconds"] >= sum(h["seconds"] for h in resumed.history)
    assert json.loads((tmp_path / "b" / "result.json").read_text())["metrics"] == straight.metrics


def recomputed_error(genotype, config, out) -> float:
    """The test error of the network saved in `out`'s checkpoint, measured again from scratch."""
    model = network_for(genotype, config)
    model.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=True)["model"])
    return 100.0 - evaluate.test_accuracy(model, make_eval_data(config, torch.device("cpu")))[0]


def test_cifar_at_16x16_trains_on_average_pooled_images(monkeypatch, tmp_path):
    """The reduced-scale protocol: 2x2 average-pooled CIFAR images, crops padded by 2 (4 at 32x32)."""
    seen, paddings = [], []
    forward = EvalNetwork.forward

    def spy(self, x, *args, **kwargs):
        seen.append(tuple(x.shape[-2:]))
        return forward(self, x, *args, **kwargs)

    import nas.eval_data as eval_data

    crop = eval_data.random_crop_flip

    def spy_crop(images, generator, padding, *args):
        paddings.append(padding)
        return crop(images, generator, padding, *args)

    monkeypatch.setattr(EvalNetwork, "forward", spy)
    monkeypatch.setattr(eval_data, "random_crop_flip", spy_crop)
    config = EvalConfig.resolve(
        "cifar10",
        overrides=[
            "epochs=1",
            "layers=5",
            "channels=8",
            "data.subset=128",
            "data.test_subset=64",
            "device=cpu",
            "data.synthetic=true",
            "image_size=16",
            "cutout=8",
            "auxiliary=false",
        ],
    )
    result = run_evaluation(PUBLISHED["darts_v2"], config, tmp_path)
    assert set(seen) == {(16, 16)} and set(paddings) == {2}
    # the error reported is that of the trained network, on the 64 test images (a multiple of 100/64)
    assert result.metrics["test_top1_error"] == pytest.approx(recomputed_error(PUBLISHED["darts_v2"], config, tmp_path))
    assert (result.metrics["test_top1_error"] * 64 / 100) == pytest.approx(
        round(result.metrics["test_top1_error"] * 0.64)
    )


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"image_size": 24}, "image_size"),
        ({"image_size": 16, "auxiliary": False}, "cutout"),
        ({"image_size": 16, "cutout": 8}, "auxiliary"),
    ],
)
def test_reduced_cifar_sizes_are_checked(settings, field):
    from nas.config import ConfigError

    with pytest.raises(ConfigError) as err:
        EvalConfig.resolve("cifar10", settings)
    assert err.value.field == field


def test_imagenet_through_imagefolder(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label in range(3):
            folder = tmp_path / "imagenet" / split / f"n0{label}"
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.JPEG")
    config = EvalConfig.resolve(
        "imagenet",
        overrides=[
            "epochs=1",
            "layers=5",
            "channels=8",
            "batch_size=4",
            "image_size=32",
            "data.workers=0",
            "device=cpu",
            "auxiliary=false",  # at this toy size: the head needs the 14x14 map of 224x224 inputs
        ],
        data_root=str(tmp_path / "imagenet"),
    )
    assert config.label_smoothing == 0.1 and config.lr_schedule == "step" and config.weight_decay == 3e-5
    result = run_evaluation(PUBLISHED["darts_v2"], config, tmp_path / "out")
    assert result.history[0]["lr"] == pytest.approx(0.1 * 0.97)
    # the error of the trained network on the 12 validation JPEGs, measured again through ImageFolder
    error = result.metrics["test_top1_error"]
    assert error == pytest.approx(recomputed_error(PUBLISHED["darts_v2"], config, tmp_path / "out"))
    assert error * 12 / 100 == pytest.approx(round(error * 12 / 100))
    missing = EvalConfig.resolve("imagenet", overrides=["device=cpu"], data_root=str(tmp_path / "nowhere"))
    with pytest.raises(DataNotFoundError, match="nowhere/train"):
        run_evaluation(PUBLISHED["darts_v2"], missing)


def test_learning_rate_scaled_with_the_global_batch_and_warmed_up():
    config = EvalConfig.resolve("imagenet", {"batch_size": 1024, "lr_scaling": "linear", "warmup_epochs": 5})
    assert config.peak_lr() == pytest.approx(0.1 * 1024 / 128)  # the protocol's batch is 128
    assert epoch_lr(config, 1) == pytest.approx(0.8 * 0.97 * 1 / 5)  # 1/5 of the schedule's rate
    assert epoch_lr(config, 4) == pytest.approx(0.8 * 0.97**4 * 4 / 5)
    assert epoch_lr(config, 5) == pytest.approx(0.8 * 0.97**5) and epoch_lr(config, 6) == pytest.approx(0.8 * 0.97**6)
    protocol = EvalConfig.resolve("cifar10")  # no scaling, no warm-up: the reference's cosine
    assert protocol.peak_lr() == 0.025 and epoch_lr(protocol, 300) == pytest.approx(
        0.025 * 0.5 * (1 + math.cos(math.pi * 300 / 600))
    )
    assert EvalConfig.resolve("cifar10", {"batch_size": 768}).peak_lr() == 0.025  # scaling only when asked


def test_batchnorm_synchronised_when_a_workers_part_is_below_the_protocols_batch():
    protocol = EvalConfig.resolve("cifar10")  # the global batch 96
    assert not protocol.synchronised_bn(1) and protocol.synchronised_bn(8)  # 12 images each
    assert not EvalConfig.resolve("cifar10", {"batch_size": 768}).synchronised_bn(8)  # 96 each
    assert EvalConfig.resolve("cifar10", {"batch_size": 768, "sync_bn": True}).synchronised_bn(8)
    assert not EvalConfig.resolve("cifar10", {"sync_bn": False}).synchronised_bn(8)
    assert EvalConfig.resolve("imagenet", {"batch_size": 512}).synchronised_bn(8)  # 64 < 128
