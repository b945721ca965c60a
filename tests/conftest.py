"""Shared fixtures: tiny random models built in-process (nothing is downloaded)."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def tiny_llama(vocab_size: int = 96, seed: int = 0, *, tokenizer=None, context: int = 256,
               init_range: float | None = None, endless: bool = False):
    """A 2-layer random Llama (a plain transformers model), the one tiny model of the tests.

    Without ``tokenizer``: pad 0, bos 1, eos 2 (the ids of :func:`make_tiny_tokenizer` and
    :func:`byte_bpe_tokenizer`); with it, its size and special ids. ``init_range``: the weights' init
    std (larger gives peakier, more varied generations). ``endless``: the end-of-turn logit is always
    0, so greedy decoding (almost surely) never ends by itself."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if tokenizer is None:
        ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    else:
        vocab_size = len(tokenizer)
        ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    extra = {} if init_range is None else {"initializer_range": init_range}
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         tie_word_embeddings=False, **ids, **extra)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    if endless:
        with torch.no_grad():
            model.lm_head.weight[config.eos_token_id] = 0.0
    return model


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
    tok.chat_template = CHATML
    return tok


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_bpe_tokenizer(corpus: list[str], vocab_size: int = 300):
    """A small byte-level BPE tokenizer trained on ``corpus`` (round-trips any text, so stop strings
    work) with ChatML; pad = 0 (<|endoftext|>) and eos = 2 (<|im_end|>), :func:`tiny_llama`'s ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML)


def char_tokenizer():
    """One token per character (letters, digits, a little punctuation) with ChatML: any short English
    prompt encodes, and every generated token decodes to one character."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    chars = list(string.ascii_letters + string.digits + " .,!?\n'")
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + chars)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<|im_start|>",
                                        eos_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def gemma_like_tokenizer(adds_bos: bool = False):
    """A word-level tokenizer with Gemma's special tokens (<start_of_turn>, <end_of_turn>) and no chat
    template; ``adds_bos``: it starts every text with <bos>, as Gemma's does."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    words = ["user", "model", "\n", " ", "User", "Assistant", "System", ":"] + [f"w{i}" for i in range(40)]
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s|:"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    assert not tok.chat_template
    return tok


def max_relative_grad_error(grads, ref_grads) -> float:
    """max over weights of max |g − g_ref| / max |g_ref| (each reference gradient must be non-zero)."""
    worst = 0.0
    for g, rg in zip(grads, ref_grads):
        scale = rg.abs().max().item()
        assert scale > 0
        worst = max(worst, (g.double() - rg.double()).abs().max().item() / scale)
    return worst
