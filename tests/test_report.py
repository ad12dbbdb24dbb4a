"""`diffrl report`: run folders -> typed runs, target-reaching, tables, figures, grids; partial and
resumed runs; exit codes. Synthetic run folders with hand-computed values."""

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from diffrl.cli import main
from diffrl.report import (
    NotARunFolder,
    figure_panels,
    find_runs,
    first_reaching,
    load_run,
    load_runs,
    relative_change,
    resolve_target,
    reward_names,
    write_report,
)


def _eval(step, strict, fid=None, **extra):
    m = {"step": step, "strict": strict, "count": strict + 0.3, "color": strict + 0.3, "shape": strict + 0.3,
         "partial": strict + 0.3, "images": 8.0, "strict_objects_1": 1.0, "fidelity": 0.999, "seconds": 1.0}
    if fid is not None:
        m.update(off_palette=0.001, fid_shapes=fid, diversity=0.25, diversity_renders=0.28)
    m.update(extra)
    return m


def make_run(root, name, algorithm="crd", seed=0, steps=4, samples=32, dt=10.0, evals=(), summary=True,
             eval_file=True, grids=(0, 4), extra_lines=""):
    """A run folder like `diffrl train` writes: `steps` steps of `samples` samples, `dt` s apart."""
    d = root / name
    (d / "grids").mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"run": {"name": name, "seed": seed},
                                                   "learner": {"algorithm": algorithm}}))
    lines = []
    by_step = {e["step"]: e for e in evals}
    if 0 in by_step:
        lines.append({"kind": "eval", **by_step[0]})
    for s in range(1, steps + 1):
        lines.append({"step": s, "kind": "train", "time": dt * s, "samples": samples,
                      "reward_mean": 0.4 + 0.05 * s, "kl": 0.01 * s})
        if s in by_step:
            lines.append({"kind": "eval", **by_step[s]})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + extra_lines)
    if eval_file:
        (d / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    if summary:
        (d / "summary.json").write_text(json.dumps({
            "end_step": steps, "seconds": dt * steps + 10.0,
            "learner_counters": {"samples_trained": steps * samples}}))
    for i, s in enumerate(grids):
        Image.fromarray(np.full((20, 30 + 10 * i, 3), 40 * i, np.uint8)).save(d / "grids" / f"step_{s:06d}.png")
    return d


@pytest.fixture
def two_runs(tmp_path):
    a = make_run(tmp_path, "crd-a", evals=[_eval(0, 0.2, fid=10.0), _eval(2, 0.25, fid=12.0),
                                          _eval(4, 0.35, fid=15.0)])
    b = make_run(tmp_path, "grpo-b", algorithm="grpo", seed=1, steps=6, samples=16, dt=5.0,
                 evals=[_eval(0, 0.2, fid=10.0), _eval(6, 0.28, fid=8.0)], grids=(0, 6))
    return a, b


def test_load_run_samples_times_and_evaluations(two_runs):
    run = load_run(two_runs[0])
    assert (run.name, run.algorithm, run.seed, run.label) == ("crd-a", "crd", 0, "crd-a (crd)")
    assert run.steps == 4 and run.samples == 128 and run.finished and not run.resumed
    assert run.wall_seconds == 50.0  # summary.json seconds
    assert [p.samples for p in run.train] == [32, 64, 96, 128]
    assert [p.seconds for p in run.train] == [10.0, 20.0, 30.0, 40.0]
    assert [(e.step, e.samples, e.seconds) for e in run.evals] == [(0, 0, 0.0), (2, 64, 20.0), (4, 128, 40.0)]
    assert run.base.metrics["strict"] == 0.2 and run.final.metrics["fid_shapes"] == 15.0
    assert [s for s, _ in run.grids] == [0, 4]
    assert run.warnings == []


def test_target_reaching(two_runs):
    runs = load_runs([str(p) for p in two_runs])
    target, text = resolve_target(None, runs)  # default: first run's base 0.2 + 0.10
    assert target == pytest.approx(0.3) and "+0.10" in text
    hit = first_reaching(runs[0], target)
    assert (hit.step, hit.samples, hit.seconds, hit.strict) == (4, 128, 40.0, 0.35)
    assert first_reaching(runs[1], target) is None  # 0.28 < 0.30
    assert first_reaching(runs[0], resolve_target("0.25", runs)[0]).samples == 64  # exactly reached counts
    assert first_reaching(runs[1], resolve_target("+0.05", runs)[0]).step == 6
    assert first_reaching(runs[0], resolve_target("0.1", runs)[0]).samples == 0  # the base already reaches it
    with pytest.raises(ValueError):
        resolve_target("high", runs)
    assert relative_change(0.2, 0.35) == pytest.approx(75.0) and relative_change(0.0, 0.1) is None


def test_targets_from_each_runs_own_base(tmp_path):
    """Runs that start from different models (a base, a student) get +D on their own base value."""
    from diffrl.report import per_run_targets

    a = make_run(tmp_path, "base-crd", evals=[_eval(0, 0.4, fid=1.5), _eval(4, 0.55, fid=1.4)])
    b = make_run(tmp_path, "student-didr", algorithm="didr", evals=[_eval(0, 0.25, fid=14.0),
                                                                    _eval(2, 0.36, fid=13.0), _eval(4, 0.3, fid=12.0)])
    runs = load_runs([str(a), str(b)])
    targets, text = per_run_targets("+0.10", runs)
    assert targets == {"base-crd": pytest.approx(0.5), "student-didr": pytest.approx(0.35)} and "own base" in text
    assert first_reaching(runs[1], targets).step == 2 and first_reaching(runs[0], targets).step == 4
    assert first_reaching(runs[1], resolve_target("+0.10", runs)[0]) is None  # the first run's base: 0.5
    assert per_run_targets("0.45", runs)[0] == {"base-crd": 0.45, "student-didr": 0.45}
    md = write_report(runs, tmp_path / "out", target="+0.10", target_from="each").read_text()
    assert "| reached target strict 0.350 | step 2, 64 samples, 20 s (strict 0.360) |" in md
    assert "| reached target strict 0.500 | step 4, 128 samples, 40 s (strict 0.550) |" in md
    assert "diversity base → final" in md and "0.250 → 0.250" in md
    assert main(["report", str(a), str(b), "--target-from", "each", "--out", str(tmp_path / "cli")]) == 0
    assert "--target-from each" in (tmp_path / "cli" / "report.md").read_text()


def test_write_report_tables_figures_and_grids(two_runs, tmp_path):
    runs = load_runs([str(p) for p in two_runs])
    md_path = write_report(runs, tmp_path / "out", target=None, command="diffrl report x")
    out = md_path.parent
    for f in ("training", "accuracy", "fidelity"):
        for axis in ("samples", "wall"):
            assert (out / f"{f}_{axis}.png").stat().st_size > 1000
    grid = Image.open(out / "grids_crd-a.png")
    assert grid.width == 30 + 16 + 40 and grid.height == 22 + 20  # before | gap | after, under a caption
    md = md_path.read_text()
    assert "| strict | 0.200 | 0.350 | +0.150 | +75.0 % |" in md
    assert "| fid_shapes | 10.00 | 15.00 | +5.00 | +50.0 % |" in md
    assert "| fid_shapes | 10.00 | 8.00 | -2.00 | -20.0 % |" in md
    assert "| reached target strict 0.300 | step 4, 128 samples, 40 s (strict 0.350) |" in md
    assert "| reached target strict 0.300 | not reached |" in md
    assert "| crd-a | crd | 0 | 4 | 128 | 50 s | 0.200 | 0.350 | 0.0010 → 0.0010 | 10.00 → 15.00 " \
           "| 0.250 → 0.250 | 128 samples, 40 s |" in md
    assert "| grpo-b | grpo | 1 | 6 | 96 | 40 s | 0.200 | 0.280 |" in md
    for png in ("training_samples.png", "accuracy_samples.png", "fidelity_samples.png", "grids_grpo-b.png"):
        assert f"]({png})" in md  # embedded by relative path
    assert "## Warnings" not in md


def test_partial_run_is_reported_with_warnings(tmp_path):
    # killed after step 3: no summary.json, no eval.jsonl, a half-written last line
    d = make_run(tmp_path, "killed", steps=3, evals=[_eval(0, 0.2), _eval(2, 0.3)], summary=False,
                 eval_file=False, grids=(0,), extra_lines='{"step": 4, "kind": "tr')
    run = load_run(d)
    assert not run.finished and run.steps == 3 and run.samples == 96 and run.wall_seconds == 30.0
    assert [e.step for e in run.evals] == [0, 2]  # from metrics.jsonl's eval lines
    assert run.final.metrics["off_palette"] == pytest.approx(0.001)  # derived from fidelity
    text = " ".join(run.warnings)
    assert "killed" in text and "no eval.jsonl" in text and "unreadable line" in text
    md = write_report([run], tmp_path / "out").read_text()
    assert "## Warnings" in md and "3 (partial run)" in md and "(partial)" in md
    assert (tmp_path / "out" / "grids_killed.png").is_file()


def test_run_without_any_evaluation(tmp_path):
    d = make_run(tmp_path, "noeval", steps=2, evals=[], grids=())
    run = load_run(d)
    assert run.base is None and resolve_target(None, [run])[0] is None
    md = write_report([run], tmp_path / "out").read_text()
    assert "No held-out evaluation in this run." in md and "n/a (no target)" in md
    assert (tmp_path / "out" / "training_samples.png").is_file()
    assert not (tmp_path / "out" / "accuracy_samples.png").exists()


def test_resumed_run_appends_its_clock_and_keeps_the_redone_step(tmp_path):
    d = make_run(tmp_path, "resumed", steps=3, evals=[_eval(0, 0.2)], summary=False)
    redone = [{"step": s, "kind": "train", "time": t, "samples": 32, "reward_mean": 0.9} for s, t in ((3, 5.0), (4, 15.0))]
    with open(d / "metrics.jsonl", "a") as f:  # resumed from the checkpoint at step 2: step 3 is redone
        f.writelines(json.dumps(r) + "\n" for r in redone)
    run = load_run(d)
    assert run.resumed and run.steps == 4 and run.samples == 128
    assert [p.seconds for p in run.train] == [10.0, 20.0, 35.0, 45.0]
    assert run.train[2].reward == 0.9 and run.train[2].kl is None  # the redone step's record wins


def test_find_runs_globs_and_errors(two_runs, tmp_path):
    (tmp_path / "empty").mkdir()
    assert find_runs([str(tmp_path / "*-?")]) == [two_runs[0], two_runs[1]]
    assert find_runs([str(two_runs[0]), str(two_runs[0])]) == [two_runs[0]]
    with pytest.raises(NotARunFolder, match="not a run folder"):
        find_runs([str(tmp_path / "empty")])
    with pytest.raises(NotARunFolder, match="no such folder"):
        find_runs([str(tmp_path / "missing")])
    with pytest.raises(NotARunFolder, match="matches no run folder"):
        find_runs([str(tmp_path / "zz*")])


def test_report_command(two_runs, tmp_path, capsys):
    assert main(["report", str(two_runs[0]), "--target", "0.25"]) == 0
    md = (two_runs[0] / "report" / "report.md").read_text()  # default --out for one run
    assert "0.250 (absolute)" in md and "--target 0.25" in md and "step 2, 64 samples, 20 s" in md
    capsys.readouterr()
    assert main(["report", str(tmp_path / "empty-nothing")]) == 2
    assert "diffrl report:" in capsys.readouterr().err
    assert main(["report", str(two_runs[0]), "--target", "x", "--out", str(tmp_path / "r2")]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["report", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    assert "--target" in help_text and "--out" in help_text and "exits 2" in help_text


def _ocr_eval(step, reward, sem, pass_rate=None, masked=0, **extra):
    """An eval.jsonl line of a task without the shapes world's keys (e.g. OCR): only reward_* / pass_*."""
    m = {"step": step, "reward_ocr": reward, "reward_ocr_sem": sem, "eval_groups_masked": float(masked),
         "images": 8.0, "seconds": 2.0}
    if pass_rate is not None:
        m["pass_ocr"] = pass_rate
    m.update(extra)
    return m


@pytest.fixture
def ocr_runs(tmp_path):
    a = make_run(tmp_path, "ocr-a", evals=[_ocr_eval(0, 0.40, 0.02, 0.25), _ocr_eval(2, 0.45, 0.02, 0.375),
                                          _ocr_eval(4, 0.55, 0.015, 0.5, masked=1)])
    b = make_run(tmp_path, "ocr-b", algorithm="grpo", seed=1, steps=6, samples=16, dt=5.0, grids=(0, 6),
                 evals=[_ocr_eval(0, 0.40, 0.02, 0.25, reward_compressibility=-0.3, reward_compressibility_sem=0.01),
                        _ocr_eval(6, 0.48, 0.018, 0.375, reward_compressibility=-0.25,
                                  reward_compressibility_sem=0.01)])
    return a, b


def test_report_of_runs_without_shapes_metrics(ocr_runs, tmp_path):
    runs = load_runs([str(p) for p in ocr_runs])
    assert all(r.warnings == [] for r in runs)
    assert reward_names(runs) == ["ocr", "compressibility"]  # reward_ocr_sem is ocr's error, not a reward
    assert [(f, [k for k, _ in p]) for f, p in figure_panels(runs)] == [
        ("training", ["reward", "kl"]),
        ("heldout_reward", ["reward_ocr", "pass_ocr", "reward_compressibility"])]
    md_path = write_report(runs, tmp_path / "out")
    out, md = md_path.parent, md_path.read_text()
    for f in ("training", "heldout_reward"):
        for axis in ("samples", "wall"):
            assert (out / f"{f}_{axis}.png").stat().st_size > 1000
        assert f"]({f}_samples.png)" in md
    for f in ("accuracy", "fidelity"):  # no empty shapes panels
        assert not list(out.glob(f"{f}_*.png"))
    assert (out / "grids_ocr-a.png").is_file() and (out / "grids_ocr-b.png").is_file()
    assert "Target: none (" in md and "--target-metric" in md
    assert "strict" not in md.split("## Runs")[1] and "reached target" not in md and "fid_shapes" not in md
    assert ("| run | algorithm | seed | steps | samples | wall time | reward_ocr base → final | pass_ocr base → final "
            "| reward_compressibility base → final |") in md
    assert "| ocr-a | crd | 0 | 4 | 128 | 50 s | 0.400 ± 0.020 → 0.550 ± 0.015 | 0.250 → 0.500 | n/a |" in md
    assert ("| ocr-b | grpo | 1 | 6 | 96 | 40 s | 0.400 ± 0.020 → 0.480 ± 0.018 | 0.250 → 0.375 "
            "| -0.300 ± 0.010 → -0.250 ± 0.010 |") in md
    assert "| reward_ocr | 0.400 ± 0.020 | 0.550 ± 0.015 | +0.150 | +37.5 % |" in md  # per-run table
    assert "| pass_ocr | 0.250 | 0.500 | +0.250 | +100.0 % |" in md
    assert "| eval_groups_masked (not in the means) | 0 | 1 | +1 | n/a |" in md
    assert "| reward_compressibility | -0.300 ± 0.010 | -0.250 ± 0.010 | +0.050 | +16.7 % |" in md
    assert "## Warnings" not in md


def test_target_on_a_reward_metric(ocr_runs, tmp_path, capsys):
    runs = load_runs([str(p) for p in ocr_runs])
    with pytest.raises(ValueError, match="shapes-world metric.*--target-metric reward_ocr"):
        write_report(runs, tmp_path / "x", target="+0.1")  # strict is the default metric: say what is missing
    with pytest.raises(ValueError, match="--target-metric strict: no evaluation of these runs logged it"):
        write_report(runs, tmp_path / "x", target_metric="strict")
    assert resolve_target(None, runs, "reward_ocr")[0] == pytest.approx(0.5)  # base 0.40 + the default 0.10
    hit = first_reaching(runs[0], 0.5, "reward_ocr")
    assert (hit.step, hit.samples, hit.seconds, hit.value, hit.metric) == (4, 128, 40.0, 0.55, "reward_ocr")
    assert first_reaching(runs[1], 0.5, "reward_ocr") is None  # 0.48 < 0.50
    md = write_report(runs, tmp_path / "out", target_metric="reward_ocr").read_text()
    assert "Target reward_ocr: 0.500 = base reward_ocr 0.400 of ocr-a +0.10." in md
    assert "| target reward_ocr reached at |" in md
    assert "| 0.250 → 0.500 | n/a | 128 samples, 40 s |" in md and "| 0.250 → 0.375 |" in md
    assert "| reached target reward_ocr 0.500 | step 4, 128 samples, 40 s (reward_ocr 0.550) |" in md
    assert "| reached target reward_ocr 0.500 | not reached |" in md

    assert main(["report", *map(str, ocr_runs), "--target-metric", "pass_ocr", "--target", "0.375",
                 "--out", str(tmp_path / "cli")]) == 0
    md = (tmp_path / "cli" / "report.md").read_text()
    assert "--target-metric pass_ocr" in md and "0.375 (absolute)" in md
    assert "| reached target pass_ocr 0.375 | step 2, 64 samples, 20 s (pass_ocr 0.375) |" in md
    assert "| reached target pass_ocr 0.375 | step 6, 96 samples, 30 s (pass_ocr 0.375) |" in md
    capsys.readouterr()
    assert main(["report", str(ocr_runs[0]), "--target", "0.6", "--out", str(tmp_path / "cli2")]) == 2
    assert "--target-metric" in capsys.readouterr().err and not (tmp_path / "cli2").exists()


def test_shapes_and_reward_metrics_together(two_runs, ocr_runs, tmp_path):
    """A shapes run that also logged its reward keeps its strict columns and target; a run of another
    task beside it gets n/a there."""
    shapes = make_run(tmp_path / "new", "crd-r", evals=[_eval(0, 0.2, reward_shapes=0.5, reward_shapes_sem=0.03,
                                                              pass_shapes=0.2),
                                                        _eval(4, 0.4, reward_shapes=0.7, reward_shapes_sem=0.02,
                                                              pass_shapes=0.4)])
    runs = load_runs([str(shapes), str(ocr_runs[0])])
    md_path = write_report(runs, tmp_path / "out")
    md = md_path.read_text()
    assert "Target strict accuracy: 0.300 = base strict 0.200 of crd-r +0.10." in md
    assert ("| crd-r | crd | 0 | 4 | 128 | 50 s | 0.200 | 0.400 | 0.0010 → 0.0010 | n/a | n/a "
            "| 0.500 ± 0.030 → 0.700 ± 0.020 | 0.200 → 0.400 | n/a | n/a | 128 samples, 40 s |") in md
    assert "| ocr-a | crd | 0 | 4 | 128 | 50 s | n/a | n/a | n/a | n/a | n/a | n/a | n/a | 0.400 ± 0.020 → 0.550 ± 0.015 " \
           "| 0.250 → 0.500 | not reached |" in md
    for f in ("training", "heldout_reward", "accuracy", "fidelity"):
        assert (md_path.parent / f"{f}_samples.png").is_file()
    assert [f for f, _ in figure_panels(runs)] == ["training", "heldout_reward", "accuracy", "fidelity"]


def test_run_of_another_task_without_eval_jsonl(tmp_path):
    d = make_run(tmp_path, "ocr-killed", steps=2, evals=[_ocr_eval(0, 0.4, 0.02, 0.25), _ocr_eval(2, 0.5, 0.02, 0.5)],
                 eval_file=False, summary=False, grids=(0,))
    run = load_run(d)
    assert [e.metrics["reward_ocr"] for e in run.evals] == [0.4, 0.5]  # from metrics.jsonl's eval lines
    assert any("no eval.jsonl" in w for w in run.warnings)
    md = write_report([run], tmp_path / "out").read_text()
    assert "## Warnings" in md and "no eval.jsonl" in md and "| reward_ocr | 0.400 ± 0.020 | 0.500 ± 0.020 |" in md
    assert (tmp_path / "out" / "heldout_reward_samples.png").is_file()
    empty = make_run(tmp_path, "ocr-none", steps=2, evals=[], eval_file=False, grids=())
    assert any("no eval.jsonl: no held-out evaluation" in w for w in load_run(empty).warnings)
