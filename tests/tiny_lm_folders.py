"""Tiny language models saved to disk as a user's checkpoint would be (config.json, weights, tokenizer),
for the model-kind and seq2seq tests: a T5 (encoder-decoder) and a GPT-2 with its LM head (causal),
random weights from configs, with a real word-level tokenizer (`tokenizers`) over the words of the
small local JSONL tasks below. No download."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

SPECIAL = ["<pad>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = (["Options", "A", "B", "C", "D", ":", ".", "?", "what", "colour", "is", "the", "sky", "grass", "blood", "sun",
          "red", "blue", "green", "yellow", "plus", "i", "am", "feel", "happy", "sad", "good", "bad", "today",
          "positive", "negative", "user", "assistant", "Answer", "with", "one", "word"]
         + ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
VOCAB = list(dict.fromkeys(SPECIAL + WORDS))
PAD, EOS = 0, 1
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def word_tokenizer(eos_after_text: bool):
    """A word-level tokenizer over VOCAB. ``eos_after_text``: append ``</s>`` to every encoded text, as
    T5's tokenizer does (its encoder input ends with eos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    if eos_after_text:
        model.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS)])
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                   extra_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"])


def t5_config(**overrides) -> T5Config:
    return T5Config(**{"vocab_size": len(VOCAB), "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2,
                       "num_heads": 4, "decoder_start_token_id": PAD, "pad_token_id": PAD, "eos_token_id": EOS,
                       **overrides})


def save_tiny_t5(folder: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    T5ForConditionalGeneration(t5_config(**overrides)).save_pretrained(folder)
    word_tokenizer(eos_after_text=True).save_pretrained(folder)
    return folder


def save_tiny_gpt2(folder: Path, seed: int = 0) -> Path:
    """GPT-2 with its LM head (architectures: GPT2LMHeadModel), its tokenizer carrying a chat template."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(VOCAB), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer = word_tokenizer(eos_after_text=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


COLOURS = [("the sky", "blue"), ("grass", "green"), ("blood", "red"), ("the sun", "yellow")]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_tasks(folder: Path) -> list[dict]:
    """Three local JSONL tasks (multiple choice with options, free text, classification) and their
    config entries."""
    folder.mkdir(parents=True, exist_ok=True)

    def jsonl(name, rows):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return f"json:{path}"

    colours = [{"question": f"what colour is {thing} ?", "options": ["red", "blue", "green", "yellow"],
                "answer": ["red", "blue", "green", "yellow"].index(colour)} for thing, colour in COLOURS] * 5
    sums = [{"question": f"what is {NUMBERS[a]} plus {NUMBERS[b]} ?", "answer": NUMBERS[a + b]}
            for a in range(5) for b in range(5)]
    moods = [{"text": f"i feel {w} today", "label": "positive" if w in ("happy", "good") else "negative"}
             for w in ("happy", "sad", "good", "bad")] * 5
    return [
        {"name": "colours", "source": jsonl("colours", colours), "kind": "multiple_choice",
         "text_field": "question", "choices_field": "options", "label_field": "answer"},
        {"name": "sums", "source": jsonl("sums", sums), "kind": "generation", "metric": "exact_match",
         "text_field": "question", "target_field": "answer", "instruction": "Answer with one word ."},
        {"name": "moods", "source": jsonl("moods", moods)},
    ]
