"""What each solver asks the engine for, in one value (epmq.core.solvers.Requirements)."""

from __future__ import annotations

import math

from epmq.core.anchor_choice import BlockChoiceEPMQ, LayerwiseEPMQ
from epmq.core.solvers import EPMQ, GPTQ, RTN, RelaxedEPMQ, Requirements


def test_each_solver_declares_what_it_needs():
    assert RTN().requirements == Requirements(statistics=False)
    assert GPTQ().requirements == Requirements()
    assert EPMQ(strength=1.0).requirements == Requirements(targets=True)
    assert EPMQ(strength=math.inf).requirements == Requirements()  # GPTQ of the merged weights: no expert runs
    assert EPMQ(strength=1.0, normalize=True, interp=0.5, extrapolate=2.0, calibrate_bias=True,
                calibrate_norms=True).requirements == Requirements(targets=True, base=True, normalize=True, interp=0.5,
                                                                   bias=True, norms=True)
    assert EPMQ(strength=math.inf, extrapolate=2.0).requirements == Requirements(base=True)  # the anchor moves
    assert RelaxedEPMQ(strength=1.0).requirements == Requirements(targets=True, codes=False)
    assert LayerwiseEPMQ([0.0, "inf"], folds=3).requirements == Requirements(targets=True, folds=3)
    assert LayerwiseEPMQ(["inf"]).requirements == Requirements(folds=2)
    assert BlockChoiceEPMQ([1.0, math.inf]).requirements == Requirements(targets=True, per_step_choice=True)
