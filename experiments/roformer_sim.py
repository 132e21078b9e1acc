"""Train and evaluate RoFormer-Sim (SimBERTv2; Su, kexue.fm posts 8454 and 8541) on the shared training core.

    python -m experiments.roformer_sim                      # tiny_zh: from scratch on People's Daily, ~10 min CPU
    python -m experiments.roformer_sim --preset tiny        # seconds: smoke test
    python -m experiments.roformer_sim --set stage=2 --init runs/roformer_sim_tiny_zh      # distil from a teacher
    python -m experiments.roformer_sim --preset finetune --init ~/roformer_chinese_sim_char_small   # released model
    python -m experiments.roformer_sim --init PATH --set stage=supervised \\
        --set data.sts_train=train.tsv --set data.nli_train=cnsd.jsonl --set data.sts_eval=test.tsv
    python -m experiments.roformer_sim --help               # presets and every key (--set key=value)

Stage 1 (default): UniLM generation + in-batch contrastive loss, the source of half the rows BART-corrupted,
on weakly supervised pairs: two sentences of the same article whose char overlap passes a filter (the
original's "same document" pairs). Stage 2 distils the cosine matrix of a teacher (`--set teacher=PATH`,
default: a frozen copy of `--init`). The supervised stage (Sentence-BERT on [u, v, |u - v|]) runs only on
labelled files you supply: no labelled STS data (LCQMC, BQ, ATEC, PAWSX, STS-B, CNSD) ships with gen_jax.

`--init PATH` loads a released or exported RoFormer(-Sim): an HF folder (config.json, model.safetensors or
pytorch_model.bin, vocab.txt), one of its weight files (vocab.txt beside it), or a gen_jax workdir (its export/);
local or gs:// (downloaded first).
Without it a char vocab is built from the corpus (cached as <workdir>/vocab.txt) and a small model trained from
scratch.

Writes to the workdir: checkpoints/ (auto-resumed), metrics.jsonl, tb/, vocab.txt, curves.png, generated.jsonl
(similar sentences for held-out inputs), export/ (HF-format model.safetensors + config.json + vocab.txt),
results.json (retrieval accuracy on held-out pairs vs bag-of-chars and chance).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from collections import Counter

import jax
import numpy as np
import optax
from flax import nnx

from gen_jax.config import parse_command_line
from gen_jax.data import BatchIterator, load_text
from gen_jax.errors import ConfigError
from gen_jax.images import save_curve_png
from gen_jax.roformer.model import RoFormer, RoFormerConfig
from gen_jax.roformer.tokenizer import CharTokenizer, build_vocab
from gen_jax.roformer_sim.configs import PRESETS, SimConfig
from gen_jax.roformer_sim.generate import encode_texts, similar_sentences
from gen_jax.roformer_sim.losses import init_classifier
from gen_jax.roformer_sim.sts import evaluate_spearman, read_cnsd_jsonl, read_sts_tsv
from gen_jax.roformer_sim.training import (article_pairs, bag_of_chars, corpus_lexicon, export_model,
                                           frozen_labels, heldout_pairs, load_pretrained, make_stage1_loss,
                                           make_stage2_loss, make_supervised_loss, pair_arrays,
                                           retrieval_metrics, supervised_arrays)
from gen_jax.train import (Hook, TrainState, batch_sharded, cpu_compiler_options, make_optimizer, make_update_fn,
                           num_params, train)
from gen_jax.train.launch import start_run, summarize

_FLAG_KEYS = {"--init": "init", "--teacher": "teacher"}


def expand_flags(argv: list[str]) -> list[str]:
    """`--init PATH` / `--teacher PATH` (or `--init=PATH`) -> `--set init=PATH`."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, value = arg.partition("=")
        if flag in _FLAG_KEYS:
            if not eq:
                if i + 1 >= len(argv):
                    raise SystemExit(f"{flag} needs a path")
                value, i = argv[i + 1], i + 1
            out += ["--set", f"{_FLAG_KEYS[flag]}={value}"]
        else:
            out.append(arg)
        i += 1
    return out


def _documents(cfg: SimConfig, split: str) -> list[str]:
    """Articles of a split ("valid+test" joins splits), the first data.max_articles of each when set."""
    docs = []
    for name in split.split("+"):
        part = list(load_text(cfg.data.source, name).documents)
        docs += part[:cfg.data.max_articles] if cfg.data.max_articles else part
    return docs


