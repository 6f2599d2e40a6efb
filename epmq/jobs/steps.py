"""The steps every job shares: prepare the suite and data, merge, calibrate, evaluate, select.

A job (epmq.jobs.quantize.quantize, epmq.jobs.compare.compare; chosen by `job._target_`) is a sequence of
these steps. Everything a step logs goes through the Lightning loggers the job made once
(`make_loggers`): every Trainer of the job gets them, and `close_loggers` ends them.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from callbacks.block_metrics import BlockMetrics, peak_memory_mb
from callbacks.eval_progress import EvaluationProgress
from callbacks.expert_cache import ExpertActivationCache
from callbacks.step_saver import StepSaver
from epmq.core.anchor_choice import SELECT, SELECT_BY, ChosenEPMQ, candidate_grid
from epmq.engine.calibration import BlockwiseCalibration
from epmq.engine.targets import ExpertTargets
from epmq.families.base import Suite
from epmq.io.files import write_json_atomic
from epmq.io.fingerprint import resume_refusal, run_fingerprint
from epmq.io.pool import ExpertPool
from epmq.io.step_store import StepStore
from epmq.jobs.tracking import close_logger

log = logging.getLogger(__name__)

@dataclass
class Prepared:
    """What every job starts from: the suite, its validated experts, the merged weights, the data,
    the loggers and the run's fingerprint (for resuming)."""

    suite: object
    pool: ExpertPool
    merged_state: dict[str, torch.Tensor]
    data: object
    loggers: list
    fingerprint: dict = field(default_factory=dict)


# the loggers of the HTTP clients under huggingface_hub and datasets: one INFO line per request (hundreds on a
# first run from the hub), between the progress bars and in train.log
HTTP_LOGGERS = ("httpx", "httpcore", "httpx2", "httpcore2", "urllib3")  # huggingface_hub 2 uses httpx2


