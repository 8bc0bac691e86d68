"""The report's figures (seaborn): one function per figure, each taking its tables explicitly
and returning the path it wrote.

All figures are 8 x 4.5 in at 120 dpi (960 x 540 px), readable at README width; LoRA is always
blue and QLoRA orange. MB = 2**20 bytes, as in the stages that measured it.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI or in `dvc repro`
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from qlora_diag.core.schemas import quant_config_key  # noqa: E402

FIGSIZE = (8, 4.5)
DPI = 120
PALETTE = {"LoRA": "#1f77b4", "QLoRA": "#ff7f0e"}
METHOD_LABEL = {"lora": "LoRA", "qlora": "QLoRA"}
# Short legend labels of the quantization.json configurations.
CONFIG_LABEL = {"nf4": "NF4", "nf4_dq": "NF4 + DQ", "fp4": "FP4", "fp4_dq": "FP4 + DQ"}
# Value labels inside a heatmap stay legible up to about this many layers at 8 in wide.
MAX_ANNOTATED_LAYERS = 12

FIGURES = ("memory.png", "rank_threshold.png", "weight_similarity_heatmap.png",
           "module_sensitivity.png", "quantization_error.png", "loss_curves.png")


@contextlib.contextmanager
def _figure(ncols: int, out: Path, title: str, sharex: bool = False):
    """A styled figure with ``ncols`` axes, saved to ``out`` and closed on exit."""
    # No offset notation ("+1.08e1" above the axis): losses close together stay readable.
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.8), \
            plt.rc_context({"axes.formatter.useoffset": False}):
        fig, axes = plt.subplots(1, ncols, figsize=FIGSIZE, sharex=sharex, squeeze=False)
        try:
            yield fig, list(axes[0])
            fig.suptitle(title, fontsize=11)
            fig.tight_layout()
            out.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(out, dpi=DPI)
        finally:
            plt.close(fig)


def _by_method(df: pd.DataFrame, id_col: str, columns: dict[str, str], value: str) -> pd.DataFrame:
    """Long form: ``{column of df: method label}`` -> rows (id_col, method, value)."""
    long = df[[id_col, *columns]].melt(id_vars=id_col, var_name="method", value_name=value)
    return long.assign(method=long["method"].map(columns))


def _legend_on_top(ax, ncol: int) -> None:
    """Legend in a band above the tallest bar (the y range grows by a quarter to make room)."""
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * 1.25)
    ax.legend(title=None, loc="upper center", ncol=ncol, fontsize=8, frameon=False)


def _bar_labels(ax, fmt: str) -> None:
    for container in ax.containers:
        ax.bar_label(container, fmt=fmt, fontsize=7, padding=1)


def plot_memory(ranks: pd.DataFrame, memory_measure: str, out: Path) -> Path:
    """Per rank: weight memory and training peak memory, LoRA vs QLoRA."""
    with _figure(2, out, "Memory per rank: LoRA vs QLoRA") as (fig, (ax_w, ax_p)):
        w = _by_method(ranks, "rank", {"weights_mb_lora": "LoRA", "weights_mb_qlora": "QLoRA"},
                       "mb")
        sns.barplot(w, x="rank", y="mb", hue="method", palette=PALETTE, ax=ax_w)
        ax_w.set(xlabel="LoRA rank r", ylabel="MB",
                 title="Weights of the loaded model\n(parameters + buffers, adapter included)")
        _bar_labels(ax_w, "%.0f")
        p = _by_method(ranks, "rank", {"peak_mem_mb_lora": "LoRA", "peak_mem_mb_qlora": "QLoRA"},
                       "mb")
        sns.barplot(p, x="rank", y="mb", hue="method", palette=PALETTE, ax=ax_p)
        ax_p.set(xlabel="LoRA rank r", ylabel="MB",
                 title=f"Peak during training\n({memory_measure})")
        ax_p.title.set_fontsize(8)
        _bar_labels(ax_p, "%.0f")
        for ax in (ax_w, ax_p):
            _legend_on_top(ax, ncol=2)
    return out


def _gap_bars(ax, x, gaps: pd.DataFrame, margin: float) -> None:
    """Paired gaps with their 95 % interval bars inside the ±margin band; intervals over seeds
    filled, over the eval examples of one seed (omitting seed noise) open."""
    ax.axhspan(-margin, margin, color="0.85", label=f"± margin {margin:g}")
    ax.axhline(0, color="0.4", lw=0.8)
    x = np.asarray(x, dtype=float)
    for over, face, label in (("seeds", PALETTE["QLoRA"], "gap, 95 % interval over seeds"),
                              ("examples", "white", "gap, 95 % interval over examples\n"
                                                    "(1 seed: no seed noise)")):
        sel = (gaps["over"] == over).to_numpy()
        if not sel.any():
            continue
        est = gaps["estimate"].to_numpy(float)[sel]
        err = [est - gaps["low"].to_numpy(float)[sel], gaps["high"].to_numpy(float)[sel] - est]
        ax.errorbar(x[sel], est, yerr=err, fmt="o", color=PALETTE["QLoRA"], mfc=face,
                    capsize=4, label=label)


def _gap_legend(ax) -> None:
    """The gap panel's legend in a band above the data (the y range grows to make room)."""
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.6 * (hi - lo))
    ax.legend(loc="upper center", fontsize=6.5, frameon=False)


