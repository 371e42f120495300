"""`dasd_megatron.sweep.report`: per-method means and 95% CIs across seeds, checked against numbers computed here
independently (numpy) from a synthetic sweep written by the test: 2 recipes x 4 seeds, one run missing, one partial,
per-problem evaluation records with kinds and `dasd eval`-format diversity records."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from dasd_megatron.sweep.report import build_sweep_report, display_names, mean_ci

PNG = b"\x89PNG\r\n\x1a\n"
T = {1: 12.706, 2: 4.303, 3: 3.182}  # t_{0.975, df}
DASD, GRPO = "smollm2_135m_dasd_cpu", "smollm2_135m_grpo_cpu"
SEEDS = [1, 2, 3, 4]
STEPS = 8
EVAL_STEPS = (0, 4, 8)
KINDS = ("add_1d", "mul_1d")
K = 2  # Pass@2 of n = 4 samples


def expect(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    half = T[v.size - 1] * v.std(ddof=1) / math.sqrt(v.size) if v.size > 1 else float("nan")
    return float(v.mean()), half


def check_stat(stat: dict, values) -> None:
    mean, half = expect(values)
    assert stat["values"] == pytest.approx(list(values))
    assert stat["mean"] == pytest.approx(mean)
    if math.isnan(half):
        assert math.isnan(stat["ci95"])
    else:
        assert stat["ci95"] == pytest.approx(half)


def write_jsonl(path: Path, rows, extra: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra)


def make_sweep(root: Path, *, extras: bool = True) -> dict:
    """Write a sweep; returns the truth: {(recipe, seed): {"metrics": [rows], "kinds": ..., "div": [...]}}."""
    rng = np.random.default_rng(0)
    truth: dict = {}
    runs = []
    for mi, recipe in enumerate((DASD, GRPO)):
        for seed in SEEDS:
            rel = f"{recipe}/seed{seed}"
            run_dir = root / rel
            # DASD's run folders are given relative to the sweep folder, GRPO's absolute.
            runs.append({"recipe": recipe, "seed": seed, "run_dir": rel if recipe == DASD else str(run_dir)})
            if recipe == DASD and seed == 4:
                continue  # missing: never started
            last = 5 if (recipe == GRPO and seed == 4) else STEPS  # GRPO seed 4 is partial
            rows = []
            for step in range(last + 1):
                row: dict = {"step": step}
                if step in EVAL_STEPS:
                    row["eval/accuracy"] = float(0.3 + 0.1 * mi + 0.02 * step + rng.uniform(-0.05, 0.05))
                    row["eval/num_problems"] = 10
                if step > 0:
                    row["rollout/reward_mean"] = float(rng.uniform(0, 1))
                    if extras:
                        row["router/entropy_mean" if recipe == DASD else "loss/entropy"] = float(rng.uniform(0.5, 1))
                        row["rollout/response_length_mean"] = float(rng.uniform(10, 30))
                        if not (recipe == DASD and seed == 2 and step == STEPS):  # no KL at its last step
                            row["loss/kl"] = float(rng.uniform(0, 0.5))
                        if recipe == DASD:
                            row.update({f"router/omega_mean_decile_{d}": float(rng.uniform(-1, 1)) for d in range(10)})
                rows.append(row)
            truth[(recipe, seed)] = {"metrics": rows}
            lines = list(rows)
            extra = ""
            if recipe == DASD and seed == 1:  # a repeated step (the last line wins) and a torn line
                lines.insert(3, {"step": 3, "rollout/reward_mean": 99.0, "loss/kl": 99.0})
                extra = '{"step": 9, "eval/acc'
            write_jsonl(run_dir / "metrics.jsonl", lines, extra)
            if not extras:
                continue
            kinds = {}
            for step in (s for s in EVAL_STEPS if s <= last):
                recs, correct = [], {}
                for ki, kind in enumerate(KINDS):
                    c = int(rng.integers(0, 6)) if step == STEPS else 0  # earlier steps: all wrong
                    correct[kind] = c / 5
                    for j in range(5):
                        recs.append({"index": ki * 5 + j, "sample": 0, "problem": f"{kind} {j}", "kind": kind,
                                     "extracted": "1", "status": "correct" if j < c else "incorrect"})
                write_jsonl(run_dir / "eval_records" / f"step_{step:08d}.jsonl", recs)
                kinds = correct
            truth[(recipe, seed)]["kinds"] = kinds
            div = []
            for pid in range(5):
                c = int(rng.integers(0, 5))
                samples = [{"extracted": "7", "status": "correct"} for _ in range(c)]
                samples += [{"extracted": rng.choice(["1", "2", "3", None]), "status": "incorrect"}
                            for _ in range(4 - c)]
                for s in samples:
                    if s["extracted"] is None:
                        s["status"] = "unparseable"
                div.append({"benchmark": "easy", "problem_id": pid, "problem_hash": "h", "gold": "7", "n": 4,
                            "num_correct": c, "seed": 0, "weight_version": "default", "samples": samples})
            write_jsonl(run_dir / "sweep_diversity" / "records" / "easy.jsonl", div)
            (run_dir / "sweep_diversity" / "metrics.json").write_text("{}")  # `dasd eval` finished
            truth[(recipe, seed)]["div"] = div
    manifest = {"recipes": [DASD, GRPO], "seeds": SEEDS, "overrides": ["train.steps=8"], "runs": runs,
                "eval_data": "recipes/data/easy_arithmetic_study.jsonl",
                "diversity": {"k": K, "temperature": 0.7} if extras else None}
    (root / "sweep.json").write_text(json.dumps(manifest))
    return truth


def last_value(rows, key):
    return [r[key] for r in rows if key in r][-1]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    truth = make_sweep(root)
    return root, truth, build_sweep_report(str(root))


def test_mean_ci_by_hand():
    mean, half = mean_ci([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and half == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    mean, half = mean_ci([1.0, float("nan"), 3.0])  # NaN ignored: n = 2, sd = sqrt(2)
    assert mean == pytest.approx(2.0) and half == pytest.approx(12.706 * math.sqrt(2) / math.sqrt(2))
    assert mean_ci([0.4])[0] == 0.4 and math.isnan(mean_ci([0.4])[1])
    assert all(math.isnan(x) for x in mean_ci([]))
    big = list(range(40))  # df = 39 > 30: the normal quantile
    assert mean_ci(big)[1] == pytest.approx(1.96 * np.std(big, ddof=1) / math.sqrt(40))


def test_display_names():
    assert display_names([DASD, GRPO]) == {DASD: "dasd", GRPO: "grpo"}
    assert display_names(["a_dasd_cpu", "a_dasd_noroute_cpu"]) == {"a_dasd_cpu": "dasd", "a_dasd_noroute_cpu":
                                                                   "dasd_noroute"}
    assert display_names([DASD]) == {DASD: DASD}


def test_runs_status(sweep):
    _, _, rep = sweep
    d, g = rep.summary["methods"][DASD], rep.summary["methods"][GRPO]
    assert list(rep.summary["methods"]) == [DASD, GRPO]
    assert d["seeds"] == [1, 2, 3] and d["missing"] == [4] and d["partial"] == []
    assert g["seeds"] == [1, 2, 3] and g["missing"] == [] and g["partial"] == [4]
    md = Path(rep.report_md).read_text()
    assert "missing (no `metrics.jsonl`)" in md and "partial (step 5 of 8)" in md
    assert any("dasd: no `metrics.jsonl` for seed(s) 4" in n for n in rep.notes)
    assert any("grpo: seed(s) 4 stopped early" in n for n in rep.notes)
    assert any("1 unparseable line(s)" in n for n in rep.notes)


def test_accuracy_per_step_and_final(sweep):
    _, truth, rep = sweep
    for recipe in (DASD, GRPO):
        s = rep.summary["methods"][recipe]
        assert list(s["eval_accuracy"]) == ["0", "4", "8"]
        for step in EVAL_STEPS:  # every run that has the step, the partial one included
            vals = [r["eval/accuracy"] for seed in SEEDS if (recipe, seed) in truth
                    for r in truth[(recipe, seed)]["metrics"] if r["step"] == step and "eval/accuracy" in r]
            check_stat(s["eval_accuracy"][str(step)], vals)
        finished = [truth[(recipe, seed)]["metrics"] for seed in (1, 2, 3)]
        f = s["final"]
        check_stat(f["eval_accuracy"], [last_value(rows, "eval/accuracy") for rows in finished])
        check_stat(f["kl"], [last_value(rows, "loss/kl") for rows in finished])
        check_stat(f["response_length"], [last_value(rows, "rollout/response_length_mean") for rows in finished])
        ent = "router/entropy_mean" if recipe == DASD else "loss/entropy"
        check_stat(f["entropy"], [last_value(rows, ent) for rows in finished])
        check_stat(f["reward"], [np.mean([r["rollout/reward_mean"] for r in rows if "rollout/reward_mean" in r])
                                 for rows in finished])
    # the KL of DASD seed 2 is its step-7 value (none at step 8); step 3 of seed 1 is its second (true) line
    rows = truth[(DASD, 2)]["metrics"]
    assert rep.summary["methods"][DASD]["final"]["kl"]["values"][1] == pytest.approx(rows[7]["loss/kl"])


def test_kinds_omega_diversity(sweep):
    _, truth, rep = sweep
    for recipe in (DASD, GRPO):
        s = rep.summary["methods"][recipe]
        assert list(s["kinds"]) == list(KINDS)
        for kind in KINDS:  # the last evaluation (step 8), finished runs only
            check_stat(s["kinds"][kind], [truth[(recipe, seed)]["kinds"][kind] for seed in (1, 2, 3)])
        div = s["diversity"]
        assert div["k"] == K
        pk, acc, distinct, frac = [], [], [], []
        for seed in (1, 2, 3):
            recs = truth[(recipe, seed)]["div"]
            pk.append(np.mean([1 - math.comb(4 - r["num_correct"], K) / math.comb(4, K) for r in recs]))
            acc.append(np.mean([r["num_correct"] / 4 for r in recs]))
            d = [len({x["extracted"] for x in r["samples"] if x["extracted"] is not None}) for r in recs]
            distinct.append(np.mean(d))
            frac.append(np.mean(d) / 4)
        check_stat(div["pass_at_k"], pk)
        check_stat(div["accuracy"], acc)
        check_stat(div["distinct_answers"], distinct)
        check_stat(div["distinct_fraction"], frac)
    omega = rep.summary["methods"][DASD]["omega_by_entropy_decile"]
    assert len(omega) == 10
    for d in range(10):
        key = f"router/omega_mean_decile_{d}"
        assert omega[d] == pytest.approx(np.mean([last_value(truth[(DASD, s)]["metrics"], key) for s in (1, 2, 3)]))
    assert rep.summary["methods"][GRPO]["omega_by_entropy_decile"] is None


def test_outputs(sweep):
    root, _, rep = sweep
    assert Path(rep.out_dir) == root / "report"
    names = sorted(Path(p).name for p in rep.plots)
    assert names == ["accuracy.png", "diversity.png", "final.png", "omega_deciles.png", "training.png"]
    md = Path(rep.report_md).read_text()
    assert Path(rep.report_md).name == "sweep_report.md"
    for p in rep.plots:
        assert Path(p).read_bytes()[:8] == PNG
        assert f"]({Path(p).name})" in md
    assert "| method | seeds (finished/planned) | final accuracy |" in md and "Pass@2" in md
    assert "| dasd | 3/4 |" in md and "| grpo | 3/4 |" in md
    assert "## Accuracy by problem kind" in md and "| method | add_1d | mul_1d |" in md
    assert "## Held-out accuracy per evaluation step" in md and "`train.steps=8`" in md
    on_disk = json.loads((root / "report" / "summary.json").read_text())
    assert on_disk["methods"][GRPO]["omega_by_entropy_decile"] is None
    assert on_disk["methods"][DASD]["final"]["eval_accuracy"]["mean"] == pytest.approx(
        rep.summary["methods"][DASD]["final"]["eval_accuracy"]["mean"])


def test_sweep_without_records_or_diversity(tmp_path):
    make_sweep(tmp_path, extras=False)
    out = tmp_path / "elsewhere"
    rep = build_sweep_report(str(tmp_path), str(out))
    assert Path(rep.out_dir) == out and (out / "summary.json").exists()
    assert sorted(Path(p).name for p in rep.plots) == ["accuracy.png", "final.png"]
    for p in rep.plots:
        assert Path(p).read_bytes()[:8] == PNG
    for s in rep.summary["methods"].values():
        assert s["kinds"] == {} and s["diversity"] is None and s["omega_by_entropy_decile"] is None
        assert s["final"]["kl"]["values"] == [] and math.isnan(s["final"]["kl"]["mean"])
    md = Path(rep.report_md).read_text()
    assert "Accuracy by problem kind" not in md and "## Diversity" not in md
    for skipped in ("training plot skipped", "omega-by-entropy-decile plot skipped", "diversity plot skipped",
                    "no accuracy by kind"):
        assert skipped in md
    on_disk = json.loads((out / "summary.json").read_text())  # NaN written as null
    assert on_disk["methods"][DASD]["final"]["kl"]["mean"] is None


def test_single_seed_has_no_interval(tmp_path):
    make_sweep(tmp_path, extras=False)
    manifest = json.loads((tmp_path / "sweep.json").read_text())
    manifest["seeds"] = [1]
    manifest["runs"] = [r for r in manifest["runs"] if r["seed"] == 1]
    (tmp_path / "sweep.json").write_text(json.dumps(manifest))
    rep = build_sweep_report(str(tmp_path))
    stat = rep.summary["methods"][DASD]["final"]["eval_accuracy"]
    assert len(stat["values"]) == 1 and math.isnan(stat["ci95"])
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["methods"][DASD]["final"][
        "eval_accuracy"]["ci95"] is None
    assert "(1 seed)" in Path(rep.report_md).read_text()


def test_a_run_still_training_is_partial_by_its_own_train_steps(tmp_path):
    """A method whose only run is still training (a sweep in progress): its config.json says train.steps = 8, its
    metrics reach step 5, so it is partial and its step-4 evaluation is not reported as a final accuracy."""
    make_sweep(tmp_path, extras=False)
    manifest = json.loads((tmp_path / "sweep.json").read_text())
    manifest["seeds"] = [1]
    manifest["runs"] = [r for r in manifest["runs"] if r["seed"] == 1]
    (tmp_path / "sweep.json").write_text(json.dumps(manifest))
    run = tmp_path / DASD / "seed1"
    write_jsonl(run / "metrics.jsonl", [r for r in make_sweep(tmp_path / "again", extras=False)[(DASD, 1)]["metrics"]
                                        if r["step"] <= 5])
    (run / "config.json").write_text(json.dumps({"train": {"steps": STEPS}}))
    rep = build_sweep_report(str(tmp_path))
    d = rep.summary["methods"][DASD]
    assert d["partial"] == [1] and d["seeds"] == [] and d["final"]["eval_accuracy"]["values"] == []
    assert f"partial (step 5 of {STEPS})" in Path(rep.report_md).read_text()


def test_a_diversity_evaluation_still_running_is_left_out(tmp_path):
    """`dasd eval` writes its records as it goes and `metrics.json` at the end: a run whose evaluation is still
    running (records, no metrics.json) has no diversity numbers yet, and the report says so."""
    make_sweep(tmp_path)
    (tmp_path / DASD / "seed1" / "sweep_diversity" / "metrics.json").unlink()
    rep = build_sweep_report(str(tmp_path))
    assert len(rep.summary["methods"][DASD]["diversity"]["pass_at_k"]["values"]) == 2  # seeds 2 and 3 only
    assert any(f"{DASD} seed 1: diversity evaluation not finished" in n for n in rep.notes)


def test_no_sweep_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="dasd sweep"):
        build_sweep_report(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="sweep.json"):
        build_sweep_report(str(tmp_path / "nope"))


def test_the_diversity_stage_command_is_one_dasd_eval_accepts(tmp_path):
    """`dasd sweep --diversity K` runs `dasd eval` on each finished run with the run's prompt and reward rules: the
    command it builds parses with the real `dasd` parser into those settings."""
    from dasd_megatron.cli import build_parser
    from dasd_megatron.launch.checks import resolve_recipe
    from dasd_megatron.sweep.runner import SweepRun, SweepSpec, diversity_cmd

    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("")
    spec = SweepSpec(recipes=("smollm2_135m_dasd_cpu",), seeds=(3,), out_dir=str(tmp_path / "sweep"),
                     eval_data=str(heldout), diversity_k=4, diversity_temperature=0.9)
    run = SweepRun("smollm2_135m_dasd_cpu", 3, str(tmp_path / "sweep" / "r"))
    recipe = resolve_recipe(run.recipe, spec.run_overrides(run))
    cmd = diversity_cmd(spec, run, recipe)
    assert cmd[1:4] == ["-m", "dasd_megatron.cli", "eval"]
    args = build_parser().parse_args(cmd[3:])
    cfg = recipe.config
    assert (args.model, args.data, args.n_samples, args.temperature, args.seed) == (run.run_dir, str(heldout), 4,
                                                                                    0.9, 3)
    assert args.output == os.path.join(run.run_dir, "sweep_diversity") and args.pass_k == (1, 4)
    assert args.instruction == cfg.data.prompt.instruction and args.max_new_tokens == cfg.train.max_response_tokens
    assert args.last_number_fallback == cfg.reward.last_number_fallback and args.schema == cfg.data.schema


def small_sweep(root: Path, recipe_acc: dict, overrides: list, *, eval_data="study.jsonl", k=None) -> None:
    """A sweep folder whose runs log only the evaluations: {recipe: {seed: [acc at steps 0, 4, 8]}}."""
    runs = []
    for recipe, by_seed in recipe_acc.items():
        for seed, accs in by_seed.items():
            run = root / recipe / f"seed{seed}"
            write_jsonl(run / "metrics.jsonl", [{"step": s, "eval/accuracy": a} for s, a in zip(EVAL_STEPS, accs)])
            (run / "config.json").write_text(json.dumps({"train": {"steps": STEPS}}))
            runs.append({"recipe": recipe, "seed": seed, "run_dir": f"{recipe}/seed{seed}"})
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(json.dumps({
        "recipes": list(recipe_acc), "seeds": sorted({s for b in recipe_acc.values() for s in b}),
        "overrides": overrides, "runs": runs, "eval_data": eval_data,
        "diversity": {"k": k, "temperature": 0.7} if k else None}))


def test_several_sweeps_make_one_report_a_setting_search(tmp_path):
    """A setting search: the study (DASD and GRPO, 3 seeds), DASD with beta 0.1 on seeds 1-2 in one folder and seed 3
    in another (pooled: same recipe, same overrides). Methods are named by the overrides their sweep does not share;
    means and intervals are those of the pooled seeds, computed here."""
    keep = "train.keep_last_checkpoints=1"
    study = {DASD: {1: [0.3, 0.3, 0.35], 2: [0.3, 0.25, 0.31], 3: [0.3, 0.2, 0.2]},
             GRPO: {1: [0.3, 0.35, 0.46], 2: [0.3, 0.33, 0.44], 3: [0.3, 0.4, 0.55]}}
    small_sweep(tmp_path / "study", study, [keep])
    small_sweep(tmp_path / "beta_a", {DASD: {1: [0.3, 0.4, 0.5], 2: [0.3, 0.42, 0.47]}}, [keep, "loss.beta=0.1"])
    small_sweep(tmp_path / "beta_b", {DASD: {3: [0.3, 0.38, 0.52]}}, [keep, "loss.beta=0.1"])
    rep = build_sweep_report([str(tmp_path / d) for d in ("study", "beta_a", "beta_b")], str(tmp_path / "out"))
    key = f"{DASD} loss.beta=0.1"
    assert list(rep.summary["methods"]) == [DASD, GRPO, key]
    assert rep.summary["overrides"] == [keep]
    beta = rep.summary["methods"][key]
    assert beta["name"] == "dasd loss.beta=0.1" and beta["seeds"] == [1, 2, 3]
    check_stat(beta["final"]["eval_accuracy"], [0.5, 0.47, 0.52])
    check_stat(beta["eval_accuracy"]["4"], [0.4, 0.42, 0.38])
    check_stat(rep.summary["methods"][GRPO]["final"]["eval_accuracy"], [0.46, 0.44, 0.55])
    md = Path(rep.report_md).read_text()
    assert "# Sweep report: study + beta_a + beta_b" in md and "**dasd loss.beta=0.1**" in md
    assert "| dasd loss.beta=0.1 | 3/3 | 49.7% ± " in md

    # A seed in two folders of the same method: the first folder's copy counts, and a note says so.
    small_sweep(tmp_path / "beta_dup", {DASD: {3: [0.3, 0.1, 0.1]}}, [keep, "loss.beta=0.1"])
    rep = build_sweep_report([str(tmp_path / d) for d in ("study", "beta_a", "beta_b", "beta_dup")],
                             str(tmp_path / "out2"))
    check_stat(rep.summary["methods"][key]["final"]["eval_accuracy"], [0.5, 0.47, 0.52])
    assert any("seed 3: in more than one sweep" in n and "beta_dup" in n for n in rep.notes)


@pytest.mark.parametrize("second, match", [
    ({"eval_data": "other.jsonl"}, "different held-out data"),
    ({"k": 8}, "different numbers of samples"),
])
def test_sweeps_that_do_not_compare_are_refused(tmp_path, second, match):
    small_sweep(tmp_path / "a", {DASD: {1: [0.3, 0.3, 0.3]}}, [], k=4)
    small_sweep(tmp_path / "b", {DASD: {1: [0.3, 0.3, 0.3]}}, ["loss.beta=0.1"], **{"k": 4, **second})
    with pytest.raises(ValueError, match=match):
        build_sweep_report([str(tmp_path / "a"), str(tmp_path / "b")])


def test_sweep_report_cli_takes_several_folders(tmp_path, capsys):
    from dasd_megatron.cli import main

    small_sweep(tmp_path / "a", {DASD: {1: [0.3, 0.3, 0.3]}}, [])
    small_sweep(tmp_path / "b", {DASD: {1: [0.3, 0.4, 0.5]}}, ["loss.rho=0.05"])
    assert main(["sweep-report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "r")]) == 0
    assert f"{DASD} loss.rho=0.05" in json.loads((tmp_path / "r" / "summary.json").read_text())["methods"]
    small_sweep(tmp_path / "c", {DASD: {1: [0.3, 0.3, 0.3]}}, [], eval_data="elsewhere.jsonl")
    assert main(["sweep-report", str(tmp_path / "a"), str(tmp_path / "c")]) == 2
    assert "different held-out data" in capsys.readouterr().err


def test_archive_rebuilds_the_report_without_the_runs(tmp_path):
    """`--archive` copies what the report reads (no checkpoints) into OUT/data/<sweep>/; after the run folders are
    deleted the report built from the archive has the same numbers, and rebuilding it in place changes nothing."""
    import shutil

    from dasd_megatron.cli import main

    make_sweep(tmp_path / "study")
    small_sweep(tmp_path / "beta", {DASD: {1: [0.3, 0.4, 0.5], 2: [0.3, 0.42, 0.47]}}, ["loss.beta=0.1"],
                eval_data="recipes/data/easy_arithmetic_study.jsonl")
    (tmp_path / "study" / DASD / "seed1" / "weights").mkdir()  # a checkpoint: not archived
    (tmp_path / "study" / DASD / "seed1" / "weights" / "big.bin").write_bytes(b"x" * 1000)
    out = tmp_path / "report"
    assert main(["sweep-report", str(tmp_path / "study"), str(tmp_path / "beta"), "--out", str(out), "--archive"]) == 0
    before = json.loads((out / "summary.json").read_text())
    data = out / "data"
    assert sorted(p.name for p in data.iterdir()) == ["beta", "study"]
    run = data / "study" / DASD / "seed1"
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()) == [
        "eval_records/step_00000008.jsonl", "metrics.jsonl", "sweep_diversity/metrics.json",
        "sweep_diversity/records/easy.jsonl"]
    shutil.rmtree(tmp_path / "study")
    shutil.rmtree(tmp_path / "beta")

    rebuilt = build_sweep_report([str(data / "study"), str(data / "beta")], str(out), archive=True)
    for key in before["methods"]:
        a, b = before["methods"][key], rebuilt.summary["methods"][key]
        assert a["final"]["eval_accuracy"]["values"] == pytest.approx(b["final"]["eval_accuracy"]["values"])
        assert a["kinds"].keys() == b["kinds"].keys()
        assert (a["diversity"] or {}).get("pass_at_k") == (b["diversity"] or {}).get("pass_at_k")
    assert rebuilt.summary["methods"][f"{DASD} train.steps=8"]["missing"] == [4]  # never started: still missing
    assert json.loads((data / "study" / "sweep.json").read_text())["archived_from"] == str(tmp_path / "study")
