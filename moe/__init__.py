"""moe-specialization: train sparse MoE language models against matched dense twins.

Shape legend, one for every module of `moe/` and `analysis/` (names carry their shape as a
suffix, `x_TD`, `counts_GE`; docstrings write `[T, K]`):

    B sequences        S positions        T tokens (B*S, flattened)      V vocabulary
    D model dim        F expert hidden width                             P dispatched rows
    E experts (routed) K experts per token  A kept (token, expert) assignments
    L MoE layers       G domains          M documents                    N rows of a sample
    R resamples (bootstrap, permutation)

Forward passes and other counts without a legend letter are spelled out.
"""