def plot_rank_threshold(ranks: pd.DataFrame, gaps: pd.DataFrame, margin: float,
                        cos_threshold: float, noise_floor_cos_sim: float, lora_r: int,
                        out: Path) -> Path:
    """Left: paired eval-loss gap per rank (``gaps``: rank, estimate, low, high) with its 95 %
    interval and the ±margin band. Right: cos(ΔW) and greedy token match vs rank, with the H1
    threshold and the same-method cosine noise floor."""
    d = ranks.sort_values("rank")
    g = gaps.sort_values("rank")
    with _figure(2, out, "Rank threshold (H3): QLoRA − LoRA per rank") as (fig, (ax_g, ax_s)):
        _gap_bars(ax_g, g["rank"].to_numpy(float), g, margin)
        ax_g.set(xscale="log", xlabel=f"LoRA rank r (log scale; seeds pooled at r={lora_r}, one "
                                      "seed elsewhere)",
                 ylabel="Δ eval loss (nats/token)", title="Paired gap vs the margin")
        ax_s.plot(d["rank"], d["cos_sim_mean"], "o-", color="#2ca02c",
                  label="cos(ΔW) LoRA vs QLoRA, same seed")
        ax_s.plot(d["rank"], d["token_match_rate"], "s-", color="#9467bd",
                  label="greedy token match rate")
        ax_s.axhline(cos_threshold, color="#d62728", ls="--", lw=1,
                     label=f"H1 threshold θ = {cos_threshold:.2f}")
        ax_s.axhline(noise_floor_cos_sim, color="0.3", ls=":", lw=1.2,
                     label=f"cos(ΔW) noise floor, other seed ({noise_floor_cos_sim:.2f})")
        ax_s.set(xscale="log", xlabel="LoRA rank r (log scale)", ylabel="similarity (0–1)",
                 ylim=(0, 1.05), title="Weight vs output similarity")
        for ax in (ax_g, ax_s):
            ax.set_xticks(list(d["rank"]), [str(int(r)) for r in d["rank"]])
            ax.minorticks_off()
        _gap_legend(ax_g)
        ax_s.legend(fontsize=7, loc="best")
    return out


def plot_weight_similarity_heatmap(layers: pd.DataFrame, out: Path) -> Path:
    """cos(ΔW_LoRA, ΔW_QLoRA) per layer (x) and module (y) of the headline pair."""
    grid = layers.pivot_table(index="module", columns="layer", values="cos_sim", sort=True)
    annotate = grid.shape[1] <= MAX_ANNOTATED_LAYERS
    with _figure(1, out, "Weight similarity per layer and module (headline pair, same seed)") \
            as (fig, (ax,)):
        sns.heatmap(grid, vmin=0, vmax=1, cmap="viridis", annot=annotate, fmt=".2f",
                    annot_kws={"fontsize": 7}, ax=ax,
                    cbar_kws={"label": "cos(ΔW_LoRA, ΔW_QLoRA)"})
        ax.set(xlabel="layer index", ylabel="adapted module")
        ax.tick_params(axis="y", rotation=0)
    return out


def plot_module_sensitivity(modules: pd.DataFrame, gaps: pd.DataFrame, margin: float,
                            lora_r: int, out: Path) -> Path:
    """Per target preset: paired eval-loss gap with its 95 % interval (``gaps``: targets,
    estimate, low, high) in the ±margin band, quality drop %, KL."""
    d = modules.assign(targets=modules["targets"].astype(str))
    g = gaps.set_index("targets").loc[list(d["targets"])].reset_index()
    with _figure(3, out, f"Module sensitivity (H2) at rank {lora_r}") as (fig, axes):
        ax_g, ax_q, ax_k = axes
        _gap_bars(ax_g, np.arange(len(g)), g, margin)
        ax_g.set_xticks(np.arange(len(g)), list(g["targets"]))
        ax_g.set(xlabel="target preset", ylabel="Δ eval loss (nats/token)",
                 title="Paired gap QLoRA − LoRA", xlim=(-0.5, len(g) - 0.5))
        _gap_legend(ax_g)
        sns.barplot(d, x="targets", y="quality_drop_pct", color="#8c564b", ax=ax_q)
        ax_q.axhline(0, color="0.4", lw=0.8)
        ax_q.set(xlabel="target preset", ylabel="quality drop (%)", title="Quality drop")
        sns.barplot(d, x="targets", y="kl_mean", color="#17becf", ax=ax_k)
        ax_k.set(xlabel="target preset", ylabel="KL (nats/token)",
                 title="KL divergence LoRA vs QLoRA\n(next-token distributions)")
        for ax in axes:
            ax.tick_params(axis="x", rotation=30)
    return out


