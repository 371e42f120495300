"""The HF <-> megatron mapping table and its transforms, and HF checkpoint validation (single process, no megatron
model): GQA interleave by explicit row labels, gate/up, vocabulary padding, TE aliases, coverage of transformers'
own tensor names per family, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dasd_megatron.model.hf_config import architecture_from_dict, tiny_config
from dasd_megatron.model.hf_import import open_hf_checkpoint
from dasd_megatron.model.hf_mapping import (
    ConversionError,
    from_hf,
    hf_shapes,
    order_key,
    resolve,
    to_hf,
)
from hf_fixtures import FAMILIES, hf_config_dict, make_tiny_hf, read_safetensors


def _arch(family="qwen3", **kw):
    return architecture_from_dict(tiny_config(family, **kw))


def test_qkv_fuses_in_megatron_gqa_group_order():
    """4 query heads, 2 groups, head dim 16: megatron rows are [q0 q1 k0 v0 | q2 q3 k1 v1] (16 rows per head)."""
    arch = _arch("qwen2")
    res = resolve("decoder.layers.3.self_attention.linear_qkv.weight", arch)
    assert res.hf_names == tuple(f"model.layers.3.self_attn.{x}_proj.weight" for x in "qkv")
    hn, h = arch.kv_channels, arch.hidden_size
    # Label every row: value = 100*head_kind + head index, constant along the row.
    q = torch.arange(4).repeat_interleave(hn)[:, None].float().expand(-1, h) + 100
    k = torch.arange(2).repeat_interleave(hn)[:, None].float().expand(-1, h) + 200
    v = torch.arange(2).repeat_interleave(hn)[:, None].float().expand(-1, h) + 300
    fused = from_hf(res, [q, k, v], arch, padded_vocab=0)
    assert fused.shape == (8 * hn, h)
    heads = fused[::hn, 0].tolist()
    assert heads == [100, 101, 200, 300, 102, 103, 201, 301]
    back = dict(to_hf(res, fused, arch))
    for name, want in zip(res.hf_names, (q, k, v)):
        assert torch.equal(back[name], want)
    bias = resolve("decoder.layers.0.self_attention.linear_qkv.bias", arch)
    qb, kb, vb = q[:, 0].clone(), k[:, 0].clone(), v[:, 0].clone()
    fb = from_hf(bias, [qb, kb, vb], arch, 0)
    assert fb[::hn].tolist() == heads
    assert all(torch.equal(a, b) for (_, a), b in zip(to_hf(bias, fb, arch), (qb, kb, vb)))


def test_gate_up_and_vocab_padding():
    arch = _arch("llama")
    fc1 = resolve("decoder.layers.0.mlp.linear_fc1.weight", arch)
    gate, up = torch.randn(128, 64), torch.randn(128, 64)
    fused = from_hf(fc1, [gate, up], arch, 0)
    assert torch.equal(fused[:128], gate) and torch.equal(fused[128:], up)
    assert [n for n, _ in to_hf(fc1, fused, arch)] == ["model.layers.0.mlp.gate_proj.weight",
                                                       "model.layers.0.mlp.up_proj.weight"]
    emb = resolve("embedding.word_embeddings.weight", arch)
    w = torch.randn(arch.vocab_size, 64)
    padded = from_hf(emb, [w], arch, padded_vocab=512)
    assert padded.shape == (512, 64) and torch.equal(padded[:509], w) and not padded[509:].any()
    ((name, back),) = to_hf(emb, padded, arch)
    assert name == "model.embed_tokens.weight" and torch.equal(back, w)


def test_te_fused_norm_names_are_aliases():
    arch = _arch("qwen3")
    for te, local in [("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
                      ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight")]:
        assert resolve(f"decoder.layers.2.{te}", arch).hf_names == resolve(f"decoder.layers.2.{local}", arch).hf_names
    assert resolve("decoder.layers.1.self_attention.q_layernorm.weight", arch).hf_names == (
        "model.layers.1.self_attn.q_norm.weight",)


def test_tied_output_layer_imports_from_embedding_and_is_never_exported():
    tied, untied = _arch("llama", tie_word_embeddings=True), _arch("llama")
    r = resolve("output_layer.weight", tied)
    assert r.hf_names == ("model.embed_tokens.weight",) and not r.rule.export
    r = resolve("output_layer.weight", untied)
    assert r.hf_names == ("lm_head.weight",) and r.rule.export
    assert "lm_head.weight" not in hf_shapes(tied) and "lm_head.weight" in hf_shapes(untied)


def test_unknown_names_and_architectures_are_refused():
    with pytest.raises(ConversionError, match="linear_qkv.bias.*no HF mapping.*Fix"):
        resolve("decoder.layers.0.self_attention.linear_qkv.bias", _arch("llama"))  # llama has no QKV bias
    with pytest.raises(ConversionError, match="no HF mapping"):
        resolve("decoder.layers.0.self_attention.q_layernorm.weight", _arch("qwen2"))
    with pytest.raises(Exception, match="qwen2.*qwen3.*llama"):
        architecture_from_dict({**tiny_config("llama"), "model_type": "gpt2"})


def test_order_is_hf_canonical():
    names = ["output_layer.weight", "decoder.final_layernorm.weight", "decoder.layers.10.mlp.linear_fc2.weight",
             "decoder.layers.2.self_attention.linear_qkv.weight", "decoder.layers.2.input_layernorm.weight",
             "embedding.word_embeddings.weight"]
    assert sorted(names, key=order_key) == names[::-1]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_table_covers_exactly_what_transformers_saves(tmp_path, family):
    """hf_shapes (the names and shapes the mapping produces) == the tensors transformers' own class saved."""
    d = make_tiny_hf(str(tmp_path / family), family)
    saved = read_safetensors(d)
    arch = architecture_from_dict(hf_config_dict(family))
    assert {k: tuple(v.shape) for k, v in saved.items()} == hf_shapes(arch)
    ckpt = open_hf_checkpoint(d)
    assert ckpt.dtype == torch.float32 and ckpt.arch == arch