def make_tokenizer_and_model(run, cfg: SimConfig, train_docs: list[str]) -> tuple[CharTokenizer, RoFormer, str]:
    """A pretrained model with its own vocab (--init), or a vocab built from the corpus and a fresh model."""
    vocab = run.path("vocab.txt")  # staged (and mirrored by run.sync) for a remote workdir
    if cfg.init:
        model, init_vocab = load_pretrained(cfg.init)
        if run.is_main:  # the run keeps its own copy (exported with the model)
            shutil.copyfile(init_vocab, vocab + ".tmp")
            os.replace(vocab + ".tmp", vocab)
        return CharTokenizer(init_vocab), model, vocab
    if not os.path.exists(vocab):  # cached: a resumed run must see the same ids
        if run.is_main:
            build_vocab(train_docs, vocab + ".tmp", cfg.data.vocab_size, min_frequency=cfg.data.vocab_min_frequency)
            os.replace(vocab + ".tmp", vocab)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            run.sync()  # a remote workdir: the other processes fetch the vocab from there
            multihost_utils.sync_global_devices("roformer_sim vocab")
            vocab = run.fetch("vocab.txt")
    tokenizer = CharTokenizer(vocab)
    m = cfg.model
    rcfg = RoFormerConfig(vocab_size=tokenizer.vocab_size, hidden_size=m.hidden_size, num_layers=m.num_layers,
                          num_heads=m.num_heads, intermediate_size=m.intermediate_size,
                          dropout_rate=m.dropout_rate, attention_dropout_rate=m.dropout_rate,
                          compute_dtype=m.compute_dtype, pad_token_id=tokenizer.pad_id)
    return tokenizer, RoFormer(rcfg, rngs=nnx.Rngs(cfg.train.seed)), vocab


def supervised_rows(cfg: SimConfig) -> tuple[list, list]:
    d = cfg.data
    rows, is_nli = [], []
    if d.sts_train:
        pairs = read_sts_tsv(d.sts_train, d.sts_task, binary=True)
        rows += pairs
        is_nli += [False] * len(pairs)
    if d.nli_train:
        nli = read_cnsd_jsonl(d.nli_train)
        rows += nli
        is_nli += [True] * len(nli)
    return rows, is_nli


