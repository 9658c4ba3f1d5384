"""Turn normalised examples (see :mod:`mtpeft.app.data.tasks`) into model batches.

Three model families, three collators:

* :class:`EncoderClassificationCollator` for encoders with a classification head (BERT, MiniLM):
  the text alone, the class id as label.
* :class:`CausalLMCollator` for chat / instruct decoders (SmolLM2, Llama): the example becomes a chat
  turn through the tokenizer's own ``chat_template`` and the loss is taken on the answer only, so the
  model learns to answer rather than to reproduce prompts. The same encoding gives the prompt for
  generation and the prompt + choice rows for log-likelihood scoring of multiple choice, so training
  and evaluation see exactly the same text.
* :class:`Seq2SeqCollator` for encoder-decoder LMs (T5, BART): the same prompt (instruction, text,
  lettered options) goes to the encoder, the answer is the decoder's target (``labels``; the model
  builds its decoder inputs from them).

:class:`TaskPrompts` holds what the last two share: the prompt and the answer of an example.

All add ``task_ids`` (LongTensor (batch,)) for the multi-task adapters' routing.
"""

from __future__ import annotations

import os
import string
from typing import Any, Mapping, Sequence

import torch

__all__ = ["EncoderClassificationCollator", "CausalLMCollator", "Seq2SeqCollator", "TaskPrompts", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # label value that torch's cross entropy skips


def _task_ids(examples: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """(batch,) task index of every example; an example without ``task_id`` belongs to task 0."""
    return torch.tensor([int(ex.get("task_id", 0)) for ex in examples], dtype=torch.long)


def _need(ex: Mapping[str, Any], key: str, who: str) -> Any:
    if key not in ex:
        raise KeyError(f"{who}: an example has no {key!r} field (fields: {', '.join(sorted(ex))}).")
    return ex[key]


class EncoderClassificationCollator:
    """Examples ``{"text", "label", "task_id"}`` → ``input_ids`` / ``attention_mask`` (batch, seq),
    ``labels`` and ``task_ids`` (batch,). Padding goes to the longest text of the batch, at most ``max_length``."""

    def __init__(self, tokenizer: Any, max_length: int = 128):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("EncoderClassificationCollator got an empty batch.")
        who = type(self).__name__
        if any("choices" in ex for ex in examples):
            raise ValueError(f"{who} handles classification examples only; multiple-choice tasks need a causal LM "
                             "(CausalLMCollator).")
        texts = [_need(ex, "text", who) for ex in examples]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {
            "input_ids": enc["input_ids"],  # (batch, seq)
            "attention_mask": enc["attention_mask"],  # (batch, seq)
            "labels": torch.tensor([int(_need(ex, "label", who)) for ex in examples], dtype=torch.long),  # (batch,)
            "task_ids": _task_ids(examples),  # (batch,)
        }


class TaskPrompts:
    """What a generative model is asked and what it should answer, for one example.

    The prompt is the task instruction, the example text and, when the example has choices (or is a
    classification example of a task with label names), the options lettered ``A.``, ``B.``, ...; the
    answer is the target (generation), else the right choice (its text, or its letter with
    ``answer_style="letter"``).

    ``tasks`` gives, per ``task_id``, an object or mapping with ``instruction`` and ``labels`` (a
    :class:`~mtpeft.app.data.tasks.TaskData` or ``TaskSpec`` works); an example's own ``instruction`` or
    ``choices`` fields win over the task's.
    """

    def __init__(self, tokenizer: Any, max_length: int, tasks: Sequence[Any] | None = None,
                 answer_style: str = "text"):
        if answer_style not in ("text", "letter"):
            raise ValueError(f"answer_style must be 'text' or 'letter', got {answer_style!r}.")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.tasks = list(tasks) if tasks is not None else []
        self.answer_style = answer_style

    # -- what the model is asked -------------------------------------------------------------------
    def _task_field(self, ex: Mapping[str, Any], name: str) -> Any:
        if name in ex and ex[name] is not None:
            return ex[name]
        tid = int(ex.get("task_id", 0))
        if tid < len(self.tasks):
            task = self.tasks[tid]
            return task.get(name) if isinstance(task, Mapping) else getattr(task, name, None)
        return None

    def choices(self, ex: Mapping[str, Any]) -> list[str] | None:
        """The options shown for this example: its ``choices``, or its task's label names (classification)."""
        if "target" in ex:
            return None
        if "choices" in ex:
            return list(ex["choices"])
        return None if (labels := self._task_field(ex, "labels")) is None else list(labels)

    def user_message(self, ex: Mapping[str, Any], text: str | None = None) -> str:
        """Instruction, text and lettered options, separated by blank lines."""
        text = text if text is not None else _need(ex, "text", type(self).__name__)
        parts = [self._task_field(ex, "instruction"), text]
        options = self.choices(ex)
        if options:
            if len(options) > 26:
                raise ValueError(f"{type(self).__name__} letters options A-Z; this example has {len(options)}.")
            parts.append("Options:\n" + "\n".join(f"{string.ascii_uppercase[i]}. {c}" for i, c in enumerate(options)))
        return "\n\n".join(p.strip() for p in parts if p)

    def choice_texts(self, ex: Mapping[str, Any]) -> list[str]:
        """The answer string of each option (what log-likelihood scoring compares)."""
        options = self.choices(ex)
        if not options:
            raise ValueError("choice_texts: this example has no choices (a generation example?).")
        if self.answer_style == "letter":
            return list(string.ascii_uppercase[: len(options)])
        return options

    def answer(self, ex: Mapping[str, Any]) -> str:
        """What the model should reply (the assistant turn of a chat model, the decoder target of a seq2seq one)."""
        if "target" in ex:
            return str(ex["target"])
        label = int(_need(ex, "label", type(self).__name__))
        texts = self.choice_texts(ex)
        if not 0 <= label < len(texts):
            raise ValueError(f"{type(self).__name__}: label {label} is out of range for {len(texts)} options {texts}.")
        return texts[label]

    # -- tokenising ----------------------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _shorten(self, ex: Mapping[str, Any], length_of) -> str:
        """The example's text, cut at the end until ``length_of(text) <= max_length`` (3 tries)."""
        text = _need(ex, "text", type(self).__name__)
        for _ in range(3):
            over = length_of(text) - self.max_length
            if over <= 0:
                break
            text_ids = self._ids(text)
            text = self.tokenizer.decode(text_ids[: max(0, len(text_ids) - over - 2)])
        return text


class CausalLMCollator(TaskPrompts):
    """Chat-formatted batches for decoder LMs, loss on the answer (and end-of-turn) tokens only.

    The user message is the prompt of :class:`TaskPrompts` (instruction, text, lettered options), the
    assistant message its answer; both are rendered by the tokenizer's ``chat_template``.

    Batches: ``input_ids`` / ``attention_mask`` / ``labels`` (batch, seq), right-padded, ``labels`` is
    ``-100`` except on the answer tokens and the end-of-turn token; ``task_ids`` (batch,).
    Too-long examples lose the end of their text, never the answer.
    """

    def __init__(self, tokenizer: Any, max_length: int = 512, tasks: Sequence[Any] | None = None,
                 answer_style: str = "text", system: str | None = None):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("CausalLMCollator needs a tokenizer with a chat_template (an instruct/chat model's "
                             "tokenizer), or set tokenizer.chat_template to a Jinja template first.")
        super().__init__(tokenizer, max_length, tasks, answer_style)
        self.system = system
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("CausalLMCollator: the tokenizer has neither a pad nor an eos token to pad with.")
        self._special = set(tokenizer.all_special_ids)

    def _render(self, user: str, answer: str | None) -> str:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [{"role": "user", "content": user}]
        if answer is None:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        messages.append({"role": "assistant", "content": answer})
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def prompt_text(self, ex: Mapping[str, Any]) -> str:
        """The chat prompt up to where the assistant starts answering (for ``generate``)."""
        return self._render(self.user_message(ex), None)

    def choice_pairs(self, ex: Mapping[str, Any]) -> list[tuple[str, str]]:
        """``(prompt, answer)`` for every option, for log-likelihood scoring."""
        prompt = self.prompt_text(ex)
        return [(prompt, c) for c in self.choice_texts(ex)]

    # -- tokenising ----------------------------------------------------------------------------------
    def _encode_once(self, user: str, answer: str, include_eos: bool) -> tuple[list[int], list[int]]:
        if not answer:
            raise ValueError("CausalLMCollator: an empty answer cannot be trained on or scored.")
        prompt, full = self._render(user, None), self._render(user, answer)
        # Look for the answer after the part shared with the bare prompt: the options may contain it too.
        start = full.find(answer, len(os.path.commonprefix([prompt, full])))
        if start < 0:
            raise ValueError(f"CausalLMCollator: the chat template did not render the answer {answer!r} after the prompt.")
        end = start + len(answer)
        prompt_ids, answer_ids, tail = self._ids(full[:start]), self._ids(full[start:end]), self._ids(full[end:])
        # Keep the template's end-of-turn (the first special token after the answer), drop what follows it
        # (a newline); a template without one gets the eos token.
        eot = next((i for i, t in enumerate(tail) if t in self._special), None)
        if eot is not None:
            tail = tail[: eot + 1]
        else:
            tail = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        tail_labels = [IGNORE_INDEX] * len(tail)
        if tail and include_eos:
            tail_labels[-1] = tail[-1]
        labels = [IGNORE_INDEX] * len(prompt_ids) + list(answer_ids) + tail_labels
        return prompt_ids + answer_ids + tail, labels

    def encode(self, ex: Mapping[str, Any], answer: str | None = None, include_eos: bool = True) -> dict[str, list[int]]:
        """One example as ``input_ids`` and ``labels`` lists (no padding). ``answer`` replaces the right one.
        Too long for ``max_length``: the text is shortened, the instruction, options and answer are kept."""
        answer = self.answer(ex) if answer is None else answer
        cache: dict[str, tuple[list[int], list[int]]] = {}

        def encoded(text: str) -> tuple[list[int], list[int]]:
            if text not in cache:
                cache[text] = self._encode_once(self.user_message(ex, text), answer, include_eos)
            return cache[text]

        ids, labels = encoded(self._shorten(ex, lambda t: len(encoded(t)[0])))
        return {"input_ids": ids[: self.max_length], "labels": labels[: self.max_length]}

    def prompt_ids(self, ex: Mapping[str, Any]) -> list[int]:
        """Token ids of :meth:`prompt_text`, the text shortened to fit ``max_length``."""
        ids_of = lambda t: self._ids(self._render(self.user_message(ex, t), None))  # noqa: E731
        return ids_of(self._shorten(ex, lambda t: len(ids_of(t))))[-self.max_length:]

    def _pad(self, rows: Sequence[dict[str, list[int]]], left: bool = False) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (batch, seq)
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # (batch, seq)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (batch, seq)
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            cols = slice(width - n, width) if left else slice(0, n)
            ids[b, cols] = torch.tensor(r["input_ids"], dtype=torch.long)
            mask[b, cols] = 1
            if "labels" in r:
                labels[b, cols] = torch.tensor(r["labels"], dtype=torch.long)
        out = {"input_ids": ids, "attention_mask": mask}
        if any("labels" in r for r in rows):
            out["labels"] = labels
        return out

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Training batch: right-padded ``input_ids``, ``attention_mask``, ``labels``, and ``task_ids``."""
        if not examples:
            raise ValueError("CausalLMCollator got an empty batch.")
        batch = self._pad([self.encode(ex) for ex in examples])
        batch["task_ids"] = _task_ids(examples)
        return batch

    def generation_batch(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Prompts only, LEFT-padded (as ``generate`` needs for a batch), with ``task_ids``."""
        rows = [{"input_ids": self.prompt_ids(ex)} for ex in examples]
        batch = self._pad(rows, left=True)
        batch["task_ids"] = _task_ids(examples)
        return batch

    def choice_batch(self, ex: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """One row per option (batch = number of options): prompt + option, ``labels`` on the option
        tokens only (no end-of-turn), so the sum of their log-probs scores the option."""
        rows = [self.encode(ex, answer=c, include_eos=False) for c in self.choice_texts(ex)]
        batch = self._pad(rows)
        batch["task_ids"] = _task_ids([ex] * len(rows))
        return batch


def _right_padded(rows: Sequence[list[int]], value: int) -> torch.Tensor:
    """Token-id lists as one (batch, longest) LongTensor, right-padded with ``value``."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)  # (batch, seq)
    for b, r in enumerate(rows):
        out[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class Seq2SeqCollator(TaskPrompts):
    """Batches for encoder-decoder LMs (T5, BART): the prompt of :class:`TaskPrompts` (instruction,
    text, lettered options) to the encoder, the answer as the decoder's target.

    Batches: ``input_ids`` / ``attention_mask`` (batch, source) for the encoder, with the tokenizer's
    own special tokens (T5's ``</s>``); ``labels`` (batch, target): the answer's tokens and the eos
    token, right-padded with ``-100``. No ``decoder_input_ids``: the model builds them from the labels
    (shifted right behind its decoder start token, as in its pre-training), and the mtpeft wrapper
    takes the decoder's padding mask from them (``labels != -100``). ``task_ids`` (batch,).
    Too-long examples lose the end of their text, never the instruction, options or answer.
    """

    def __init__(self, tokenizer: Any, max_length: int = 512, tasks: Sequence[Any] | None = None,
                 answer_style: str = "text"):
        super().__init__(tokenizer, max_length, tasks, answer_style)
        if tokenizer.eos_token_id is None:
            raise ValueError("Seq2SeqCollator: the tokenizer has no eos token; a target without one never "
                             "teaches the decoder to stop.")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def source_ids(self, ex: Mapping[str, Any]) -> list[int]:
        """The encoder's tokens: the prompt with the tokenizer's special tokens, the text shortened to fit."""
        ids_of = lambda t: self.tokenizer(self.user_message(ex, t))["input_ids"]  # noqa: E731
        return ids_of(self._shorten(ex, lambda t: len(ids_of(t))))[: self.max_length]

    def target_ids(self, answer: str, include_eos: bool = True) -> list[int]:
        """The decoder's target tokens for ``answer``, ending with eos (training) or not (option scoring)."""
        if not answer:
            raise ValueError("Seq2SeqCollator: an empty answer cannot be trained on or scored.")
        ids = self._ids(answer)[: self.max_length - int(include_eos)]
        if not ids:
            raise ValueError(f"Seq2SeqCollator: the answer {answer!r} has no tokens in this tokenizer.")
        return ids + [self.tokenizer.eos_token_id] if include_eos else ids

    def _batch(self, sources: Sequence[list[int]], targets: Sequence[list[int]] | None,
               examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        ids = _right_padded(sources, self.pad_id)  # (batch, source)
        mask = _right_padded([[1] * len(s) for s in sources], 0)  # (batch, source)
        batch = {"input_ids": ids, "attention_mask": mask}
        if targets is not None:
            batch["labels"] = _right_padded(targets, IGNORE_INDEX)  # (batch, target)
        batch["task_ids"] = _task_ids(examples)  # (batch,)
        return batch

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Training batch: the prompts to the encoder, the answers (with eos) as ``labels``."""
        if not examples:
            raise ValueError("Seq2SeqCollator got an empty batch.")
        return self._batch([self.source_ids(ex) for ex in examples],
                           [self.target_ids(self.answer(ex)) for ex in examples], examples)

    def generation_batch(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """The prompts only (``generate`` starts the decoder itself), with ``task_ids``."""
        return self._batch([self.source_ids(ex) for ex in examples], None, examples)

    def choice_batch(self, ex: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """One row per option (batch = number of options): the same prompt, each option's tokens as
        ``labels`` (no eos, as a causal LM's options carry no end-of-turn), so the sum of their
        log-probabilities scores the option."""
        options = self.choice_texts(ex)
        source = self.source_ids(ex)
        return self._batch([source] * len(options), [self.target_ids(c, include_eos=False) for c in options],
                           [ex] * len(options))
