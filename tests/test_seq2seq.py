"""Encoder-decoder models (T5): the collator, the decoder's own padding mask in the routing context,
mixed-task batches, option scoring and generation in evaluation, export. Tiny T5 from a config with a
real word-level tokenizer (tests/tiny_lm_folders.py)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import T5ForConditionalGeneration

import mtpeft
from mtpeft.lib.core.context import RoutingState
from mtpeft.app.data import IGNORE_INDEX, Seq2SeqCollator, load_tasks, task_from_dict
from mtpeft.app.evaluate import evaluate_seq2seq, exact_match, seq2seq_choice_log_likelihoods
from mtpeft.app.routing_report import RoutingAccumulator
from tiny_lm_folders import EOS, t5_config, word_tokenizer, write_tasks

N_TASKS = 3


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def tiny_t5(seed: int = 0):
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(t5_config(dropout_rate=0.0)).eval()


def randomise(model, seed: int = 1, scale: float = 0.3) -> None:
    """Random values for every adapter tensor (B = 0 at init would hide row mix-ups)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if model.parameter_role(name) is not None:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


CONFIGS = {
    "mtl_lora": lambda: mtpeft.MTLLoraConfig(r=4, n_up=3, lora_dropout=0.0, n_tasks=N_TASKS),  # task-routed
    "moelora": lambda: mtpeft.MoELoraConfig(r=2, n_experts=3, lora_dropout=0.0, n_tasks=N_TASKS),  # token-routed
}


# -- collator ----------------------------------------------------------------------------------------------

def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_collator_prompt_to_the_encoder_answer_plus_eos_as_labels():
    tok = word_tokenizer(eos_after_text=True)
    coll = Seq2SeqCollator(tok, max_length=64, tasks=[{"labels": ["negative", "positive"]}, {}, {}])
    examples = [{"text": "what is one plus two ?", "target": "three", "task_id": 1},
                {"text": "what colour is the sky ?", "choices": ["red", "blue", "green"], "label": 1, "task_id": 2},
                {"text": "i feel happy today", "label": 1, "task_id": 0}]  # classification: the task's label names
    batch = coll(examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "task_ids"}  # the model builds decoder inputs
    assert batch["task_ids"].tolist() == [1, 2, 0]
    for row, answer in enumerate(["three", "blue", "positive"]):
        labels = batch["labels"][row]
        want = ids(tok, answer) + [EOS]
        assert labels[: len(want)].tolist() == want and (labels[len(want):] == IGNORE_INDEX).all()
        n = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, n - 1] == EOS and (batch["input_ids"][row, n:] == tok.pad_token_id).all()
    assert tok.decode(batch["input_ids"][1]).startswith("what colour is the sky ? Options : A . red B . blue C . green")
    assert "A . negative B . positive" in tok.decode(batch["input_ids"][2])

    choice = coll.choice_batch(examples[1])  # one row per option, the same encoder input
    assert (choice["input_ids"] == choice["input_ids"][:1]).all() and choice["task_ids"].tolist() == [2, 2, 2]
    assert [r[r != IGNORE_INDEX].tolist() for r in choice["labels"]] == [ids(tok, c) for c in ["red", "blue", "green"]]
    gen = coll.generation_batch(examples[:2])
    assert "labels" not in gen and torch.equal(gen["input_ids"][0, :6], batch["input_ids"][0, :6])

    short = Seq2SeqCollator(tok, max_length=14)  # the text is cut, never the options, the eos or the answer
    row = short([{"text": "what colour is the sky " * 4 + "?", "choices": ["red", "blue"], "label": 0}])
    text = tok.decode(row["input_ids"][0])
    assert row["input_ids"].shape[1] <= 14 and text.endswith("Options : A . red B . blue </s>")
    with pytest.raises(ValueError, match="empty answer"):
        coll([{"text": "what is one plus two ?", "target": ""}])


# -- the routing context: two token streams ----------------------------------------------------------------

