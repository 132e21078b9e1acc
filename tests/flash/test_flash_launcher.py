"""`python -m experiments.flash`: its config, data glue and evaluation, and the tiny preset end to end."""
import json
import math

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from gen_jax.config import apply_overrides
from gen_jax.data import CharVocab, TextData, lm_windows
from gen_jax.errors import ConfigError
from gen_jax.flash.configs import LAUNCH_PRESETS, FlashConfig, TransformerConfig, lm_model_config
from gen_jax.flash.models import build, count_params
from gen_jax.flash.training import (comparison_markdown, encode_documents, evaluate_bits_per_char,
                                    lm_learning_rate, make_eval_fn, spread_windows)
from gen_jax.train import make_mesh


def test_every_preset_validates_and_models_are_chosen_on_the_command_line():
    for factory in LAUNCH_PRESETS.values():
        factory().validate()
    cfg = apply_overrides(LAUNCH_PRESETS["tiny"](), ["models=flash,transformer_pp"])
    assert cfg.models == ("flash", "transformer_pp")
    with pytest.raises(ConfigError, match="models"):
        apply_overrides(LAUNCH_PRESETS["tiny"](), ["models=flash,performer"])
    with pytest.raises(ConfigError, match="models"):
        apply_overrides(LAUNCH_PRESETS["tiny"](), ["models=flash,flash"])


@pytest.mark.parametrize("preset", ["shakespeare", "shakespeare_long"])
def test_the_three_models_have_matched_parameter_counts(preset):
    """Equal-steps comparisons are fair only at equal size: the instantiated modules (abstractly, no
    weights allocated) agree to within 1% of the non-embedding parameters."""
    cfg = LAUNCH_PRESETS[preset]()
    configs = {name: lm_model_config(cfg, name, vocab_size=80) for name in cfg.models}
    assert configs["flash"].kind == "flash" and configs["flash_quad"].kind == "flash_quad"
    assert isinstance(configs["transformer_pp"], TransformerConfig)
    assert configs["transformer_pp"].num_layers == math.ceil(cfg.model.num_layers / 2)
    counts = {n: count_params(nnx.eval_shape(lambda c=c: build(c))) - 80 * cfg.model.d_model
              for n, c in configs.items()}
    for name in ("flash_quad", "transformer_pp"):
        assert abs(counts[name] - counts["flash"]) < 0.01 * counts["flash"], counts


def test_documents_are_joined_with_eos_and_windows_tile_the_stream():
    docs = TextData(documents=("to be", "or not"), source="shakespeare", split="train")
    vocab = CharVocab.build(docs.documents)
    stream = encode_documents(docs, vocab)
    assert len(stream) == len("to be") + len("or not") + 2
    assert list(np.flatnonzero(stream == vocab.eos_id)) == [5, 12]
    assert vocab.decode(stream[:5]) == "to be" and vocab.decode(stream[6:12]) == "or not"
    windows = lm_windows(stream, 4)  # 13 tokens -> 3 windows of 4 inputs + 1 target
    assert windows.shape == (3, 5) and (windows[1:, 0] == windows[:-1, -1]).all()


