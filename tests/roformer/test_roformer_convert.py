"""Checkpoint conversion: HF round trip through transformers, bert4keras name mapping, clear errors."""
import jax
import numpy as np
import pytest
from flax import nnx

from gen_jax.errors import CheckpointError
from gen_jax.roformer import RoFormerConfig, build
from gen_jax.roformer.convert import (bert4keras_to_params, hf_state_dict_to_params, load_bert4keras, load_hf,
                                      params_to_hf_state_dict)

CFG = RoFormerConfig(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24,
                     embedding_size=12, max_positions=32)


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (_, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_hf_round_trip_through_transformers_and_a_safetensors_file(tmp_path):
    """ours -> HF state dict loads strictly into transformers' RoFormerForMaskedLM and comes back unchanged."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import save_file

    ours = build(CFG, seed=3, pooler=None)
    sd = params_to_hf_state_dict(_params(ours), ours.config)
    hf = transformers.RoFormerForMaskedLM(transformers.RoFormerConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        embedding_size=12, max_position_embeddings=32)).eval()
    hf.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=True)
    # (forward parity with transformers is tested in test_roformer_model; here the maps must be inverses)
    _leaves_equal(hf_state_dict_to_params(hf.state_dict(), ours.config), _params(ours))
    for k, v in hf.state_dict().items():
        np.testing.assert_allclose(v.numpy(), sd[k], atol=1e-6, err_msg=k)  # incl. HF's sinusoid table
    # and via a file on disk
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    loaded = load_hf(str(tmp_path / "model.safetensors"), num_heads=2, max_positions=32)
    assert loaded.config == ours.config
    _leaves_equal(_params(loaded), _params(ours))


def test_hf_errors_list_missing_unexpected_and_mismatched_keys():
    model = build(CFG)
    sd = params_to_hf_state_dict(_params(model), CFG)
    broken = dict(sd)
    del broken["roformer.encoder.layer.0.attention.self.key.bias"]
    broken["roformer.encoder.layer.0.extra.weight"] = np.zeros(3)
    broken["roformer.embeddings.LayerNorm.weight"] = np.zeros(5)
    with pytest.raises(CheckpointError) as e:
        hf_state_dict_to_params(broken, CFG)
    msg = str(e.value)
    assert "encoder.layer.0.attention.self.key.bias" in msg and "missing" in msg
    assert "encoder.layer.0.extra.weight" in msg and "unexpected" in msg
    assert "embed_norm/scale" in msg and "(5,)" in msg
    untied = dict(sd, **{"cls.predictions.decoder.weight": sd["cls.predictions.decoder.weight"] + 1})
    with pytest.raises(CheckpointError, match="tied"):
        hf_state_dict_to_params(untied, CFG)


def _bert4keras_names(L):
    names = ["bert/embeddings/word_embeddings", "bert/embeddings/token_type_embeddings",
             "bert/embeddings/LayerNorm/gamma", "bert/embeddings/LayerNorm/beta",
             "bert/encoder/embedding_hidden_mapping_in/kernel", "bert/encoder/embedding_hidden_mapping_in/bias",
             "pooler/dense/kernel", "pooler/dense/bias",
             "cls/predictions/transform/dense/kernel", "cls/predictions/transform/dense/bias",
             "cls/predictions/transform/LayerNorm/gamma", "cls/predictions/transform/LayerNorm/beta",
             "cls/predictions/output_bias"]
    for i in range(L):
        p = f"bert/encoder/layer_{i}/"
        for sub in ("attention/self/query", "attention/self/key", "attention/self/value",
                    "attention/output/dense", "intermediate/dense", "output/dense"):
            names += [p + sub + "/kernel", p + sub + "/bias"]
        for sub in ("attention/output/LayerNorm", "output/LayerNorm"):
            names += [p + sub + "/gamma", p + sub + "/beta"]
    return names


def test_bert4keras_mapping_from_a_synthetic_variable_dict():
    cfg = CFG
    model = build(cfg, seed=5)
    params = _params(model)
    ours_of = {  # bert4keras name -> our array (TF kernels are [in, out] like ours)
        "bert/embeddings/word_embeddings": params["word_embeddings"]["embedding"],
        "bert/embeddings/token_type_embeddings": params["segment_embeddings"]["embedding"],
        "bert/embeddings/LayerNorm/gamma": params["embed_norm"]["scale"],
        "bert/embeddings/LayerNorm/beta": params["embed_norm"]["bias"],
        "bert/encoder/embedding_hidden_mapping_in/kernel": params["embed_project"]["kernel"],
        "bert/encoder/embedding_hidden_mapping_in/bias": params["embed_project"]["bias"],
        "pooler/dense/kernel": params["pooler"]["kernel"], "pooler/dense/bias": params["pooler"]["bias"],
        "cls/predictions/transform/dense/kernel": params["mlm_dense"]["kernel"],
        "cls/predictions/transform/dense/bias": params["mlm_dense"]["bias"],
        "cls/predictions/transform/LayerNorm/gamma": params["mlm_norm"]["scale"],
        "cls/predictions/transform/LayerNorm/beta": params["mlm_norm"]["bias"],
        "cls/predictions/output_bias": params["mlm_bias"],
    }
    layer = params["layers"][0]
    for sub, ours in [("attention/self/query", "query"), ("attention/self/key", "key"),
                      ("attention/self/value", "value"), ("attention/output/dense", "attn_out"),
                      ("intermediate/dense", "ffn_in"), ("output/dense", "ffn_out")]:
        ours_of[f"bert/encoder/layer_0/{sub}/kernel"] = layer[ours]["kernel"]
        ours_of[f"bert/encoder/layer_0/{sub}/bias"] = layer[ours]["bias"]
    for sub, ours in [("attention/output/LayerNorm", "attn_norm"), ("output/LayerNorm", "ffn_norm")]:
        ours_of[f"bert/encoder/layer_0/{sub}/gamma"] = layer[ours]["scale"]
        ours_of[f"bert/encoder/layer_0/{sub}/beta"] = layer[ours]["bias"]
    assert sorted(ours_of) == sorted(_bert4keras_names(1))
    variables = {k: np.asarray(v) for k, v in ours_of.items()}
    # optimizer slots and the step counter of a training checkpoint are ignored
    variables["global_step"] = np.array(7)
    variables["bert/encoder/layer_0/output/dense/kernel/adam_m"] = np.zeros((24, 16))
    _leaves_equal(bert4keras_to_params(variables, cfg), params)

    del variables["cls/predictions/output_bias"]
    variables["bert/encoder/layer_0/attention/self/query/kernel"] = np.zeros((16, 15))
    with pytest.raises(CheckpointError) as e:
        bert4keras_to_params(variables, cfg)
    assert "cls/predictions/output_bias" in str(e.value) and "(16, 15)" in str(e.value)


def test_loading_a_tf_checkpoint_without_tensorflow_names_the_install(tmp_path):
    try:
        import tensorflow  # noqa: F401
        pytest.skip("tensorflow is installed")
    except ImportError:
        pass
    with pytest.raises(CheckpointError, match="pip install tensorflow"):
        load_bert4keras(str(tmp_path))