def quiet_libraries(log_http: bool = False) -> None:
    """Keep the terminal for the progress and the table: one trainer per calibration and evaluation would
    otherwise repeat Lightning's device banner many times, and the hub clients log every HTTP request at
    INFO. log_http: keep those request lines (cfg.log_http)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for name in HTTP_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if log_http else logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # Lightning internals
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


@contextmanager
def phase(what: str):
    """Log a phase of a job as it starts and when it ends, with its wall time and the process's peak resident
    memory so far (console and train.log)."""
    log.info("%s ...", what)
    t0 = time.perf_counter()
    yield
    log.info("%s: done in %.1f s (peak memory so far %.2f GiB)", what, time.perf_counter() - t0,
             peak_memory_mb(torch.device("cpu")) / 1024)


def build(node: DictConfig, where: str = "", **kwargs):
    """hydra.utils.instantiate, re-raising a ValueError of the target itself (bad options)
    unwrapped and prefixed with the config group it came from; options left at `???` are named, all of them,
    before anything is built."""
    missing = sorted(k for k in OmegaConf.missing_keys(node) if k.rsplit(".", 1)[-1] not in kwargs) \
        if isinstance(node, DictConfig) else []  # keys given here as keyword arguments are not missing
    if missing:
        names = ", ".join(k if not where or k.startswith(f"{where}.") else f"{where}.{k}" for k in missing)
        raise ValueError(f"{names} {'is' if len(missing) == 1 else 'are'} not set and {'has' if len(missing) == 1 else 'have'} "
                         f"no default: give {'it' if len(missing) == 1 else 'them'} on the command line "
                         f"(e.g. {names.split(', ')[0]}=...)")
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, (ValueError, MisconfigurationException)):
            raise ValueError(_in(where, e.__cause__)) from None
        raise


def _in(where: str, error: Exception) -> str:
    """An error message that starts with the config node it is about."""
    message = str(error)
    return message if not where or message.startswith(where) else f"{where}: {message}"


def resolved_config(cfg: DictConfig) -> dict:
    """The run's config as plain data, interpolations resolved (Hydra's own node left out)."""
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


# -- solvers and anchor candidates -----------------------------------------------------------------
def solvers(quant: DictConfig, anchor: DictConfig) -> list:
    """The solver objects `cfg.quant` asks for: one, or, when E-PMQ's strength or form is `auto`, one per anchor
    candidate of `cfg.anchor` (select=run or staged; strongest anchor first, so that ties keep the setting
    closest to GPTQ)
    or one that chooses as the calibration goes (select=block, layer). ValueError on bad options, before any work."""
    if anchor.select not in SELECT:
        raise ValueError(f"anchor.select must be one of {SELECT}, got {anchor.select!r}")
    if anchor.select_by not in SELECT_BY:
        raise ValueError(f"anchor.select_by must be one of {SELECT_BY}, got {anchor.select_by!r}")
    quant = OmegaConf.create(OmegaConf.to_container(quant, resolve=True))  # family defaults filled in, detached
    if "strength" not in quant:
        return [build(quant, "quant")]
    if anchor.select in ("block", "layer") and quant.strength == "auto":  # one calibration, chosen as it goes
        if quant.form == "auto":
            raise ValueError(f"anchor.select={anchor.select} chooses the strength only: set quant.form=output or weight")
        node = OmegaConf.masked_copy(quant, [k for k in quant if k != "strength"])
        if anchor.select == "block":
            return [build(node, "quant", _target_="epmq.core.anchor_choice.BlockChoiceEPMQ",
                          candidates=list(anchor.candidates.strength), neighbours=anchor.get("block_neighbours"),
                          select_share=anchor.get("block_select_share", 1.0))]
        return [build(node, "quant", _target_="epmq.core.anchor_choice.LayerwiseEPMQ",
                      candidates=list(anchor.candidates.strength), folds=anchor.folds)]
    strengths = anchor.candidates.strength if quant.strength == "auto" else [quant.strength]
    forms = anchor.candidates.form if quant.form == "auto" else [quant.form]
    try:
        grid = candidate_grid(strengths, forms)
    except ValueError as e:
        raise ValueError(f"quant.strength / anchor.candidates: {e}") from None
    return [build(quant, "quant", strength=s, form=f) for s, f in grid]


def candidate_label(solver) -> str:
    """'gptq', 'rtn', or 'epmq/<form>/strength_<λ>' (folder names and metric prefixes)."""
    if isinstance(solver, ChosenEPMQ):  # the strength is chosen per layer or per block as it goes
        return f"{solver.name}/{solver.form}/per_{solver.select}"
    if hasattr(solver, "strength"):
        return f"{solver.name}/{solver.form}/strength_{solver.strength:g}"
    return solver.name


# -- preparing ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Needs:
    """What a job's calibrations need beyond the model to quantize, known before the suite is built.

    experts / base: what needs suite.experts / suite.base, in words for the refusal ('' : nothing does).
    selection: held-out selection samples (an anchor choice); without it none are drawn (data.select_samples
    is not used), so that all the text a user brings can calibrate.
    """

    experts: str = ""
    base: str = ""
    selection: bool = True


def prepare(cfg: DictConfig, needs: Needs = Needs()) -> Prepared:
    """Seed, then the suite, the expert pool (every file validated), the data (options and splits
    checked), the merged weights and the loggers: every check before the merge, the long part."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    build(cfg.trainer, "trainer", logger=False)  # e.g. trainer=gpu without a GPU: refused now, not after the merge
    t0 = time.perf_counter()  # the checks say nothing unless one fails: then its one line is all a user reads
    suite = build(cfg.suite, "suite")
    if not isinstance(suite, Suite):
        raise ValueError(f"suite._target_={cfg.suite._target_} is not an epmq.families.base.Suite")
    check_models(cfg, suite, needs)
    pool = ExpertPool(suite.base, suite.experts, merged=suite.merged)
    options = OmegaConf.to_container(cfg.data, resolve=True)
    if not needs.selection and options.get("select_samples"):
        log.info("no anchor choice: no selection samples drawn (data.select_samples=%s unused)",
                 options["select_samples"])
        options["select_samples"] = 0
    try:
        data = suite.datamodule(**options, seed=cfg.seed)
        data.setup("fit")
    except ValueError as e:
        raise ValueError(_in("data", e)) from None
    log.info("suite, %d experts (files, keys, shapes, values) and data checked in %.1f s", len(pool.tasks),
             time.perf_counter() - t0)
    with phase("merge"):
        merged_state = merge(cfg, pool, suite)
    prepared = Prepared(suite, pool, merged_state, data, [])
    prepared.fingerprint = run_fingerprint(resolved_config(cfg), prepared)
    prepared.loggers = make_loggers(cfg)
    return prepared