def test_spread_windows_keeps_the_ends_and_the_count():
    windows = np.arange(100)[:, None] * np.ones((1, 3), int)
    picked = spread_windows(windows, 5)
    assert picked[:, 0].tolist() == [0, 25, 50, 74, 99]
    assert spread_windows(windows, 0).shape == (100, 3) and spread_windows(windows, 500).shape == (100, 3)


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    cfg = LAUNCH_PRESETS["shakespeare"]()
    lr, peak, warm, n = lm_learning_rate(cfg), cfg.train.learning_rate, cfg.train.warmup_steps, cfg.train.num_steps
    assert float(lr(0)) == 0.0 and float(lr(warm // 2)) == pytest.approx(peak / 2, rel=1e-5)
    assert float(lr(warm)) == pytest.approx(peak, rel=1e-5)
    assert float(lr((warm + n) // 2)) == pytest.approx(0.55 * peak, rel=1e-3)  # cosine midpoint
    assert float(lr(n)) == pytest.approx(0.1 * peak, rel=1e-5)
    const = lm_learning_rate(apply_overrides(cfg, ["lr_schedule=constant"]))
    assert float(const(warm)) == float(const(n)) == pytest.approx(peak, rel=1e-6)


def test_bits_per_char_weighs_every_window_once_despite_padding():
    """5 windows on the 8-device mesh: a batch of 8 with 3 zero-weight padding rows. The oracle is the
    mean negative log2-likelihood of every target from an un-jitted forward pass, in NumPy."""
    cfg = FlashConfig(vocab_size=12, d_model=16, num_layers=1, key_size=8, chunk_size=4)
    graphdef, params = nnx.split(build(cfg, seed=3), nnx.Param)
    windows = np.random.default_rng(0).integers(0, 12, size=(5, 10)).astype(np.int32)
    logits = np.asarray(nnx.merge(graphdef, params)(windows[:, :-1]), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, windows[:, 1:, None], axis=-1)
    mesh = make_mesh()
    out = evaluate_bits_per_char(make_eval_fn(graphdef, mesh), params, windows, 4, mesh)
    assert out["chars"] == 5 * 9 and out["windows"] == 5
    assert out["bpc"] == pytest.approx(nll.mean() / math.log(2.0), rel=1e-5)


def test_comparison_table_has_one_row_per_model():
    rows = [{"model": m, "layers": 2, "params": 1000, "params_non_embedding": 900, "steps": 10,
             "val_bpc": b, "train_bpc": None, "steps_per_sec": 2.0, "tokens_per_sec": 1024.0}
            for m, b in (("flash", 2.5), ("transformer_pp", 2.25))]
    table = comparison_markdown(rows, source="shakespeare", seq_len=64, batch_size=8).splitlines()
    assert table[-2].startswith("| FLASH | 2 | 1,000 (900) | 10 | 2.5000 | - |")
    assert table[-1].startswith("| Transformer++ |")


@pytest.mark.slow
def test_tiny_preset_compares_three_models_samples_and_resumes(tmp_path):
    from experiments import flash
    workdir = tmp_path / "run"
    results = flash.main(["--preset", "tiny", "--workdir", str(workdir), "--set", "train.num_steps=4"])
    saved = json.loads((workdir / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert sorted(saved["models"]) == ["flash", "flash_quad", "transformer_pp"]
    for name, row in saved["models"].items():
        # a few steps already beat the uniform distribution over the vocabulary
        assert row["steps"] == 4 and 0 < row["val_bpc"] < math.log2(saved["vocab_size"])
        assert row["val_bpc"] == saved["val_bpc"][name] and row["steps_per_sec"] > 0
        assert [p[0] for p in row["curve"]] == [3, 4]  # validation every 3 steps and at the end
        assert (workdir / name / "checkpoints" / "4").exists()
    table = (workdir / "comparison.md").read_text()
    assert all(t in table for t in ("| FLASH |", "| FLASH-Quad |", "| Transformer++ |"))
    curve_png = np.asarray(Image.open(workdir / "val_curves.png"))
    assert curve_png.ndim == 3 and curve_png.std() > 0
    assert saved["samples"][0].startswith("ROMEO:\n") and "ROMEO:\n" in (workdir / "samples.txt").read_text()
    assert len(saved["samples"][0]) <= len("ROMEO:\n") + 24

    # More steps: the model resumes from its step-4 checkpoint (no step is logged twice).
    args = ["--preset", "tiny", "--workdir", str(workdir), "--set", "train.num_steps=6", "--set", "models=flash"]
    results = flash.main(args)
    rows = [json.loads(line) for line in (workdir / "flash" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [3, 4, 6]
    assert list(results["models"]) == ["flash"] and results["models"]["flash"]["steps"] == 6

    # Nothing left to train: the saved result is reused as it is.
    again = flash.main(args)
    assert again["models"]["flash"] == json.loads(json.dumps(results["models"]["flash"]))
    assert len(rows) == len((workdir / "flash" / "metrics.jsonl").read_text().splitlines())
