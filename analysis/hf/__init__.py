"""Analyze pretrained Mixture-of-Experts models from Hugging Face `transformers` with the same
recorder, measures, knockouts and report as the models this package trains.

    from analysis.hf import load_hf_model
    model = load_hf_model("allenai/OLMoE-1B-7B-0924", device="cuda")     # bf16 on CUDA
    summary = analyze_model(model, val_batches, domains, "outputs/olmoe")

or from the command line: `moe-analyze model=hf:allenai/OLMoE-1B-7B-0924 data=hf device=cuda`.

- `rules`: each family's routing rule, reproduced op for op (softmax top-k with or without
  renormalization; DeepSeek-V2 group-limited softmax; DeepSeek-V3 sigmoid + correction bias,
  group-limited, scaled).
- `families`: the supported `model_type`s (mixtral, olmoe, qwen2_moe, qwen3_moe, deepseek_v2,
  deepseek_v3, glm4_moe), where their MoE blocks are, their shared experts.
- `adapter`: `HFMoEModel`, the HF model behind the surface the analysis reads (hooks on the gates,
  a `RouterShim` per layer for the recorder and the knockouts).
- `run`: `analyze_hf_model`, the `moe-analyze model=hf:<name>` pipeline.
- `export`: `export_hf`, the other direction (`moe-export`): a model trained here written as a
  transformers checkpoint of the family that computes exactly what it computes.

`transformers` is an optional extra (`pip install 'moe-specialization[hf]'`); it is imported only
when a model is loaded.
"""

from analysis.hf.adapter import HFMoEModel, RouterShim, load_hf_model, wrap_hf_model
from analysis.hf.families import FAMILIES, family_of

__all__ = ["FAMILIES", "HFMoEModel", "RouterShim", "family_of", "load_hf_model", "wrap_hf_model"]
