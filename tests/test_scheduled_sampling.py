"""The scheduled-sampling schedule (its use in the models and the loss: test_recurrent.py)."""

import pytest

from encdec.config import TrainConfig
from encdec.experiments import inverse_sigmoid_k
from encdec.scheduled_sampling import sampling_prob


def test_scheduled_sampling_schedules():
    off = TrainConfig()
    assert sampling_prob(10_000, off) == 0.0
    lin = TrainConfig(scheduled_sampling="linear", ss_steps=100, ss_max_prob=0.25)
    assert [sampling_prob(s, lin) for s in (0, 10, 100, 500)] == pytest.approx([0, 0.1, 0.25, 0.25])
    exp = TrainConfig(scheduled_sampling="exponential", ss_k=0.99, ss_max_prob=1.0)
    assert sampling_prob(100, exp) == pytest.approx(1 - 0.99 ** 100)
    sig = TrainConfig(scheduled_sampling="inverse_sigmoid", ss_k=10.0, ss_max_prob=1.0)
    assert sampling_prob(0, sig) == pytest.approx(1 - 10 / 11)
    assert sampling_prob(10_000, sig) == pytest.approx(1.0)
    # from a trained model: teacher forcing until ss_start_step, then the schedule from its 0
    late = TrainConfig(scheduled_sampling="linear", ss_steps=100, ss_max_prob=0.25,
                       ss_start_step=3000)
    assert [sampling_prob(s, late) for s in (0, 2999, 3000, 3010, 3100, 9000)] == \
        pytest.approx([0, 0, 0, 0.1, 0.25, 0.25])


@pytest.mark.parametrize("step, cap", [(160, 0.25), (1000, 0.25), (50, 0.5)])
def test_inverse_sigmoid_k_reaches_the_cap_at_the_step(step, cap):
    cfg = TrainConfig(scheduled_sampling="inverse_sigmoid", ss_max_prob=1.0,
                      ss_k=inverse_sigmoid_k(step, cap))
    assert sampling_prob(step, cfg) == pytest.approx(cap, abs=1e-6)
    assert sampling_prob(step // 2, cfg) < cap
