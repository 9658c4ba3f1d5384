"""Collators on real tokenizers: MiniLM (encoder), SmolLM2's chat tokenizer (read from its GGUF file),
and tiny word-level chat tokenizers built with `tokenizers` (real tokenizers, just small vocabularies)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mtpeft.app.assets import minilm_path  # noqa: E402
from mtpeft.app.data import IGNORE_INDEX, CausalLMCollator, EncoderClassificationCollator, TaskSpec  # noqa: E402

WORDS = ["<unk>", "<pad>", "</s>", "<|user|>", "<|assistant|>", "<|end|>", "user", "assistant", ":", "what", "is",
         "2", "plus", "3", "5", "?", "add", "Options", "A", "B", "C", ".", "red", "blue", "green", "colour", "sky"]
WITH_END_OF_TURN = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
PLAIN = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"


def tiny_chat_tokenizer(template):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                  extra_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"])
    tok.chat_template = template
    return tok


def _labelled(batch, row):
    lab = batch["labels"][row]
    return lab[lab != IGNORE_INDEX].tolist()


# -- encoder -----------------------------------------------------------------------------------------

def test_encoder_collator_on_minilm():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    coll = EncoderClassificationCollator(tok, max_length=12)
    examples = [{"text": "short one", "label": 2, "task_id": 1},
                {"text": "a much longer sentence " * 10, "label": 0, "task_id": 3}]
    batch = coll(examples)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 12)  # truncated to max_length
    assert batch["labels"].tolist() == [2, 0] and batch["labels"].dtype == torch.long
    assert batch["task_ids"].tolist() == [1, 3] and batch["task_ids"].shape == (2,)
    assert batch["attention_mask"][0].sum().item() == len(tok("short one")["input_ids"])  # padding masked
    assert batch["input_ids"][0, -1].item() == tok.pad_token_id
    with pytest.raises(ValueError, match="classification examples only"):
        coll([{"text": "q", "choices": ["a", "b"], "label": 0}])
    with pytest.raises(KeyError, match="'label'"):
        coll([{"text": "no label"}])


# -- causal, tiny tokenizers -------------------------------------------------------------------------

@pytest.mark.parametrize("template, end_token", [(WITH_END_OF_TURN, "<|end|>"), (PLAIN, "</s>")])
def test_loss_mask_covers_exactly_the_answer_and_end_of_turn(template, end_token):
    tok = tiny_chat_tokenizer(template)
    coll = CausalLMCollator(tok, max_length=64)
    examples = [{"text": "what is 2 plus 3 ?", "target": "5", "task_id": 2},
                {"text": "what colour is sky ?", "choices": ["red", "blue", "green"], "label": 1, "task_id": 0}]
    batch = coll(examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["task_ids"].tolist() == [2, 0]
    for row, answer in enumerate(["5", "blue"]):
        want = tok(answer, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids(end_token)]
        assert _labelled(batch, row) == want
        n = int(batch["attention_mask"][row].sum())
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        assert (labels[:n - len(want)] == IGNORE_INDEX).all()  # the whole prompt is masked
        assert labels[n - len(want):n].tolist() == ids[n - len(want):n].tolist() == want  # answer ends the row
        assert (labels[n:] == IGNORE_INDEX).all() and (ids[n:] == tok.pad_token_id).all()  # right padding
        assert tok.unk_token_id not in ids[:n].tolist()
    # the options are shown lettered in the prompt
    assert "A . red" in tok.decode(batch["input_ids"][1]) or "A. red" in tok.decode(batch["input_ids"][1])


def test_prompt_of_training_row_equals_generation_prompt():
    tok = tiny_chat_tokenizer(WITH_END_OF_TURN)
    coll = CausalLMCollator(tok, max_length=64)
    ex = {"text": "what is 2 plus 3 ?", "target": "5"}
    row = coll.encode(ex)
    prompt = coll.prompt_ids(ex)
    assert row["input_ids"][: len(prompt)] == prompt
    assert row["labels"][len(prompt) - 1] == IGNORE_INDEX and row["labels"][len(prompt)] != IGNORE_INDEX


def test_collator_needs_a_chat_template():
    tok = tiny_chat_tokenizer(WITH_END_OF_TURN)
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        CausalLMCollator(tok)


# -- causal, SmolLM2's real tokenizer -------------------------------------------------------------------

def test_smollm2_loss_mask_and_task_labels(smollm2_tokenizer):
    tok = smollm2_tokenizer
    tasks = [TaskSpec("topics", "json:x.jsonl", labels=["business", "sport", "tech"], instruction="Give the topic."),
             TaskSpec("sums", "json:y.jsonl", kind="generation", metric="exact_match")]
    coll = CausalLMCollator(tok, max_length=128, tasks=tasks)
    examples = [{"text": "Shares rose sharply on Monday.", "label": 0, "task_id": 0},
                {"text": "What is 12 plus 30?", "target": "42", "task_id": 1}]
    batch = coll(examples)
    assert tok.decode(_labelled(batch, 0)) == "business<|im_end|>"
    assert tok.decode(_labelled(batch, 1)) == "42<|im_end|>"
    first = tok.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert "Give the topic." in first and "A. business\nB. sport\nC. tech" in first
    assert first.endswith("<|im_start|>assistant\nbusiness<|im_end|>")  # nothing after the end of turn
    letter = CausalLMCollator(tok, tasks=tasks, answer_style="letter")
    assert tok.decode(_labelled(letter(examples[:1]), 0)) == "A<|im_end|>"


def test_smollm2_choice_rows_and_generation_prompts(smollm2_tokenizer):
    tok = smollm2_tokenizer
    coll = CausalLMCollator(tok, max_length=128)
    ex = {"text": "Which city is the capital of France?", "choices": ["London", "Paris", "Rome"], "label": 1, "task_id": 4}
    rows = coll.choice_batch(ex)
    assert rows["input_ids"].shape[0] == 3 and rows["task_ids"].tolist() == [4, 4, 4]
    prompt = coll.prompt_ids(ex)
    for r, choice in enumerate(ex["choices"]):
        assert tok.decode(_labelled(rows, r)) == choice  # scored on the option tokens only, no end-of-turn
        assert rows["input_ids"][r, : len(prompt)].tolist() == prompt
    assert [p for p, _ in coll.choice_pairs(ex)] == [coll.prompt_text(ex)] * 3
    gen = coll.generation_batch([ex, {"text": "Hi", "target": "Hello"}])
    assert gen["attention_mask"][:, -1].tolist() == [1, 1]  # left padding: prompts end together
    assert gen["attention_mask"][1, 0].item() == 0
    assert tok.decode(gen["input_ids"][0]).endswith("<|im_start|>assistant\n")


def test_smollm2_long_text_is_shortened_never_the_answer(smollm2_tokenizer):
    coll = CausalLMCollator(smollm2_tokenizer, max_length=48)
    row = coll.encode({"text": "lorem ipsum dolor " * 200, "target": "the answer"})
    assert len(row["input_ids"]) <= 48
    assert smollm2_tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX]) == "the answer<|im_end|>"
    assert len(coll.prompt_ids({"text": "lorem ipsum dolor " * 200, "target": "x"})) <= 48


@pytest.mark.slow
def test_smollm2_scores_and_answers_through_the_collator():
    """End to end on the real model: the collator's rows give the right answer the best log-likelihood,
    its generation prompt makes the model say it, and the training loss is CE on the answer tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtpeft.app.assets import smollm2_path

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    coll = CausalLMCollator(tok, max_length=128)
    ex = {"text": "What is the capital of France?", "choices": ["London", "Paris", "Berlin"], "label": 1}
    rows = coll.choice_batch(ex)
    with torch.no_grad():
        logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1], -1)  # (choices, seq-1, vocab)
    target = rows["labels"][:, 1:]
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (target != IGNORE_INDEX)
    assert picked.sum(1).argmax().item() == 1

    gen = coll.generation_batch([{"text": "What is the capital of France? Answer in one word."}])
    out = model.generate(input_ids=gen["input_ids"], attention_mask=gen["attention_mask"], max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, gen["input_ids"].shape[1]:])

    # The model's own phrasing gets a low loss; the loss is the mean CE over the labelled tokens only.
    batch = coll([{"text": "What is the capital of France?", "target": "The capital of France is Paris."}])
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    target = batch["labels"][0, 1:]
    keep = target != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(out.logits[0, :-1][keep], target[keep])
    assert out.loss.item() == pytest.approx(manual.item(), rel=1e-4)
    assert out.loss.item() < 1.0
