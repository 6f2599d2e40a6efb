"""The staged anchor choice (anchor.select=staged): most candidates scored at low fidelity, few calibrated in full.

    candidates = anchor.candidates (strongest first)
    for each round of anchor.rounds (fidelity, calib_share, select_share, keep):
        open_loop    one pass gathers every layer's statistics on calib_share of the calibration samples and
                     every candidate is solved from them (OpenLoopEPMQ): a solve per layer, no calibration per
                     candidate. The pass runs on the FP merged model (pivot null), or is itself the calibration
                     at the candidate λ0 = pivot (first round only), which is then not calibrated again if kept
        sequential   each candidate calibrated as usual, on calib_share of the calibration samples
        each candidate's model scored on select_share of the selection samples; keep the best `keep`
    the survivors: calibrated at full fidelity by the job (and scored on all the selection samples if several)

With no rounds this is the run-level choice (anchor.select=run). Ties keep the stronger anchor, as everywhere.
A finished round is written to <run>/calibration/rounds.json, so a resumed run starts at the first round not
there (a sequential round's calibrations also resume step by step from their own folders).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from epmq.core.anchor import parse_strength
from epmq.core.anchor_choice import OpenLoopEPMQ, check_share, selection_key
from epmq.io.files import write_json_atomic
from epmq.io.quantized_layer import QuantizedLayer
from epmq.jobs.steps import (Prepared, calibrate, candidate_label, phase, run_folder_store, select_scores,
                             selection_loss, target_provider)

log = logging.getLogger(__name__)

FIDELITIES = ("open_loop", "sequential")
ROUNDS_FILE = "rounds.json"


@dataclass(frozen=True)
class Round:
    """One round of the staged choice: how its candidates are calibrated and scored, and how many go on."""

    fidelity: str = "open_loop"   # open_loop | sequential
    calib_share: float = 1.0      # of each task's calibration samples
    select_share: float = 1.0     # of each task's selection samples
    keep: int = 1                 # candidates that go on to the next round
    pivot: float | str | None = None  # open_loop: the pass calibrates at this candidate (None: the FP merge)

    def describe(self) -> str:
        """'open loop, 1/4 of the selection samples, keeps 2' (for progress lines)."""
        parts = [self.fidelity.replace("_", " ") + ("" if self.pivot is None else f" at λ = {self.pivot}")]
        if self.calib_share < 1:
            parts.append(f"{self.calib_share:g} of the calibration samples")
        if self.select_share < 1:
            parts.append(f"{self.select_share:g} of the selection samples")
        return ", ".join(parts) + f", keeps {self.keep}"


def rounds_of(anchor: DictConfig) -> list[Round]:
    """The rounds anchor.select asks for (none for `run`); ValueError naming the bad option."""
    if anchor.select != "staged":
        return []
    node = anchor.get("rounds")
    given = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    if not isinstance(given, list) or not given:
        raise ValueError("anchor.select=staged needs anchor.rounds: a list of {fidelity, calib_share, "
                         "select_share, keep} (anchor.select=run scores every candidate at full fidelity)")
    rounds = []
    for k, entry in enumerate(given):
        where = f"anchor.rounds[{k}]"
        if not isinstance(entry, dict) or set(entry) - set(Round.__dataclass_fields__):
            raise ValueError(f"{where} must be a mapping of {list(Round.__dataclass_fields__)}, got {entry!r}")
        r = Round(**entry)
        if r.fidelity not in FIDELITIES:
            raise ValueError(f"{where}.fidelity must be one of {FIDELITIES}, got {r.fidelity!r}")
        for name in ("calib_share", "select_share"):
            check_share(getattr(r, name), f"{where}.{name}")
        if isinstance(r.keep, bool) or not isinstance(r.keep, int) or r.keep < 1:
            raise ValueError(f"{where}.keep must be an integer >= 1, got {r.keep!r}")
        if r.pivot is not None and (r.fidelity != "open_loop" or k > 0):
            raise ValueError(f"{where}.pivot: only the first round's open-loop pass can calibrate at a pivot")
        if r.pivot is not None:
            parse_strength(r.pivot)
        if r.fidelity == "sequential" and r.calib_share == 1 and r.select_share == 1:
            raise ValueError(f"{where} is a full-fidelity sequential round: that is what follows the rounds; "
                             f"give it a calib_share or select_share below 1")
        rounds.append(r)
    return rounds


def open_loop_solvers(candidates: list, pivot=None) -> list[OpenLoopEPMQ]:
    """One OpenLoopEPMQ per anchor form among the candidates (EPMQ solvers; the pivot goes to the first form's),
    made before any long work too, so that options it cannot take are refused at once."""
    forms = list(dict.fromkeys(c.form for c in candidates))
    return [OpenLoopEPMQ([c.strength for c in candidates if c.form == form], form, pivot if k == 0 else None,
                         **{k: getattr(candidates[0], k) for k in ("normalize", "interp", "extrapolate",
                                                                   "calibrate_bias", "calibrate_norms")},
                         overrides=candidates[0].overrides.describe(), lm_head=candidates[0].lm_head,  # refused
                         **candidates[0].spec.__dict__) for k, form in enumerate(forms)]


def choose(cfg: DictConfig, prepared: Prepared, candidates: list, rounds: list[Round], out_dir: Path):
    """The anchor choice of a run: the rounds (if any), then every survivor calibrated at full fidelity and, when
    there are several, scored on all the selection samples; a single candidate is just calibrated.

    Returns (the chosen solver, its Calibration, the full-fidelity candidates' scores, the rounds' records).
    Every calibration saves its finished steps under out_dir/calibration/ (resume).
    """
    # E-PMQ's targets do not depend on the anchor: record them once, replay them for every candidate
    targets = target_provider(cfg, prepared.pool, keep=len(candidates) > 1)
    records, done = [], {}
    if rounds:
        candidates, records, done = shortlist(cfg, prepared, candidates, rounds, out_dir, targets)
    suite, selection, best = prepared.suite, [], None
    for k, solver in enumerate(candidates):
        label = candidate_label(solver)
        store = run_folder_store(out_dir, label, prepared)
        shown = f"{label} ({k + 1}/{len(candidates)})" if len(candidates) > 1 else ""
        if label in done:  # the pivot's pass already was this calibration
            calib = done[label]
            log.info("calibration %s: the first round's pass, kept", label)
        else:
            with phase(f"calibration {shown or label}"):
                calib = calibrate(cfg, prepared, solver, label=shown, targets=targets, store=store)
        if len(candidates) == 1:  # the only candidate, or the rounds' one survivor
            return solver, calib, selection, records
        scores = store.extra.get("select") or select_scores(cfg, prepared, calib.model, label)
        if rank_zero_only.rank == 0:
            store.record(select=scores)
        selection.append({"strength": solver.strength, "form": solver.form, **scores, "seconds": calib.seconds})
        log.info("candidate %s: select %s %.4g, nll %.4f", label, suite.metric, scores["select_avg_acc"],
                 scores["select_avg_nll"])
        key = selection_key(scores, cfg.anchor.select_by, suite.higher_is_better)
        if best is None or key > best[0]:  # candidates come strongest first: ties keep the stronger
            best = (key, solver, calib)
    return best[1], best[2], selection, records


def shortlist(cfg: DictConfig, prepared: Prepared, candidates: list, rounds: list[Round], out_dir: Path,
              targets) -> tuple[list, list[dict], dict]:
    """Run the rounds over `candidates` (EPMQ solvers, strongest first). Returns (the survivors, in candidate
    order; a record per round: its options, every candidate's scores, the survivors, its seconds; label ->
    Calibration of a full-fidelity pass at a pivot, which its candidate need not repeat).

    targets: the job's provider on all the calibration samples (an open-loop pass at full share records the
    experts' targets into it, for the survivors' calibrations to replay)."""
    done = _finished_rounds(out_dir, candidates, rounds)
    alive, records, passes = list(candidates), [], {}
    for r, spec in enumerate(rounds):
        title = f"anchor choice, round {r + 1}/{len(rounds)} ({spec.describe()}): {len(alive)} candidates"
        if r < len(done):
            record = done[r]
            log.info("%s: done in the run being resumed", title)
        else:
            t0 = time.perf_counter()
            with phase(title):
                if spec.fidelity == "open_loop":
                    scores, passes, split = _open_loop_scores(cfg, prepared, alive, spec, r, len(rounds), targets)
                else:
                    scores, split = _sequential_scores(cfg, prepared, alive, spec, r, len(rounds), out_dir)
            ranked = _ranked(alive, scores, cfg.anchor.select_by, prepared.suite.higher_is_better)
            record = {"round": r + 1, **asdict(spec), "scores": {candidate_label(c): scores[candidate_label(c)]
                                                                   for c in alive},
                      "kept": [candidate_label(c) for c in ranked[:spec.keep]],
                      "seconds": time.perf_counter() - t0, **split}
            for c in ranked:
                log.info("round %d, %s: select %s", r + 1, candidate_label(c), ", ".join(
                    f"{k[len('select_avg_'):]} {v:.4f}" for k, v in scores[candidate_label(c)].items()))
            if rank_zero_only.rank == 0:
                write_json_atomic(out_dir / "calibration" / ROUNDS_FILE, records + [record])
        kept = set(record["kept"])
        alive = [c for c in alive if candidate_label(c) in kept]  # candidate order: strongest first
        log.info("round %d keeps %s", r + 1, ", ".join(record["kept"]))
        records.append(record)
    return alive, records, {k: v for k, v in passes.items() if k in {candidate_label(c) for c in alive}}


def _ranked(alive: list, scores: dict, select_by: str, higher_is_better: bool) -> list:
    """Candidates best first; a stable sort over the strongest-first order keeps the stronger anchor on ties."""
    return sorted(alive, key=lambda c: -selection_key(scores[candidate_label(c)], select_by, higher_is_better))


def _open_loop_scores(cfg, prepared: Prepared, alive: list, spec: Round, r: int, n: int, targets):
    """Every candidate solved from one shared pass per anchor form, each model scored on the selection share.
    Returns (label -> scores, label -> the pass's Calibration when it calibrated that candidate in full, where
    the time went: the passes' seconds, the part of them spent solving, the scoring's)."""
    scores, passes, split = {}, {}, {"pass_s": 0.0, "solve_s": 0.0, "scoring_s": 0.0}
    batches = collated(cfg, prepared, spec.select_share)
    provider = targets if spec.calib_share == 1 else None  # the full-share pass records what the survivors replay
    for solver in open_loop_solvers(alive, spec.pivot):
        bits = solver.spec.bits
        solver.keep = lambda result: QuantizedLayer.from_result(result, bits)
        t0 = time.perf_counter()
        calib = calibrate(cfg, prepared, solver, label=f"round {r + 1}/{n} · shared pass", targets=provider,
                          share=spec.calib_share)
        names = [step.prefix + name for step in calib.module.schedule for name in step.layers]
        if len(names) != len(solver.solutions):
            raise RuntimeError(f"the shared pass solved {len(solver.solutions)} layers for {len(names)} in "
                               f"the schedule")
        split["pass_s"] += time.perf_counter() - t0
        split["solve_s"] += solver.seconds
        log.info("shared pass: %d layers, %d candidates each, in %.1f s (%.1f s of it solving)", len(names),
                 len(solver.candidates), time.perf_counter() - t0, solver.seconds)
        model, t0 = calib.model, time.perf_counter()
        # the model holds the pivot's own calibration: it is scored first, as it is (a stable sort)
        order = sorted((c for c in alive if c.form == solver.form), key=lambda c: c.strength != solver.pivot)
        for c in order:
            if c.strength != solver.pivot:
                _write(model, names, solver.solutions, c.strength)
            label = candidate_label(c)
            scores[label] = round_scores(cfg, prepared, model, f"round_{r + 1}/{label}", spec.select_share, batches)
        split["scoring_s"] += time.perf_counter() - t0
        if solver.pivot is not None and spec.calib_share == 1:
            _write(model, names, solver.solutions, solver.pivot)  # back to the pass's own calibration
            passes[candidate_label(order[0])] = calib
    return scores, passes, split


def round_scores(cfg, prepared: Prepared, model, label: str, share: float, batches=None) -> dict[str, float]:
    """A candidate's score in a round: with anchor.select_by=nll and the model on one device, its mean NLL on
    the selection share computed there without a Trainer, over `batches` (per task, the share's batches collated
    once for every candidate of the round); else select_scores (accuracy and NLL)."""
    devices = {p.device for p in model.parameters()}
    if cfg.anchor.select_by != "nll" or len(devices) != 1:
        return select_scores(cfg, prepared, model, label, share)
    return {"select_avg_nll": selection_loss(prepared, model, share, batches)(devices.pop())}


def collated(cfg, prepared: Prepared, share: float) -> list[list] | None:
    """Per task, the batches of the selection share, loaded and collated once (a round scores them many times);
    None when round_scores goes through select_scores, which loads its own (anchor.select_by=acc)."""
    if cfg.anchor.select_by != "nll":
        return None
    return [list(loader) for loader in prepared.data.select_dataloader(share)]


def _write(model, names: list[str], solutions: list[dict], strength: float) -> None:
    """Write one candidate's quantized weights (a shared pass's solutions) into the model's linear layers."""
    with torch.no_grad():
        for name, solved in zip(names, solutions):
            weight = model.get_submodule(name).weight
            weight.copy_(solved[strength].weight().to(weight))


