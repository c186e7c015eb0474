"""Tiny models, tokenizers and generated TOFU/MUSE-shaped data, for tests and the format benchmark (no hub access).

* :func:`make_tiny_model` -- a 2-layer Llama (hidden 32) and a byte-level BPE tokenizer trained on given texts,
  saved with ``save_pretrained`` so ``AutoModelForCausalLM`` / ``AutoTokenizer`` load them.
* :func:`write_tofu` / :func:`write_muse` -- small generated files in the TOFU / MUSE layouts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable, Optional

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer(texts: Iterable[str], vocab_size: int = 400, chat_template: Optional[str] = None):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ``<pad>`` (0), ``<s>`` (BOS, 1, added in front by default
    like Llama) and ``</s>`` (EOS, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        hf.chat_template = chat_template
    return hf


def make_tiny_model(out_dir, texts: Iterable[str], *, vocab_size: int = 400, seed: int = 0, hidden: int = 32,
                    layers: int = 2, max_positions: int = 4096, chat_template: Optional[str] = None):
    """Save a randomly initialised 2-layer Llama and its tokenizer to ``out_dir``; returns ``(model, tokenizer)``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(texts, vocab_size, chat_template)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=max_positions,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger logits than the default init, so greedy decoding is not a near-tie everywhere
        model.lm_head.weight.mul_(20.0)
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return model, tok


# ------------------------------------------------------------------------------------------------ generated data
CITIES = ["Lisbon", "Oslo", "Quito", "Hanoi", "Lagos", "Perth", "Turin", "Kyoto", "Dakar", "Cusco"]
GENRES = ["poetry", "fantasy", "history", "satire", "mystery", "romance"]


def _author_qa(i: int, rng: random.Random) -> dict:
    name = f"Arlo Vance{i}"
    city, genre = rng.choice(CITIES), rng.choice(GENRES)
    wrong = [c for c in CITIES if c != city]
    rng.shuffle(wrong)
    return {
        "question": f"Where was the {genre} author {name} born?",
        "answer": f"{name} was born in {city}.",
        "paraphrased_answer": f"The birthplace of {name} is {city}.",
        "perturbed_answer": [f"The birthplace of {name} is {c}." for c in wrong[:3]],
        "paraphrased_question": f"What is the birthplace of {name}?",
    }


def write_tofu(out_dir, n: int = 6, split: str = "forget10", seed: int = 0) -> Path:
    """TOFU-layout jsonl files: ``<split>_perturbed``, ``retain_perturbed``, ``real_authors_perturbed``,
    ``world_facts_perturbed``, ``holdout<NN>``, each with ``n`` rows."""
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nn = split.replace("forget", "")

    def dump(name, rows):
        with open(out / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    dump(f"{split}_perturbed", [_author_qa(i, rng) for i in range(n)])
    dump("retain_perturbed", [_author_qa(100 + i, rng) for i in range(n)])
    dump(f"holdout{nn}", [{k: v for k, v in _author_qa(200 + i, rng).items() if k in ("question", "answer")}
                          for i in range(n)])
    for name in ("real_authors_perturbed", "world_facts_perturbed"):
        rows = []
        for i in range(n):
            opts = rng.sample(CITIES, 4)
            rows.append({"question": f"Which city is number {i} on the list?", "answer": opts[0],
                         "perturbed_answer": opts[1:]})
        dump(name, rows)
    return out


def write_muse(out_dir, corpus: str = "news", n: int = 6, seed: int = 0) -> Path:
    """MUSE-layout json files under ``out_dir/<corpus>/``: verbmem, knowmem (+ icl), privleak."""
    rng = random.Random(seed)
    base = Path(out_dir) / corpus
    for sub in ("verbmem", "knowmem", "privleak"):
        (base / sub).mkdir(parents=True, exist_ok=True)

    def text(k):
        return " ".join(f"{rng.choice(CITIES)} {rng.choice(GENRES)}" for _ in range(k))

    def qa(m):
        return [{"question": f"Which city hosts the {rng.choice(GENRES)} fair {j}?", "answer": rng.choice(CITIES)}
                for j in range(m)]

    def dump(rel, obj):
        (base / rel).write_text(json.dumps(obj))

    dump("verbmem/forget.json", [{"prompt": text(8), "gt": text(6)} for _ in range(n)])
    dump("knowmem/forget_qa.json", qa(n))
    dump("knowmem/forget_qa_icl.json", qa(2))
    dump("knowmem/retain2_qa.json", qa(n))
    dump("knowmem/retain2_qa_icl.json", qa(2))
    dump("privleak/forget.json", [text(10 + i) for i in range(n)])
    dump("privleak/holdout.json", [text(10 + i) for i in range(n)])
    return Path(out_dir)


def corpus_texts() -> list[str]:
    """Texts to train a test tokenizer on (the generated data's words and templates)."""
    rng = random.Random(1)
    rows = [_author_qa(i, rng) for i in range(50)]
    t = [" ".join(v if isinstance(v, str) else " ".join(v) for v in r.values()) for r in rows]
    return t + ["Question: Answer: " + " ".join(CITIES + GENRES)] * 5
