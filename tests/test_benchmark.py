"""scripts/benchmark.py runs end to end on a tiny configuration and reports what it measured."""

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_all


def _scripts(script: str, *arg_lists: list[str], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """scripts/<script> once per argument list, the runs side by side."""
    return run_all([[sys.executable, f"scripts/{script}", *args] for args in arg_lists], REPO, timeout)


def _benchmark(*arg_lists: list[str]) -> list[subprocess.CompletedProcess]:
    return _scripts("benchmark.py", *arg_lists)


def _load_benchmark():
    """scripts/benchmark.py as a module, for its functions and main()."""
    spec = importlib.util.spec_from_file_location("benchmark_script", REPO / "scripts" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    return benchmark


def test_benchmark_runs_and_counts_fewer_flops_for_our_class_token_forward(tmp_path):
    out = tmp_path / "bench.json"
    args = [
        "--img-size",
        "16",
        "--embed-dim",
        "32",
        "--depth",
        "2",
        "--num-heads",
        "2",
        "--batch-size",
        "8",
        "--rounds",
        "1",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--json",
        str(out),
    ]
    [r] = _benchmark(args)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    rows = {row["model"]: row for row in result["rows"]}
    assert set(rows) == {"ours", "timm"}
    assert result["precision"] == "fp32"  # the CPU default; --precision bf16 adds autocast
    assert all(row["train_img_s"] > 0 and row["infer_img_s"] > 0 for row in rows.values())
    # The last of 2 blocks computes queries, projection and MLP for 1 of 17 tokens: fewer FLOPs.
    assert rows["ours"]["train_gflop_per_step"] < 0.8 * rows["timm"]["train_gflop_per_step"]
    assert rows["ours"]["memory_mib"] < rows["timm"]["memory_mib"]
    assert "| ours |" in r.stdout and "| timm |" in r.stdout


def test_loop_mode_times_vit_trains_step_against_a_bare_loop(folder_data, tmp_path):
    out = tmp_path / "loop.json"
    # Narrow and eager (the preset compiles where torch finds a C++ compiler: seconds per shape).
    model = ["model.embed_dim=48", "model.depth=1", "model.num_heads=2", "model.compile=false"]
    args = ["--loop", "--data-root", str(folder_data), "--img-size-at", "8", "--loop-steps", "6", "--loop-skip", "1"]
    args += ["--rounds", "2", "--json", str(out)]
    for o in ["data.val_size=30", "data.batch_size=16", "trainer.max_epochs=-1", *model]:
        args += ["--override", o]
    # Without data the loop cannot be measured: a clear message, exit 1.
    r, refused = _benchmark(args, ["--loop"])
    assert refused.returncode == 1 and "--loop needs --data-root" in refused.stderr
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["img_size"] == 8 and result["batch_size"] == 16 and result["rounds"] == 2
    assert all(len(v) == 2 and min(v) > 0 for v in result["img_s"].values())
    m = result["median_img_s"]
    assert result["ratio"] == m["vit-train"] / m["bare"] > 0
    assert f"{result['ratio']:.3f}x" in r.stdout


def test_loader_mode_times_the_experiments_training_loader_per_worker_count(folder_data, tmp_path):
    out = tmp_path / "loader.json"
    # cifar10_best's loader: RandAugment and random erasing per image; more batches than one epoch
    args = ["--loader", "--experiment", "cifar10_best", "--data-root", str(folder_data), "--loader-workers", "0,1"]
    args += ["--loop-steps", "6", "--loop-skip", "1", "--json", str(out)]
    for o in ["data.val_size=10", "data.batch_size=8"]:
        args += ["--override", o]
    r, refused = _benchmark(args, ["--loader"])
    assert refused.returncode == 1 and "--loader needs --data-root" in refused.stderr
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["experiment"] == "cifar10_best" and result["batch_size"] == 8 and result["batches"] == 6
    assert set(result["img_s_by_workers"]) == {"0", "1"} and min(result["img_s_by_workers"].values()) > 0
    assert "cifar10_best's training loader, batch 8, 1 workers:" in r.stdout


def test_variant_mode_times_the_experiments_model_against_a_changed_copy(tmp_path):
    out = tmp_path / "variant.json"
    args = ["--variant", "num_heads=4", "--variant", "precision=bf16", "--img-size-at", "8", "--batch-size", "4"]
    args += ["--rounds", "2", "--steps", "1", "--warmup", "0", "--json", str(out)]
    # The base runs at the experiment's trainer.precision (cpu_30min's: bf16 on a CPU with AMX or AVX512-BF16).
    # Eager: the preset compiles where torch finds a C++ compiler, which costs a test seconds per shape.
    for o in [
        "model.embed_dim=32",
        "model.depth=1",
        "model.num_heads=2",
        "trainer.precision=32-true",
        "model.compile=false",
    ]:
        args += ["--override", o]
    [r] = _benchmark(args)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["experiment"] == "cpu_30min" and result["img_size"] == 8 and result["batch_size"] == 4
    assert result["variant"] == {"num_heads": 4, "precision": "bf16"}  # values parsed as YAML
    assert result["compiled"] == {"base": False, "variant": False}  # model.compile=false, for both
    m = result["median_img_s"]
    assert min(m.values()) > 0 and result["ratio"] == m["variant"] / m["base"]
    assert f"{result['ratio']:.3f}x" in r.stdout


def test_variant_mode_refuses_what_is_not_a_model_keyword(monkeypatch, capsys):
    benchmark = _load_benchmark()
    for variant, message in [
        ("num_head=8", "num_head: not a VisionTransformer keyword"),
        ("num_heads", "must be KEY=VALUE"),
        ("precision=fp16", "bf16 or fp32"),
        ("compile=maybe", "compile='maybe': true or false"),
        ("global_pool=map", "global_pool must be one of"),  # the model's own check
    ]:
        monkeypatch.setattr(sys, "argv", ["benchmark.py", "--variant", variant, "--json", "unused.json"])
        with pytest.raises(SystemExit, match=message):
            benchmark.main()


def test_data_pipeline_rate_runs_past_the_end_of_an_epoch():
    # A GPU run at batch 1024 asked for 100 batches of 45,000 images and stopped with StopIteration:
    # here 5 batches of 8 from 20 images need three epochs.
    benchmark = _load_benchmark()
    assert benchmark.data_pipeline_rate(None, batch_size=8, num_workers=0, batches=5, num_images=20) > 0


def _plot(*arg_lists: list[str]) -> list[subprocess.CompletedProcess]:
    return _scripts("plot_time_to_accuracy.py", *arg_lists, timeout=120)


def test_time_to_accuracy_plot_draws_runs_and_the_timm_loop_with_their_steps(tmp_path):
    run = tmp_path / "run" / "csv"
    run.mkdir(parents=True)
    # vit-train's CSV logger: validation and time/minutes on their own rows, at the same steps.
    run.joinpath("metrics.csv").write_text(
        "step,val/acc,time/minutes,train/loss_step\n10,,,2.1\n99,0.40,,\n99,,1.5,\n199,0.55,,\n199,,3.0,\n"
    )
    timm = tmp_path / "timm.csv"
    timm.write_text("epochs,step,minutes,val_acc\n1.0,351,6.4,0.3576\n1.5,520,9.0,0.41\n")
    out = tmp_path / "fig.png"
    [proc] = _plot([str(out), "--run", f"ours={tmp_path / 'run'}", "--csv", f"timm={timm}"])
    assert proc.returncode == 0, proc.stderr
    assert "ours 1.5min/99:40.00% 3.0min/199:55.00%" in proc.stdout
    assert "timm 6.4min/351:35.76% 9.0min/520:41.00%" in proc.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_to_accuracy_plot_refuses_a_run_or_csv_without_validation(tmp_path):
    (tmp_path / "run" / "csv").mkdir(parents=True)
    (tmp_path / "run" / "csv" / "metrics.csv").write_text("step,train/loss_step\n10,2.1\n")
    (tmp_path / "timm.csv").write_text("epochs,step,minutes,val_acc\n")
    fig = str(tmp_path / "fig.png")
    no_val, missing, no_evals = _plot(
        [fig, "--run", f"ours={tmp_path / 'run'}"],
        [fig, "--run", f"ours={tmp_path / 'nothing'}"],
        [fig, "--csv", f"timm={tmp_path / 'timm.csv'}"],
    )
    assert no_val.returncode != 0 and "has no val/acc" in no_val.stderr
    assert missing.returncode != 0 and "not found" in missing.stderr
    assert no_evals.returncode != 0 and "has no evaluations" in no_evals.stderr
    assert not (tmp_path / "fig.png").exists()
