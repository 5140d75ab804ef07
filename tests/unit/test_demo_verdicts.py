"""The demo's pure verdicts, on fabricated inputs: when surviving replicas count as identical."""

from __future__ import annotations

import torch

from examples.demo import replicas_identical


def _model(scale: float) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, 10, generator=generator) * scale, "b": torch.zeros(10)}


def test_replicas_a_few_float32_ulps_apart_are_identical_at_any_weight_scale():
    # hivemind applies the averaged delta to each local tensor: replicas end a few ulps apart, and an ulp at |w| ~ 30
    # (2e-6) is already larger than an absolute 1e-6 (the demo's DiLoCo run that failed so: 1.91e-6 at |w| 26)
    for scale in (0.1, 1.0, 30.0):
        first = _model(scale)
        second = {name: tensor.clone() for name, tensor in first.items()}
        w = second["w"]
        for _ in range(2):
            w.copy_(torch.nextafter(w, torch.full_like(w, float("inf"))))  # two ulps up, everywhere
        identical, diff, tolerance = replicas_identical([first, second, first])
        assert diff > 0
        assert identical, (scale, diff, tolerance)


def test_replicas_a_learning_rate_step_apart_are_not_identical():
    for scale in (0.1, 1.0, 30.0):
        first = _model(scale)
        forked = {name: tensor.clone() for name, tensor in first.items()}
        forked["b"][3] += 1e-4 * max(1.0, scale)  # one element, one small SGD step (lr 1e-2 x a 1e-2 gradient)
        identical, diff, _ = replicas_identical([first, forked])
        assert not identical and diff > 0, (scale, diff)


def test_one_survivor_is_trivially_identical_and_none_is_not():
    assert replicas_identical([_model(1.0)])[0] is True
    assert replicas_identical([])[0] is False
