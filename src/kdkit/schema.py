"""The run configuration's schema (pydantic): task, data, evaluation, teacher, student, terms,
refiners, stages and runtime. Loading, overrides and validation errors are in :mod:`kdkit.config`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(Strict):
    """The input a teacher expects when it differs from the data's: per-channel ``mean``/``std`` of its
    normalisation (of [0, 1] pixels) and its input ``size``; unset fields keep the data's."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    size: tuple[int, int] | None = Field(None, description="[H, W] the teacher's input is resized to")


class ModelConfig(Strict):
    """A network: a registered zoo name, ``torchvision:<name>`` or ``timm:<name>``."""

    name: str
    weights: Path | None = None
    num_classes: int | None = Field(None, description="default: the dataset's number of classes")
    kwargs: dict[str, Any] = {}
    input: InputConfig | None = Field(
        None, description="teacher: its own normalisation/resolution (kdkit.engine.teacher_input)"
    )


class ResizedCropConfig(Strict):
    """Random-resized crop (Szegedy et al. 2015; torchvision's ``RandomResizedCrop``): a window of
    ``scale`` times the image's area and aspect ``ratio``, resized to ``size`` x ``size``."""

    size: int = Field(224, ge=1)
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)


class MixupConfig(Strict):
    """Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) with a per-sample partner
    (:mod:`kdkit.data.mixup`); the defaults are timm's ImageNet recipe. An alpha of 0 turns one off."""

    mixup_alpha: float = Field(0.8, ge=0, description="Beta(alpha, alpha) of mixup's lambda; 0: off")
    cutmix_alpha: float = Field(1.0, ge=0, description="Beta(alpha, alpha) of CutMix's lambda; 0: off")
    prob: float = Field(1.0, ge=0, le=1, description="share of samples mixed")
    switch_prob: float = Field(0.5, ge=0, le=1, description="with both on: share mixed by CutMix")

    @model_validator(mode="after")
    def _one_on(self) -> MixupConfig:
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            raise ValueError("mixup_alpha and cutmix_alpha are both 0; set one, or remove data.augment.mixup")
        return self


class AugmentConfig(Strict):
    """Training augmentation. Classification: padded random crop + flip on the batch, or, with
    ``resized_crop`` / ``color_jitter`` / ``randaugment``, per image at decode time (ImageNet recipe;
    the flip then too, and no padded crop). Segmentation: random scale,
    crop (padding images with 0 and masks with the ignore index), flip; masks use nearest neighbours.
    Detection: random scale, crop/pad to ``crop`` and flip, boxes moved with the image (dropped when they
    leave it); ``crop`` is also the size differently sized images are letterboxed to for evaluation."""

    crop_padding: int = Field(4, ge=0, description="classification: zero padding of the random crop")
    flip: bool = True
    scale: tuple[float, float] = Field((1.0, 1.0), description="segmentation/detection: random rescale range")
    crop: tuple[int, int] | None = Field(
        None, description="segmentation/detection: [H, W] crop; default image size"
    )
    resized_crop: ResizedCropConfig | None = Field(
        None, description="classification: random-resized crop per image at decode time"
    )
    color_jitter: tuple[float, float, float] | None = Field(
        None, description="classification: brightness, contrast, saturation jitter per image at decode time"
    )
    randaugment: tuple[int, int] | None = Field(
        None, description="classification: RandAugment [num_ops, magnitude] per image at decode time"
    )
    mixup: MixupConfig | None = Field(
        None, description="classification: mixup/CutMix with a per-sample partner (soft-label targets)"
    )

    @property
    def at_decode(self) -> bool:
        """Whether part of the augmentation runs per image when it is decoded (:mod:`kdkit.data.decode`)."""
        return any(x is not None for x in (self.resized_crop, self.color_jitter, self.randaugment))

    @model_validator(mode="after")
    def _ordered_scale(self) -> AugmentConfig:
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be [low, high] with 0 < low <= high, got {list(self.scale)}")
        return self


