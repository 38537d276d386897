"""The typed experiment config: one pydantic model, validated as a whole before anything starts.

Style of torchtune's config checks and nanoGPT's overrides (STYLE.md): every error is reported at once, each
naming its key path (``optim.lr: must be > 0``); enums and loss names list their choices; unknown keys are
rejected (``extra="forbid"``: a typo fails instead of being ignored); a data path with no prepared manifest is
named unless a ``data.prepare`` block says how to make it. ``--set key.sub=value`` overrides are parsed as
YAML values (``--set optim.lr=0.05 --set optim.milestones=[100,150]``).

Sections (pipelines/configs/*.yaml are the worked examples): ``name``; ``data`` (prepared shards, augmentation
preset, training view, optional ``prepare`` block); ``model``; ``loss`` (``dynamic`` or any
``dynloss.losses.build_loss`` name); ``dynamic`` (the meta-learning knobs, DESIGN.md section 3);
``sampling`` (hierarchical metadata sampling); ``optim``; ``train``; ``scaling`` (Ray Train workers);
``run`` (storage, name, failures, MLflow). Paths are relative to the working directory.

    python -c "from dynloss.config import load_config; \
print(load_config('pipelines/configs/digits.yaml', ['optim.lr=0.05']).optim)"
"""
from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from dynloss.data import SOURCES
from dynloss.data.storage import is_uri
from dynloss.data.transforms import PRESETS as AUG_PRESETS
from dynloss.losses import LOSSES, needs_class_counts
from dynloss.losses import PRESETS as LOSS_PRESETS
from dynloss.models import MODELS
from dynloss.noise import CONVENTIONS, PROFILES, parse_noise

DYNAMIC = "dynamic"
# YAML 1.1 reads a bare on / off as a boolean (`--set train.amp=off`): take it as the word it was
Switch = Annotated[Literal["auto", "on", "off"],
                   BeforeValidator(lambda v: ("on" if v else "off") if isinstance(v, bool) else v)]


