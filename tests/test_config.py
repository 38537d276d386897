"""The experiment config (dynloss/config.py): whole-config validation, key paths in errors, overrides.

    .venv/bin/python -m pytest tests/test_config.py -q
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from dynloss.config import ConfigError, flatten, load_config, manifest_errors, parse_override, resolve_paths, validate

CONFIGS = sorted((Path(__file__).parent.parent / "pipelines" / "configs").glob("*.yaml"))


@pytest.fixture
def prepared(tmp_path) -> str:
    """A folder that looks prepared: the manifest is all the config checks read."""
    root = tmp_path / "data"
    root.mkdir()
    manifest = {"source": "digits", "num_classes": 3, "classes": ["a", "b", "c"],
                "splits": {"train": {"rows": 60, "counts": [40, 15, 5]}, "test": {"rows": 30, "counts": [10] * 3}},
                "image": {"mode": "L", "size": [8, 8]}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


def errors_of(raw, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(raw, overrides=overrides)
    return info.value.errors


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates_and_says_how_to_run_it(path):
    text = path.read_text()
    assert text.startswith("#"), "a config starts with a comment saying what it is for"
    head = text.split("\nname:")[0]
    assert "--config pipelines/configs/" + path.name in head and "--set " in head
    cfg = load_config(path)
    assert cfg.run.name and cfg.data.prepare is not None  # one command: prepares its data when missing


def test_all_errors_at_once_each_naming_its_key(tmp_path):
    raw = {"data": {"path": str(tmp_path / "missing")}, "loss": {"name": "dynamik"},
           "optim": {"lr": -0.1}, "trian": {"epochs": 3}}
    errors = errors_of(raw)
    text = "\n".join(errors)
    assert len(errors) == 4, text
    assert any(e.startswith("loss.name: unknown loss 'dynamik'") and "did you mean 'dynamic'" in e and "gce" in e
               for e in errors)
    assert "optim.lr: must be > 0" in text
    assert any(e.startswith("trian: unknown key") and "'train'" in e for e in errors)
    assert any(e.startswith("data.path:") and "missing" in e and "pipelines.prepare" in e for e in errors)


def test_enums_list_their_choices_and_nested_typos_are_caught(prepared):
    errors = errors_of({"data": {"path": prepared, "train_veiw": "weak", "decode_on": "gpu"},
                        "optim": {"schedule": "linear"}, "scaling": {"use_gpu": "maybe"},
                        "dynamic": {"meta_view": "medium"}})
    text = "\n".join(errors)
    assert "data.train_veiw: unknown key (did you mean 'train_view'?)" in text
    assert "optim.schedule: must be one of 'cosine', 'step' or 'onecycle' (got 'linear')" in text
    assert "scaling.use_gpu: must be one of 'auto', True or False" in text
    assert "dynamic.meta_view: must be one of 'weak' or 'strong' (got 'medium')" in text
    assert "data.decode_on: must be one of 'ray_data' or 'device' (got 'gpu')" in text


def test_a_prepare_block_excuses_the_missing_path(tmp_path):
    cfg = validate({"data": {"path": str(tmp_path / "later"), "prepare": {"source": "digits"}}})
    assert cfg.data.prepare.source == "digits" and cfg.run.name == cfg.name
    errors = errors_of({"data": {"path": str(tmp_path / "later"), "prepare": {"source": "cifar11", "noise": "sym"}}})
    assert any(e.startswith("data.prepare.source: unknown source 'cifar11'") for e in errors)
    assert any(e.startswith("data.prepare.noise:") for e in errors)


def test_overrides_are_yaml_values_and_reach_nested_keys(prepared):
    cfg = validate({"data": {"path": prepared}}, overrides=[
        "optim.lr=0.05", "optim.milestones=[10, 20]", "optim.schedule=step", "scaling.use_gpu=false",
        "sampling.per_class=3", "loss.name=ldam"])
    assert cfg.optim.lr == 0.05 and cfg.optim.milestones == [10, 20] and cfg.scaling.use_gpu is False
    assert cfg.sampling.per_class == 3 and cfg.loss.name == "ldam"
    # YAML reads a bare off / on as a boolean: the switches take it as the word
    cfg = validate({"data": {"path": prepared}}, overrides=["train.amp=off", "train.channels_last=on"])
    assert (cfg.train.amp, cfg.train.channels_last) == ("off", "on")
    assert any(e.startswith("train.amp:") for e in errors_of({"data": {"path": prepared}}, overrides=["train.amp=2"]))
    assert parse_override("a.b=") == (["a", "b"], None)
    errors = errors_of({"data": {"path": prepared}}, overrides=["optim.lr", "optim.lrr=1"])
    assert any("expected key.sub=value" in e for e in errors)
    assert any(e.startswith("optim.lrr: unknown key") for e in errors)


def test_rules_across_keys(prepared):
    errors = errors_of({"data": {"path": prepared}, "train": {"batch_size": 63}, "scaling": {"num_workers": 2},
                        "optim": {"schedule": "step"}})
    assert any(e.startswith("train.batch_size: 63 is not divisible by scaling.num_workers=2") for e in errors)
    assert any(e.startswith("optim.milestones: the step schedule needs milestones") for e in errors)


def test_a_dynamic_run_that_would_be_all_warm_up_is_refused(prepared):
    errors = errors_of({"data": {"path": prepared}, "train": {"epochs": 3}, "dynamic": {"warmup_epochs": 3}})
    assert errors == ["dynamic.warmup_epochs: 3 >= train.epochs=3: the whole run would be warm-up (no meta-learning) "
                      "yet logged as the Dynamic Loss; lower dynamic.warmup_epochs or raise train.epochs"]
    validate({"data": {"path": prepared}, "loss": {"name": "ce"}, "train": {"epochs": 3},
              "dynamic": {"warmup_epochs": 3}})  # a baseline has no warm-up


def test_a_flip_check_without_warm_up_is_refused(prepared):
    """The check reads the classifier once, after warm-up: with none it would read an untrained one (the README
    command's test, one epoch and no warm-up, printed "labels 0, 1, 4, 5, 7, 9 look flipped" on clean labels)."""
    raw = {"data": {"path": prepared}, "train": {"epochs": 3}, "dynamic": {"warmup_epochs": 0, "flip_check": 0.125}}
    assert errors_of(raw) == ["dynamic.flip_check: the check decides once, on the classifier after warm-up; with "
                              "dynamic.warmup_epochs: 0 that classifier is untrained and its verdict noise; set "
                              "dynamic.warmup_epochs >= 1 or dynamic.flip_check: null"]
    raw["dynamic"]["warmup_epochs"] = 1
    validate(raw)
    validate({**raw, "loss": {"name": "ce"}, "dynamic": {"warmup_epochs": 0, "flip_check": 0.125}})  # no check runs


def test_augmentation_parameters_are_checked_with_the_config(prepared, tmp_path, capsys):
    errors = errors_of({"data": {"path": prepared, "preset": "fashion-mnist", "preset_params": {"flipp": True}}})
    assert errors == ["data.preset_params: unknown parameter flipp of preset 'fashion-mnist'; valid: flip, stats, "
                      "padding"]
    # no preset named: the dataset's own (digits here) is the one checked
    assert errors_of({"data": {"path": prepared, "preset_params": {"size": 8}}})[0].startswith(
        "data.preset_params: unknown parameter size of preset 'digits'")
    validate({"data": {"path": prepared, "preset_params": {"padding": 0}}})
    from pipelines.train import main

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"data": {"path": prepared, "preset_params": {"flipp": True}}}))
    assert main(["--config", str(path)]) == 2 and "data.preset_params" in capsys.readouterr().err


