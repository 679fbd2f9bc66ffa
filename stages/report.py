"""Stage ``report``: tables, figures and the Markdown/HTML report.

Reads ``params.yaml`` section ``report`` and, for its text, each
experiment's ``prepare`` section and the shaping experiments' ``seeds``,
``optimizee`` and ``evaluate``; ``results/<experiment>/`` (``curves.csv``
for sine and MNIST; the landscape, minima, convergence, trajectory and
outcome tables and the animation for the shaping experiments; the
outcomes, trajectories, animation and learning curves of the RL
experiments, with their ``seeds``, ``optimizee``, ``meta_train`` and
``evaluate`` sections for the text), the
meta-training and validation curves under ``models/<experiment>/`` and the
metrics JSON of earlier stages; ``params.yaml`` section ``generalize`` and
``results/generalize/<cell>/`` (summary and curves of every cell). Writes
``reports/``: ``report.md``, ``report.html`` (self-contained), ``figures/``
(PNG, and the GIF) and ``tables/*.csv`` (the long results table and the
display tables). Logged to MLflow experiment ``ml3-report``.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import artifacts, perf, tracking
from pipeline import report as rp
from pipeline import report_generalize as rg
from pipeline import report_rl as rr
from pipeline import report_shaping as rs
from pipeline.config import (
    EXPERIMENTS,
    RL_EXPERIMENTS,
    SHAPING_EXPERIMENTS,
    as_dict,
    load_params,
)
from pipeline.layout import Layout
from stages import _cli

log = logging.getLogger("stages.report")

HEADLINE = {"sine": ("heldout", "mse"), "mnist": ("test", "accuracy")}


def run(params_path: Path, root: Path) -> None:
    """Builds ``reports/`` from the saved outputs of every experiment."""
    params = load_params(params_path)
    confidence = params.report.confidence
    layout = Layout(root)

    section = (
        {"report": as_dict(params.report)}
        | {
            f"{name}.prepare": as_dict(params.experiments[name].prepare)
            for name in EXPERIMENTS
        }
        | {
            f"{name}.{key}": as_dict(getattr(params.experiments[name], key))
            for name in SHAPING_EXPERIMENTS
            for key in ("seeds", "optimizee", "evaluate")
        }
        | {
            f"{name}.{key}": as_dict(getattr(params.experiments[name], key))
            for name in RL_EXPERIMENTS
            for key in ("seeds", "optimizee", "meta_train", "evaluate")
        }
        | {"reacher.learned_loss": as_dict(params.experiments["reacher"].learned_loss)}
    )
    with tracking.stage_run("report", "report", section, root=root):
        with artifacts.atomic_dir(layout.reports) as out:
            (out / "figures").mkdir()
            (out / "tables").mkdir()
            summary = rp.Section("Summary")
            summary.text(
                f"Made by the report stage at commit {tracking.git_commit(root)} "
                "from the saved outputs of the pipeline (dvc repro)."
            )
            sections = [summary]
            finals = []
            for name in EXPERIMENTS:
                if name in SHAPING_EXPERIMENTS or name in RL_EXPERIMENTS:
                    make = _rl_section if name in RL_EXPERIMENTS else _shaping_section
                    headline, section_ = make(
                        name, params.experiments[name], layout, out, confidence
                    )
                    summary.text(headline)
                    sections.append(section_)
                    continue
                curves = pd.read_csv(layout.results(name) / "curves.csv")
                finals.append(rp.final_rows(curves))
                summary.text(_headline(name, curves, confidence))
                sections.append(
                    _experiment_section(
                        name,
                        curves,
                        layout,
                        out,
                        confidence,
                        params.experiments[name].prepare,
                    )
                )
            headline, section_ = _generalize_section(params, root, out, confidence)
            summary.text(headline)
            sections.append(section_)
            sections.append(_performance_section(root, layout, out, params))
            artifacts.write_csv(
                out / "tables" / "final_long.csv", pd.concat(finals, ignore_index=True)
            )
            title = "ML3 Bench report"
            (out / "report.md").write_text(rp.render_markdown(title, sections, out))
            (out / "report.html").write_text(rp.render_html(title, sections))
            tracking.log_artifacts(out, "report")
    log.info("wrote %s", layout.reports / "report.html")


def _headline(name: str, curves: pd.DataFrame, confidence: float) -> str:
    split, metric = HEADLINE[name]
    baseline = rp.baseline_method(curves)
    last = curves[
        (curves.step == curves.step.max())
        & (curves.split == split)
        & (curves.metric == metric)
    ]
    per_seed, seeds, inst = rp.compare(last, metric, baseline, confidence)
    word = "lower" if rp.LOWER_IS_BETTER[metric] else "higher"
    return (
        f"{rp.TITLES[name]}: final {split} {metric} after {int(curves.step.max())} "
        f"meta-test steps, learned loss {per_seed['learned'].mean():.4g} vs "
        f"{baseline} {per_seed[baseline].mean():.4g} (difference "
        f"{seeds['diff_mean']:.3g}, {confidence:.0%} CI [{seeds['diff_low']:.3g}, "
        f"{seeds['diff_high']:.3g}], paired t p = {seeds['p_value']:.2g}); the "
        f"learned loss is {word} on {seeds['wins']}/{seeds['n_pairs']} seeds and "
        f"{inst['wins']}/{inst['n_pairs']} single runs."
    )


def _read_seed_csvs(folder: Path, name: str, variants: bool = False) -> pd.DataFrame:
    """``seed_*/<name>`` (or ``seed_*/<variant>/<name>``) joined, with labels."""
    pattern = f"seed_*/*/{name}" if variants else f"seed_*/{name}"
    frames = []
    for path in sorted(folder.glob(pattern)):
        seed_folder = path.parent.parent if variants else path.parent
        frame = pd.read_csv(path).assign(seed=int(seed_folder.name.split("_")[1]))
        if variants:
            frame["variant"] = path.parent.name
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _shaping_section(name, params, layout, out, confidence):
    """The report section of a shaping experiment and its summary sentence."""
    section = rp.Section(rp.TITLES[name])
    results = layout.results(name)
    models = layout.models(name)
    ep = params.evaluate
    fig = rs.plot_meta_train(
        _read_seed_csvs(models, "meta_curve.csv", variants=True),
        _read_seed_csvs(models, "validation.csv", variants=True),
        out / "figures" / f"{name}_meta_train.png",
        f"{rp.TITLES[name]}: meta-training",
        confidence,
    )
    n_seeds = len(params.seeds)
    if name == "frequency":
        minima = pd.read_csv(results / "minima.csv")
        convergence = pd.read_csv(results / "convergence.csv")
        landscape = pd.read_csv(results / "landscape.csv")
        section.text(
            "The optimizee y = sin(theta x) has one parameter, starting at "
            f"{params.optimizee.initial_theta:g}. Both learned losses see "
            "(prediction, target, x); 'shaped' was meta-trained with the task "
            "loss (theta' - omega)^2, which uses the true frequency, 'unshaped' "
            "with the MSE of the outputs; 'mse' is the plain MSE loss. At "
            "meta-test no loss knows omega. "
            f"{n_seeds} seeds, each with its own pair of learned losses. Test "
            f"targets {ep.targets}; meta-training draws fresh frequencies from "
            f"U{list(params.prepare.omega_range)} and never these exact values."
        )
        section.figure(fig, "Meta-training curves (mean over seeds, band: interval)")
        table = rs.minima_table(minima, confidence)
        artifacts.write_csv(out / "tables" / f"{name}_minima.csv", table)
        section.table(
            table,
            f"Interior local minima over theta in {ep.landscape_range} "
            f"({ep.landscape_points} grid points): all, and those at least 1 % of "
            f"the landscape's range deep; mean [{confidence:.0%} interval] over "
            "seeds; the authors' code: shaped 1, unshaped and MSE 10 (target 0.5)",
        )
        seed0 = params.seeds[0]
        fig = rs.plot_landscapes(
            landscape, seed0, out / "figures" / f"{name}_landscapes.png"
        )
        section.figure(fig, f"Loss landscapes (seed {seed0}; each scaled to [0, 1])")
        table = rs.convergence_table(convergence, ep.tolerance, confidence)
        artifacts.write_csv(out / "tables" / f"{name}_convergence.csv", table)
        section.table(
            table,
            f"theta after {ep.n_steps} SGD steps at lr {ep.lr:g}: mean "
            f"[{confidence:.0%} interval] over seeds, and seeds within "
            f"{ep.tolerance:g} of the target",
        )
        extremes = [min(ep.initial_thetas), max(ep.initial_thetas)]
        fig = rs.plot_convergence(
            convergence, extremes, out / "figures" / f"{name}_convergence.png"
        )
        section.figure(fig, "theta over meta-test steps from the extreme starts")
        headline = _frequency_headline(minima, convergence, ep, extremes)
        verdict = _frequency_verdict(minima, convergence, ep, extremes)
    else:
        outcomes = pd.read_csv(results / "outcomes.csv")
        trajectories = pd.read_csv(results / "trajectories.csv")
        p = params.prepare
        start = p.start_state[0]
        section.text(
            f"Differentiable mountain car, horizon {p.horizon}, linear policy "
            f"2-{params.optimizee.hidden_size}-1 from a fixed initial policy per "
            f"seed ({n_seeds} seeds), start ({p.start_state[0]:g}, "
            f"{p.start_state[1]:g}), goal ({p.goal[0]:g}, {p.goal[1]:g}). Both "
            "learned losses see (position, velocity, action, distance to the "
            "goal); 'shaped' was meta-trained with the first "
            f"{p.n_intermediate_steps} states scored against the intermediate "
            f"goal ({p.intermediate_goal[0]:g}, {p.intermediate_goal[1]:g}), "
            "'unshaped' with all states against the goal; 'distance' descends "
            "the mean distance to the goal directly. Success: the car reaches "
            f"p = {ep.success_position:g} during the rollout."
        )
        section.figure(fig, "Meta-training curves (mean over seeds, band: interval)")
        table = rs.outcome_table(outcomes, start, confidence)
        artifacts.write_csv(out / "tables" / f"{name}_outcomes.csv", table)
        section.table(
            table,
            f"From the meta-train start: final position, mean [{confidence:.0%} "
            "interval] over seeds, and seeds that reached the flag; the "
            "authors' code: the shaped loss reaches the flag after 1-2 steps, "
            "the unshaped one ends near p = -0.29",
        )
        table = rs.seed_table(outcomes, start)
        artifacts.write_csv(out / "tables" / f"{name}_seeds.csv", table)
        section.table(
            table,
            "Every seed from the meta-train start: final position (* reached "
            "the flag) and share of time steps with a clipped action",
        )
        fig = rs.plot_trajectories(
            trajectories,
            start,
            ep.n_steps,
            out / "figures" / f"{name}_trajectories.png",
        )
        section.figure(fig, "Trajectories after the last meta-test step")
        gif = out / "figures" / f"{name}.gif"
        shutil.copyfile(results / "animation.gif", gif)
        section.figure(
            gif,
            f"Animation: the cars of seed {params.seeds[0]} after "
            f"{ep.n_steps} meta-test steps",
        )
        table = rs.start_table(outcomes, ep.n_steps)
        artifacts.write_csv(out / "tables" / f"{name}_starts.csv", table)
        section.table(
            table,
            f"Other start states (at rest) after {ep.n_steps} meta-test steps, "
            "from the same initial policy; the losses were meta-trained from "
            f"p = {start:g} only",
        )
        headline = _mountain_car_headline(outcomes, start, ep.n_steps)
        verdict = _mountain_car_verdict(outcomes, start, ep.n_steps)
    # the verdict goes right after the protocol, before the evidence
    section.blocks.insert(1, ("text", verdict))
    return f"{rp.TITLES[name]}: {headline}", section


def _rl_section(name, params, layout: Layout, out: Path, confidence: float):
    """The report section of an RL experiment and its summary sentence."""
    section = rp.Section(rp.TITLES[name])
    results, models = layout.results(name), layout.models(name)
    figures = out / "figures"
    p, ep, mp = params.prepare, params.evaluate, params.meta_train
    if name == "reacher":
        history, validation = (
            _ml3_rows(_read_seed_csvs(models, f"{csv}.csv", variants=True))
            for csv in ("meta_curve", "validation")
        )
    else:
        history = _read_seed_csvs(models, "meta_curve.csv")
        validation = _read_seed_csvs(models, "validation.csv")
    # one learned loss per seed: the shaping plot with a single variant
    # the collapse diagnostics (gradient norm, spread) stay in MLflow
    shown = [
        c
        for c in validation.columns
        if c.startswith("val_") and "grad" not in c and "spread" not in c
    ]
    meta_fig = rs.plot_meta_train(
        history.assign(variant="learned"),
        validation[["iteration", "seed", *shown]].assign(variant="learned"),
        figures / f"{name}_meta_train.png",
        f"{rp.TITLES[name]}: meta-training",
        confidence,
        yscale="log" if name == "reacher" else "linear",
    )
    n_seeds = len(params.seeds)
    if name == "reacher":
        outcomes = pd.read_csv(results / "outcomes.csv")
        trajectories = pd.read_csv(results / "trajectories.csv")
        direct_lr = pd.read_csv(results / "direct_lr.csv")
        fits = _read_seed_csvs(models, "fits.csv", variants=True).drop(
            columns="variant"
        )
        section.text(
            "Gymnasium's MuJoCo Reacher-v5 arm driven at the level of joint state "
            f"and torques, horizon {p.horizon} steps of 0.02 s from rest. Policy "
            f"8-{'-'.join(map(str, params.optimizee.hidden_sizes))}-2 over (state, "
            "goal state); learned loss "
            f"7-{'-'.join(map(str, params.learned_loss.hidden_sizes))}-1 over "
            "(state, action, joint distance to the goal), meta-trained by "
            "differentiating the task loss of a rollout through a learned "
            f"dynamics model (ensemble of {mp.ensemble_size} probabilistic MLPs, "
            f"refitted every {mp.refresh_every} outer iterations with rollouts of "
            f"the current policies), {mp.n_outer_iterations} outer iterations on "
            f"{p.n_train_goals} training goals per seed, {mp.tasks_per_iteration} "
            f"per iteration. Task loss: {p.final_weight:g} x final + mean joint "
            f"distance + {p.velocity_weight:g} x mean squared joint speed. "
            f"Meta-test on {p.n_test_goals} held-out goals spread over the "
            f"workspace, {n_seeds} seeds: a fresh policy per goal, {ep.n_steps} "
            f"SGD steps on the learned loss (lr {ep.lr:g}) against {ep.n_steps} "
            "steps on the task loss itself ('direct'), both on rollouts of the "
            "real simulator with gradients through the learned model; the "
            "direct learning rate is the best of "
            f"{ep.direct_lrs} on the training goals. Success: the fingertip ends "
            f"within {ep.success_radius:g} m of the goal."
        )
        # fingertip outcomes, and the joint-space task loss the learned loss
        # was meta-trained on
        values = {
            "final_distance": True,
            "success": False,
            "final_joint_distance": True,
            "task_loss": True,
        }
        table = rr.comparison_table(
            outcomes,
            step="test_step",
            steps=ep.report_steps,
            values=values,
            baseline="direct",
            confidence=confidence,
        )
        artifacts.write_csv(out / "tables" / f"{name}_outcomes.csv", table)
        at_last = table[table.test_step == ep.n_steps].set_index("metric")
        last, task = at_last.loc["final_distance"], at_last.loc["task_loss"]
        first_step = min((k for k in ep.report_steps if k > 0), default=ep.n_steps)
        first = table[
            (table.test_step == first_step) & (table.metric == "final_distance")
        ].iloc[0]
        section.text(
            f"Verdict on held-out goals after {first_step} meta-test step(s): "
            f"{first['verdict']} (final fingertip distance, learned "
            f"{first['learned']} m vs direct {first['direct']} m)."
        )
        section.text(
            f"Verdict on held-out goals after {ep.n_steps} meta-test steps: "
            f"{last['verdict']} (final fingertip distance, learned "
            f"{last['learned']} m vs direct {last['direct']} m; mean "
            f"[{confidence:.0%} interval] over goal x seed pairs). On the "
            f"joint-space task loss it was meta-trained for: {task['verdict']} "
            f"({task['learned']} vs {task['direct']})."
        )
        section.table(
            table,
            "Held-out goals: final fingertip distance (m), success, final joint "
            f"distance (rad) and task loss, mean "
            f"[{confidence:.0%} interval] over goals x seeds, after each "
            "meta-test step; the verdict asks whether the interval of the "
            "paired difference excludes zero",
        )
        fig = rr.plot_over_steps(
            outcomes,
            "test_step",
            {"final_distance": "final fingertip distance (m)", "success": "success"},
            figures / f"{name}_steps.png",
            "Reacher: held-out goals over meta-test steps",
            confidence,
        )
        section.figure(fig, "Mean over goals x seeds, band: interval")
        seed0 = params.seeds[0]
        shown = trajectories[
            (trajectories.seed == seed0) & (trajectories.test_step == ep.n_steps)
        ]
        fig = rr.plot_arm_paths(
            shown,
            outcomes[outcomes.seed == seed0],
            figures / f"{name}_trajectories.png",
            f"Fingertip paths after {ep.n_steps} meta-test steps (seed {seed0})",
        )
        section.figure(
            fig, "Every held-out goal (x) with the fingertip's path and final pose"
        )
        gif = figures / f"{name}.gif"
        shutil.copyfile(results / "animation.gif", gif)
        section.figure(gif, f"Animation: seed {seed0}, after {ep.n_steps} steps")
        section.figure(meta_fig, "Meta-training (mean over seeds, band: interval)")
        chosen = direct_lr[direct_lr.selected.astype(bool)]
        section.text(
            "Direct learning rate chosen on the training goals, per seed: "
            + ", ".join(f"{lr:g}" for lr in chosen.lr)
            + "."
        )
        last_fit = fits.sort_values("fit").groupby("seed").tail(1)
        artifacts.write_csv(out / "tables" / f"{name}_model_fits.csv", last_fit)
        section.table(
            last_fit.round(5),
            "The dynamics model after its last refit, per seed",
        )
        section.text(_authors_text(layout, mp))
        headline = (
            f"on {p.n_test_goals} held-out goals x {n_seeds} seeds, final "
            f"fingertip distance after {first_step} step(s): learned "
            f"{first['learned']} m vs direct {first['direct']} m "
            f"({first['verdict']}); after {ep.n_steps} steps: learned "
            f"{last['learned']} m vs direct {last['direct']} m "
            f"({last['verdict']})."
        )
    else:
        curves = pd.read_csv(results / "curves.csv")
        paths = pd.read_csv(results / "paths.csv")
        baseline_lr = pd.read_csv(results / "baseline_lr.csv")
        env = "point mass" if name == "goal_point_mass" else "reacher"
        steps_per_update = ep.episodes_per_update * p.horizon
        section.text(
            f"Model-free: the {env} reaches goals at {p.goal_radius_range[0]:g} "
            f"to {p.goal_radius_range[1]:g} from its start, horizon {p.horizon}, "
            "reward minus the distance to the goal. Gaussian policy "
            f"({'-'.join(map(str, params.optimizee.hidden_sizes))} "
            f"{params.optimizee.activation} mean, learned log std). The learned "
            "loss sees each time step's observation, sampled action, the "
            "policy's mean action and the log-probability of the sampled action "
            "(which carry the gradient to the policy) and the advantage "
            "(reward-to-go less its mean over the episodes at that time step, "
            "over its spread); it "
            "was meta-trained with the REINFORCE task loss of fresh episodes "
            f"after each inner step ({mp.n_outer_iterations} outer iterations, "
            f"{mp.unrolls_per_task} unrolls per task). Meta-test on "
            f"{p.n_test_goals} held-out goals, {n_seeds} seeds, {ep.n_updates} "
            f"updates of {ep.episodes_per_update} episodes ({steps_per_update} "
            "environment steps) each: SGD on the learned loss against REINFORCE "
            "with a time-step baseline (Adam, learning rate the best of "
            f"{ep.baseline_lrs} on the training goals), the same episodes budget. "
            f"Success: final distance below {p.success_radius:g}."
        )
        values = {"mean_return": False, "success": False}
        # early, halfway and last: a loss tuned on short unrolls may help early
        steps = sorted({min(5, ep.n_updates), ep.n_updates // 2, ep.n_updates})
        table = rr.comparison_table(
            curves,
            step="update",
            steps=steps,
            values=values,
            baseline="reinforce",
            confidence=confidence,
        )
        artifacts.write_csv(out / "tables" / f"{name}_curves.csv", table)
        last = table[
            (table["update"] == ep.n_updates) & (table.metric == "mean_return")
        ].iloc[0]
        section.text(
            f"Verdict on held-out goals after {ep.n_updates} updates "
            f"({ep.n_updates * steps_per_update} environment steps): "
            f"{last['verdict']} (return, learned {last['learned']} vs REINFORCE "
            f"{last['reinforce']})."
        )
        section.table(
            table,
            f"Held-out goals: return and success, mean [{confidence:.0%} interval] "
            "over goals x seeds; the verdict asks whether the interval of the "
            "paired difference excludes zero",
        )
        fig = rr.plot_over_steps(
            curves,
            "env_steps",
            {"mean_return": "return", "success": "success"},
            figures / f"{name}_curves.png",
            f"{rp.TITLES[name]}: held-out goals",
            confidence,
        )
        section.figure(fig, "Mean over goals x seeds, band: interval")
        seed0 = params.seeds[0]
        shown = paths[
            (paths.seed == seed0)
            & (paths["update"] == ep.n_updates)
            & (paths.episode == paths.episode.min())
        ]
        fig = rr.plot_goal_paths(
            shown,
            figures / f"{name}_paths.png",
            f"One episode per held-out goal after {ep.n_updates} updates "
            f"(seed {seed0})",
        )
        section.figure(fig, "Paths from the start (dot) towards each goal (x)")
        section.figure(meta_fig, "Meta-training (mean over seeds, band: interval)")
        chosen = baseline_lr[baseline_lr.selected.astype(bool)]
        section.text(
            "REINFORCE learning rate chosen on the training goals, per seed: "
            + ", ".join(f"{lr:g}" for lr in chosen.lr)
            + "."
        )
        headline = (
            f"return on held-out goals after {ep.n_updates * steps_per_update} "
            f"environment steps: learned {last['learned']} vs REINFORCE "
            f"{last['reinforce']} ({last['verdict']})."
        )
    return f"{rp.TITLES[name]}: {headline}", section


def _ml3_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The reacher's own learned losses (not the authors' variant)."""
    return frame[frame.variant == "ml3"].drop(columns="variant")