class ConfigError(ValueError):
    """A config failed validation; ``errors`` holds one ``"key.path: what is wrong"`` line per problem."""

    def __init__(self, errors: Sequence[str], source: str = "config"):
        self.errors = list(errors)
        lines = "\n".join(f"  {e}" for e in self.errors)
        super().__init__(f"{source}: {len(self.errors)} error{'s' * (len(self.errors) != 1)}\n{lines}")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _choices(value: str, valid: Iterable[str], what: str) -> str:
    valid = sorted(valid)
    if value not in valid:
        close = difflib.get_close_matches(str(value), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown {what} {value!r}{hint}; valid: {', '.join(valid)}")
    return value


# ----------------------------------------------------------------------------------------------- sections
class Prepare(Section):
    """Run ``python -m pipelines.prepare`` first when ``data.path`` holds no manifest (one-command jobs)."""
    source: str
    root: str | None = None
    imbalance: float | None = Field(None, gt=0, le=1)
    imbalance_profile: Literal[PROFILES] = "exp"  # type: ignore[valid-type]
    noise: str = "none"
    convention: Literal[CONVENTIONS] = "prior"  # type: ignore[valid-type]
    seed: int = 0
    args: list[str] = Field(default_factory=list, description="extra pipelines.prepare arguments")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return _choices(v, SOURCES, "source")

    @field_validator("noise")
    @classmethod
    def _noise(cls, v: str) -> str:
        parse_noise(v)
        return v


class Data(Section):
    path: str
    preset: str | None = None  # None: the manifest source's default (dynloss.data.transforms.SOURCE_PRESETS)
    preset_params: dict[str, Any] = Field(default_factory=dict)
    train_view: Literal["weak", "strong"] = "weak"
    eval_split: str = "test"
    shuffle: Literal["full", "blocks", "none"] = "full"  # "none": id order every epoch (debugging, driver checks)
    decode_cpus: float = Field(1.0, gt=0)
    decode_concurrency: int | None = Field(None, ge=1)
    decode_on: Literal["ray_data", "device"] = "ray_data"  # who decodes the training stream: Ray Data's CPU tasks, or
    #   each training worker on its device (JPEGs by nvJPEG on a GPU; pipelines.data.iter_train_batches), the meta
    #   batches too; the ranking and evaluation passes are decoded once and kept either way
    in_memory_mb: float = Field(512, ge=0)  # a split whose shards total at most this is held encoded in Ray's object
    #                                         store and ordered inside its decode tasks (pipelines.data.build_dataset);
    #                                         larger ones stream from parquet; 0 always streams
    cache_mb: float = Field(1024, ge=0)  # per worker: decoded ranking/eval passes kept after their first pass when
    #                                      they fit (dynloss.data.cache), read by the worker itself, not streamed
    #                                      (pipelines.train_worker.in_worker_passes); 0 streams them every epoch
    prepare: Prepare | None = None

    @field_validator("preset")
    @classmethod
    def _preset(cls, v: str | None) -> str | None:
        return v if v is None else _choices(v, AUG_PRESETS, "augmentation preset")


class Model(Section):
    name: str = "resnet32"
    pretrained: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _choices(v, MODELS, "model")


class Loss(Section):
    name: str = DYNAMIC
    params: dict[str, Any] = Field(default_factory=dict)
    preset: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _choices(v, [*LOSSES, DYNAMIC], "loss")

    @field_validator("preset")
    @classmethod
    def _preset(cls, v: str | None) -> str | None:
        return v if v is None else _choices(v, LOSS_PRESETS, "loss preset")


class Dynamic(Section):
    scope: Literal["full", "head"] = "full"
    meta_grad: Literal["jvp", "finite_difference", "double_backward"] = "jvp"  # scope full: the exact meta-gradient
    #   at the logits with one JVP; a logit difference instead of the JVP (cheaper, approximate); or the authors'
    #   second-order graph through the network (dynloss.meta)
    meta_interval: int = Field(1, ge=1)
    warmup_epochs: int = Field(5, ge=0)
    corrector_pretrain_iters: int = Field(0, ge=0)
    mix: Literal["gumbel", "softmax", "argmax"] = "gumbel"  # how p~ is drawn (dynloss.dynamic.pseudo_labels)
    pseudo_from: Literal["logits", "adjusted"] = "logits"  # p~ from z (authors) or from z + margins
    warmup_loss: Literal["ce", "margins"] = "ce"           # warm-up CE (authors) or CE(z + generator margins)
    rank_loss: Literal["logits", "adjusted"] = "logits"    # the loss the ranking pass ranks (and the meta set's
    #                                                        "easy" picks): CE of z (authors) or of z + margins
    rank_within: Literal["label", "all"] = "label"  # rank buckets within each given label (authors) or over the
    #                                                 whole training set (losses of z + margins are comparable
    #                                                 across classes; a label that is mostly wrong shows)
    flip_check: float | None = Field(None, gt=0, le=1)  # class-dependent noise, checked once after warm-up: when
    #   the classifier (argmax z) puts some label's rows on one other class more than 1 / flip_check times as often
    #   as on the label itself, the run ranks as rank_loss: adjusted + rank_within: all and samples as
    #   sampling.meta_pool: agreeing from then on, and evaluates the weight average with train.ema_eval: flipped
    #   (dynloss.sampling.flipped_labels, docs/method.md section 4); None: the three keys as set (authors)
    meta_lr: float = Field(3e-3, gt=0)
    margin_meta_lr: float | None = Field(None, ge=0)  # the margin generator's own meta lr; None = meta_lr (authors)
    margin_prior: Literal["none", "log_prior"] = "none"
    prior_tau: float = Field(1.0, ge=0)
    prior_from: Literal["given", "trusted"] = "given"  # log prior of the given labels, or re-estimated every meta
    #                                                    epoch from the trust-weighted label counts
    finetune: bool = True
    meta_batch_size: int | None = Field(None, ge=1)  # global; None = train.batch_size
    rank_buckets: int = Field(100, ge=1)
    corrector: Literal["learned", "oracle"] = "learned"  # oracle: trust = (given == true label), an upper bound
    hidden: int = Field(64, ge=1)  # width of the corrector's and the generator's MLPs (authors: 64)
    rank_init: str = "xavier"  # the corrector's rank embedding: dynloss.dynamic.LabelCorrector.RANK_INITS
    meta_view: Literal["weak", "strong"] = "strong"  # view of the meta batches (the authors': strong)
    finetune_view: Literal["weak", "strong"] | None = None  # view of the fine-tune pass; None = data.train_view

    @field_validator("rank_init")
    @classmethod
    def _rank_init(cls, v: str) -> str:
        from dynloss.dynamic import LabelCorrector

        return _choices(v, getattr(LabelCorrector, "RANK_INITS", ("xavier",)), "rank_init")


class Sampling(Section):
    ratio1: float = Field(0.5, gt=0, le=1)
    ratio2: float = Field(0.5, gt=0, le=1)
    criterion: Literal["easy", "hard", "mixed", "random"] = "easy"
    per_class: int | None = Field(None, ge=1)
    clean_per_class: int | None = Field(None, ge=1)  # a clean seed set: this many training rows per class with a
    #                                                  known-right label always in the meta set (dynloss.sampling)
    clean_meta: str | None = None  # a prepared folder whose train split is trusted clean metadata
    enrich: bool = True            # add the hierarchical sample from the training data to clean_meta
    leave_out: bool = True         # leave the sampled meta rows out of the epoch's training stream (authors)
    meta_pool: Literal["all", "agreeing"] = "all"  # sample the meta set from every row (authors) or only from
    #   the rows whose given label is the argmax of z + margins: a label mostly flipped in from another class
    #   (asymmetric noise under a long tail) otherwise fills that class's metadata with the flips (docs/method.md)


class Optim(Section):
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = False
    schedule: Literal["cosine", "step", "onecycle"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0, le=1)
    max_grad_norm: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _nesterov(self) -> Optim:
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        return self


class Train(Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)  # global, split evenly over scaling.num_workers
    seed: int = 0
    amp: Switch = "auto"
    channels_last: Switch = "auto"
    eval_every: int = Field(1, ge=1)
    shot_thresholds: tuple[int, int] | None = None  # (many, few); None = dynloss.metrics.shot_thresholds
    ema_decay: float | None = Field(None, gt=0, lt=1)  # evaluate (and checkpoint) an exponential moving average of
    #   the weights, batch-norm buffers included, updated after every optimizer step (torch.optim.swa_utils);
    #   None = the weights as they are (docs/method.md section 4: the average removes the asymmetric swings)
    ema_warmup: bool = False  # the average's decay ramps up as min(ema_decay, (1 + n) / (10 + n)) over its first n
    #   updates, so runs of a few hundred steps average recent weights (dynloss.builder.ema_update)
    ema_eval: Literal["always", "flipped"] = "always"  # which evaluations use the average: all of them, or only
    #   those after the flip check (dynamic.flip_check) found class-dependent noise, whose epoch-to-epoch swings the
    #   average removes; before that, in a run whose check stays silent and in runs without one (other losses,
    #   flip_check null: no average is kept), the trained weights (docs/method.md section 4)

    def evaluates_average(self, flipped: list[int] | None) -> bool:
        """Whether evaluation uses the weight average a run keeps, given the flip check's decision (None: not made
        yet); the caller checks that there is one."""
        return self.ema_eval == "always" or bool(flipped)

    @field_validator("shot_thresholds")
    @classmethod
    def _shots(cls, v):
        if v is not None and not (0 <= v[1] <= v[0]):
            raise ValueError(f"must be [many, few] with 0 <= few <= many, got {list(v)}")
        return v


class Scaling(Section):
    num_workers: int = Field(1, ge=1)
    use_gpu: Literal["auto", True, False] = "auto"
    cpus_per_worker: float = Field(0.5, gt=0)  # the rest of a small box stays with Ray Data
    torch_threads: int | None = Field(None, ge=1)  # torch threads per worker; None = Ray's OMP_NUM_THREADS, i.e.
    #   floor(cpus_per_worker) (so 1 on a 2-CPU box); more lets training use cores Ray Data leaves idle


class Run(Section):
    storage_path: str = "./runs"
    name: str | None = None  # default: the top-level name; the same name resumes the run
    max_failures: int = Field(0, ge=-1)
    keep_checkpoints: int = Field(2, ge=1)
    mlflow_uri: str = "sqlite:///mlflow.db"
    experiment: str = "dynloss"


class Config(Section):
    name: str = "dynloss"
    data: Data
    model: Model = Field(default_factory=Model)
    loss: Loss = Field(default_factory=Loss)
    dynamic: Dynamic = Field(default_factory=Dynamic)
    sampling: Sampling = Field(default_factory=Sampling)
    optim: Optim = Field(default_factory=Optim)
    train: Train = Field(default_factory=Train)
    scaling: Scaling = Field(default_factory=Scaling)
    run: Run = Field(default_factory=Run)

    @model_validator(mode="after")
    def _default_run_name(self) -> Config:
        if self.run.name is None:
            self.run.name = self.name
        return self

    def cross_errors(self) -> list[str]:
        """Rules that tie two keys together (checked once every key is valid on its own)."""
        errors = []
        w = self.scaling.num_workers
        if self.train.batch_size % w:
            errors.append(f"train.batch_size: {self.train.batch_size} is not divisible by scaling.num_workers={w}")
        if self.dynamic.meta_batch_size and self.dynamic.meta_batch_size % w:
            errors.append(f"dynamic.meta_batch_size: {self.meta_batch_size} is not divisible by "
                          f"scaling.num_workers={w} (each worker takes an equal slice of every meta batch)")
        if sorted(set(self.optim.milestones)) != self.optim.milestones or any(m < 1 for m in self.optim.milestones):
            errors.append(f"optim.milestones: must be increasing epochs >= 1, got {self.optim.milestones}")
        if self.optim.schedule == "step" and not self.optim.milestones:
            errors.append("optim.milestones: the step schedule needs milestones (epochs), e.g. [160, 180]")
        if self.is_dynamic and self.dynamic.warmup_epochs >= self.train.epochs:
            errors.append(f"dynamic.warmup_epochs: {self.dynamic.warmup_epochs} >= train.epochs={self.train.epochs}: "
                          "the whole run would be warm-up (no meta-learning) yet logged as the Dynamic Loss; lower "
                          "dynamic.warmup_epochs or raise train.epochs")
        if self.checks_flips and self.dynamic.warmup_epochs == 0:
            errors.append("dynamic.flip_check: the check decides once, on the classifier after warm-up; with "
                          "dynamic.warmup_epochs: 0 that classifier is untrained and its verdict noise; set "
                          "dynamic.warmup_epochs >= 1 or dynamic.flip_check: null")
        if self.train.ema_eval == "flipped" and self.train.ema_decay is None:
            errors.append("train.ema_eval: 'flipped' evaluates the weight average once the flip check fires, but "
                          "train.ema_decay is null (no average is kept); set train.ema_decay (e.g. 0.995) or "
                          "train.ema_eval: always")
        if self.data.preset is not None:
            errors += preset_errors(self.data.preset, self.data.preset_params)
        if self.optim.warmup_epochs >= self.train.epochs and self.optim.schedule == "cosine":
            errors.append(f"optim.warmup_epochs: {self.optim.warmup_epochs} leaves no epochs of the "
                          f"{self.train.epochs} for the cosine decay")
        return errors

    @property
    def meta_batch_size(self) -> int:
        return self.dynamic.meta_batch_size or self.train.batch_size

    @property
    def is_dynamic(self) -> bool:
        return self.loss.name == DYNAMIC

    @property
    def checks_flips(self) -> bool:
        """A Dynamic Loss run with ``dynamic.flip_check`` set: its check decides once, after warm-up."""
        return self.is_dynamic and self.dynamic.flip_check is not None

    def resolved(self) -> dict:
        """The whole config as plain JSON types (saved in checkpoints, logged as MLflow params)."""
        return self.model_dump(mode="json")


def preset_errors(name: str, params: Mapping[str, Any]) -> list[str]:
    """``data.preset_params`` checked by building the preset once (a typo such as ``flipp`` is named)."""
    import inspect

    from dynloss.data.transforms import PRESETS as VIEWS
    from dynloss.data.transforms import build_preset

    if not params:
        return []
    accepted = [p for p in inspect.signature(VIEWS[name]).parameters.values() if p.name not in ("mode", "name")]
    if not any(p.kind is p.VAR_KEYWORD for p in accepted):
        unknown = sorted(set(params) - {p.name for p in accepted})
        if unknown:
            return [f"data.preset_params: unknown parameter{'s' * (len(unknown) > 1)} {', '.join(unknown)} of "
                    f"preset {name!r}; valid: {', '.join(p.name for p in accepted)}"]
    try:
        build_preset(name, None, **params)
    except (ValueError, TypeError) as e:
        return [f"data.preset_params: {e}"]
    return []


# ------------------------------------------------------------------------------------------ error report
_SIMPLE = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "missing": "required key is missing",
}


