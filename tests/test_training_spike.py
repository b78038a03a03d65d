"""The loss-spike guard (pure) and the sampler that skips ledgered samples."""

from __future__ import annotations

import math

import pytest

from training.spike import SpikeGuard, ledger_entry, to_ranges


def warm_guard(n: int = 20) -> SpikeGuard:
    guard = SpikeGuard(window=16, sigma=6.0, min_history=8)
    for i in range(n):  # a slowly falling, slightly noisy loss
        assert not guard.check(5.0 - 0.01 * i + 0.02 * (-1) ** i, 1.0 + 0.05 * (-1) ** i).spike
    return guard


def test_nan_and_inf_are_always_spikes_even_without_history():
    guard = SpikeGuard(window=16, min_history=8)
    assert guard.check(float("nan"), 1.0).spike
    assert guard.check(2.0, float("inf")).reason == "grad_norm is inf"
    assert len(guard.loss) == 0  # spikes never enter the history


def test_z_score_flags_loss_and_grad_norm_jumps_but_not_normal_steps():
    guard = warm_guard()
    assert not guard.check(4.85, 1.02).spike
    verdict = guard.check(7.5, 1.0)
    assert verdict.spike and verdict.reason.startswith("loss 7.5")
    assert guard.check(4.8, 30.0).reason.startswith("grad_norm 30")
    assert not guard.check(3.0, 0.5).spike  # falling loss is fine


def test_no_z_test_before_min_history():
    guard = SpikeGuard(window=16, min_history=8)
    for loss in (5.0, 5.0, 50.0):
        assert not guard.check(loss, 1.0).spike


def test_state_round_trip_restores_decisions():
    guard = warm_guard()
    clone = SpikeGuard(window=16, sigma=6.0, min_history=8)
    clone.load_state_dict(guard.state_dict())
    assert clone.check(7.5, 1.0).spike == guard.check(7.5, 1.0).spike is True


def test_ledger_entry_names_samples_as_ranges():
    entry = ledger_entry(12, SpikeGuard().check(math.nan, 1.0), math.nan, 1.0, [96, 97, 98, 103], 10, 0.5, 3, [])
    assert entry["skipped_samples"] == [[96, 99], [103, 104]] and entry["num_skipped"] == 4
    assert entry["loss"] == "nan" and entry["rolled_back_to"] == 10
    assert to_ranges([]) == []


def test_sampler_skips_ledgered_samples_and_reports_exhaustion():
    from training.pretrain import next_batch

    ledger = [{"skipped_samples": [[8, 12]]}]
    assert next_batch(6, 4, ledger, 100) == ([6, 7, 12, 13], 14)
    with pytest.raises(RuntimeError, match="ran out of samples"):
        next_batch(98, 4, [], 100)


def test_invalid_window_is_rejected():
    with pytest.raises(ValueError):
        SpikeGuard(window=4, min_history=8)


def test_fault_injector_fires_each_fault_once_and_only_on_its_step():
    import torch

    from training.faults import FaultInjector
    from training.pretrain_config import FaultInjection

    inj = FaultInjector([FaultInjection(step=2, kind="scale_loss", factor=50.0),
                         FaultInjection(step=4, kind="garbage_tokens")], vocab_size=97)
    batch = {"tokens": torch.zeros(2, 8, dtype=torch.long), "labels": torch.zeros(2, 8, dtype=torch.long),
             "loss_mask": torch.ones(2, 8)}
    scales = []
    for step in (0, 1, 2, 2, 3):  # step 2 trained twice: the rollback re-trains it clean
        inj.arm(step)
        scales.append(inj.loss_scale())
        assert inj.corrupt_batch(batch) is batch
    assert scales == [1.0, 1.0, 50.0, 1.0, 1.0]
    inj.arm(4)
    bad = inj.corrupt_batch(batch)
    assert inj.loss_scale() == 1.0 and bad["loss_mask"] is batch["loss_mask"]
    assert bad["tokens"].shape == (2, 8) and int(bad["tokens"].max()) < 97 and bool(bad["tokens"].any())
    inj.arm(4)  # fired already
    assert inj.corrupt_batch(batch) is batch
    nan = FaultInjector([FaultInjection(step=0, kind="nan_loss")], vocab_size=97)
    nan.arm(0)
    assert nan.loss_scale() != nan.loss_scale()  # NaN


def test_a_spike_recurs_once_max_retries_rollbacks_have_not_got_past_its_step():
    from training.spike import recurring

    ledger = [{"step": 30}, {"step": 30}]  # two rollbacks from step 30, each retried with other samples
    assert recurring(30, ledger, 2, 6.1, 2.1)
    assert recurring(28, ledger, 2, 6.1, 2.1)  # earlier in the replayed stretch: still not past it
    assert not recurring(31, ledger, 2, 6.1, 2.1)  # training got past step 30: a new spike, roll back
    assert not recurring(30, ledger, 3, 6.1, 2.1)
    assert not recurring(30, ledger[:1], 2, 6.1, 2.1)
    assert not recurring(30, ledger, 2, float("nan"), 2.1) and not recurring(30, ledger, 2, 6.1, float("inf"))
    assert recurring(5, [], 0, 1.0, None)  # max_retries 0: never roll back a finite spike


def test_an_accepted_spike_widens_the_window():
    from training.spike import SpikeGuard

    g = SpikeGuard(window=16, sigma=6.0, min_history=5, min_rel_std=0.02)
    for v in (1.0, 1.01, 0.99, 1.0, 1.02, 0.98):
        assert not g.check(3.0, v).spike
    assert g.check(3.0, 2.0).spike
    g.accept(3.0, 2.0)
    assert not g.check(3.0, 1.9).spike  # the trend it was part of now passes


def test_a_fault_with_times_fires_on_each_of_its_first_trainings():
    from training.faults import FaultInjector
    from training.pretrain_config import FaultInjection

    inj = FaultInjector([FaultInjection(step=2, kind="scale_loss", factor=50.0, times=3)], vocab_size=97)
    scales = []
    for step in (0, 1, 2, 1, 2, 2, 2):
        inj.arm(step)
        scales.append(inj.loss_scale())
    assert scales == [1.0, 1.0, 50.0, 1.0, 50.0, 50.0, 1.0]
