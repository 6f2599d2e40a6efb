"""Per-module quantization options: rules keyed by a regular expression over module names.

    overrides = {r"model\.layers\.0\.mlp\.down_proj": {"bits": 8, "group_size": 64},
                 r".*\.down_proj": {"skip": True}}

A module takes the first rule, in the mapping's order, whose pattern matches its *whole* name (re.fullmatch),
so that "model.layers.1.mlp" never catches "model.layers.10.mlp"; modules no rule matches keep the solver's own
QuantSpec. A rule sets `bits` and/or `group_size` (the rest of the spec is the solver's), or `skip: true`: the
module is not quantized and stays in float. `skip: false` with nothing else keeps the default spec, which
exempts modules from a broader rule further down.

GPTQ checkpoints record the same thing in quantize_config.json's "dynamic" (GPTQModel): "+:<regex>" -> the
fields it overrides, "-:<regex>" -> the module is not quantized; the first key that matches wins, and a key
matches from the start of the name (re.match). `dynamic()` writes each pattern anchored, ^(?:pattern)$, so that
a start-anchored match is a whole-name match; `match_dynamic` reads any such mapping as GPTQModel does.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass

from epmq.core.quant import QuantSpec

RULE_KEYS = ("bits", "group_size", "skip")


@dataclass(frozen=True)
class Rule:
    """One override: the modules whose whole name matches `pattern` get `bits` / `group_size` (None: the
    solver's), or stay in float (`skip`)."""

    pattern: str
    bits: int | None = None
    group_size: int | None = None
    skip: bool = False

    def fields(self) -> dict:
        """What the rule changes, as GPTQModel's dynamic entries hold it ({} for skip or none)."""
        return {k: getattr(self, k) for k in ("bits", "group_size") if getattr(self, k) is not None}


class ModuleOverrides:
    """The rules of `overrides` (pattern -> {bits, group_size, skip}), checked; option: the name used in errors.

    ValueError naming the option and the rule on a bad pattern, key or value (before any work)."""

    def __init__(self, overrides: Mapping | None = None, option: str = "overrides"):
        if overrides is None:
            overrides = {}
        if not isinstance(overrides, Mapping):
            raise ValueError(f"{option} must be a mapping of module-name regex -> {{bits, group_size, skip}}, "
                             f"got {type(overrides).__name__}")
        self.option = option
        self.rules: list[Rule] = []
        self._compiled: list[re.Pattern] = []
        for pattern, value in overrides.items():
            where = f"{option}[{pattern!r}]"
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"{option}: every key must be a non-empty regular expression, got {pattern!r}")
            try:
                compiled = re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{where}: not a valid regular expression ({e})") from None
            if not isinstance(value, Mapping):
                raise ValueError(f"{where} must be a mapping with keys among {RULE_KEYS}, got {value!r}")
            unknown = sorted(str(k) for k in value if k not in RULE_KEYS)
            if unknown:
                raise ValueError(f"{where}: unknown key(s) {unknown}; a rule takes {RULE_KEYS}")
            skip = value.get("skip", False)
            if not isinstance(skip, bool):
                raise ValueError(f"{where}.skip must be true or false, got {skip!r}")
            rule = Rule(pattern, value.get("bits"), value.get("group_size"), skip)
            if skip and rule.fields():
                raise ValueError(f"{where}: skip=true leaves the module in float, so {sorted(rule.fields())} "
                                 f"would mean nothing; give one or the other")
            try:  # QuantSpec says what a valid bits / group_size is
                dataclasses.replace(QuantSpec(), **rule.fields())
            except ValueError as e:
                raise ValueError(f"{where}: {str(e).replace('QuantSpec.', '')}") from None
            self.rules.append(rule)
            self._compiled.append(compiled)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __iter__(self):
        return iter(self.rules)

    def rule_for(self, name: str) -> Rule | None:
        """The first rule whose pattern matches the whole module name, or None."""
        return next((r for r, c in zip(self.rules, self._compiled) if c.fullmatch(name)), None)

    def spec_for(self, name: str, spec: QuantSpec) -> QuantSpec | None:
        """The QuantSpec of module `name` (`spec` itself when no rule changes it); None: it stays in float."""
        rule = self.rule_for(name)
        if rule is None or not rule.fields():
            return None if rule is not None and rule.skip else spec
        return dataclasses.replace(spec, **rule.fields())

    def unmatched(self, names) -> list[str]:
        """The patterns that match none of `names` (each a whole module name)."""
        names = list(names)
        return [r.pattern for r, c in zip(self.rules, self._compiled) if not any(c.fullmatch(n) for n in names)]

    def check_used(self, names) -> None:
        """ValueError naming every rule that matches none of the modules `names` (a typo would otherwise cost a
        whole run quantized as if the rule were not there)."""
        unused = self.unmatched(names)
        if unused:
            names = list(names)
            sample = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise ValueError(f"{self.option}: rule(s) {unused} match no quantized module (a rule must match a whole "
                             f"name, e.g. {sample})")

    def describe(self) -> dict:
        """pattern -> what it sets, in rule order (as the config gives it)."""
        return {r.pattern: ({"skip": True} if r.skip else r.fields()) for r in self.rules}

    def dynamic(self) -> dict:
        """GPTQModel's quantize_config "dynamic": "+:^(?:p)$" -> {bits, group_size}, "-:^(?:p)$" -> {} (skip)."""
        return {f"{'-' if r.skip else '+'}:^(?:{r.pattern})$": r.fields() for r in self.rules}


def match_dynamic(dynamic: Mapping | None, name: str) -> dict | bool | None:
    """What a checkpoint's "dynamic" mapping says of module `name`, read as GPTQModel reads it: the first key
    (in order) whose regex matches from the start of the name (re.match; "+:" or no prefix: overrides, "-:": not
    quantized) decides. Returns that key's overrides (a dict), False (not quantized) or None (no key matches)."""
    for key, fields in (dynamic or {}).items():
        negative = key.startswith("-:")
        pattern = key[2:] if key.startswith(("-:", "+:")) else key
        if re.match(pattern, name):
            return False if negative else dict(fields or {})
    return None