def _model_at(loc: Sequence) -> type[BaseModel] | None:
    """The section model reached by following ``loc`` from Config (None past a free-form dict)."""
    model: Any = Config
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def _clean_loc(loc: Sequence) -> list:
    # unions and validators add members like "function-after[...]" or "literal['auto']": not keys
    return [p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("bool", "int", "float", "str")))]


def _message(err: dict, loc: list) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        valid = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key{hint}; valid keys here: {', '.join(valid)}"
    if kind in _SIMPLE:
        return _SIMPLE[kind].format(**ctx)
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')} (got {err.get('input')!r})"
    return err["msg"].removeprefix("Value error, ")


def format_errors(exc: ValidationError) -> list[str]:
    """One ``key.path: message`` line per problem (a union reports once per key, its first message)."""
    out: dict[str, str] = {}
    for err in exc.errors():
        loc = _clean_loc(err["loc"])
        key = ".".join(str(p) for p in loc) or "config"
        out.setdefault(key, _message(err, loc))
    return [f"{k}: {v}" for k, v in out.items()]


# --------------------------------------------------------------------------------------------- loading
def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=0.05"`` -> (["optim", "lr"], 0.05); the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or any(not p for p in key.strip().split(".")):
        raise ValueError(f"--set {text!r}: expected key.sub=value, e.g. optim.lr=0.05")
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


