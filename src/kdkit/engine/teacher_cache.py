"""Teacher-output cache: the frozen teacher's logits stored per (stage, epoch, sample) and replayed.

FKD (Shen & Xing, ECCV 2022) and TinyViT (Wu et al., ECCV 2022) store a teacher's soft labels per
sample and augmentation so that later runs skip the teacher. Here the augmentation of sample ``i`` in
epoch ``e`` of stage ``s`` is a function of ``(seed, s, e, i)`` (:mod:`kdkit.data.draws`), so the
teacher's output for it is too, given the teacher, the data and the precision. The cache directory
``<root>/<key>`` is named by a hash of all of these (:func:`cache_parts`); a change in any of them is
another directory, so a stale entry is never read. Under it, per epoch, memory-mapped ``.npy`` arrays
hold the outputs and a ``filled`` flag per sample. Runs fill it as they go (any student, any logit
term, any method: KD and DKD of one seed share one cache) or ``kdkit cache-teacher`` fills it ahead.

Storage (``runtime.teacher_cache.topk``):

- ``0`` (default): the full logit vector in fp32, so a replayed run is the live run exactly.
- ``k``: the top-``k`` logits in fp16, their class indices, and the logsumexp of all logits (fp32).
  Decoding sets every other class to one logit ``c`` that keeps the softmax's mass at temperature 1:
  ``(C - k) e^c = e^lse - sum_topk e^z`` (our reading; TinyViT spreads the left-over probability evenly).
  The effect on accuracy is measured in ``benchmarks/teacher_cache.py``.

Only logits can be replayed: a stage whose terms read teacher features, or whose refiners change the
images per step, runs the teacher live (:func:`replay_blocker` says why, in one line).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data.base import cache_dir
from ..errors import KdkitError
from ..terms.base import LOGITS
from .batches import Batches, augment_batch
from .evaluate import autocast

FORMAT = 1
"""Bumped whenever what a cached entry means changes (augmentation, encoding): old caches go unused."""


def tensor_digest(tensors: dict[str, Tensor]) -> str:
    """BLAKE2b of every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_parts(
    teacher: nn.Module,
    teacher_config: dict[str, Any],
    data_config: dict[str, Any],
    dataset: Any,
    seed: int,
    stage: int,
    precision: str,
    channels_last: bool,
    topk: int,
) -> dict[str, Any]:
    """Everything that determines the cached outputs of one stage (``data_config`` holds the stage's data
    section, augmentation included; the batch size is left out: a sample's view does not depend on it)."""
    adapter = getattr(teacher, "kdkit_input", None)
    data = {k: v for k, v in data_config.items() if k not in ("batch_size", "eval_batch_size", "num_workers")}
    images = getattr(dataset, "images", None)
    content = (
        tensor_digest({"images": images, "labels": dataset.labels})
        if getattr(dataset, "in_memory", False) and isinstance(images, Tensor)
        else [str(p) for p in getattr(dataset, "files", [])]
    )
    return {
        "format": FORMAT,
        "teacher": {k: teacher_config.get(k) for k in ("name", "kwargs", "num_classes", "input")},
        "teacher_weights": tensor_digest(teacher.state_dict()),
        "teacher_input": None if adapter is None else [adapter.mean, adapter.std, adapter.size],
        "data": data,
        "samples": len(dataset),
        "content": content,
        "seed": seed,
        "stage": stage,
        "precision": precision,
        "channels_last": channels_last,
        "topk": topk,
    }


def cache_key(parts: dict[str, Any]) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


def replay_blocker(terms: list[Any], refiners: list[str], task: str) -> str | None:
    """Why a stage whose terms read the teacher cannot replay it from the cache (``None``: it can).
    ``terms`` are the stage's :class:`~kdkit.engine.distiller.WeightedTerm` s, ``refiners`` the names of
    the refiners it runs."""
    if task != "classification":
        return f"the cache holds classification logits; this is a {task} run"
    for wt in terms:
        features = [k for k in wt.term.teacher_taps() if k != LOGITS] if wt.term.needs_teacher else []
        if features:
            return f"term '{wt.name}' reads teacher features ({', '.join(features)}), which are not cached"
    if refiners:
        return f"refiner '{refiners[0]}' changes the images every step, which the cache cannot replay"
    return None


