"""`moe.modes.eval_mode`: eval inside the block, the previous training flag restored after it."""

import pytest
from torch import nn

from moe.modes import eval_mode


@pytest.mark.parametrize("training", [True, False])
def test_eval_inside_previous_mode_after(training):
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train(training)
    with eval_mode(model) as inside:
        assert inside is model
        assert not model.training and not model[1].training
    assert model.training is training and model[1].training is training


@pytest.mark.parametrize("training", [True, False])
def test_mode_restored_when_the_block_raises(training):
    model = nn.Linear(2, 2).train(training)
    with pytest.raises(RuntimeError, match="boom"):
        with eval_mode(model):
            raise RuntimeError("boom")
    assert model.training is training
