"""The staged anchor choice checked on any suite: the model it keeps is plain E-PMQ at the strength it chose."""

from __future__ import annotations

import torch

from epmq.core.solvers import EPMQ
from epmq.jobs.staged_choice import choose, rounds_of
from epmq.jobs.steps import calibrate, candidate_label, prepare, solvers

SPEC_KEYS = ("bits", "group_size", "sym", "act_order", "static_groups", "percdamp", "blocksize")


def choice_is_plain_epmq(cfg, out_dir) -> tuple[float, list[dict]]:
    """Run the job's choice (cfg.anchor) and compare the kept model with a plain E-PMQ calibration at the chosen
    strength, tensor by tensor (AssertionError naming the first that differs). Returns (λ, the rounds' records)."""
    prepared = prepare(cfg)
    candidates = solvers(cfg.quant, cfg.anchor)
    chosen, calib, _, records = choose(cfg, prepared, candidates, rounds_of(cfg.anchor), out_dir)
    assert set(records[0]["scores"]) == {candidate_label(c) for c in candidates}
    plain = EPMQ(chosen.strength, chosen.form, **{k: cfg.quant[k] for k in SPEC_KEYS})
    expected = calibrate(cfg, prepared, plain).model.state_dict()
    got = calib.model.state_dict()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert calib.module.quant_results  # codes kept: the model can be exported
    return chosen.strength, records