def test_decoder_layers_count_decoder_tokens_even_when_lengths_match():
    """Encoder and decoder both 6 tokens long: the encoder's mask lines up with decoder inputs too, and
    was applied to them before; each stream must count its own real tokens."""
    model = mtpeft.get_model(tiny_t5(), CONFIGS["moelora"]())
    ids_ = torch.randint(6, 40, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 5:] = 0  # 17 real encoder tokens
    labels = torch.randint(6, 40, (3, 6))
    labels[1, 3:] = IGNORE_INDEX  # 15 real decoder tokens
    with torch.no_grad():
        out = model(input_ids=ids_, attention_mask=mask, labels=labels, task_ids=torch.tensor([0, 1, 2]))
    tokens = {name: int(s["tokens"]) for name, s in out.router_stats.items()}
    assert len(tokens) == 12
    for name, n in tokens.items():
        reads_encoder = name.startswith("encoder.") or name.endswith("EncDecAttention.v")  # cross-attention values
        assert n == (17 if reads_encoder else 15), name
    # an explicit decoder_attention_mask wins over the labels
    dec_mask = torch.ones(3, 6, dtype=torch.long)
    dec_mask[2, 2:] = 0
    with torch.no_grad():
        out = model(input_ids=ids_, attention_mask=mask, labels=labels, decoder_attention_mask=dec_mask,
                    task_ids=torch.tensor([0, 1, 2]))
    assert int(out.router_stats["decoder.block.1.layer.0.SelfAttention.q"]["tokens"]) == 14
    assert int(out.router_stats["decoder.block.1.layer.1.EncDecAttention.v"]["tokens"]) == 17


def test_a_mask_that_does_not_line_up_is_not_applied():
    state = RoutingState()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    dec_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    with state.scope(torch.tensor([0, 1]), mask, record=True, decoder_attention_mask=dec_mask):
        assert torch.equal(state.route_for(torch.zeros(2, 5, 4)).token_mask, mask.bool())
        assert torch.equal(state.route_for(torch.zeros(2, 3, 4), "decoder").token_mask, dec_mask.bool())
        beams = state.route_for(torch.zeros(4, 3, 4), "decoder")  # two rows per example, adjacent
        assert torch.equal(beams.token_mask, dec_mask.bool().repeat_interleave(2, 0))
        assert state.route_for(torch.zeros(2, 3, 4)).token_mask is None  # encoder mask, decoder-length input
        assert state.route_for(torch.zeros(2, 5, 4), "decoder").token_mask is None  # not the encoder output
        assert state.route_for(torch.zeros(2, 4)).token_mask is None  # flattened rows
        with pytest.raises(ValueError, match="unknown token stream"):
            state.route_for(torch.zeros(2, 5, 4), "encoder")


def test_gradient_checkpointing_gives_the_same_gradients():
    """The recomputation in backward reads the same masks as the forward (no hook runs there)."""
    grads = []
    for checkpointing in (False, True):
        base = tiny_t5()
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = mtpeft.get_model(base, CONFIGS["moelora"]())
        randomise(model)
        model.train()
        g = torch.Generator().manual_seed(0)
        labels = torch.randint(6, 40, (3, 5), generator=g)
        labels[0, 2:] = IGNORE_INDEX
        mask = torch.ones(3, 7, dtype=torch.long)
        mask[2, 4:] = 0
        torch.manual_seed(0)
        out = model(input_ids=torch.randint(6, 40, (3, 7), generator=g), attention_mask=mask, labels=labels,
                    task_ids=torch.tensor([0, 2, 1]), use_cache=False)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        a, b = grads[0][name], grads[1][name]
        assert (a - b).abs().max() <= 1e-5 * a.abs().max().clamp_min(1.0), name  # summation order only


