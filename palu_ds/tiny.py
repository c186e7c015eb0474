"""The tiny test model, one home: a tokenizer trained with `tokenizers` and a tiny Llama config built in code, saved
as a normal HF model dir (:func:`build_model_dir` for the demo and the training tests, :func:`make_tiny_model` for
the evaluation tests, benchmarks).  They load it with ``from_pretrained`` -- the same path a hub model takes.
"""

from __future__ import annotations

import os

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
#: :func:`make_tiny_model`'s tokenizer: ``<pad>`` (0), ``<s>`` (BOS, 1, added in front like Llama's), ``</s>`` (2)
BOS_FIRST_SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
#: a minimal chat template (tests of the chat prompt format)
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def train_tokenizer(texts, vocab_size: int = 1024, special: dict = SPECIAL, bos_first: bool = False,
                    chat_template: str | None = None):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` with the ``special`` tokens (in that id
    order).  Default: offsets trimmed to the word, no BOS added; ``bos_first``: BOS added in front of every text
    (as Llama's tokenizer does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=special.get("unk_token")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    if bos_first:
        bos = special["bos_token"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    if chat_template:
        hf.chat_template = chat_template
    return hf


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


def make_tiny_model(out_dir, texts, *, vocab_size: int = 400, seed: int = 0, hidden: int = 32, layers: int = 2,
                    max_positions: int = 4096, chat_template: str | None = None):
    """A randomly initialised 2-layer Llama (2 heads) and its BOS-first tokenizer saved to ``out_dir``; returns
    ``(model, tokenizer)``.  The head is scaled up (x20) so that greedy decoding is not a near-tie everywhere."""
    import torch
    from transformers import LlamaForCausalLM

    tok = train_tokenizer(texts, vocab_size, BOS_FIRST_SPECIAL, bos_first=True, chat_template=chat_template)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tok), hidden, layers, heads=2, intermediate=2 * hidden,
                                               max_positions=max_positions, tokenizer=tok)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return model, tok


def qa_texts(rows: list[dict]) -> list[str]:
    """The text a tokenizer should see: every question, answer and their variants."""
    from palu_ds.data.prompt import PLAIN_TEMPLATE

    out = [PLAIN_TEMPLATE.format(question="")] * 20
    for r in rows:
        out += [r.get("question", ""), r.get("answer", ""), r.get("paraphrased_answer", ""),
                r.get("paraphrased_question", "")] + list(r.get("perturbed_answer", []))
    return [t for t in out if t]
