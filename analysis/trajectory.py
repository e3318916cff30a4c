"""Specialization over training: the routing measures at every checkpoint of one model.

    points = specialization_over_training("outputs/run", "moe")      # one entry per checkpoint
    write_trajectory(points, "outputs/run/analysis")                  # trajectory.json + .png

At each kept checkpoint the model routes the run's validation tokens (the same tokens, in the same
order, every time) and each MoE layer gets

- `nmi`, `cmi`: the registered measures (NMI minus its document-null mean, the held-out share of
  H(D|C)), computed exactly as `analysis.report` computes them for the final model;
- `saturation`: OLMoE's router saturation (Muennighoff et al. 2024, sec. 5), the share of each
  token's experts at the final checkpoint that it is already routed to at this one,
  mean over tokens of |E_t(x) ∩ E_final(x)| / |E_final(x)|; 1 at the final checkpoint, about k/E
  for routing unrelated to the final one.

Keep the checkpoints you want to see (`trainer.keep_last` at least max_steps / checkpoint_every).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from analysis.measures import MEASURES, layer_inputs
from analysis.progress import progress
from analysis.recorder import interleave_domains, record_routing
from analysis.report import AnalysisConfig
from analysis.run import require_domains
from moe.checkpoint import CheckpointError, checkpoint_dir, list_checkpoints, load_checkpoint
from moe.data import load_prepared
from moe.loading import model_from_state
from moe.tables import write_json

__all__ = [
    "TRAJECTORY_MEASURES",
    "plot_trajectory",
    "router_saturation",
    "specialization_over_training",
    "write_trajectory",
]

# The registered measures followed over training (the two the verdict reads).
TRAJECTORY_MEASURES = ("nmi", "cmi")


def router_saturation(
    experts_t: np.ndarray, kept_t: np.ndarray, experts_final: np.ndarray, kept_final: np.ndarray
) -> float:
    """Mean over tokens of |E_t ∩ E_final| / |E_final|, E = the token's kept experts.

    experts_* [N, K] int, kept_* [N, K] bool, the same N tokens in the same order. Tokens with no
    kept expert at the final checkpoint are left out; nan if none is left.
    """
    experts_t, experts_final = np.asarray(experts_t), np.asarray(experts_final)
    if experts_t.shape[0] != experts_final.shape[0]:
        raise ValueError(f"saturation compares the same tokens; got {experts_t.shape[0]} and {experts_final.shape[0]}")
    n_experts = int(max(experts_t.max(initial=0), experts_final.max(initial=0))) + 1
    rows = np.arange(experts_t.shape[0])[:, None]
    at_t = np.zeros((experts_t.shape[0], n_experts), dtype=bool)
    at_t[rows, experts_t] = np.asarray(kept_t, dtype=bool)
    final = np.zeros_like(at_t)
    final[rows, experts_final] = np.asarray(kept_final, dtype=bool)
    size = final.sum(axis=1)
    routed = size > 0
    if not routed.any():
        return float("nan")
    return float(np.mean((at_t & final).sum(axis=1)[routed] / size[routed]))


def _tokens_per_step(config: dict[str, Any], world_size: int) -> int:
    t = config["trainer"]
    return int(t["micro_batch_size"]) * int(t["grad_accum_steps"]) * int(config["data"]["seq_len"]) * world_size


def specialization_over_training(
    run_dir: str | Path,
    name: str = "moe",
    cfg: AnalysisConfig | None = None,
    *,
    batch_size: int = 16,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """One entry per kept checkpoint of model `name`, oldest first: {step, tokens_seen, layers:
    [{layer, nmi, cmi (MeasureResult dicts), saturation}]}. cfg: the analysis settings (permutations,
    bootstrap, context, seed) of `analysis.report.AnalysisConfig`."""
    cfg = cfg or AnalysisConfig()
    run_dir = Path(run_dir)
    paths = list_checkpoints(checkpoint_dir(run_dir, name))
    if not paths:
        raise CheckpointError(f"no checkpoint of model {name!r} under {checkpoint_dir(run_dir, name)}")
    data = load_prepared(run_dir)
    require_domains(data.domains, f"the run {run_dir}")
    stream = interleave_domains({d: data.val_batches(batch_size=batch_size, domain=d) for d in data.domains})
    recorded = []
    for path in progress(paths, desc="checkpoints"):
        state = load_checkpoint(path, map_location=device)
        model = model_from_state(state, device)
        recording = record_routing(
            model,
            stream,
            num_domains=len(data.domains),
            domains=data.domains,
            gate_weighted=cfg.gate_weighted,
            keep_records=True,
        )
        if recording.records is None:
            raise RuntimeError("record_routing(keep_records=True) returned no records")
        tokens_seen = int(state["step"]) * _tokens_per_step(state["config"], state["fingerprint"].get("world_size", 1))
        recorded.append((int(state["step"]), tokens_seen, recording, recording.records))
        del model, state
    final = recorded[-1][3]
    points = []
    for step, tokens_seen, recording, records in recorded:
        rngs = np.random.default_rng(cfg.seed).spawn(len(recording.layers))
        layers = []
        for i, (counts, rng) in enumerate(zip(recording.layers, rngs)):
            inputs = layer_inputs(
                counts,
                records,
                i,
                n_permutations=cfg.n_permutations,
                n_bootstrap=cfg.n_bootstrap,
                confidence=cfg.confidence,
                context=cfg.context,
                rng=rng,
            )
            entry: dict[str, Any] = {"layer": i}
            for measure in TRAJECTORY_MEASURES:
                compute = MEASURES[measure].compute
                if compute is None:
                    raise ValueError(f"measure {measure!r} is computed from the model, not from the routing records")
                entry[measure] = compute(inputs).as_dict()
            now, last = records.layers[i], final.layers[i]
            entry["saturation"] = router_saturation(now.experts, now.kept, last.experts, last.kept)
            layers.append(entry)
        points.append({"step": step, "tokens_seen": tokens_seen, "layers": layers})
    return points


def plot_trajectory(points: Sequence[dict[str, Any]], title: str = "") -> Figure:
    """Three panels against tokens seen: NMI − null, the held-out I(D;E|C) share (with intervals)
    and router saturation; one line per MoE layer."""
    fig = Figure(figsize=(12, 3.4), layout="constrained")
    axes = fig.subplots(1, 3)
    x = np.array([p["tokens_seen"] for p in points], dtype=np.float64) / 1e6
    n_layers = len(points[0]["layers"]) if points else 0
    for i in range(n_layers):
        color = f"C{i}"
        for ax, measure in zip(axes[:2], TRAJECTORY_MEASURES):
            entries = [p["layers"][i][measure] for p in points]
            y = np.array([np.nan if e["value"] is None else e["value"] for e in entries])
            lo = np.array([np.nan if e["ci_low"] is None else e["ci_low"] for e in entries])
            hi = np.array([np.nan if e["ci_high"] is None else e["ci_high"] for e in entries])
            ax.plot(x, y, "o-", color=color, ms=3, label=f"layer {i}")
            ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
        axes[2].plot(x, [p["layers"][i]["saturation"] for p in points], "o-", color=color, ms=3, label=f"layer {i}")
    for ax, measure in zip(axes[:2], TRAJECTORY_MEASURES):
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(MEASURES[measure].label)
        ax.set_ylabel(MEASURES[measure].unit)
    axes[2].set_title("router saturation")
    axes[2].set_ylabel("share of final experts already chosen")
    axes[2].set_ylim(0, 1.02)
    for ax in axes:
        ax.set_xlabel("tokens seen (M)")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def write_trajectory(points: Sequence[dict[str, Any]], out_dir: str | Path, title: str = "") -> dict[str, Path]:
    """`trajectory.json` and `trajectory.png` in out_dir (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "trajectory.json", "figure": out / "trajectory.png"}
    write_json(files["json"], list(points), indent=1)
    fig = plot_trajectory(points, title)
    fig.savefig(files["figure"], dpi=110)
    return files