def plot_quantization_error(quant_table: pd.DataFrame, out: Path) -> Path:
    """Mean relative error of W per module type under NF4/FP4 with and without double
    quantization (error bars: one standard deviation over layers)."""
    d = quant_table.assign(config=[CONFIG_LABEL[quant_config_key(t, bool(dq))]
                                   for t, dq in zip(quant_table["quant_type"],
                                                    quant_table["double_quant"])])
    order = [c for c in CONFIG_LABEL.values() if c in set(d["config"])]
    palette = dict(zip(CONFIG_LABEL.values(), ["#1b9e77", "#66c2a5", "#d95f02", "#fc8d62"]))
    title = "Quantization error of the frozen weights per module type"
    with _figure(1, out, title) as (fig, (ax,)):
        sns.barplot(d, x="module", y="rel_frob_error", hue="config", hue_order=order,
                    palette=palette, errorbar="sd", ax=ax)
        ax.set(xlabel="module type", ylabel="‖W − deq(Q(W))‖_F / ‖W‖_F  (relative error)")
        _legend_on_top(ax, ncol=4)
        ax.tick_params(axis="x", rotation=20)
    return out


def load_loss_curves(run_dirs: dict[str, Path], runs: dict[str, dict]) -> pd.DataFrame:
    """dvclive curves ``plots/metrics/{train,eval}/loss.tsv`` of ``{run name: run dir}``, as
    rows ``run, method, seed, split, step, loss``; method and seed come from each run's
    ``run.json`` in ``runs`` (``{run name: run.json}``)."""
    frames = []
    for name, folder in run_dirs.items():
        method, seed = runs[name]["method"], runs[name]["seed"]
        for split in ("train", "eval"):
            tsv = folder / "plots" / "metrics" / split / "loss.tsv"
            df = pd.read_csv(tsv, sep="\t")
            frames.append(df[["step", "loss"]].assign(run=name, method=METHOD_LABEL[method],
                                                      seed=f"seed {seed}", split=split))
    return pd.concat(frames, ignore_index=True)


def plot_loss_curves(curves: pd.DataFrame, lora_r: int, out: Path) -> Path:
    """Train and eval loss vs optimizer step for each run in ``curves`` (see
    :func:`load_loss_curves`)."""
    with _figure(2, out, f"Loss curves: headline and seed runs at rank {lora_r}") as (fig, axes):
        for ax, split, title in zip(axes, ("train", "eval"),
                                    ("Train loss (per step)", "Eval loss (whole eval split)")):
            d = curves[curves["split"] == split]
            sns.lineplot(d, x="step", y="loss", hue="method", style="seed", palette=PALETTE,
                         markers=split == "eval", dashes=True, lw=1.2, ax=ax)
            ax.set(xlabel="optimizer step", ylabel="loss (nats/token, response tokens)",
                   title=title)
            ax.legend(fontsize=7)
    return out


def make_figures(*, out_dir: Path, ranks: pd.DataFrame, modules: pd.DataFrame,
                 layers: pd.DataFrame, quant_table: pd.DataFrame, curves: pd.DataFrame,
                 rank_gaps: pd.DataFrame, preset_gaps: pd.DataFrame, margin: float,
                 cos_threshold: float, noise_floor_cos_sim: float,
                 memory_measure: str, lora_r: int) -> dict[str, Path]:
    """Write every figure of :data:`FIGURES` into ``out_dir``; ``{file name: path}``.
    ``rank_gaps`` / ``preset_gaps``: :func:`~qlora_diag.report.paired.gap_table` of the paired
    comparisons per rank / preset."""
    out_dir = Path(out_dir)
    paths = [
        plot_memory(ranks, memory_measure, out_dir / "memory.png"),
        plot_rank_threshold(ranks, rank_gaps, margin, cos_threshold, noise_floor_cos_sim,
                            lora_r, out_dir / "rank_threshold.png"),
        plot_weight_similarity_heatmap(layers, out_dir / "weight_similarity_heatmap.png"),
        plot_module_sensitivity(modules, preset_gaps, margin, lora_r,
                                out_dir / "module_sensitivity.png"),
        plot_quantization_error(quant_table, out_dir / "quantization_error.png"),
        plot_loss_curves(curves, lora_r, out_dir / "loss_curves.png"),
    ]
    return {p.name: p for p in paths}
