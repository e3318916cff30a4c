"""Analyze a trained MoE model end to end: record routing, measure, knock out, probe, judge, report.

    summary = analyze_model(model, val_batches, domains, out_dir, dense_twin=twin, cfg=AnalysisConfig())

`val_batches` maps each domain name to its validation batches (`PreparedData.val_batches(batch_size=..,
domain=name)`); `domains` lists the names in domain-id order. Writes into `out_dir`:

    report.md       the verdict, per-layer tables and the thresholds used
    summary.json    every number (below); notebooks and the sweep aggregator read it
    routing.npz     raw per-token routing records (`analysis.records.RoutingRecords.load`)
    figures/*.png   domain_expert, nmi, knockout, cka, loss (`analysis.plots`)

summary.json (and the returned dict), format_version 2. Units: bits for information, nats per token
for losses. `null` = not measured or undefined (a nan). Keys are stable; new keys may be added.

    format_version        2
    domains               [G] domain names; domain ids index this list
    model                 {router, blocks, num_moe_layers, num_experts, top_k, vocab_size}, plus the
                          `model_info` argument's entries (a pretrained HF model: name, family,
                          model_type, router (its routing rule), shared_experts, num_layers,
                          total_params, dtype, transformers)
    config                AnalysisConfig as a dict (incl. thresholds)
    tokens                {recorded, per_domain: {domain: n}, documents_per_domain: {domain: m},
                           knockout_per_domain: {domain: n} | null, probe: n | null}
    data_splits           null, or {split: {domain: {tokens, documents}}} of the data the model
                          trained and is evaluated on (`analyze_run` reads it from the run's manifest)
    data_warnings         [str]: the data manifest's warnings (e.g. fewer validation documents than
                          data.min_val_docs_per_domain), repeated at the top of the report
    comparison            {model name: {domain: loss}}: "moe" and (with a twin) "dense_twin" measured
                          on the full validation set here, plus any entries of the `comparison` argument
    knockout              null, {skipped: reason}, or {base_loss: {domain: loss}, dense_base_loss | null,
                           intervention: {expert, dense}, documents_per_domain}
    verdict               {verdict, rule, counts: {specialist, ensemble, inconclusive}}: the model's
    layers                [L] per MoE layer (depth order), each:
      layer, block                  MoE-layer index and block index in the model
      tokens, assignments, assignments_per_token, weighting ("count" | "gate")
      domain_expert_counts          [G][E] kept assignments (unweighted)
      domain_specialization         [G][E] share of domain d's tokens routed to e (OLMoE); uniform_share = k/E
      coactivation                  {matrix [E][E] P(j|i), null = (k-1)/(E-1), max_offdiag,
                                     mean_abs_deviation = mean |P(j|i) - null| off the diagonal}
      router_entropy_bits           {mean, max = log2 E}
      measures                      {name: {value, ci_low, ci_high, null_mean, p_value, **details}} for every
                                    measure of `analysis.registry.MEASURES` (defined in `analysis.measures`):
        nmi        value = NMI - null mean; interval: bias-corrected percentile, domain-stratified
                   document bootstrap; p: document permutation; details plugin, corrected, plugin_ci_low/high,
                   confidence, null_q95, n_docs, docs_per_domain [G], n_permutations, n_bootstrap
        cmi        value = held-out I(D;E|C) / H(D|C) (`analysis.heldout`) with its document-bootstrap
                   interval and p; details context, bits, bits_ci_low/high, h_domain_given_context_bits,
                   assignments_scored, n_folds, n_bootstrap, plugin_token_bits (the biased plug-in I(D;E|T),
                   for reference: a random router scores > 0), plugin_token_corrected_bits
        mi_domain  I(D;E) bits; details corrected (Miller-Madow), entropy_domain_bits (H(D))
        mi_token   I(T;E) bits; details corrected
        vocabulary OLMoE vocabulary specialization, null k/E; details min_count
        consecutive adjacent tokens of one document sharing the top-1 expert, null sum_e p_e^2; details pairs
        maxvio     load imbalance; details counts [E], batch_mean, entropy_bits, entropy_max_bits
        knockout   value = median over experts of the percentile among damage-matched dense groups
                   (null 0.5); details damage, damage_se [G][E], mean_damage [E], cv [E], cv_lower [E],
                   percentile [E], expert_p_value [E], n_matched [E] (null without a twin), dense_damage [G][U],
                   dense_mean_damage [U], dense_cv [U], dense_group_size [U] (U dense groups), dense_cv_median,
                   top1_damage {domain: nats}; value null when knockouts did not run
        cka        mean off-diagonal linear CKA; details matrix [E][E]; value null without probes
      verdict                       {verdict, rule, notes, criteria: {nmi|cmi|knockout|cka:
                                     {name, verdict, value, threshold, reason, votes}}}
    files                 {report, summary, records | null, figures: {name: "figures/<name>.png"}}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from analysis.information import entropy
from analysis.knockout import (
    INTERVENTIONS,
    KnockoutResult,
    dense_group_knockouts,
    domain_losses,
    expert_knockouts,
    knockout_cost,
    top1_knockouts,
)
from analysis.knockout_stats import heterogeneity, matched_comparison
from analysis.measures import cka_result, knockout_result, measure_layer
from analysis.paths import MODES as PATH_MODES
from analysis.paths import path_information
from analysis.plots import save_figures
from analysis.probe_information import probe_domain_information
from analysis.probes import capture_layer_inputs, expert_cka, mean_offdiagonal
from analysis.progress import progress_bars
from analysis.recorder import interleave_domains, record_routing, take_tokens
from analysis.records import RoutingRecords
from analysis.registry import MEASURES, MeasureResult
from analysis.verdict import LayerEvidence, VerdictThresholds, judge_layer, judge_model
from moe.data.batch import Batch
from moe.model import LanguageModel
from moe.protocols import RoutedModel, moe_block_indices
from moe.tables import format_number, markdown_table, to_jsonable, write_json

__all__ = [
    "SUMMARY_FORMAT_VERSION",
    "AnalysisConfig",
    "analysis_cost",
    "analyze_model",
    "describe_cost",
    "render_report",
]

SUMMARY_FORMAT_VERSION = 2


@dataclass
class AnalysisConfig:
    """Knobs of `analyze_model` (Hydra: the `analysis` node). Plain fields only."""

    # Replicates of the document-permutation null of the NMI.
    n_permutations: int = 200
    # Domain-stratified document-bootstrap replicates of the NMI and held-out I(D;E|C) intervals
    # (the latter at least 200), and their confidence level.
    n_bootstrap: int = 200
    confidence: float = 0.95
    # What the held-out I(D;E|C) conditions on: "token" (the token id) or "bigram" (the token and
    # the previous token: also rules out routing keyed on the previous token).
    context: str = "token"
    # Validation tokens per domain evaluated by every knockout; the knockouts cost
    # (L*E + L + 1) evaluations of G*knockout_tokens tokens, and the twin's L*U + 1 (U dense groups).
    knockout_tokens: int = 4096
    # The dense control: per layer, random groups of round(a*hidden/E) hidden units (hidden: the
    # dense FFN's width) for each a, each drawn `dense_group_replicates` times (U = len * replicates
    # groups per layer); experts are compared with the groups whose mean damage lies within a
    # factor `damage_match_factor`.
    dense_group_sizes: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    dense_group_replicates: int = 4
    damage_match_factor: float = 2.0
    # Probe tokens (all domains together) on which every expert runs for the CKA matrix.
    probe_tokens: int = 2048
    # Validation tokens (all domains together) whose router inputs train and score the held-out
    # linear probe of the domain (`probe_info`, with `probes`), cross-fitted over documents.
    probe_info_tokens: int = 32768
    # I(D; path) of each token's sequence of experts across the MoE layers (summary["paths"]):
    # top-1 paths and kept-expert-set paths; needs two or more MoE layers.
    paths: bool = True
    # Weight information tables by gate values instead of one count per kept assignment.
    gate_weighted: bool = False
    knockouts: bool = True
    probes: bool = True
    # Write routing.npz with the raw per-token records.
    save_records: bool = True
    # Re-batch the validation rows so every batch mixes the domains as the training stream does;
    # batch-level routers (expert choice, capacity limits) would otherwise see single-domain batches.
    mix_domains: bool = True
    seed: int = 0
    thresholds: VerdictThresholds = field(default_factory=VerdictThresholds)
    # Progress bars of recording and knockouts: None = when stderr is a terminal (or MOE_PROGRESS=1/0).
    progress: bool | None = None


# ----------------------------------------------------------------------------- pipeline
def _check_inputs(model: RoutedModel, val_batches: Mapping[str, Sequence[Batch]], domains: Sequence[str]) -> None:
    if not getattr(model, "moe_layers", None):
        raise ValueError("analyze_model needs an MoE model (model.moe_layers is empty)")
    unknown = sorted(set(val_batches) - set(domains))
    if unknown:
        raise ValueError(f"val_batches has domains {unknown} not in domains={list(domains)}")
    if not any(len(b) for b in val_batches.values()):
        raise ValueError("val_batches holds no batches")
    for name, batches in val_batches.items():
        want = list(domains).index(name)
        for b in batches:
            if not bool((b.domain == want).all()):
                raise ValueError(f"a batch under {name!r} carries domain ids other than {want}")


def _stream(val_batches: Mapping[str, Sequence[Batch]], per_domain_tokens: int | None, mix: bool) -> list[Batch]:
    parts = {
        n: (take_tokens(b, per_domain_tokens) if per_domain_tokens else list(b))
        for n, b in val_batches.items()
        if len(b)
    }
    return interleave_domains(parts) if mix else [b for batches in parts.values() for b in batches]


def _by_domain(values: np.ndarray, domains: Sequence[str]) -> dict[str, float]:
    return {d: float(v) for d, v in zip(domains, values)}


def _knockout_entries(
    moe: KnockoutResult, top1: KnockoutResult, dense: KnockoutResult | None, domains: Sequence[str], factor: float
) -> list[dict[str, Any]]:
    """Per layer: the experts' damage with its se, their noise-corrected damage CV (0: every domain
    hurt alike, 1: one domain only) and, with a twin, each expert's percentile and p-value among
    the same layer's dense groups of matched damage (`analysis.knockout.matched_comparison`)."""
    het = heterogeneity(moe.damage, moe.damage_se)
    matched = (
        None
        if dense is None
        else matched_comparison(moe.damage, moe.damage_se, dense.damage, dense.damage_se, factor=factor)
    )
    dense_het = None if dense is None else heterogeneity(dense.damage, dense.damage_se)
    dense_sizes = None if dense is None else dense.group_size
    out = []
    for l in range(moe.damage.shape[0]):
        pct = None if matched is None else matched.percentile[l]
        entry = {
            "damage": moe.damage[l],
            "damage_se": moe.damage_se[l],
            "mean_damage": het.mean_damage[l],
            "cv": het.cv[l],
            "cv_lower": het.cv_lower[l],
            "percentile": pct,
            "expert_p_value": None if matched is None else matched.p_value[l],
            "n_matched": None if matched is None else matched.n_matched[l],
            "dense_damage": None if dense is None else dense.damage[l],
            "dense_mean_damage": None if dense_het is None else dense_het.mean_damage[l],
            "dense_cv": None if dense_het is None else dense_het.cv[l],
            "dense_group_size": None if dense_sizes is None else dense_sizes[l],
            "dense_cv_median": (
                float(np.nanmedian(dense_het.cv[l]))
                if dense_het is not None and np.isfinite(dense_het.cv[l]).any()
                else None
            ),
            "top1_damage": _by_domain(top1.damage[l], domains),
        }
        out.append(entry)
    return out


