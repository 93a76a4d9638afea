"""`dynaprompt check`: the datasets table, one line per missing root and a non-zero exit, the estimate on what is
found, and a missing paper dataset projected at its known test split (so a grid's cost reads before any copy)."""
from pathlib import Path

import yaml

from dynaprompt import check
from dynaprompt.cli import main as cli_main
from dynaprompt.config import settings_from_params
from dynaprompt.datasets import EXPECTED
from flows.rehearse import eurosat_tree, imagenet_a_tree

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "configs" / "paper.yaml"


def paper_params(tmp_path: Path, roots: dict) -> Path:
    """configs/paper.yaml with every dataset root under tmp_path (missing unless `roots` names a real tree)."""
    params = yaml.safe_load(PAPER.read_text())
    for name, spec in params["datasets"].items():
        spec["root"] = str(roots.get(name, tmp_path / "absent" / name))
    params["paths"] = {key: str(tmp_path / key) for key in params["paths"]}
    params["validate"] = {**params.get("validate", {}), "known_split_sizes": False}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_without_any_data_every_dataset_is_missing_and_the_grid_is_projected(tmp_path, capsys):
    code = cli_main(["check", "--params", str(paper_params(tmp_path, {})), "--top", "3"])
    out, err = capsys.readouterr()
    assert code == 1
    missing = [line for line in err.splitlines() if line.startswith("dynaprompt check: missing: ")]
    assert len(missing) == 15 and all(str(tmp_path / "absent") in line for line in missing)
    rows = [line for line in out.splitlines() if "| MISSING |" in line]
    assert len(rows) == 15
    assert "| imagenet_a | imagenet_a | MISSING | projected at 7500 | 200 |" in out
    summary = next(line for line in out.splitlines() if line.startswith("estimated "))
    assert "15 missing dataset(s) projected at their known test-split size" in summary
    assert "most expensive: " in summary


def test_the_projection_is_the_arithmetic_of_the_known_split(tmp_path):
    settings = settings_from_params(yaml.safe_load(paper_params(tmp_path, {}).read_text()),
                                    base_dir=tmp_path)
    reports = check.check_datasets(settings, ["imagenet_a", "eurosat"])
    assert all(r.projected and not r.found for r in reports)
    assert [(r.samples, r.classes) for r in reports] == [EXPECTED["imagenet_a"], EXPECTED["eurosat"]]
    work = check.estimate(settings, reports)
    tpt = next(r for r in work["runs"] if r["dataset"] == "imagenet_a" and r["method"] == "tpt")
    shapes = check.model_shapes(settings.model.arch)
    length = check.sequence_length(settings, check.known_classnames("imagenet_a"))
    per_sample = (3 * 1 + 1) * 200 * length * shapes["text_layers"] * check.layer_flops(shapes["text_width"], length)
    assert tpt["runs"] == len(settings.sweep.view_seeds)  # order-independent: one run per seed
    assert abs(tpt["tflops"] - tpt["runs"] * 7500 * per_sample / 1e12) < 1e-9 * tpt["tflops"]
    assert work["projected"] == ["eurosat", "imagenet_a"]


def test_on_real_trees_the_estimate_uses_what_is_found(tmp_path, capsys):
    roots = {"imagenet_a": imagenet_a_tree(tmp_path / "imagenet-a"), "eurosat": eurosat_tree(tmp_path / "eurosat")}
    code = cli_main(["check", "--params", str(paper_params(tmp_path, roots)), "--top", "1000"])
    out, err = capsys.readouterr()
    assert code == 1 and len(err.strip().splitlines()) == 13  # the other 13 roots are missing
    assert "| imagenet_a | imagenet_a | yes | 3 / 7500 (differs) (not checked) | 200 |" in out
    assert "| eurosat | eurosat | yes | 4 / 8100 (differs) (not checked) | 10 |" in out
    assert "| imagenet_a | tpt | 3 | 3 |" in out  # 3 seeds x the 3 samples found, not 7500


def test_a_missing_dataset_of_unknown_size_is_not_estimated(tmp_path, image_root, capsys):
    from .conftest import make_params

    params = make_params(image_root)
    params["datasets"]["lost"] = {"kind": "image_folder", "root": str(tmp_path / "nowhere")}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    code = cli_main(["check", "--params", str(path)])
    out, err = capsys.readouterr()
    assert code == 1 and "lost" in err and str(tmp_path / "nowhere") in err
    assert "| lost | image_folder | MISSING | – | – | – |" in out
    assert "| lost |" not in out.split("| dataset | method |")[-1]  # no estimate row for it


# ---------------------------------------------------------------- chunked recompute and peak memory


def test_a_chunked_step_counts_the_forward_it_recomputes():
    from dynaprompt.methods.dynaprompt import Config as DynaPromptConfig

    assert check.text_passes("tpt", None, 1, 0.0) == 3 + 1  # forward + backward, then the prediction
    assert check.text_passes("tpt", None, 2, 0.0, chunked=True) == 2 * 4 + 1  # + the forward again per step
    paper = DynaPromptConfig(buffer_size=10)
    assert check.text_passes("dynaprompt", paper, 1, 3.0, chunked=True) == 4 * 3 + 3
    official = DynaPromptConfig(buffer_size=10, selection="official")
    assert check.text_passes("dynaprompt", official, 1, 3.0, chunked=True) == 4 * 3 + 10
    assert check.text_passes("zero_shot", None, 1, 0.0, chunked=True) == 0
    # whole sequences per pass: 8192 tokens of 18-token sequences are 455 sequences
    assert check.sequences_per_chunk(8192, 18) == 455 and check.sequences_per_chunk(0, 18) == float("inf")
    assert not check.step_is_chunked(1, 455, 18, 8192) and check.step_is_chunked(1, 456, 18, 8192)
    assert check.step_is_chunked(2.5, 200, 18, 8192)  # 3 prompts x 200 classes = 600 > 455
    assert not check.step_is_chunked(0, 10**6, 18, 8192) and not check.step_is_chunked(10, 1000, 18, 0)


