"""Character LMs with FLASH, FLASH-Quad and Transformer++ (Hua et al., "Transformer Quality in Linear Time",
ICML 2022): equal steps, matched parameters, validation bits per character, text from cached decoding.

    python -m experiments.flash                              # Shakespeare, context 512 (~10 min on 2 CPU cores)
    python -m experiments.flash --preset zh_news             # People's Daily 1998 (Chinese), context 512
    python -m experiments.flash --preset shakespeare_long    # context 4096 on an accelerator
    python -m experiments.flash --preset tiny                # seconds: smoke test
    python -m experiments.flash --set models=flash,transformer_pp --set data.seq_len=1024
    python -m experiments.flash --help                       # presets and every key (--set key=value)

The models train one after another on the same batches, each in <workdir>/<model>/ with its own
checkpoints/ (auto-resumed: re-run the same command after a kill), metrics.jsonl and tb/. The workdir gets
vocab.json, comparison.md (the table), results.json, val_curves.png (validation bits/char vs step, all
models) and samples.txt (text sampled from the trained FLASH model with constant-cost cached decoding).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
from flax import nnx

from gen_jax.config import parse_command_line, to_dict
from gen_jax.data import BatchIterator, CharVocab
from gen_jax.flash.configs import LAUNCH_PRESETS, FlashRunConfig, lm_model_config
from gen_jax.flash.models import build, make_loss_fn
from gen_jax.flash.training import (MODEL_TITLES, LMData, comparison_markdown, evaluate_bits_per_char,
                                    make_eval_fn, make_lm_optimizer, non_embedding_params, prepare_lm_data,
                                    sample_text, spread_windows)
from gen_jax.images import save_curve_png
from gen_jax.train import Hook, TrainState, batch_sharded, cpu_compiler_options, make_update_fn, num_params, train
from gen_jax.train.launch import start_run, summarize

PAPER_NOTE = ("paper (Hua et al. 2022, sec. 4): FLASH matches Transformer++ perplexity at contexts 512 and 8K "
              "(Wiki-40B, PG-19) at up to 4.9x / 12.1x less training time on TPU v4; it reports no "
              "character-level numbers")


def main(argv=None) -> dict:
    cfg, args = parse_command_line(LAUNCH_PRESETS, argv, prog="python -m experiments.flash",
                                   default_preset="shakespeare", description=__doc__.strip().splitlines()[0])
    run = start_run(cfg, args, name="flash")
    vocab_path = run.path("vocab.json")
    data = prepare_lm_data(cfg, CharVocab.load(vocab_path) if os.path.exists(vocab_path) else None)
    if run.is_main:
        data.vocab.save(vocab_path)
        print(f"  {cfg.data.source}: {data.train_chars:,} train / {data.eval_chars:,} {cfg.data.eval_split} "
              f"chars, vocab {len(data.vocab)}, {len(data.train_windows):,} train windows of "
              f"{cfg.data.seq_len}; models: {', '.join(cfg.models)}")

    rows, trained = [], {}
    for name in cfg.models:
        out = train_model(run, cfg, name, data)
        if out is None:  # preempted: its checkpoint is written, a re-run resumes there
            return {}
        row, graphdef, params = out
        rows.append(row)
        trained[name] = (graphdef, params)

    results = {"source": cfg.data.source, "seq_len": cfg.data.seq_len, "batch_size": cfg.train.batch_size,
               "steps": cfg.train.num_steps, "eval_split": cfg.data.eval_split, "vocab_size": len(data.vocab),
               "train_chars": data.train_chars, "eval_chars": data.eval_chars,
               "val_bpc": {r["model"]: r["val_bpc"] for r in rows}, "models": {r["model"]: r for r in rows},
               "paper": PAPER_NOTE}
    table = comparison_markdown(rows, source=cfg.data.source, seq_len=cfg.data.seq_len,
                                batch_size=cfg.train.batch_size)
    if run.is_main:
        with open(run.path("comparison.md"), "w") as f:
            f.write(table)
        plot_curves(run, rows)
    if "flash" in trained and cfg.sample.num_samples and cfg.sample.num_tokens:
        results.update(write_samples(run, cfg, data, *trained["flash"]))
    run.write_json("results.json", results)

    if run.is_main:
        print("\n" + table)
        if results.get("samples"):
            print(f"FLASH samples (cached decoding, {results['sample_tokens_per_sec']:,.0f} tokens/s):\n"
                  + "\n---\n".join(results["samples"]))
    summarize(run, {
        **{f"{MODEL_TITLES[r['model']]} val bits/char": f"{r['val_bpc']:.4f}  ({r['params']:,} params, "
           f"{_rate(r)})" for r in rows},
        "paper": PAPER_NOTE,
        "outputs": f"{run.workdir}/ (comparison.md, results.json, val_curves.png, samples.txt, vocab.json, "
                   f"{{{','.join(cfg.models)}}}/checkpoints)",
    })
    return results


def _rate(row: dict) -> str:
    if not row.get("steps_per_sec"):
        return f"{row['steps']} steps"
    return f"{row['steps']} steps, {row['steps_per_sec']:.3f} steps/s, {row['tokens_per_sec']:,.0f} tokens/s"


def _settings(cfg: FlashRunConfig) -> dict:
    """What a saved per-model result depends on (not the model list nor the sampling)."""
    return {k: v for k, v in to_dict(cfg).items() if k not in ("models", "sample")}


def train_model(run, cfg: FlashRunConfig, name: str, data: LMData):
    """Train (or resume, or just restore) one model in <workdir>/<name>; returns (row, graphdef, params)
    or None when the run was stopped by a signal."""
    tc, mesh = cfg.train, run.mesh
    sub = run.sub(name)  # <workdir>/<name>: staged locally and mirrored by run.sync() for a remote workdir
    workdir = sub.local_dir
    model_cfg = lm_model_config(cfg, name, len(data.vocab))
    graphdef, params = nnx.split(build(model_cfg, seed=tc.seed), nnx.Param)
    optimizer = make_lm_optimizer(cfg)
    state = TrainState.create(params, optimizer, jax.random.PRNGKey(tc.seed), use_ema=tc.ema_decay is not None)
    update_fn = make_update_fn(make_loss_fn(graphdef, task="clm"), optimizer, ema_decay=tc.ema_decay,
                               grad_accum_steps=tc.grad_accum_steps, compute_dtype=tc.compute_dtype)
    batches = BatchIterator({"tokens": data.train_windows}, tc.batch_size, seed=tc.seed,
                            sharding=batch_sharded(mesh), prefetch=tc.prefetch)
    total = num_params(params)
    if run.is_main:
        print(f"\n{MODEL_TITLES[name]}: {total:,} parameters ({non_embedding_params(total, model_cfg):,} "
              f"non-embedding), {model_cfg.num_layers} layers -> {sub.workdir}")

    eval_fn = make_eval_fn(graphdef, mesh)
    curve_windows = spread_windows(data.eval_windows, cfg.eval.curve_windows)

    def eval_params(s: TrainState):
        return s.ema_params if s.ema_params is not None else s.params

    def curve_point(step: int, s: TrainState):
        return {"bpc": evaluate_bits_per_char(eval_fn, eval_params(s), curve_windows, cfg.eval.batch_size,
                                              mesh)["bpc"]}

    hooks = [Hook(cfg.eval.every_steps or tc.num_steps, curve_point, name="val")]
    result = train(**sub.train_kwargs(), state=state, update_fn=update_fn, data=batches, num_steps=tc.num_steps,
                   mesh=mesh, steps_per_call=tc.steps_per_call, log_every=tc.log_every,
                   checkpoint_every=tc.checkpoint_every, keep_checkpoints=tc.keep_checkpoints, hooks=hooks,
                   batch_size=tc.batch_size, desc=name,
                   compiler_options=cpu_compiler_options(ynn_fusions=tc.cpu_ynn_fusions))
    batches.close()
    if result.preempted:
        return None
    final_params = eval_params(result.state)
    saved_path = sub.path("results.json")
    saved = json.load(open(saved_path)) if os.path.exists(saved_path) else None
    if (saved and result.start_step == result.final_step == saved.get("steps")
            and saved.get("settings") == _settings(cfg)):
        if run.is_main:
            print(f"  {name}: finished earlier; reusing {saved_path}")
        return saved, graphdef, final_params

    final = evaluate_bits_per_char(eval_fn, final_params, spread_windows(data.eval_windows, cfg.eval.final_windows),
                                   cfg.eval.batch_size, mesh)
    trained_now = result.final_step > result.start_step and result.steps_per_second > 0
    rate = result.steps_per_second if trained_now else (saved or {}).get("steps_per_sec")
    last = result.last_metrics or {}
    row = {"model": name, "layers": model_cfg.num_layers, "params": total,
           "params_non_embedding": non_embedding_params(total, model_cfg), "steps": result.final_step,
           "val_bpc": final["bpc"], "val_nats": final["nats"], "val_chars": final["chars"],
           "val_windows": final["windows"],
           "train_bpc": last.get("bits_per_token", (saved or {}).get("train_bpc")),
           "steps_per_sec": rate, "tokens_per_sec": rate * tc.batch_size * cfg.data.seq_len if rate else None,
           "train_seconds": result.train_seconds if trained_now else (saved or {}).get("train_seconds"),
           "curve": read_curve(workdir), "model_config": dataclasses.asdict(model_cfg),
           "settings": _settings(cfg)}
    if run.is_main:
        with open(saved_path + ".tmp", "w") as f:
            json.dump(row, f, indent=2, default=float)
        os.replace(saved_path + ".tmp", saved_path)
        print(f"  {MODEL_TITLES[name]}: val bits/char {final['bpc']:.4f} over {final['chars']:,} chars")
    return row, graphdef, final_params


def read_curve(workdir: str) -> list[list[float]]:
    """[[step, val bits/char], ...] from metrics.jsonl (a resumed run appends; the last value per step wins)."""
    path = os.path.join(workdir, "metrics.jsonl")
    points: dict[int, float] = {}
    if os.path.exists(path):
        for line in open(path):
            if line.strip():
                row = json.loads(line)
                if "val/bpc" in row:
                    points[int(row["step"])] = float(row["val/bpc"])
    return [[s, points[s]] for s in sorted(points)]


def plot_curves(run, rows: list[dict]) -> None:
    curves = {MODEL_TITLES[r["model"]]: r["curve"] for r in rows if r["curve"]}
    if curves:
        save_curve_png(run.path("val_curves.png"), {k: [p[0] for p in c] for k, c in curves.items()},
                       {k: [p[1] for p in c] for k, c in curves.items()},
                       title=f"validation bits/char, {run.config.data.source}, context {run.config.data.seq_len}",
                       xlabel="step", ylabel="bits/char")


def write_samples(run, cfg: FlashRunConfig, data: LMData, graphdef, params) -> dict:
    """Sample from FLASH with `gen_jax.flash.decode.generate` (prefill + constant-cost decode steps)."""
    sc = cfg.sample
    draw = lambda: sample_text(graphdef, params, data.vocab, sc.prompt, num_tokens=sc.num_tokens,
                               num_samples=sc.num_samples, rng=jax.random.PRNGKey(30_000 + cfg.train.seed),
                               temperature=sc.temperature, top_p=sc.top_p)
    draw()  # compiles prefill + the decode scan; the timed call below reuses it (same key, same texts)
    t0 = time.perf_counter()
    texts = draw()
    seconds = time.perf_counter() - t0
    if run.is_main:
        header = (f"FLASH samples: prompt {sc.prompt!r} after <eos>, {sc.num_tokens} tokens, temperature "
                  f"{sc.temperature}, top_p {sc.top_p} (cached decoding)\n")
        with open(run.path("samples.txt"), "w", encoding="utf-8") as f:
            f.write(header + "".join(f"\n=== sample {i} ===\n{t}\n" for i, t in enumerate(texts)))
    return {"samples": texts, "sample_tokens_per_sec": sc.num_tokens * sc.num_samples / seconds,
            "sample_settings": dataclasses.asdict(sc)}


if __name__ == "__main__":
    main(sys.argv[1:])