def _authors_text(layout: Layout, mp) -> str:
    """What became of the learned loss meta-trained with the authors' settings."""
    metrics = artifacts.read_json(layout.metrics("reacher", "meta_train"))
    authors = metrics.get("authors", {})
    if not authors:
        return "The authors' settings were not run (meta_train.authors_seeds is empty)."
    parts = []
    for seed, entry in authors.items():
        if entry["collapsed"]:
            parts.append(f"{seed}: collapsed ({entry['message']})")
        else:
            parts.append(f"{seed}: did not collapse")
    return (
        f"The authors' settings (Adam lr {mp.authors_outer_lr:g} on the loss, "
        f"policy SGD lr {mp.authors_inner_lr:g}, inputs "
        f"{'' if mp.authors_normalize_inputs else 'not '}standardized), "
        "meta-trained for comparison: " + "; ".join(parts)
    )


def _frequency_headline(minima, convergence, ep, extremes) -> str:
    first = ep.targets[0]
    at = minima[minima.target == first].groupby("method")
    counts, deep = at.n_local_minima.mean(), at.n_minima_1pct.mean()
    last = convergence[
        (convergence.step == convergence.step.max()) & convergence.theta0.isin(extremes)
    ]
    reached = ((last.theta - last.target).abs() <= ep.tolerance).groupby(last.method)
    parts = ", ".join(
        f"{m} {counts[m]:.1f} ({deep[m]:.1f} at least 1 % deep)"
        for m in rs.METHOD_ORDER
        if m in counts
    )
    runs = ", ".join(
        f"{m} {int(reached.sum()[m])}/{int(reached.count()[m])}"
        for m in rs.METHOD_ORDER
        if m in reached.sum()
    )
    return (
        f"local minima over theta for target {first:g} (mean over seeds): {parts}; "
        f"runs from theta0 = {extremes} that end within {ep.tolerance:g} of the "
        f"target after {ep.n_steps} steps: {runs}."
    )