def main(argv=None) -> dict:
    argv = expand_flags(list(sys.argv[1:] if argv is None else argv))
    cfg, args = parse_command_line(PRESETS, argv, prog="python -m experiments.roformer_sim",
                                   default_preset="tiny_zh", description=__doc__.strip())
    run = start_run(cfg, args, name="roformer_sim")
    mesh, tc, dc = run.mesh, cfg.train, cfg.data

    train_docs = _documents(cfg, dc.train_split)
    tokenizer, model, vocab = make_tokenizer_and_model(run, cfg, train_docs)
    eval_pairs = heldout_pairs(_documents(cfg, dc.eval_split), dc, dc.eval_pairs, seed=tc.seed)
    if len(eval_pairs) < 2:
        raise ConfigError(f"only {len(eval_pairs)} held-out pairs pass the filter; use more articles "
                          "(data.max_articles=0) or loosen data.min_overlap")

    graphdef, model_params = nnx.split(model, nnx.Param)
    params: dict = {"model": model_params}
    if cfg.stage == "supervised":
        rows, is_nli = supervised_rows(cfg)
        arrays = supervised_arrays(tokenizer, rows, is_nli, dc.maxlen)
        params["classifier"] = init_classifier(jax.random.PRNGKey(tc.seed + 1), model.config.hidden_size)
        loss_fn = make_supervised_loss(graphdef)
        n_examples = f"{len(rows):,} labelled pairs ({sum(is_nli):,} NLI)"
    else:
        pairs = article_pairs(train_docs, dc)
        order = np.random.default_rng(tc.seed).permutation(len(pairs))
        pairs = [pairs[i] for i in order[:dc.max_train_pairs or None]]
        arrays = pair_arrays(tokenizer, pairs, dc.maxlen, corpus_lexicon() if dc.whole_word else None)
        n_examples = f"{len(pairs):,} same-article pairs"
        if cfg.stage == "1":
            loss_fn = make_stage1_loss(graphdef, tokenizer, cfg)
        else:
            teacher, _ = load_pretrained(cfg.teacher or cfg.init)
            if teacher.config.vocab_size != tokenizer.vocab_size:
                raise ConfigError(f"teacher vocab ({teacher.config.vocab_size}) differs from the student's "
                                  f"({tokenizer.vocab_size}); distillation needs one tokenizer for both")
            teacher_graphdef, params["teacher"] = nnx.split(teacher, nnx.Param)
            loss_fn = make_stage2_loss(graphdef, teacher_graphdef, tokenizer, cfg)

    data = BatchIterator(arrays, tc.batch_size, seed=tc.seed, sharding=batch_sharded(mesh), prefetch=tc.prefetch)
    base = make_optimizer(tc.learning_rate, warmup_steps=tc.warmup_steps, grad_clip_norm=tc.grad_clip_norm,
                          weight_decay=tc.weight_decay)
    optimizer = (optax.multi_transform({"train": base, "frozen": optax.set_to_zero()}, frozen_labels(params))
                 if "teacher" in params else base)
    state = TrainState.create(params, optimizer, jax.random.PRNGKey(tc.seed), use_ema=tc.ema_decay is not None)
    update_fn = make_update_fn(loss_fn, optimizer, ema_decay=tc.ema_decay, grad_accum_steps=tc.grad_accum_steps,
                               compute_dtype=tc.compute_dtype)
    if run.is_main:
        mc = model.config
        print(f"  stage {cfg.stage}; RoFormer L{mc.num_layers} H{mc.hidden_size} A{mc.num_heads}: "
              f"{num_params(model_params):,} parameters, vocab {tokenizer.vocab_size} "
              f"({'--init ' + cfg.init if cfg.init else 'built from the corpus'})")
        print(f"  {n_examples} ({data.batches_per_epoch} steps/epoch); {len(eval_pairs)} held-out pairs")

    texts_a, texts_b = [p[0] for p in eval_pairs], [p[1] for p in eval_pairs]

    def eval_model(s: TrainState) -> RoFormer:
        p = s.ema_params if s.ema_params is not None else s.params
        return nnx.merge(graphdef, p["model"])

    def encode(m: RoFormer, texts):
        return encode_texts(m, tokenizer, texts, maxlen=dc.maxlen + 2, batch_size=cfg.eval.encode_batch)

    def retrieval_hook(step: int, s: TrainState):
        m = eval_model(s)
        r = retrieval_metrics(encode(m, texts_a), encode(m, texts_b), cfg.eval.group_size)
        return {"top1_all": r["top1_all"], "top1_batch": r["top1_batch"]}

    hooks = [Hook(cfg.eval.every, retrieval_hook, name="retrieval", at_end=False)] if cfg.eval.every else []
    result = train(**run.train_kwargs(), state=state, update_fn=update_fn, data=data, num_steps=tc.num_steps,
                   mesh=mesh, steps_per_call=tc.steps_per_call, log_every=tc.log_every,
                   checkpoint_every=tc.checkpoint_every, keep_checkpoints=tc.keep_checkpoints, hooks=hooks,
                   batch_size=tc.batch_size, desc=f"roformer_sim stage {cfg.stage}",
                   compiler_options=cpu_compiler_options(ynn_fusions=tc.cpu_ynn_fusions))
    data.close()
    if result.preempted:
        return {}

    final = eval_model(result.state)
    results = evaluate(run, cfg, final, tokenizer, eval_pairs, encode)
    if run.is_main:
        export = export_model(run.path("export"), nnx.state(final, nnx.Param), final.config, vocab)
    else:
        export = None
    results.update(stage=cfg.stage, start_step=result.start_step, steps=result.final_step,
                   steps_per_sec=round(result.steps_per_second, 3),
                   pairs_per_sec=round(result.steps_per_second * tc.batch_size, 1),
                   train_seconds=round(result.train_seconds, 1), params=num_params(model_params),
                   vocab_size=tokenizer.vocab_size, train_examples=int(data.num_examples), export=export,
                   final_metrics=result.last_metrics)
    plot_curves(run, cfg)
    run.write_json("results.json", results)
    lines = {
        "steps": f"{result.final_step} (from {result.start_step}; {results['steps_per_sec']} steps/s, "
                 f"{results['pairs_per_sec']} pairs/s)",
        f"retrieval top-1 among {results['candidates_batch']}":
            f"{results['retrieval_top1_batch']:.3f} (bag-of-chars {results['bag_of_chars_top1_batch']:.3f}, "
            f"chance {results['chance_top1_batch']:.3f})",
        f"retrieval top-1 among {results['candidates_all']}":
            f"{results['retrieval_top1_all']:.3f} (bag-of-chars {results['bag_of_chars_top1_all']:.3f}, "
            f"chance {results['chance_top1_all']:.4f})",
    }
    if "sts_spearman" in results:
        lines["STS Spearman"] = f"{results['sts_spearman']:.4f} on {cfg.data.sts_eval}"
    lines["outputs"] = (f"{run.workdir}/ (results.json, generated.jsonl, curves.png, export/, metrics.jsonl, "
                        "checkpoints/)")
    summarize(run, lines)
    return results


