"""The teacher-output cache (issue 12, item 3): top-k encoding by hand, the key, exact replay, fallbacks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_engine import tiny_config

from kdkit.api import train_from_config
from kdkit.data import build_dataset
from kdkit.engine.teacher_cache import TeacherCache, cache_key, cache_parts, decode_topk, encode_topk
from kdkit.errors import KdkitError
from kdkit.models import build_model, load_weights, save_weights

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_topk_keeps_the_top_logits_and_the_softmax_mass():
    logits = torch.tensor([[4.0, 1.0, 0.0, 2.0, -1.0]])
    values, classes, lse = encode_topk(logits, 2)
    assert classes.tolist() == [[0, 3]] and values.dtype == torch.float16 and values.tolist() == [[4.0, 2.0]]
    by_hand_lse = math.log(sum(math.exp(v) for v in (4, 1, 0, 2, -1)))
    assert lse.item() == pytest.approx(by_hand_lse, rel=1e-6)
    # the three other classes share the left-over mass e^1 + e^0 + e^-1 evenly: c = log(mass / 3)
    c = math.log((math.exp(1) + 1 + math.exp(-1)) / 3)
    decoded = decode_topk(values, classes, lse, 5)
    assert decoded.tolist()[0] == pytest.approx([4.0, c, c, 2.0, c], abs=1e-5)  # fp32 rounding
    assert torch.logsumexp(decoded, 1).item() == pytest.approx(by_hand_lse, rel=1e-6)


def _parts(teacher, **changes):
    data = build_dataset("embedded", "train", train_size=16, test_size=4)
    args = {
        "teacher_config": {"name": "resnet8"},
        "data_config": {"name": "embedded", "params": {"train_size": 16}, "augment": {"crop_padding": 4}},
        "dataset": data,
        "seed": 0,
        "stage": 0,
        "precision": "fp32",
        "channels_last": False,
        "topk": 0,
    }
    args.update(changes)
    return cache_parts(teacher, **args)


def test_the_key_changes_with_everything_that_determines_the_outputs():
    torch.manual_seed(0)
    teacher = build_model("resnet8", num_classes=10)
    base = cache_key(_parts(teacher))
    assert cache_key(_parts(teacher)) == base
    batch = {"name": "embedded", "params": {"train_size": 16}, "augment": {"crop_padding": 4}}
    batch["batch_size"] = 7
    assert cache_key(_parts(teacher, data_config=batch)) == base  # the batch size does not matter
    other_data = build_dataset("embedded", "train", train_size=16, test_size=4, seed=1)
    changed = [
        _parts(teacher, seed=1),
        _parts(teacher, stage=1),
        _parts(teacher, precision="bf16"),
        _parts(teacher, topk=3),
        _parts(teacher, data_config={**batch, "augment": {"crop_padding": 2}}),
        _parts(teacher, dataset=other_data),
        _parts(teacher, teacher_config={"name": "resnet8", "kwargs": {"zero_init": True}}),
    ]
    with torch.no_grad():
        teacher.fc.bias[0] += 1e-6  # one weight a hair off
    changed.append(_parts(teacher))
    keys = [cache_key(p) for p in changed]
    assert base not in keys and len(set(keys)) == len(keys)


def test_lookup_needs_every_sample_stored(tmp_path):
    cache = TeacherCache(tmp_path, {"samples": 6, "topk": 0, "x": 1}, 3)
    idx = torch.tensor([4, 1])
    assert cache.lookup(0, idx) is None
    logits = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.25]])
    cache.store(0, idx, logits)
    assert torch.equal(cache.lookup(0, idx.flip(0)), logits.flip(0))
    assert cache.lookup(0, torch.tensor([4, 2])) is None and cache.lookup(1, idx) is None
    assert cache.filled(0) == 2
    again = TeacherCache(tmp_path, {"samples": 6, "topk": 0, "x": 1}, 3)  # another process, same key
    assert again.dir == cache.dir and torch.equal(again.lookup(0, idx), logits)
    with pytest.raises(KdkitError, match="topk is 3 but there are only 3 classes.*topk: 0"):
        TeacherCache(tmp_path, {"samples": 6, "topk": 3}, 3)


def _kd_config(tmp_path, teacher, name, cache=True, **runtime):
    config = tiny_config(
        tmp_path,
        name=name,
        data={"name": "embedded", "params": {"train_size": 64, "test_size": 16}, "batch_size": 16},
        teacher={"name": "resnet8", "weights": str(teacher)},
        terms=[{"name": "ce"}, {"name": "kd", "temperature": 4}],
    )
    settings = {"enabled": cache, "dir": str(tmp_path / "cache"), **runtime}
    config.runtime.teacher_cache = type(config.runtime.teacher_cache)(**settings)
    return config


def _records(tmp_path, name):
    lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "teacher_cache"]


def _weights(tmp_path, name):
    model = build_model("resnet8", num_classes=10)
    load_weights(model, tmp_path / "runs" / name / "student.safetensors")
    return model.state_dict()


def test_a_replayed_run_trains_the_same_student_as_the_live_teacher(tmp_path):
    torch.manual_seed(1)
    teacher = tmp_path / "teacher.safetensors"
    save_weights(build_model("resnet8", num_classes=10), teacher)
    train_from_config(_kd_config(tmp_path, teacher, "live", cache=False))
    train_from_config(_kd_config(tmp_path, teacher, "fill"))
    train_from_config(_kd_config(tmp_path, teacher, "replay"))
    assert _records(tmp_path, "live") == []
    fill, replay = _records(tmp_path, "fill")[-1], _records(tmp_path, "replay")[-1]
    assert (fill["replayed_steps"], fill["live_steps"]) == (0, 8)  # 2 epochs x 4 steps
    assert (replay["replayed_steps"], replay["live_steps"]) == (8, 0)
    assert "replayed from the cache in all 8 steps" in replay["text"]
    assert f"- stage 'main': {replay['text']}" in (tmp_path / "runs" / "replay" / "report.md").read_text()
    live, filled, replayed = (_weights(tmp_path, n) for n in ("live", "fill", "replay"))
    for key in live:
        assert torch.equal(live[key], filled[key]) and torch.equal(live[key], replayed[key]), key
    # another teacher: another key, so the stored outputs are not used
    torch.manual_seed(2)
    save_weights(build_model("resnet8", num_classes=10), teacher)
    train_from_config(_kd_config(tmp_path, teacher, "other"))
    assert _records(tmp_path, "other")[-1]["replayed_steps"] == 0
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_terms_reading_teacher_features_run_the_teacher_live(tmp_path):
    torch.manual_seed(1)
    teacher = tmp_path / "teacher.safetensors"
    save_weights(build_model("resnet8", num_classes=10), teacher)
    config = _kd_config(tmp_path, teacher, "fitnet")
    config.terms.append(type(config.terms[0])(name="fitnet"))
    config.stages[0].epochs = 1
    train_from_config(config)
    (record,) = _records(tmp_path, "fitnet")
    assert record["text"].startswith("teacher runs live, not from the cache: term 'fitnet' reads teacher")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_cache_teacher_fills_ahead_and_training_replays_it(tmp_path):
    from typer.testing import CliRunner

    from kdkit.cli import app
    from kdkit.config import dump_config

    torch.manual_seed(1)
    teacher = tmp_path / "teacher.safetensors"
    save_weights(build_model("resnet8", num_classes=10), teacher)
    config = _kd_config(tmp_path, teacher, "ahead", cache=False)
    path = tmp_path / "kd.yaml"
    path.write_text(dump_config(config))
    result = CliRunner().invoke(app, ["cache-teacher", str(path)])
    assert result.exit_code == 0, result.output
    assert "epoch 2/2 stored" in result.output and "2 epochs x 64 samples" in result.output
    train_from_config(_kd_config(tmp_path, teacher, "ahead"))
    train_from_config(_kd_config(tmp_path, teacher, "live", cache=False))
    assert _records(tmp_path, "ahead")[-1]["replayed_steps"] == 8
    ahead, live = _weights(tmp_path, "ahead"), _weights(tmp_path, "live")
    for key in live:  # the fill ran the teacher in other batches: equal up to float rounding
        assert torch.allclose(ahead[key], live[key], atol=1e-5), key