def _verdict(all_hold: bool, better: bool) -> str:
    if all_hold:
        return "reproduced"
    return "partly reproduced" if better else "not reproduced"


def _frequency_verdict(minima, convergence, ep, extremes) -> str:
    """Which of the paper's two frequency claims held here, in numbers."""
    cells = minima.groupby("method")
    one_deep = cells.n_minima_1pct.apply(lambda c: int((c == 1).sum()))
    one_any = cells.n_local_minima.apply(lambda c: int((c == 1).sum()))
    n_cells = int(cells.size().iloc[0])
    fewest = minima.pivot_table(
        index=["seed", "target"], columns="method", values="n_minima_1pct"
    )
    others = [m for m in fewest.columns if m != "shaped"]
    n_fewer = int((fewest["shaped"].lt(fewest[others].min(axis=1))).sum())
    last = convergence[
        (convergence.step == convergence.step.max()) & convergence.theta0.isin(extremes)
    ]
    near = ((last.theta - last.target).abs() <= ep.tolerance).groupby(last.method)
    reached, n_runs = near.sum(), near.count()
    claim1 = _verdict(one_deep["shaped"] == n_cells, n_fewer == n_cells)
    claim2 = _verdict(
        reached["shaped"] == n_runs["shaped"],
        reached["shaped"] > max(reached[m] for m in reached.index if m != "shaped"),
    )
    ranges = ", ".join(
        f"{m} {int(cells.get_group(m).n_minima_1pct.min())}-"
        f"{int(cells.get_group(m).n_minima_1pct.max())}"
        for m in rs.METHOD_ORDER
        if m in one_deep.index and m != "shaped"
    )
    return (
        f"Claim 1, one local minimum for the shaped loss against about ten for "
        f"MSE and the unshaped loss: {claim1}. Over {n_cells} (seed, target) "
        f"landscapes the shaped loss has exactly one minimum at least 1 % deep in "
        f"{one_deep['shaped']} and exactly one minimum of any depth in "
        f"{one_any['shaped']}; it has fewer deep minima than every other loss in "
        f"{n_fewer} (the others: {ranges}). Claim 2, from theta0 = {extremes} the "
        f"shaped loss reaches the unseen targets within about {ep.tolerance:g} in "
        f"{ep.n_steps} steps: {claim2}; {int(reached['shaped'])} of "
        f"{int(n_runs['shaped'])} runs do, against "
        + ", ".join(
            f"{int(reached[m])} for {m}" for m in reached.index if m != "shaped"
        )
        + "."
    )


