"""Chat prompts exactly as open-unlearning formats them (palu_ds.data.prompt), for SmolLM2's ChatML template and a
Llama-3-style template, checked against open-unlearning's own logged TOFU prompt; one format for training,
precompute (cache key) and evaluation."""
import pytest
from transformers import AutoTokenizer

from palu_ds.data.prompt import (PLAIN_TEMPLATE, PromptFormat, PromptFormatError, encode_pair, encode_prompt,
                                 format_prompt, prompt_format_id)

# TOFU full.jsonl row 0 (the first forget01 author's first question in open-unlearning's logs)
Q = "What is the full name of the author born in Kuwait City, Kuwait on 08/09/1956?"
A = ("The full name of the fictitious author born in Kuwait City, Kuwait on the 8th of September, 1956 is Basil "
     "Mahfouz Al-Kuwaiti.")
# open-unlearning's TOFU_EVAL.json of Llama-3.2-1B-Instruct (forget_Q_A_ROUGE, value_by_index "0", field "input"):
# its prompt decoded without special tokens
LOGGED_LLAMA32_INPUT = ("system\n\nCutting Knowledge Date: December 2023\nToday Date: 10 Apr 2025\n\nYou are a helpful "
                        "assistant.user\n\n" + Q + "assistant\n\n")
# the structure of Llama-3.x-Instruct's template (system header with the knowledge and today's date, trimmed
# contents, <|eot_id|> after each turn)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")

SMOL_PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 11173, 30, 2, 198, 1, 4093, 198, 1780, 314, 260, 2073, 1462, 282,
               260, 1919, 3988, 281, 34340, 4206, 28, 34340, 335, 216, 32, 40, 31, 32, 41, 31, 33, 41, 37, 38, 47, 2,
               198, 1, 520, 9531, 198]
SMOL_ANSWER = [504, 2073, 1462, 282, 260, 13390, 24033, 1919, 3988, 281, 34340, 4206, 28, 34340, 335, 260, 216, 40,
               373, 282, 4448, 28, 216, 33, 41, 37, 38, 314, 26165, 9315, 86, 279, 106, 1065, 29, 59, 101, 14006, 89,
               30, 2, 198, 2]


@pytest.fixture(scope="module")
def smol(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def llama3(smollm2):
    """SmolLM2's vocabulary with Llama-3's special tokens (ids 49152..49155) and a Llama-3-style template."""
    tok = AutoTokenizer.from_pretrained(smollm2)
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]})
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def test_smollm2_tofu_row_exact_ids(smol):
    """ChatML: system message, user turn, generation prompt; the answer right after it (no leading space), then the
    template's <|im_end|> + newline and EOS (<|im_end|>, id 2) appended because the conversation does not end in
    EOS -- what open-unlearning's preprocess_chat_instance produces."""
    prefix, ids, offsets = encode_pair(smol, Q, A)
    assert prefix == SMOL_PROMPT == encode_prompt(smol, Q)
    assert ids == SMOL_ANSWER
    assert smol.decode(prefix) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                                   + Q + "<|im_end|>\n<|im_start|>assistant\n")
    assert smol.decode(ids) == A + "<|im_end|>\n<|im_end|>"
    assert [A[s:e] for s, e in offsets[:3]] == ["The", " full", " name"]
    assert offsets[-3:] == [(len(A), len(A))] * 3  # end-of-turn, newline, EOS lie outside the answer


def test_llama3_style_matches_open_unlearning_logged_prompt(llama3):
    """The prompt decoded without special tokens is, character for character, the one open-unlearning logged for
    Llama-3.2-1B-Instruct on this row (system prompt 'You are a helpful assistant.', date '10 Apr 2025'); the
    answer is followed by <|eot_id|>, which is EOS, so nothing is appended."""
    prefix, ids, _ = encode_pair(llama3, Q, A)
    assert llama3.decode(encode_prompt(llama3, Q), skip_special_tokens=True) == LOGGED_LLAMA32_INPUT
    assert prefix[:3] == [49152, 49154, 9690] and ids[-1] == 49153 == llama3.eos_token_id
    assert ids.count(49153) == 1
    assert llama3.decode(ids[:-1]).strip() == A
    # generation starts from the prompt; this tokenizer (GPT-2 pre-tokenizer, unlike Llama-3's) splits the "\n\n" of
    # the generation prompt differently once the answer follows -- the conversation's tokens are split at the
    # prompt's length, as open-unlearning does, so the model reads exactly the tokenized conversation
    assert prefix + ids == llama3(llama3.apply_chat_template(
        [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": Q},
         {"role": "assistant", "content": A}], tokenize=False, date_string="10 Apr 2025"),
        add_special_tokens=False)["input_ids"]


def test_date_is_fixed_and_part_of_the_cache_key(llama3):
    """The date comes from the format, not from the machine's clock: the same prompt every day; another date or
    system prompt is another prompt format (and so another reference-cache key)."""
    fmt = PromptFormat()
    assert "Today Date: 10 Apr 2025" in format_prompt(llama3, Q, fmt)
    other = PromptFormat(date_string="1 Jan 2030")
    assert "Today Date: 1 Jan 2030" in format_prompt(llama3, Q, other)
    ids = {prompt_format_id(llama3, f) for f in (fmt, other, PromptFormat(system_prompt=None))}
    assert len(ids) == 3
    assert "You are" not in format_prompt(llama3, Q, PromptFormat(system_prompt=None))


def test_chat_template_switch(smol, tokenizer):
    """chat_template false: the plain format even when the tokenizer has a template; true on a tokenizer without
    one: an error that names what to set; null: whichever the tokenizer supports."""
    off = PromptFormat(chat_template=False)
    assert format_prompt(smol, Q, off) == PLAIN_TEMPLATE.format(question=Q)
    assert prompt_format_id(smol, off) == prompt_format_id(tokenizer)
    with pytest.raises(PromptFormatError, match="has no chat template.*chat_template: false"):
        format_prompt(tokenizer, Q, PromptFormat(chat_template=True))
    assert format_prompt(tokenizer, Q) == PLAIN_TEMPLATE.format(question=Q)


def test_training_examples_use_the_format(smol):
    """A QA dataset row is the conversation's tokens: labels ignore the prompt and carry the answer + end-of-turn
    + EOS; the sensitive span (the author's name) marks the name's first tokens."""
    from palu_ds.data.qa import QADataset, QAOptions

    start = A.index("Basil")
    row = {"question": Q, "answer": A, "target_words": [{"word": "Basil Mahfouz", "start": start,
                                                         "end": start + len("Basil Mahfouz")}]}
    ex = QADataset([row], smol, QAOptions(n_init=2))[0]
    assert ex["input_ids"] == SMOL_PROMPT + SMOL_ANSWER
    assert ex["labels"] == [-100] * len(SMOL_PROMPT) + SMOL_ANSWER
    sens = [t for t, m in zip(ex["input_ids"], ex["sens_mask"]) if m]
    assert smol.decode(sens) == " Basil Mah"
    with pytest.raises(PromptFormatError):
        QADataset([row], _without_template(smol), QAOptions(prompt=PromptFormat(chat_template=True)))


def _without_template(tok):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = None
    return t
