"""The advantage normalization's tie guard (learner/advantages.py): float rounding in a group of equal
rewards must give zero advantages, never full-strength ones; and the raw-reward batch std with the
``std + eps`` form of Flow-GRPO and DiffusionNFT, against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from diffrl.learner.advantages import advantages


def _tied_with_one_ulp(dtype):
    r = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.2, 0.9, 0.4, 0.6]], dtype=dtype)
    r[0, 1] = torch.nextafter(r[0, 1], torch.tensor(1.0, dtype=dtype))  # one ulp above its neighbours
    assert r[0, 1] != r[0, 0]
    return r


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("std_mode", ["group", "global", "batch"])
def test_a_one_ulp_jitter_in_a_tied_group_is_a_tie(dtype, std_mode):
    r = _tied_with_one_ulp(dtype)
    a, a_tilde = advantages(r, std_mode=std_mode)
    assert a[0].abs().max() < 1e-4  # whatever the mode: the tied group carries no signal
    if std_mode == "group":
        assert torch.equal(a_tilde[0], torch.full((4,), 0.5, dtype=dtype))
    # the other group is untouched by the guard: its centered rewards over its std, by hand
    c = np.array([0.2, 0.9, 0.4, 0.6]) - 0.525
    expect = {"group": c / np.sqrt((c**2).mean())}.get(std_mode)
    if expect is not None:
        np.testing.assert_allclose(a[1].double().numpy(), expect, rtol=1e-5)
    assert a[1].abs().max() > 0.5


def test_the_old_absolute_guard_turned_the_jitter_into_full_strength_advantages():
    """What the issue reported, as a regression check: an absolute 1e-8 threshold gives ±1.7."""
    r = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.2, 0.9, 0.4, 0.6]])
    r[0, 1] += 6e-8
    old, _ = advantages(r, std_mode="group", eps=1e-8 / r.abs().max().item())  # the old threshold, relative
    assert old[0].abs().max() > 1.0
    new, _ = advantages(r, std_mode="group")
    assert torch.equal(new[0], torch.zeros(4))


def test_the_guard_scales_with_the_rewards():
    r = torch.tensor([[1000.0, 1000.0, 1000.0, 1000.0], [0.0, 10.0, 20.0, 30.0]], dtype=torch.float32)
    r[0, 2] = torch.nextafter(r[0, 2], torch.tensor(2000.0))  # 6e-5: far above an absolute 1e-8
    a, _ = advantages(r, std_mode="group")
    assert torch.equal(a[0], torch.zeros(4))
    small = r / 1e6  # the same batch in other units: the same advantages
    torch.testing.assert_close(advantages(small, std_mode="group")[0], a)
    # a real spread is kept, however small the rewards
    tiny = torch.tensor([[1e-3, 2e-3, 3e-3, 4e-3]], dtype=torch.float64)
    assert advantages(tiny, std_mode="group")[0].abs().max() > 1.0


def test_batch_std_of_raw_rewards_plus_eps_by_hand():
    """Flow-GRPO (global_std=True) and DiffusionNFT: (r - group mean) / (std over all raw rewards + 1e-4)."""
    r = torch.tensor([[0.1, 0.3, 0.5, 0.7], [0.8, 0.8, 0.9, 1.0]], dtype=torch.float64)
    a, _ = advantages(r, std_mode="batch", eps=1e-4, eps_mode="add", clip=1e9)
    raw = r.numpy()
    std = math.sqrt(((raw - raw.mean()) ** 2).mean())
    expect = (raw - raw.mean(axis=1, keepdims=True)) / (std + 1e-4)
    np.testing.assert_allclose(a.numpy(), expect, rtol=1e-12)
    # a fully tied batch: bounded by the + eps, zero advantages
    flat = torch.full((2, 4), 0.5, dtype=torch.float64)
    assert torch.equal(advantages(flat, std_mode="batch", eps=1e-4, eps_mode="add")[0], torch.zeros(2, 4,
                                                                                                    dtype=torch.float64))


def test_masked_samples_stay_out_of_the_batch_std():
    r = torch.tensor([[0.1, 0.3, 99.0, 0.7], [0.8, 0.8, 0.9, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False, True], [True, True, True, True]])
    a, a_tilde = advantages(r, mask, std_mode="batch", eps=1e-4, eps_mode="add", clip=1e9)
    kept = r[mask].numpy()
    std = math.sqrt(((kept - kept.mean()) ** 2).mean())
    g0 = np.array([0.1, 0.3, 0.7])
    np.testing.assert_allclose(a[0, [0, 1, 3]].numpy(), (g0 - g0.mean()) / (std + 1e-4), rtol=1e-12)
    assert a[0, 2] == 0 and a_tilde[0, 2] == 0.5