def _mountain_car_verdict(outcomes, start, n_steps) -> str:
    """The paper's mountain car claim against these runs, in numbers."""
    at = outcomes[np.isclose(outcomes.start_position, start) & (outcomes.test_step > 0)]
    ever = at.groupby(["method", "seed"]).success.any().groupby("method")
    n_seeds = int(ever.size().iloc[0])
    shaped = int(ever.sum()["shaped"])
    unshaped = int(ever.sum()["unshaped"])
    final = at[at.test_step == n_steps].groupby("method").final_position.mean()
    claim = _verdict(shaped == n_seeds and unshaped == 0, shaped > unshaped)
    other = outcomes[
        ~np.isclose(outcomes.start_position, start) & (outcomes.test_step == n_steps)
    ]
    carry = other.groupby("method").success.agg(["sum", "count"])
    return (
        "Claim: with the intermediate goal the car reaches the flag after 1-2 "
        f"meta-test steps, without it it ends near p = -0.29: {claim}. Within "
        f"{n_steps} steps the shaped loss takes the car to the flag on {shaped} "
        f"of {n_seeds} seeds, the unshaped one on {unshaped}; after {n_steps} "
        f"steps the mean final position is {final['shaped']:.2f} (shaped) and "
        f"{final['unshaped']:.2f} (unshaped). From the other start states "
        "(never seen in meta-training) the flag is reached in "
        + ", ".join(
            f"{int(r['sum'])}/{int(r['count'])} runs with {m}"
            for m, r in carry.iterrows()
        )
        + f" after {n_steps} steps."
    )