def stage_caches(
    config: Any,
    teacher: nn.Module | None,
    stages: list[Any],
    refining: Any,
    task: str,
    classes: int | None,
) -> dict[int, TeacherCache | str]:
    """Per stage index whose terms read the teacher: its :class:`TeacherCache`, or the one-line reason
    the teacher runs live. Empty unless ``runtime.teacher_cache.enabled``. ``classes``: the width of the
    teacher's logits (``None`` when it has none)."""
    settings, runtime = config.runtime.teacher_cache, config.runtime
    if not settings.enabled or teacher is None:
        return {}
    root = Path(settings.dir) if settings.dir else cache_dir("teacher-outputs")
    out: dict[int, TeacherCache | str] = {}
    for i, (stage_config, stage) in enumerate(zip(config.stages, stages)):
        if not any(wt.term.needs_teacher for wt in stage.terms):
            continue
        refiners = [slot.config.name for slot in refining.slots if slot.runs_in(stage.name)]
        reason = replay_blocker(stage.terms, refiners, task)
        if reason is None and classes is None:
            reason = "the teacher has no logits"
        if reason is not None:
            out[i] = f"teacher runs live, not from the cache: {reason}"
            continue
        data = config.stage_data(stage_config).model_dump(mode="json")
        parts = cache_parts(
            teacher,
            config.teacher.model_dump(mode="json"),
            data,
            stage.train_data,
            runtime.seed,
            i,
            runtime.precision,
            runtime.channels_last,
            settings.topk,
        )
        out[i] = TeacherCache(root, parts, classes)  # type: ignore[arg-type]
    return out


def encode_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(top-k logits fp16 [B,k], their classes int32 [B,k], logsumexp fp32 [B])``."""
    values, classes = logits.float().topk(k, dim=1)
    return values.half(), classes.int(), torch.logsumexp(logits.float(), dim=1)


def decode_topk(values: Tensor, classes: Tensor, lse: Tensor, num_classes: int) -> Tensor:
    """Logits ``[B, C]``: the stored top-k (``k < C``), every other class at the ``c`` that keeps
    ``logsumexp = lse``."""
    values = values.float()
    left = 1 - torch.exp(values - lse[:, None]).sum(1)  # probability mass outside the top k
    rest = lse + torch.log(left.clamp_min(1e-12)) - math.log(num_classes - values.shape[1])
    out = rest[:, None].expand(-1, num_classes).clone()
    return out.scatter_(1, classes.long(), values)


def _create_once(path: Path, write) -> None:
    """Create ``path`` with ``write(tmp)`` unless it exists; atomic, so concurrent processes never see a
    partial file nor overwrite each other's (``os.link`` fails when ``path`` appeared meanwhile)."""
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    write(tmp)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def _zeros(path: Path, shape: tuple[int, ...], dtype: Any) -> None:
    """A ``.npy`` file of zeros (sparse on disk until written)."""
    np.lib.format.open_memmap(path, "w+", dtype, shape).flush()


