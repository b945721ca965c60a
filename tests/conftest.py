"""Shared fixtures: tiny random models built in-process (nothing is downloaded)."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def tiny_llama(vocab_size: int = 96, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def randomize_lora(model, seed: int = 1, scale: float = 0.5):
    """Give every lora_B a non-zero value so the adapter really changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    return model


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


def make_tiny_tokenizer(vocab_size: int = 96):
    """A word-level tokenizer with a ChatML template: ids 0-4 are special, the rest are words."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<unk>"]
    words = ["user", "assistant", "system", "\n", " "] + [f"w{i}" for i in range(vocab_size - len(specials) - 5)]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # tokens already carry their whitespace
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                  eos_token="<|im_end|>", unk_token="<unk>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def max_relative_grad_error(grads, ref_grads) -> float:
    """max over weights of max |g − g_ref| / max |g_ref| (each reference gradient must be non-zero)."""
    worst = 0.0
    for g, rg in zip(grads, ref_grads):
        scale = rg.abs().max().item()
        assert scale > 0
        worst = max(worst, (g.double() - rg.double()).abs().max().item() / scale)
    return worst