def _mountain_car_headline(outcomes, start, n_steps) -> str:
    at = outcomes[np.isclose(outcomes.start_position, start)]
    parts = []
    for step in range(1, n_steps + 1):
        group = at[at.test_step == step]
        parts.append(
            f"after {step} meta-test step(s) "
            + ", ".join(
                f"{m} {int(g.success.sum())}/{len(g)} seeds reach the flag "
                f"(final p {g.final_position.mean():.2f})"
                for m, g in group.groupby("method")
            )
        )
    return "; ".join(parts) + "."


def _experiment_section(
    name: str,
    curves: pd.DataFrame,
    layout: Layout,
    out: Path,
    confidence: float,
    prepare,
) -> rp.Section:
    section = rp.Section(rp.TITLES[name])
    baseline = rp.baseline_method(curves)
    if name == "sine":
        p = prepare

        def span(key):
            low, high = getattr(p, key)
            return f"{low:.3g}" if low == high else f"U[{low:.3g}, {high:.3g}]"

        section.text(
            f"{p.n_train_tasks} meta-train task(s) (A = {span('train_amplitude_range')}"
            f", p = {span('train_phase_range')}), {p.n_test_tasks} unseen test tasks "
            f"per seed (A = {span('test_amplitude_range')}, p = "
            f"{span('test_phase_range')}). 'train' is the fit on the {p.n_points} "
            "points the optimizee is trained on (the number the authors report); "
            f"'heldout' is the error on {p.n_heldout_points} other points of the "
            "same task."
        )
        section.table(
            rp.sine_paper_table(curves),
            "Final training-point MSE next to the authors' code",
        )
    else:
        manifest = artifacts.read_json(layout.data(name) / "manifest.json")
        section.text(
            f"Digits {manifest['classes']['0']} (label 0) vs "
            f"{manifest['classes']['1']} (label 1) from {manifest['source']}; "
            f"train/validation/test = {manifest['train']['n']}/"
            f"{manifest['val']['n']}/{manifest['test']['n']} images. Fresh "
            "classifiers are trained by minibatch SGD from identical weights and "
            "data order with the learned loss and with binary cross-entropy."
        )
    table = rp.comparison_table(curves, baseline, confidence)
    artifacts.write_csv(out / "tables" / f"{name}_comparison.csv", table)
    section.table(
        table,
        f"Mean over seeds with {confidence:.0%} t-interval; "
        "'won' counts where the learned loss is better",
    )
    models = layout.models(name)
    fig = rp.plot_meta_train(
        _read_seed_csvs(models, "meta_curve.csv"),
        _read_seed_csvs(models, "validation.csv"),
        out / "figures" / f"{name}_meta_train.png",
        f"{rp.TITLES[name]}: meta-training",
        confidence,
    )
    section.figure(fig, "Meta-training curves (mean over seeds, band: interval)")
    fig = rp.plot_meta_test(
        curves,
        out / "figures" / f"{name}_meta_test.png",
        f"{rp.TITLES[name]}: meta-test on unseen tasks",
        confidence,
    )
    section.figure(fig, "Meta-test curves (mean over seeds, band: interval)")
    return section