def _sequential_scores(cfg, prepared: Prepared, alive: list, spec: Round, r: int, n: int, out_dir: Path) -> dict:
    """Each candidate calibrated on the calibration share (their targets shared), scored on the selection share.
    Returns (label -> scores, the calibrations' and the scoring's seconds)."""
    scores, split = {}, {"calibration_s": 0.0, "scoring_s": 0.0}
    batches = collated(cfg, prepared, spec.select_share)
    targets = target_provider(cfg, prepared.pool, keep=len(alive) > 1)
    for k, c in enumerate(alive):
        label = candidate_label(c)
        store = run_folder_store(out_dir, f"round_{r + 1}/{label}", prepared)
        t0 = time.perf_counter()
        calib = calibrate(cfg, prepared, c, label=f"round {r + 1}/{n} · {label} ({k + 1}/{len(alive)})",
                          targets=targets, store=store, share=spec.calib_share)
        t1 = time.perf_counter()
        scores[label] = store.extra.get("select") or round_scores(cfg, prepared, calib.model,
                                                                   f"round_{r + 1}/{label}", spec.select_share,
                                                                   batches)
        split["calibration_s"] += t1 - t0
        split["scoring_s"] += time.perf_counter() - t1
        if rank_zero_only.rank == 0:
            store.record(select=scores[label])
    return scores, split


def _finished_rounds(out_dir: Path, candidates: list, rounds: list[Round]) -> list[dict]:
    """The rounds a resumed run already finished (<run>/calibration/rounds.json), if they are this run's."""
    path = out_dir / "calibration" / ROUNDS_FILE
    if not path.is_file():
        return []
    done = json.loads(path.read_text())
    labels = {candidate_label(c) for c in candidates}
    for r, record in enumerate(done):
        if r >= len(rounds) or {k: record[k] for k in asdict(rounds[r])} != asdict(rounds[r]) \
                or not set(record["scores"]) <= labels:
            raise ValueError(f"{path}: round {r + 1} was run with other options than anchor.rounds now says")
    return done

