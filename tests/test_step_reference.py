"""No behaviour change: every method's training step (default config) equals the stored reference record made
before a refactor (tests/step_reference.py explains the record and how to rewrite it when a change is intended)."""
from __future__ import annotations

import json
import math

import pytest

from step_reference import METHODS, STORED, reference_steps


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7) or (math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("name", METHODS)
def test_step_equals_the_reference_record(name, tiny_data, tmp_path):
    stored = json.loads(STORED.read_text())[name]
    now = reference_steps(name, tiny_data, tmp_path)
    assert len(now["steps"]) == len(stored["steps"]) == 2
    for i, (a, b) in enumerate(zip(now["steps"], stored["steps"])):
        assert _close(a["loss"], b["loss"]), (name, i, "loss", a["loss"], b["loss"])
        assert a["logs"].keys() == b["logs"].keys(), (name, i, sorted(a["logs"]), sorted(b["logs"]))
        for k in a["logs"]:
            assert _close(a["logs"][k], b["logs"][k]), (name, i, k, a["logs"][k], b["logs"][k])
        assert a["grads"].keys() == b["grads"].keys(), (name, i, "parameters with gradients differ")
        for p in a["grads"]:
            assert all(_close(x, y) for x, y in zip(a["grads"][p], b["grads"][p])), (name, i, p)
