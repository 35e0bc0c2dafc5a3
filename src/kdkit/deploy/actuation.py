"""Actuation rules: a student's output -> an actuation signal (patent claim 15, step 170 of [0068]).

Two stated, hand-checkable rules, each a pure function plus a small callable object that the drive
loop (:mod:`kdkit.deploy.drive`) applies to a batch of outputs:

- :func:`corridor_signal` (segmentation): the free road ahead in a driving corridor -> ``speed`` and
  ``steer``. The corridor is a trapezoid in the lower centre of the frame given as fractions of the
  frame (:class:`Corridor`). A corridor row is *blocked* when non-road pixels cover more than
  ``block`` of its width; ``speed = v_max * free_rows / corridor_rows`` where ``free_rows`` counts the
  rows from the bottom up to (not including) the nearest blocked row. ``steer`` is the mean column
  of the road pixels in the corridor rows (full image width) relative to the image centre,
  ``(x_mean - W/2) / (W/2)`` in [-1, 1] (negative: the road lies to the left); 0 without road pixels.
- :func:`class_action` (classification): a class -> action table; ``"argmax"`` takes the action of
  the top class, ``"expected"`` the probability-weighted mean of the actions (smoother).

Both map a batch to a float array ``[B, K]`` whose columns are the rule's ``components``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..errors import KdkitError
from ..registry import did_you_mean

__all__ = ["ClassActionRule", "Corridor", "CorridorRule", "class_action", "corridor_mask", "corridor_signal"]


@dataclass(frozen=True)
class Corridor:
    """The driving corridor as fractions of the frame: rows ``top``..``bottom`` (0 = top edge), width
    ``top_width`` at its top row growing linearly to ``bottom_width`` at its bottom row, centred at
    column fraction ``centre``.

    Rows ``round(top*H)`` .. ``round(bottom*H) - 1`` belong to it; row ``r`` sits at
    ``t = (r + 0.5 - r0) / (r1 - r0)`` and holds the columns ``c`` with
    ``|c + 0.5 - centre*W| <= (top_width + (bottom_width - top_width) * t) * W / 2`` (at least the column
    under the centre). The defaults suit the road scenes' cameras (horizon at 36-50% of the height).
    """

    top: float = 0.6
    bottom: float = 1.0
    top_width: float = 0.1
    bottom_width: float = 0.5
    centre: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.top < self.bottom <= 1:
            raise KdkitError(
                f"corridor needs 0 <= top < bottom <= 1, got top={self.top}, bottom={self.bottom}"
            )
        for name in ("top_width", "bottom_width", "centre"):
            if not 0 < getattr(self, name) <= 1:
                raise KdkitError(f"corridor {name} must be a fraction in (0, 1], got {getattr(self, name)}")

    def rows(self, height: int) -> tuple[int, int]:
        """First and one-past-last corridor row."""
        r0, r1 = round(self.top * height), round(self.bottom * height)
        if r1 <= r0:
            raise KdkitError(
                f"corridor rows {self.top}..{self.bottom} of a {height}-row frame are empty; "
                "widen the corridor"
            )
        return r0, r1


def corridor_mask(height: int, width: int, corridor: Corridor = Corridor()) -> np.ndarray:
    """Boolean ``[H, W]``: the corridor's pixels (see :class:`Corridor`)."""
    r0, r1 = corridor.rows(height)
    out = np.zeros((height, width), bool)
    cols = np.arange(width) + 0.5
    centre = corridor.centre * width
    for r in range(r0, r1):
        t = (r + 0.5 - r0) / (r1 - r0)
        half = (corridor.top_width + (corridor.bottom_width - corridor.top_width) * t) * width / 2
        row = np.abs(cols - centre) <= half + 1e-9
        if not row.any():
            row[min(int(centre), width - 1)] = True
        out[r] = row
    return out


def corridor_signal(
    masks: np.ndarray | Tensor,
    road_ids: Sequence[int] = (0,),
    corridor: Corridor = Corridor(),
    block: float = 0.25,
    v_max: float = 1.0,
) -> np.ndarray:
    """``[B, 2]`` (speed, steer) from class-id masks ``[B, H, W]`` (or one ``[H, W]`` -> ``[1, 2]``).

    Pixels whose class is in ``road_ids`` are road; every other id (also an ignore index) is not.
    """
    m = masks.cpu().numpy() if isinstance(masks, Tensor) else np.asarray(masks)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise KdkitError(f"the corridor rule needs masks [B, H, W], got shape {tuple(m.shape)}")
    if not 0 <= block < 1:
        raise KdkitError(f"corridor block must be a fraction in [0, 1), got {block}")
    _, h, w = m.shape
    road = np.isin(m, np.asarray(road_ids))
    area = corridor_mask(h, w, corridor)
    r0, r1 = corridor.rows(h)
    width = area[r0:r1].sum(1)  # corridor pixels per row
    nonroad = ((~road[:, r0:r1]) & area[r0:r1]).sum(2) / width  # [B, rows]
    blocked = nonroad > block
    # free rows from the bottom: the index of the first blocked row counted from the bottom
    from_bottom = blocked[:, ::-1]
    free = np.where(from_bottom.any(1), from_bottom.argmax(1), r1 - r0)
    speed = v_max * free / (r1 - r0)
    band = road[:, r0:r1]
    count = band.sum((1, 2))
    xs = (band * (np.arange(w) + 0.5)).sum((1, 2))
    centre = np.where(count > 0, xs / np.maximum(count, 1), w / 2)
    steer = np.clip((centre - w / 2) / (w / 2), -1, 1)
    return np.stack([speed, steer], 1).astype(np.float64)


