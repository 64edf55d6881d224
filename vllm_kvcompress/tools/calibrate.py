"""HeadKV head-importance calibration: ``python -m vllm_kvcompress.tools.calibrate MODEL --out scores.json``.

Computes the two per-head scores of HeadKV (Fu et al. 2024, arXiv 2410.19258, Sec. 3.1) on prompts
from :mod:`vllm_kvcompress.tools.synthetic` and writes them with :class:`~vllm_kvcompress.policies.head_scores.HeadScores`:

* **retrieval** (HeadKV-R; the retrieval-head score of Wu et al. 2024, arXiv 2404.15574): the
  model greedily answers a needle-in-a-haystack question. At each decode step a query head copies
  when its attention argmax lands on a needle token equal to the token being generated; the
  prompt's score of a head is the fraction of the needle's tokens it copied.
* **retrieval_reasoning** (HeadKV-R2): the needle is a passage with a wrong and a right value, so
  answering needs a reasoning step. At each step that generates the answer, a head gets the
  attention it puts on the evidence tokens (the clause with the right value) among its top-k
  attended positions, k = the evidence length; the prompt's score divides the sum by
  k x (answer tokens).

As in the paper, a prompt counts only when the model answered it correctly (when none did, all
prompts count and ``calibration`` says so); a query head's score is its mean over the counted
prompts. The cache is per KV head, so the query heads of each GQA group are summed, and the
scores are normalised to sum to 1 over the model (the paper's head-score distribution).

Attention weights come from eager attention during decode only (the prompt is prefilled with the
model's usual kernel), so memory per step is O(layers x heads x prompt length).

MODEL: ``smollm2`` (the built-in SmolLM2-135M-Instruct), ``tiny-random`` (a random-weight tiny
Llama with a byte-level tokenizer, for tests), a local Hugging Face folder, or a ``.gguf`` file.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_kvcompress.policies.head_scores import HeadScores
from vllm_kvcompress.tools.synthetic import Sample, make_reasoning_sample, make_sample, score

METHOD = (
    "HeadKV (arXiv 2410.19258): retrieval = argmax-copy score (Wu et al.); "
    "retrieval_reasoning = top-k attention mass on the evidence"
)


# ---------------------------------------------------------------- per-step credit (pure tensor code)


def retrieval_step_credit(
    attention: torch.Tensor, token: int, prompt_ids: torch.Tensor, span: tuple[int, int]
) -> torch.Tensor:
    """Copy credit of one decode step (Wu et al.'s retrieval score).

    attention: float [num_layers, num_q_heads, prompt_len], each head's attention of the query that
    produced ``token``; prompt_ids: int [prompt_len]; span: [start, end) of the needle tokens.
    Returns float [num_layers, num_q_heads]: 1 / needle length where the head's argmax is a needle
    position holding ``token``, else 0."""
    start, end = span
    top = attention.argmax(-1)  # [L, H]
    in_needle = (top >= start) & (top < end)
    copies = prompt_ids.to(top.device)[top] == token
    return (in_needle & copies).to(attention.dtype) / (end - start)


def reasoning_step_credit(attention: torch.Tensor, span: tuple[int, int], answer_len: int) -> torch.Tensor:
    """Retrieval-reasoning credit of one decode step (HeadKV-R2).

    attention: float [num_layers, num_q_heads, prompt_len]; span: [start, end) of the evidence
    tokens; answer_len: tokens in the answer. Each head's top-k attended positions (k = evidence
    length) are taken; the attention of those inside the evidence is summed and divided by
    k x answer_len. Returns float [num_layers, num_q_heads]."""
    start, end = span
    k = min(end - start, attention.shape[-1])
    values, positions = attention.topk(k, dim=-1)  # [L, H, k]
    inside = (positions >= start) & (positions < end)
    return (values * inside).sum(-1) / (k * answer_len)


def group_query_heads(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """float [num_layers, num_q_heads] -> [num_layers, num_kv_heads]: the sum over each GQA group
    (query heads ``g * group ... (g+1) * group - 1`` read KV head ``g``, as in ``repeat_kv``)."""
    num_layers, num_q_heads = scores.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not split into {num_kv_heads} KV groups")
    return scores.reshape(num_layers, num_kv_heads, num_q_heads // num_kv_heads).sum(-1)


def normalised(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` divided by their sum (all zeros stay zeros)."""
    total = scores.sum()
    return scores / total if total > 0 else scores.clone()