def test_the_estimate_counts_4_passes_per_step_where_the_classes_overflow_the_budget(tmp_path):
    settings = settings_from_params(yaml.safe_load(paper_params(tmp_path, {}).read_text()), base_dir=tmp_path)
    reports = check.check_datasets(settings, ["imagenet", "imagenet_a"])
    work = check.estimate(settings, reports)
    tpt = {r["dataset"]: r for r in work["runs"] if r["method"] == "tpt"}
    shapes = check.model_shapes(settings.model.arch)
    for dataset, classes, passes in (("imagenet_a", 200, 3 + 1), ("imagenet", 1000, 4 + 1)):
        length = check.sequence_length(settings, check.known_classnames(dataset))
        assert (classes * length > settings.run.max_text_tokens) == (passes == 5)
        row = tpt[dataset]
        assert row["passes_per_sample"] == passes
        per_sample = passes * classes * length * shapes["text_layers"] * check.layer_flops(shapes["text_width"], length)
        assert abs(row["tflops"] - row["runs"] * row["samples"] * per_sample / 1e12) < 1e-9 * row["tflops"]


def test_the_memory_estimate_matches_the_measured_steps_within_5_percent():
    """reports/benchmark-memory.json: one TPT and one DynaPrompt step at ViT-B/16 (random weights), 200 and 1000
    classes, chunked and not, measured on a CPU as the peak resident memory above the model (fp32)."""
    import json

    shapes = check.model_shapes("ViT-B-16")
    measured = [r for r in json.loads((ROOT / "reports" / "benchmark-memory.json").read_text()) if r["measured"]]
    assert len(measured) >= 6 and {r["chunked"] for r in measured} == {True, False}
    for r in measured:
        prompts = {"grad": r["prompts"], "scored": r["prompts"], "kept": 0}
        estimate = check.memory_estimate(shapes, r["classes"], r["sequence_length"], r["max_text_tokens"], prompts,
                                         amp=False)
        assert abs(estimate["grad_pass"] / 2**20 / r["step_mib"] - 1) < 0.05, (r, estimate)


def test_saved_bytes_per_token_are_what_autograd_keeps(clip):
    """The per-token count of the estimate against the bytes autograd saves in a gradient pass of the tiny CLIP."""
    import torch

    from dynaprompt.text import PromptTextEncoder

    names = [f"class {i}" for i in range(12)]
    text = PromptTextEncoder(clip.model, clip.tokenizer, names)
    weights = {p.untyped_storage().data_ptr() for p in clip.model.parameters()}
    saved = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    contexts = text.init_context.unsqueeze(0).clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        text.encode(contexts)
    tokens = len(names) * text.sequence_length
    expected = check.saved_bytes_per_token(check.model_shapes("tiny-clip"), amp=False) * tokens
    assert abs(sum(saved.values()) / expected - 1) < 0.05


def test_check_prints_each_methods_peak_memory_at_the_runs_token_budget(tmp_path, capsys):
    import math

    from dynaprompt.plan import expand_plan

    cli_main(["check", "--params", str(paper_params(tmp_path, {}))])
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines()
            if line.startswith("| ") and "classes x" in line}
    settings = settings_from_params(yaml.safe_load(paper_params(tmp_path, {}).read_text()), base_dir=tmp_path)
    assert set(rows) == {key.method for key, _group in expand_plan(settings)}  # one row per planned method
    length = check.sequence_length(settings, check.known_classnames("imagenet"))
    per_pass = settings.run.max_text_tokens // length
    buffer = settings.methods["dynaprompt"].options["buffer_size"]
    assert f"| dynaprompt | imagenet (1000 classes x {length} tokens) | fp16-autocast | {buffer} | {per_pass} | " \
           f"{math.ceil(buffer * 1000 / per_pass)} |" in rows["dynaprompt"]
    assert "| tpt | imagenet (1000 classes x" in rows["tpt"] and f"| 1 | {per_pass} | 3 |" in rows["tpt"]
    assert "| zero_shot |" in rows["zero_shot"] and "| 0 |" in rows["zero_shot"]
    budget = "peak GPU memory (estimate, at run.max_text_tokens 8192): "
    assert any(line.startswith(budget) for line in out.splitlines())


def test_ttl_is_costed_by_its_image_tower_passes_and_histpt_as_a_one_prompt_tuner():
    from dynaprompt import check

    shapes = {"image_tokens": 197, "vision_layers": 12, "vision_width": 768}
    assert check.view_flops(shapes) == 12 * 197 * (24 * 768**2 + 4 * 197 * 768)
    assert check.image_passes("ttl", 1) == 4 and check.image_passes("ttl", 2) == 7  # fwd + bwd per step, predict
    assert check.image_passes("tpt", 1) == 0  # cached view features: no image-tower work in the run
    assert check.text_passes("histpt", None, 1, 3.0) == 4 and check.text_passes("rlcf", None, 3, 3.0) == 10