# -- mixed-task batches --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_mixed_task_batch_equals_one_task_at_a_time(method):
    """Encoder and decoder layers see different token counts (7 vs 5 per example); every row keeps
    its own task in both, in the forward and in generate."""
    model = mtpeft.get_model(tiny_t5(), CONFIGS[method]())
    randomise(model)
    g = torch.Generator().manual_seed(3)
    batch = {"input_ids": torch.randint(6, 40, (5, 7), generator=g),
             "attention_mask": torch.ones(5, 7, dtype=torch.long), "labels": torch.randint(6, 40, (5, 5), generator=g)}
    batch["attention_mask"][0, 5:] = 0
    batch["labels"][2, 3:] = IGNORE_INDEX
    task_ids = torch.tensor([0, 2, 1, 0, 2])
    with torch.no_grad():
        mixed = model(**batch, task_ids=task_ids).logits
        mixed_gen = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   task_ids=task_ids, max_new_tokens=4, do_sample=False)
        for task in range(N_TASKS):
            rows = (task_ids == task).nonzero().squeeze(-1)
            sub = {k: v[rows] for k, v in batch.items()}
            alone = model(**sub, task_ids=task_ids[rows]).logits
            assert torch.allclose(mixed[rows], alone, atol=1e-5), (method, task)
            gen = model.generate(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"],
                                 task_ids=task_ids[rows], max_new_tokens=4, do_sample=False)
            assert torch.equal(mixed_gen[rows], gen), (method, task)
    if method == "mtl_lora":  # the tasks really differ, so a row given another task's adapter would show
        with torch.no_grad():
            other = model(**batch, task_ids=(task_ids + 1) % N_TASKS).logits
        assert not torch.allclose(other, mixed, atol=1e-3)


# -- evaluation ----------------------------------------------------------------------------------------------

def test_option_scores_are_the_decoder_log_likelihood_of_each_option():
    tok = word_tokenizer(eos_after_text=True)
    coll = Seq2SeqCollator(tok, max_length=64)
    model = mtpeft.get_model(tiny_t5(), CONFIGS["moelora"]())
    randomise(model)
    options = ["red", "blue green", "yellow red blue", "green"]  # 1-3 tokens: padded labels in the batch
    example = {"text": "what colour is the sky ?", "choices": options, "label": 1, "task_id": 2}
    routing = RoutingAccumulator()
    scores = seq2seq_choice_log_likelihoods(model, coll, example, routing)
    source = torch.tensor([coll.source_ids(example)])
    for i, option in enumerate(options):  # by hand: one option at a time, nothing padded
        target = torch.tensor([ids(tok, option)])
        with torch.no_grad():
            logits = model(input_ids=source, labels=target, task_ids=torch.tensor([2])).logits
        want = F.log_softmax(logits.float(), -1)[0].gather(-1, target[0, :, None]).sum()
        assert torch.allclose(scores[i], want, atol=1e-5), option
    assert routing.stats and all(s["tokens"] > 0 for s in routing.stats.values())


def test_evaluate_seq2seq_scores_options_and_generated_text(tmp_path):
    specs = [task_from_dict(t) for t in write_tasks(tmp_path / "data")]
    tasks = load_tasks(specs, seed=0, val_fraction=0.1, test_fraction=0.3)
    tok = word_tokenizer(eos_after_text=True)
    model = mtpeft.get_model(tiny_t5(), CONFIGS["mtl_lora"]())
    randomise(model)
    sums = tasks[1]
    coll = Seq2SeqCollator(tok, 64, tasks=tasks)
    rows = [{**r, "task_id": 1} for r in sums.test]
    with torch.no_grad():
        batch = coll.generation_batch(rows)
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    predictions = tok.batch_decode(generated, skip_special_tokens=True)
    assert all(predictions)
    for i in range(0, len(rows), 2):  # every other reference becomes the model's own answer: a known score
        sums.test[i]["references"] = [predictions[i]]
    expected = exact_match([r["references"] for r in sums.test], predictions)
    assert 0 < expected < 1
    routing = RoutingAccumulator()
    result = evaluate_seq2seq(model, tok, tasks, batch_size=3, max_length=64, max_new_tokens=3, routing=routing)
    assert result["tasks"]["sums"] == {"metric": "exact_match", "score": expected, "n": len(rows)}
    colours = result["tasks"]["colours"]
    want = [int(seq2seq_choice_log_likelihoods(model, coll, {**r, "task_id": 0}).argmax()) == r["label"]
            for r in tasks[0].test]
    assert colours["accuracy"] == sum(want) / len(want) and "accuracy_norm" in colours
    assert result["tasks"]["moods"]["n"] == len(tasks[2].test)


