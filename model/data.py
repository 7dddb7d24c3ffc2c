"""Training data for `sleepserve train --init-from`, through the checkpoint's own tokenizer: each piece
is token ids with a loss mask (mask[t]: token t is a target, predicted from the tokens before it).

- User JSONL files: `{"text": ...}` (every token a target, then an end-of-text token) or
  `{"messages": [...]}` (the checkpoint's chat template; only the assistant turns are targets). Their
  pieces are concatenated and cut into sequences of a fixed number of windows.
- The built-in tasks (model/tasks): each task window rendered into exactly one model window (left-padded
  with the filler token), so that the context the answer needs lies in windows that were consolidated
  and evicted before the query (question before context, answer after, as the paper lays them out).
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from model.tasks import Example, make_task
from model.tasks.base import FILLER, Task
from model.tokenizer import HFTokenizer, Tokenizer

Piece = tuple[list[int], list[bool]]  # token ids and loss mask, of equal length


@dataclass
class Batch:
    tokens: Tensor  # [B, T] token ids
    mask: Tensor  # [B, T] bool: which tokens are targets
    source: str  # "data" or a task's name


def end_of_text(tokenizer: Tokenizer) -> int:
    """The token that ends a plain-text document: the tokenizer's eos (the smallest of several)."""
    return min(tokenizer.eos_ids)


def render_text(tokenizer: Tokenizer, text: str) -> Piece:
    ids = [*tokenizer.encode(text), end_of_text(tokenizer)]
    return ids, [True] * len(ids)


def render_chat(tokenizer: Tokenizer, messages: list[dict]) -> Piece:
    """The conversation through the checkpoint's chat template; the tokens of each assistant turn (its
    content and the end-of-turn token after it) are the targets."""
    if not any(m.get("role") == "assistant" for m in messages):
        raise ValueError("a chat example needs at least one assistant message")
    if isinstance(tokenizer, HFTokenizer):
        return _render_chat_text(tokenizer, messages)
    return _render_chat_prefixes(tokenizer, messages)


def _render_chat_text(tokenizer: HFTokenizer, messages: list[dict]) -> Piece:
    """Each message's content found, in order, in the rendered text, and the tokens whose characters
    start inside an assistant's (and the eos text right after it) marked. Templates that render earlier
    turns differently from the last one (Qwen's, which drop the thinking of earlier turns) work too."""
    hf = tokenizer.tokenizer
    text = hf.apply_chat_template(messages, tokenize=False)
    encoded = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, cursor = [], 0
    for number, message in enumerate(messages):
        content = message["content"].strip()
        start = text.find(content, cursor)
        if start < 0:
            raise ValueError(f"message {number}'s content is not in the chat template's rendering")
        cursor = start + len(content)
        if message["role"] == "assistant":
            if hf.eos_token and text.startswith(hf.eos_token, cursor):
                cursor += len(hf.eos_token)
            spans.append((start, cursor))
    mask = [any(a <= first < b for a, b in spans) for first, _ in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), mask


def _render_chat_prefixes(tokenizer: Tokenizer, messages: list[dict]) -> Piece:
    """Each assistant turn as what the chat format adds between the conversation before it with a
    generation prompt and the conversation through it (a format that renders a conversation as the
    prefix of its continuation, as the native one does)."""
    ids = tokenizer.encode_chat(messages, add_generation_prompt=False)
    mask = [False] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = tokenizer.encode_chat(messages[:i], add_generation_prompt=True)
        through = tokenizer.encode_chat(messages[: i + 1], add_generation_prompt=False)
        if ids[: len(through)] != through or through[: len(before)] != before:
            raise ValueError(
                "the chat format does not render a conversation as the prefix of its continuation"
            )
        mask[len(before) : len(through)] = [True] * (len(through) - len(before))
    return ids, mask


def read_jsonl(path: str | Path, tokenizer: Tokenizer) -> list[Piece]:
    """Every line of a JSONL file, rendered: `{"text"}` or `{"messages"}`."""
    pieces = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if isinstance(record.get("text"), str):
            pieces.append(render_text(tokenizer, record["text"]))
        elif isinstance(record.get("messages"), list):
            pieces.append(render_chat(tokenizer, record["messages"]))
        else:
            raise ValueError(f"{path}:{number}: each line needs a string 'text' or a list 'messages'")
    return pieces


