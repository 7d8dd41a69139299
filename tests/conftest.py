"""Shared fixtures: tiny random models built from configs (no download), one per supported family."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import methods  # noqa: F401  (registers the built-in methods)


def tiny_config(family: str = "llama", **overrides):
    """A small config of the given family: 2 blocks, hidden 64, GQA where the family has it."""
    from transformers import AutoConfig

    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, max_position_embeddings=512)
    per_family = {
        "llama": dict(intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
        "qwen2": dict(intermediate_size=160, num_attention_heads=4, num_key_value_heads=2),
        "gemma3_text": dict(intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            sliding_window=64, layer_types=["sliding_attention", "full_attention"]),
        "opt": dict(ffn_dim=160, num_attention_heads=4, word_embed_proj_dim=64, enable_bias=True),
    }
    kwargs = {**common, **per_family[family], **overrides}
    if family == "opt":
        kwargs["num_hidden_layers"] = kwargs.pop("num_hidden_layers")
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    return model.eval()


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture
def calib_tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (8, 32), generator=g)


WORDS = ("the quick brown fox jumps over lazy dog while seven wizards quietly judge boxing matches "
         "and a small model learns to predict every next token of this text").split()


def random_text(n_words: int, seed: int = 0) -> str:
    """Deterministic pseudo-text with paragraphs (blank-line separated)."""
    import random

    rng = random.Random(seed)
    paragraphs = []
    while n_words > 0:
        k = min(n_words, rng.randint(20, 60))
        paragraphs.append(" ".join(rng.choice(WORDS) for _ in range(k)) + ".")
        n_words -= k
    return "\n\n".join(paragraphs)


def tiny_tokenizer():
    """A small word-level fast tokenizer (no download) with BOS/EOS, vocabulary < 256."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\n": 3, ".": 4}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_with_tokenizer(model, path: Path) -> Path:
    """`model` and the tiny tokenizer saved with save_pretrained into `path`: loadable as `model=hf model.path=<path>`."""
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny llama + tokenizer: loadable as `model=hf model.path=<dir>`."""
    return save_with_tokenizer(tiny_model("llama"), tmp_path / "tiny-llama")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(random_text(6000))
    return path


# Mixtures of experts (transformers 5 fuses the experts into 3-D parameters) and Phi-3's fused projections: 2 blocks,
# 4 experts, top-2; DeepSeek-V3's first block is dense (first_k_dense_replace=1), as in the real model.
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")
_MOE_CONFIGS = {
    "mixtral": dict(intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2, tie_word_embeddings=True),
    "qwen2_moe": dict(intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=96,
                      num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(intermediate_size=96, moe_intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                      num_experts=4, num_experts_per_tok=2, head_dim=16),
    "olmoe": dict(intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                  num_experts_per_tok=2, eos_token_id=2, pad_token_id=0),
    "deepseek_v3": dict(intermediate_size=96, moe_intermediate_size=48, num_attention_heads=4, num_key_value_heads=4,
                        n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
    "gpt_oss": dict(intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2, head_dim=16, layer_types=["sliding_attention", "full_attention"],
                    sliding_window=64, eos_token_id=2, pad_token_id=0),
    "phi3": dict(intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0),
}


def tiny_moe_config(family: str, **overrides):
    from transformers import AutoConfig

    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, max_position_embeddings=512)
    return AutoConfig.for_model(family, **{**common, **_MOE_CONFIGS[family], **overrides})


def tiny_moe_model(family: str = "mixtral", seed: int = 0, **overrides):
    """A tiny random model of a MoE family (or phi3), every parameter initialised (the fused experts too)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(family, **overrides), dtype=torch.float32)
    return model.eval()


def gguf_writer():
    """scripts/produce/gguf_write.py, the producer that writes GGUF files with the `gguf` package (a script, not a
    package: loaded from its path)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "produce" / "gguf_write.py"
    spec = importlib.util.spec_from_file_location("gguf_write", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
