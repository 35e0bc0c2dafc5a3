"""`runtime.precision: auto`: bf16 only where the device computes it natively."""

from __future__ import annotations

import torch

from kdkit.engine.evaluate import native_bf16, resolve_precision

CPU = torch.device("cpu")


def test_auto_follows_the_cpu_features(monkeypatch):
    for avx512_bf16, amx, expected in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert native_bf16(CPU) is (expected == "bf16")
        assert resolve_precision("auto", CPU) == expected
        assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"


def test_auto_is_resolved_in_the_run_config(tmp_path, monkeypatch):
    from kdkit.config import load_config
    from kdkit.engine.build import build_run

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    config = load_config(
        base={
            "name": "p",
            "data": {"name": "embedded", "params": {"train_size": 8, "test_size": 8}, "batch_size": 4},
            "student": {"name": "resnet8"},
            "terms": [{"name": "ce"}],
            "stages": [{"steps": 1}],
            "runtime": {"precision": "auto", "progress": False, "out_dir": str(tmp_path)},
        }
    )
    built = build_run(config, tmp_path / "p", callbacks=[])
    assert built.config.runtime.precision == "fp32" and built.trainer.runtime.precision == "fp32"
    built.trainer.distiller.release_taps()
