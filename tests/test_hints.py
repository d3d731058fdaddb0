"""Hints name the real cause: an attack output given as an attack, a study root given as an experiment, DP-SGD errors without library noise."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from synthetic import write_synthetic_experiment

from mia_lightning.cli import attack_main
from mia_lightning.errors import MiaError


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and err.count("\n") == 0 and "Traceback" not in err, err
    return err


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    return write_synthetic_experiment(tmp_path / "exp", n_models=4, n_samples=20, seed=3)


@pytest.mark.parametrize(
    "name, phrase",
    [
        ("lira_online", "'lira_online' is an output of the 'lira' attack (it writes lira_online, lira_online_fixed, lira_offline, "
                        "lira_offline_fixed, global_threshold); use --attack lira"),
        ("rmia_offline", "'rmia_offline' is an output of the 'rmia' attack (it writes rmia_online, rmia_offline); use --attack rmia"),
        ("lirra", "unknown attack 'lirra'; did you mean lira or ulira? available:"),
        ("entropy", "'entropy' is an output of the 'thresholds' attack"),
        ("nothing_like_it", "unknown attack 'nothing_like_it'; available:"),
    ],
)
def test_an_unknown_attack_name_says_what_to_type(experiment, capsys, name, phrase):
    assert attack_main(["--experiment", str(experiment), "--attack", name]) == 2
    assert phrase in one_error_line(capsys)
    assert not (experiment / "attacks").exists()


def test_a_study_root_points_at_its_settings(tmp_path, capsys):
    study = tmp_path / "study"
    write_synthetic_experiment(study / "settings" / "S2_C5", n_models=4, n_samples=20, seed=1)
    (study / "study.json").write_text(json.dumps({"grid": {}}))
    assert attack_main(["--experiment", str(study), "--attack", "thresholds"]) == 2
    err = one_error_line(capsys)
    assert "this is a study (study.json), not one experiment; its 1 experiments are under settings/<setting>/" in err
    assert str(study / "settings" / "S2_C5") in err and "keep.npy" not in err


def test_a_file_given_as_the_experiment_is_named_a_file(experiment, capsys):
    assert attack_main(["--experiment", str(experiment / "keep.npy")]) == 2
    err = one_error_line(capsys)
    assert f"{experiment / 'keep.npy'}: a file, not an experiment directory" in err and "no such" not in err


def test_a_folder_of_experiments_lists_them_and_names_the_option(tmp_path, capsys):
    for name, marker in (("b_exp", "plan.json"), ("a_exp", "keep.npy"), ("d_exp", "plan.json"), ("c_exp", "keep.npy")):
        (tmp_path / name).mkdir()
        (tmp_path / name / marker).write_text("{}")
    (tmp_path / "not_one").mkdir()
    assert attack_main(["--experiment", str(tmp_path)]) == 2
    assert (f"{tmp_path}: not one experiment but a folder of 4 experiments (a_exp, b_exp, c_exp, ...): point --experiment at one of them, "
            f"e.g. --experiment {tmp_path / 'a_exp'}") in one_error_line(capsys)


def test_an_unreachable_dp_budget_says_so_without_accountant_warnings():
    from mia_lightning.defences.dp_sgd import noise_for_budget

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning the accountant emits fails the test
        with pytest.raises(MiaError, match="cannot be reached in 100000 steps"):
            noise_for_budget(0.1, 1e-5, 0.5, 100_000, "rdp")


def test_the_rdp_floor_is_the_conversion_of_zero_rdp_and_bounds_the_accountant_at_any_noise():
    """Balle et al. 2020, Thm 21 at RDP 0 over opacus' orders; epsilon at any noise stays above it and a huge noise comes within 1e-6."""
    from opacus.accountants import create_accountant

    from mia_lightning.defences.dp_sgd import rdp_epsilon_floor

    orders = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=np.float64)
    floor = rdp_epsilon_floor(1e-5)
    assert floor == pytest.approx(np.min(-(np.log(1e-5) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)), rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for sigma in (1.0, 10.0, 1e4):
            accountant = create_accountant("rdp")
            accountant.history = [(sigma, 0.01, 10)]
            assert accountant.get_epsilon(delta=1e-5) >= floor
    assert accountant.get_epsilon(delta=1e-5) < floor + 1e-6
