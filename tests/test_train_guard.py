"""The training loop's error handling, piece by piece (flows/train/guard.py); the loop-level
tests (injected inf gradients, loss spike, hang) are in tests/test_train_faults.py."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from flows.train.guard import HangWatchdog, Snapshot, StepGuard, nonfinite_across_ranks


def test_non_finite_steps_are_skipped_and_k_in_a_row_roll_back():
    g = StepGuard(max_bad_steps=3)
    assert g.judge(1, 2.0, 1.0).action == "ok"
    v = g.judge(2, float("nan"), 1.0)
    assert v.action == "skip" and "non-finite loss" in v.reason
    assert g.judge(3, 2.0, 1.0).action == "ok"  # a good step ends the run of bad ones
    assert g.judge(4, 2.0, float("inf")).reason.startswith("non-finite gradient norm")
    assert g.judge(5, float("inf"), 1.0).action == "skip"
    v = g.judge(6, 2.0, float("nan"))
    assert v.action == "rollback" and "3 bad steps in a row" in v.reason
    assert g.skipped == 4
    assert g.rolled_back() == [4, 5, 6] and g.rollbacks == 1


def test_a_loss_spike_is_called_by_z_score_over_the_window():
    g = StepGuard(spike_zscore=6.0, window=10, min_window=5)
    curve = [3.0 - 0.01 * i + 0.02 * (-1) ** i for i in range(12)]  # slowly falling, a little noise
    assert g.judge(1, 50.0, 1.0).action == "ok"  # too few steps to judge: the window is not full yet
    g.losses.clear()
    for i, loss in enumerate(curve, 1):
        assert g.judge(i, loss, 1.0).action == "ok"
    assert len(g.losses) == 10
    assert g.judge(13, curve[-1] + 0.05, 1.0).action == "ok"  # within the noise
    v = g.judge(14, 4.0, 1.0)
    assert v.action == "rollback" and "loss spike" in v.reason
    assert g.rolled_back() == [14] and not g.losses
    off = StepGuard(spike_zscore=0)
    for i, loss in enumerate(curve, 1):
        off.judge(i, loss, 1.0)
    assert off.judge(20, 400.0, 1.0).action == "ok"  # 0: spike detection off


def test_nonfinite_flag_single_process():
    assert nonfinite_across_ranks(torch.tensor(1.0), torch.tensor(2.0)).item() == 0.0
    assert nonfinite_across_ranks(torch.tensor(1.0), torch.tensor(float("inf"))).item() == 1.0
    assert nonfinite_across_ranks(torch.tensor(float("nan")), 2.0).item() == 1.0


def test_snapshot_restores_weights_optimizer_and_data_bitwise():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))

    class Cursor:
        def __init__(self):
            self.pos = 0

        def state_dict(self):
            return {"pos": self.pos}

        def load_state_dict(self, d):
            self.pos = d["pos"]

    data = Cursor()

    def step():
        model(torch.randn(3, 8)).square().sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        data.pos += 1

    step()
    params = list(model.parameters())
    snap = Snapshot.take(1, params, opt, sched, data, {})
    before = [p.detach().clone() for p in params]
    exp_avg = opt.state[params[0]]["exp_avg"].clone()
    step()
    step()
    assert not torch.equal(params[0], before[0])
    snap.restore(params, opt, sched, data)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert torch.equal(opt.state[params[0]]["exp_avg"], exp_avg) and data.pos == 1
    assert sched.last_epoch == 1 and opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_hang_watchdog_fires_past_k_times_the_median_and_dumps_every_stack(capfd):
    fired = []
    dog = HangWatchdog(factor=5.0, min_s=0.2, min_steps=3, on_fire=fired.append, poll_s=0.01)
    try:
        for i in range(4):  # ~20 ms steps: the limit is max(0.2, 5 x 0.02) = 0.2 s
            dog.begin(i + 1)
            time.sleep(0.02)
            dog.end()
        assert not fired and dog.limit() == pytest.approx(0.2)
        stuck = threading.Event()
        other = threading.Thread(target=stuck.wait, name="a-busy-helper", daemon=True)
        other.start()
        dog.begin(5)
        t0 = time.monotonic()
        while not fired and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        took = time.monotonic() - t0
        stuck.set()
    finally:
        dog.stop()
    print(f"watchdog fired after {took:.2f}s (limit 0.2s)")
    assert fired and fired[0]["step"] == 5 and fired[0]["limit_s"] == pytest.approx(0.2)
    assert 0.2 <= took < 1.0
    err = capfd.readouterr().err
    assert "hang watchdog: rank 0 step 5" in err
    assert "test_hang_watchdog_fires_past_k_times" in err  # the (stuck) main thread's frame
    assert "line" in err and " in wait" in err  # the helper thread, waiting on its event
    assert err.count("Thread 0x") + err.count("Current thread 0x") >= 3  # main, the helper, the watchdog itself


def test_hang_watchdog_stays_quiet_before_it_is_armed():
    fired = []
    dog = HangWatchdog(factor=2.0, min_s=0.05, min_steps=3, on_fire=fired.append, poll_s=0.01)
    try:
        dog.begin(1)  # the first steps (compilation, warm-up) are not judged
        time.sleep(0.3)
        dog.end()
    finally:
        dog.stop()
    assert not fired
