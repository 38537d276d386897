"""Search spaces of ``dynloss tune``: YAML files validated on load, every sampled key checked against the config.

A space file (``tune_spaces/*.yaml`` are the worked examples)::

    description: what the sweep answers
    searcher: random            # random: Ray Tune's default generator (grid axes crossed, the rest sampled)
                                # optuna: Optuna's TPE (pip install optuna); no grid axes, no cases
    samples: 8                  # default of --samples: draws per grid point (random), trials (optuna)
    metric: eval/top1           # what ASHA and the best trial are judged on (clean evaluation), maximised
    asha: {grace_period: 2, reduction_factor: 2}   # early stopping; `asha: null` runs every trial to the end
    fixed: {loss.name: dynamic} # --set style overrides every trial gets
    params:                     # one domain per config key
      sampling.per_class: {choice: [5, 10, 20]}
      sampling.ratio1: {uniform: [0.25, 1.0]}
      dynamic.meta_lr: {loguniform: [0.0003, 0.03]}
      dynamic.warmup_epochs: {randint: [1, 5]}      # both ends included
      sampling.criterion: {grid: [easy, hard, mixed, random]}
    cases:                      # optional: a grid over whole override sets (a value may itself be {grid: [...]})
      - {loss.name: gce, loss.params.q: {grid: [0.5, 0.7, 0.9]}}

``load_space(path, config_path, overrides)`` reads and validates a space against the base config: every key and
every value a trial can get (each grid/choice value, both ends of a range, each case) is applied to the base
config through the same ``--set`` mechanism ``dynloss train`` uses and validated by ``dynloss.config``; all
problems are reported at once (``SpaceError``), each naming the space file and the key, before Ray starts.
No Ray import here: the domains become ``ray.tune`` objects in ``pipelines.tune``.

    python -c "from tune_spaces import load_space; \
print(load_space('tune_spaces/metadata_size.yaml', 'pipelines/configs/fashion_mnist_lt.yaml'))"
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dynloss.config import Config, ConfigError, load_config

HERE = Path(__file__).resolve().parent
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
RANGES = ("uniform", "loguniform", "randint")
METRICS = ("eval/top1", "eval/top5", "eval/few_shot", "eval/medium_shot", "eval/many_shot", "eval/mean_class")
SEARCHERS = ("random", "optuna")
TOP_KEYS = ("description", "searcher", "samples", "metric", "asha", "fixed", "params", "cases")


class SpaceError(ValueError):
    """A space failed validation; ``errors`` holds one line per problem."""

    def __init__(self, errors: Sequence[str], source: str):
        self.errors = list(errors)
        lines = "\n".join(f"  {e}" for e in self.errors)
        super().__init__(f"{source}: {len(self.errors)} error{'s' * (len(self.errors) != 1)}\n{lines}")


@dataclass(frozen=True)
class Domain:
    kind: str          # one of KINDS
    values: tuple      # grid/choice: the values; ranges: (low, high)

    def candidates(self) -> tuple:
        """The values validation tries: every listed value, or both ends of a range."""
        return self.values


@dataclass
class Space:
    path: str
    name: str
    description: str = ""
    searcher: str = "random"
    samples: int = 1
    metric: str = "eval/top1"
    asha: dict | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Domain] = field(default_factory=dict)
    cases: list[dict[str, Any]] = field(default_factory=list)

    @property
    def has_grid(self) -> bool:
        return bool(self.cases) or any(d.kind == "grid" for d in self.params.values())

    def swept(self) -> list[str]:
        """The names of what varies between trials (params, then ``case`` when there are cases)."""
        return [*self.params, *(["case"] if self.cases else [])]


def override(key: str, value: Any) -> str:
    """``--set`` text for a sampled value (JSON is YAML, so ``dynloss.config.parse_override`` reads it back)."""
    return f"{key}={json.dumps(value)}"


def case_label(case: Mapping[str, Any]) -> str:
    """A short readable name of a case: ``gce q=0.7``."""
    name = case.get("loss.name")
    rest = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in case.items() if k != "loss.name")
    return " ".join(str(p) for p in (name, rest) if p not in (None, "")) or "base"


def trial_overrides(space: Space, params: Mapping[str, Any], case: Mapping[str, Any] | None) -> list[str]:
    """The ``--set`` overrides of one trial: the space's fixed ones, its case, its sampled params (in that order)."""
    items = [*space.fixed.items(), *(case or {}).items(), *params.items()]
    return [override(k, v) for k, v in items]


