"""What a neuron file says: how concentrated activation mass is, and how much two rankings agree."""

from __future__ import annotations

from pathlib import Path

import torch

from partinfer.common.neuron_file import NeuronFile
from partinfer.common.output_file import check_output_file
from partinfer.profiler.plotting import png_axes

COVERAGE_FRACTIONS = (0.1, 0.2, 0.4, 0.7)


def coverage_curve(nf: NeuronFile, layer: int) -> torch.Tensor:
    """[n] share of the layer's activation mass (sum |a|) covered by its top-k neurons, k = 1..n."""
    mass = torch.sort(nf.sum_abs[layer], descending=True).values
    return (mass.cumsum(0) / mass.sum().clamp(min=1e-30)).float()


def coverage(nf: NeuronFile, fractions=COVERAGE_FRACTIONS) -> list[dict[float, float]]:
    """Per layer: fraction of neurons -> share of activation mass they carry."""
    out = []
    for layer in range(nf.n_layers):
        curve = coverage_curve(nf, layer)
        n = curve.shape[0]
        out.append({f: float(curve[max(1, round(f * n)) - 1]) for f in fractions})
    return out


def top_overlap(a: NeuronFile, b: NeuronFile, fraction: float) -> list[float]:
    """Per layer: |top-k(a) ∩ top-k(b)| / k with k = round(fraction * n)."""
    out = []
    for layer in range(a.n_layers):
        n = a.sum_abs[layer].shape[0]
        k = max(1, round(fraction * n))
        sa = set(a.rank(layer)[:k].tolist())
        sb = set(b.rank(layer)[:k].tolist())
        out.append(len(sa & sb) / k)
    return out


def plot_coverage(files: dict[str, NeuronFile], out: Path, inputs: tuple[Path, ...] = ()) -> Path:
    """Coverage curves (mean over layers, and min/max band) for each file, written as a PNG (a new
    path, or an earlier `neurons show` plot: common.output_file)."""
    check_output_file(out, "neurons show", inputs=inputs)
    with png_axes(out, "neurons show", "fraction of neurons (ranked by mean |a|)", "share of activation mass") as ax:
        for name, nf in files.items():
            curves = torch.stack([coverage_curve(nf, i) for i in range(nf.n_layers)])  # [L, n]
            x = torch.arange(1, curves.shape[1] + 1) / curves.shape[1]
            ax.plot(x, curves.mean(0), label=f"{name} (mean over layers)")
            ax.fill_between(x, curves.min(0).values, curves.max(0).values, alpha=0.2)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="uniform")
    return Path(out)


def format_show(paths: list[Path], files: list[NeuronFile], gamma: float) -> str:
    lines = []
    for path, nf in zip(paths, files):
        lines.append(f"{path}: {nf.level}-level, model {nf.model} ({nf.fingerprint}), data {', '.join(nf.datasets)}, "
                     f"{nf.sequences} sequences, {nf.tokens} tokens ({nf.gen_tokens} generated per prompt), "
                     f"ranked by {'mean |a| · ‖down‖' if nf.rank_by == 'contribution' else 'mean |a|'}")
        cov = coverage(nf)
        head = "".join(f"{f'top {int(f * 100)}%':>10}" for f in COVERAGE_FRACTIONS)
        lines.append(f"{'layer':>6}{head}   (share of activation mass)")
        for i, c in enumerate(cov):
            lines.append(f"{i:>6}" + "".join(f"{c[f]:>10.1%}" for f in COVERAGE_FRACTIONS))
        mean = {f: sum(c[f] for c in cov) / len(cov) for f in COVERAGE_FRACTIONS}
        lines.append(f"{'mean':>6}" + "".join(f"{mean[f]:>10.1%}" for f in COVERAGE_FRACTIONS))
    if len(files) == 2:
        ov = top_overlap(files[0], files[1], gamma)
        lines.append(f"overlap of top {gamma:.0%} neurons per layer: " + " ".join(f"{o:.2f}" for o in ov)
                     + f"  (mean {sum(ov) / len(ov):.3f})")
    return "\n".join(lines)
