"""Logits only at the labelled positions (mtpeft.app.label_logits): the loss, its gradients and the choice
scores equal the full-logits computation, while the vocabulary projection sees only those positions."""

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

import method_cases
import mtpeft
from mtpeft.app.data import IGNORE_INDEX, CausalLMCollator
from mtpeft.app.evaluate import choice_log_likelihoods, shared_prompt_length
from mtpeft.app.routing_report import RoutingAccumulator
from mtpeft.app.label_logits import accepts_logits_to_keep, keep_label_logits, label_positions
from mtpeft.app.trainer import MultiTaskTrainer
from tiny_models import VOCAB, tiny_bert, tiny_gpt2, tiny_llama

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
CHOSEN = {"lora": lambda: mtpeft.LoraConfig(r=4, lora_dropout=0.0),
          "moelora": lambda: mtpeft.MoELoraConfig(lora_dropout=0.0),
          "mtl_lora": lambda: mtpeft.MTLLoraConfig(n_tasks=3, lora_dropout=0.0)}


def _registry_config(method: str):
    """A registered method's test config with its dropout off (the two passes compared must match)."""
    spec = method_cases.spec(method)
    fields = {f.name for f in dataclasses.fields(spec.config_class)}
    off = {k: 0.0 for k in ("lora_dropout", "dropconnect") if k in fields}
    return lambda: spec.small_config(n_tasks=3, **off)


# Every registered method (tests/method_cases.py); these three with the configs chosen above.
CONFIGS = {m: CHOSEN.get(m) or _registry_config(m) for m in method_cases.methods()}


