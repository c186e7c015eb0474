"""A tokenizer trained with `tokenizers` and a tiny Llama config built in code, saved as a normal HF model dir.

The demo and the tests load these with ``from_pretrained`` -- the same path a hub model takes.
"""

from __future__ import annotations

import os

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def train_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` (offsets trimmed to the word)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)


def tiny_llama_config(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int = 172,
                      max_positions: int = 512, tie: bool = False, tokenizer=None):
    from transformers import LlamaConfig

    ids = {}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=intermediate,
                       max_position_embeddings=max_positions, tie_word_embeddings=tie, **ids)


def build_model_dir(out_dir: str, texts: list[str], vocab_size: int = 1024, seed: int = 0, **config_kwargs) -> str:
    """Train a tokenizer on ``texts``, initialise a tiny Llama (seeded) and save both to ``out_dir``."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = train_tokenizer(texts, vocab_size)
    config = tiny_llama_config(len(tokenizer), tokenizer=tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def qa_texts(rows: list[dict]) -> list[str]:
    """The text a tokenizer should see: every question, answer and their variants."""
    from palu_ds.data.prompt import PLAIN_TEMPLATE

    out = [PLAIN_TEMPLATE.format(question="")] * 20
    for r in rows:
        out += [r.get("question", ""), r.get("answer", ""), r.get("paraphrased_answer", ""),
                r.get("paraphrased_question", "")] + list(r.get("perturbed_answer", []))
    return [t for t in out if t]