def _evidence(index: int, layer: Mapping[str, Any]) -> LayerEvidence:
    m = layer["measures"]
    nmi, cmi, ko = m["nmi"], m["cmi"], m.get("knockout") or {}
    pct = ko.get("percentile")
    return LayerEvidence(
        layer=index,
        nmi_excess=nmi["value"],
        nmi_excess_ci_low=nmi["ci_low"],
        nmi_excess_ci_high=nmi["ci_high"],
        nmi_p_value=nmi["p_value"],
        cmi_share=cmi["value"],
        cmi_share_ci_low=cmi["ci_low"],
        cmi_share_ci_high=cmi["ci_high"],
        cmi_p_value=cmi["p_value"],
        h_domain_given_context=cmi.get("h_domain_given_context_bits"),
        knockout_percentiles=None if pct is None else [np.nan if x is None else float(x) for x in pct],
        cka_mean_offdiag=(m.get("cka") or {}).get("value"),
    )


def analysis_cost(
    model: RoutedModel, val_batches: Mapping[str, Sequence[Batch]], cfg: AnalysisConfig, has_twin: bool
) -> dict[str, dict[str, int]]:
    """What `analyze_model` will run, before it runs: per stage {"passes": forward passes of one
    batch (whole, or from a knocked block on), "blocks": transformer blocks they evaluate (one
    batch through one block each), "tokens": tokens they process}. Stages: recording (each
    validation batch once), twin_loss, knockouts (experts and top-1: L*E + L interventions and two
    intact passes of the knockout stream, `analysis.knockout.knockout_cost`), dense_knockouts (L*U
    of the twin, U groups per layer, and an intact pass), probes (expert CKA) and probe_info (the
    router inputs of the domain probe)."""
    n_blocks = len(model.blocks)
    stream = _stream(val_batches, None, cfg.mix_domains)
    tokens = sum(b.num_tokens for b in stream)
    cost = {"recording": {"passes": len(stream), "blocks": len(stream) * n_blocks, "tokens": tokens}}
    if has_twin:
        cost["twin_loss"] = dict(cost["recording"])
    knocked = moe_block_indices(model) if model.moe_layers else []
    n_experts = model.moe_layers[0].router.num_experts if knocked else 0
    if cfg.knockouts:
        ko = _stream(val_batches, cfg.knockout_tokens, cfg.mix_domains)
        ko_tokens = sum(b.num_tokens for b in ko)

        def stage(*tables: tuple[int, int]) -> dict[str, int]:
            passes, blocks = (sum(t[i] for t in tables) for i in (0, 1))
            return {"passes": passes * len(ko), "blocks": blocks * len(ko), "tokens": passes * ko_tokens}

        resumes = isinstance(model, LanguageModel)
        cost["knockouts"] = stage(
            knockout_cost(n_blocks, knocked, n_experts, resumes), knockout_cost(n_blocks, knocked, 1, resumes)
        )
        if has_twin:
            units = len(cfg.dense_group_sizes) * cfg.dense_group_replicates
            cost["dense_knockouts"] = stage(knockout_cost(n_blocks, knocked, units, True))
    if cfg.probes:
        per_domain = max(1, math.ceil(cfg.probe_tokens / max(len(val_batches), 1)))
        cost["probes"] = _passes_until(_stream(val_batches, per_domain, cfg.mix_domains), cfg.probe_tokens, n_blocks)
        cost["probe_info"] = _passes_until(
            _stream(val_batches, max(1, math.ceil(cfg.probe_info_tokens / max(len(val_batches), 1))), cfg.mix_domains),
            cfg.probe_info_tokens,
            n_blocks,
        )
    return cost