def class_action(logits: Tensor | np.ndarray, actions: np.ndarray, mode: str = "argmax") -> np.ndarray:
    """``[B, K]`` actions from class logits ``[B, C]`` and an action table ``[C, K]``.

    ``argmax``: the row of the top class; ``expected``: ``softmax(logits) @ actions``.
    """
    z = torch.as_tensor(logits, dtype=torch.float64)
    table = torch.as_tensor(actions, dtype=torch.float64)
    if z.ndim != 2 or z.shape[1] != table.shape[0]:
        raise KdkitError(
            f"class-action rule needs logits [B, {table.shape[0]}] (one per class), got {tuple(z.shape)}"
        )
    if mode == "argmax":
        return table[z.argmax(1)].numpy()
    if mode == "expected":
        return (z.softmax(1) @ table).numpy()
    raise KdkitError(f"class-action mode must be 'argmax' or 'expected', got '{mode}'")


# ---------------------------------------------------------------- rules as objects for the drive loop


@dataclass
class CorridorRule:
    """:func:`corridor_signal` on the argmax of segmentation logits ``[B, C, H, W]``.

    ``road`` names the classes that count as drivable (looked up in ``classes``).
    """

    classes: Sequence[str]
    road: Sequence[str] = ("road",)
    corridor: Corridor = field(default_factory=Corridor)
    block: float = 0.25
    v_max: float = 1.0
    components: tuple[str, ...] = ("speed", "steer")

    def __post_init__(self) -> None:
        hint = "; name the drivable classes with road=(...)"
        self.road_ids = tuple(_class_index(self.classes, name, hint) for name in self.road)

    def from_mask(self, masks: np.ndarray | Tensor) -> np.ndarray:
        """The rule on class-id masks (e.g. ground truth)."""
        return corridor_signal(masks, self.road_ids, self.corridor, self.block, self.v_max)

    def __call__(self, logits: Tensor) -> np.ndarray:
        if logits.ndim != 4:
            raise KdkitError(
                f"the corridor rule needs segmentation logits [B, C, H, W], got {tuple(logits.shape)}; "
                "for a classifier give a class-action table"
            )
        return self.from_mask(logits.argmax(1))


class ClassActionRule:
    """:func:`class_action` with a table ``{class: value}`` or ``{class: {component: value}}``.

    Classes missing from the table take ``default`` (same form as a value); without one, every class
    must be listed.
    """

    def __init__(
        self,
        classes: Sequence[str],
        table: Mapping[str, float | Mapping[str, float]],
        mode: str = "argmax",
        default: float | Mapping[str, float] | None = None,
    ) -> None:
        if not table:
            raise KdkitError("the class-action table is empty; give {class: action} for the classes")
        if mode not in ("argmax", "expected"):
            raise KdkitError(f"class-action mode must be 'argmax' or 'expected', got '{mode}'")
        for name in table:
            _class_index(classes, name)
        first = next(iter(table.values()))
        self.components = tuple(first) if isinstance(first, Mapping) else ("action",)
        missing = [c for c in classes if c not in table]
        if missing and default is None:
            raise KdkitError(
                f"the class-action table has no action for {', '.join(missing[:5])}"
                f"{', ...' if len(missing) > 5 else ''}; list every class or give a default"
            )
        rows = [self._row(table[c] if c in table else default, c) for c in classes]
        self.classes, self.mode, self.actions = list(classes), mode, np.array(rows, np.float64)

    def _row(self, value: float | Mapping[str, float], name: str) -> list[float]:
        if isinstance(value, Mapping):
            if set(value) != set(self.components):
                raise KdkitError(
                    f"class-action entry '{name}' has components {sorted(value)}, expected "
                    f"{sorted(self.components)}; give every class the same components"
                )
            return [float(value[k]) for k in self.components]
        if self.components != ("action",):
            raise KdkitError(
                f"class-action entry '{name}' is a number; give {{component: value}} like the others"
            )
        return [float(value)]

    def from_labels(self, labels: np.ndarray | Tensor) -> np.ndarray:
        """The table applied to class ids (e.g. ground truth)."""
        return self.actions[np.asarray(labels, np.int64)]

    def __call__(self, logits: Tensor) -> np.ndarray:
        return class_action(logits, self.actions, self.mode)


def _class_index(classes: Sequence[str], name: str, hint: str = "") -> int:
    if name not in classes:
        choices = list(dict.fromkeys(classes))
        raise KdkitError(f"no class '{name}' in the model's classes{did_you_mean(name, choices)}{hint}")
    return list(classes).index(name)
