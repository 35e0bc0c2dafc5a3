"""The learnable-refiner contract of the engine (kdkit.engine.refining), exercised with the ``tst`` refiner
restricted to its three primitives without magnitude (no meta-encoders to fit, so the runs stay tiny):
the alternation schedule, frozen student during refiner updates and frozen refiner during student steps,
refiner state in checkpoints with exact resume in the middle of a refiner phase, stages that train no
student parameter, and config errors."""

from __future__ import annotations

import json

import pytest
import torch
from test_engine import TINY_DATA, Crash

from kdkit.api import train_from_config
from kdkit.config import RefinerConfig, load_config
from kdkit.engine.build import build_run
from kdkit.engine.callbacks import Callback
from kdkit.engine.checkpoint import load_checkpoint
from kdkit.engine.refining import RefinerSlot
from kdkit.errors import ConfigError, KdkitError

PLAIN = ["Equalize", "Invert", "Cutout"]


def tst_entry(**update):
    return {
        "name": "tst",
        "primitives": PLAIN,
        "num_ops": 2,
        "optimizer": {"name": "sgd", "lr": 5.0, "momentum": 0.0, "weight_decay": 0.0},
        "update": {"every": 2, "iterations": 2, **update},
    }


def tst_config(tmp_path, name="tst", refiner=None, **changes):
    config = {
        "name": name,
        "data": TINY_DATA,  # 192 images, batch 32: 6 steps per epoch
        "teacher": {"name": "resnet8"},
        "student": {"name": "resnet8"},
        "terms": [{"name": "ce"}, {"name": "kd"}],
        "refiners": [refiner or tst_entry(epochs=[1])],
        "stages": [{"epochs": 2, "optimizer": {"lr": 0.05}, "schedule": {"name": "cosine"}}],
        "runtime": {"out_dir": str(tmp_path / "runs"), "progress": False, "deterministic": True},
    }
    config.update(changes)
    return load_config(base=config)