def answer_batch(seed=0, batch=4, seq=20):
    """Right-padded prompts with the labels on a short answer whose place differs per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for b, (start, length, end) in enumerate([(6, 3, 12), (15, 2, 20), (3, 1, 8), (10, 4, 16)][:batch]):
        labels[b, start:start + length] = ids[b, start:start + length]
        mask[b, end:] = 0
        ids[b, end:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "task_ids": torch.arange(batch) % 3}


def loss_and_grads(model, batch):
    model.zero_grad()
    torch.manual_seed(0)  # the same contrastive sample in both passes (MoELoRA)
    loss = model(**batch, num_items_in_batch=int((batch["labels"] != IGNORE_INDEX).sum())).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_loss_and_gradients_equal_the_full_logits(arch, method, one_thread):
    model = mtpeft.get_model(BUILDERS[arch](), CONFIGS[method]())
    model.train()
    batch = answer_batch()
    kept = keep_label_logits(batch)
    # Positions 5-7, 14-15, 2, 9-12 predict the answers: 10 of 20 positions, in one sorted list.
    assert kept["logits_to_keep"].tolist() == [2, 5, 6, 7, 9, 10, 11, 12, 14, 15]
    assert torch.equal(kept["shift_labels"], batch["labels"][:, kept["logits_to_keep"] + 1])

    seen = []
    head = model.base_model.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    full_loss, full_grads = loss_and_grads(model, batch)
    kept_loss, kept_grads = loss_and_grads(model, kept)
    hook.remove()

    assert seen[0][1] == 20 and seen[1][1] == 10  # the vocabulary projection ran on half the positions
    torch.testing.assert_close(kept_loss, full_loss, rtol=1e-6, atol=1e-6)
    assert full_grads.keys() == kept_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_batches_without_labels_pass_unchanged():
    batch = answer_batch()
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    assert keep_label_logits(no_labels) is no_labels
    unlabelled = {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}
    assert keep_label_logits(unlabelled) is unlabelled  # no position to keep: the model's own loss
    assert label_positions(unlabelled["labels"]).numel() == 0


def test_which_models_slice_their_logits():
    assert accepts_logits_to_keep(tiny_llama()) and accepts_logits_to_keep(tiny_gpt2())
    assert accepts_logits_to_keep(mtpeft.get_model(tiny_llama(), mtpeft.LoraConfig()))
    assert not accepts_logits_to_keep(tiny_bert(classifier=True))


def test_trainer_keeps_label_logits_for_causal_lms_only(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    causal = MultiTaskTrainer(model=mtpeft.get_model(tiny_llama(), mtpeft.LoraConfig()), args=args)
    encoder = MultiTaskTrainer(model=mtpeft.get_model(tiny_bert(classifier=True), mtpeft.LoraConfig(
        target_modules=["query", "value"])), args=args)
    assert causal._label_logits_only and not encoder._label_logits_only
    batch = answer_batch()
    causal.model.eval()
    with torch.no_grad():
        full = causal.model(**batch).loss
        loss, outputs = causal.compute_loss(causal.model, dict(batch), return_outputs=True)
    assert outputs.logits.shape[1] == 10  # the trainer asked for the labelled positions only
    torch.testing.assert_close(loss, full, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_choice_scores_equal_the_full_log_softmax(method, smollm2_tokenizer, one_thread):
    """A real chat prompt from SmolLM2's tokenizer, scored by a small random Llama over its vocabulary:
    the prompt once with its cache shared by the options equals every option row run whole."""
    tok = smollm2_tokenizer
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    model = mtpeft.get_model(base, CONFIGS[method]()).eval()
    for p in model.parameters():  # B = 0 at init: give the adapters an effect
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.2)
    collate = CausalLMCollator(tok, max_length=128)
    example = {"text": "Which city is the capital of France?", "choices": ["London", "Paris", "Rome of the Caesars"],
               "label": 1, "task_id": 2}
    routing = RoutingAccumulator()
    calls = []
    hook = model.base_model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape),
                                                      with_kwargs=True)
    scores = choice_log_likelihoods(model, collate, example, routing)
    hook.remove()
    batch = collate.choice_batch(example)
    prompt = shared_prompt_length(batch, batch["labels"])
    assert prompt is not None and calls == [(1, prompt), (3, batch["input_ids"].shape[1] - prompt)]
    if method_cases.spec(method).routing == "token":
        # each real token routed once: the prompt once, then each option's own tokens
        stats = next(iter(routing.stats.values()))
        assert int(stats["tokens"]) == prompt + int(batch["attention_mask"][:, prompt:].sum())

    batch = collate.choice_batch(example)
    labels = batch.pop("labels")
    with torch.no_grad():
        logprobs = torch.log_softmax(model(**batch).logits.float()[:, :-1], dim=-1)  # (options, seq-1, vocab)
    target = labels[:, 1:]
    expected = torch.stack([logprobs[o, target[o] != IGNORE_INDEX].gather(
        -1, target[o][target[o] != IGNORE_INDEX].unsqueeze(-1)).sum() for o in range(len(labels))])
    assert scores.shape == (3,) and len(set(scores.tolist())) == 3
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_options_with_different_prompts_are_scored_whole(smollm2_tokenizer):
    batch = CausalLMCollator(smollm2_tokenizer, max_length=128).choice_batch(
        {"text": "Pick one.", "choices": ["yes", "no"], "label": 0, "task_id": 0})
    labels = batch["labels"]
    prompt = shared_prompt_length(batch, labels)
    assert prompt is not None
    differing = {**batch, "input_ids": batch["input_ids"].clone()}
    differing["input_ids"][1, prompt - 2] += 1  # the second option's prompt differs in one token
    assert shared_prompt_length(differing, labels) is None


def test_evaluate_causal_reports_the_sum_and_the_per_character_accuracy(smollm2_tokenizer, one_thread):
    """Real BIG-bench examples (social_iqa: options of different lengths) scored by a small random Llama."""
    from mtpeft.app.data import load_task
    from mtpeft.app.evaluate import evaluate_causal

    tok = smollm2_tokenizer
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    model = mtpeft.get_model(base, mtpeft.LoraConfig(r=4)).eval()
    task = load_task("social_iqa")
    result = evaluate_causal(model, tok, [task], split="test", limit=12, max_length=192)["tasks"]["social_iqa"]

    collate = CausalLMCollator(tok, 192, tasks=[task])
    rows = [{**r, "task_id": 0} for r in task.splits["test"][:12]]
    plain = norm = 0
    for row in rows:
        scores = choice_log_likelihoods(model, collate, row)
        chars = torch.tensor([len(c) for c in collate.choice_texts(row)], dtype=scores.dtype)
        plain += int(scores.argmax()) == row["label"]
        norm += int((scores / chars).argmax()) == row["label"]
    assert result["n"] == 12 and plain != norm  # the two readings disagree on these examples
    assert result["accuracy"] == plain / 12 and result["accuracy_norm"] == norm / 12
