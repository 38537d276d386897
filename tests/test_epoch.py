"""The epoch engine (dynloss.epoch), the builder and the Dynamic Loss choices docs/method.md measured.

Runs the Ray-free driver on scikit-learn's digits prepared as real shards; seconds each.

    .venv/bin/python -m pytest tests/test_epoch.py -q
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynloss.builder import build_components
from dynloss.checkpoint import eval_weights
from dynloss.config import validate
from dynloss.data import read_manifest
from dynloss.dynamic import DynamicLoss
from dynloss.engine import predict
from dynloss.epoch import (
    COLLAPSE_DROP,
    TrainState,
    evaluate,
    finetune_batches,
    flip_notice,
    leave_out,
    meta_batches,
    meta_ids,
    ranking_pass,
    run_epoch,
    watch_collapse,
)
from dynloss.local import load_data, train_local
from dynloss.meta import MetaBatch, build_meta_optimizer, meta_step
from dynloss.models.classifier import Classifier


def cfg_for(data: str, **dynamic):
    return validate({"data": {"path": data, "preset": "digits"}, "model": {"name": "small_cnn"},
                     "loss": {"name": "dynamic"}, "optim": {"lr": 0.02, "schedule": "onecycle"},
                     "dynamic": {"warmup_epochs": 1, "margin_prior": "log_prior", "meta_batch_size": 32, **dynamic},
                     "train": {"epochs": 2, "batch_size": 32}})


def test_builder_makes_what_the_config_says(digits):
    cfg = validate({**cfg_for(digits).resolved(), "dynamic": {"hidden": 16, "margin_meta_lr": 0.0, "scope": "head",
                                                               "margin_prior": "log_prior", "warmup_epochs": 1}})
    c = build_components(cfg, read_manifest(digits), "cpu")
    assert c.dyn.corrector.embedding.weight.shape == (100, 16) and c.criterion is None
    assert [g["lr"] for g in c.meta_optimizer.param_groups] == [cfg.dynamic.meta_lr, 0.0]
    assert c.settings.scope == "head" and c.steps_per_epoch == -(-c.train_rows // 32)
    base = build_components(validate({**cfg.resolved(), "loss": {"name": "logit_adjusted"}}), read_manifest(digits),
                            "cpu")
    assert base.dyn is None and base.criterion is not None
    # the same initial weights from the same seed, whatever else the config says
    assert all(torch.equal(a, b) for a, b in zip(c.model.state_dict().values(), base.model.state_dict().values()))


def test_an_epoch_leaves_the_meta_set_out_and_reports_everything(digits):
    hist = train_local(cfg_for(digits), log=lambda line: None).history
    warm, meta = hist
    assert "meta/loss" not in warm and warm["train/images"] == read_manifest(digits)["splits"]["train"]["rows"]
    assert meta["train/images"] == warm["train/images"] - meta["meta/set_size"]
    for key in ("meta/loss", "finetune/loss", "meta/trust_clean", "meta/auc", "meta/margin_slope", "eval/top1",
                "eval/collapse", "time/ranking_s"):
        assert np.isfinite(meta[key]), key
    kept = train_local(validate({**cfg_for(digits).resolved(), "sampling": {"leave_out": False}}),
                       log=lambda line: None).history[-1]
    assert kept["train/images"] == warm["train/images"]


def test_a_clean_seed_set_is_in_every_meta_set_with_its_right_labels(digits, tmp_path):
    from dynloss.config import ConfigError

    cfg = validate({**cfg_for(digits).resolved(), "sampling": {"clean_per_class": 3, "per_class": 4}})
    c = build_components(cfg, read_manifest(digits), "cpu")
    data, state = load_data(c), TrainState()
    corpus = ranking_pass(c, data, state, 1)
    first, second = meta_ids(c, corpus, 1), meta_ids(c, corpus, 2)
    right = corpus["id"][corpus["label"] == corpus["true_label"]]
    seed = np.intersect1d(np.intersect1d(first, second), right)
    per_class = np.bincount(corpus["label"][np.isin(corpus["id"], seed)], minlength=c.num_classes)
    assert (per_class >= 3).all()  # every class keeps its 3 verified rows from epoch to epoch
    import shutil

    clean_free = tmp_path / "no_truth"
    shutil.copytree(digits, clean_free)
    manifest = (clean_free / "manifest.json").read_text().replace('"true_counts"', '"_true_counts"')
    (clean_free / "manifest.json").write_text(manifest)
    with pytest.raises(ConfigError, match="sampling.clean_per_class"):
        validate({**cfg.resolved(), "data": {**cfg.resolved()["data"], "path": str(clean_free)}})


def test_leave_out_keeps_an_all_meta_batch_whole():
    b = {"id": torch.tensor([1, 2, 3]), "x": torch.zeros(3, 1), "label": torch.tensor([0, 1, 2]), "corrupt": 1}
    out = leave_out(b, torch.tensor([2]))
    assert out["id"].tolist() == [1, 3] and out["x"].shape == (2, 1) and out["corrupt"] == 1
    assert leave_out(b, torch.tensor([1, 2, 3])) is b and leave_out(b, None) is b


def test_meta_and_finetune_batches_are_full_batches_only(digits):
    c = build_components(cfg_for(digits), read_manifest(digits), "cpu")
    data = load_data(c)
    data.set_meta(np.arange(70), epoch=0)  # 70 rows, meta batch 32, fine-tune batch 32
    sizes = [len(b["label"]) for _, b in zip(range(5), meta_batches(c, data, 70, 0))]
    assert sizes == [32] * 5  # the 6-row remainder of each pass is never a batch
    assert [len(b["label"]) for b in finetune_batches(c, data, 70, 0)] == [32, 32]
    assert [len(b["label"]) for b in finetune_batches(c, data, 20, 0)] == [20]  # fewer rows: one batch of all


def test_oracle_corrector_trusts_exactly_the_right_labels(digits):
    c = build_components(cfg_for(digits, corrector="oracle"), read_manifest(digits), "cpu")
    state = TrainState()
    corpus = ranking_pass(c, load_data(c), state, 0)
    right = corpus["label"] == corpus["true_label"]
    assert (corpus["rank"] == right).all() and 0.1 < 1 - right.mean() < 0.4
    w = c.dyn.corrector.trust(torch.as_tensor(corpus["rank"]), torch.as_tensor(corpus["label"]))
    assert torch.equal(w, torch.as_tensor(right, dtype=torch.float32))
    assert not list(c.dyn.corrector.parameters())


def test_the_ranking_pass_ranks_the_loss_the_config_names(digits):
    """``rank_loss: adjusted`` ranks CE of z + margins (what the loss fits), ``logits`` CE of z (the authors')."""
    corpora = {}
    for rank_loss in ("logits", "adjusted"):
        c = build_components(cfg_for(digits, rank_loss=rank_loss), read_manifest(digits), "cpu")
        data = load_data(c)
        corpora[rank_loss] = ranking_pass(c, data, TrainState(), 1)
        x = c.input(torch.cat([b["x"] for b in data.rank_batches(1)]))
        with torch.no_grad():
            z = c.inner.eval()(x)
        extra = c.dyn.margins().detach() if rank_loss == "adjusted" else 0.0
        expected = F.cross_entropy(z + extra, torch.as_tensor(corpora[rank_loss]["label"]), reduction="none")
        assert np.allclose(corpora[rank_loss]["loss"], expected.numpy(), atol=1e-5)
    # the log prior is far from flat on digits-LT, so the two rankings differ
    assert (corpora["logits"]["rank"] != corpora["adjusted"]["rank"]).mean() > 0.05
    # within each given label (the authors') every label spans the buckets; over all rows one order of the losses
    c = build_components(cfg_for(digits, rank_loss="adjusted", rank_within="all"), read_manifest(digits), "cpu")
    whole = ranking_pass(c, load_data(c), TrainState(), 1)
    order = np.argsort(whole["loss"], kind="stable")
    assert (np.diff(whole["rank"][order]) >= 0).all() and whole["rank"].max() >= 95
    per_label = corpora["adjusted"]
    assert not (np.diff(per_label["rank"][order]) >= 0).all()


def test_the_flip_check_decides_once_after_warm_up_and_then_ranks_and_samples_as_the_three_keys(digits):
    """``dynamic.flip_check``: the first ranking pass after warm-up decides (``state.flipped``) from the classifier's
    predictions; a run that found a flipped label ranks exactly as ``rank_loss: adjusted`` + ``rank_within: all``
    and samples its metadata as ``sampling.meta_pool: agreeing``, one that found none exactly as the keys are set,
    and nothing re-decides later (a resumed run keeps it too)."""
    from dynloss.sampling import flipped_labels

    def corpus(state, epoch=1, **keys):
        c = build_components(cfg_for(digits, **keys), read_manifest(digits), "cpu")
        return c, ranking_pass(c, load_data(c), state, epoch)

    _, authors = corpus(TrainState())
    _, two_keys = corpus(TrainState(), rank_loss="adjusted", rank_within="all")
    assert (authors["rank"] != two_keys["rank"]).mean() > 0.05
    # decided: flipped (some label) or not; the same model, so the same corpus as the keys would give
    for flipped, same_as in (([3], two_keys), ([], authors)):
        _, got = corpus(TrainState(flipped=flipped), flip_check=0.125)
        assert np.array_equal(got["rank"], same_as["rank"]) and np.array_equal(got["loss"], same_as["loss"])
    # undecided: the pass at the end of warm-up (epoch 1 here) decides from argmax z, the one before it does not
    state = TrainState()
    corpus(state, epoch=0, flip_check=1.0)
    assert state.flipped is None
    c, got = corpus(state, epoch=1, flip_check=1.0)
    expected, ratio = flipped_labels(got["label"], got["pred"], c.num_classes, 1.0)
    assert state.flipped == expected and state.flip_ratio == ratio
    state.flipped = [0] if not expected else []  # a later pass leaves the decision alone
    corpus(state, epoch=2, flip_check=1.0)
    assert state.flipped == ([0] if not expected else [])
    assert flip_notice(c, state, {}) is None
    line = flip_notice(c, state, {"rank/flipped_labels": float(len(state.flipped)), "rank/flip_ratio": ratio})
    assert ("class-dependent noise" in line) == bool(state.flipped)

    # a run that found a flipped label also draws its metadata as sampling.meta_pool: agreeing would
    def meta_set(state, cfg):
        c = build_components(cfg, read_manifest(digits), "cpu")
        data, seen = load_data(c), []
        set_meta = data.set_meta
        data.set_meta = lambda ids, epoch: (seen.append(np.sort(ids)), set_meta(ids, epoch))[1]
        run_epoch(c, data, state, 1)
        return seen[0]

    two = cfg_for(digits, rank_loss="adjusted", rank_within="all").resolved()
    found = meta_set(TrainState(flipped=[3]), cfg_for(digits, flip_check=0.125))
    assert np.array_equal(found, meta_set(TrainState(), validate({**two, "sampling": {"meta_pool": "agreeing"}})))
    assert not np.array_equal(found, meta_set(TrainState(), validate(two)))


def test_an_agreeing_meta_pool_keeps_a_mostly_flipped_label_out_of_the_metadata(digits):
    """Class 1's label is 80% flips from class 0, and the flips have the lower losses (a loss ranking within the
    label cannot see them): the authors' pool fills class 1's metadata with flips, ``meta_pool: agreeing`` takes
    rows whose label is the classifier's argmax; a class with too few of those (class 2) is topped up with its easiest
    other rows, so every class keeps its size (k2 = 15, from every row's label)."""
    rng = np.random.default_rng(0)
    label = np.repeat([0, 1, 2], [200, 100, 60])
    true = label.copy()
    true[200:280] = 0                                  # 80 of class 1's 100 labels are flipped-in class-0 images
    fit_pred = true.copy()                             # a classifier that fits the images' own class ...
    fit_pred[305:360] = 0                              # ... and is not sure of most of class 2 yet
    loss = rng.random(label.size)
    loss[200:280] *= 0.1                               # ... and finds the flips easy
    corpus = {"id": np.arange(label.size) * 3, "label": label, "true_label": true, "fit_pred": fit_pred, "loss": loss}
    picked = {}
    for pool in ("all", "agreeing"):
        cfg = validate({**cfg_for(digits).resolved(), "sampling": {"meta_pool": pool}})
        rows = meta_ids(build_components(cfg, read_manifest(digits), "cpu"), corpus, 1) // 3
        picked[pool] = rows
        assert (np.bincount(label[rows], minlength=3) == 15).all()
    class_1 = {pool: rows[label[rows] == 1] for pool, rows in picked.items()}
    assert (true[class_1["all"]] != 1).all() and (true[class_1["agreeing"]] == 1).all()
    topped_up = picked["agreeing"][label[picked["agreeing"]] == 2]
    others = np.arange(305, 360)
    easiest = others[np.argsort(loss[others])[:10]]
    assert set(topped_up) == set(range(300, 305)) | set(easiest)


def with_ema(cfg, decay: float, warmup: bool = False):
    raw = cfg.resolved()
    return validate({**raw, "train": {**raw["train"], "ema_decay": decay, "ema_warmup": warmup}})


def test_evaluation_uses_the_weight_average_updated_after_every_optimizer_step(digits):
    """``train.ema_decay``: e <- d e + (1 - d) theta after every step (the first step copies), buffers included;
    the evaluation's top-1 is that of the averaged weights; without it nothing is averaged."""
    c = build_components(with_ema(cfg_for(digits), 0.8), read_manifest(digits), "cpu")
    expected: dict[str, torch.Tensor] = {}

    def track(opt, args, kwargs):  # the average by hand, from the weights after each step
        for k, v in c.inner.state_dict().items():
            if k.endswith("num_batches_tracked"):
                continue
            expected[k] = v.detach().clone() if k not in expected else 0.8 * expected[k] + 0.2 * v.detach()

    c.optimizer.register_step_post_hook(track)
    data, state = load_data(c), TrainState()
    for epoch in range(2):
        run_epoch(c, data, state, epoch)
    got = c.ema.module.state_dict()
    assert c.ema.n_averaged > c.steps_per_epoch  # train steps and the meta epoch's fine-tune steps
    for k, v in expected.items():
        assert torch.allclose(got[k], v, atol=1e-5), k
    metrics, _ = evaluate(c, data, state, 1)
    out = predict(c.ema.module, ({**b, "x": c.input(b["x"])} for b in data.eval_batches(1)))
    assert metrics["eval/top1"] == pytest.approx(float(np.mean(out["pred"] == out["label"])), abs=1e-12)
    assert build_components(cfg_for(digits), read_manifest(digits), "cpu").ema is None


def test_the_weight_average_can_warm_up_its_decay(digits):
    """``train.ema_warmup``: the n-th update uses d = min(ema_decay, (1 + n) / (10 + n)), so a short run's average
    follows its recent weights; integer buffers follow the same rule; off, d is ema_decay from the start."""
    c = build_components(with_ema(cfg_for(digits), 0.99, warmup=True), read_manifest(digits), "cpu")
    g = torch.Generator().manual_seed(0)
    expected = plain = None
    for n in range(25):
        with torch.no_grad():
            for t in c.inner.state_dict().values():
                t.copy_(torch.randint(0, 5, t.shape, generator=g) if not t.is_floating_point()
                        else torch.randn(t.shape, generator=g))
        now = {k: v.clone() for k, v in c.inner.state_dict().items()}
        c.ema.update_parameters(c.inner)
        d = min(0.99, (1 + n) / (10 + n))
        expected = now if expected is None else {
            k: (d * expected[k] + (1 - d) * now[k]).to(now[k].dtype) for k in now}
        plain = now if plain is None else {k: 0.99 * plain[k] + 0.01 * now[k] for k in now}
        got = c.ema.module.state_dict()
        for k, v in expected.items():
            assert torch.allclose(got[k].float(), v.float(), atol=1e-5), (n, k)
    # 25 updates in, the constant-decay average still holds 0.99^24 = 79% of the first weights, the warmed-up one
    # almost none of them: the two are far apart
    weight = next(k for k in expected if k.endswith("weight"))
    assert (expected[weight] - plain[weight]).abs().max() > 0.5


def test_the_weight_average_changes_what_is_evaluated_not_what_is_trained(digits):
    plain = train_local(cfg_for(digits), log=lambda line: None).history
    averaged = train_local(with_ema(cfg_for(digits), 0.8), log=lambda line: None).history
    for key in ("train/loss", "train/acc", "meta/trust_clean", "meta/trust_noisy", "meta/loss"):
        assert [h.get(key) for h in averaged] == [h.get(key) for h in plain], key


def test_ema_eval_flipped_evaluates_the_average_only_once_the_flip_check_has_fired(digits):
    """``train.ema_eval: flipped``: the average is kept from the first step, and evaluation (``eval/averaged``), the
    flip notice and ``dynloss evaluate``'s checkpoint weights switch to it only when the check found a flipped label;
    runs that cannot fire (other losses, no flip check) keep no average; the key needs ``train.ema_decay``."""
    def cfg(**over):
        raw = cfg_for(digits, flip_check=0.125).resolved()
        return validate({**raw, "train": {**raw["train"], "ema_decay": 0.8, "ema_eval": "flipped"}, **over})

    c = build_components(cfg(), read_manifest(digits), "cpu")
    data, state = load_data(c), TrainState()
    run_epoch(c, data, state, 0)
    assert state.flipped is None  # still warm-up: undecided
    with torch.no_grad():  # an average that predicts class 0 for every image: told apart from the trained weights
        c.ema.module.fc.bias[0] += 1e4
    inputs = lambda: ({**b, "x": c.input(b["x"])} for b in data.eval_batches(0))  # noqa: E731
    top1 = {name: float(np.mean(out["pred"] == out["label"]))
            for name, out in (("trained", predict(c.inner, inputs())), ("average", predict(c.ema.module, inputs())))}
    assert top1["trained"] != top1["average"]
    for flipped, which in ((None, "trained"), ([], "trained"), ([2], "average")):
        state.flipped = flipped
        metrics, _ = evaluate(c, data, state, 0)
        assert metrics["eval/top1"] == pytest.approx(top1[which], abs=1e-12), flipped
        assert metrics["eval/averaged"] == float(which == "average")
        line = flip_notice(c, state, {"rank/flipped_labels": float(len(flipped or [])), "rank/flip_ratio": 0.5})
        assert ("weight average" in line) == (which == "average")
    # a checkpoint of the run serves the weights its evaluation used
    saved = {"model": {"w": "trained"}, "ema": {"module.w": "average", "n_averaged": 3},
             "config": c.cfg.resolved(), "extra": {"flipped": None}}
    for flipped, which in ((None, "trained"), ([], "trained"), ([2], "average")):
        assert eval_weights({**saved, "extra": {"flipped": flipped}}) == {"w": which}
    always = {**saved, "config": {**saved["config"], "train": {**saved["config"]["train"], "ema_eval": "always"}}}
    assert eval_weights(always)["w"] == "average"
    assert build_components(cfg(loss={"name": "ce"}), read_manifest(digits), "cpu").ema is None
    no_check = cfg(dynamic={**c.cfg.resolved()["dynamic"], "flip_check": None})
    assert build_components(no_check, read_manifest(digits), "cpu").ema is None
    raw = c.cfg.resolved()
    with pytest.raises(ValueError, match="train.ema_eval.*train.ema_decay is null"):
        validate({**raw, "train": {**raw["train"], "ema_decay": None}})


def test_trusted_prior_follows_the_trusted_labels(digits):
    hist = train_local(cfg_for(digits, corrector="oracle", prior_from="trusted", margin_meta_lr=0.0),
                       log=lambda line: None)
    c, corpus = hist.components, hist.state.corpus
    clean = np.bincount(corpus["label"][corpus["label"] == corpus["true_label"]], minlength=10)
    expected = np.log(clean / clean.sum())
    assert np.allclose(c.dyn.margins.log_prior.numpy(), expected, atol=1e-5)


def test_pseudo_labels_from_the_adjusted_logits_and_argmax():
    dyn = DynamicLoss(3, class_counts=[90, 9, 1], margin_prior="log_prior")
    z = torch.tensor([[0.0, 0.5, 1.0]])
    assert dyn.pseudo_labels(z, "argmax").tolist() == [[0.0, 0.0, 1.0]]
    with torch.no_grad():
        adjusted = dyn.pseudo_labels(z + dyn.margins(), "argmax")
    assert adjusted.tolist() == [[1.0, 0.0, 0.0]]  # the head class once the prior is added


def test_a_frozen_generator_keeps_the_logit_adjustment():
    torch.manual_seed(0)
    model = Classifier(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh()), 6, 3)
    dyn = DynamicLoss(3, class_counts=[50, 10, 2], margin_prior="log_prior")
    before = dyn.margins().detach().clone()
    mopt = build_meta_optimizer(dyn, 3e-3, margin_lr=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y, r = torch.randn(16, 4), torch.randint(0, 3, (16,)), torch.randint(0, 100, (16,))
    trust = dyn.corrector.trust(r, y).detach().clone()
    for _ in range(3):
        meta_step(model, dyn, opt, mopt, x, y, r, MetaBatch(x, y), pseudo_from="adjusted", mix="argmax")
    assert torch.equal(dyn.margins().detach(), before) and not torch.equal(dyn.corrector.trust(r, y), trust)


def test_warmup_with_margins_is_logit_adjusted_ce(digits):
    from dynloss.engine import train_one_epoch

    c = build_components(cfg_for(digits, warmup_loss="margins", warmup_epochs=1), read_manifest(digits), "cpu")
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    with torch.no_grad():  # train-mode batch norm normalises with the batch's statistics, as the step does
        expected = F.cross_entropy(c.model(x) + c.dyn.margins(), y)
    stats, _ = train_one_epoch(c.model, c.optimizer, [{"id": torch.arange(8), "x": x, "label": y}], epoch=0,
                               settings=c.settings, dyn=c.dyn, meta_optimizer=c.meta_optimizer)
    assert stats["train/loss"] == pytest.approx(float(expected), rel=1e-5)


def test_a_collapse_after_warm_up_is_flagged(digits):
    c = build_components(cfg_for(digits, warmup_epochs=1), read_manifest(digits), "cpu")
    state = TrainState()
    assert watch_collapse(c, state, {"eval/top1": 0.2}, 0) is None  # warm-up: not watched
    assert watch_collapse(c, state, {"eval/top1": 0.8}, 1) is None
    m = {"eval/top1": 0.8 - COLLAPSE_DROP - 0.01}
    assert "below this run's best 80.0%" in watch_collapse(c, state, m, 2) and m["eval/collapse"] == 1.0
    m = {"eval/top1": 0.78}
    assert watch_collapse(c, state, m, 3) is None and m["eval/collapse"] == 0.0