class MixConfig(Strict):
    """A second dataset mixed into the training split at ``ratio`` = target images per mixed-in image
    (Enhanced Spirit Distillation's r; 0 means mixed-in images only)."""

    name: str
    root: str | None = None
    split: str = "train"
    params: dict[str, Any] = {}
    ratio: float = Field(1.0, ge=0)


class DataConfig(Strict):
    """A registered dataset; ``params`` go to its builder (``eval_params`` override them for evaluation)."""

    name: str = "embedded"
    root: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    params: dict[str, Any] = {}
    eval_params: dict[str, Any] = {}
    batch_size: int = Field(128, ge=1, description="global batch, split over processes")
    eval_batch_size: int = Field(256, ge=1)
    num_workers: int = Field(0, ge=0)
    augment: AugmentConfig = AugmentConfig()
    mix: MixConfig | None = Field(None, description="unlabelled proximity-domain images mixed into training")


class EvalConfig(Strict):
    """How segmentation is evaluated: whole images or overlapping sliding windows, and the
    HP-Acc threshold of Spirit Distillation (Eq. 7-8)."""

    mode: Literal["whole", "slide"] = "whole"
    crop: tuple[int, int] | None = Field(None, description="slide: window [H, W]")
    stride: tuple[int, int] | None = Field(None, description="slide: step [H, W]; default 2/3 of the window")
    hp_threshold: float = Field(0.75, gt=0, lt=1)
    metric: Literal["miou", "miou_per_image"] = Field(
        "miou", description="headline: dataset mIoU or mean per-image mIoU (Spirit Distillation Eq. 5)"
    )

    @model_validator(mode="after")
    def _window(self) -> EvalConfig:
        if self.mode == "slide" and self.crop is None:
            raise ValueError("mode 'slide' needs crop: [H, W]")
        return self


class TermConfig(BaseModel):
    """A registered term with its weight; other keys are the term's constructor arguments."""

    model_config = ConfigDict(extra="allow")
    name: str
    weight: float = 1.0

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimizerConfig(Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)


class ScheduleConfig(Strict):
    """Learning-rate schedule in the stage's unit (epochs, or steps for step-based stages)."""

    name: Literal["multistep", "cosine", "poly", "constant"] = "multistep"
    milestones: list[float] = []
    gamma: float = 0.1
    power: float = 0.9
    min_factor: float = Field(0.0, ge=0, description="floor of the lr multiplier (cosine, poly)")
    warmup: float = Field(0.0, ge=0, description="linear warm-up length, same unit as the stage")


class RefinerUpdateConfig(Strict):
    """When a learnable refiner updates: before every ``every``-th student step of the listed epochs,
    ``iterations`` updates on that step's batch (see :mod:`kdkit.engine.refining`)."""

    epochs: list[int] | None = Field(None, description="1-based epochs of the stage; default: every epoch")
    every: int = Field(1, ge=1, description="student steps between refiner phases")
    iterations: int = Field(1, ge=1, description="refiner updates per phase")


class RefinerConfig(BaseModel):
    """A registered refiner; ``stages``, ``optimizer``, ``schedule`` and ``update`` are the engine's
    (a learnable refiner needs an optimizer), other keys are the refiner's constructor arguments."""

    model_config = ConfigDict(extra="allow")
    name: str
    stages: list[str] | None = Field(None, description="names of the stages it runs in; default: all")
    optimizer: OptimizerConfig | None = Field(None, description="a learnable refiner's optimizer")
    schedule: ScheduleConfig = ScheduleConfig(name="constant")
    update: RefinerUpdateConfig = RefinerUpdateConfig()

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class StageConfig(Strict):
    """One stage: its terms, trainable student parameters, optimizer, schedule and length.

    ``eval_every`` is in the stage's unit: epochs when the stage sets ``epochs`` (an evaluation at the
    end of every ``eval_every``-th epoch), steps when it sets ``steps`` (every ``eval_every`` steps,
    counted from the stage's start). The stage's last step always evaluates, and each evaluation
    writes a checkpoint.
    """

    name: str = "main"
    epochs: int | None = Field(None, ge=1)
    steps: int | None = Field(None, ge=1)
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: list[str] = Field(["*"], description="glob patterns on student parameter names")
    terms: list[TermConfig] | None = Field(None, description="default: the run's terms")
    data: DataConfig | None = Field(None, description="default: the run's data")
    eval_every: int = Field(
        1, ge=1, description="epochs (or steps for step-based stages) between evaluations"
    )

    @model_validator(mode="after")
    def _one_length(self) -> StageConfig:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("set exactly one of 'epochs' and 'steps'")
        return self


