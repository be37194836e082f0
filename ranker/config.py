"""Typed configuration: one YAML file, validated by pydantic where it enters.

Every model forbids unknown keys, so a typo such as ``epoch:`` is an error naming the key
rather than a silently ignored setting. Imports nothing else of ranker's but ``errors``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Annotated, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from ranker.errors import RankerError

ARCHITECTURE_NAMES = ("shared_bottom", "mmoe", "ple", "cross_stitch")
# train.task_sampling.strategy: how often each data source supplies the batch (training.sources)
SAMPLING_STRATEGIES = ("proportional", "uniform", "temperature")
# how a dense feature reaches the model (see ranker.features): standard = z-score; log1p = z-score
# of sign(x) log1p(|x|); piecewise_linear = position among quantile bin edges, embedded per feature
# (Gorishniy et al., NeurIPS 2022, PLE); periodic = sin/cos of trainable frequencies of the same
# quantile position, then linear + ReLU (the paper's PLR)
NUMERIC_ENCODINGS = ("standard", "log1p", "piecewise_linear", "periodic")
EMBEDDED_ENCODINGS = ("piecewise_linear", "periodic")
# the default needs no hand transform: quantile bins do not care about heavy tails or units
DEFAULT_ENCODING = "piecewise_linear"
DEFAULT_BINS = 32  # quantile bins per embedded dense feature (fewer where values repeat)
DEFAULT_NUMERIC_DIM = 12  # embedding width per embedded dense feature (8 -> 12 on census val)


def _kinds(annotation: object) -> set[object]:
    """The plain types an annotation admits (through ``X | None``, ``Annotated`` and lists)."""
    args = get_args(annotation)
    if not args:
        return {annotation}
    return set().union(*(_kinds(a) for a in args if not isinstance(a, FieldInfo)))


def _one_of(what: str, v: str, names: Sequence[str]) -> str:
    """``v`` if it is one of ``names``; otherwise an error listing the valid ones."""
    if v not in names:
        raise ValueError(f"unknown {what} {v!r}; valid: {', '.join(names)}")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_flag_for_a_number(cls, v: object, info: ValidationInfo) -> object:
        # pydantic's lax mode reads ``epochs: true`` as 1; a YAML true/false is never a count
        if isinstance(v, bool) and info.field_name is not None:
            kinds = _kinds(cls.model_fields[info.field_name].annotation)
            if bool not in kinds and kinds & {int, float}:
                raise ValueError(f"needs a number, not {str(v).lower()}")
        return v


PositiveInt = Annotated[int, Field(gt=0)]


class DataConfig(_Strict):
    train: str = Field(min_length=1)  # a file, a folder (sub-folders included) or a glob
    val: str = Field(min_length=1)
    test: str | None = Field(default=None, min_length=1)


class FeatureSpec(_Strict):
    name: str = Field(min_length=1)
    # categorical: one int64 or string value; multi_hot: list<int64|string>; dense: a number
    type: Literal["categorical", "multi_hot", "dense"]
    column: str | None = Field(default=None, min_length=1)  # the Parquet column; defaults to ``name``
    buckets: PositiveInt | None = None  # hash buckets (categorical, multi_hot); +1 for "missing"
    dim: PositiveInt | None = None  # embedding width (categorical, multi_hot)
    # dense only, the older spelling of ``encoding: log1p``: log1p compresses heavy tails
    # (counts, money) before standardisation. Kept so existing configs mean what they meant.
    transform: Literal["none", "log1p"] = "none"
    # dense only; unset = log1p where ``transform: log1p`` is given, else DEFAULT_ENCODING.
    # Always set once validated, so a bundle's config says exactly what the model was trained on.
    encoding: Literal["standard", "log1p", "piecewise_linear", "periodic"] | None = None
    # piecewise_linear / periodic: the most quantile bins (edges come from the training pass)
    bins: Annotated[int, Field(ge=1, le=1024)] | None = None

    @property
    def source(self) -> str:
        return self.column or self.name

    @property
    def embedded(self) -> bool:
        """A dense feature the model embeds (``dim`` wide) rather than taking as one number."""
        return self.type == "dense" and self.encoding in EMBEDDED_ENCODINGS

    @model_validator(mode="before")
    @classmethod
    def _resolve_encoding(cls, data: object) -> object:
        """Fill in a dense feature's encoding (and its bins and width) from the defaults."""
        if not isinstance(data, dict) or data.get("type") != "dense":
            return data
        data = dict(data)
        name, enc, tr = data.get("name"), data.get("encoding"), data.get("transform", "none")
        if tr == "log1p":
            if enc in (None, "standard", "log1p"):
                enc = "log1p"
            else:
                raise ValueError(f"feature {name!r}: 'transform: log1p' is the older spelling of 'encoding: log1p'; "
                                 f"{enc} works on quantiles, which a monotone transform does not change: drop 'transform'")
        data["encoding"] = enc or DEFAULT_ENCODING
        if data["encoding"] in EMBEDDED_ENCODINGS:
            for key, default in (("bins", DEFAULT_BINS), ("dim", DEFAULT_NUMERIC_DIM)):
                if data.get(key) is None:
                    data[key] = default
        return data

    @model_validator(mode="after")
    def _check_kind(self) -> FeatureSpec:
        if self.type in ("categorical", "multi_hot"):
            if self.buckets is None or self.dim is None:
                raise ValueError(f"feature {self.name!r}: type {self.type} needs 'buckets' and 'dim'")
            if self.transform != "none":
                raise ValueError(f"feature {self.name!r}: 'transform' applies to dense features only")
            if self.encoding is not None or self.bins is not None:
                raise ValueError(f"feature {self.name!r}: 'encoding' and 'bins' apply to dense features only")
        elif self.buckets is not None:
            raise ValueError(f"feature {self.name!r}: dense features take no 'buckets'")
        elif not self.embedded and (self.dim is not None or self.bins is not None):
            raise ValueError(f"feature {self.name!r}: 'dim' and 'bins' apply to encodings {' and '.join(EMBEDDED_ENCODINGS)} only")
        return self


class TaskSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    type: Literal["binary", "regression"]
    label: str | None = Field(default=None, min_length=1)  # required unless ``product`` is set
    # rows where this label column is not 1 add nothing to the task's loss or metrics
    mask: str | None = Field(default=None, min_length=1)
    # regression only: the model learns MSE on transform(label); scores come back in label units
    transform: Literal["none", "log1p"] = "none"
    weight: float = Field(default=1.0, ge=0.0)  # used by the ``static`` weighting
    # ESMM (Ma et al., SIGIR 2018): p(task) = product of these binary tasks' p, e.g. pCTCVR =
    # pCTR x pCVR. No tower of its own; its label is the product of theirs (0 once any is 0), so
    # it is defined on every row even where a factor is masked.
    product: list[str] = Field(default_factory=list)
    # False: the head is evaluated and served but has no loss of its own; it learns only through
    # a product task (ESMM's cvr, free of the click-space sample-selection bias)
    loss: bool = True
    # the task's own logs (e.g. purchase logs for cvr): it is trained on data.train, validated on
    # data.val and tested on data.test of these; None = the top-level ``data``. Tasks with equal
    # ``data`` share one source; train.task_sampling picks the source of each batch
    data: DataConfig | None = None
    # position-bias correction (YouTube's shallow tower, Zhao et al. RecSys 2019; PAL, Guo et al.
    # RecSys 2019): these declared features feed a small tower whose logit adds to this task's in
    # training only. They are not encoder inputs; serving never needs them, and the served score
    # is the bias-free one.
    bias_features: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_transform(self) -> TaskSpec:
        if self.type == "binary" and self.transform != "none":
            raise ValueError(f"task {self.name!r}: 'transform' applies to regression tasks only")
        if self.product:
            if self.type != "binary" or self.label is not None or self.mask is not None:
                raise ValueError(f"task {self.name!r}: a 'product' task is binary and takes no 'label' or 'mask'")
            if len(self.product) < 2 or len(set(self.product)) != len(self.product):
                raise ValueError(f"task {self.name!r}: 'product' needs two or more distinct task names")
        elif self.label is None:
            raise ValueError(f"task {self.name!r}: needs a 'label' column (or a 'product' of tasks)")
        elif self.mask == self.label:
            raise ValueError(f"task {self.name!r}: 'mask' is its own label column {self.label!r}, "
                             "so it would see positives only")
        if self.product and self.data is not None:
            raise ValueError(f"task {self.name!r}: a 'product' task reads its factors' data and takes no 'data' of its own")
        if self.bias_features and (self.type != "binary" or self.product or not self.loss):
            raise ValueError(f"task {self.name!r}: 'bias_features' need a binary task with a label and a loss of its own")
        if len(set(self.bias_features)) != len(self.bias_features):
            raise ValueError(f"task {self.name!r}: 'bias_features' names a feature twice")
        return self