def apply_overrides(raw: dict, overrides: Iterable[str]) -> list[str]:
    """Apply ``key.sub=value`` overrides to ``raw`` in place; returns the errors (bad syntax)."""
    errors = []
    for text in overrides or ():
        try:
            keys, value = parse_override(text)
        except (ValueError, yaml.YAMLError) as e:
            errors.append(str(e))
            continue
        node = raw
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return errors


def manifest_exists(location: str) -> bool:
    from dynloss.data import storage
    from dynloss.data.manifest import MANIFEST

    try:
        fs, path = storage.resolve(location)
        return storage.is_file(fs, storage.join(path, MANIFEST))
    except Exception:  # an unreachable URI scheme, missing credentials: reported as missing
        return False


def _path_errors(raw: Mapping) -> list[str]:
    """data.path must hold a prepared manifest unless data.prepare will make it; clean_meta must exist."""
    errors = []
    data = raw.get("data") if isinstance(raw.get("data"), Mapping) else {}
    path = data.get("path")
    if isinstance(path, str) and path and not data.get("prepare") and not manifest_exists(path):
        errors.append(f"data.path: no prepared dataset at {path!r} (no manifest.json); prepare it with "
                      f"`python -m pipelines.prepare SOURCE --out {path}` or add a data.prepare block")
    sampling = raw.get("sampling") if isinstance(raw.get("sampling"), Mapping) else {}
    clean = sampling.get("clean_meta")
    if isinstance(clean, str) and clean and not manifest_exists(clean):
        errors.append(f"sampling.clean_meta: no prepared dataset at {clean!r} (no manifest.json)")
    return errors


