"""benchmarks/ddpm_speed.py: the peer U-Nets it times are built with our layout (parameter counts equal,
checked against diffusers itself), and the smallest end-to-end run produces a report and JSON.
benchmarks/flash_vs_pytorch.py: FLASH-pytorch's parameter count differs from ours by its extras only, and a
quick run produces a report and JSON (skipped where the peer is not installed).
benchmarks/xla_cpu_options.py: both compilations of each model are timed in one run.
benchmarks/roformer_speed.py: the encoder comparison times both sides interleaved and reports medians."""
import functools
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: `benchmarks`

torch = pytest.importorskip("torch")
try:
    import diffusers
except ImportError:
    diffusers = None
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="diffusers is not installed")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import ddpm_speed, flash_vs_pytorch, xla_cpu_options  # noqa: E402
from gen_jax.ddpm import count_params  # noqa: E402
from gen_jax.ddpm.training import build_unet  # noqa: E402


@functools.lru_cache(maxsize=None)
def _ours_params(name: str) -> int:
    cfg = ddpm_speed.bench_config(name)
    return count_params(nnx.eval_shape(lambda: build_unet(cfg, nnx.Rngs(0))))


def _diffusers_params(cfg) -> int:
    with torch.device("meta"):  # shapes only, no 35M-parameter initialisation
        model = diffusers.UNet2DModel(**ddpm_speed.diffusers_unet_kwargs(cfg))
    return sum(p.numel() for p in model.parameters())


@needs_diffusers
@pytest.mark.parametrize("name", ["tiny", "mnist", "cifar10"])
def test_diffusers_peer_has_exactly_our_parameter_count(name):
    cfg = ddpm_speed.bench_config(name)
    assert _diffusers_params(cfg) == _ours_params(name)


@needs_diffusers
def test_cifar10_peer_is_the_published_ddpm_cifar10_layout():
    # google/ddpm-cifar10-32's UNet2DModel config (the paper's model ported by diffusers) and the paper's 35.7M.
    kw = ddpm_speed.diffusers_unet_kwargs(ddpm_speed.bench_config("cifar10"))
    assert kw["block_out_channels"] == (128, 256, 256, 256) and kw["layers_per_block"] == 2
    assert kw["down_block_types"] == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    assert kw["up_block_types"] == ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    assert (kw["downsample_padding"], kw["freq_shift"], kw["flip_sin_to_cos"], kw["norm_eps"]) == (0, 1, False, 1e-6)
    assert _ours_params("cifar10") == 35_746_307


@needs_diffusers
def test_benchmark_config_computes_in_float32_without_warmup():
    cfg = ddpm_speed.bench_config("cifar10")  # the preset itself is bfloat16 with 5000 warmup steps
    assert cfg.train.compute_dtype == "float32" and cfg.train.warmup_steps == 0


@needs_diffusers
def test_lucidrains_import_reports_and_leaves_no_stubs_behind():
    unet_cls, note = ddpm_speed.import_lucidrains_unet()
    assert isinstance(note, str) and note
    for name in ("torchvision", "accelerate", "ema_pytorch"):  # a stub has no __file__; the real ones do
        mod = sys.modules.get(name)
        assert mod is None or getattr(mod, "__file__", None), f"stub {name!r} left in sys.modules"
    if unet_cls is not None:  # it must build at our MNIST config and map an image batch to its own shape
        model = unet_cls(**ddpm_speed.lucidrains_unet_kwargs(ddpm_speed.bench_config("tiny")))
        x = torch.zeros(2, 1, 28, 28)
        with torch.no_grad():
            assert model(x, torch.tensor([0, 5])).shape == x.shape