def check_models(cfg: DictConfig, suite, needs: Needs) -> None:
    """One line naming each model option the run lacks, before anything is loaded: a merge needs suite.base and
    suite.experts, merge=none needs suite.merged, and `needs` says what the calibrations read besides."""
    merging = bool(cfg.merge and "_target_" in cfg.merge)
    if not merging and suite.merged is None:
        raise ValueError("merge=none needs a merged model: set suite.merged to its folder or hub id")
    reasons = {"suite.base": needs.base, "suite.experts": needs.experts}
    if merging:
        reasons = {k: f"merge._target_={cfg.merge._target_} merges the experts into their base (to quantize one "
                      f"model: merge=none suite.merged=<folder or hub id> quant=gptq)" for k in reasons}
    given = {"suite.base": suite.base is not None, "suite.experts": bool(suite.experts)}
    missing = [name for name, why in reasons.items() if why and not given[name]]
    if missing:
        why = "; ".join(dict.fromkeys(reasons[name] for name in missing))
        raise ValueError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: {why}")


def merge(cfg: DictConfig, pool: ExpertPool, suite) -> dict[str, torch.Tensor]:
    """The merged state dict: `cfg.merge` applied to the pool tensor by tensor, or the merged
    model the suite brings (merge=none)."""
    if cfg.merge and "_target_" in cfg.merge:
        merger = build(cfg.merge, "merge")
        merged = pool.merge(merger, tasks=suite.tasks)
    else:  # check_models has made sure the suite brings one
        merged = pool.merged_state_dict()
    bad = next((k for k, v in merged.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ValueError(f"the merged model has NaN/Inf values in '{bad}'")
    return merged


# -- logging --------------------------------------------------------------------------------------
def make_loggers(cfg: DictConfig) -> list:
    """The configured Lightning loggers (cfg.logger), made once per job; the resolved config goes
    to each as hyperparameters."""
    loggers = [build(node, "logger") for node in (cfg.logger or {}).values()]
    config = resolved_config(cfg)
    for logger in loggers:
        logger.log_hyperparams(config)
    return loggers


def close_loggers(loggers: list, status: str = "success") -> None:
    """End every logger of the job ("success" or "failed"), their files complete on return."""
    for logger in loggers:
        close_logger(logger, status)


@contextmanager
def logging_to(loggers: list):
    """The job's body: its loggers end as "success", or "failed" if the body raises."""
    status = "failed"
    try:
        yield
        status = "success"
    finally:
        close_loggers(loggers, status)


def trainer(cfg: DictConfig, prepared: Prepared, **kwargs) -> L.Trainer:
    """A Trainer from cfg.trainer that logs to the job's loggers."""
    return instantiate(cfg.trainer, logger=prepared.loggers or False, **kwargs)


# -- calibrating ----------------------------------------------------------------------------------
@dataclass
class Calibration:
    model: torch.nn.Module
    module: BlockwiseCalibration
    history: list[dict]
    seconds: float


def target_provider(cfg: DictConfig, pool, keep: bool = False) -> ExpertTargets:
    """The experts' targets (cfg.targets) for one calibration, or for several on the same batches: recorded by
    the first and replayed by the others when `keep`."""
    return build(cfg.targets, "targets")(pool, keep=keep)


def calibrate(cfg: DictConfig, prepared: Prepared, solver, state: dict | None = None, label: str = "",
              targets: ExpertTargets | None = None, store: StepStore | None = None, share: float = 1.0) -> Calibration:
    """Quantize a fresh copy of the merged model (or of `state`) with `solver`; one fit epoch per step.

    targets: a provider to share the experts' targets between calibrations on the same samples (None: a new
    one from the pool when the solver needs targets or the base model's layers). store: where finished steps
    are saved and, when it already holds some, where the calibration resumes from. share: calibrate on the
    first share of each task's calibration samples only (a low-fidelity calibration of the staged choice).
    """
    suite, needs = prepared.suite, solver.requirements
    model = suite.model(prepared.merged_state if state is None else state)
    done = store.load() if store is not None else []
    if targets is None and (needs.targets or needs.base):
        targets = target_provider(cfg, prepared.pool)
    module = build(cfg.calibration, "calibration")(
        model, suite.adapter(model), solver, suite.tasks, targets=targets, resume=done,
        selection=selection_loss(prepared, model, solver.select_share) if needs.per_step_choice else None)
    module.label = label
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values()]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar it was told not to show
        callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
    if module.targets is not None:
        callbacks.append(ExpertActivationCache(module.targets))
    if store is not None:
        callbacks.append(StepSaver(store))
    t0 = time.perf_counter()
    if module.remaining_steps:
        fit = trainer(cfg, prepared, max_epochs=module.remaining_steps, callbacks=callbacks).fit
        if share < 1:
            fit(module, train_dataloaders=prepared.data.train_dataloader(share))
        else:
            fit(module, datamodule=prepared.data)
    else:  # every step was finished by the run being resumed
        module.apply_finished(done)
    seconds = time.perf_counter() - t0
    metrics = next((cb for cb in callbacks if isinstance(cb, BlockMetrics)), None)
    return Calibration(model, module, metrics.history if metrics else [], seconds)


def selection_loss(prepared: Prepared, model, share: float = 1.0, loaders=None) -> Callable:
    """selection(device) -> the mean NLL of `model` (as it stands when called) on the held-out selection
    samples (the first share of each task's): the suite's evaluator over the model, scored without a Trainer
    (PerTaskEvaluator.mean_loss). loaders: per task, the batches to score instead (e.g. collated once for
    many candidates)."""
    evaluator = prepared.suite.evaluator({t: model for t in prepared.suite.tasks}, "select")
    loaders = prepared.data.select_dataloader(share) if loaders is None else loaders

    def selection(device) -> float:
        evaluator.to(device)  # the heads; the model itself is already there
        evaluator.eval()
        return evaluator.mean_loss(loaders, device)

    return selection


def layer_losses(calib: Calibration) -> dict:
    """Σ over layers of the solver's loss and of round-to-nearest's under the same H (None: RTN)."""
    metrics = list(calib.module.layer_metrics.values())
    if not metrics or "rtn_loss" not in metrics[0]:
        return {"layer_loss": None, "rtn_layer_loss": None}
    return {"layer_loss": sum(m["loss"] for m in metrics), "rtn_layer_loss": sum(m["rtn_loss"] for m in metrics)}


def calibration_record(calib: Calibration) -> list[dict]:
    """Per block: its label, time, peak memory and every layer's logged numbers (for report.json)."""
    blocks: dict[str, dict] = {}
    for step in calib.module.finished:
        entry = blocks.setdefault(step.label, {"block": step.label, "layers": {}})
        prefix = calib.module.schedule[step.index].prefix
        entry["layers"].update({name[len(prefix):]: m for name, m in step.metrics.items()})
    for record in calib.history:
        blocks.setdefault(record["block"], {"block": record["block"], "layers": {}}).update(
            {k.rsplit("/", 1)[-1]: v for k, v in record.items() if k != "block"})
    return list(blocks.values())


# -- evaluating -----------------------------------------------------------------------------------
def evaluate(cfg: DictConfig, prepared: Prepared, model, loaders, prefix: str):
    """`model` on every task's loader (the suite's evaluator); .results: the suite's metric per task
    and "avg" (accuracy in [0, 1] for classifiers), .nll: mean negative log-likelihood in nats per
    task and "avg"; logged as <prefix>/<task>/<metric>."""
    suite = prepared.suite
    evaluator = suite.evaluator({t: model for t in suite.tasks}, prefix)
    _test(cfg, prepared, evaluator, loaders)
    return evaluator


def evaluate_experts(cfg: DictConfig, prepared: Prepared) -> dict[str, float]:
    """Each expert on its own task's test split, one expert in memory at a time."""
    suite, pool = prepared.suite, prepared.pool
    builders = {t: (lambda t=t: suite.model(pool.expert_state_dict(t))) for t in suite.tasks}
    evaluator = suite.evaluator(builders, "experts/test")
    _test(cfg, prepared, evaluator, prepared.data.test_dataloader())
    return evaluator.results


def select_scores(cfg: DictConfig, prepared: Prepared, model, label: str, share: float = 1.0) -> dict[str, float]:
    """Average accuracy and cross-entropy on the held-out selection samples (never test data); share: on the
    first share of each task's selection samples only."""
    evaluator = evaluate(cfg, prepared, model, prepared.data.select_dataloader(share), f"select/{label}")
    return {"select_avg_acc": evaluator.results["avg"], "select_avg_nll": evaluator.nll["avg"]}


def select_half_scores(cfg: DictConfig, prepared: Prepared, model, label: str) -> dict[str, float]:
    """Accuracy and cross-entropy on each half of the selection samples (A, B; data.select_halves_dataloaders):
    select_a_avg_acc, select_a_avg_nll, select_b_avg_acc, select_b_avg_nll."""
    scores = {}
    for half, loaders in zip("ab", prepared.data.select_halves_dataloaders()):
        evaluator = evaluate(cfg, prepared, model, loaders, f"select_{half}/{label}")
        scores.update({f"select_{half}_avg_acc": evaluator.results["avg"], f"select_{half}_avg_nll": evaluator.nll["avg"]})
    return scores


def _test(cfg: DictConfig, prepared: Prepared, evaluator, loaders) -> None:
    """trainer.test over the task loaders, its progress in log lines (and a console bar when the trainer shows one)."""
    progress = EvaluationProgress(evaluator.prefix, bar=cfg.trainer.get("enable_progress_bar", True))
    trainer(cfg, prepared, enable_progress_bar=False, callbacks=[progress]).test(evaluator, dataloaders=list(loaders),
                                                                              verbose=False)


RUN_FINGERPRINT = "fingerprint.json"


def claim_run_folder(out_dir: Path, prepared: Prepared, resume: str | None) -> None:
    """Tie the run folder to this run's fingerprint (models, data, options, version), before any work.

    A new run refuses a folder that already holds one (no silent mixing); a resumed run
    (resume=<folder>) refuses a folder whose fingerprint differs, naming every option that changed.
    """
    path = out_dir / RUN_FINGERPRINT
    current = json.loads(json.dumps(prepared.fingerprint, default=str))
    if resume and Path(resume).expanduser().resolve() != out_dir.resolve():
        raise ValueError(f"resume={resume} but the run folder is {out_dir} (hydra.run.dir overrides it): "
                         f"pass resume alone, it sets the run folder")
    if resume:
        if not path.is_file():
            raise ValueError(f"resume={out_dir}: no run to resume there ({RUN_FINGERPRINT} is missing)")
        changed = resume_refusal(json.loads(path.read_text()), current)
        if changed:
            raise ValueError(f"cannot resume {out_dir}: {changed}")
    elif rank_zero_only.rank == 0:  # other DDP ranks start later and find rank 0's claim: not theirs to judge
        if path.is_file():
            raise ValueError(f"{out_dir} already holds a run; pass resume={out_dir} to continue it, "
                             f"or run in a new folder")
        write_json_atomic(path, current)


def run_folder_store(out_dir: Path, name: str, prepared: Prepared) -> StepStore:
    """The StepStore of one calibration of this run (<run>/calibration/<name>)."""
    return StepStore(out_dir / "calibration" / name, {**prepared.fingerprint, "calibration": name})