def manifest_errors(cfg: Config, manifest: Mapping) -> list[str]:
    """Checks that need the prepared dataset: splits, class counts for the loss, the loss parameters."""
    from dynloss.builder import build_criterion  # the very criterion training builds
    from dynloss.data.transforms import SOURCE_PRESETS

    errors = []
    if cfg.data.preset is None and manifest.get("source") in SOURCE_PRESETS:
        errors += preset_errors(SOURCE_PRESETS[manifest["source"]], cfg.data.preset_params)
    splits = manifest.get("splits", {})
    if "train" not in splits:
        errors.append(f"data.path: the prepared dataset has no train split (splits: {', '.join(splits)})")
    if cfg.data.eval_split not in splits:
        errors.append(f"data.eval_split: {cfg.data.eval_split!r} is not a split of {cfg.data.path} "
                      f"(valid: {', '.join(splits)})")
    counts = list(splits.get("train", {}).get("counts") or [])
    num_classes = int(manifest.get("num_classes", len(counts)))
    prior = cfg.is_dynamic and cfg.dynamic.margin_prior == "log_prior"
    needs_counts = prior or needs_class_counts(cfg.loss.name)
    if needs_counts and (len(counts) != num_classes or any(c <= 0 for c in counts)):
        errors.append(f"loss.name: {cfg.loss.name!r} needs every class in the train split, but the manifest's "
                      f"train counts are {counts}")
    elif not cfg.is_dynamic:
        try:
            build_criterion(cfg, num_classes, counts)
        except (ValueError, TypeError) as e:
            errors.append(f"loss.params: {e}")
    elif cfg.loss.params:
        errors.append("loss.params: the dynamic loss takes its settings from the `dynamic` section")
    if cfg.sampling.clean_per_class and not sum(splits.get("train", {}).get("true_counts") or [0]):
        errors.append(f"sampling.clean_per_class: {cfg.data.path} holds no true labels (only synthetic noise keeps "
                      "them), so no training label is known to be right; use sampling.clean_meta instead")
    return errors


