"""SoKD's DAFA feature refiner (kdkit.refiners.dafa) and the engine's feature-refiner hook: operations by
hand, identity at probability 0, the estimators' gradients (Eq. 8-10), the search schedule (policy
fixed outside its epochs, student fixed during a policy update), exact resume, and config errors."""

from __future__ import annotations

import math

import pytest
import torch
from test_engine import TINY_DATA
from test_refining import check_resume_is_exact, records

from kdkit.config import load_config
from kdkit.engine.build import build_run
from kdkit.engine.callbacks import Callback
from kdkit.errors import KdkitError
from kdkit.refiners import dafa_ops
from kdkit.refiners.dafa import DAFARefiner
from kdkit.terms.base import StepView


def rand_row(sign: float = 0.9, y: float = 0.5, x: float = 0.5, channels=()) -> torch.Tensor:
    return torch.tensor([[sign, y, x, 0.0, *channels]])


def test_geometric_ops_by_hand():
    f = torch.arange(16.0).view(1, 1, 4, 4)
    one = torch.tensor(1.0)
    # m = 1: a shift of a quarter of the side, one cell of 4; sign + moves the content right / down
    right = dafa_ops.translate_x(f, one, rand_row(0.9))
    assert torch.allclose(right[..., 1:], f[..., :-1], atol=1e-5) and right[..., 0].abs().max() < 1e-6
    up = dafa_ops.translate_y(f, one, rand_row(0.1))
    assert torch.allclose(up[..., :-1, :], f[..., 1:, :], atol=1e-5)
    for op in (dafa_ops.rotate, dafa_ops.shear_x, dafa_ops.shear_y):
        assert torch.allclose(op(f, torch.tensor(0.0), rand_row()), f, atol=1e-5)  # m = 0: identity
        assert not torch.allclose(op(f, one, rand_row()), f, atol=1e-3)


def test_cutout_channel_ops_and_noise_by_hand():
    f = torch.ones(1, 4, 8, 8)
    one = torch.tensor(1.0)
    cut = dafa_ops.cutout(f, one, rand_row(y=0.5, x=0.5, channels=[0] * 4))
    # side round(0.5 * 8) = 4, centred on cell (4, 4): rows and columns 2..5
    expected = torch.ones(8, 8)
    expected[2:6, 2:6] = 0
    assert torch.equal(cut[0, 0], expected) and torch.equal(cut[0, 3], expected)
    g = torch.arange(4.0).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    # 2 of 4 channels (the smallest rand: 1 and 3) trade places; 0 and 2 stay
    shuffled = dafa_ops.channel_shuffle(g, one, rand_row(channels=[0.9, 0.1, 0.8, 0.2]))
    assert shuffled[0, :, 0, 0].tolist() == [0.0, 3.0, 2.0, 1.0]
    # p = 0.5: channels with rand < 0.5 dropped, the others doubled
    dropped = dafa_ops.channel_drop(g, one, rand_row(channels=[0.9, 0.1, 0.8, 0.2]))
    assert dropped[0, :, 0, 0].tolist() == [0.0, 0.0, 4.0, 0.0]
    n = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    noisy = dafa_ops.gaussian_noise(g, one, rand_row(), n)
    assert torch.allclose(noisy, g + 0.5 * g.flatten().std() * n)


def bound(refiner: DAFARefiner) -> DAFARefiner:
    refiner.bind({"t": torch.Size([4, 8, 6, 6])}, ["t"])
    return refiner


class Frozen:
    """What the engine's FrozenModels gives a feature refiner's loss: taps and teacher-space targets."""

    def __init__(self, target: torch.Tensor) -> None:
        self.target = target

    def features(self, images):
        return StepView({}, {"t": images})

    def teacher_space(self, view):
        return {"t": [self.target]}


def test_every_probability_zero_is_the_identity():
    refiner = bound(DAFARefiner())
    with torch.no_grad():
        refiner.theta_p.fill_(-math.inf)
    f = torch.randn(4, 8, 6, 6)
    for seed in range(6):  # several sub-policies, hard (student step) and relaxed (search) draws
        out = refiner({"t": f, "logits": f[:, 0, 0]}, torch.Generator().manual_seed(seed), 4, 0)
        assert torch.equal(out["t"], f)
        relaxed = refiner._refine({"t": f}, torch.Generator().manual_seed(seed), 4, 0, relaxed=True)
        assert torch.equal(relaxed["t"], f)