def generation_inputs(eval_pairs, tokenizer: CharTokenizer, n: int) -> list[tuple[str, str]]:
    """n held-out pairs whose first sentence has the most common token length: one compile serves them all."""
    lengths = [len(tokenizer.tokenize(a)) for a, _ in eval_pairs]
    common = Counter(lengths).most_common(1)[0][0]
    return [p for p, n_tok in zip(eval_pairs, lengths) if n_tok == common][:n]


def evaluate(run, cfg: SimConfig, model: RoFormer, tokenizer: CharTokenizer, eval_pairs, encode) -> dict:
    """Retrieval accuracy (model, bag-of-chars, chance), STS Spearman on a user file, generated sentences."""
    ev = cfg.eval
    texts_a, texts_b = [p[0] for p in eval_pairs], [p[1] for p in eval_pairs]
    out: dict = {"eval_pairs": len(eval_pairs)}
    model_r = retrieval_metrics(encode(model, texts_a), encode(model, texts_b), ev.group_size)
    bag_r = retrieval_metrics(*bag_of_chars(texts_a, texts_b), ev.group_size)
    out.update(candidates_all=model_r["candidates_all"], candidates_batch=model_r["candidates_batch"],
               chance_top1_all=1.0 / model_r["candidates_all"], chance_top1_batch=1.0 / model_r["candidates_batch"])
    for k in ("top1_all", "top5_all", "top1_batch"):
        out[f"retrieval_{k}"] = model_r[k]
        out[f"bag_of_chars_{k}"] = bag_r[k]
    if cfg.data.sts_eval:
        pairs = read_sts_tsv(cfg.data.sts_eval, cfg.data.sts_task)
        out["sts_spearman"] = evaluate_spearman(lambda texts: encode(model, texts), pairs)
        out["sts_pairs"] = len(pairs)

    generated = []
    key = jax.random.PRNGKey(30_000 + cfg.train.seed)
    for i, (text, paired) in enumerate(generation_inputs(eval_pairs, tokenizer, ev.num_generate)):
        similar = similar_sentences(model, tokenizer, text, jax.random.fold_in(key, i), n=ev.gen_candidates,
                                    k=ev.gen_top_k, top_p=ev.top_p, maxlen=cfg.data.maxlen + 2)
        generated.append({"input": text, "paired_sentence": paired,
                          "similar": [{"text": s, "cosine": round(c, 4)} for s, c in similar]})
    out["generated"] = generated
    if run.is_main:
        with open(run.path("generated.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(g, ensure_ascii=False) + "\n" for g in generated)
        print("\n== similar sentences for held-out inputs (cosine to the input) ==")
        for g in generated:
            print(f"  input:  {g['input']}\n  paired: {g['paired_sentence']}")
            for s in g["similar"]:
                print(f"    {s['cosine']:.3f}  {s['text']}")
    return out


def plot_curves(run, cfg: SimConfig) -> None:
    path = run.path("metrics.jsonl")
    if not run.is_main or not os.path.exists(path):
        return
    rows = [json.loads(line) for line in open(path) if line.strip()]
    names = {"train/loss": "total", "train/gen_loss": "generation (UniLM)", "train/sim_loss": "contrastive",
             "train/distill_loss": "distillation"}
    xs, ys = {}, {}
    for key, label in names.items():
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if len(pts) >= 2:
            xs[label], ys[label] = [p[0] for p in pts], [p[1] for p in pts]
    if ys:
        save_curve_png(run.path("curves.png"), xs, ys, title=f"RoFormer-Sim stage {cfg.stage}", xlabel="step",
                       ylabel="loss", log_y=True)


if __name__ == "__main__":
    main(sys.argv[1:])