def pack(pieces: list[Piece], length: int) -> tuple[Tensor, Tensor]:
    """The pieces concatenated and cut into sequences of `length` tokens (the last partial one dropped):
    tokens and mask [S, length]."""
    ids = [i for piece_ids, _ in pieces for i in piece_ids]
    mask = [m for _, piece_mask in pieces for m in piece_mask]
    count = len(ids) // length
    if count == 0:
        raise ValueError(f"the data holds {len(ids)} tokens: fewer than one sequence of {length}")
    shape = (count, length)
    return torch.tensor(ids[: count * length]).view(shape), torch.tensor(mask[: count * length]).view(shape)


def render_example(tokenizer: Tokenizer, example: Example, task_window: int, window: int) -> Piece:
    """A task example with each of its context windows in one model window (left-padded with the filler
    token), then the query and the answer (the targets)."""
    filler = tokenizer.encode(FILLER)[0]
    ids: list[int] = []
    for start in range(0, len(example.context), task_window):
        chunk = tokenizer.encode(example.context[start : start + task_window])
        if len(chunk) > window:
            raise ValueError(f"a task window renders to {len(chunk)} tokens, more than the window {window}")
        ids += [filler] * (window - len(chunk)) + chunk
    query, answer = tokenizer.encode(example.query), tokenizer.encode(example.answer)
    return ids + query + answer, [False] * (len(ids) + len(query)) + [True] * len(answer)


def stack_right_padded(pieces: list[Piece], pad: int) -> tuple[Tensor, Tensor]:
    """Pieces of different lengths as [B, T] tokens and mask, padded at the end (never targets)."""
    length = max(len(ids) for ids, _ in pieces)
    tokens = torch.tensor([ids + [pad] * (length - len(ids)) for ids, _ in pieces])
    mask = torch.tensor([m + [False] * (length - len(m)) for _, m in pieces])
    return tokens, mask


class DataMix:
    """Batches from the user's JSONL files and the built-in tasks, one source per step in turn. Batch
    `step` depends on the seed and the step alone, so a resumed run sees the data a straight one does."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        window: int,
        files: list[str],
        tasks: dict[str, dict],
        sequence_windows: int,
        seed: int,
    ) -> None:
        self.tokenizer, self.window, self.seed = tokenizer, window, seed
        self.sources: list[str] = []
        if files:
            pieces = [piece for path in files for piece in read_jsonl(path, tokenizer)]
            self.tokens, self.mask = pack(pieces, sequence_windows * window)
            self.sources.append("data")
        # Each task laid out in windows of as many characters as the model's window has tokens.
        self.tasks: dict[str, Task] = {
            name: make_task(name, **{"window": window, **knobs}) for name, knobs in tasks.items()
        }
        self.sources += list(self.tasks)
        if not self.sources:
            raise ValueError("no training data: give JSONL files, tasks, or both")

    def batch(self, step: int, size: int) -> Batch:
        source = self.sources[step % len(self.sources)]
        rng = random.Random(self.seed * 1_000_003 + step)
        if source == "data":
            rows = torch.tensor(self._order(step * size, size))
            return Batch(self.tokens[rows], self.mask[rows], source)
        task = self.tasks[source]
        pieces = [
            render_example(self.tokenizer, task.example(rng), task.window, self.window) for _ in range(size)
        ]
        return Batch(*stack_right_padded(pieces, self.tokenizer.encode(FILLER)[0]), source)

    def _order(self, first: int, count: int) -> list[int]:
        """Sequences `first`… of the endless stream of epochs, each a fresh permutation."""
        total = len(self.tokens)
        return [self._epoch(index // total)[index % total] for index in range(first, first + count)]

    @functools.lru_cache(maxsize=2)  # noqa: B019 (one DataMix per run)
    def _epoch(self, epoch: int) -> list[int]:
        order = list(range(len(self.tokens)))
        random.Random(self.seed * 7919 + epoch).shuffle(order)
        return order
