"""Router saturation (OLMoE sec. 5) against a naive per-token loop."""

import numpy as np
import pytest

from analysis.trajectory import router_saturation


def naive_saturation(experts_t, kept_t, experts_final, kept_final):
    shares = []
    for et, kt, ef, kf in zip(experts_t, kept_t, experts_final, kept_final):
        final = {e for e, k in zip(ef, kf) if k}
        if final:
            shares.append(len(final & {e for e, k in zip(et, kt) if k}) / len(final))
    return float(np.mean(shares))


def test_saturation_matches_a_naive_loop_including_drops():
    rng = np.random.default_rng(0)
    n, k, e = 500, 2, 8
    final = np.stack([rng.choice(e, k, replace=False) for _ in range(n)])
    now = np.stack([rng.choice(e, k, replace=False) for _ in range(n)])
    kept_now, kept_final = rng.random((n, k)) > 0.1, rng.random((n, k)) > 0.1
    assert router_saturation(now, kept_now, final, kept_final) == pytest.approx(
        naive_saturation(now, kept_now, final, kept_final)
    )


def test_saturation_is_one_at_the_end_and_k_over_e_for_unrelated_routing():
    rng = np.random.default_rng(1)
    n, k, e = 20000, 2, 8
    final = np.stack([rng.choice(e, k, replace=False) for _ in range(n)])
    kept = np.ones((n, k), dtype=bool)
    assert router_saturation(final[:, ::-1], kept, final, kept) == 1.0  # order within a token is irrelevant
    unrelated = np.stack([rng.choice(e, k, replace=False) for _ in range(n)])
    assert router_saturation(unrelated, kept, final, kept) == pytest.approx(k / e, abs=0.01)
    with pytest.raises(ValueError, match="same tokens"):
        router_saturation(final[:10], kept[:10], final, kept)
