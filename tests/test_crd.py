"""CRD (Tian et al. 2020): the NCE loss, scores and memory update against hand values, a float64 gradient
check, and a run whose memory banks resume exactly."""

from __future__ import annotations

import math

import pytest
import torch
from test_engine import TINY_DATA, Crash

from kdkit.api import train_from_config
from kdkit.config import load_config
from kdkit.engine.checkpoint import load_checkpoint
from kdkit.errors import KdkitError
from kdkit.terms import CRD, StepView, nce_loss
from kdkit.terms.contrastive import contrast_scores, momentum_update


def test_nce_loss_by_hand():
    # N = 4, K = 2: noise K/N = 0.5; positive 0.5, negatives 0.2 and 0.1
    scores = torch.tensor([[0.5, 0.2, 0.1]])
    expected = -(math.log(0.5 / 1.0) + math.log(0.5 / 0.7) + math.log(0.5 / 0.6))
    assert nce_loss(scores, 4, eps=0.0).item() == pytest.approx(expected)


def test_scores_and_memory_update_by_hand():
    anchor = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    scores = contrast_scores(anchor, bank, torch.tensor([[0, 2, 1]]), 0.5)
    assert torch.allclose(scores, torch.exp(torch.tensor([[2.0, -2.0, 0.0]])))
    momentum_update(bank, torch.tensor([0]), torch.tensor([[0.0, 1.0]]), 0.5)
    assert torch.allclose(bank[0], torch.tensor([1.0, 1.0]) / math.sqrt(2))  # normalize(0.5, 0.5)
    assert torch.equal(bank[1:], torch.tensor([[0.0, 1.0], [-1.0, 0.0]]))


def test_crd_loss_gradcheck_float64():
    torch.manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(6, 3, dtype=torch.float64), dim=1)
    sampled = torch.tensor([[0, 3, 4], [1, 5, 2]])

    def loss(anchor):
        unit = torch.nn.functional.normalize(anchor, dim=1)
        return nce_loss(contrast_scores(unit, bank, sampled, 0.5) / 3.0, 6)

    anchor = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(loss, (anchor,))


def test_crd_needs_indices_and_binding():
    term = CRD(student_tap="a", teacher_tap="b", negatives=4)
    view = StepView({"a": torch.randn(2, 5)}, {"b": torch.randn(2, 5)})
    with pytest.raises(KdkitError, match="dataset indices"):
        term(view)
    with pytest.raises(KdkitError, match="temperature"):
        CRD(temperature=0.0)


def crd_config(tmp_path, name):
    return load_config(
        base={
            "name": name,
            "data": TINY_DATA,
            "teacher": {"name": "resnet8"},
            "student": {"name": "resnet8"},
            "terms": [{"name": "ce"}, {"name": "crd", "weight": 0.8, "negatives": 64}],
            "stages": [{"epochs": 2, "optimizer": {"lr": 0.05}}],
            "runtime": {
                "out_dir": str(tmp_path / "runs"),
                "progress": False,
                "deterministic": True,
                "checkpoint_every_steps": 2,
            },
        }
    )


def test_crd_memory_banks_resume_exactly(tmp_path, one_thread):
    train_from_config(crd_config(tmp_path, "full"))
    with pytest.raises(KeyboardInterrupt):
        train_from_config(crd_config(tmp_path, "cut"), callbacks=[Crash(9)])
    cut = tmp_path / "runs" / "cut"
    train_from_config(crd_config(tmp_path, "cut"), run_dir=cut, resume=True)
    full = load_checkpoint(tmp_path / "runs" / "full" / "checkpoints" / "last.pt")["terms"]
    resumed = load_checkpoint(cut / "checkpoints" / "last.pt")["terms"]
    banks = [k for k in full if k.endswith(("memory_s", "memory_t", ".z"))]
    assert len(banks) == 3 and full[banks[0]].shape == (192, 128)
    for key, value in full.items():
        assert torch.equal(value, resumed[key]), key
    initial = CRD()
    initial.bind_data(192)
    assert not torch.equal(full[banks[0]], initial.memory_s)  # the banks moved during training
