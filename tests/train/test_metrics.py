"""The progress bar around an evaluation: its time is left out of the rate and the ETA."""

from __future__ import annotations

import io
import time

from tqdm import tqdm

from appleslm.train.metrics import paused

STEP = 0.1


def test_an_evaluation_leaves_the_rate_and_eta_alone():
    # smoothing=1: the rate of the last printed interval, so one wrong interval shows; prints
    # throttled to about one per step, as a real bar's 0.1 s minimum interval does.
    bar = tqdm(total=100, file=io.StringIO(), mininterval=0.9 * STEP, smoothing=1)
    for _ in range(5):
        time.sleep(STEP)
        bar.update(1)
    time.sleep(STEP)  # a step whose bar update comes after the evaluation, as in the loop
    with paused(bar):
        time.sleep(10 * STEP)  # the evaluation
    bar.update(1)
    for _ in range(2):
        time.sleep(STEP)
        bar.update(1)
        state = bar.format_dict
        assert 0.7 * STEP < 1 / state["rate"] < 1.5 * STEP  # neither doubled nor slowed
    bar.close()
    assert state["elapsed"] < 8 * STEP + 0.3  # eight steps' time, the evaluation left out