def _generalize_section(params, root: Path, out: Path, confidence: float):
    """The generalization grid's section and its summary sentence."""
    section = rp.Section("Generalization to unseen settings")
    cells = rg.cell_table(params.generalize.cells)
    summary, curves = rg.read_cells(root, params.generalize.cells)
    steps = sorted(summary.step.unique())
    # in grid order: a set's order changes from run to run
    seeds = {e: params.experiments[e].seeds for e in cells.experiment.unique()}
    shared = params.generalize
    section.text(
        "Each learned loss of the sine and MNIST experiments (one per seed, "
        "meta-trained in one setting) is used, frozen, to train fresh optimizees "
        "in settings it never saw: other architectures, datasets or task "
        "families, learning rates, and far more steps than the "
        f"{params.experiments['sine'].meta_train.n_inner_steps} (sine) and "
        f"{params.experiments['mnist'].meta_train.n_inner_steps} (MNIST) inner "
        "steps it was meta-trained through. Every cell trains the same initial "
        "weights in the same data order with the learned loss and with the "
        f"standard loss (MSE; cross-entropy) for {shared.sine.n_steps} (sine) and "
        f"{shared.mnist.n_steps} (MNIST) plain SGD steps, at the cell's "
        f"learning rate; seeds: {seeds}. Sine: {shared.sine.n_tasks} tasks per "
        f"seed, MSE on {shared.sine.n_heldout_points} held-out points; MNIST: "
        f"{shared.mnist.n_runs} classifiers per seed, minibatch "
        f"{shared.mnist.batch_size}, accuracy and cross-entropy on the test split. "
        "K-way outputs use the binary learned loss once per class on (softmax "
        "probability, one-hot target), "
        f"{'summed' if shared.mnist.class_reduction == 'sum' else 'averaged'} over "
        "classes; BatchNorm layers "
        "normalize training batches with their own statistics and evaluation "
        "with the running statistics ('running') or the evaluated set's own "
        "('batch'), as each cell declares."
    )
    section.text(
        "A run whose loss diverged is not averaged away: the method that diverged "
        "loses the cell (improvement -100 %), and the per-cell tables count the "
        "diverged runs."
    )
    section.text(
        "Improvement = (baseline - learned) / max(baseline, learned) of the loss, "
        "or of the error (1 - accuracy): +50 % means the learned loss halves the "
        "standard loss's error, -50 % that the standard loss halves the learned "
        "loss's; bounded in ±100 %. + / - (and * in the figure) mark cells whose "
        f"{confidence:.0%} interval of the paired difference over seeds excludes "
        "zero in favour of / against the learned loss."
    )
    verdict = rg.verdicts(summary, cells, steps)
    artifacts.write_csv(out / "tables" / "generalize_verdicts.csv", verdict)
    section.table(
        verdict,
        "Which generalization claims held, at each checkpoint: the verdict and "
        "(cells where the learned loss is better / worse with the interval "
        "excluding zero / neither). held: better in every cell; partly held: "
        "better in more cells than worse; mixed: better in some, worse in as many "
        "or more; did not hold: worse in some, better in none",
    )
    for name in ("sine", "mnist"):
        sentence = rg.horizon_sentence(summary, curves, cells, name, steps)
        if sentence:
            section.text(sentence)
    models = root / "models"
    for name, caption in (
        (
            "sine",
            "Where the sine learned loss is lowest: the minimizing prediction as "
            "a fraction of the target (MSE: 1)",
        ),
        (
            "mnist",
            "Where the MNIST learned loss is lowest: the minimizing probability "
            "(cross-entropy: 0 for label 0, 1 for label 1)",
        ),
    ):
        minimizers = rg.loss_minimizers(models / name, seeds[name], name)
        artifacts.write_csv(
            out / "tables" / f"generalize_{name}_minimizers.csv", minimizers
        )
        section.table(minimizers, caption)
    fig = rg.plot_matrix(summary, cells, out / "figures" / "generalize_matrix.png")
    section.figure(fig, "Transfer matrix (colour: improvement)")
    matrix = rg.matrix_table(summary, cells)
    artifacts.write_csv(out / "tables" / "generalize_matrix.csv", matrix)
    section.table(matrix, "Transfer matrix as a table")
    for name in ("sine", "mnist"):
        if not (cells.experiment == name).any():
            continue
        detail = rg.detail_table(summary, cells, name)
        artifacts.write_csv(out / "tables" / f"generalize_{name}.csv", detail)
        section.table(detail, f"{rg.TITLES[name]}: every cell and checkpoint")
        for split, metric in rg.MATRIX_METRICS[name]:
            fig = rg.plot_cell_curves(
                curves,
                cells,
                name,
                split,
                metric,
                out / "figures" / f"generalize_{name}_{split}_{metric}.png",
                confidence,
            )
            section.figure(fig, "Per-cell curves (mean over seeds, band: interval)")
    artifacts.write_csv(out / "tables" / "generalize_summary.csv", summary)
    headline = "Generalization: " + " ".join(
        rg.headline(summary, cells, name, steps)
        for name in ("sine", "mnist")
        if (cells.experiment == name).any()
    )
    return headline, section