class TeacherCache:
    """One stage's cache directory: ``lookup`` a batch's logits, ``store`` the live teacher's."""

    def __init__(self, root: Path, parts: dict[str, Any], num_classes: int) -> None:
        self.parts, self.num_classes = parts, num_classes
        self.size, self.topk = int(parts["samples"]), int(parts["topk"])
        if self.topk >= num_classes:
            raise KdkitError(
                f"runtime.teacher_cache.topk is {self.topk} but there are only {num_classes} classes; "
                "set topk: 0 to store the full logits"
            )
        self.dir = Path(root) / cache_key(parts)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "meta.json"
        text = json.dumps({"parts": parts, "num_classes": num_classes}, sort_keys=True, default=str)
        _create_once(meta, lambda tmp: tmp.write_text(text))
        if meta.read_text() != text:
            raise KdkitError(f"{self.dir} holds another teacher's outputs (hash collision?); delete it")
        self._open: dict[int, dict[str, np.ndarray]] = {}
        self.replayed = self.live = 0  # steps of this process

    def _layout(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        n, c, k = self.size, self.num_classes, self.topk
        if k == 0:
            return {"logits": ((n, c), np.float32), "filled": ((n,), np.uint8)}
        return {
            "values": ((n, k), np.float16),
            "classes": ((n, k), np.int32),
            "lse": ((n,), np.float32),
            "filled": ((n,), np.uint8),
        }

    def _arrays(self, epoch: int, create: bool) -> dict[str, np.ndarray] | None:
        if epoch in self._open:
            return self._open[epoch]
        arrays = {}
        for name, (shape, dtype) in self._layout().items():
            path = self.dir / f"e{epoch:04d}.{name}.npy"
            if not path.exists():
                if not create:
                    return None
                _create_once(path, lambda tmp, s=shape, d=dtype: _zeros(tmp, s, d))
            arrays[name] = np.load(path, mmap_mode="r+")
        self._open[epoch] = arrays
        return arrays

    def filled(self, epoch: int) -> int:
        """How many samples of ``epoch`` are stored."""
        arrays = self._arrays(epoch, create=False)
        return 0 if arrays is None else int(arrays["filled"].sum())

    def stored(self, epoch: int, indices: Tensor) -> bool:
        """Whether every sample of ``indices`` is stored for ``epoch`` (the flags only, nothing decoded)."""
        arrays = self._arrays(epoch, create=False)
        return arrays is not None and bool(arrays["filled"][indices.cpu().numpy()].all())

    def lookup(self, epoch: int, indices: Tensor) -> Tensor | None:
        """The stored logits ``[B, C]`` (fp32) of the samples ``indices``; ``None`` unless all are stored."""
        arrays = self._arrays(epoch, create=False)
        if arrays is None or not self.stored(epoch, indices):
            return None
        idx = indices.cpu().numpy()
        if self.topk == 0:
            return torch.from_numpy(np.ascontiguousarray(arrays["logits"][idx]))
        return decode_topk(
            torch.from_numpy(arrays["values"][idx]),
            torch.from_numpy(arrays["classes"][idx]),
            torch.from_numpy(arrays["lse"][idx]),
            self.num_classes,
        )

    def store(self, epoch: int, indices: Tensor, logits: Tensor) -> None:
        """Store the teacher's ``logits`` ``[B, C]`` of the samples ``indices`` (values first, then flags)."""
        arrays = self._arrays(epoch, create=True)
        assert arrays is not None
        idx = indices.cpu().numpy()
        logits = logits.detach().float().cpu()
        if self.topk == 0:
            arrays["logits"][idx] = logits.numpy()
        else:
            values, classes, lse = encode_topk(logits, self.topk)
            arrays["values"][idx], arrays["classes"][idx], arrays["lse"][idx] = (
                values.numpy(),
                classes.numpy(),
                lse.numpy(),
            )
        arrays["filled"][idx] = 1

    def teacher_logits(self, epoch: int, indices: Tensor, run_teacher: Callable[[], Tensor]) -> Tensor:
        """The batch's teacher logits from the cache. On a miss the teacher runs (``run_teacher()``), its
        logits are stored and read back, so the filling run trains on exactly what later runs replay
        (with ``topk``, the decoded top-k). Counts the step as replayed or live."""
        logits = self.lookup(epoch, indices)
        if logits is not None:
            self.replayed += 1
            return logits
        self.live += 1
        self.store(epoch, indices, run_teacher())
        return self.lookup(epoch, indices)  # type: ignore[return-value]

    def counts(self) -> dict[str, Any]:
        """The stage's ``teacher_cache`` record: replayed and live steps and :meth:`summary`."""
        return {"replayed_steps": self.replayed, "live_steps": self.live, "text": self.summary()}

    def summary(self) -> str:
        """One line: how the teacher's outputs of the stage came about (this process's steps)."""
        steps = self.replayed + self.live
        if self.live == 0:
            return f"teacher replayed from the cache in all {steps} steps ({self.describe()})"
        return (
            f"teacher replayed from the cache in {self.replayed} of {steps} steps; it ran in {self.live} "
            f"and filled the cache ({self.describe()})"
        )

    def describe(self) -> str:
        storage = "full fp32 logits" if self.topk == 0 else f"top-{self.topk} logits (fp16) + logsumexp"
        return f"{self.dir} ({storage})"


@torch.no_grad()
def fill(trainer: Any, progress: Callable[[str], None] = print) -> list[str]:
    """Fill every stage cache of a built run ahead of training (``kdkit cache-teacher``): each epoch's
    samples augmented exactly as training will (:func:`~kdkit.engine.batches.augment_batch`), through
    the teacher at the run's precision, in batches of ``eval_batch_size`` split over the processes.
    Stored samples are skipped, so an interrupted fill continues. One line per stage."""
    lines = []
    for index, stage in enumerate(trainer.stages):
        cache = trainer.teacher_caches.get(index)
        if cache is None or isinstance(cache, str):
            if cache is not None:
                lines.append(f"stage '{stage.name}': {cache}")
            continue
        batches = Batches.of_stage(stage, trainer.task, trainer.info, stage.eval_batch_size, train=False)
        per_epoch = len(stage.train_data) // stage.batch_size
        epochs = stage.epochs if stage.epochs is not None else -(-stage.steps // per_epoch)
        augment = trainer.task.augmenter(stage.augment)
        for epoch in range(epochs):
            seed_parts = (trainer.runtime.seed, index, epoch)
            stored = partial(cache.stored, epoch)  # stored batches are not even loaded
            for images, labels, idx in batches.epoch(seed_parts, indices=True, skip=stored):
                x, _ = augment_batch(augment, images, labels, idx, trainer.device, seed_parts)
                with autocast(trainer.device, trainer.runtime.precision):
                    logits = trainer.distiller.teacher_logits(
                        x.contiguous(memory_format=trainer.memory_format)
                    )
                cache.store(epoch, idx, logits)
            progress(f"stage '{stage.name}': epoch {epoch + 1}/{epochs} stored")
        lines.append(
            f"stage '{stage.name}': {epochs} epochs x {len(stage.train_data)} samples in {cache.describe()}"
        )
    return lines
