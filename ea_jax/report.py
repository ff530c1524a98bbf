"""report.md and PNG plots from metrics.json: the numbers a reader of the run looks at first."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ea_jax import io
from ea_jax.prompts import Taxonomy

logger = logging.getLogger(__name__)

PLOTS_DIR = "plots"
MODEL_COLOURS = {"source": "#7f7f7f", "finetuned": "#1f77b4"}


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _rate_cell(rate: dict) -> str:
    """'12.5% [3.1, 25.0] (2/16)' with the bootstrap interval and counts; unscorable noted."""
    if rate["rate"] is None:
        return "n/a (0 samples)"
    cell = f"{_pct(rate['rate'])} [{100 * rate['ci_low']:.1f}, {100 * rate['ci_high']:.1f}] ({rate['n_positive']}/{rate['n_total']})"
    if rate["n_unscorable"]:
        cell += f", {rate['n_unscorable']} unscorable"
    return cell


def _change_cell(change: dict) -> str:
    if change["estimate"] is None:
        return "n/a"
    return f"{100 * change['estimate']:+.1f} pp [{100 * change['low']:+.1f}, {100 * change['high']:+.1f}] (n={change['n']})"


def _score_cell(score: dict) -> str:
    if score["mean"] is None:
        return "n/a"
    return f"{score['mean']:.3f} [{score['ci_low']:.3f}, {score['ci_high']:.3f}]"


def _shift_cell(shift: dict) -> str:
    if shift["shift"] is None:
        return "n/a"
    return f"{shift['shift']:+.3f} [{shift['ci_low']:+.3f}, {shift['ci_high']:+.3f}]"


def _error_bars(values, lows, highs):
    values, lows, highs = (np.asarray([np.nan if v is None else v for v in x], float) for x in (values, lows, highs))
    return values, np.vstack([values - lows, highs - values])


# ---------------------------------------------------------------------------------------------
# Plots.


def _save(figure, path: Path) -> str:
    import io as stdlib_io

    buffer = stdlib_io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    io.atomic_write_bytes(path, buffer.getvalue())
    return f"{PLOTS_DIR}/{path.name}"


def plot_rates_by_category(metrics: dict, key: str, title: str, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = list(metrics["safety"]["source"]["per_category"])
    figure, axis = plt.subplots(figsize=(10, 4))
    width = 0.38
    for offset, model in ((-width / 2, "source"), (width / 2, "finetuned")):
        rates = [metrics["safety"][model]["per_category"][c][key] for c in categories]
        values, errors = _error_bars([r["rate"] for r in rates], [r["ci_low"] for r in rates], [r["ci_high"] for r in rates])
        axis.bar(np.arange(len(categories)) + offset, values, width, yerr=errors, capsize=3,
                 label=model, color=MODEL_COLOURS[model])
    axis.set_xticks(np.arange(len(categories)), categories, rotation=30, ha="right")
    axis.set_ylim(0, 1)
    axis.set_ylabel("rate (95% bootstrap CI)")
    axis.set_title(title)
    axis.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside the axes, clear of the bars
    return _save(figure, path)


def plot_subcategories(metrics: dict, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metrics["safety"]["source"]["per_subcategory"]
    names = list(rows)
    figure, axis = plt.subplots(figsize=(8, 0.32 * len(names) + 1.5))
    height = 0.4
    for offset, model in ((-height / 2, "source"), (height / 2, "finetuned")):
        rates = [metrics["safety"][model]["per_subcategory"][n]["harmful_compliance"] for n in names]
        values, errors = _error_bars([r["rate"] for r in rates], [r["ci_low"] for r in rates], [r["ci_high"] for r in rates])
        axis.barh(np.arange(len(names)) + offset, values, height, xerr=errors, capsize=2,
                  label=model, color=MODEL_COLOURS[model])
    labels = [f"{n} [{rows[n]['group']}]" for n in names]
    axis.set_yticks(np.arange(len(names)), labels, fontsize=8)
    axis.invert_yaxis()
    axis.set_xlim(0, 1)
    axis.set_xlabel("harmful-compliance rate (95% bootstrap CI)")
    axis.set_title("Harmful compliance per subcategory ([trained], [filtered_out], [other])")
    axis.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(figure, path)


def plot_persona(metrics: dict, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dimensions = list(metrics["persona"]["source"]["dimensions"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.38
    for offset, model in ((-width / 2, "source"), (width / 2, "finetuned")):
        scores = [metrics["persona"][model]["dimensions"][d] for d in dimensions]
        values, errors = _error_bars([s["mean"] for s in scores], [s["ci_low"] for s in scores], [s["ci_high"] for s in scores])
        left.bar(np.arange(len(dimensions)) + offset, values, width, yerr=errors, capsize=3, label=model, color=MODEL_COLOURS[model])
    left.set_xticks(np.arange(len(dimensions)), dimensions, rotation=20, ha="right")
    left.set_ylim(0, 1)
    left.set_ylabel("keyed agreement (95% CI)")
    left.set_title("Persona dimension scores")
    left.legend()

    shifts = [metrics["persona"]["finetuned"]["shifts"][d] for d in dimensions]
    values, errors = _error_bars([s["shift"] for s in shifts], [s["ci_low"] for s in shifts], [s["ci_high"] for s in shifts])
    expected = [metrics["expected_signature"][d] for d in dimensions]
    direction_colours = {1: "#2ca02c", -1: "#d62728", 0: "#bbbbbb"}
    colours = [direction_colours[direction] for direction in expected]
    right.bar(np.arange(len(dimensions)), values, yerr=errors, capsize=3, color=colours)
    right.axhline(0, color="black", linewidth=0.8)
    right.set_xticks(np.arange(len(dimensions)), dimensions, rotation=20, ha="right")
    right.set_ylabel("finetuned - source (95% paired CI)")
    right.set_title("Shift (green: expected to rise,\nred: to fall, grey: no expectation)", fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


# ---------------------------------------------------------------------------------------------
# Markdown.


def render_markdown(metrics: dict, taxonomy: Taxonomy, env: dict, plots: dict[str, str]) -> str:
    safety = metrics["safety"]
    change = metrics["safety_change"]
    persona = metrics["persona"]
    manifest = metrics["cai_manifest"]
    lines = [
        f"# Emergent alignment run: {metrics['constitution']}, {metrics['scope']} scope",
        "",
        f"- Source model: `{metrics['models']['source']}`",
        f"- Finetuned model: `{metrics['models']['finetuned']}`",
        f"- Trained subcategories: {', '.join(metrics['trained_subcategories'])}",
        f"- Filtered out (evaluated as unseen): {', '.join(metrics['filtered_out']) or 'none'}",
        f"- Judge: `{metrics['judge']}` (offline, rule-based); "
        "unscorable responses stay in the denominator and are counted.",
        f"- Git commit `{env.get('git_commit')}`{' (uncommitted changes)' if env.get('git_dirty') else ''}, "
        f"jax {env['packages'].get('jax')}, flax {env['packages'].get('flax')}; "
        f"{metrics['elapsed_seconds']} s in this invocation (stages finished by earlier ones were skipped).",
        "",
        "## Summary",
        "",
        "| model | harmful compliance (red-team) | over-refusal (benign) | unscorable responses |",
        "|---|---|---|---|",
    ]
    for model in ("source", "finetuned"):
        overall = safety[model]["overall"]
        lines.append(
            f"| {model} | {_rate_cell(overall['harmful_compliance'])} | {_rate_cell(overall['over_refusal'])} | "
            f"{safety[model]['num_unscorable']} |"
        )

    lines += [
        "",
        "Rates are shares of all responses, with 95% percentile-bootstrap intervals and counts. Unscorable "
        "responses (empty or degenerate text) stay in the denominator as neither compliance nor refusal, so "
        "a change in their number moves both rates: compare the last column before reading a change as safety.",
        "",
        "## Does the safety gain carry beyond the training data?",
        "",
        "Change in harmful compliance, finetuned minus source, paired by prompt (negative = safer).",
        "",
        "| subcategory group | source | finetuned | change |",
        "|---|---|---|---|",
    ]
    for group in ("trained", "filtered_out", "other"):
        lines.append(
            f"| {group} | {_rate_cell(safety['source']['per_group'][group])} | "
            f"{_rate_cell(safety['finetuned']['per_group'][group])} | {_change_cell(change['per_group'][group])} |"
        )

    lines += ["", f"![Harmful compliance per category]({plots['categories']})", "",
              "## Per category", "",
              "| category | harmful compliance: source | finetuned | change | over-refusal: source | finetuned |",
              "|---|---|---|---|---|---|"]
    for category in taxonomy.category_ids():
        s, f = safety["source"]["per_category"][category], safety["finetuned"]["per_category"][category]
        lines.append(
            f"| {category} | {_rate_cell(s['harmful_compliance'])} | {_rate_cell(f['harmful_compliance'])} | "
            f"{_change_cell(change['per_category'][category])} | {_rate_cell(s['over_refusal'])} | {_rate_cell(f['over_refusal'])} |"
        )

    lines += ["", f"![Over-refusal per category]({plots['over_refusal']})", "",
              "## Per subcategory", "",
              "| subcategory | category | group | source | finetuned | change |", "|---|---|---|---|---|---|"]
    for subcategory, row in safety["source"]["per_subcategory"].items():
        f = safety["finetuned"]["per_subcategory"][subcategory]
        lines.append(
            f"| {subcategory} | {row['category']} | {row['group']} | {_rate_cell(row['harmful_compliance'])} | "
            f"{_rate_cell(f['harmful_compliance'])} | {_change_cell(change['per_subcategory'][subcategory])} |"
        )
    lines += ["", f"![Harmful compliance per subcategory]({plots['subcategories']})", ""]

    match = persona["finetuned"].get("signature_match", {})
    lines += [
        "## Ethical persona",
        "",
        "Keyed agreement per dimension: P(yes) / (P(yes) + P(no)) for each statement, reversed for "
        "reverse-keyed statements, averaged over the dimension's statements (95% bootstrap CI).",
        "",
        "| dimension | expected | source | finetuned | shift | sign matches |",
        "|---|---|---|---|---|---|",
    ]
    for dimension, score in persona["source"]["dimensions"].items():
        expected = metrics["expected_signature"][dimension]
        sign = match.get("per_dimension", {}).get(dimension, {}).get("sign_match")
        shift = persona["finetuned"]["shifts"][dimension]
        if sign is None:
            sign_cell = "n/a"
        else:
            sign_cell = "yes" if sign else "no"
        if sign is not None and shift["ci_low"] is not None and shift["ci_low"] <= 0 <= shift["ci_high"]:
            sign_cell += " (CI spans 0)"  # the direction itself is not established
        lines.append(
            f"| {dimension} | {'+' if expected > 0 else '-' if expected < 0 else '0'} | {_score_cell(score)} | "
            f"{_score_cell(persona['finetuned']['dimensions'][dimension])} | "
            f"{_shift_cell(shift)} | {sign_cell} |"
        )
    cosine = match.get("cosine")
    lines += [
        "",
        f"Cosine between the observed shift vector and the expected signature: "
        f"{'undefined' if cosine is None else f'{cosine:+.3f}'}. "
        "Rank of the expected dimension among all shifts (1 = largest): "
        + (", ".join(f"{dim} {rank}" for dim, rank in match.get("own_dimension_rank", {}).items()) or "none expected to rise")
        + ".",
        "",
        f"![Persona profile]({plots['persona']})",
        "",
        "## CAI data",
        "",
        f"{manifest['num_prompts']} prompts, {manifest['num_kept']} revisions kept for SFT "
        f"({manifest.get('num_trimmed', 0)} of them trimmed to their last complete sentence), "
        f"{manifest['num_filtered']} filtered ("
        + (", ".join(f"{reason}: {count}" for reason, count in manifest["filtered_by_reason"].items()) or "none") + ").",
        "",
        "## SFT",
        "",
        f"{metrics.get('sft', {}).get('num_examples', 'n/a')} examples, "
        f"{metrics.get('sft', {}).get('settings', {}).get('num_steps', 'n/a')} optimizer steps of "
        f"{metrics.get('sft', {}).get('settings', {}).get('batch_size', 'n/a')} x "
        f"{metrics.get('sft', {}).get('settings', {}).get('grad_accum_steps', 'n/a')} examples, peak learning rate "
        f"{metrics.get('sft', {}).get('settings', {}).get('learning_rate', 'n/a')}. A handful of steps moves a "
        "model little: read small shifts with that in mind.",
        "",
        "## Files",
        "",
        "- `metrics.json`: every number above; `config.json`, `environment.json`: the resolved config and versions",
        "- `data/scope.json`: prompts each scope kept and dropped, with reasons",
        "- `cai/cai.jsonl`, `cai/dataset/`: every answer, critique and revision; the SFT dataset (`datasets` format)",
        "- `sft/`: Orbax checkpoints, TensorBoard logs; `sft/model/`: the finetuned model",
        "- `eval/<model>/responses.jsonl`: every response with its label; `eval/<model>/persona.jsonl`: P(yes) per statement",
        "",
    ]
    return "\n".join(lines)


def write_report(run_dir: Path, metrics: dict, taxonomy: Taxonomy, env: dict) -> Path:
    """Write plots/*.png and report.md into run_dir; return the report's path."""
    run_dir = Path(run_dir)
    plots_dir = run_dir / PLOTS_DIR
    plots = {
        "categories": plot_rates_by_category(metrics, "harmful_compliance", "Harmful compliance on red-team prompts", plots_dir / "harmful_compliance_by_category.png"),
        "over_refusal": plot_rates_by_category(metrics, "over_refusal", "Over-refusal on benign prompts", plots_dir / "over_refusal_by_category.png"),
        "subcategories": plot_subcategories(metrics, plots_dir / "harmful_compliance_by_subcategory.png"),
        "persona": plot_persona(metrics, plots_dir / "persona.png"),
    }
    report_path = run_dir / "report.md"
    io.atomic_write_text(report_path, render_markdown(metrics, taxonomy, env, plots))
    logger.info("report written to %s", report_path)
    return report_path