def test_gradients_reach_weights_probabilities_and_magnitudes():
    refiner = bound(DAFARefiner())
    f, target = torch.randn(4, 8, 6, 6), torch.randn(4, 8, 6, 6)
    loss, _ = refiner.loss(f, None, torch.Generator().manual_seed(0), 4, 0, Frozen(target))
    loss.backward()
    assert (refiner.alpha.grad != 0).all()  # every weight, through the softmax of Eq. 8
    chosen = refiner.theta_p.grad.abs().sum(1).nonzero().flatten().tolist()
    assert len(chosen) == 1  # one sub-policy drawn for the batch
    assert (refiner.theta_p.grad[chosen[0]] != 0).all() and (refiner.theta_m.grad[chosen[0]] != 0).all()


def test_magnitude_gradient_is_the_straight_through_sum_of_eq10():
    """One operation applied for sure (p ~ 1): dL/dtheta_m = b * sum_ij dL/dF_hat_ij * sigmoid'(theta_m)."""
    refiner = bound(DAFARefiner(ops=["channel_drop"], k=1))
    with torch.no_grad():
        refiner.theta_p.fill_(30.0)
    f, target = torch.randn(4, 8, 6, 6), torch.randn(4, 8, 6, 6)
    generator = torch.Generator().manual_seed(3)
    loss, _ = refiner.loss(f, None, generator, 4, 0, Frozen(target))
    loss.backward()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        refined = refiner._refine({"t": f}, generator, 4, 0, relaxed=True)["t"]
    m = torch.sigmoid(refiner.theta_m.detach())[0, 0]
    expected = ((refined - target) / f.numel()).sum() * m * (1 - m)  # d(1/2 mean(.)^2)/dF_hat = (F_hat - T)/N
    assert refiner.theta_m.grad[0, 0].item() == pytest.approx(expected.item(), rel=1e-4)


def test_bind_errors_and_defaults():
    shapes = {"a": torch.Size([2, 8, 4, 4]), "e": torch.Size([2, 8])}
    refiner = DAFARefiner()
    refiner.bind(shapes, ["a", "e"])
    assert refiner.taps == ["a"]  # maps only
    with pytest.raises(KdkitError, match="no teacher feature map to refine"):
        DAFARefiner().bind(shapes, [])
    with pytest.raises(KdkitError, match="read by no term"):
        DAFARefiner(taps=["zz"]).bind(shapes, ["a"])
    with pytest.raises(KdkitError, match="no term maps the student onto teacher tap 'a'"):
        DAFARefiner(taps=["a"]).bind(shapes, [])
    with pytest.raises(KdkitError, match="ops must be distinct"):
        DAFARefiner(ops=["rotate", "spin"])
    with pytest.raises(KdkitError, match="strictly between 0 and 1"):
        DAFARefiner(init_probability=0)
    assert len(DAFARefiner().subpolicies) == 36  # 9 operations, k = 2


def dafa_config(tmp_path, name="dafa", **changes):
    config = {
        "name": name,
        "data": TINY_DATA,  # 6 steps per epoch
        "teacher": {"name": "resnet8"},
        "student": {"name": "resnet8"},
        "terms": [{"name": "ce"}, {"name": "fitnet"}, {"name": "dam"}],  # two targets for layer2
        "refiners": [
            {
                "name": "dafa",
                "optimizer": {"name": "adamw", "lr": 0.1, "weight_decay": 0.0},
                "update": {"every": 2, "epochs": [1]},
            }
        ],
        "stages": [{"epochs": 2, "optimizer": {"lr": 0.05}}],
        "runtime": {"out_dir": str(tmp_path / "runs"), "progress": False, "deterministic": True},
    }
    config.update(changes)
    return load_config(base=config)