# ---------------------------------------------------------------- decoding with attention


@torch.no_grad()
def traced_greedy(
    model, prompt_ids: torch.Tensor, max_new_tokens: int, stop_ids=()
) -> Generator[tuple[int, torch.Tensor], bool | None, None]:
    """Greedy decoding that yields, per generated token, ``(token, attention)`` with attention
    float32 [num_layers, num_q_heads, prompt_len]: each head's attention over the prompt from the
    query that produced the token (the first token's query is the prompt's last token).

    prompt_ids: int [prompt_len]. The prompt minus its last token is prefilled with the model's own
    attention kernel; every later step runs eager attention to get the weights. ``send(True)``
    instead of ``next`` ends the decoding after the token just yielded."""
    from transformers import DynamicCache

    ids = prompt_ids.reshape(-1).to(model.device)
    prompt_len = ids.shape[0]
    cache = DynamicCache(config=model.config)
    previous = model.config._attn_implementation
    try:
        if prompt_len > 1:
            model(input_ids=ids[None, :-1], cache=cache, use_cache=True)
        model.set_attn_implementation("eager")
        token = ids[-1:]
        for _ in range(max_new_tokens):
            out = model(input_ids=token[None], cache=cache, use_cache=True, output_attentions=True)
            attention = torch.stack([a[0, :, -1, :prompt_len] for a in out.attentions]).float()
            next_token = int(out.logits[0, -1].argmax())
            stop = yield next_token, attention
            if next_token in stop_ids or stop:
                return
            token = torch.tensor([next_token], device=model.device)
    finally:
        model.set_attn_implementation(previous)


@dataclass
class PromptTrace:
    """What one calibration prompt produced. tokens: generated ids; retrieval: float [L, Hq], the
    summed copy credit; reasoning_steps: float [steps, L, Hq], per-step top-k evidence mass
    (not yet divided by the answer length)."""

    tokens: list[int]
    retrieval: torch.Tensor
    reasoning_steps: torch.Tensor


def trace_prompt(
    model,
    prompt_ids: torch.Tensor,
    needle_span: tuple[int, int],
    evidence_span: tuple[int, int],
    max_new_tokens: int,
    stop_ids=(),
    done=None,
) -> PromptTrace:
    """Decode ``prompt_ids`` (int [prompt_len]) greedily and collect both credits.

    needle_span / evidence_span: [start, end) token positions of the needle (copy credit) and of
    the evidence (reasoning credit). done: optional ``f(tokens) -> bool`` that ends decoding early
    (e.g. once the answer has been produced)."""
    ids = prompt_ids.reshape(-1)
    for start, end in (needle_span, evidence_span):
        if not 0 <= start < end <= ids.shape[0]:
            raise ValueError(f"span [{start}, {end}) is not inside the {ids.shape[0]}-token prompt")
    tokens: list[int] = []
    retrieval, steps = None, []
    decoding = traced_greedy(model, ids, max_new_tokens, stop_ids)
    step = next(decoding, None)
    while step is not None:
        token, attention = step
        tokens.append(token)
        credit = retrieval_step_credit(attention, token, ids, needle_span)
        retrieval = credit if retrieval is None else retrieval + credit
        steps.append(reasoning_step_credit(attention, evidence_span, answer_len=1))
        try:
            step = decoding.send(bool(done and done(tokens)))
        except StopIteration:
            step = None
    return PromptTrace(tokens, retrieval, torch.stack(steps))


# ---------------------------------------------------------------- prompts -> token spans


def token_span(tokenizer, text: str, needle: str, add_special_tokens: bool) -> tuple[int, int]:
    """[start, end) of the tokens of ``text`` that cover the first occurrence of ``needle``."""
    first = text.find(needle)
    if first < 0:
        raise ValueError(f"{needle!r} is not in the prompt")
    last = first + len(needle)
    encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    covering = [i for i, (s, e) in enumerate(encoded["offset_mapping"]) if s < last and e > first and e > s]
    return covering[0], covering[-1] + 1


