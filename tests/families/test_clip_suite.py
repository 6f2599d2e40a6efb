"""The clip suite on a tiny CLIP zoo written to disk (tests/helpers/clip_zoo.py): the job end to end, zero-shot
accuracy against transformers' own CLIPModel features, heads, sources, and hub failures."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, CLIPModel

from epmq.core.stats import LayerStatistics
from epmq.families.clip import suite as clip_suite
from epmq.families.clip.suite import ClipSuite, resolve_tasks
from epmq.io.pool import ExpertPool
from epmq.jobs.run import run

from helpers import clip_zoo
from helpers import openclip_reference as ref
from helpers.clip_zoo import CLASSES, TASKS
from helpers.config import ROOT, make_cfg
from helpers.hub_server import dataset_card, parquet_files


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip-zoo")
    return {"root": root, **clip_zoo.build(root)}


def suite_options(root: Path) -> list[str]:
    """Command-line overrides selecting the clip suite on the zoo under root."""
    return ["suite=clip", f"suite.base={root}/base", f"suite.experts='{root}/experts/{{task}}'",
            f"suite.datasets='{root}/data/{{task}}'", f"suite.tasks=[{','.join(TASKS)}]"]


RUN_OPTIONS = ["data.calib_samples=8", "data.select_samples=0", "data.batch_size=8", "quant.strength=1.0",
               "quant.form=output"]


def local_suite(root: Path, cache: Path, **options) -> ClipSuite:
    return ClipSuite(base=str(root / "base"), experts=str(root / "experts" / "{task}"),
                     datasets=str(root / "data" / "{task}"), tasks=TASKS, cache_dir=str(cache), **options)


@pytest.fixture(scope="module")
def job(zoo, tmp_path_factory):
    """The main job through the compose API: merge, E-PMQ (λ = 1), zero-shot evaluation."""
    out = tmp_path_factory.mktemp("clip-run")
    cfg = make_cfg(out, out / "cache" / "zoo", *suite_options(zoo["root"]), *RUN_OPTIONS,
                   "data.test_samples=null", "save_model=false")
    return {"report": run(cfg), "out": out}


def check_report(report: dict) -> None:
    """Today's report schema: metrics.<experts|merged|quantized>.<task> in [0, 1], and their mean as avg."""
    assert report["metric"] == "acc" and report["suite"]["name"] == "clip" and report["suite"]["tasks"] == TASKS
    for model in ("experts", "merged", "quantized"):
        accs = report["metrics"][model]
        assert set(accs) == {*TASKS, "avg"}
        assert all(0.0 <= a <= 1.0 for a in accs.values())
        assert accs["avg"] == pytest.approx(sum(accs[t] for t in TASKS) / len(TASKS))
    assert [b["block"] for b in report["calibration"]] == ["block_0", "block_1"]  # the tiny tower's blocks
    assert report["method"] == "epmq"


def test_job_merges_quantizes_and_reports_zero_shot_accuracy(job):
    report = job["report"]
    check_report(report)
    assert json.loads((job["out"] / "report.json").read_text())["metrics"] == report["metrics"]
    heads = report["suite"]["heads"]
    assert {t: h["classes"] for t, h in heads.items()} == {t: len(CLASSES[t]) for t in TASKS}
    assert all(h["classnames_from"] == "the dataset's ClassLabel names" for h in heads.values())


