"""utility.json: accuracies and per-class metrics from exported logits, checked by hand."""

import numpy as np

from mia_lightning.utility import model_utility, utility_report


def test_model_utility_by_hand():
    # 6 samples, 3 classes; the model trained on the first three and gets them all right.
    labels = np.array([0, 1, 2, 0, 1, 2])
    predicted = np.array([0, 1, 2, 0, 2, 2])
    logits = np.eye(3, dtype=np.float32)[predicted][:, None, :]
    members = np.array([True, True, True, False, False, False])
    utility = model_utility(logits, labels, members)
    assert utility["train_accuracy"] == 1.0
    assert np.isclose(utility["test_accuracy"], 2 / 3)
    assert utility["n_test"] == 3
    assert utility["confusion"].tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]


def test_report_pools_targets_and_handles_empty_classes():
    labels = np.array([0, 1, 0, 1])
    keep = np.array([[True, True, False, False], [False, False, True, True]])
    logits = {0: np.array([[5, 0], [0, 5], [5, 0], [5, 0]], np.float32)[:, None],   # held-out (2, 3): right, wrong
              1: np.array([[5, 0], [5, 0], [5, 0], [0, 5]], np.float32)[:, None]}   # held-out (0, 1): right, wrong
    report = utility_report(lambda i: logits[i], labels, keep, np.array([0, 1]))
    assert report["test_accuracy"] == 0.5 and report["train_accuracy"] == 1.0 and report["train_test_gap"] == 0.5
    assert report["confusion_matrix"] == [[2, 0], [2, 0]]
    assert report["per_class"]["precision"] == [0.5, None]        # class 1 never predicted: undefined, not 0
    assert report["per_class"]["recall"] == [1.0, 0.0]
    assert np.isclose(report["per_class"]["f1"][0], 2 / 3)


def test_utility_line_reads_well_for_one_target_and_many():
    from mia_lightning.report.cells import utility_line

    base = {"test_accuracy": 0.8, "test_accuracy_std": 0.0, "train_accuracy": 1.0, "train_test_gap": 0.2}
    assert utility_line({**base, "targets": [3]}) == "utility of target 3: test accuracy 80.00%, train 100.00%, gap 20.00 points"
    assert utility_line({**base, "targets": [0, 1], "test_accuracy_std": 0.015}) == (
        "utility of the 2 targets: test accuracy 80.00% (sd 1.50 over targets), train 100.00%, gap 20.00 points")
    no_held_out = {**base, "targets": [0, 1], "test_accuracy": None, "test_accuracy_std": None, "train_test_gap": None}  # utility.json's nulls
    assert utility_line(no_held_out) == "utility of the 2 targets: test accuracy - (sd - over targets), train 100.00%, gap -"
