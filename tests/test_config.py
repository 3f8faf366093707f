"""Configuration: presets, overrides, and errors that name the field before anything runs."""

from __future__ import annotations

import pytest

from nas.config import ConfigError, apply_overrides, parse_override
from nas.settings import SearchConfig


def error_of(**kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        SearchConfig.resolve(**kwargs)
    return info.value


def test_defaults_are_the_darts_search_settings():
    config = SearchConfig.from_dict({})
    assert config.epochs == 50 and config.batch_size == 64 and config.seed == 2
    assert config.model.channels == 16 and config.model.cells == 8 and config.model.nodes == 4
    assert config.op_names()[0] == "none" and len(config.op_names()) == 8
    assert config.weights.lr == 0.025 and config.weights.lr_min == 0.001 and config.weights.grad_clip == 5.0
    assert (
        config.alpha.lr == 3e-4 and config.arch_optim.betas == (0.5, 0.999) and config.arch_optim.weight_decay == 1e-3
    )
    assert config.target == [2, 2, 2, 2]
    assert config.loss.op_entropy.weight == 0 and config.order == "first"


def test_da2s_preset_matches_the_reference_settings():
    config = SearchConfig.resolve("da2s")
    assert config.op_names() == (
        "max_pool_3x3",
        "avg_pool_3x3",
        "skip_connect",
        "sep_conv_3x3",
        "sep_conv_5x5",
        "dil_conv_3x3",
        "dil_conv_5x5",
    )
    assert config.edge_params and config.alpha.sharpen and config.alpha.init_std == 1e-4
    assert (config.loss.op_entropy.weight, config.loss.edge_entropy.weight, config.loss.edge_count.weight) == (
        0.1,
        0.4,
        0.08,
    )
    assert config.loss.op_entropy.schedule == "linear*log_"


def test_overrides_use_dotted_keys_and_yaml_values(tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text("preset: multilevel\nepochs: 7\nmodel:\n  channels: 12\n")
    config = SearchConfig.resolve(
        file=path, overrides=["model.channels=8", "target=3 of 14", "loss.op_entropy.weight=0.2", "data.subset=1024"]
    )
    assert config.preset == "multilevel" and config.alpha_sharing == "stage"
    assert config.epochs == 7 and config.model.channels == 8
    assert config.target == "3 of 14"
    assert config.loss.op_entropy.weight == 0.2 and config.loss.op_entropy.schedule == "linear_"
    assert config.data.subset == 1024


def test_yaml_booleans_read_as_the_words_a_choice_allows():
    assert SearchConfig.resolve(overrides=["runtime.amp=off"]).runtime.amp == "off"
    err = error_of(overrides=["runtime.amp=yes"])
    assert err.field == "runtime.amp" and "'auto', 'off', 'bf16'" in str(err)


def test_command_line_preset_wins_over_the_files(tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text("preset: darts\n")
    assert SearchConfig.resolve("da2s", path).preset == "da2s"


def test_parse_override_reads_lists_and_keeps_phrases():
    assert parse_override("target=[1, 1, 2, 3]") == (["target"], [1, 1, 2, 3])
    assert parse_override("target=3 of 14") == (["target"], "3 of 14")
    assert parse_override("alpha.lr=1e-3") == (["alpha", "lr"], 1e-3)
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"),
    [
        ({"overrides": ["epoch=3"]}, "epoch", "did you mean 'epochs'"),
        ({"overrides": ["model.chanels=8"]}, "model.chanels", "did you mean 'channels'"),
        ({"overrides": ["ops=[max_pool_3x3, conv_9x9]"]}, "ops", "unknown op"),
        ({"overrides": ["ops=nasnet"]}, "ops", "darts, da2s"),
        ({"overrides": ["target=[2, 2, 2]"]}, "target", "one count per intermediate node (4"),
        ({"overrides": ["target=[3, 2, 2, 2]"]}, "target", "node 0 has 2 inputs"),
        ({"overrides": ["target=15 of 14"]}, "target", "K must be 1 to 14"),
        ({"overrides": ["target=3 of 12"]}, "target", "has 14 edges"),
        ({"overrides": ["target=three"]}, "target", "per-node list"),
        ({"overrides": ["target={normal: [2,2,2,2], middle: 3 of 14}"]}, "target.middle", "unknown level"),
        ({"overrides": ["loss.op_entropy.weight=-0.1"]}, "loss.op_entropy.weight", "must be >= 0"),
        ({"overrides": ["loss.edge_count.weight=0.1"]}, "loss.edge_count.weight", "needs edge_params"),
        (
            {"overrides": ["loss.op_entropy.schedule=linear*cosine"]},
            "loss.op_entropy.schedule",
            "unknown schedule factor 'cosine'",
        ),
        ({"overrides": ["order=third"]}, "order", "'first', 'second'"),
        ({"overrides": ["alpha_sharing=node"]}, "alpha_sharing", "'global', 'stage', 'cell'"),
        ({"overrides": ["model.channels=9"]}, "model.channels", "must be even"),
        ({"overrides": ["epochs=0"]}, "epochs", "must be >= 1"),
        ({"overrides": ["epochs=two"]}, "epochs", "expected an integer"),
        ({"overrides": ["arch_optim.lr_scale=fast"]}, "arch_optim.lr_scale", "'auto'"),
        ({"overrides": ["data.eval_split=holdout"]}, "data.eval_split", "needs data.subset below 50000"),
        ({"overrides": ["data.resolution=24"]}, "data.resolution", "32, 16, 8"),
        ({"preset": "enas"}, "preset", "darts, da2s, multilevel"),
        ({"preset": "darts", "overrides": ["beta.swap_bug=true"]}, "beta.swap_bug", "edge_params: true"),
    ],
)
def test_bad_config_names_the_field_and_what_is_allowed(kwargs, field, fragment):
    err = error_of(**kwargs)
    assert err.field == field
    assert fragment in str(err)


def test_missing_config_file_is_a_config_error(tmp_path):
    err = error_of(file=str(tmp_path / "nope.yaml"))
    assert err.field == "config" and "file not found" in str(err)


def test_runtime_defaults_follow_the_device():
    """channels-last on the CPU only; float32 searches; a fused CUDA search refuses channels-last."""
    import torch

    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # device objects only: no GPU needed
    runtime = SearchConfig.from_dict({}).runtime
    assert runtime.memory_format(cpu) == torch.channels_last
    assert runtime.memory_format(cuda) == torch.contiguous_format
    assert runtime.autocast_dtype(cpu) is None and runtime.autocast_dtype(cuda, "search") is None
    asked = SearchConfig.resolve(overrides=["runtime.channels_last=true"]).runtime
    assert asked.memory_format(cpu) == torch.channels_last
    with pytest.raises(ConfigError) as info:
        asked.memory_format(cuda)
    assert info.value.field == "runtime.channels_last" and "cuDNN" in str(info.value)
    plain = SearchConfig.resolve(overrides=["runtime.channels_last=true", "runtime.fused=false"]).runtime
    assert plain.memory_format(cuda) == torch.channels_last
    assert SearchConfig.resolve(overrides=["runtime.amp=bf16"]).runtime.autocast_dtype(cpu) == torch.bfloat16


def test_accuracy_is_measured_on_held_out_images_unless_valid_is_asked_for():
    full = SearchConfig.from_dict({}).data
    assert full.eval_split == "test" and full.eval_subset is None  # the 25k/25k split leaves no training image
    subset = SearchConfig.resolve(overrides=["data.subset=8000"]).data
    # as many held-out images as one half of the search trains on (4,000), at least 1,000, at most 10,000
    assert subset.eval_split == "holdout" and subset.eval_subset == 4_000
    assert SearchConfig.resolve(overrides=["data.subset=256"]).data.eval_subset == 1_000
    assert SearchConfig.resolve(overrides=["data.subset=30000"]).data.eval_subset == 10_000
    small = SearchConfig.resolve(overrides=["data.subset=45000"]).data
    assert small.eval_split == "holdout" and small.eval_subset == 5_000
    asked = SearchConfig.resolve(overrides=["data.eval_split=valid"]).data
    assert asked.eval_split == "valid"
    # resolved once: the written config says where it measured, and reads back the same
    assert SearchConfig.from_dict(SearchConfig.resolve(overrides=["data.subset=8000"]).to_dict()).data == subset
