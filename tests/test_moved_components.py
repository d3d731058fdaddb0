"""Class paths stored before a module moved (config.yaml, plan.json, checkpoints) still resolve."""

import importlib
import importlib.util

import lightning as L
import pytest

from mia_lightning.contract.components import MOVED_MODULES, ComponentSpec, current_class_path, resolve_class, with_current_class_paths
from mia_lightning.defences.dp_sgd import DPSGD
from mia_lightning.errors import MiaError
from mia_lightning.farm.runner import differing_keys


def test_every_moved_module_is_gone_and_its_new_home_imports():
    for old, new in MOVED_MODULES.items():
        assert importlib.util.find_spec(old) is None, f"{old} still exists: drop it from MOVED_MODULES or delete it"
        importlib.import_module(new)


def test_an_old_dp_sgd_class_path_builds_the_callback_from_its_new_module():
    assert current_class_path("mia_lightning.privacy.dp_sgd.DPSGD") == "mia_lightning.defences.dp_sgd.DPSGD"
    assert current_class_path("mia_lightning.models.tabular_mlp.TabularMLP") == "mia_lightning.models.tabular_mlp.TabularMLP"
    assert resolve_class("mia_lightning.privacy.dp_sgd.DPSGD", L.Callback, ("mia_lightning",)) is DPSGD
    callback = ComponentSpec("mia_lightning.privacy.dp_sgd.DPSGD", {"target_epsilon": 8.0}, base=L.Callback, trusted=("mia_lightning",)).build()
    assert isinstance(callback, DPSGD)


def test_a_class_the_moved_module_never_had_fails_in_one_line_naming_the_new_path():
    with pytest.raises(MiaError, match=r"mia_lightning\.privacy\.dp_sgd\.Nope.*moved: mia_lightning\.defences\.dp_sgd\.Nope.*cannot import") as err:
        resolve_class("mia_lightning.privacy.dp_sgd.Nope", L.Callback, ("mia_lightning",))
    assert "\n" not in str(err.value)


def test_a_stored_recipe_with_the_old_path_matches_the_recipe_with_the_new_one():
    callbacks = lambda path: {"recipe": {"callbacks": [{"class_path": path, "init_args": {"target_epsilon": 8.0}}],
                                         "model": {"class_path": "mia_lightning.models.lstm.LSTMClassifier"}}}
    stored, current = callbacks("mia_lightning.privacy.dp_sgd.DPSGD"), callbacks("mia_lightning.defences.dp_sgd.DPSGD")
    assert differing_keys(stored, current)  # the raw payloads differ ...
    assert differing_keys(with_current_class_paths(stored), current) == []  # ... the updated one does not
    assert stored["recipe"]["callbacks"][0]["class_path"] == "mia_lightning.privacy.dp_sgd.DPSGD"  # the stored payload is not modified