def test_policy_learns_in_search_epochs_only_and_student_is_frozen_meanwhile(tmp_path, one_thread):
    built = build_run(dafa_config(tmp_path))
    trainer = built.trainer
    refiner = trainer.refining.slots[0].refiner
    assert refiner.taps == [trainer.distiller.terms["s0_1_fitnet"].teacher_tap]
    seen: list[tuple[int, torch.Tensor]] = []
    update = trainer.refining.update

    def checked_update(slot, *args, **kwargs):  # the student does not move during a policy update
        student = {k: v.clone() for k, v in trainer.distiller.student.state_dict().items()}
        out = update(slot, *args, **kwargs)
        assert all(torch.equal(v, student[k]) for k, v in trainer.distiller.student.state_dict().items())
        return out

    trainer.refining.update = checked_update

    class Watch(Callback):
        def on_step_end(self, trainer, stage, step):
            seen.append((step, torch.cat([p.detach().flatten() for p in refiner.parameters()]).clone()))

    trainer.callbacks.append(Watch())
    trainer.fit()
    params = dict(seen)
    assert not torch.equal(params[1], params[6])  # updates before steps 1, 3, 5 of epoch 1
    assert all(torch.equal(params[6], params[s]) for s in range(7, 13))  # fixed in epoch 2
    assert [r["step"] for r in records(trainer.run_dir, "refiner")] == [0, 2, 4]
    train = records(trainer.run_dir, "train")  # DAM's mask statistics in the log, not in the loss plot
    assert all(0 < r["dam/coverage"] < 1 and 0 <= r["dam/flat"] <= 1 for r in train)
    report = (trainer.run_dir / "report.md").read_text()
    assert "DAFA policy (refined teacher taps: layer2)" in report
    assert (trainer.run_dir / "refiner_dafa.png").is_file()


def test_resume_is_exact_with_a_feature_refiner(tmp_path, one_thread):
    state = check_resume_is_exact(tmp_path, dafa_config)
    assert state["refiners"][0]["updates"] == 1  # the policy update before step 1 (0-based 0) is in it


def test_a_run_without_a_teacher_space_term_is_refused(tmp_path):
    with pytest.raises(KdkitError, match="add a term that maps the student onto one"):
        build_run(dafa_config(tmp_path, terms=[{"name": "ce"}, {"name": "kd"}]))


def test_teacher_space_of_fitnet_and_reviewkd():
    """The targets of DAFA's consistency loss: FitNet's connector output on its teacher tap; ReviewKD's
    fused level for each teacher level that is a map (not the pooled embedding)."""
    from kdkit.terms.features import FitNet
    from kdkit.terms.review import ReviewKD, review_features

    torch.manual_seed(0)
    fitnet = FitNet(student_tap="s", teacher_tap="t")
    fitnet.bind({"s": torch.Size([2, 4, 4, 4])}, {"t": torch.Size([2, 8, 4, 4])})
    x = torch.randn(2, 4, 4, 4)
    view = StepView({"s": x}, {})
    assert fitnet.teacher_space_taps() == ["t"]
    assert torch.equal(fitnet.teacher_space(view)["t"], fitnet.connector(x))
    review = ReviewKD(student_taps=["a", "b", "e"], teacher_taps=["A", "B", "E"])
    s_shapes = {"a": torch.Size([2, 4, 8, 8]), "b": torch.Size([2, 8, 4, 4]), "e": torch.Size([2, 8])}
    t_shapes = {"A": torch.Size([2, 6, 8, 8]), "B": torch.Size([2, 12, 4, 4]), "E": torch.Size([2, 12])}
    review.bind(s_shapes, t_shapes)
    feats = {k: torch.randn(v) for k, v in s_shapes.items()}
    targets = review.teacher_space(StepView(feats, {}))
    assert review.teacher_space_taps() == ["A", "B"] and list(targets) == ["A", "B"]
    levels = [feats["a"], feats["b"], feats["e"][:, :, None, None]]
    expected = review_features(list(review.abfs), levels, review.out_sizes)
    assert torch.equal(targets["A"], expected[0]) and torch.equal(targets["B"], expected[1])


def test_a_diverged_student_is_named_as_the_cause():
    refiner = bound(DAFARefiner())
    f = torch.randn(4, 8, 6, 6)
    with pytest.raises(KdkitError, match="student's steps diverged"):
        refiner.loss(f, None, torch.Generator().manual_seed(0), 4, 0, Frozen(torch.full_like(f, math.nan)))
