"""Stability of the actuation signal under style change (patent [0043]): how much the signal jumps at
the frames where the style changes relative to the other frames (:func:`stability`), pooled over
several embedded test drives for a student (:func:`drive_stability`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import KdkitError
from .drive import Rule, Runner, _resolve, drive
from .testdrive import TestDrive, style_changes, test_drive

# ---------------------------------------------------------------- stability under style change ([0043])


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return float("inf") if num > 0 else 1.0


def stability(
    signal: np.ndarray,
    styles: Sequence[str],
    components: Sequence[str] | None = None,
    reference: np.ndarray | None = None,
    starts: Sequence[int] = (),
) -> dict[str, Any]:
    """How much a signal jumps at the style changes relative to the other frames ([0043]).

    With ``d_t = |s_t - s_(t-1)|`` per component (``t = 1..N-1``) and ``C`` the frames whose style differs
    from the previous frame's: ``jump_<c>`` = mean of ``d_t`` over ``t in C``; ``step_<c>`` = mean of
    ``d_t`` over the other ``t``; ``jolt_<c> = jump_<c> / step_<c>`` (1 when both are 0, inf when only
    the step is 0). ``jolt > 1``: a style change jolts the controller more than the road's own changes
    do; ``jolt`` is the mean over components. ``starts``: frames that begin another, independent drive
    (several drives pooled); the transitions into them count nowhere.

    With a ``reference`` (the rule on the ground truth): ``mae_<c>`` = mean |signal - reference| over
    all frames, ``mae_<c>_<style>`` per style, and ``reference_jolt_<c>``, the same ratio for the
    reference (about 1 when the drive itself does not jump at the changes).
    """
    s = np.asarray(signal, np.float64)
    s = s[:, None] if s.ndim == 1 else s
    n, k = s.shape
    if len(styles) != n or n < 3:
        raise KdkitError(
            f"stability needs one style per frame and at least 3 frames; got {len(styles)} for {n}"
        )
    names = list(components) if components is not None else [f"s{j}" for j in range(k)]
    cut = {int(t) for t in starts if 0 < int(t) < n}
    changes = [t for t in style_changes(styles) if t not in cut]
    if not changes:
        raise KdkitError("the styles never change; stability needs a drive with a style change")
    at, valid = np.zeros(n - 1, bool), np.ones(n - 1, bool)
    at[np.asarray(changes) - 1] = True
    valid[[t - 1 for t in cut]] = False
    other = valid & ~at
    if not other.any():
        raise KdkitError("every frame changes style; stability needs frames without a change to compare")

    def jolts(x: np.ndarray, prefix: str) -> dict[str, float]:
        d = np.abs(np.diff(x, axis=0))
        out: dict[str, float] = {}
        for j, c in enumerate(names):
            jump, step = float(d[at, j].mean()), float(d[other, j].mean())
            if not prefix:
                out[f"jump_{c}"], out[f"step_{c}"] = jump, step
            out[f"{prefix}jolt_{c}"] = _ratio(jump, step)
        return out

    figures: dict[str, Any] = {"frames": n, "changes": changes, **jolts(s, "")}
    figures["jolt"] = float(np.mean([figures[f"jolt_{c}"] for c in names]))
    if reference is not None:
        ref = np.asarray(reference, np.float64).reshape(n, k)
        err = np.abs(s - ref)
        for j, c in enumerate(names):
            figures[f"mae_{c}"] = float(err[:, j].mean())
            for style in dict.fromkeys(styles):
                rows = np.array([st == style for st in styles])
                figures[f"mae_{c}_{style}"] = float(err[rows, j].mean())
        figures.update(jolts(ref, "reference_"))
    return figures


def drive_stability(
    model_or_run: str | Path | Runner,
    out_dir: str | Path | None = None,
    *,
    rule: Rule | None = None,
    test: TestDrive | Sequence[TestDrive] | None = None,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    classes: Sequence[str] | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """:func:`stability` of a run directory, exported file or runner on the embedded test drive.

    ``test``: one or more :class:`TestDrive`; default: :func:`test_drive` (120 frames at 64x128, day /
    night / day) for each of ``seeds``, pooled (2 style changes per drive, so one drive alone gives a
    noisy ratio). Returns the pooled figures plus ``drives`` and ``per_drive`` (each drive's
    ``jolt_<c>``). With ``out_dir``: ``stability.json`` there and ``signal.csv`` / ``signal.png`` per
    drive (in ``drive-<i>/`` when there are several).
    """
    tests = [test_drive(seed=s) for s in seeds] if test is None else test
    tests = [tests] if isinstance(tests, TestDrive) else list(tests)
    if not tests:
        raise KdkitError("drive_stability needs at least one test drive (seeds or test)")
    runner, classes = _resolve(model_or_run, classes, device)
    out = Path(out_dir) if out_dir is not None else None
    logs = []
    for i, td in enumerate(tests):
        where = None if out is None else (out if len(tests) == 1 else out / f"drive-{i}")
        logs.append(drive(runner, td, rule, where, classes=classes, batch_size=batch_size))
    starts = np.cumsum([0] + [len(log.names) for log in logs])[:-1].tolist()
    references = [log.reference for log in logs]
    reference = None if any(r is None for r in references) else np.concatenate(references)
    styles = [st for log in logs for st in (log.styles or [])]
    figures = stability(
        np.concatenate([log.signal for log in logs]), styles, logs[0].components, reference, starts
    )
    per = [stability(log.signal, log.styles or [], log.components) for log in logs]
    figures["drives"] = len(logs)
    figures["per_drive"] = [{k: v for k, v in f.items() if k.startswith("jolt")} for f in per]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "stability.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures
