"""The report's figures and text on hand-made run folders (no training): a panel for every kind of series a run
logged and none without data, whole-step ticks, one-point series as markers, no ranking of a single run, value
axes that do not zoom into noise, seed means with 95 % t intervals, and one number format."""

import json
import math

import pytest
import yaml

from lab_helpers import fake_runs
from tunelab.lab.curves import curves_figure, panel_of
from tunelab.lab.figure import steady_limits
from tunelab.lab.numbers import fmt, fmt_ci, kind_of
from tunelab.lab.plots import learning_forgetting_figure, params_figure
from tunelab.lab.report import build_report, ranking_lines
from tunelab.lab.results import collect, load_run


def rl_run(root, name="grpo", steps=4, eval_at=(4,)):
    """A GRPO-shaped run: the loop's columns, the objective's rollout measures, held-out reward at `eval_at`."""
    d = root / name
    d.mkdir(parents=True)
    rows = []
    for s in range(1, steps + 1):
        rows.append({"step": s, "loss": 0.01 * s, "lr": 1e-5, "grad_norm": 1.0 + s, "tokens_per_s": 50.0,
                     "step_seconds": 2.0, "tokens": 100 * s, "n_loss_units": 32, "round": float(s - 1),
                     "reward": 0.2 + 0.1 * s, "reward_std": 0.3, "truncated": 0.25, "zero_signal_groups": 0.5,
                     "clip_fraction": 0.05 * s, "kl": 0.01 * s, "entropy": 2.0 - 0.1 * s, "ratio": 1.0,
                     "completion_length": 12.0})
        if s in eval_at:
            rows.append({"step": s, "eval_reward": 0.5 + 0.01 * s})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "results.json").write_text(json.dumps({"method": "lora", "objective": "grpo", "steps": steps,
                                                "trainable_params": 1000, "total_params": 100_000}))
    return d


def visible_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def titles(fig):
    return [ax.get_title() for ax in visible_axes(fig)]


def test_an_rl_run_plots_every_kind_it_logged_and_no_empty_panel(tmp_path):
    fig = curves_figure([load_run(rl_run(tmp_path))])
    names = titles(fig)
    for kind in ("loss", "reward / score", "KL divergence: kl", "entropy", "learning rate", "gradient norm",
                 "rates (fraction)", "completion length (tokens): completion_length", "ratio"):
        assert kind in names, (kind, names)
    assert not any("eval loss" in t or "held-out" in t for t in names)  # the run has no held-out loss
    for ax in visible_axes(fig):  # every panel drawn has data
        assert ax.lines or ax.collections, ax.get_title()
    rates = next(ax for ax in visible_axes(fig) if ax.get_title() == "rates (fraction)")
    assert [t.get_text() for t in rates.get_legend().get_texts()] == ["truncated", "zero_signal_groups",
                                                                      "clip_fraction"]
    # bookkeeping is not a series: no panel for throughput, seconds, token or round counts
    assert all(panel_of(k) is None for k in ("tokens_per_s", "step_seconds", "tokens", "round", "n_loss_units"))
    assert panel_of("eval_loss") == "loss" and panel_of("approx_kl") == "kl" and panel_of("code/exact_match") == \
        "task:exact_match" and panel_of("reward_margin") == "reward" and panel_of("pref_accuracy") == "accuracy"


def test_sft_curves_keep_train_and_held_out_loss_in_one_panel(tmp_path):
    fig = curves_figure([load_run(fake_runs(tmp_path)("sft", learning=None))])
    loss = next(ax for ax in visible_axes(fig) if ax.get_title() == "loss")
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["loss", "eval_loss"]
    held_out = [line for line in loss.lines if line.get_linestyle() == "--"]
    assert list(held_out[0].get_xdata())[0] == 0  # starts at the base model's held-out loss


def test_step_ticks_are_whole_steps_and_one_point_is_a_marker(tmp_path):
    fig = curves_figure([load_run(rl_run(tmp_path, steps=1, eval_at=(1,)))])
    for ax in visible_axes(fig):
        lo, hi = ax.get_xlim()
        shown = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert shown and all(float(t).is_integer() for t in shown), (ax.get_title(), shown)
        assert hi - lo >= 2  # a window of ±1 step around the one point, not ±0.1
        for line in ax.lines:
            if len(line.get_xdata()) == 1:
                assert line.get_linestyle() == "None" and line.get_marker() not in (None, "None", "")


def test_one_run_is_not_ranked(tmp_path):
    fake_run = fake_runs(tmp_path)
    one = [load_run(fake_run("lora", learning=0.1))]
    assert ranking_lines(one) == []
    page = build_report(one, tmp_path / "one").read_text()
    assert "most learning" not in page and "least forgetting" not in page and "Pareto front" not in page
    assert "<tr class='front'>" not in page
    no_tasks = one + [load_run(fake_run("plain", learning=None))]  # learning from eval loss, forgetting unknown
    assert ranking_lines(no_tasks)[1:] == []
    assert "Pareto front" not in build_report(no_tasks, tmp_path / "nt").read_text()
    two = one + [load_run(fake_run("full", "full", learning=0.3, forgetting=0.2))]
    assert ranking_lines(two) == ["most learning: full (+0.300)", "least forgetting: lora (+0.0500)"]
    assert "most learning: <b>full</b>" in build_report(two, tmp_path / "two").read_text()


def test_value_axes_do_not_zoom_into_noise(tmp_path):
    fake_run = fake_runs(tmp_path)
    runs = [load_run(fake_run("a", learning=0.0227, forgetting=0.0110, trainable=1000, eval_loss_after=2.51)),
            load_run(fake_run("b", learning=0.0234, forgetting=0.0112, trainable=8000, eval_loss_after=2.53))]
    (ax,) = learning_forgetting_figure(runs).axes
    lo, hi = ax.get_ylim()
    assert lo <= 0 <= hi and hi >= 0.0234  # learning reaches 0: 0.0227 vs 0.0234 is 3 % of the axis
    assert (0.0234 - 0.0227) / (hi - lo) < 0.05
    assert ax.get_xlim()[0] <= 0
    learning, forgetting, loss = params_figure(runs).axes
    assert learning.get_ylim()[0] <= 0 and forgetting.get_ylim()[0] <= 0
    lo, hi = loss.get_ylim()
    assert hi - lo >= 0.1 * 2.53  # a loss axis spans at least 10 % of the loss
    # and the rule itself: the span floor relative to the magnitude, 0 included on request
    half = 0.5 * 0.0234 / 2  # span ≥ 0.5 × the largest |value|, around the middle 0.02305
    assert steady_limits(ax, [0.0227, 0.0234], min_rel=0.5, pad=0) == pytest.approx((0.02305 - half, 0.02305 + half))
    assert steady_limits(ax, [2.0, 3.0], include_zero=True, pad=0) == (0.0, 3.0)


@pytest.fixture
def seeded_study(tmp_path):
    """Two variants × three seeds, as `tunelab compare` lays them out (runs/<variant>/seed-<k>, sweep.json)."""
    fake_run = fake_runs(tmp_path)
    learning = {"lora": (0.1, 0.2, 0.3), "full": (0.4, 0.5, 0.6)}
    rows = []
    for variant, values in learning.items():
        for seed, value in enumerate(values):
            d = fake_run(f"{variant}/seed-{seed}", "full" if variant == "full" else "lora", learning=value,
                         forgetting=0.01 * (seed + 1), trainable=100_000 if variant == "full" else 1000)
            cfg = yaml.safe_load((d / "config.yaml").read_text())
            cfg["train"]["seed"] = seed  # as the sweep writes each seed's config
            (d / "config.yaml").write_text(yaml.safe_dump(cfg))
            rows.append({"name": f"{variant}/seed-{seed}", "variant": variant, "seed": seed, "run_dir": str(d),
                         "status": "done"})
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "study", "seeds": [0, 1, 2], "variants": rows}))
    return tmp_path


T975_2 = 4.3027  # t_{.975} at 2 degrees of freedom


def test_seeds_plot_the_mean_with_95_percent_error_bars(seeded_study):
    runs = collect([seeded_study])
    (ax,) = learning_forgetting_figure(runs).axes
    bars = ax.containers
    assert len(bars) == 2  # one error bar per variant, not a point per seed
    half = T975_2 * 0.1 / math.sqrt(3)  # learning 0.1, 0.2, 0.3: sd 0.1
    assert bars[0].has_xerr and bars[0].has_yerr  # forgetting varies over the seeds too
    (x0, y0), (x1, y1) = bars[0].lines[2][-1].get_segments()[0]  # the y bar (drawn after the x bar)
    assert x0 == x1
    assert (y0 + y1) / 2 == pytest.approx(0.2) and abs(y1 - y0) / 2 == pytest.approx(half, rel=1e-4)
    offsets = [tuple(c.get_offsets()[0]) for c in ax.collections if len(c.get_offsets()) == 1]
    assert any(y == pytest.approx(0.2) for _, y in offsets)  # the point is the mean over seeds
    fig = curves_figure(runs)
    loss = next(a for a in visible_axes(fig) if a.get_title() == "loss")
    assert len(loss.collections) >= 2  # a shaded 95 % band per variant
    assert len([line for line in loss.lines if line.get_linestyle() == "-"]) == 2  # one mean line per variant
    assert params_figure(runs).axes[0].containers  # learning vs parameters: error bars too


def test_seeds_tables_print_mean_plus_minus_half_width(seeded_study):
    runs = collect([seeded_study])
    out = seeded_study / "report"
    build_report(runs, out, study=json.loads((seeded_study / "sweep.json").read_text()))
    md = (out / "results.md").read_text()
    half = T975_2 * 0.1 / math.sqrt(3)
    assert "| lora | 3/3 | lora |" in md and f"+0.200 ± {half:.3f}" in md and f"+0.500 ± {half:.3f}" in md
    variants, per_run = md.split("Per run:")
    assert "| lora/seed-0 | done |" in per_run  # the per-run table stays below
    assert "train.seed" in per_run and "train.seed" not in variants  # differs only between seeds
    page = (out / "index.html").read_text()
    assert "<h2>Variants</h2>" in page and f"most learning: <b>full</b> (+0.500 ± {half:.3f})" in page
    assert ranking_lines(runs)[0] == f"most learning: full (+0.500 ± {half:.3f})"


def test_one_format_per_kind_of_number():
    assert fmt(2.513499, "loss") == "2.513" and fmt(2.5, "loss") == "2.500"
    assert fmt(0.4375, "pct") == "43.8 %" and fmt(1.25, "percent") == "1.2 %"
    assert fmt(0.022712, "reward") == "0.0227" and fmt(1.2649, "reward") == "1.26" and fmt(123.45, "reward") == "123"
    assert fmt(0.0234, "signed") == "+0.0234" and fmt(-0.105, "signed") == "-0.105"
    assert fmt(12800, "int") == "12,800" and fmt(1_234_567, "params") == "1.23M" and fmt(None) == "—"
    assert fmt_ci(2.5134, 2.4, 2.6, "loss") == "2.513 ± 0.100"
    assert fmt_ci(0.5, 0.4, 0.6, "pct") == "50.0 ± 10.0 %"
    assert fmt_ci(0.0227, 0.0200, 0.0254, "reward") == "0.0227 ± 0.0027"
    assert fmt_ci(0.2, None, None, "signed") == "+0.200"  # one seed: no interval
    assert [kind_of(k) for k in ("eval_loss", "policy_loss", "pref_accuracy", "code/exact_match", "truncated",
                                 "clip_fraction", "reward", "kl", "entropy")] == \
        ["loss", "loss", "pct", "pct", "pct", "pct", "reward", "reward", "reward"]


def test_values_that_cannot_be_drawn_are_left_out(tmp_path):
    """A diverged step (±inf, ±1e308), a boolean or a string in metrics.jsonl: the figure draws the rest."""
    d = tmp_path / "odd"
    d.mkdir()
    rows = [{"step": 1, "loss": float("inf"), "reward": True, "kl": 1e308, "note": "x"}, {"step": "2", "loss": 1.0},
            {"step": 2, "loss": -1e308, "entropy": float("-inf")}, {"step": 3, "loss": 2.0}, {"loss": 3.0}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = curves_figure([load_run(d)])
    assert titles(fig) == ["loss"]
    (line,) = visible_axes(fig)[0].lines
    assert list(line.get_xdata()) == [3] and list(line.get_ydata()) == [2.0]
    fig.savefig(tmp_path / "c.png")


def test_study_means_print_mean_plus_minus_half_width():
    from tunelab.lab.study import means_markdown

    rows = [{"better": "a", "than": "b", "on": "prose", "direction": "lower", "better_ci": (2.5134, 2.4134, 2.6134),
             "than_ci": (2.7, None, None)},
            {"better": "a", "than": "b", "on": "code", "direction": "higher", "better_ci": (0.4375, 0.4, 0.475),
             "than_ci": (0.25, 0.2, 0.3)}]
    md = means_markdown(rows)
    assert "| a | prose | 2.513 ± 0.100 |" in md and "| b | prose | 2.700 (1 seed) |" in md
    assert "| a | code | 0.438 ± 0.037 |" in md and "| b | code | 0.250 ± 0.050 |" in md


def test_bands_stay_where_the_quantity_can_be_and_the_legend_names_only_drawn_variants(tmp_path):
    """Three seeds of an exact-match score that are 0, 0 and 0.9 give a t-interval reaching past 1 and below 0; the
    band is cut at [0, 1]. A loss never below 0 gets no band below 0. A variant whose runs have not run yet (a
    study in progress) gets no legend entry."""
    from matplotlib.collections import PolyCollection

    from tunelab.lab.curves import value_bounds

    assert value_bounds("eval/uuid:exact_match", [0.0, 0.5, 1.0]) == (0.0, 1.0)
    assert value_bounds("loss", [0.1, 2.0]) == (0.0, math.inf)
    assert value_bounds("reward", [-1.0, 1.0]) == (-math.inf, math.inf)
    assert value_bounds("kl", [0.0, 3.0]) == (0.0, math.inf)
    fake_run = fake_runs(tmp_path)
    rows = []
    for seed, score in enumerate((0.0, 0.0, 0.9)):
        d = fake_run(f"mora/seed-{seed}")
        lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        for r in lines:
            if "eval/uuid:exact_match" in r:
                r["eval/uuid:exact_match"] = score
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        rows.append({"name": f"mora/seed-{seed}", "variant": "mora", "seed": seed, "run_dir": str(d), "status": "done"})
    for seed in range(3):  # configured, not run yet: no folder
        rows.append({"name": f"full/seed-{seed}", "variant": "full", "seed": seed,
                     "run_dir": str(tmp_path / "runs" / "full" / f"seed-{seed}"), "status": "pending"})
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "s", "seeds": [0, 1, 2], "variants": rows}))
    fig = curves_figure(collect([tmp_path]))
    panel = next(a for a in visible_axes(fig) if "exact_match" in a.get_title())
    [band] = [c for c in panel.collections if isinstance(c, PolyCollection)]
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() >= 0.0 and ys.max() <= 1.0 and ys.max() == pytest.approx(1.0)  # cut, not dropped
    labels = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert labels == ["mora"] and fig.legends[0].get_title().get_text() == "mean of 3 seeds, 95 % band"


def test_a_legend_of_long_variant_names_stays_inside_the_figure(tmp_path):
    """Four grid variants with long names: the legend takes as many columns as fit, none cut at the edges; seed
    counts that differ are said per variant."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fake_run = fake_runs(tmp_path)
    names = ["r8,method=lora", "r8,method=dora", "r32,method=lora", "r32,method=dora-with-a-longer-name"]
    rows = []
    for name in names:
        for seed in range(3 if name != names[-1] else 2):
            fake_run(f"{name}/seed-{seed}")
            rows.append({"name": f"{name}/seed-{seed}", "variant": name, "seed": seed,
                         "run_dir": str(tmp_path / "runs" / name / f"seed-{seed}"), "status": "done"})
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "s", "seeds": [0, 1, 2], "variants": rows}))
    fig = curves_figure(collect([tmp_path]))
    FigureCanvasAgg(fig).draw()
    [legend] = fig.legends
    box, page = legend.get_window_extent(), fig.bbox
    assert box.x0 >= page.x0 and box.x1 <= page.x1, (box, page)
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[0] == "r8,method=lora (mean of 3 seeds, 95 % band)" and labels[-1].endswith("(mean of 2 seeds, 95 % band)")


def test_point_labels_are_short_for_grid_variants_and_do_not_sit_on_each_other():
    from matplotlib.figure import Figure

    from tunelab.lab.figure import place_labels, point_label, short_name

    assert short_name("short-response,data.limit=16,data.masking=none") == "short-response · 16 · none"
    assert short_name("lora-r8") == "lora-r8" and short_name("a,b") == "a,b"
    ax = Figure().add_subplot()
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    point_label(ax, "r8,method=lora", 0.5, 0.5)
    point_label(ax, "r8,method=dora", 0.501, 0.501)  # nearly the same point
    point_label(ax, "r32,method=lora", 0.1, 0.9)  # far away: its own place
    point_label(ax, "r64,method=lora", 0.99, 0.2)  # at the right edge: written left of its point
    place_labels(ax)
    anns = ax.texts
    assert [a.get_text() for a in anns] == ["r8 · lora", "r8 · dora", "r32 · lora", "r64 · lora"]
    assert anns[0].xyann[1] != anns[1].xyann[1] and anns[2].xyann == (5, 4)
    assert anns[3].xyann == (-5, 4) and anns[3].get_horizontalalignment() == "right"