def features(out) -> torch.Tensor:
    """get_text_features / get_image_features' result: transformers 5 returns an output whose
    pooler_output is the projected features, transformers 4 the tensor itself."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def text_features(root: Path, prompts: list[str]) -> torch.Tensor:
    """(N, P) projected text features of the base CLIPModel for each prompt (transformers' own code)."""
    model = CLIPModel.from_pretrained(str(root / "base")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(root / "base"))
    return features(model.get_text_features(**tokenizer(prompts, padding=True, return_tensors="pt")))


def independent_accuracy(root: Path, tower, task: str) -> float:
    """Zero-shot accuracy of the base CLIPModel carrying `tower`'s weights, from transformers' own
    get_text_features / get_image_features on the task's test images."""
    from datasets import load_from_disk

    model = CLIPModel.from_pretrained(str(root / "base")).eval()
    model.vision_model.load_state_dict(tower.state_dict())
    processor = clip_zoo.image_processor()

    with torch.no_grad():
        text = text_features(root, [f"a photo of a {name}." for name in CLASSES[task]])
        text = F.normalize(text, dim=-1)  # one template: the mean over templates is the prompt itself
        test = load_from_disk(str(root / "data" / task))["test"]
        pixels = processor(images=[im.convert("RGB") for im in test["image"]], return_tensors="pt")["pixel_values"]
        image = F.normalize(features(model.get_image_features(pixel_values=pixels)), dim=-1)
        logits = model.logit_scale.exp() * image @ text.t()
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4, "a near tie would make the comparison fragile"
    return (logits.argmax(-1) == torch.tensor(test["label"])).float().mean().item()


def test_expert_accuracy_equals_clip_models_own_zero_shot(job, zoo):
    reported = job["report"]["metrics"]["experts"]
    for task in TASKS:
        assert reported[task] == pytest.approx(independent_accuracy(zoo["root"], zoo["towers"][task], task), abs=1e-6)


@pytest.mark.slow
def test_command_line_run_writes_report_json(zoo, tmp_path):
    """`python train.py suite=clip suite.base=... suite.experts=... suite.datasets=... suite.tasks=[...]`."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", *suite_options(zoo["root"]), *RUN_OPTIONS,
                           f"paths.cache_dir={tmp_path / 'cache'}", "trainer.enable_progress_bar=false",
                           f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    check_report(report)
    for task in TASKS:
        assert report["metrics"]["experts"][task] == pytest.approx(
            independent_accuracy(zoo["root"], zoo["towers"][task], task), abs=1e-6)
    assert (run_dir / "quantized_model").is_dir()


@pytest.mark.slow
def test_bf16_mixed_precision_runs_with_float64_statistics(zoo, tmp_path, monkeypatch):
    """trainer.precision=bf16-mixed (on a GPU also 16-mixed): block forwards under autocast feed some
    layers bfloat16 inputs, while H and C are still summed in float64; the job reports as in float32."""
    seen = set()
    add = LayerStatistics.add

    def spy(self, X, Y=None, weight=1.0, with_H=True):
        seen.add((X.dtype, self.H.dtype))
        return add(self, X, Y, weight, with_H)

    monkeypatch.setattr(LayerStatistics, "add", spy)
    cfg = make_cfg(tmp_path, tmp_path / "cache" / "zoo", *suite_options(zoo["root"]), *RUN_OPTIONS,
                   "data.test_samples=null", "save_model=false", "trainer.precision=bf16-mixed")
    check_report(run(cfg))
    assert (torch.bfloat16, torch.float64) in seen and {h for _, h in seen} == {torch.float64}


def test_heads_are_cached_by_fingerprint_of_base_and_prompts(zoo, tmp_path, monkeypatch):
    first = local_suite(zoo["root"], tmp_path).heads()
    files = sorted((tmp_path / "heads").glob("*.safetensors"))
    assert len(files) == len(TASKS)
    for task, embeds in first.items():
        assert embeds.shape == (len(CLASSES[task]), 16)
        torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(len(CLASSES[task])))

    def no_text_tower(*args, **kwargs):
        raise AssertionError("the heads should come from the cache")

    monkeypatch.setattr(clip_suite, "text_embeddings", no_text_tower)
    again = local_suite(zoo["root"], tmp_path).heads()
    assert all(torch.equal(first[t], again[t]) for t in TASKS)
    monkeypatch.undo()
    # other templates for one task: a new head for that task only, the two templates averaged
    templates = ["a photo of a {}.", "a drawing of a {}."]
    changed = local_suite(zoo["root"], tmp_path, templates={"shapes": templates}).heads()
    assert len(list((tmp_path / "heads").glob("*.safetensors"))) == len(TASKS) + 1
    assert not torch.allclose(changed["shapes"], first["shapes"])
    assert torch.equal(changed["colors"], first["colors"])
    # independently: each prompt's features normalised, averaged over the templates, normalised again
    prompts = [t.replace("{}", name) for name in CLASSES["shapes"] for t in templates]  # class-major
    per_prompt = F.normalize(text_features(zoo["root"], prompts), dim=-1).view(len(CLASSES["shapes"]), 2, -1)
    torch.testing.assert_close(changed["shapes"], F.normalize(per_prompt.mean(dim=1), dim=-1))


def test_wrong_number_of_class_names_fails_before_the_merge(zoo, tmp_path):
    suite = local_suite(zoo["root"], tmp_path, classnames={"shapes": ["round", "angular"]})
    with pytest.raises(ValueError, match=r"task 'shapes': 2 class names.*3 classes.*suite\.classnames\.shapes"):
        suite.datamodule(calib_samples=4)


def test_task_sets_prompts_and_dataset_sources_follow_fusionbench():
    ta8 = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
    assert resolve_tasks("TA8") == ta8
    assert resolve_tasks("TALL14")[:8] == ta8 and len(set(resolve_tasks("TALL14"))) == 14
    assert resolve_tasks("TALL20")[:14] == resolve_tasks("TALL14") and len(set(resolve_tasks("TALL20"))) == 20
    with pytest.raises(ValueError, match="TA9"):
        resolve_tasks("TA9")

    suite = ClipSuite(tasks="TALL20")  # nothing is read or downloaded here
    names, templates, where = suite.prompts("svhn")
    assert names == [str(d) for d in range(10)] and all("{}" in t for t in templates) and "FusionBench" in where
    assert len(suite.prompts("sun397")[0]) == 397 and len(suite.prompts("cifar100")[0]) == 100
    specs = suite.dataset_specs
    assert specs["sun397"]["path"] == "tanganke/sun397"
    assert specs["stanford-cars"]["path"] == "tanganke/stanford_cars"  # DESIGN §4's naming exception
    assert (specs["svhn"]["path"], specs["svhn"]["name"]) == ("ufldl-stanford/svhn", "cropped_digits")
    assert specs["food101"]["test_split"] == "validation"

    local = ClipSuite(tasks=["svhn", "shapes"], datasets="/data/{task}", dataset_overrides={"shapes": "org/shapes"},
                      classnames={"svhn": list("abcdefghij")}, templates={"svhn": ["{} digit"]})
    assert local.dataset_specs["svhn"]["path"] == "/data/svhn"  # FusionBench's sources only under tanganke/{task}
    assert local.dataset_specs["shapes"]["path"] == "org/shapes"
    assert local.prompts("svhn")[:2] == (list("abcdefghij"), ["{} digit"])
    for bad, match in ((dict(classnames={"mnist": ["a"]}), r"suite\.classnames: task 'mnist'"),
                       (dict(templates={"svhn": ["no placeholder"]}), r"suite\.templates\.svhn"),
                       (dict(experts="tanganke/one-model"), r"suite\.experts.*\{task\}"),
                       (dict(dataset_overrides={"svhn": {"columns": "x"}}), "unknown key 'columns'")):
        with pytest.raises(ValueError, match=match):
            ClipSuite(tasks=["svhn"], **bad)


def test_experts_load_in_every_layout_and_a_mismatch_names_file_and_key(zoo, tmp_path):
    suite = local_suite(zoo["root"], tmp_path)
    pool = ExpertPool(suite.base, suite.experts)  # CLIPVisionModel, 'vision_model.'-prefixed, whole CLIPModel
    for task in TASKS:
        expected = zoo["towers"][task].state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in pool.expert_state_dict(task).items())

    # transformers < 4.31 saved position_ids beside the weights: skipped, not refused
    prefixed = load_file(str(zoo["root"] / "experts" / "colors" / "model.safetensors"))
    legacy = tmp_path / "legacy.safetensors"
    save_file(prefixed | {"vision_model.embeddings.position_ids": torch.arange(5)[None]}, str(legacy))
    ExpertPool(suite.base, {"colors": legacy})

    renamed = {k.replace("layers.1.mlp.fc2", "layers.1.mlp.fc3"): v for k, v in prefixed.items()}
    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(ValueError, match=r"renamed\.safetensors.*'vision_model\.encoder\.layers\.1\.mlp\.fc3\."):
        ExpertPool(suite.base, {"colors": tmp_path / "renamed.safetensors"})
    resized = dict(prefixed, **{"vision_model.post_layernorm.weight": torch.ones(31)})
    save_file(resized, str(tmp_path / "resized.safetensors"))
    with pytest.raises(ValueError, match=r"resized\.safetensors.*post_layernorm\.weight.*shape"):
        ExpertPool(suite.base, {"colors": tmp_path / "resized.safetensors"})
    lacking = {k: v for k, v in prefixed.items() if not k.startswith("vision_model.encoder.layers.1.")}
    save_file(lacking, str(tmp_path / "lacking.safetensors"))
    with pytest.raises(ValueError, match=r"lacking\.safetensors.*'encoder\.layers\.1\..*missing"):
        ExpertPool(suite.base, {"colors": tmp_path / "lacking.safetensors"})
    absent = ClipSuite(base=str(zoo["root"] / "base"), experts=str(tmp_path / "none" / "{task}"), tasks=TASKS,
                       datasets=str(zoo["root"] / "data" / "{task}"), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"suite\.experts \(shapes\): '.*none/shapes' is not a file, a folder"):
        absent.experts


def test_open_clip_expert_is_converted_once_and_computes_its_tower(zoo, tmp_path, monkeypatch):
    visual = ref.random_tower(ref.tower_shapes(width=32, layers=2, patch=8, grid=2, mlp=64, embed=16), seed=5)
    torch.save({f"visual.{k}": v for k, v in visual.items()}, tmp_path / "shapes.pt")  # a plain state dict
    suite = ClipSuite(base=str(zoo["root"] / "base"), experts=str(tmp_path / "{task}.pt"), tasks=["shapes"],
                      datasets=str(zoo["root"] / "data" / "{task}"), cache_dir=str(tmp_path / "cache"))
    converted = Path(suite.experts["shapes"])
    assert converted.parent == tmp_path / "cache" / "openclip"
    with monkeypatch.context() as patched:  # a second run finds the converted folder in the cache
        patched.setattr("epmq.families.clip.openclip.save_pretrained", lambda *a, **k: pytest.fail("converted twice"))
        again = ClipSuite(base=str(zoo["root"] / "base"), experts=str(tmp_path / "{task}.pt"), tasks=["shapes"],
                          datasets=str(zoo["root"] / "data" / "{task}"), cache_dir=str(tmp_path / "cache"))
        assert again.experts == suite.experts
    pool = ExpertPool(suite.base, suite.experts)
    tower = suite.model(pool.expert_state_dict("shapes"))
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    _, pooled, _ = ref.forward(visual, images, heads=4)
    with torch.no_grad():
        torch.testing.assert_close(tower(pixel_values=images).pooler_output, pooled, rtol=1e-5, atol=1e-5)

    # the release's files are pickled whole modules: refused without the opt-in, and without open_clip
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled_shapes.pt")
    options = dict(base=str(zoo["root"] / "base"), experts=str(tmp_path / "pickled_{task}.pt"), tasks=["shapes"],
                   datasets=str(zoo["root"] / "data" / "{task}"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"suite\.experts \(shapes\).*pickled_shapes\.pt.*allow_pickle"):
        ClipSuite(**options).experts
    if importlib.util.find_spec("open_clip") is None:
        with pytest.raises(ValueError, match="needs open_clip"):
            ClipSuite(**options, allow_pickle=True).experts


@pytest.fixture
def offline_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # a copy cached on this machine would load
    return tmp_path / "run"


def hub_experiment_cfg(out: Path, *overrides: str):
    out.mkdir()
    return make_cfg(out, out.parent / "cache" / "zoo", "experiment=clip_vit_b32_ta8", *overrides)


def test_unreachable_hub_id_fails_naming_it_and_writes_nothing(offline_out, tmp_path):
    fake = "epmq-tests/no-such-clip"  # never in any cache
    cfg = hub_experiment_cfg(offline_out, f"suite.base={fake}")
    with pytest.raises(ValueError, match=f"suite.base '{fake}' is not a local folder.*could not reach the Hugging"):
        run(cfg)
    assert list(offline_out.iterdir()) == [] and not (tmp_path / "cache").exists()


def test_hub_experts_and_datasets_are_refused_naming_them(zoo, offline_out, tmp_path):
    root = zoo["root"]
    suite = ClipSuite(base=str(root / "base"), experts="epmq-tests/clip-{task}", tasks=TASKS,
                      datasets=str(root / "data" / "{task}"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="'epmq-tests/clip-shapes' is not a local folder.*could not reach the"):
        ExpertPool(suite.base, suite.experts)
    suite = ClipSuite(base=str(root / "base"), experts=str(root / "experts" / "{task}"), tasks=TASKS,
                      datasets="epmq-tests/data-{task}", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"suite\.datasets \(shapes\) 'epmq-tests/data-shapes': could not "):
        suite.datamodule(calib_samples=4)


def test_silent_network_fails_within_the_timeout(tmp_path, monkeypatch):
    """An endpoint that accepts connections and never answers: a ValueError after about twice
    EPMQ_HUB_TIMEOUT, not a hang (huggingface_hub's own download waits without limit)."""
    import huggingface_hub.constants as hf

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # the kernel completes handshakes; nothing ever reads or answers
    try:
        monkeypatch.setattr(hf, "ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
        monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("EPMQ_HUB_TIMEOUT", "0.5")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        suite = ClipSuite(base="epmq-tests/silent-hub", cache_dir=str(tmp_path / "cache"))
        start = time.perf_counter()
        with pytest.raises(ValueError, match="epmq-tests/silent-hub.*could not reach.*Timeout"):
            suite.base
        assert time.perf_counter() - start < 30  # seconds, where an unbounded wait never returns
    finally:
        listener.close()


def test_paper_overlays_resolve_to_hub_ids():
    GlobalHydra.instance().clear()
    repos = {"b32": "clip-vit-base-patch32", "b16": "clip-vit-base-patch16", "l14": "clip-vit-large-patch14"}
    sets = {"ta8": "TA8", "tall14": "TALL14", "tall20": "TALL20"}
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for size, repo in repos.items():
            for key, name in sets.items():
                for ties in (False, True):
                    cfg = compose("train", overrides=[f"experiment=clip_vit_{size}_{key}{'_ties' if ties else ''}"])
                    assert (cfg.suite.base, cfg.suite.experts, cfg.suite.tasks) == (
                        f"openai/{repo}", f"tanganke/{repo}_{{task}}", name)
                    assert cfg.suite.datasets == "tanganke/{task}" and cfg.merge.scaling_factor == 0.3
                    assert (cfg.quant.bits, cfg.quant.group_size) == (4, 128)
                    assert cfg.merge._target_.endswith("TiesMerging" if ties else "TaskArithmetic")
                    if ties:
                        assert (cfg.merge.threshold, cfg.merge.merge_func) == (20, "sum")
        both = compose("train", overrides=["experiment=[clip_vit_b32_ta8,compare]"])  # the comparison job on it
        assert both.job._target_ == "epmq.jobs.compare.compare" and both.suite.base == "openai/clip-vit-base-patch32"


@pytest.mark.slow
def test_command_line_without_network_prints_one_line_naming_the_id(tmp_path):
    run_dir = tmp_path / "run"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "train.py", "experiment=clip_vit_b32_ta8", f"hydra.run.dir={run_dir}",
                           f"paths.cache_dir={tmp_path / 'cache'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf")})
    seconds = time.perf_counter() - start
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, lines
    assert "[epmq][ERROR]" in lines[0] and "'openai/clip-vit-base-patch32'" in lines[0]
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "train.log"]  # Hydra's own files only
    print(f"failed after {seconds:.1f} s")