def check_dataset(cfg: Config, verify: bool = False) -> dict:
    """The prepared dataset's manifest, once ``manifest_errors`` finds nothing and every shard the run reads is
    there at its recorded size (``verify``: and sha256); ConfigError otherwise, naming the file."""
    from dynloss.data import read_manifest
    from dynloss.data.shards import shard_problems

    if not manifest_exists(cfg.data.path):
        raise ConfigError([f"data.path: no prepared dataset at {cfg.data.path!r}; run `dynloss prepare`, or "
                           "`dynloss train` with a data.prepare block (it prepares the shards)"])
    manifest = read_manifest(cfg.data.path)
    errors = manifest_errors(cfg, manifest)
    if not errors:
        splits = ["train", *([cfg.data.eval_split] if cfg.data.eval_split != "train" else [])]
        errors += [f"data.path: {p}" for p in shard_problems(cfg.data.path, manifest, splits, verify)]
    if errors:
        raise ConfigError(errors)
    return manifest


def validate(raw: Mapping, source: str = "config", overrides: Iterable[str] = ()) -> Config:
    """Validate a raw config dict (with overrides applied); raise ConfigError listing every problem."""
    raw = dict(raw or {})
    errors = apply_overrides(raw, overrides)
    errors += _path_errors(raw)
    cfg = None
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        errors = format_errors(e) + errors
    if cfg is not None and not errors:
        errors += cfg.cross_errors()
    if cfg is not None and not errors and manifest_exists(cfg.data.path):
        from dynloss.data import read_manifest

        errors += manifest_errors(cfg, read_manifest(cfg.data.path))
    if errors:
        raise ConfigError(errors, source)
    return cfg


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config, apply ``key=value`` overrides, validate everything (ConfigError lists all errors)."""
    path = str(path)
    if not os.path.isfile(path):
        raise ConfigError([f"--config: no such file {path!r}"], path)
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {e}"], path) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"the top level must be a mapping of sections, got {type(raw).__name__}"], path)
    return validate(raw, path, overrides)


def resolve_paths(cfg: Config) -> Config:
    """A copy with local paths made absolute (Ray workers run in other directories); URIs are kept."""
    def absolute(p: str | None) -> str | None:
        return p if p is None or is_uri(p) else os.path.abspath(os.path.expanduser(p))

    out = cfg.model_copy(deep=True)
    out.data.path = absolute(out.data.path)
    if out.data.prepare and out.data.prepare.root:
        out.data.prepare.root = absolute(out.data.prepare.root)
    out.sampling.clean_meta = absolute(out.sampling.clean_meta)
    out.run.storage_path = absolute(out.run.storage_path)
    uri = out.run.mlflow_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        out.run.mlflow_uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    return out


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}`` (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