def prompt_with_spans(sample: Sample, tokenizer) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """(prompt ids int [n], needle span, evidence span) of a sample: the needle is its first planted
    string, the evidence its first evidence clause (the needle when it has none)."""
    ids = sample.prompt_ids(tokenizer)[0]
    text = sample.prompt_text(tokenizer)
    special = not getattr(tokenizer, "chat_template", None)  # as Sample.prompt_ids encodes
    needle = token_span(tokenizer, text, sample.needles[0], special)
    evidence = token_span(tokenizer, text, (sample.evidence or sample.needles)[0], special)
    return ids, needle, evidence


def answer_steps(tokenizer, tokens: list[int], answer: str) -> list[int]:
    """Indices of the generated tokens that spell the first occurrence of ``answer`` (empty when
    the output lacks it)."""
    output = tokenizer.decode(tokens, skip_special_tokens=True)
    first = output.find(answer)
    if first < 0:
        return []
    last = first + len(answer)
    ends = [len(tokenizer.decode(tokens[: i + 1], skip_special_tokens=True)) for i in range(len(tokens))]
    starts = [0] + ends[:-1]
    return [i for i in range(len(tokens)) if starts[i] < last and ends[i] > first]


# ---------------------------------------------------------------- calibration


@dataclass
class _Tally:
    """Per-query-head score sums over the prompts that answered correctly and over all prompts."""

    correct_sum: torch.Tensor | None = None
    all_sum: torch.Tensor | None = None
    correct: int = 0
    total: int = 0

    def add(self, scores: torch.Tensor, ok: bool) -> None:
        self.all_sum = scores if self.all_sum is None else self.all_sum + scores
        self.total += 1
        if ok:
            self.correct_sum = scores if self.correct_sum is None else self.correct_sum + scores
            self.correct += 1

    def mean(self) -> torch.Tensor:
        """The mean over correct prompts, or over all prompts when none was correct."""
        if self.correct:
            return self.correct_sum / self.correct
        return self.all_sum / max(self.total, 1)


def _depth(index: int, count: int) -> float:
    """Needle depths spread evenly over the context, one per prompt."""
    return (index + 0.5) / count


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Calibration prompts start at this seed so they never repeat the quality benchmark's samples
# (seeds 0, 1, ...): the same planted needles would let HeadKV's scores fit the test set.
CALIBRATION_SEED = 1000