def test_loss_parameters_and_class_counts_are_checked_against_the_dataset(prepared):
    errors = errors_of({"data": {"path": prepared}, "loss": {"name": "gce", "params": {"q": -1}}})
    assert len(errors) == 1 and errors[0].startswith("loss.params:") and "q" in errors[0]
    assert validate({"data": {"path": prepared}, "loss": {"name": "ldam"}}).loss.name == "ldam"  # counts from manifest
    manifest = json.loads(Path(prepared, "manifest.json").read_text())
    manifest["splits"]["train"]["counts"] = [40, 15, 0]
    cfg = validate({"data": {"path": prepared}})
    cfg.loss.name = "logit_adjusted"
    assert any("needs every class" in e for e in manifest_errors(cfg, manifest))
    cfg.data.eval_split = "val"
    assert any(e.startswith("data.eval_split: 'val' is not a split") for e in manifest_errors(cfg, manifest))


def test_resolved_paths_are_absolute_and_params_flatten(prepared, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cfg = resolve_paths(validate({"data": {"path": os.path.relpath(prepared)}, "run": {"storage_path": "runs"}}))
    assert cfg.data.path == prepared and cfg.run.storage_path == str(tmp_path / "runs")
    assert cfg.run.mlflow_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    uri = resolve_paths(validate({"data": {"path": prepared}, "run": {"storage_path": "s3://bucket/runs"}}))
    assert uri.run.storage_path == "s3://bucket/runs"
    flat = flatten(cfg.resolved())
    assert flat["optim.lr"] == 0.1 and flat["data.path"] == prepared and "loss.params" in flat


def test_a_bad_config_fails_before_ray_starts(tmp_path, capsys):
    ray = pytest.importorskip("ray")
    from pipelines.train import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"data": {"path": str(tmp_path / "nowhere")}, "loss": {"name": "nope"},
                                    "optim": {"lr": -1}, "model": {"nmae": "small_cnn"}}))
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    for key in ("loss.name:", "optim.lr:", "data.path:", "model.nmae:"):
        assert key in err, err
    assert "4 errors" in err and not ray.is_initialized()


def test_cluster_runtime_env_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    with open(Path(__file__).resolve().parents[1] / "cluster" / "runtime_env.yaml") as f:
        env = RuntimeEnv(**yaml.safe_load(f))
    assert env["working_dir"] == "." and "/data/" in env["excludes"] and "/.venv/" in env["excludes"]