@needs_diffusers
@pytest.mark.slow
def test_smallest_run_writes_a_table_and_json(tmp_path, capsys):
    out = tmp_path / "ddpm_speed.json"
    res = ddpm_speed.main(["--configs", "tiny", "--sample-config", "tiny", "--tiny", "--no-lucidrains",
                           "--json", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert "| config |" in printed and "EXTRAPOLATED" in printed
    saved = json.loads(out.read_text())
    row = saved["train"][0]
    assert row["ours"]["params"] == row["diffusers"]["params"]
    assert row["ratio_diffusers"] == pytest.approx(row["ours"]["images_per_s"] / row["diffusers"]["images_per_s"])
    assert row["ours"]["flops_per_step"] > 0 and 0 < saved["roofline"]["rows"][0]["ours_fraction"]
    assert [s["method"] for s in saved["sampling"]] == ["ancestral", "ddim"]
    tiny = ddpm_speed.bench_config("tiny")
    full = {s["method"]: (s["ours"]["timed_steps"], s["ours"]["full_steps"]) for s in saved["sampling"]}
    assert full == {"ancestral": (2, tiny.diffusion.timesteps), "ddim": (2, tiny.eval.ddim_steps)}
    assert res["machine"]["usable_cores"] >= 1


def test_sampling_only_run_reports_without_train_settings(tmp_path, capsys):
    out = tmp_path / "sampling.json"
    ddpm_speed.main(["--no-train", "--no-roofline", "--sample-config", "tiny", "--tiny", "--json", str(out), "--quiet"])
    assert "no train steps timed" in capsys.readouterr().out
    assert [s["method"] for s in json.loads(out.read_text())["sampling"]] == ["ancestral", "ddim"]


def test_reports_record_the_environment_that_changes_speed(monkeypatch):
    # machine_info() asks JAX for its devices: start the backend under the session's XLA_FLAGS first, or, first in
    # a worker, it would start under the patched flags below (1 device, YNNPACK fusions off) for every later test
    jax.devices()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    assert ddpm_speed.speed_env() == {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0",
                                      "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}
    res = {"machine": {**ddpm_speed.machine_info(), "load_avg_1_5_15": (0.0, 0.0, 0.0)},
           "versions": {}, "settings": {"repeats": 1, "warmup": 0, "grad_clip": 1.0, "ema": False},
           "lucidrains_import": "-", "train": [], "sampling": [], "roofline": None}
    report = ddpm_speed.format_report(res)
    assert "Environment: GLIBC_TUNABLES=glibc.malloc.mmap_max=0, XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=" \
        in report


@pytest.mark.parametrize("argv", [[], ["--quick"]])
def test_flash_peer_has_our_params_plus_its_extras(argv):
    pytest.importorskip("flash_pytorch")
    args = flash_vs_pytorch.parse_args(argv)
    kw = flash_vs_pytorch.peer_kwargs(args)
    assert (kw["causal"], kw["shift_tokens"], kw["laplace_attn_fn"], kw["norm_type"]) == (True, False, False,
                                                                                        "scalenorm")
    ours = flash_vs_pytorch.count_params(nnx.eval_shape(
        lambda: flash_vs_pytorch.build(flash_vs_pytorch.ours_config(args))))
    peer = flash_vs_pytorch.peer_params(flash_vs_pytorch.build_peer(args))
    # T5 relative-position bias (32 per layer), LayerNorm head (2d, ours ScaleNorm 1), head bias (V),
    # absolute-position scale (1)
    assert peer - ours == 32 * args.layers + 2 * args.d_model + args.vocab


def test_flash_quick_run_writes_a_table_and_json(tmp_path, capsys):
    pytest.importorskip("flash_pytorch")
    out = tmp_path / "flash.json"
    threads = torch.get_num_threads()
    try:
        res = flash_vs_pytorch.main(["--quick", "--no-compile", "--lengths", "32", "--warmup", "0", "--steps", "1",
                                     "--json", str(out)])
    finally:
        torch.set_num_threads(threads)  # main() pins torch to 1 thread
    printed = capsys.readouterr().out
    assert "| T | B | ours ms/step |" in printed and "Params: ours" in printed
    row = json.loads(out.read_text())["rows"][0]
    assert (row["length"], row["batch"], row["peer_best"]) == (32, 4, "eager")
    assert row["ratio"] == pytest.approx(row["ours"]["tokens_per_s"] / row["peer_eager"]["tokens_per_s"])
    assert row["ratio_cpu"] == pytest.approx(row["peer_eager"]["cpu_s"] / row["ours"]["cpu_s"])
    assert abs(row["ours"]["loss_first"] - 5.545) < 0.1  # ~ln 256 at our 0.02-std init
    assert res["params"]["peer"] > res["params"]["ours"]


def test_xla_cpu_options_compares_both_compilations_of_each_model(tmp_path, capsys):
    if jax.default_backend() != "cpu":
        pytest.skip("XLA:CPU option")
    out = tmp_path / "xla.json"
    rows = xla_cpu_options.main(["--models", "flash,roformer_seq64", "--tiny", "--rounds", "1", "--json", str(out)])
    assert [r["model"] for r in rows] == ["flash", "roformer_seq64"]
    for r in rows:
        assert {k: len(v) for k, v in r["times_s"].items()} == {"default": 1, "ynn_off": 1}
        assert r["speedup_median"] == pytest.approx(r["median_s"]["default"] / r["median_s"]["ynn_off"])
    assert "| flash |" in capsys.readouterr().out and json.loads(out.read_text())["rounds"] == 1


def test_roformer_encoder_comparison_times_both_sides_interleaved(tmp_path, capsys):
    pytest.importorskip("transformers")
    from benchmarks import roformer_speed
    out = tmp_path / "roformer.json"
    threads = torch.get_num_threads()
    try:
        res = roformer_speed.main(["--tiny", "--parts", "encoder", "--json", str(out)])  # --tiny: 2 rounds
    finally:
        torch.set_num_threads(threads)
    assert "| seq | batch | ours fwd+bwd (ms) |" in capsys.readouterr().out
    rows = json.loads(out.read_text())["encoder"]
    assert [r["seq"] for r in rows] == [16, 32] and rows == res["encoder"]
    for r in rows:  # medians of the rounds, one step of each side per round
        assert len(r["ours_times_s"]) == len(r["torch_times_s"]) == 2
        assert r["ours_s"] == pytest.approx(sum(r["ours_times_s"]) / 2)
        assert r["torch_s"] == pytest.approx(sum(r["torch_times_s"]) / 2)
        assert r["ratio"] == pytest.approx(r["torch_s"] / r["ours_s"])