def calibrate(
    model,
    tokenizer,
    model_name: str,
    num_prompts: int = 16,
    context_tokens: int = 2000,
    seed: int = CALIBRATION_SEED,
    max_new_tokens: int = 32,
    log=_log,
) -> HeadScores:
    """HeadKV head scores of ``model`` from ``num_prompts`` needle prompts (retrieval) and as many
    retrieval-reasoning prompts, each ~``context_tokens`` tokens long, seeds ``seed ...``."""
    if num_prompts < 1:
        raise ValueError("num_prompts must be >= 1")
    config = model.config
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    stop_ids = {i for i in [tokenizer.eos_token_id] if i is not None}
    retrieval, reasoning = _Tally(), _Tally()
    lengths: list[int] = []
    started = time.perf_counter()
    for i in range(num_prompts):
        depth = _depth(i, num_prompts)
        for kind, sample in (
            ("retrieval", make_sample("niah_single", tokenizer, context_tokens, seed + i, depth)),
            ("retrieval_reasoning", make_reasoning_sample(tokenizer, context_tokens, seed + i, depth)),
        ):
            ids, needle, evidence = prompt_with_spans(sample, tokenizer)
            lengths.append(ids.shape[0])
            answer = sample.answers[0]

            def answered(tokens, answer=answer):
                return answer in tokenizer.decode(tokens, skip_special_tokens=True)

            trace = trace_prompt(model, ids, needle, evidence, max_new_tokens, stop_ids, done=answered)
            output = tokenizer.decode(trace.tokens, skip_special_tokens=True)
            ok = score(sample, output) == 1.0
            if kind == "retrieval":
                retrieval.add(trace.retrieval, ok)
            else:
                steps = answer_steps(tokenizer, trace.tokens, answer) or list(range(len(trace.tokens)))
                reasoning.add(trace.reasoning_steps[steps].sum(0) / len(steps), ok)
            log(
                f"[{i + 1}/{num_prompts}] {kind}: {ids.shape[0]} tokens, depth {depth:.2f}, "
                f"{'correct' if ok else 'wrong'} ({output.strip()[:60]!r}), {time.perf_counter() - started:.0f}s"
            )
    per_kv = {
        name: normalised(group_query_heads(tally.mean().double(), num_kv_heads))
        for name, tally in (("retrieval", retrieval), ("retrieval_reasoning", reasoning))
    }
    calibration = {
        "method": METHOD,
        "num_prompts": num_prompts,
        "context_tokens": context_tokens,
        "prompt_lengths": {"min": min(lengths), "max": max(lengths), "mean": round(sum(lengths) / len(lengths), 1)},
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "tasks": {"retrieval": "niah_single", "retrieval_reasoning": "retrieval_reasoning"},
        "correct": {"retrieval": retrieval.correct, "retrieval_reasoning": reasoning.correct},
        "aggregation": "mean over correct prompts per query head; sum over GQA group; normalised to sum 1",
        "seconds": round(time.perf_counter() - started, 1),
    }
    for name, tally in (("retrieval", retrieval), ("retrieval_reasoning", reasoning)):
        if not tally.correct:
            calibration.setdefault("fallback", {})[name] = "no prompt answered correctly; mean over all prompts"
            log(f"warning: no {name} prompt was answered correctly; averaging over all prompts")
    return HeadScores(
        model=model_name,
        retrieval=per_kv["retrieval"].tolist(),
        retrieval_reasoning=per_kv["retrieval_reasoning"].tolist(),
        calibration=calibration,
    )


# ---------------------------------------------------------------- models and CLI

TINY_RANDOM = "tiny-random"


def byte_tokenizer():
    """A byte-level tokenizer with no merges (256 ids + an EOS at 256) built offline, for the
    ``tiny-random`` model: every byte is one token, and offsets map back to the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")


def load_model(name: str):
    """(model, tokenizer, display name) for a MODEL argument (see the module docstring)."""
    from vllm_kvcompress.tools import models

    if name == "smollm2":
        model, tokenizer = models.load_smollm2()
        return model, tokenizer, "SmolLM2-135M-Instruct"
    if name == TINY_RANDOM:
        return models.tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=512), byte_tokenizer(), name
    path = Path(name)
    if not path.exists():
        raise SystemExit(f"calibrate: {name!r} is neither 'smollm2', '{TINY_RANDOM}' nor an existing path")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.is_file():
        if path.suffix != ".gguf":
            raise SystemExit(f"calibrate: {name!r} is a file but not a .gguf")
        kwargs = {"gguf_file": path.name}
        path = path.parent
    else:
        kwargs = {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    return model, tokenizer, name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_kvcompress.tools.calibrate",
        description="Compute HeadKV retrieval and retrieval-reasoning head scores on synthetic needle prompts.",
    )
    parser.add_argument("model", help=f"'smollm2', '{TINY_RANDOM}', a Hugging Face model folder or a .gguf file")
    parser.add_argument("--out", required=True, help="where to write the head-scores JSON")
    parser.add_argument("--num-prompts", type=int, default=16, help="prompts of each kind (default 16)")
    parser.add_argument("--context-tokens", type=int, default=2000, help="prompt length in tokens (default 2000)")
    parser.add_argument("--seed", type=int, default=CALIBRATION_SEED,
                        help=f"seed of the first prompt (default {CALIBRATION_SEED})")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="decode steps per prompt at most (default 32)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    model, tokenizer, name = load_model(args.model)
    _log(f"loaded {name} in {time.perf_counter() - started:.0f}s")
    scores = calibrate(
        model,
        tokenizer,
        name,
        num_prompts=args.num_prompts,
        context_tokens=args.context_tokens,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
    )
    scores.save(args.out)
    num_layers, num_kv_heads = scores.shape
    _log(f"wrote {args.out} ({num_layers} layers x {num_kv_heads} KV heads) in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