class ModelConfig(_Strict):
    architecture: str = "mmoe"
    experts: PositiveInt = 8  # mmoe: experts in the pool
    expert_dims: list[PositiveInt] = Field(default_factory=lambda: [128, 64])
    tower_dims: list[PositiveInt] = Field(default_factory=lambda: [32])
    # ple: experts shared by all tasks and owned by each task, per CGC level
    shared_experts: PositiveInt = 2
    specific_experts: PositiveInt = 2
    levels: PositiveInt = 1
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    # in training, each row drops each whole input feature (its embedding, bag or dense value)
    # with this probability, the others scaled by 1 / (1 - p): a model that cannot lean on any
    # one column also learns from the weak ones (ranker.model.encoder); 0 = off
    feature_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    # cross_stitch: initial weight of a column on itself in every stitch (the rest is spread over
    # the other columns); near 1 starts close to separate networks
    stitch_self: float = Field(default=0.9, ge=0.0, le=1.0)
    # FiLM on any trunk: per-task gamma * h + beta from a learned task embedding of width
    # film_dim, and from the row's encoder output too when film_input
    film: bool = False
    film_input: bool = False
    film_dim: PositiveInt = 16
    # DCN-v2 cross layers (Wang et al., WWW 2021) on the encoder output, before the trunk:
    # x_{l+1} = x_0 * (W_l x_l + b_l) + x_l. 0 = none.
    cross_layers: int = Field(default=0, ge=0, le=16)
    # low-rank cross layers: W_l = U_l V_l^T of this rank (DCN-v2's cheaper form); None = full rank
    cross_rank: PositiveInt | None = None
    # periodic dense encoding: frequencies per feature, drawn N(0, sigma^2) and then trained
    periodic_frequencies: PositiveInt = 16
    periodic_sigma: float = Field(default=1.0, gt=0)
    # hidden widths of each position-bias tower (tasks[].bias_features); [] = one linear layer
    bias_tower_dims: list[PositiveInt] = Field(default_factory=lambda: [16])
    # the tower's logit = gain x its output layer: an effective 10x learning rate there, so the
    # tower learns the position effect before the main model absorbs it (ranker.model.bias)
    bias_tower_gain: float = Field(default=10.0, gt=0)

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, v: str) -> str:
        return _one_of("architecture", v, ARCHITECTURE_NAMES)

    @field_validator("expert_dims")
    @classmethod
    def _non_empty(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("needs at least one layer width")
        return v

    @model_validator(mode="after")
    def _film_keys(self) -> ModelConfig:
        if self.film_input and not self.film:
            raise ValueError("film_input: needs 'film: true'")
        if self.cross_rank is not None and not self.cross_layers:
            raise ValueError("cross_rank: applies to cross layers only; set cross_layers too")
        return self


class GradientParams(_Strict):
    # where task gradients are taken: every shared parameter (exact), or the encoder output that
    # all tasks share (one (B, in) tensor: cheaper, and MGDA-UB's upper bound). Not named "on":
    # YAML 1.1 reads an unquoted ``on`` key as the boolean true
    gradients: Literal["parameters", "representation"] = "parameters"


class GradNormParams(GradientParams):
    alpha: float = Field(default=1.5, ge=0)  # pull toward equal training rates; 0 = equal grad norms
    # the paper takes the last shared layer's weights; "representation" is the encoder output every trunk reads
    gradients: Literal["parameters", "representation"] = "representation"


class DWAParams(_Strict):
    temperature: float = Field(default=2.0, gt=0)  # higher = weights closer to uniform


class MGDAParams(GradientParams):
    # gradient scaling before the min-norm solve (Sener & Koltun's code): loss+ = g / (L * |g|)
    normalization: Literal["none", "l2", "loss", "loss+"] = "loss+"
    gradients: Literal["parameters", "representation"] = "representation"  # MGDA-UB


class CAGradParams(GradientParams):
    c: float = Field(default=0.4, ge=0)  # radius around the mean gradient; 0 = plain mean


class FAMOParams(_Strict):
    lr: float = Field(default=0.025, gt=0)  # step size of the task logits
    gamma: float = Field(default=1e-3, ge=0)  # weight decay on the task logits
    # where each step's "after" losses come from: the next batch's losses (free, one step of
    # lag) or a second forward on the same batch once the optimiser has stepped (the paper's)
    after_loss: Literal["next_batch", "same_batch"] = "next_batch"


class WeightingParams(_Strict):
    """Hyperparameters per weighting method, one section named after the method. Sections of
    methods other than ``train.weighting`` are allowed, so a sweep keeps each method's settings."""

    gradnorm: GradNormParams = Field(default_factory=GradNormParams)
    dwa: DWAParams = Field(default_factory=DWAParams)
    pcgrad: GradientParams = Field(default_factory=GradientParams)
    mgda: MGDAParams = Field(default_factory=MGDAParams)
    cagrad: CAGradParams = Field(default_factory=CAGradParams)
    famo: FAMOParams = Field(default_factory=FAMOParams)


class CheckpointConfig(_Strict):
    """Resumable training state written atomically during training (``ranker train --resume``)."""

    dir: str  # relative paths resolve against the config file's folder
    every_steps: PositiveInt | None = None  # a checkpoint every N optimiser steps ...
    every_minutes: float | None = Field(default=None, gt=0)  # ... or every N minutes of training
    keep: PositiveInt = 2  # newest checkpoints kept; older ones are deleted after a good write

    @model_validator(mode="after")
    def _one_interval(self) -> CheckpointConfig:
        if (self.every_steps is None) == (self.every_minutes is None):
            raise ValueError("set exactly one of 'every_steps' and 'every_minutes'")
        return self


class TaskSampling(_Strict):
    """How training batches draw on the sources when tasks read different data
    (``ranker.training.sources``): rates from the sources' train rows n_s. proportional:
    n_s / sum n; uniform: 1 / sources; temperature: n_s^(1/T) normalised (T5's rule: T = 1 is
    proportional, large T tends to uniform). ``mix`` says whether a rate is a share of every
    batch's rows or a share of the steps."""

    strategy: str = "proportional"
    temperature: float | None = Field(default=None, gt=0)  # T: set with the temperature strategy only
    # how the rates apply: rows = every batch holds rows of every source, a sub-batch of
    # round(r_s * batch_size) rows each (under proportional rates, a batch of the pooled logs);
    # batches = every batch is one source's, source s supplying a share r_s of the steps
    mix: Literal["rows", "batches"] = "rows"

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        return _one_of("strategy", v, SAMPLING_STRATEGIES)

    @model_validator(mode="after")
    def _temperature_used(self) -> TaskSampling:
        if (self.temperature is not None) != (self.strategy == "temperature"):
            raise ValueError("temperature: set it with strategy 'temperature' (T5 used 2 or more), and only then")
        return self


class LrSchedule(_Strict):
    """How the learning rate moves from ``train.lr`` over training (``ranker.training.schedule``).

    constant: ``lr`` throughout. plateau: multiply it by ``factor`` whenever the val monitor has
    not improved for ``patience`` epochs (the counter restarts after each cut), never below
    ``min_factor`` x ``lr``. cosine: from ``lr`` down to ``min_factor`` x ``lr`` along half a
    cosine over ``train.epochs``, updated every step.
    """

    type: Literal["constant", "plateau", "cosine"] = "constant"
    factor: float = Field(default=0.5, gt=0.0, lt=1.0)
    patience: PositiveInt = 1
    min_factor: float = Field(default=0.01, ge=0.0, le=1.0)


class TrainConfig(_Strict):
    batch_size: PositiveInt = 1024
    epochs: PositiveInt = 5
    lr: float = Field(default=1e-3, gt=0)
    lr_schedule: LrSchedule = Field(default_factory=LrSchedule)
    weight_decay: float = Field(default=1e-5, ge=0)
    # categorical tables and bags: row-sparse gradients and a lazy Adam that moves only the rows
    # a step looked up (no weight decay on them); a step then costs what the batch touches, not
    # the tables' size (ranker.training.optim). Off: fused AdamW over every row
    sparse_embeddings: bool = False
    weighting: str = "uncertainty"  # checked against the registry in training.weighting
    weighting_params: WeightingParams = Field(default_factory=WeightingParams)
    # per epoch: task-gradient cosines/norms and gate usage on this many sampled steps; 0 = off
    diagnostics_batches: int = Field(default=8, ge=0)
    seed: int = Field(default=0, ge=0, lt=2**63)  # numpy wants >= 0, torch a signed 64-bit integer
    # early stopping: "mean" = mean of each task's primary metric (AUC, or R^2 for regression),
    # or "TASK.METRIC" such as "ctr.auc" / "watch.rmse"; orientation is known per metric
    monitor: str = "mean"
    patience: PositiveInt = 2
    shuffle_buffer: PositiveInt = 200_000  # rows held for shuffling; bounds memory
    threads: int | None = Field(default=None, gt=0)  # torch intra-op threads; None = all cores
    progress: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when torch sees a device
    # autocast precision of forward and loss; weights, optimiser state and bundles stay fp32.
    # fp16 adds dynamic loss scaling (GradScaler); bf16 needs none
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # how ranks split each epoch (torchrun): row_groups = disjoint, balanced shares of the Parquet
    # row groups per rank; batches = every rank reads the whole stream and takes its slice of each
    # global batch, so N ranks see exactly one process's batches (costs N x the reading)
    sharding: Literal["row_groups", "batches"] = "row_groups"
    checkpoint: CheckpointConfig | None = None
    log_dir: str | None = None  # TensorBoard scalars (losses, metrics, weights, diagnostics)
    # tasks with their own ``data``: how batches are drawn from the sources (one source: unused)
    task_sampling: TaskSampling = Field(default_factory=TaskSampling)

    @model_validator(mode="after")
    def _cut_before_stop(self) -> TrainConfig:
        ls = self.lr_schedule
        if ls.type == "plateau" and ls.patience >= self.patience:
            raise ValueError(f"lr_schedule.patience: {ls.patience} must be below train.patience ({self.patience}), "
                             "or early stopping ends training before the first cut")
        return self


class AuditConfig(_Strict):
    # ``ranker audit``: a column of event times (timestamp, date or number) for the temporal
    # checks; ``--time-column`` overrides it
    time_column: str | None = Field(default=None, min_length=1)


class RankerConfig(_Strict):
    data: DataConfig
    features: list[FeatureSpec] = Field(min_length=1)
    tasks: list[TaskSpec] = Field(min_length=1)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)

    @model_validator(mode="after")
    def _unique_names(self) -> RankerConfig:
        for kind, names in (
            ("feature", [f.name for f in self.features]),
            ("task", [t.name for t in self.tasks]),
        ):
            seen: set[str] = set()
            for n in names:
                if n in seen:
                    raise ValueError(f"duplicate {kind} name {n!r}")
                seen.add(n)
        binary = {t.name for t in self.tasks if t.type == "binary" and not t.product}
        factors = {f for t in self.tasks for f in t.product}
        for t in self.tasks:
            for f in t.product:
                if f not in binary:
                    raise ValueError(f"task {t.name!r}: product factor {f!r} is not a binary task with a label")
        for t in self.tasks:
            if not t.loss and t.name not in factors:
                raise ValueError(f"task {t.name!r}: 'loss: false' needs the task to be a factor of a product task, or it never learns")
        by_name = {t.name: t for t in self.tasks}
        for t in self.tasks:  # a product's label needs its factors' labels on the same rows
            homes = {f: by_name[f].data for f in t.product}
            if len(set(homes.values())) > 1:
                raise ValueError(f"task {t.name!r}: product factors {', '.join(t.product)} read different data; "
                                 "a product task needs its factors in one source")
        feats = {f.name: f for f in self.features}
        for t in self.tasks:
            for b in t.bias_features:
                if b not in feats:
                    raise ValueError(f"task {t.name!r}: bias feature {b!r} is not a declared feature")
                if feats[b].type == "multi_hot":
                    raise ValueError(f"task {t.name!r}: bias feature {b!r} must be categorical or dense")
        if all(f.name in self.bias_feature_names for f in self.features):
            raise ValueError("every feature is a bias feature: the encoder needs at least one input")
        labels = {t.label for t in self.tasks if t.label} | {t.mask for t in self.tasks if t.mask}
        for f in self.features:
            if f.source in labels:
                raise ValueError(f"feature {f.name!r} reads label column {f.source!r}: a label cannot be an input")
        return self

    @property
    def bias_feature_names(self) -> list[str]:
        """Features named by any task's ``bias_features``, in config order: training-only inputs."""
        named = {b for t in self.tasks for b in t.bias_features}
        return [f.name for f in self.features if f.name in named]

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)


