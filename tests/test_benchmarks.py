"""Every `dynloss benchmark` subcommand at toy size: it runs the real path, prints its table, and its JSON parses
with the fields docs/performance.md quotes. Nothing here asserts a time (STANDARDS: benchmarks print ratios)."""
import json

import pytest
import torch

from pipelines.benchmark import main


def test_step_benchmark_runs_each_row_in_its_own_process_and_reports_ratios(tmp_path, capsys):
    out = tmp_path / "step.json"
    rows = ["CE", "full jvp k=1", "full double_backward k=1", "head k=4"]
    assert main(["step", "--models", "small_cnn", "--rows", *rows, "--batch-size", "8", "--iters", "2",
                 "--warmup", "1", "--repeats", "1", "--device", "cpu", "--precision", "fp32", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [r["row"] for r in report["rows"]] == rows and report["precision"] == "fp32"
    for r in report["rows"]:
        assert r["model"] == "small_cnn" and r["device"] == "cpu" and r["input"] == [1, 28, 28]
        assert r["amp"] == "off" and r["channels_last"] is False
        assert r["seconds_per_iter"] > 0 and r["peak_memory_mb"] >= 0 and r["time_x_ce"] > 0
        assert f"{r['seconds_per_iter'] * 1e3:.1f}" in printed
    assert report["rows"][0]["time_x_ce"] == 1.0
    assert report["rows"][-1]["iters"] == 4  # rounded up to whole meta-interval cycles


def test_step_benchmark_precision_sets_the_config_keys_the_builder_reads():
    from pipelines.benchmarks.step import PRECISION, synthetic_components

    c = synthetic_components("small_cnn", 8, "cpu", train=PRECISION["fp32"])
    assert (c.cfg.train.amp, c.cfg.train.channels_last) == ("off", "off")
    assert synthetic_components("small_cnn", 8, "cpu", train=PRECISION["auto"]).cfg.train.amp == "auto"


def test_step_benchmark_times_the_passes_of_a_step(capsys):
    assert main(["step", "--phases", "--models", "small_cnn", "--batch-size", "8", "--repeats", "1",
                 "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    units = {line.split("  ")[1].strip(): float(line.split()[-3]) for line in lines[1:]}
    assert set(units) == {"forward (graph kept)", "forward, no grad", "forward + backward", "forward-mode pass (JVP)",
                          "JVP off the graph"}
    assert units["forward (graph kept)"] == 1.0 and all(u > 0 for u in units.values())


def test_step_benchmark_refuses_an_unknown_model(capsys):
    assert main(["step", "--models", "vgg7"]) == 2
    assert "--models: unknown ['vgg7']" in capsys.readouterr().err


def test_ingest_single_process_path_decodes_on_one_thread_while_its_views_are_normalised():
    # the plain loop is counted as one core: normalising its batches (timed apart) must leave the thread count its
    # epoch set, not the one from before the epoch (which let it decode on two threads from the second batch on)
    import torch

    from pipelines.benchmarks.ingest import _consume

    seen, before = [], torch.get_num_threads()

    def epoch():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for _ in range(3):
                seen.append(torch.get_num_threads())
                yield {"id": torch.zeros(2), "corrupt": torch.tensor(0),
                       "weak": torch.zeros(2, 1, 4, 4, dtype=torch.uint8)}
        finally:
            torch.set_num_threads(threads)

    torch.set_num_threads(2)
    try:
        images, corrupt, spent = _consume(epoch(), lambda x: x.float())
        assert seen == [1, 1, 1] and torch.get_num_threads() == 2
        assert (images, corrupt) == (6, 0) and spent >= 0
    finally:
        torch.set_num_threads(before)


def test_ingest_benchmark_reports_both_paths_and_their_ratio(ray_local, digits, tmp_path, capsys):
    out = tmp_path / "ingest.json"
    assert main(["ingest", "--data", digits, "--preset", "digits", "--batch-size", "64", "--epochs", "2",
                 "--warmup", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["single_process"]["images"] == r["ray_data"]["images"] > 0  # the same rows through both paths
    for path in ("single_process", "ray_data"):  # two timed epochs each, the warm-up not among them
        assert len(r[path]["epoch_seconds"]) == 2
        assert sum(r[path]["epoch_seconds"]) == pytest.approx(r[path]["seconds"])
    assert r["ray_data"]["corrupt"] == r["single_process"]["corrupt"] == 0 and r["source"] == "held"
    # both paths end at uint8 views; the normalisation that follows is timed apart, on the single-process batches
    assert r["normalise_us_per_image"] == pytest.approx(1e6 * r["single_process"]["normalise_seconds"]
                                                        / r["single_process"]["images"])
    assert r["normalise_us_per_image"] > 0 and "normalise_seconds" not in r["ray_data"]
    assert r["ratio_per_core"] == pytest.approx(r["ray_data"]["images_per_s_per_core"]
                                                / r["single_process"]["images_per_s_per_core"])
    assert "ratio ray data / single-process" in capsys.readouterr().out


def test_epoch_benchmark_times_the_ray_path_and_the_in_memory_one(ray_local, digits, tmp_path, capsys):
    out = tmp_path / "epoch.json"
    assert main(["epoch", "--config", "pipelines/configs/digits.yaml", "--set", f"data.path={digits}",
                 "--set", "data.prepare=null", "--set", "scaling.num_workers=1", "--losses", "ce", "--epochs", "2",
                 "--device", "cpu", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    (row,) = r["rows"]
    for path in ("ray", "in_memory"):
        assert len(row[path]["epoch_s"]) == 2 and all(t > 0 for t in row[path]["epoch_s"])
        assert 0 < row[path]["top1"] <= 1
    assert row["ratio_epoch"] == pytest.approx(row["ray"]["steady_epoch_s"] / row["in_memory"]["steady_epoch_s"])
    assert "ray / in memory: per epoch" in capsys.readouterr().out


def test_scaling_benchmark_world_2_equals_world_1_and_reports_throughput(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    assert main(["scaling", "--model", "small_cnn", "--batch-size", "16", "--iters", "2", "--warmup", "1",
                 "--check-iters", "2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    e = r["equality"]
    assert e["passed"] and e["iters"] == 2
    for part in ("theta", "phi"):
        assert e[f"{part}_max_abs_diff"] <= e[f"{part}_tolerance"] < e[f"{part}_moved"]  # moved, yet equal
    rows = r["throughput"]["rows"]
    assert [(x["world"], x["batch_per_worker"]) for x in rows] == [(1, 16), (2, 8)]
    assert all(x["images_per_s"] > 0 and x["images_per_s_per_worker"] > 0 for x in rows)
    assert r["throughput"]["ratio_per_worker"] > 0 and r["throughput"]["speedup_total"] > 0
    assert "world 2 / world 1: per worker" in capsys.readouterr().out


def test_ingest_benchmark_generates_and_reads_a_jpeg_set(ray_local, tmp_path):
    out = tmp_path / "ingest_jpeg.json"
    # block order, as the configs for large JPEG data stream it: the generated set is prepared in a shuffled row
    # order, which `shuffle: blocks` needs (class folders list their files class by class)
    assert main(["ingest", "--jpeg", "30", "--batch-size", "16", "--epochs", "1", "--warmup", "1", "--shuffle",
                 "blocks", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["preset"] == "imagenet" and r["images_generated"] == 30
    assert r["source"] == "streamed" and r["shuffle"] == "blocks"
    assert r["single_process"]["images"] == r["ray_data"]["images"] == 30 and r["ray_data"]["corrupt"] == 0
    assert len(r["ray_data_by_cores"]) == 1


def test_ingest_benchmark_times_decoding_on_a_device_without_ray(tmp_path, capsys):
    """``--device DEV --no-ray``: the single-process loop on the CPU and the same loop decoding on DEV (the GPU
    machine has no Ray; the CPU stands in for it here), the same images through both."""
    out = tmp_path / "ingest_device.json"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert main(["ingest", "--jpeg", "30", "--batch-size", "16", "--epochs", "2", "--warmup", "1", "--no-ray",
                 "--device", device, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["ray_data"] is None and r["ray_data_by_cores"] == [] and r["ratio_per_core"] is None
    on = r["single_process_on_device"]
    assert on["device"].startswith(device) and on["images"] == r["single_process"]["images"] == 60
    assert len(on["epoch_seconds"]) == 2 and r["ratio_device"] == pytest.approx(
        on["images_per_s"] / r["single_process"]["images_per_s"])
    assert f"ratio decoding on {on['device']} / on the CPU" in capsys.readouterr().out


def test_ingest_benchmark_needs_exactly_one_source(capsys):
    assert main(["ingest"]) == 2
    assert "give --data DIR (prepared shards) or --jpeg N" in capsys.readouterr().err
