import math

import numpy as np
import pytest

from cov3d.training.metrics import presence_scores, severity_f1


def test_presence_scores():
    targets = np.array([0, 0, 1, 3, 5, 0])
    probs = np.array([0.1, 0.6, 0.9, 0.7, 0.2, 0.3])
    scores = presence_scores(probs, targets)
    # truth 0 0 1 1 1 0, predicted 0 1 1 1 0 0: 4/6 right, F1 = 2/3 for both classes
    assert scores["presence_accuracy"] == pytest.approx(4 / 6)
    assert scores["presence_f1"] == pytest.approx(2 / 3)


def test_severity_f1_only_counts_labelled_scans():
    targets = np.array([1, 2, 0, 5, 4])
    severity = np.array([[0.9, 0.05, 0.03, 0.02], [0.1, 0.8, 0.05, 0.05], [1, 0, 0, 0], [1, 0, 0, 0],
                         [0.1, 0.1, 0.7, 0.1]])
    # labelled: mild→mild, moderate→moderate, critical→severe
    expected = np.mean([1.0, 1.0, 0.0, 0.0])  # mild, moderate, severe (predicted, absent), critical
    assert severity_f1(severity, targets) == pytest.approx(expected)
    assert math.isnan(severity_f1(severity[:1], np.array([0])))
