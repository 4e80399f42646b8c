"""``metapeft.demo`` over seeds: statistics against SciPy's paired t-test, the seed-averaged gamma, bit-for-bit
reproducibility of one seed's run, and the README section generated from ``results.json``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from scipy.stats import ttest_rel

from metapeft import demo

PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A backbone cache shared by the module's quick demos (pre-trained by the first)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory, cache):
    """``(result, output directory)`` of a quick demo over seeds 3 and 4."""
    out = tmp_path_factory.mktemp("demo")
    return demo.run_demo(quick=True, output_dir=out, cache_dir=cache, seed=3, seeds=2), out


def test_quick_demo_over_two_seeds(two_seeds):
    result, tmp_path = two_seeds
    report = (tmp_path / "results.md").read_text()
    assert "SMALL-SCALE DEMONSTRATION" in report and result["table"] in report
    assert result["seeds"] == [3, 4] and set(result["runs"]) == {demo.BASELINE, demo.METHOD, demo.CHANNEL}
    for name in ("gamma_heatmap.png", "training_curves.png"):
        assert (tmp_path / name).read_bytes()[:4] == PNG, name
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(result))
    plain = result["runs"][demo.BASELINE]
    for key, variant in (("difference", demo.METHOD), ("difference_channel", demo.CHANNEL)):
        for metric in ("accuracy", "few_accuracy", "macro_f1"):
            a, b = [m[metric] for m in plain], [m[metric] for m in result["runs"][variant]]
            oracle = ttest_rel(b, a).confidence_interval(0.95)
            difference = result[key][metric]
            assert difference["mean"] == pytest.approx(sum(b) / 2 - sum(a) / 2, abs=1e-12)
            assert (difference["low"], difference["high"]) == pytest.approx((oracle.low, oracle.high), rel=1e-9)
            assert result["summary"][variant][metric]["mean"] == pytest.approx(sum(b) / 2, abs=1e-12)
    assert "| difference (95% CI) |" in result["table"] and " +- " in result["table"]
    assert "| LoRA + MetaPEFT, per-channel gamma |" in result["table"]
    assert "| difference, per-channel gamma (95% CI) |" in result["table"]
    # the heatmap's gamma is the mean of the seeds' learned gammas; plain LoRA learns none
    cells = [json.loads((tmp_path / name / f"seed_{s}" / "result.json").read_text())
             for name in ("lora", "lora_meta") for s in (3, 4)]
    assert all(c["gamma"] is None for c in cells[:2])
    seeds_gamma = torch.tensor([c["gamma"]["values"] for c in cells[2:]])
    assert torch.allclose(torch.tensor(result["gamma_mean"]["values"]), seeds_gamma.mean(0), rtol=0, atol=1e-7)
    assert not torch.equal(seeds_gamma[0], seeds_gamma[1]), "the seeds differ"
    assert (seeds_gamma - 1).abs().max() > 1e-3, "MetaPEFT learned gamma"


def test_one_seed_is_bit_for_bit_reproducible(tmp_path, cache):
    first = demo.run_demo(quick=True, output_dir=tmp_path / "a", cache_dir=cache, seed=1, seeds=1)
    second = demo.run_demo(quick=True, output_dir=tmp_path / "b", cache_dir=cache, seed=1, seeds=1)
    assert first["runs"] == second["runs"] and first["gamma_mean"] == second["gamma_mean"]
    for variant in ("lora", "lora_meta"):
        a, b = (load_file(str(tmp_path / run / variant / "seed_1" / "model.safetensors")) for run in ("a", "b"))
        assert a.keys() == b.keys() and a
        assert all(torch.equal(a[k], b[k]) for k in a), variant
    assert first["difference"]["accuracy"]["low"] is None, "one seed has no interval"


def test_readme_section_is_generated_from_results(two_seeds, tmp_path):
    result, out = two_seeds
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nbefore\n<!-- demo-table:start -->\nstale numbers\n<!-- demo-table:end -->\nafter\n")
    demo.update_readme(json.loads((out / "results.json").read_text()), readme)
    text = readme.read_text()
    assert "stale numbers" not in text and result["table"] in text
    assert "`metapeft demo --quick --seeds 2 --seed 3`" in text and "Overall accuracy: MetaPEFT - LoRA = " in text
    assert text.startswith("# title\n\nbefore\n<!-- demo-table:start -->\n") and text.endswith(
        "<!-- demo-table:end -->\nafter\n")
    demo.update_readme(result, readme)
    assert readme.read_text() == text, "regenerating from the same results changes nothing"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="demo-table:start"):
        demo.update_readme(result, readme)


def test_verdict_reads_the_interval():
    above = {"mean": 0.03, "low": 0.01, "high": 0.05}
    below = {"mean": -0.03, "low": -0.05, "high": -0.01}
    across = {"mean": 0.01, "low": -0.02, "high": 0.04}
    single = {"mean": 0.02, "low": None, "high": None}
    assert demo.verdict(above, "Overall") == ("Overall: MetaPEFT - LoRA = +3.0 points, 95 % interval [+1.0, +5.0]; "
                                              "MetaPEFT is better beyond the seeds' noise.")
    assert "worse beyond" in demo.verdict(below, "x") and "cannot tell" in demo.verdict(across, "x")
    assert demo.verdict(single, "x") == "x: MetaPEFT - LoRA = +2.0 points; one seed gives no interval."


def test_validation_split_is_carved_from_the_training_images_only():
    """split="validation": a stratified quarter of each target training class (at least one image) is the evaluation
    set, the rest trains; no target test image is used and the two parts do not overlap."""
    from metapeft.demo import VALIDATION_RATIO, DemoTask

    full, carved = DemoTask().tasks(), DemoTask(split="validation").tasks()
    train, held = carved.target_train, carved.target_test
    assert len(train) + len(held) == len(full.target_train)
    key = {tuple(image.flatten().tolist()) for image in full.target_train.images}
    test_key = {tuple(image.flatten().tolist()) for image in full.target_test.images}
    for images in (train.images, held.images):
        rows = {tuple(image.flatten().tolist()) for image in images}
        assert rows <= key and not rows & test_key
    assert not {tuple(i.flatten().tolist()) for i in train.images} & {tuple(i.flatten().tolist()) for i in held.images}
    counts = torch.bincount(held.labels, minlength=10).tolist()
    assert counts == [max(1, round(VALIDATION_RATIO * n)) for n in full.target_counts]
    assert carved.target_counts == [n - h for n, h in zip(full.target_counts, counts)]
    with pytest.raises(ValueError, match="split"):
        DemoTask(split="train")