def _passes_until(batches: Sequence[Batch], max_tokens: int, n_blocks: int) -> dict[str, int]:
    """{"passes", "blocks", "tokens"} of whole forward passes over `batches` until `max_tokens`
    tokens are seen (as `analysis.probes.capture_layer_inputs` runs them)."""
    passes, seen = 0, 0
    for batch in batches:
        if seen >= max_tokens:
            break
        passes, seen = passes + 1, seen + batch.num_tokens
    return {"passes": passes, "blocks": passes * n_blocks, "tokens": seen}


def describe_cost(cost: Mapping[str, Mapping[str, int]]) -> str:
    """One line: the total forward passes, block evaluations and tokens, then each stage's passes."""
    passes = sum(c["passes"] for c in cost.values())
    blocks = sum(c["blocks"] for c in cost.values())
    tokens = sum(c["tokens"] for c in cost.values())
    parts = ", ".join(f"{name.replace('_', ' ')} {c['passes']:,}" for name, c in cost.items())
    return (
        f"analysis cost: {passes:,} forward passes of a batch ({blocks:,} batch x block evaluations; knockouts "
        f"start at the knocked block) over {tokens:,} tokens ({parts})"
    )


def analyze_model(
    model: RoutedModel,
    val_batches: Mapping[str, Sequence[Batch]],
    domains: Sequence[str],
    out_dir: str | Path,
    *,
    dense_twin: LanguageModel | None = None,
    comparison: Mapping[str, Mapping[str, float]] | None = None,
    cfg: AnalysisConfig | None = None,
    model_info: Mapping[str, Any] | None = None,
    data_splits: Mapping[str, Mapping[str, Mapping[str, int]]] | None = None,
    data_warnings: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Measure specialization of `model`'s MoE layers and write the report into `out_dir`.

    Args:
        model: a trained MoE `LanguageModel` (on any device; left in its original mode).
        val_batches: domain name -> its validation batches (each batch of that domain only).
        domains: all domain names in domain-id order.
        out_dir: created if needed; receives report.md, summary.json, routing.npz, figures/.
        dense_twin: the matched dense `LanguageModel`; enables the knockout control and its loss.
        comparison: extra per-domain losses to show, model name -> {domain: nats}.
        cfg: `AnalysisConfig` (defaults if None).
        model_info: extra entries of summary["model"], overriding the defaults (e.g. "router").
        data_splits: {split: {domain: {"tokens": n, "documents": m}}} of the data, for the report.
        data_warnings: what preparing the data warned about (e.g. too few validation documents).
    Returns the summary dict (the content of summary.json; keys in the module docstring).
    """
    cfg = cfg or AnalysisConfig()
    domains = list(domains)
    _check_inputs(model, val_batches, domains)
    print(describe_cost(analysis_cost(model, val_batches, cfg, dense_twin is not None)), flush=True)
    with progress_bars(cfg.progress):
        return _analyze_model(
            model,
            val_batches,
            domains,
            out_dir,
            dense_twin=dense_twin,
            comparison=comparison,
            cfg=cfg,
            model_info=model_info,
            data_splits=data_splits,
            data_warnings=data_warnings,
        )


def _analyze_model(
    model: RoutedModel,
    val_batches: Mapping[str, Sequence[Batch]],
    domains: list[str],
    out_dir: str | Path,
    *,
    dense_twin: LanguageModel | None,
    comparison: Mapping[str, Mapping[str, float]] | None,
    cfg: AnalysisConfig,
    model_info: Mapping[str, Any] | None,
    data_splits: Mapping[str, Mapping[str, Mapping[str, int]]] | None,
    data_warnings: Sequence[str] | None,
) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_dom = len(domains)

    stream = _stream(val_batches, None, cfg.mix_domains)
    recording = record_routing(
        model, stream, num_domains=n_dom, domains=domains, gate_weighted=cfg.gate_weighted, keep_records=True
    )
    loss_tokens = recording.loss_tokens
    if loss_tokens is None:  # record_routing always sums the losses
        raise RuntimeError("record_routing returned a recording without losses")
    # One stream per layer, then one for the cross-layer paths and one for the probes (spawned children
    # are numbered, so the layers' streams do not depend on how many follow them).
    *rngs, path_rng, probe_rng = np.random.default_rng(cfg.seed).spawn(len(recording.layers) + 2)
    layers = []
    for i, (counts, rng) in enumerate(zip(recording.layers, rngs)):
        measured = measure_layer(
            counts,
            recording.records,
            i,
            n_permutations=cfg.n_permutations,
            n_bootstrap=cfg.n_bootstrap,
            confidence=cfg.confidence,
            context=cfg.context,
            rng=rng,
        )
        measured["measures"].update(
            knockout=knockout_result(None).as_dict(),
            cka=cka_result(None, math.nan).as_dict(),
            probe_info=_skipped("probe_info", "analysis.probes=false" if not cfg.probes else "not computed"),
        )
        layers.append({"layer": i, "block": recording.blocks[i], **measured})

    paths = _paths(recording.records, n_dom, cfg, path_rng)

    summary_ko: dict[str, Any] | None = None
    ko_tokens = None
    if cfg.knockouts:
        ko_stream = _stream(val_batches, cfg.knockout_tokens, cfg.mix_domains)
        try:
            moe_ko = expert_knockouts(model, ko_stream, n_dom, seed=cfg.seed)
            top1_ko = top1_knockouts(model, ko_stream, n_dom, seed=cfg.seed)
        except NotImplementedError as err:  # a router that cannot drop single assignments (some HF gates)
            moe_ko, summary_ko = None, {"skipped": str(err)}
        if moe_ko is not None:
            dense_ko = None
            if dense_twin is not None:
                dense_ko = dense_group_knockouts(
                    dense_twin,
                    ko_stream,
                    n_dom,
                    blocks=recording.blocks,
                    num_experts=moe_ko.damage.shape[2],
                    size_factors=cfg.dense_group_sizes,
                    replicates=cfg.dense_group_replicates,
                    seed=cfg.seed,
                )
            for layer, entry in zip(
                layers, _knockout_entries(moe_ko, top1_ko, dense_ko, domains, cfg.damage_match_factor)
            ):
                layer["measures"]["knockout"] = knockout_result(entry).as_dict()
            summary_ko = {
                "base_loss": _by_domain(moe_ko.base_loss, domains),
                "dense_base_loss": None if dense_ko is None else _by_domain(dense_ko.base_loss, domains),
                "intervention": {
                    "expert": INTERVENTIONS["expert"],
                    "dense": None if dense_ko is None else INTERVENTIONS["dense_group"],
                },
                "documents_per_domain": {d: int(n) for d, n in zip(domains, moe_ko.clusters)},
            }
            ko_tokens = _by_domain(moe_ko.tokens, domains)

    probe_tokens = None
    if cfg.probes:
        per_domain = max(1, math.ceil(cfg.probe_tokens / max(len(val_batches), 1)))
        probe_stream = _stream(val_batches, per_domain, cfg.mix_domains)
        cka = expert_cka(model, probe_stream, max_tokens=cfg.probe_tokens)
        probe_tokens = min(cfg.probe_tokens, sum(b.num_tokens for b in probe_stream))
        for layer, m in zip(layers, cka):
            layer["measures"]["cka"] = cka_result(m, mean_offdiagonal(m)).as_dict()
        for layer, result in zip(layers, _probe_info(model, val_batches, layers, n_dom, cfg, probe_rng)):
            layer["measures"]["probe_info"] = result

    # Verdicts read the same numbers the report shows (after the JSON round of nan -> None).
    layers = to_jsonable(layers)
    layer_verdicts = [judge_layer(_evidence(i, layer), cfg.thresholds) for i, layer in enumerate(layers)]
    for layer, v in zip(layers, layer_verdicts):
        layer["verdict"] = v.as_dict()
    model_verdict = judge_model(layer_verdicts, cfg.thresholds)

    losses = {"moe": _by_domain(recording.domain_loss, domains)}
    if dense_twin is not None:
        losses["dense_twin"] = _by_domain(domain_losses(dense_twin, stream, n_dom)[0], domains)
    losses.update({k: dict(v) for k, v in (comparison or {}).items()})

    first = model.moe_layers[0]
    summary: dict[str, Any] = {
        "format_version": SUMMARY_FORMAT_VERSION,
        "domains": domains,
        "model": {
            "router": type(first.router).__name__,
            "blocks": recording.blocks,
            "num_moe_layers": len(recording.layers),
            "num_experts": first.router.num_experts,
            "top_k": first.router.top_k,
            "vocab_size": int(model.vocab_size),
            **(model_info or {}),
        },
        "config": dataclasses.asdict(cfg),
        "tokens": {
            "recorded": int(loss_tokens.sum()),
            "per_domain": _by_domain(loss_tokens, domains),
            "documents_per_domain": {
                d: int(n) for d, n in zip(domains, layers[0]["measures"]["nmi"]["docs_per_domain"])
            },
            "knockout_per_domain": ko_tokens,
            "probe": probe_tokens,
        },
        "data_splits": None if data_splits is None else {k: dict(v) for k, v in data_splits.items()},
        "data_warnings": list(data_warnings or []),
        "comparison": losses,
        "knockout": summary_ko,
        "verdict": {"verdict": model_verdict.verdict, "rule": model_verdict.rule, "counts": model_verdict.counts},
        "layers": layers,
        "paths": paths,
        "files": {"report": "report.md", "summary": "summary.json", "records": None, "figures": {}},
    }
    summary = to_jsonable(summary)
    if cfg.save_records and recording.records is not None:
        recording.records.save(out / "routing.npz")
        summary["files"]["records"] = "routing.npz"
    figures = save_figures(summary, out / "figures")
    summary["files"]["figures"] = {k: f"figures/{v}" for k, v in figures.items()}
    write_json(out / "summary.json", summary, indent=1)
    (out / "report.md").write_text(render_report(summary))
    return summary


def _skipped(name: str, note: str) -> dict[str, Any]:
    return MeasureResult(name, None, details={"note": note}).as_dict()


def _paths(records: RoutingRecords | None, n_dom: int, cfg: AnalysisConfig, rng: np.random.Generator) -> dict | None:
    """summary["paths"]: {mode: the path measure's dict} over all MoE layers, or None (one layer, no
    records, or analysis.paths=false)."""
    if not cfg.paths or records is None or len(records.layers) < 2:
        return None
    out = {}
    for mode, mode_rng in zip(PATH_MODES, rng.spawn(len(PATH_MODES))):
        info = path_information(
            records,
            n_dom,
            mode=mode,
            n_permutations=cfg.n_permutations,
            n_bootstrap=cfg.n_bootstrap,
            confidence=cfg.confidence,
            context=cfg.context,
            rng=mode_rng,
        )
        out[mode] = info.as_measure_result().as_dict()
    return out


def _probe_info(
    model: RoutedModel,
    val_batches: Mapping[str, Sequence[Batch]],
    layers: Sequence[Mapping[str, Any]],
    n_dom: int,
    cfg: AnalysisConfig,
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    """Per layer, the `probe_info` measure: the held-out linear probe of the domain from the layer's
    router input on up to `cfg.probe_info_tokens` validation tokens, with routing_use against the
    layer's top-1 I(D;E) (Miller-Madow, bits per token, over all recorded tokens)."""
    per_domain = max(1, math.ceil(cfg.probe_info_tokens / max(len(val_batches), 1)))
    batches = _stream(val_batches, per_domain, cfg.mix_domains)
    inputs = capture_layer_inputs(model, batches, max_tokens=cfg.probe_info_tokens)
    n = inputs[0].shape[0]
    domain = np.concatenate([b.domain.reshape(-1).numpy() for b in batches])[:n]
    doc = np.concatenate([b.doc.reshape(-1).numpy() for b in batches])[:n]
    results = []
    for layer, x, layer_rng in zip(layers, inputs, rng.spawn(len(inputs))):
        try:
            probe = probe_domain_information(
                x.float().cpu().numpy(),
                domain,
                doc,
                n_dom,
                rng=layer_rng,
                n_bootstrap=cfg.n_bootstrap,
                confidence=cfg.confidence,
            )
        except ValueError as err:  # too few documents per domain for the folds
            results.append(_skipped("probe_info", f"probe not fitted: {err}"))
            continue
        top1 = layer["measures"].get("nmi_top1") or {}
        h_domain = entropy(np.asarray(layer["domain_expert_counts"], dtype=np.float64).sum(axis=1))
        corrected = top1.get("corrected")
        i_bits = None if corrected is None else float(corrected) * h_domain
        results.append(probe.as_measure_result(i_bits).as_dict())
    return results


# ----------------------------------------------------------------------------- markdown
_f = format_number


def _measure_cell(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("value") is None:
        return "–"
    text = _f(entry["value"])
    if entry.get("ci_low") is not None and entry.get("ci_high") is not None:
        text += f" [{_f(entry['ci_low'])}, {_f(entry['ci_high'])}]"
    if entry.get("p_value") is not None:
        text += f" (p={_f(entry['p_value'])})"
    elif entry.get("null_mean") is not None:
        text += f" vs {_f(entry['null_mean'])}"
    return text


def _paths_section(paths: Mapping[str, Any] | None, layers: Sequence[Mapping[str, Any]]) -> list[str]:
    """The report's "Paths across layers" section (none without summary["paths"])."""
    if not paths:
        return []
    rows = []
    for mode, entry in paths.items():
        heldout = entry.get("heldout_share")
        rows.append(
            [
                mode,
                _measure_cell(entry),
                entry.get("plugin"),
                entry.get("null_q95"),
                entry.get("bits"),
                entry.get("n_paths"),
                entry.get("tokens_per_path"),
                "–" if heldout is None else _f(heldout),
            ]
        )
    header = ["path", "NMI − null", "NMI plug-in", "null q95", "I(D;path) (bits)", "distinct paths", "tokens/path"]
    per_layer = ", ".join(_f(x) for x in (paths.get("top1") or {}).get("per_layer_nmi") or [])
    return [
        "",
        "## Paths across layers",
        "",
        markdown_table(header + ["held-out share"], rows, fmt=_f),
        "",
        "Each token's path is its sequence of experts through the MoE layers (top1: the highest-gate kept "
        "expert of each layer; topk: each layer's kept set). Only observed paths enter the table; the plug-in "
        "bias grows with the number of distinct paths and is removed with the document-permutation null, so "
        "with few tokens per path an excess near 0 means not measurable rather than absent."
        + (f" Per-layer top-1 NMI − null of the same tokens: {per_layer}." if per_layer else ""),
    ]


def render_report(summary: Mapping[str, Any]) -> str:
    """report.md from a summary dict: verdict, setup, losses, per-layer measures, criteria, figures."""
    m, v, tok = summary["model"], summary["verdict"], summary["tokens"]
    layers = summary["layers"]
    k, e = m["top_k"], m["num_experts"]
    lines = [
        "# MoE specialization report",
        "",
        f"**Verdict: {v['verdict']}** — {v['rule']}.",
        "",
        "## Setup",
        "",
    ]
    if m.get("name"):
        lines.append(f"- model `{m['name']}` ({m.get('family', '?')}, {m.get('dtype', '?')})")
    lines += [
        f"- router `{m['router']}`, {m['num_moe_layers']} MoE layer(s) at blocks {m['blocks']}, "
        f"E = {e} experts, k = {k} (uniform share k/E = {k / e:.3g})",
        f"- domains: {', '.join(summary['domains'])}; {tok['recorded']} validation tokens recorded in "
        f"{sum((tok.get('documents_per_domain') or {}).values())} documents ("
        + ", ".join(
            f"{d}: {n:g} tokens, {(tok.get('documents_per_domain') or {}).get(d, '?')} documents"
            for d, n in tok["per_domain"].items()
        )
        + ")",
        f"- assignments weighted by `{layers[0]['weighting']}`; {summary['config']['n_permutations']} "
        f"document permutations, {summary['config']['n_bootstrap']} domain-stratified document-bootstrap "
        "replicates; information in bits, losses in nats/token",
    ]
    for split, per_domain in (summary.get("data_splits") or {}).items():
        lines.append(
            f"- {split} split: "
            + ", ".join(f"{d}: {c['tokens']} tokens, {c['documents']} documents" for d, c in per_domain.items())
        )
    for warning in summary.get("data_warnings") or []:
        lines.append(f"- **data warning**: {warning}")
    if m.get("shared_experts"):
        lines.append(f"- shared experts (outside the routing measured here): {m['shared_experts']}")
    if tok.get("knockout_per_domain"):
        lines.append(
            f"- knockouts on {', '.join(f'{d}: {n:g}' for d, n in tok['knockout_per_domain'].items())} "
            "tokens per domain"
        )
    if tok.get("probe"):
        lines.append(f"- expert CKA on {tok['probe']} probe tokens")

    comp = summary.get("comparison") or {}
    if comp:
        lines += ["", "## Per-domain validation loss (nats/token)", ""]
        names = list(comp)
        lines.append(
            markdown_table(
                ["domain"] + names, [[d] + [comp[n].get(d) for n in names] for d in summary["domains"]], fmt=_f
            )
        )

    lines += ["", "## Specialization measures per layer", ""]
    shown = [
        name for name in MEASURES if any(layer["measures"].get(name, {}).get("value") is not None for layer in layers)
    ]
    rows = [[str(layer["layer"])] + [_measure_cell(layer["measures"].get(name)) for name in shown] for layer in layers]
    lines.append(markdown_table(["layer"] + [f"{MEASURES[n].label} ({MEASURES[n].unit})" for n in shown], rows, fmt=_f))
    lines += ["", 'Value [interval] (p-value); with a null, "vs" gives its mean.']
    lines += [f"- {MEASURES[n].label}: {MEASURES[n].description}" for n in shown]
    lines += [
        "",
        "NMI − null: I(D;E)/H(D) minus the mean of its document-permutation null (0 for domain-blind "
        "routing, however documents cluster), with the bias-corrected percentile interval of a domain-stratified "
        "document bootstrap. I(D;E|C) share: the held-out (cross-fitted over documents) domain information in "
        f"routing beyond the context C = {layers[0]['measures']['cmi'].get('context', 'token')}, over the "
        "Miller-Madow H(D|C) (`analysis.heldout`).",
    ]
    if "committee_overlap" in shown:
        lines += [
            "",
            "Committees (half of each domain's routing mass): "
            + "; ".join(
                f"layer {layer['layer']}: sizes "
                + ", ".join(
                    f"{d} {n}" for d, n in zip(summary["domains"], layer["measures"]["committee_overlap"]["sizes"])
                )
                for layer in layers
                if layer["measures"]["committee_overlap"].get("sizes") is not None
            )
            + ". Disjoint committees (overlap below its document null) show domain information in routing, "
            "vocabulary included (token-keyed routing gets them too: docs/calibration.md); one shared committee "
            "(overlap near 1, not below the null) reads as an ensemble.",
        ]
    if "probe_info" in shown:
        uses = [
            f"layer {layer['layer']}: {_f(layer['measures']['probe_info'].get('routing_use'))}"
            for layer in layers
            if layer["measures"]["probe_info"].get("value") is not None
        ]
        lines += [
            "",
            "Probe bits: the domain information a held-out linear probe reads from the router's input; routing "
            "carries I(D;E) (top-1, Miller-Madow) of it: " + "; ".join(uses) + ". A router that uses little of "
            "a strongly domain-coded input behaves like an ensemble even when I(D;E) is above its null.",
        ]
    lines += _paths_section(summary.get("paths"), layers)

    if any(
        layer["measures"]["knockout"]["value"] is not None or layer["measures"]["cka"]["value"] is not None
        for layer in layers
    ):
        lines += ["", "## Knockouts and redundancy", ""]
        intervention = (summary.get("knockout") or {}).get("intervention") or {}
        for who, text in intervention.items():
            if text:
                lines.append(f"- {who} knockout: {text}")
        if (summary.get("knockout") or {}).get("skipped"):
            lines.append(f"- knockouts skipped: {summary['knockout']['skipped']}")
        rows = []
        for layer in layers:
            ko, cka = layer["measures"]["knockout"], layer["measures"]["cka"]
            top1 = ko.get("top1_damage") or {}
            damage = [x for x in (ko.get("mean_damage") or []) if x is not None]
            cv = [x for x in (ko.get("cv") or []) if x is not None]
            dense_damage = [x for x in (ko.get("dense_mean_damage") or []) if x is not None]
            rows.append(
                [
                    str(layer["layer"]),
                    f"{_f(min(damage))}–{_f(max(damage))}" if damage else "–",
                    _f(float(np.median(cv))) if cv else "–",
                    f"{_f(min(dense_damage))}–{_f(max(dense_damage))}" if dense_damage else "–",
                    ko.get("dense_cv_median"),
                    ko.get("value"),
                    ", ".join(f"{d}: {_f(x)}" for d, x in top1.items()) or "–",
                    cka.get("value"),
                ]
            )
        lines.append(
            markdown_table(
                [
                    "layer",
                    "expert damage (nats)",
                    "expert CV (median)",
                    "dense group damage (nats)",
                    "dense CV (median)",
                    "expert percentile at matched damage (median)",
                    "top-1 knockout damage (nats)",
                    "mean expert CKA",
                ],
                rows,
                fmt=_f,
            )
        )
        lines += [
            "",
            "CV: the noise-corrected coefficient of variation of a unit's damage across domains (0: every "
            "domain hurt alike, 1: one domain only), which does not drift with the size of the damage. "
            "Percentile: where an expert's CV lower bound falls among the dense twin's random unit groups "
            "of the same layer whose mean damage lies within a factor "
            f"{summary['config'].get('damage_match_factor', 2)} of the expert's.",
        ]
        lines.append("")

    lines += ["", "## Verdict per layer", ""]
    for layer in layers:
        lv = layer["verdict"]
        lines += [
            f"### Layer {layer['layer']} (block {layer['block']}): {lv['verdict']}",
            "",
            f"Rule: {lv['rule']}.",
            "",
        ]
        lines.append(
            markdown_table(
                ["criterion", "points to", "votes", "value", "threshold", "why"],
                [
                    [
                        c["name"],
                        c["verdict"],
                        "yes" if c.get("votes", True) else "no (reported)",
                        c["value"],
                        c["threshold"],
                        c["reason"],
                    ]
                    for c in lv["criteria"].values()
                ],
                fmt=_f,
            )
        )
        lines += [f"\nNote: {n}." for n in lv["notes"]]
        lines.append("")

    figures = summary["files"].get("figures") or {}
    if figures:
        lines += ["## Figures", ""] + [f"![{name}]({path})" for name, path in figures.items()]
    return "\n".join(lines) + "\n"