def test_scoring_a_subset_of_tasks_routes_each_with_its_own_id(tmp_path):
    """``only=`` scores some tasks of a run (what an export does for its task): each keeps the id it has
    in the full list, so its score equals the full evaluation's; an unknown name is refused."""
    specs = [task_from_dict(t) for t in write_tasks(tmp_path / "data")]
    tasks = load_tasks(specs, seed=0, val_fraction=0.1, test_fraction=0.3)
    tok = word_tokenizer(eos_after_text=True)
    model = mtpeft.get_model(tiny_t5(), CONFIGS["mtl_lora"]())
    randomise(model)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["task_ids"].unique().tolist()),
                                           with_kwargs=True)
    full = evaluate_seq2seq(model, tok, tasks, batch_size=3, max_length=64, max_new_tokens=3)
    seen.clear()
    part = evaluate_seq2seq(model, tok, tasks, batch_size=3, max_length=64, max_new_tokens=3, only=["moods"])
    hook.remove()
    assert seen and all(ids == [2] for ids in seen)
    assert list(part["tasks"]) == ["moods"] and part["tasks"]["moods"] == full["tasks"]["moods"]
    with pytest.raises(ValueError, match="no task \\['mood'\\]"):
        evaluate_seq2seq(model, tok, tasks, only=["mood"])


def test_task_adapter_of_a_t5_exports_to_stock_peft(tmp_path):
    from peft import PeftModel

    model = mtpeft.get_model(tiny_t5(), mtpeft.TaskLoraConfig(r=4, n_tasks=N_TASKS))
    randomise(model)
    model.export_lora(tmp_path / "peft", task=1)
    ids_ = torch.randint(6, 40, (2, 6))
    labels = torch.randint(6, 40, (2, 4))
    with torch.no_grad():
        ours = model(input_ids=ids_, labels=labels, task_ids=torch.tensor([1, 1])).logits
        stock = PeftModel.from_pretrained(tiny_t5(), tmp_path / "peft")
        assert torch.allclose(stock(input_ids=ids_, labels=labels).logits, ours, atol=1e-5)


def test_gradient_accumulation_equals_one_batch_of_the_same_examples(tmp_path):
    """T5's loss is a mean that ignores the Trainer's token count; the Trainer must then divide it by
    the accumulation steps itself (it did not: two accumulated batches gave twice the gradient)."""
    from transformers import TrainingArguments

    from mtpeft.app.trainer import MultiTaskTrainer

    tok = word_tokenizer(eos_after_text=True)
    examples = [{"text": f"what is {a} plus {b} ?", "target": c, "task_id": t}  # all rows the same length
                for a, b, c, t in [("one", "two", "three", 0), ("two", "two", "four", 1),
                                   ("zero", "five", "five", 2), ("three", "three", "six", 0)]]
    after = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        model = mtpeft.get_model(tiny_t5(), CONFIGS["mtl_lora"]())
        randomise(model)
        args = TrainingArguments(output_dir=str(tmp_path / f"a{accumulation}"), max_steps=1,
                                 per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                                 max_grad_norm=0.0, report_to=[], use_cpu=True, remove_unused_columns=False,
                                 save_strategy="no", disable_tqdm=True, seed=0, data_seed=0)
        params = [p for p in model.parameters() if p.requires_grad]
        trainer = MultiTaskTrainer(model=model, args=args, train_dataset=examples,
                                   data_collator=Seq2SeqCollator(tok, 64),
                                   optimizers=(torch.optim.SGD(params, lr=1.0), None))
        trainer.train()
        after.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    moved = [n for n in after[0] if not torch.allclose(after[0][n], after[1][n], atol=1e-5)]
    assert not moved, moved[:3]