def test_hub_dataset_sizes_are_checked_from_the_card_before_any_download(hub_server, tmp_path):
    from datasets import load_from_disk

    from epmq.families.clip.data import DatasetSource, dataset_spec

    dd = load_from_disk(str(clip_zoo_data(tmp_path) / "shapes"))
    files = {"README.md": dataset_card({"default": dd}, "data/{split}-*"),
             **parquet_files(dd, tmp_path, "data/{split}-00000-of-00001.parquet")}
    hub_server.add_repo("org/shapes", files, repo_type="dataset")
    defaults = {"train_split": "train", "test_split": "test", "image_column": "image", "label_column": "label"}
    source = DatasetSource({"shapes": dataset_spec("shapes", "org/{task}", defaults, None)})
    source.require(train=30, test=None)
    with pytest.raises(ValueError, match=r"task 'shapes': calib_samples \+ select_samples = 30 exceed the 24 rows "
                                         r"of its 'train' split.*nothing downloaded"):
        source("shapes")
    assert not [path for _, path in hub_server.requested(".parquet")]
    source.require(train=24, test=12)
    source.expect_classes({"shapes": (5, "suite.classnames.shapes")})
    with pytest.raises(ValueError, match=r"task 'shapes': 5 class names \(suite.classnames.shapes\) but its dataset's "
                                         r"label has 3 classes.*nothing downloaded"):
        source("shapes")
    assert not [path for _, path in hub_server.requested(".parquet")]
    source.expect_classes({"shapes": (3, "suite.classnames.shapes")})
    assert {split: len(ds) for split, ds in source("shapes").items()} == {"train": 24, "test": 12}


def clip_zoo_data(root: Path) -> Path:
    """The tiny zoo's datasets alone (save_to_disk folders under root/data)."""
    clip_zoo.save_datasets(root)
    return root / "data"
