"""Per-task evaluation: accuracy / macro-F1 for classification (encoder heads, or a causal or seq2seq LM
scoring the label names), log-likelihood over the choices for multiple choice, exact match of the
generated text for free-text tasks. A causal LM scores an option as the continuation of its prompt, a
seq2seq LM as the decoder's target for the prompt given to its encoder; the rest is shared. Returns
per-task scores and their average. Scored options also report ``accuracy_norm`` (the log-likelihood
per character, lm-evaluation-harness's acc_norm); the score stays the plain sum."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from .data.collate import IGNORE_INDEX, CausalLMCollator, EncoderClassificationCollator, Seq2SeqCollator
from .label_logits import accepts_logits_to_keep, accepts_prompt_cache, label_positions
from .routing_report import RoutingAccumulator


def accuracy(gold: list[int], pred: list[int]) -> float:
    return sum(int(g == p) for g, p in zip(gold, pred)) / max(len(gold), 1)


def macro_f1(gold: list[int], pred: list[int]) -> float:
    """Mean F1 over the classes that occur in gold or predictions (scikit-learn's macro average)."""
    classes = sorted(set(gold) | set(pred))
    scores = []
    for c in classes:
        tp = sum(1 for g, p in zip(gold, pred) if g == c and p == c)
        fp = sum(1 for g, p in zip(gold, pred) if g != c and p == c)
        fn = sum(1 for g, p in zip(gold, pred) if g == c and p != c)
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / max(len(scores), 1)


def normalise_answer(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .")


def exact_match(references: list[list[str]], predictions: list[str]) -> float:
    hits = [normalise_answer(p) in {normalise_answer(r) for r in refs} for refs, p in zip(references, predictions)]
    return sum(hits) / max(len(hits), 1)


def scored_rows(task, split: str, limit: int | None) -> list[dict]:
    """The rows of ``split`` that an evaluation with ``limit`` (``data.max_eval_examples``) scores."""
    return task.splits[split][:limit] if limit else task.splits[split]


def _examples(task, split: str, limit: int | None, task_id: int) -> list[dict]:
    return [{**r, "task_id": task_id} for r in scored_rows(task, split, limit)]


def _batches(rows: list, size: int):
    for i in range(0, len(rows), size):
        yield rows[i:i + size]


@torch.no_grad()
def evaluate_encoder(model, tokenizer, tasks, *, split="test", batch_size=64, max_length=128, limit=None,
                     routing: RoutingAccumulator | None = None, only=None) -> dict:
    """``only``: the names of the tasks to score (default all); each keeps its id, its position in ``tasks``."""
    collate = EncoderClassificationCollator(tokenizer, max_length)
    model.eval()
    results = {}
    for task_id, task in _scored(tasks, only):
        gold, pred = [], []
        for rows in _batches(_examples(task, split, limit, task_id), batch_size):
            batch = collate(rows)
            labels = batch.pop("labels")
            out = model(**batch)
            if routing is not None:
                routing.add(model)
            pred += out.logits.argmax(-1).tolist()
            gold += labels.tolist()
        results[task.name] = score_predictions(task, gold, pred)
    return _with_average(results)


def _scored(tasks, only) -> list:
    """(task id, task) for the tasks to score: the id is the task's position in the run's task list, so
    that scoring a subset routes each task exactly as scoring all of them does."""
    if only is not None:
        unknown = set(only) - {t.name for t in tasks}
        if unknown:
            raise ValueError(f"no task {sorted(unknown)} to score; the tasks are {[t.name for t in tasks]}.")
    return [(i, t) for i, t in enumerate(tasks) if only is None or t.name in only]


def score_predictions(task, gold, pred) -> dict:
    metric = task.spec.metric
    value = macro_f1(gold, pred) if metric == "macro_f1" else accuracy(gold, pred)
    return {"metric": metric, "score": value, "accuracy": accuracy(gold, pred), "n": len(gold)}


def _with_average(results: dict) -> dict:
    scores = [r["score"] for r in results.values()]
    return {"tasks": results, "average": sum(scores) / max(len(scores), 1)}


def shared_prompt_length(batch: dict, labels: torch.Tensor) -> int | None:
    """P when every option row starts with the same P unpadded prompt tokens and the labels start at P;
    None otherwise (a long text shortened differently for different options)."""
    labelled = (labels != IGNORE_INDEX).any(0).nonzero()
    if labelled.numel() == 0 or int(labelled[0]) == 0:
        return None
    p = int(labelled[0])
    ids, mask = batch["input_ids"][:, :p], batch["attention_mask"][:, :p]
    if not bool(mask.all()) or not bool((ids == ids[:1]).all()) or not bool((labels[:, p] != IGNORE_INDEX).all()):
        return None
    return p


def _option_logits_after_shared_prompt(model, batch: dict, p: int, routing) -> torch.Tensor:
    """The prompt runs once (its cache copied to every option row), then the options' tokens:
    logits (options, A, vocab) where position j predicts option token j (A = padded option length)."""
    n = batch["input_ids"].shape[0]
    task_ids = batch["task_ids"]
    first = model(input_ids=batch["input_ids"][:1, :p], attention_mask=batch["attention_mask"][:1, :p],
                  task_ids=task_ids[:1], use_cache=True, logits_to_keep=1)
    if routing is not None:
        routing.add(model)
    cache = first.cache
    cache.batch_repeat_interleave(n)  # (1, ...) -> (options, ...)
    rest = model(input_ids=batch["input_ids"][:, p:], attention_mask=batch["attention_mask"], task_ids=task_ids,
                 cache=cache, use_cache=True)
    if routing is not None:
        routing.add(model)
    # the prompt's last position predicts option token 0; option position j predicts token j + 1
    return torch.cat([first.logits.expand(n, -1, -1), rest.logits[:, :-1]], dim=1).float()


@torch.no_grad()
def choice_log_likelihoods(model, collate: CausalLMCollator, example: dict,
                           routing: RoutingAccumulator | None = None) -> torch.Tensor:
    """Sum of the log-probabilities of each option's answer tokens given the prompt: (n_options,).

    The prompt, shared by the options, runs once and its key/value cache serves every option (the
    options' rows differ after it only); logits are computed where they predict an answer token. A
    model without ``cache`` / ``logits_to_keep`` in its forward, or options whose prompts differ, take
    the plain path: every row whole. Router statistics go to ``routing`` for each forward."""
    batch = collate.choice_batch(example)
    labels = batch.pop("labels")
    p = shared_prompt_length(batch, labels) if accepts_prompt_cache(model) else None
    if p is not None:
        logits = _option_logits_after_shared_prompt(model, batch, p, routing)  # (options, A, vocab)
        target = labels[:, p:]  # (options, A)
    elif accepts_logits_to_keep(model):
        positions = label_positions(labels)  # (P,)
        logits = model(**batch, logits_to_keep=positions).logits.float()  # (options, P, vocab)
        target = labels[:, positions + 1]  # the next-token targets of those positions, (options, P)
    else:
        logits = model(**batch).logits.float()[:, :-1]  # (options, seq-1, vocab)
        target = labels[:, 1:]  # next-token targets, (options, seq-1)
    if p is None and routing is not None:
        routing.add(model)
    return target_log_likelihoods(logits, target)


def target_log_likelihoods(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σ_j log p(target[:, j]) over the labelled positions (target != -100) of each row: (rows,).

    ``logits`` (rows, positions, vocab) where position j predicts ``target[:, j]`` (rows, positions)."""
    logprobs = F.log_softmax(logits, dim=-1)
    mask = target != IGNORE_INDEX
    picked = logprobs.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (rows, positions)
    return (picked * mask).sum(-1)


@torch.no_grad()
def seq2seq_choice_log_likelihoods(model, collate: Seq2SeqCollator, example: dict,
                                   routing: RoutingAccumulator | None = None) -> torch.Tensor:
    """Sum of the log-probabilities of each option as the decoder's target for the example's prompt:
    (n_options,). One forward, one row per option; the decoder's logit j predicts option token j
    (the model builds its decoder inputs from the labels)."""
    batch = collate.choice_batch(example)
    logits = model(**batch).logits.float()  # (options, A, vocab), A = longest option
    if routing is not None:
        routing.add(model)
    return target_log_likelihoods(logits, batch["labels"])


def _generated_causal(model, tokenizer, collate: CausalLMCollator, rows, max_new_tokens) -> list[str]:
    batch = collate.generation_batch(rows)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=collate.pad_id)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)  # the new tokens


def _generated_seq2seq(model, tokenizer, collate: Seq2SeqCollator, rows, max_new_tokens) -> list[str]:
    batch = collate.generation_batch(rows)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=collate.pad_id)
    return tokenizer.batch_decode(out, skip_special_tokens=True)  # the decoder's output is the answer alone


def _evaluate_prompted(model, tokenizer, tasks, collate, choice_scores, generated, *, split, batch_size, limit,
                       max_new_tokens, routing, only=None) -> dict:
    """The per-task loop of the LM kinds: exact match of generated text for free-text tasks, else the
    option with the highest log-likelihood (``choice_scores(model, collate, row, routing)``)."""
    model.eval()
    results = {}
    for task_id, task in _scored(tasks, only):
        rows = _examples(task, split, limit, task_id)
        if task.kind == "generation":
            refs, preds = [], []
            for chunk in _batches(rows, batch_size):
                preds += generated(model, tokenizer, collate, chunk, max_new_tokens)
                refs += [r.get("references") or [r["target"]] for r in chunk]
            score = exact_match(refs, preds)
            results[task.name] = {"metric": "exact_match", "score": score, "n": len(rows)}
        else:
            gold, pred, pred_norm = [], [], []
            for row in rows:
                scores = choice_scores(model, collate, row, routing)
                pred.append(int(scores.argmax()))
                # lm-evaluation-harness's acc_norm: the log-likelihood per character of the option, so that
                # a long option is not penalised for its length alone
                chars = torch.tensor([max(len(c), 1) for c in collate.choice_texts(row)], dtype=scores.dtype)
                pred_norm.append(int((scores / chars).argmax()))
                gold.append(int(row["label"]))
            results[task.name] = {**score_predictions(task, gold, pred), "accuracy_norm": accuracy(gold, pred_norm)}
    return _with_average(results)


@torch.no_grad()
def evaluate_causal(model, tokenizer, tasks, *, split="test", batch_size=16, max_length=256, limit=None,
                    max_new_tokens=16, routing: RoutingAccumulator | None = None, only=None) -> dict:
    collate = CausalLMCollator(tokenizer, max_length, tasks=tasks)
    return _evaluate_prompted(model, tokenizer, tasks, collate, choice_log_likelihoods, _generated_causal,
                              split=split, batch_size=batch_size, limit=limit, max_new_tokens=max_new_tokens,
                              routing=routing, only=only)


@torch.no_grad()
def evaluate_seq2seq(model, tokenizer, tasks, *, split="test", batch_size=16, max_length=256, limit=None,
                     max_new_tokens=16, routing: RoutingAccumulator | None = None, only=None) -> dict:
    """evaluate_causal for encoder-decoder LMs (T5, BART): the prompt to the encoder, options scored as
    the decoder's target, free text generated by the decoder."""
    collate = Seq2SeqCollator(tokenizer, max_length, tasks=tasks)
    return _evaluate_prompted(model, tokenizer, tasks, collate, seq2seq_choice_log_likelihoods, _generated_seq2seq,
                              split=split, batch_size=batch_size, limit=limit, max_new_tokens=max_new_tokens,
                              routing=routing, only=only)
