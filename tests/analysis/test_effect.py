"""nanprobe.analysis.effect: what training sees against fp32, and which parameters are judged at all."""
from __future__ import annotations

import torch

from nanprobe import thresholds as th
from nanprobe.analysis.alignment import Recorder
from nanprobe.analysis.effect import measure, within_cancellation
from nanprobe.enums import Precision


def _recorders(pairs: dict) -> tuple[Recorder, Recorder]:
    low, ref = Recorder(), Recorder()
    low.grads = {0: {n: g for n, (g, _) in pairs.items()}}
    ref.grads = {0: {n: r for n, (_, r) in pairs.items()}}
    return low, ref


def test_only_parameters_off_by_more_than_their_own_fp32_gradient_are_tested_worst_first_and_so_many():
    g = torch.Generator().manual_seed(0)
    noise16, noise32 = torch.randn(64, generator=g) * 1e-4, torch.randn(64, generator=g) * 1e-8
    # fp32 gives 1e-8 of noise, fp16 (i + 1) 1e-4 of its own: relative errors of about 1e4 (i + 1)
    pairs = {f"critic.c{i}.bias": (noise16 * (i + 1), noise32) for i in range(12)}
    w = torch.randn(256, generator=g)
    pairs["critic.c0.weight"] = (w * 1.05, w)  # 5% off: over fp16's tolerance, but within its own size
    asked = []

    def independent(names):
        asked.append(list(names))
        return frozenset(n for n in names if n.endswith("bias"))

    low, ref = _recorders(pairs)
    effect = measure(Precision.FP16, [], [], low, ref, independent=independent)
    assert len(asked) == 1 and len(asked[0]) == th.INDEPENDENT_TESTED
    assert asked[0][0] == "critic.c11.bias"  # the furthest from fp32 first
    assert "critic.c0.weight" not in asked[0]
    off = {p.param for p in effect.off_params}
    assert off == {"critic.c0.weight"} | {f"critic.c{i}.bias" for i in range(12 - th.INDEPENDENT_TESTED)}
    assert set(effect.independent) == set(asked[0])
    assert "not judged: critic.c10.bias, critic.c11.bias, critic.c4.bias and 5 more" in effect.summary()


def test_an_error_within_a_cancelling_sums_rounding_is_not_off_but_one_of_its_own_size_is():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(256, generator=g)
    pairs = {
        "critic.head.weight": (w * 1.4, w),  # 40% off, from a sum whose terms are 500 times larger
        "critic.body.weight": (w * 1.4, w),  # the same error with no cancelling sum on its path
        "critic.tail.weight": (w * 12.0, w),  # 11x off: a term lost outright, not rounding (factor 20)
    }
    low, ref = _recorders(pairs)
    effect = measure(Precision.FP16, [], [], low, ref)
    assert {p.param for p in effect.off_params} == set(pairs)
    judged = within_cancellation(effect, {"critic.head.weight": 500.0, "critic.tail.weight": 20.0})
    assert {p.param for p in judged.off_params} == {"critic.body.weight", "critic.tail.weight"}
    assert judged.cancelling == (("critic.head.weight", 500.0),)
    assert "within rounding: critic.head.weight (1/5e+02)" in judged.summary()
    # Nothing to excuse: the same record back, not a copy with an empty list.
    assert within_cancellation(effect, {}) is effect


def test_zeros_are_excused_only_where_the_terms_rounding_can_cancel_them():
    # 8 of 256 gradient values are 0 in fp16 where fp32 has 0.02 of the largest: 3% zeroed, under 1% off
    # norm-wise. Terms twice the gradient's size cancel to 0 only below 2 x 2 x 9.8e-4 = 0.4% of it, so these
    # zeros are a flush upstream; terms 100 times its size can cancel anything below 20% of it.
    ref = torch.ones(256)
    ref[:8] = 0.02
    low = ref.clone()
    low[:8] = 0.0
    rec, ref_rec = _recorders({"critic.fc.weight": (low, ref)})
    effect = measure(Precision.FP16, [], [], rec, ref_rec)
    assert [p.param for p in effect.off_params] == ["critic.fc.weight"]
    mild = within_cancellation(effect, {"critic.fc.weight": 2.0}, rec, ref_rec)
    assert [p.param for p in mild.off_params] == ["critic.fc.weight"] and mild.cancelling == ()
    strong = within_cancellation(effect, {"critic.fc.weight": 100.0}, rec, ref_rec)
    assert strong.off_params == () and strong.cancelling == (("critic.fc.weight", 100.0),)
    # Without the samples to look at, zeros are never excused.
    assert within_cancellation(effect, {"critic.fc.weight": 100.0}).off_params == effect.off_params