def records(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_update_schedule_by_hand():
    slot = RefinerSlot(torch.nn.Linear(1, 1), RefinerConfig(**tst_entry(epochs=[2, 3], every=3)), object())
    due = [s for s in range(24) if slot.due("main", s, per_epoch=6)]
    assert due == [6, 9, 12, 15]  # epochs 2-3 are steps 6-17; every 3rd step of the stage
    staged = RefinerSlot(torch.nn.Linear(1, 1), RefinerConfig(**tst_entry(), stages=["search"]), object())
    assert staged.due("search", 0, 6) and not staged.due("main", 0, 6)


def test_refiner_phases_alternate_and_log(tmp_path, one_thread):
    train_from_config(tst_config(tmp_path))
    phases = records(tmp_path / "runs" / "tst", "refiner")
    # epoch 1 only, every 2 steps: before student steps 1, 3, 5 (0-based 0, 2, 4); 2 updates each
    assert [r["step"] for r in phases] == [0, 2, 4]
    assert [r["updates"] for r in phases] == [2, 4, 6]
    assert {"loss", "teacher_ce", "student_anti_ce", "p/Invert"} <= set(phases[0])
    # the probabilities moved (the refiner learned) and stayed put in epoch 2 (student steps only)
    assert phases[-1]["p/Invert"] != 0.5
    final = load_checkpoint(tmp_path / "runs" / "tst" / "checkpoints" / "last.pt")["refiners"][0]
    assert torch.sigmoid(final["module"]["theta_p"][1]).item() == pytest.approx(phases[-1]["p/Invert"])
    assert final["updates"] == 6


def test_student_frozen_during_refiner_update_and_refiner_frozen_during_student_step(tmp_path, one_thread):
    built = build_run(tst_config(tmp_path, refiner=tst_entry()))
    trainer = built.trainer
    trainer.run_dir.mkdir(parents=True)  # the phase logs to metrics.jsonl
    trainer._train_mode()
    stage = trainer.stages[0]
    images = trainer.prepare_eval(torch.stack([stage.train_data[i][0] for i in range(8)]))
    labels = torch.tensor([int(stage.train_data[i][1]) for i in range(8)])
    student = {k: v.clone() for k, v in trainer.distiller.student.state_dict().items()}
    refiner = trainer.refining.slots[0].refiner
    before = refiner.theta_p.detach().clone()
    trainer._refiner_phases(0, stage, images, labels, 0, 6, 2.0)
    assert not torch.equal(refiner.theta_p.detach(), before)  # the refiner learned ...
    for key, value in trainer.distiller.student.state_dict().items():  # ... the student did not,
        assert torch.equal(value, student[key]), key  # batch-norm statistics included
    assert all(p.grad is None for p in trainer.distiller.student.parameters())
    assert trainer.distiller.student.training  # and is back in training mode
    # a student step: the refiner's parameters stay as they are
    after = refiner.theta_p.detach().clone()
    optimizer = torch.optim.SGD(trainer.distiller.student.parameters(), lr=0.1)
    x, y = trainer.refining.apply("main", images, labels, (0, 0, 0, 1), trainer.info)
    loss, _, _ = trainer.distiller(x, y)
    loss.backward()
    optimizer.step()
    assert torch.equal(refiner.theta_p.detach(), after) and refiner.theta_p.grad is None
    assert x.shape[0] == 16  # [x; x_hat]


def check_resume_is_exact(tmp_path, make_config) -> dict:
    """A run stopped after step 3 (checkpoints every 2 steps) and resumed logs the same refiner phases and
    evaluations as an uninterrupted one; returns the checkpoint it resumed from."""
    full = make_config(tmp_path, name="full")
    full.runtime.checkpoint_every_steps = 2
    train_from_config(full)
    cut = make_config(tmp_path, name="cut")
    cut.runtime.checkpoint_every_steps = 2
    with pytest.raises(KeyboardInterrupt):
        train_from_config(cut, callbacks=[Crash(3)])
    run_dir = tmp_path / "runs" / "cut"
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    train_from_config(cut, run_dir=run_dir, resume=True)
    assert records(run_dir, "refiner") == records(tmp_path / "runs" / "full", "refiner")
    assert records(run_dir, "eval") == records(tmp_path / "runs" / "full", "eval")
    return state


def test_resume_in_the_middle_of_a_refiner_phase_is_exact(tmp_path, one_thread):
    state = check_resume_is_exact(tmp_path, tst_config)  # stopped after step 3: phases at 0 and 2 done
    assert state["step"] == 2 and state["refiners"][0]["updates"] == 2


def test_a_stage_may_train_no_student_parameter(tmp_path, one_thread):
    stages = [
        {"name": "search", "epochs": 1, "train": []},
        {"name": "main", "epochs": 1, "optimizer": {"lr": 0.05}},
    ]
    refiner = {**tst_entry(), "stages": ["search"]}
    config = tst_config(tmp_path, refiner=refiner, stages=stages)
    built = build_run(config)
    student = {k: v.clone() for k, v in built.trainer.distiller.student.state_dict().items()}
    seen = {}

    class Watch(Callback):
        def on_stage_end(self, trainer, stage):
            if stage.name == "search":
                state = trainer.distiller.student.state_dict()
                seen.update({k: v.clone() for k, v in state.items()})

    built.trainer.callbacks.append(Watch())
    built.trainer.fit()
    for key, value in seen.items():
        assert torch.equal(value, student[key]), key
    run_dir = tmp_path / "runs" / "tst"
    phases = records(run_dir, "refiner")
    assert [r["stage"] for r in phases] == ["search"] * 3
    assert [r["stage"] for r in records(run_dir, "train")] == ["main"]  # no student steps in 'search'


def test_refiner_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no stage named 'search'"):
        tst_config(tmp_path, refiner={**tst_entry(), "stages": ["search"]})
    with pytest.raises(ConfigError, match="count from 1"):
        tst_config(tmp_path, refiner=tst_entry(epochs=[0]))
    no_optimizer = {k: v for k, v in tst_entry().items() if k != "optimizer"}
    with pytest.raises(KdkitError, match="learns but has no optimizer"):
        build_run(tst_config(tmp_path, refiner=no_optimizer))


def test_kdkit_prepare_and_list_refiners(tmp_path):
    from typer.testing import CliRunner

    from kdkit.cli import app

    path = tmp_path / "tst.yaml"
    path.write_text(json.dumps(tst_config(tmp_path).model_dump(mode="json", exclude_none=True)))
    result = CliRunner().invoke(app, ["prepare", str(path)])
    assert result.exit_code == 0, result.output
    assert "nothing to prepare beyond the data" in result.output  # primitives without magnitude: no fit
    listed = CliRunner().invoke(app, ["list", "refiners"])
    assert "tst" in listed.output and "style" in listed.output


def test_terms_see_the_dataset_indices_of_the_batch_also_after_a_refiner(tmp_path, one_thread):
    """StepView.indices name each sample of the step (CRD's memory bank needs them): the labels of
    ``dataset[indices]`` are the step's labels, for [x; x_hat] too (the indices repeat)."""
    built = build_run(tst_config(tmp_path, refiner=tst_entry()))
    term = built.trainer.distiller.stage_terms[0][0].term
    seen, forward = [], term.forward

    def record(view):
        seen.append((view.indices.clone(), view.labels.clone()))
        return forward(view)

    term.forward = record
    built.trainer.fit()
    data = built.trainer.stages[0].train_data
    assert len(seen) == 12  # 2 epochs x 6 steps
    for indices, labels in seen:
        assert indices.shape == (64,) and torch.equal(indices[:32], indices[32:])
        assert torch.equal(data.labels[indices], labels)
    assert len({i for idx, _ in seen[:6] for i in idx[:32].tolist()}) == 192  # one epoch: every sample once


def test_a_non_finite_refiner_loss_names_a_diverged_student(tmp_path, one_thread):
    built = build_run(tst_config(tmp_path, refiner=tst_entry()))
    trainer = built.trainer
    trainer.run_dir.mkdir(parents=True)
    stage = trainer.stages[0]
    images = trainer.prepare_eval(torch.stack([stage.train_data[i][0] for i in range(4)]))
    labels = torch.tensor([int(stage.train_data[i][1]) for i in range(4)])
    with torch.no_grad():
        next(trainer.distiller.student.parameters()).fill_(float("nan"))
    with pytest.raises(KdkitError, match="student's weights are not finite"):
        trainer._refiner_phases(0, stage, images, labels, 0, 6, 2.0)