def _performance_section(root: Path, layout: Layout, out: Path, params) -> rp.Section:
    section = rp.Section("Performance")
    rows = []
    for name in EXPERIMENTS:
        for stage in ("prepare", "meta_train", "evaluate"):
            path = layout.metrics(name, stage)
            metrics = artifacts.read_json(path) if path.is_file() else {}
            rows.append(
                {
                    "stage": f"{stage}@{name}",
                    "seconds": metrics.get("stage_seconds", float("nan")),
                }
            )
    cell_seconds = [
        artifacts.read_json(path).get("stage_seconds", float("nan"))
        for path in (
            root / "metrics" / f"generalize_{name}.json"
            for name in params.generalize.cells
        )
        if path.is_file()
    ]
    rows.append(
        {
            "stage": f"generalize@* ({len(cell_seconds)} cells)",
            "seconds": round(sum(cell_seconds), 2),
        }
    )
    section.table(
        pd.DataFrame(rows),
        "Wall time of each stage in the run that made these results "
        "(process start to end, imports and MLflow logging included)",
    )
    seed_rows = []
    for name in EXPERIMENTS:
        for key, values in artifacts.read_json(
            layout.metrics(name, "meta_train")
        ).items():
            if key.startswith("seed_"):
                seed, _, variant = key[5:].partition("/")
                seed_rows.append(
                    {
                        "experiment": f"{name} {variant}".strip(),
                        "seed": int(seed),
                        "meta-train seconds": round(values["seconds"], 1),
                    }
                )
    section.table(pd.DataFrame(seed_rows), "Meta-training time per seed")

    timing_file = root / "benchmarks" / "pipeline.json"
    timing = artifacts.read_json(timing_file) if timing_file.is_file() else {}
    if timing.get("runs"):
        section.text(
            "Whole pipeline, measured by benchmarks/time_pipeline.py on a fresh "
            "copy with the default params.yaml: "
            + "; ".join(
                f"{run['label']} (commit {run['commit'][:10]}): full dvc repro "
                f"{run['full_seconds']:.0f} s, no-op dvc repro "
                f"{run['noop_seconds']:.1f} s"
                for run in timing["runs"]
            )
            + "."
        )
        if "speedup" in timing:
            section.text(f"Speed-up of the full pipeline: {timing['speedup']:.2f}x.")
        covered = {
            stage.partition("@")[2]
            for run in timing["runs"]
            for stage in run.get("stages", {})
        }
        missing = [name for name in EXPERIMENTS if name not in covered]
        if covered and missing:
            section.text(
                "Those pipeline timings cover only the experiments of that "
                f"commit ({', '.join(sorted(covered))}), not {', '.join(missing)}; "
                "the per-stage table above is the run that made this report."
            )
    bench_file = root / "benchmarks" / "results.json"
    if not bench_file.is_file():
        section.text("No benchmark results: run `make benchmark`.")
        return section
    raw = artifacts.read_json(bench_file)
    rows = perf.benchmark_rows(raw)
    machine = raw.get("machine_info", {})
    threads = sorted(set(rows.torch_threads))
    section.text(
        f"Benchmarks (`make benchmark`, {raw.get('datetime', '')[:19]}) on "
        f"{machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
        f"torch threads {threads}; medians of side-by-side runs. Each benchmark "
        "first asserts that both implementations give the same meta-gradient."
    )
    table = perf.versus_higher(rows)
    section.table(
        table,
        "One outer iteration (meta-gradient + Adam step), ours vs "
        "`higher` (innerloop_ctx, per-task loop)",
    )
    section.table(
        perf.floor_ratios(rows),
        "One meta-iteration (k = 1, one task) vs one plain SGD step of "
        "the same optimizee on the same batch",
    )
    memory = perf.memory_info(rows)
    if memory.get("steps"):
        section.text(
            f"Meta-gradient graph memory grows linearly in k (R^2 = "
            f"{memory['r_squared']:.5f}), {memory['slope_bytes_per_step'] / 2**10:.0f} "
            "KiB per unrolled step for 16 sine tasks; truncated to the last step "
            f"it stays at {memory['truncated_graph_bytes'][-1] / 2**10:.0f} KiB for "
            f"every k. Over 200 outer iterations the live tensors and the graph "
            f"size do not change (resident size changed by "
            f"{memory.get('rss_growth_bytes', 0) / 2**20:.1f} MiB)."
        )
    fig = perf.plot_scaling(table, memory, out / "figures" / "performance.png")
    section.figure(
        fig, "Time per outer iteration vs meta-batch size and k; graph memory vs k"
    )
    return section


if __name__ == "__main__":
    sys.exit(_cli.main(run, __doc__, per_experiment=False))
