"""training/loop.py's arithmetic for exact resume, against its closed form: after global step
s of a run with P steps per epoch, a checkpoint names (epoch, step in the epoch) =
divmod(s, P), whichever step the run resumed from. (The runs themselves are checked bit for
bit against uninterrupted ones in tests/test_training_resume.py and test_training_preempt.py.)
"""

from __future__ import annotations

import argparse

import pytest

from core.errors import UsageError
from training.loop import EpochPlan, Steps


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"grad_accum": 1, "epochs": 3, "max_steps": 0, **kw})


def test_steps_count_epochs_accumulation_and_max_steps():
    assert Steps.count(10, _args()) == Steps(per_epoch=10, total=30)
    assert Steps.count(10, _args(grad_accum=3)) == Steps(per_epoch=3, total=9)  # 1 batch left
    assert Steps.count(10, _args(max_steps=7)) == Steps(per_epoch=10, total=7)
    assert Steps.count(10, _args(max_steps=70)) == Steps(per_epoch=10, total=30)
    with pytest.raises(UsageError, match="--grad-accum 11 is more than the 10 batches"):
        Steps.count(10, _args(grad_accum=11))


@pytest.mark.parametrize("per_epoch", [1, 4, 5])
def test_every_checkpoint_names_the_position_of_its_step(per_epoch: int):
    for start in range(3 * per_epoch):  # the step a run resumed from
        epoch, first = divmod(start, per_epoch)
        plan = EpochPlan(epoch, first, per_epoch - first, per_epoch)
        for done in range(1, plan.n_steps + 1):
            assert plan.position(done) == divmod(start + done, per_epoch), (start, done)


def test_the_sampler_skips_the_samples_of_the_steps_taken():
    plan = EpochPlan(epoch=2, first=3, n_steps=1, per_epoch=4)
    assert plan.skipped_samples(_args(grad_accum=2, batch_size=5)) == 3 * 2 * 5
    assert EpochPlan(0, 0, 4, 4).skipped_samples(_args(batch_size=5)) == 0
