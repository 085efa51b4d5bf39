"""The report: PNG plots and the worst-case table from a fabricated results file."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
import numpy as np  # noqa: E402

from byzsgd.errors import ConfigError  # noqa: E402
from byzsgd.experiments.results import append_result  # noqa: E402
from byzsgd.experiments.spec import canonical_key  # noqa: E402
from byzsgd.experiments.report import make_report  # noqa: E402
from byzsgd.experiments.results import read_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RULES = ["average", "median", "krum"]
ATTACKS = ["none", "alie", "reverse"]
# final accuracy (min over correct PSes) of each rule x attack
FINAL = {("average", "none"): 96.0, ("average", "alie"): 70.0, ("average", "reverse"): 9.8,
         ("median", "none"): 95.0, ("median", "alie"): 80.0, ("median", "reverse"): 93.0,
         ("krum", "none"): 94.0, ("krum", "alie"): None, ("krum", "reverse"): 92.0}


def fabricate_run(run_dir: Path, final: float, *, num_ps: int = 3, steps: int = 40,
                  acc_freq: int = 10) -> None:
    run_dir.mkdir(parents=True)
    t0 = 5000.0
    ranks = []
    for rank in range(num_ps + 1):  # the last PS is Byzantine: never read
        m = run_dir / f"metrics-ps{rank}.jsonl"
        with open(m, "w") as fh:
            fh.write(json.dumps({"event": "start", "time": t0 + 2}) + "\n")
            for s in range(steps):
                rec = {"step": s, "step_time": 0.1, "loss": 2.0 / (s + 1), "bytes_sent": 10 * s,
                       "bytes_received": 10 * s, "time": t0 + 3 + 0.2 * s}
                if (s + 1) % acc_freq == 0:
                    frac = (s + 1) / steps
                    rec["accuracy"] = 10 + (final - 10) * frac + (0.5 if rank else 0.0)
                fh.write(json.dumps(rec) + "\n")
            fh.write(json.dumps({"event": "done", "final_accuracy": final + (0.5 if rank else 0.0),
                                 "time": t0 + 3 + 0.2 * steps}) + "\n")
        ranks.append({"rank": rank, "role": "ps", "byzantine": rank == num_ps, "metrics": str(m)})
    (run_dir / "deployment.json").write_text(json.dumps({"started": t0, "ranks": ranks}))


def fabricate_results(tmp_path: Path) -> Path:
    res = tmp_path / "results.jsonl"
    index = 0
    for rule in RULES:
        for attack in ATTACKS:
            cell = {"gar": rule, "worker_attack": attack, "num_iter": 40,
                    "byz_workers": 0 if attack == "none" else 1}
            final = FINAL[(rule, attack)]
            run_dir = tmp_path / "runs" / f"{index:03d}"
            rec = dict(key=canonical_key(cell), index=index, cell=cell,
                       axes={"gar": rule, "worker_attack": attack}, run_dir=str(run_dir),
                       experiment="fabricated")
            if final is None:  # a failed cell: no metrics
                run_dir.mkdir(parents=True)
                rec.update(outcome="failed:2", final_accuracy=None)
            else:
                fabricate_run(run_dir, final)
                rec.update(outcome="ok", final_accuracy=final)
            append_result(res, rec)
            index += 1
    return res


def check_png(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.exists() and path.stat().st_size > 5000, path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    h, w = img.shape[:2]
    assert h >= 200 and w >= 300, (path, img.shape)
    flat = img.reshape(-1, img.shape[-1])
    assert float(flat.std()) > 0.01
    colours = np.unique((flat[:, :3] * 255).astype(np.uint8), axis=0)
    assert len(colours) > 20, (path, len(colours))  # lines, text, colour map: not a blank image


def test_report_writes_valid_plots_and_table(tmp_path):
    res = fabricate_results(tmp_path)
    out = tmp_path / "report"
    written = make_report(res, out)
    names = sorted(p.name for p in written)
    assert names == ["accuracy_vs_step.png", "accuracy_vs_time.png", "heatmap.png",
                     "worst_case.md", "worst_case.png"]
    for p in written:
        if p.suffix == ".png":
            check_png(p)
    md = (out / "worst_case.md").read_text()
    lines = [l for l in md.splitlines() if l.startswith("| ")]
    assert lines[0] == "| rule | worst case | worst attack | none | alie | reverse |"
    rows = {l.split(" | ")[0][2:]: l for l in lines[1:]}
    assert rows["average"] == "| average | 9.80 (n=1) | reverse | 96.00 (n=1) | 70.00 (n=1) | 9.80 (n=1) |"
    assert rows["median"] == "| median | 80.00 (n=1) | alie | 95.00 (n=1) | 80.00 (n=1) | 93.00 (n=1) |"
    # a failed cell is the worst case and shows as 'fail'; what is missing is said under the table
    assert rows["krum"] == "| krum | 0.00 | alie | 94.00 (n=1) | fail (n=0/1) | 92.00 (n=1) |"
    assert "Missing (1 of 9 runs did not finish):" in md
    assert "- krum / alie: outcome failed:2; no summary.json in " in md


def test_heatmap_colours_follow_accuracy(tmp_path):
    """The heatmap really encodes the numbers: a low cell is red, a high one green."""
    import matplotlib.image as mpimg

    res = fabricate_results(tmp_path)
    make_report(res, tmp_path / "r")
    img = mpimg.imread(tmp_path / "r" / "heatmap.png")[:, :, :3]
    red = (img[:, :, 0] > 0.6) & (img[:, :, 1] < 0.3) & (img[:, :, 2] < 0.3)
    green = (img[:, :, 1] > 0.5) & (img[:, :, 0] < 0.3)
    grey = (np.abs(img[:, :, 0] - 0.733) < 0.02) & (np.abs(img[:, :, 1] - 0.733) < 0.02)
    assert red.sum() > 500 and green.sum() > 500 and grey.sum() > 500  # 9.8 %, 95 %, failed


def test_seeds_are_averaged_and_facets_split(tmp_path):
    res = tmp_path / "results.jsonl"
    i = 0
    for fw in (1, 2):
        for seed, acc in ((1, 90.0), (2, 80.0)):
            for rule in ("median", "mda"):
                cell = {"gar": rule, "worker_attack": "alie", "seed": seed, "fw": fw}
                run_dir = tmp_path / "runs" / str(i)
                fabricate_run(run_dir, acc - fw)
                append_result(res, dict(key=canonical_key(cell), index=i, cell=cell, run_dir=str(run_dir),
                                        axes={"fw": fw, "seed": seed, "gar": rule}, outcome="ok",
                                        final_accuracy=acc - fw, experiment="facets"))
                i += 1
    written = {p.name for p in make_report(res, tmp_path / "out")}
    assert {"heatmap-fw=1.png", "heatmap-fw=2.png", "worst_case-fw=1.png"} <= written
    md = (tmp_path / "out" / "worst_case.md").read_text()
    assert "| median | 84.00 ±5.00 (n=2) | alie | 84.00 ±5.00 (n=2) |" in md  # 89 and 79 (fw=1)
    assert "| mda | 83.00 ±5.00 (n=2) | alie | 83.00 ±5.00 (n=2) |" in md    # fw=2


def test_last_record_of_a_key_wins(tmp_path):
    res = fabricate_results(tmp_path)
    cell = {"gar": "krum", "worker_attack": "alie", "num_iter": 40, "byz_workers": 1}
    run_dir = tmp_path / "rerun"
    fabricate_run(run_dir, 77.0)
    append_result(res, dict(key=canonical_key(cell), index=7, cell=cell, run_dir=str(run_dir),
                            axes={"gar": "krum", "worker_attack": "alie"}, outcome="ok",
                            final_accuracy=77.0))
    make_report(res, tmp_path / "r")
    md = (tmp_path / "r" / "worst_case.md").read_text()
    assert "| krum | 77.00 (n=1) | alie | 94.00 (n=1) | 77.00 (n=1) | 92.00 (n=1) |" in md


def test_cli_and_errors(tmp_path):
    res = fabricate_results(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "byzsgd.report", str(res), "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "heatmap.png" in proc.stdout and (tmp_path / "o" / "heatmap.png").exists()
    with pytest.raises(ConfigError, match="no results file"):
        make_report(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match="no cell results"):
        make_report(tmp_path / "empty.jsonl")
    proc = subprocess.run([sys.executable, "-m", "byzsgd.report", str(tmp_path / "missing.jsonl")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "byzsgd.report: error: no results file" in proc.stderr


def test_an_attacks_strength_is_in_its_label():
    from byzsgd.experiments.report import attack_label
    assert attack_label({"worker_attack": "alie", "worker_attack_args": {"z": 100}}, set()) == 'alie{"z":100}'
    assert attack_label({"worker_attack": "alie", "worker_attack_args": {"z": "textbook"}}, set()) \
        == 'alie{"z":"textbook"}'
    assert attack_label({"worker_attack": "reverse", "worker_attack_args": {}}, set()) == "reverse"
    assert attack_label({"worker_attack": "none", "ps_attack": "delay", "ps_attack_args": {"delay": 2}},
                        set()) == 'ps:delay{"delay":2}'


# ============================================================================ issue 27, item 7
def seeded_results(tmp_path: Path, finals: dict) -> Path:
    """median/reverse and median/alie over seeds 1 and 2 (None: that seed failed, exit 3)."""
    res = tmp_path / "results.jsonl"
    for i, ((attack, seed), final) in enumerate(finals.items()):
        cell = {"gar": "median", "worker_attack": attack, "seed": seed, "num_iter": 40, "num_ps": 4,
                "fps": 1, "num_workers": 7, "fw": 1, "byz_workers": 1, "byz_ps": 0, "mode": "garfield"}
        run_dir = tmp_path / "runs" / str(i)
        rec = dict(key=canonical_key(cell), index=i, cell=cell, run_dir=str(run_dir), experiment="seeds",
                   axes={"gar": "median", "worker_attack": attack, "seed": seed})
        if final is None:
            run_dir.mkdir(parents=True)
            (run_dir / "summary.json").write_text(json.dumps({"outcome": "failed:5", "failed": {
                "rank": 5, "exit": 3, "last_error": "RuntimeError: boom"}}))
            rec.update(outcome="failed:5", returncode=3, final_accuracy=None)
        else:
            fabricate_run(run_dir, final)
            rec.update(outcome="ok", final_accuracy=final)
        append_result(res, rec)
    return res


def test_cells_show_seed_count_and_spread_and_what_is_missing(tmp_path):
    """The issue's median/reverse seeds 78.96 and 87.27 were shown as one 83.1: now with their
    spread and count; a seed that failed is counted apart and named with its cause."""
    res = seeded_results(tmp_path, {("reverse", 1): 78.96, ("reverse", 2): 87.27,
                                    ("alie", 1): 90.0, ("alie", 2): None})
    make_report(res, tmp_path / "r")
    md = (tmp_path / "r" / "worst_case.md").read_text()
    assert "| median | 83.11 ±4.16 (n=2) | reverse | 83.11 ±4.16 (n=2) | 90.00 (n=1/2) |" in md, md
    assert ("- median / alie / seed 2: outcome failed:5; exit 3; failed: "
            '{"exit":3,"last_error":"RuntimeError: boom","rank":5}') in md, md
    proc = subprocess.run([sys.executable, "-m", "byzsgd.report", str(res), "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "1 run(s) did not finish" in proc.stderr and "median / alie / seed 2" in proc.stderr


def test_titles_say_what_was_run():
    from byzsgd.experiments.report import run_context

    recs = [{"cell": {"gar": g, "num_iter": 300, "num_ps": 4, "fps": 1, "num_workers": 7, "fw": fw,
                      "byz_workers": 1, "byz_ps": 0, "mode": "garfield"}}
            for g, fw in (("median", 1), ("mda", 2))]
    assert run_context(recs) == ("steps 300, n_ps 4, fps 1, n_w 7, fw 1|2, f 1 worker + 0 PS, "
                                 "mode garfield, rule median|mda")
    assert run_context(recs[:1], rule=False).endswith("mode garfield")


def test_titles_and_per_seed_curves_in_the_figures(tmp_path):
    """The figures themselves: every title carries the settings; the two seeds of one attack
    share a colour but not a line style."""
    from byzsgd.experiments import report

    res = seeded_results(tmp_path, {("reverse", 1): 78.96, ("reverse", 2): 87.27})
    plt = report._matplotlib()
    figs = []

    class Keep:  # plt, but the figures stay open for the test
        def __getattr__(self, name):
            return getattr(plt, name)

        def subplots(self, *a, **kw):
            fig, ax = plt.subplots(*a, **kw)
            figs.append(fig)
            return fig, ax

        def close(self, fig):
            pass

    records = read_results(res)
    table = report.Table(records)
    report.plot_curves(Keep(), records, tmp_path, "seeds")
    report.plot_heatmap(Keep(), table, tmp_path / "h.png", "seeds; " + report.run_context(records))
    report.plot_worst_case(Keep(), table, tmp_path / "w.png", "seeds; " + report.run_context(records))
    try:
        for fig in figs:
            title = " ".join((fig._suptitle.get_text() if fig._suptitle else "").split() +
                             [" ".join(ax.get_title().split()) for ax in fig.axes])
            for word in ("steps 40", "n_ps 4", "fps 1", "n_w 7", "fw 1", "f 1 worker", "mode garfield",
                         "median"):
                assert word in title, (word, title)
        lines = figs[0].axes[0].get_lines()
        assert len(lines) == 2
        assert lines[0].get_color() == lines[1].get_color()
        assert (lines[0].get_linestyle(), lines[0].get_marker()) != (lines[1].get_linestyle(),
                                                                      lines[1].get_marker())
        heat = " ".join(t.get_text() for t in figs[2].axes[0].texts)
        assert "83.1 ±4.2\nn=2" in heat, heat
        bars = " ".join(t.get_text() for t in figs[3].axes[0].texts)
        assert "83.1 ±4.2 n=2" in bars, bars
    finally:
        for fig in figs:
            plt.close(fig)