def _location(loc: tuple[str | int, ...], raw: object) -> str:
    """Render a pydantic error location as a YAML-ish key path, naming list items by name."""
    parts: list[str] = []
    node = raw
    for item in loc:
        if isinstance(item, int) and isinstance(node, list) and item < len(node):
            node = node[item]
            name = node.get("name") if isinstance(node, dict) else None
            label = name if isinstance(name, str) and name else item  # a name of another type would read as an index
            parts[-1] = f"{parts[-1]}[{label}]" if parts else str(item)
        else:
            parts.append(str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts) or "(top level)"


def parse_config(raw: object, source: str = "config") -> RankerConfig:
    """Validate a parsed YAML/JSON mapping; errors name ``source`` and the key at fault."""
    if not isinstance(raw, dict):
        raise RankerError(f"{source}: expected a mapping at the top level")
    try:
        return RankerConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = _location(tuple(err["loc"]), raw)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        raise RankerError(f"{source}: {where}: {msg}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load keeps the last of two equal keys without a word: a second ``train:``
    block dropped the first's settings. Here a repeated key is an error naming it and its line."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} at line {key_node.start_mark.line + 1}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path) -> RankerConfig:
    """Read and validate a YAML config. Relative data paths resolve against the file's folder."""
    p = Path(path)
    if p.is_dir():
        raise RankerError(f"{p}: is a folder; --config takes the YAML file")
    if not p.is_file():
        raise RankerError(f"{p}: config file not found")
    try:
        raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError as e:
        raise RankerError(f"{p}: not valid YAML (not UTF-8 text: byte {e.start})") from None
    except yaml.YAMLError as e:
        raise RankerError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    cfg = parse_config(raw, str(p))
    base = p.resolve().parent

    def _abs(s: str | None) -> str | None:
        if s is None or Path(s).is_absolute():
            return s
        return str(base / s)

    def _abs_data(d: DataConfig) -> DataConfig:
        return d.model_copy(update={k: _abs(getattr(d, k)) for k in ("train", "val", "test")})

    data = _abs_data(cfg.data)
    tasks = [t.model_copy(update={"data": _abs_data(t.data)}) if t.data is not None else t for t in cfg.tasks]
    tc = cfg.train
    update: dict[str, object] = {"log_dir": _abs(tc.log_dir)}
    if tc.checkpoint is not None:
        update["checkpoint"] = tc.checkpoint.model_copy(update={"dir": _abs(tc.checkpoint.dir)})
    return cfg.model_copy(update={"data": data, "tasks": tasks, "train": tc.model_copy(update=update)})
