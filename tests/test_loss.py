import math

import pytest
import torch

from cov3d.labels import COVID_UNKNOWN, class_weights, target_of
from cov3d.training.loss import Cov3dLoss, neighbour_smoothing, probabilities


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def log_softmax(z):
    top = max(z)
    total = sum(math.exp(v - top) for v in z)
    return [v - top - math.log(total) for v in z]


def bce(x, y):
    p = sigmoid(x)
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


Z = [0.3, -1.2, 0.8, 0.1, -0.4]  # severity logits: non-covid, mild, moderate, severe, critical
X = 0.7  # presence logit
W = (1.5, 0.75)  # class weights: non-covid, covid


def logits(x=X, z=Z):
    return torch.tensor([[x, *z]])


def loss_of(target, lam, eps_p=0.1, eps_s=0.0):
    loss = Cov3dLoss(lam, W, presence_smoothing=eps_p, severity_smoothing=eps_s)
    return float(loss(logits(), torch.tensor([target])))


def test_target_of():
    assert target_of("non-covid", None) == 0
    assert target_of("covid", 3) == 3
    assert target_of("covid", None) == COVID_UNKNOWN
    with pytest.raises(ValueError):
        target_of("", None)


def test_class_weights_balance_the_classes():
    assert class_weights([0, 0, 0, 1, 5]) == pytest.approx((5 / 6, 5 / 4))
    with pytest.raises(ValueError):
        class_weights([1, 2, 5])


def test_presence_loss_with_label_smoothing_eq2():
    # λ = 0: only weighted BCE with targets 1 - ε_p (covid) and ε_p (non-covid)
    assert loss_of(2, lam=0.0) == pytest.approx(W[1] * bce(X, 0.9), rel=1e-6)
    assert loss_of(0, lam=0.0) == pytest.approx(W[0] * bce(X, 0.1), rel=1e-6)
    assert loss_of(COVID_UNKNOWN, lam=0.0, eps_p=0.0) == pytest.approx(W[1] * bce(X, 1.0), rel=1e-6)


def test_severity_cross_entropy_eq4():
    ls = log_softmax(Z)
    assert loss_of(3, lam=1.0) == pytest.approx(-W[1] * ls[3], rel=1e-6)
    assert loss_of(0, lam=1.0) == pytest.approx(-W[0] * ls[0], rel=1e-6)


def test_severity_neighbour_smoothing():
    ls = log_softmax(Z)
    eps = 0.2
    # mild: 0.8 on mild, 0.1 on each neighbour (non-covid, moderate)
    assert loss_of(1, 1.0, eps_s=eps) == pytest.approx(-W[1] * (0.8 * ls[1] + 0.1 * ls[0] + 0.1 * ls[2]), rel=1e-6)
    # non-covid neighbours mild only: it gets all of ε
    assert loss_of(0, 1.0, eps_s=eps) == pytest.approx(-W[0] * (0.8 * ls[0] + 0.2 * ls[1]), rel=1e-6)
    # critical has one neighbour, severe
    assert loss_of(4, 1.0, eps_s=eps) == pytest.approx(-W[1] * (0.8 * ls[4] + 0.2 * ls[3]), rel=1e-6)


def test_unlabelled_positive_eq5():
    ls = log_softmax(Z)
    expected = -W[1] * math.log(sum(math.exp(v) for v in ls[1:]))
    assert loss_of(COVID_UNKNOWN, lam=1.0) == pytest.approx(expected, rel=1e-6)
    # smoothing does not touch the unlabelled case
    assert loss_of(COVID_UNKNOWN, lam=1.0, eps_s=0.3) == pytest.approx(expected, rel=1e-6)


def test_combined_loss_eq6():
    ls = log_softmax(Z)
    lam = 0.3
    expected = (1 - lam) * W[1] * bce(X, 0.9) + lam * -W[1] * ls[2]
    assert loss_of(2, lam) == pytest.approx(expected, rel=1e-6)


def test_every_item_counts_by_its_own_label_whatever_the_batch():
    loss = Cov3dLoss(0.5, W)
    batch = torch.tensor([[0.1, 0.2, -0.3, 0.5, 0.0, 1.0], [1.0, -0.5, 0.4, 0.2, 0.3, -0.1],
                          [-0.4, 0.9, 0.1, -0.2, 0.6, 0.3]])
    targets = torch.tensor([COVID_UNKNOWN, 2, 0])
    together = loss.per_item(batch, targets)
    alone = torch.cat([loss.per_item(batch[i : i + 1], targets[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone)
    assert float(loss(batch, targets)) == pytest.approx(float(alone.mean()))
    assert together[0] > 0  # the unlabelled positive is not dropped


def test_lambda_out_of_range():
    with pytest.raises(ValueError, match="lambda"):
        Cov3dLoss(1.5)


def test_neighbour_smoothing_rows_are_distributions():
    matrix = neighbour_smoothing(0.3)
    torch.testing.assert_close(matrix.sum(dim=1), torch.ones(5))
    assert matrix[2].tolist() == pytest.approx([0, 0.15, 0.7, 0.15, 0])


def test_activation_and_decodes():
    loss = Cov3dLoss(0.1)
    probs = loss.activation(logits())
    assert probs.shape == (1, 6)
    assert float(probs[0, 0]) == pytest.approx(sigmoid(X))
    assert float(probs[0, 1:].sum()) == pytest.approx(1.0)
    presence, severity = loss.decodes(logits())
    assert int(presence) == 1 and int(severity) == 2  # moderate has the largest covid logit


def test_lambda_one_presence_is_the_severity_sum():
    probs = probabilities(logits(), lam=1.0)
    soft = torch.softmax(torch.tensor(Z), 0)
    assert float(probs[0, 0]) == pytest.approx(float(soft[1:].sum()))


def test_inverse_frequency_severity_weights_on_hand_made_counts():
    from cov3d.labels import severity_class_weights

    # 4 non-covid, 2 mild, 1 severe, 1 unknown; no moderate or critical: K = 4 categories, N = 8
    targets = [0, 0, 0, 0, 1, 1, 3, COVID_UNKNOWN]
    assert severity_class_weights(targets) == pytest.approx((8 / 16, 8 / 8, 0.0, 8 / 4, 0.0, 8 / 4))
    weights = severity_class_weights(targets)
    assert sum(weights[t] for t in targets) / len(targets) == pytest.approx(1.0)


def test_severity_term_takes_its_own_weights_when_given():
    ws = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0)
    loss = Cov3dLoss(1.0, W, severity_weights=ws)
    plain = Cov3dLoss(1.0, (1.0, 1.0))
    for target in (0, 2, COVID_UNKNOWN):
        t = torch.tensor([target])
        assert float(loss(logits(), t)) == pytest.approx(ws[target] * float(plain(logits(), t)), rel=1e-6)
    # the presence term keeps the presence class weights
    mixed = Cov3dLoss(0.5, W, severity_weights=ws)
    t = torch.tensor([2])
    expected = 0.5 * W[1] * bce(X, 0.9) + 0.5 * ws[2] * float(plain(logits(), t))
    assert float(mixed(logits(), t)) == pytest.approx(expected, rel=1e-6)