class TeacherCacheConfig(Strict):
    """The teacher-output cache (:mod:`kdkit.engine.teacher_cache`): logits per (stage, epoch, sample)."""

    enabled: bool = Field(False, description="replay the teacher's logits from the cache; fill it as needed")
    topk: int = Field(0, ge=0, description="0: full fp32 logits (exact replay); k: top-k fp16 + logsumexp")
    dir: str | None = Field(None, description="default: $KDKIT_CACHE/teacher-outputs")


class RuntimeConfig(Strict):
    device: str = "auto"
    threads: int | Literal["auto"] = Field(
        0,
        description="CPU intra-op threads; 0 or auto: OMP_NUM_THREADS if set, else the free cores "
        "(available CPUs less the load average, shared among torchrun's local processes)",
    )
    precision: Literal["fp32", "bf16", "auto"] = "fp32"  # auto: bf16 where the device computes it natively
    channels_last: bool = Field(
        True, description="NHWC memory for the models and batches (0.71-1.02x an NCHW step's time on the CPU)"
    )
    compile: bool = False
    deterministic: bool = False
    sync_batchnorm: bool = Field(True, description="under torchrun, batch norm over the global batch")
    seed: int = 0
    out_dir: str = "runs"
    checkpoint_every_steps: int = Field(0, ge=0, description="0: at the end of each epoch only")
    log_every: int = Field(20, ge=1)
    progress: bool = True
    teacher_cache: TeacherCacheConfig = TeacherCacheConfig()

    @model_validator(mode="after")
    def _threads_not_negative(self) -> RuntimeConfig:
        if isinstance(self.threads, int) and self.threads < 0:
            raise ValueError("runtime.threads must be a positive count, or 0 / auto for the default")
        return self


class RunConfig(Strict):
    name: str = "run"
    task: Literal["classification", "segmentation", "detection"] = "classification"
    data: DataConfig = DataConfig()
    evaluation: EvalConfig = EvalConfig()
    teacher: ModelConfig | None = None
    student: ModelConfig
    terms: list[TermConfig] = [TermConfig(name="ce")]
    refiners: list[RefinerConfig] = []
    stages: list[StageConfig] = [StageConfig(epochs=1)]
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _refiner_stages(self) -> RunConfig:
        if self.student.input is not None:
            raise ValueError("student.input: the student takes the data's input; only a teacher has its own")
        names = [stage.name for stage in self.stages]
        for i, refiner in enumerate(self.refiners):
            for name in refiner.stages or []:
                if name not in names:
                    raise ValueError(
                        f"refiners[{i}] ({refiner.name}): no stage named '{name}' (stages: {names})"
                    )
            if refiner.update.epochs is not None and any(e < 1 for e in refiner.update.epochs):
                raise ValueError(f"refiners[{i}] ({refiner.name}): update.epochs count from 1")
        return self

    def stage_terms(self, stage: StageConfig) -> list[TermConfig]:
        return self.terms if stage.terms is None else stage.terms

    def stage_data(self, stage: StageConfig) -> DataConfig:
        return self.data if stage.data is None else stage.data