# ---------------------------------------------------------------------------------------------------------------
# Bad checkpoints: each error names the problem and the fix


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    return make_tiny_hf(str(tmp_path_factory.mktemp("good") / "llama"), "llama")


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_missing_weights(tmp_path, good_dir):
    d = _copy(good_dir, tmp_path / "m")
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(ConversionError, match="no safetensors weights.*Fix"):
        open_hf_checkpoint(d)
    torch.save({}, os.path.join(d, "pytorch_model.bin"))
    with pytest.raises(ConversionError, match="found pytorch_model.bin.*save_pretrained"):
        open_hf_checkpoint(d)


def test_corrupt_and_truncated_safetensors(tmp_path, good_dir):
    d = _copy(good_dir, tmp_path / "c")
    path = os.path.join(d, "model.safetensors")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(b"\x00garbage" + data[9:])
    with pytest.raises(ConversionError, match="not a readable safetensors file.*Fix: re-download"):
        open_hf_checkpoint(d)
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="not a readable safetensors file"):
        open_hf_checkpoint(d)


def test_index_pointing_at_missing_shard(tmp_path, good_dir):
    d = _copy(good_dir, tmp_path / "i")
    names = list(read_safetensors(d))
    os.rename(os.path.join(d, "model.safetensors"), os.path.join(d, "model-00001-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {n: f"model-0000{1 + (i % 2)}-of-00002.safetensors"
                                            for i, n in enumerate(names)}}
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with pytest.raises(ConversionError, match="missing weight file.*model-00002-of-00002.*download"):
        open_hf_checkpoint(d)


def test_shape_mismatch_and_wrong_config(tmp_path, good_dir):
    d = _copy(good_dir, tmp_path / "s")
    cfg_path = os.path.join(d, "config.json")
    cfg = json.load(open(cfg_path))
    json.dump({**cfg, "intermediate_size": 96}, open(cfg_path, "w"))
    with pytest.raises(ConversionError, match=r"shape mismatch for 'model.layers.0.mlp.gate_proj.weight'.*"
                                              r"\[128, 64\].*\[96, 64\].*Fix"):
        open_hf_checkpoint(d)
    json.dump({**cfg, "model_type": "qwen3"}, open(cfg_path, "w"))  # qwen3 needs q_norm/k_norm
    with pytest.raises(ConversionError, match="missing, e.g. 'model.layers.0.self_attn.q_norm.weight'"):
        open_hf_checkpoint(d)
    json.dump({**cfg, "tie_word_embeddings": True}, open(cfg_path, "w"))
    open_hf_checkpoint(d)  # a stored lm_head next to tied embeddings is ignored (with a warning), not an error
    json.dump({**cfg, "num_hidden_layers": 3}, open(cfg_path, "w"))
    with pytest.raises(ConversionError, match="does not know, e.g. 'model.layers.3"):
        open_hf_checkpoint(d)


def test_unknown_architecture(tmp_path, good_dir):
    d = _copy(good_dir, tmp_path / "u")
    cfg_path = os.path.join(d, "config.json")
    json.dump({**json.load(open(cfg_path)), "model_type": "mistral"}, open(cfg_path, "w"))
    with pytest.raises(ConversionError, match="model_type='mistral'.*not supported. Supported: qwen2.*llama"):
        open_hf_checkpoint(d)


# ---------------------------------------------------------------------------------------------------------------
# The safetensors shard writer used by `convert_hf.py export`


def test_shard_writer_splits_indexes_and_refuses_incomplete_streams(tmp_path):
    from dasd_megatron.model.export import SafetensorsShardWriter, parse_size

    assert parse_size("2GB") == 2 * 10**9 and parse_size("512MiB") == 512 << 20 and parse_size("100") == 100
    with pytest.raises(ConversionError, match="not understood"):
        parse_size("lots")
    tensors = {f"t{i}": torch.full((10, 10), float(i)) for i in range(5)}  # 400 bytes each
    plan = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    w = SafetensorsShardWriter(str(tmp_path), plan, max_shard_bytes=800)
    for n, t in tensors.items():
        w.add(n, t)
    w.finish()
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert index["metadata"]["total_size"] == 2000
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    got = read_safetensors(str(tmp_path))
    assert all(torch.equal(got[n], t) for n, t in tensors.items())
    w = SafetensorsShardWriter(str(tmp_path / "x"), plan, max_shard_bytes=800)
    with pytest.raises(ConversionError, match="unexpected tensor 'zz'"):
        w.add("zz", torch.zeros(1))
    with pytest.raises(ConversionError, match="ended without 5 tensor"):
        w.finish()