# ------------------------------------------------------------------------------------------------ parsing
def _domain(key: str, spec: Any, errors: list[str]) -> Domain | None:
    if not isinstance(spec, Mapping) or len(spec) != 1:
        errors.append(f"params.{key}: expected one of {{{', '.join(k + ': ...' for k in KINDS)}}}, got {spec!r}")
        return None
    (kind, values), = spec.items()
    if kind not in KINDS:
        errors.append(f"params.{key}: unknown domain {kind!r}; valid: {', '.join(KINDS)}")
        return None
    if not isinstance(values, list) or not values:
        errors.append(f"params.{key}: {kind} needs a non-empty list, got {values!r}")
        return None
    if kind in RANGES:
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            errors.append(f"params.{key}: {kind} needs [low, high] numbers, got {values!r}")
            return None
        low, high = values
        if not low < high:
            errors.append(f"params.{key}: {kind} needs low < high, got {values!r}")
            return None
        if kind == "loguniform" and low <= 0:
            errors.append(f"params.{key}: loguniform needs low > 0, got {low}")
            return None
        if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
            errors.append(f"params.{key}: randint needs integer bounds, got {values!r}")
            return None
    return Domain(kind, tuple(values))


def _expand_case(case: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A case whose values hold ``{grid: [...]}`` becomes one case per combination."""
    keys = list(case)
    axes = [v["grid"] if isinstance(v, Mapping) and set(v) == {"grid"} and isinstance(v["grid"], list) else [v]
            for v in case.values()]
    return [dict(zip(keys, combo)) for combo in itertools.product(*axes)]


def parse_space(raw: Any, path: str) -> Space:
    """The space file's own structure (keys, domains, settings); ``load_space`` also checks it against a config."""
    errors: list[str] = []
    if not isinstance(raw, Mapping):
        raise SpaceError([f"the top level must be a mapping with keys {', '.join(TOP_KEYS)}"], path)
    for k in raw:
        if k not in TOP_KEYS:
            import difflib

            close = difflib.get_close_matches(str(k), TOP_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"{k}: unknown key{hint}; valid keys: {', '.join(TOP_KEYS)}")
    space = Space(path=path, name=Path(path).stem, description=str(raw.get("description") or ""))
    space.searcher = raw.get("searcher", "random")
    if space.searcher not in SEARCHERS:
        errors.append(f"searcher: must be one of {', '.join(SEARCHERS)} (got {space.searcher!r})")
    space.samples = raw.get("samples", 1)
    if not isinstance(space.samples, int) or isinstance(space.samples, bool) or space.samples < 1:
        errors.append(f"samples: must be an integer >= 1 (got {space.samples!r})")
    space.metric = raw.get("metric", "eval/top1")
    if space.metric not in METRICS:
        errors.append(f"metric: must be one of {', '.join(METRICS)} (got {space.metric!r})")
    asha = raw.get("asha", {"grace_period": 1, "reduction_factor": 2})
    if asha is not None:
        if not isinstance(asha, Mapping) or set(asha) - {"grace_period", "reduction_factor"}:
            errors.append(f"asha: expected {{grace_period: N, reduction_factor: F}} or null, got {asha!r}")
        else:
            g, f = asha.get("grace_period", 1), asha.get("reduction_factor", 2)
            if not isinstance(g, int) or isinstance(g, bool) or g < 1:
                errors.append(f"asha.grace_period: must be an integer >= 1 (epochs), got {g!r}")
            if not isinstance(f, (int, float)) or isinstance(f, bool) or f <= 1:
                errors.append(f"asha.reduction_factor: must be > 1, got {f!r}")
            asha = {"grace_period": g, "reduction_factor": f}
    space.asha = asha
    for name in ("fixed", "params"):
        if not isinstance(raw.get(name) or {}, Mapping):
            errors.append(f"{name}: expected a mapping of config keys, got {raw.get(name)!r}")
    space.fixed = dict(raw.get("fixed") or {}) if isinstance(raw.get("fixed") or {}, Mapping) else {}
    params = raw.get("params") or {}
    if isinstance(params, Mapping):
        for key, spec in params.items():
            d = _domain(str(key), spec, errors)
            if d is not None:
                space.params[str(key)] = d
    cases = raw.get("cases") or []
    if not isinstance(cases, list) or not all(isinstance(c, Mapping) and c for c in cases):
        errors.append("cases: expected a list of non-empty mappings of config keys (one override set per case)")
    else:
        space.cases = [e for c in cases for e in _expand_case(c)]
    overlap = sorted(set(space.params) & ({*space.fixed} | {k for c in space.cases for k in c}))
    if overlap:
        errors.append(f"params: {', '.join(overlap)} also set by fixed/cases; a key is swept in one place only")
    if not space.params and not space.cases:
        errors.append("params: a sweep needs at least one swept key (params) or cases")
    if space.searcher == "optuna":
        if space.has_grid:
            errors.append("searcher: optuna samples its own values and takes no grid axes or cases; "
                          "use choice instead of grid, or searcher: random")
        if importlib.util.find_spec("optuna") is None:
            errors.append("searcher: optuna is not installed; pip install 'dynloss[tune]' (or optuna), "
                          "or use searcher: random")
    if errors:
        raise SpaceError(errors, path)
    return space


def resolve_space_path(path: str | os.PathLike) -> str:
    """``tune_spaces/NAME.yaml`` as given, else a bundled space by name (``metadata_size``)."""
    p = Path(path)
    if p.is_file():
        return str(p)
    bundled = HERE / (p.name if p.suffix else p.name + ".yaml")
    return str(bundled) if bundled.is_file() else str(p)


def _value_errors(config_path: str, base: Sequence[str], trials: Iterable[tuple[str, list[str]]]) -> list[str]:
    out: dict[str, None] = {}
    for what, overrides in trials:
        try:
            load_config(config_path, [*base, *overrides])
        except ConfigError as e:
            for err in e.errors:
                out.setdefault(f"{what}: {err}", None)
    return list(out)


def load_space(path: str | os.PathLike, config_path: str | os.PathLike, overrides: Sequence[str] = (),
               searcher: str | None = None) -> Space:
    """Read ``path`` and check every value a trial can take against ``config_path`` + ``overrides``
    (``searcher``: replaces the file's)."""
    path, config_path = resolve_space_path(path), str(config_path)
    if not os.path.isfile(path):
        bundled = ", ".join(sorted(p.stem for p in HERE.glob("*.yaml")))
        raise SpaceError([f"no such space file (bundled spaces: {bundled})"], str(path))
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise SpaceError([f"not valid YAML: {e}"], path) from None
    if searcher is not None and isinstance(raw, Mapping):
        raw = {**raw, "searcher": searcher}
    space = parse_space(raw, path)
    base = [*overrides, *(override(k, v) for k, v in space.fixed.items())]
    cfg = load_config(config_path, base)  # the base config itself (its errors are the config's, not the space's)
    checks: list[tuple[str, list[str]]] = []
    for i, case in enumerate(space.cases or [{}]):
        if case:
            checks.append((f"cases[{i}] ({case_label(case)})", [override(k, v) for k, v in case.items()]))
    case0 = [override(k, v) for k, v in (space.cases[0] if space.cases else {}).items()]
    for key, d in space.params.items():
        for v in d.candidates():
            checks.append((f"params.{key}={json.dumps(v)}", [*case0, override(key, v)]))
    errors = _value_errors(config_path, base, checks)
    errors += _sweep_errors(cfg, space)
    if errors:
        raise SpaceError(errors, path)
    return space


def _sweep_errors(cfg: Config, space: Space) -> list[str]:
    swept = set(space.params) | {k for c in space.cases for k in c}
    errors = []
    if space.asha is not None and cfg.train.eval_every != 1 and "train.eval_every" not in swept:
        errors.append(f"asha: early stopping compares {space.metric} after every epoch, but the config evaluates "
                      f"every {cfg.train.eval_every} epochs; set fixed: {{train.eval_every: 1}} or asha: null")
    for key in ("run.name", "run.storage_path", "run.mlflow_uri", "run.experiment"):
        if key in swept or key in space.fixed:
            errors.append(f"{key}: set by the sweep for each trial; it cannot be swept or fixed in a space")
    return errors


def describe(space: Space) -> str:
    """One line per swept key, for the sweep's header."""
    lines = [f"{k}: {d.kind} {list(d.values)}" for k, d in space.params.items()]
    if space.cases:
        lines.append(f"case: grid over {len(space.cases)} ({', '.join(case_label(c) for c in space.cases[:6])}"
                     f"{', ...' if len(space.cases) > 6 else ''})")
    return "\n".join(lines)
