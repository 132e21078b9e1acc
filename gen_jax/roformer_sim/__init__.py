"""RoFormer-Sim (SimBERTv2): losses of every stage, BART-style corruption, generation + re-ranking, STS eval."""
from gen_jax.roformer_sim.corruption import corrupt_words, pair_rows, random_token_ids
from gen_jax.roformer_sim.generate import encode_texts, nucleus_sample, sample_candidates, similar_sentences
from gen_jax.roformer_sim.losses import (contrastive_loss, distillation_loss, make_stage1_loss_fn,
                                         make_stage2_loss_fn, make_supervised_loss_fn, sbert_classification_loss,
                                         sbert_logits, unilm_generation_loss)
from gen_jax.roformer_sim.sts import evaluate_spearman, format_table, read_cnsd_jsonl, read_sts_tsv

__all__ = ["corrupt_words", "pair_rows", "random_token_ids", "encode_texts", "nucleus_sample", "sample_candidates",
           "similar_sentences", "contrastive_loss", "distillation_loss", "make_stage1_loss_fn",
           "make_stage2_loss_fn", "make_supervised_loss_fn", "sbert_classification_loss", "sbert_logits",
           "unilm_generation_loss", "evaluate_spearman", "format_table", "read_cnsd_jsonl", "read_sts_tsv"]
