"""The suite contract: a Suite base class whose optional members have defaults, found by `_target_` without
making the suite; the engine's adapter for a model, by class."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from epmq.families.base import ADAPTERS, Suite, adapter_for, suite_class
from epmq.families.causal_lm.adapter import LlamaAdapter
from epmq.families.causal_lm.suite import CausalLMSuite
from epmq.families.clip.adapter import CLIPVisionAdapter
from epmq.families.clip.suite import ClipSuite
from epmq.families.flan_t5.suite import FlanT5Suite
from epmq.families.offline.suite import OfflineSuite

from helpers.families import FAMILIES


def test_every_family_is_a_suite_with_the_optional_members_defined():
    for node, cls in (("epmq.families.offline.suite.OfflineSuite", OfflineSuite),
                      ("epmq.families.clip.suite.ClipSuite", ClipSuite),
                      ("epmq.families.flan_t5.suite.FlanT5Suite", FlanT5Suite),
                      ("epmq.families.causal_lm.suite.CausalLMSuite", CausalLMSuite)):
        assert suite_class(OmegaConf.create({"_target_": node})) is cls and issubclass(cls, Suite)
    # image suites feed RegMean their pixels; the text suites say why they do not (padded tokens)
    assert OfflineSuite.regmean_unsupported is None and ClipSuite.regmean_unsupported is None
    assert "padded" in FlanT5Suite.regmean_unsupported and "padded" in CausalLMSuite.regmean_unsupported
    assert (CausalLMSuite.higher_is_better, CausalLMSuite.metric_scale) == (False, 1)
    assert (OfflineSuite.higher_is_better, OfflineSuite.metric_scale, OfflineSuite.metric) == (True, 100, "acc")


def test_a_suite_that_keeps_the_defaults_gets_them():
    class Tiny(Suite):
        name, tasks = "tiny", ["a"]

    suite = Tiny()
    assert suite.extra_evaluation(None) == {} and suite.merged is None and suite.describe() == {
        "name": "tiny", "tasks": ["a"]}
    with pytest.raises(ValueError, match="suite tiny: its batches have no RegMean inputs"):
        suite.regmean_inputs({})
    model = FAMILIES["llama"].base()
    assert isinstance(suite.adapter(model), LlamaAdapter)  # by the model's class


def test_a_target_that_is_no_suite_is_refused_by_name():
    with pytest.raises(ValueError, match=r"suite\._target_=epmq\.core\.solvers\.EPMQ is not an epmq\.families"):
        suite_class(OmegaConf.create({"_target_": "epmq.core.solvers.EPMQ"}))
    with pytest.raises(ValueError, match=r"suite\._target_: cannot import 'epmq\.families\.nothing\.Suite'"):
        suite_class(OmegaConf.create({"_target_": "epmq.families.nothing.Suite"}))


def test_adapters_by_class_name():
    assert isinstance(adapter_for(FAMILIES["clip"].base()), CLIPVisionAdapter)
    assert {"CLIPVisionModel", "LlamaForCausalLM", "T5ForConditionalGeneration"} <= set(ADAPTERS)
    with pytest.raises(ValueError, match="no adapter for model class Linear"):
        adapter_for(torch.nn.Linear(2, 2))
