"""The experiments pin what they measure: every SPARO configuration states each read-out flag the configurations
vary, so that a later change of a package default cannot change a configuration's command."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("sklearn")  # the experiments' data sets come from scikit-learn

import main_dino  # noqa: E402
from experiments import retrofit, slot_ablation, slot_causes  # noqa: E402

DATA = slot_ablation.DataSet("digits", Path("/nowhere"), "unused", 1)
SPARO_CONFIGS = (slot_ablation.DEFAULT, *slot_ablation.SINGLE_OPTIONS, retrofit.RETROFIT_BEFORE, *retrofit.VARIANTS,
                 retrofit.SCRATCH)


def parsed(config: slot_ablation.Config):
    return main_dino.parse_args(slot_ablation.training_argv(DATA, config, 0, Path("/nowhere/run")))


def same(parsed_value, stated: str) -> bool:
    if isinstance(parsed_value, bool):
        return parsed_value == (stated == "true")
    if isinstance(parsed_value, (int, float)):
        return float(parsed_value) == float(stated)
    return str(parsed_value) == stated


@pytest.mark.parametrize("config", SPARO_CONFIGS, ids=lambda config: config.name)
def test_every_sparo_configuration_states_every_readout_flag(config):
    stated = dict(zip(config.flags[::2], config.flags[1::2]))
    assert set(slot_ablation.PAPER_READOUT) <= set(stated)
    args = parsed(config)
    for flag, value in stated.items():
        assert same(getattr(args, flag[2:]), value), flag


def test_the_baselines_measure_what_the_results_were_measured_with():
    # The ablation's "default" is the paper's initialisation (key gain 1), whatever the package default is now.
    assert parsed(slot_ablation.DEFAULT).sparo_key_init_gain == 1.0
    assert parsed(slot_ablation.DEFAULT).sparo_query_init_std == 1.0
    key_gain_4 = next(c for c in slot_ablation.SINGLE_OPTIONS if c.name == "key_gain_4")
    assert parsed(key_gain_4).sparo_key_init_gain == 4.0 and key_gain_4.changes == ("--sparo_key_init_gain", "4")
    # The retrofit results were measured with key gain 4 (checked by rerunning a scratch run exactly).
    assert parsed(retrofit.SCRATCH).sparo_key_init_gain == 4.0
    assert parsed(retrofit.RETROFIT_BEFORE).sparo_key_init_gain == 4.0
    assert parsed(retrofit.RETROFIT_BEFORE).readout_replace_blocks == 1
    assert parsed(retrofit.RETROFIT_BEFORE).freeze_blocks == parsed(retrofit.RETROFIT).freeze_blocks == "all"
    assert parsed(slot_ablation.CLS).readout == "cls" and not slot_ablation.CLS.is_sparo
    assert slot_causes.VIT_SMALL_SPARO["sparo_slots"] == 64


def test_a_combination_keeps_every_option_it_combines():
    options = {c.name: c for c in slot_ablation.SINGLE_OPTIONS}
    combined = slot_ablation.paper_readout_with(*options["query_std_4"].changes, *options["no_weight_decay"].changes)
    stated = dict(zip(combined[::2], combined[1::2]))
    assert stated["--sparo_query_init_std"] == "4" and stated["--sparo_weight_decay"] == "false"
    assert stated["--sparo_key_init_gain"] == "1"
    with pytest.raises(ValueError, match="--sparo_slots"):
        slot_ablation.paper_readout_with("--sparo_slots", "8")
