"""Bad inputs: each one gets an error of a stated type whose message names the problem, and changes nothing.

docs/reliability.md lists every case with the test that covers it. "Changes nothing" is checked the same
way everywhere (:class:`Unchanged`): the models' state_dicts (parameters and buffers, bit for bit),
requires_grad flags, module types, train/eval modes, merged tasks and routing scope are as before, and
every file under the folders involved has the same bytes and mtime, with no file or folder added or
removed.

Training cases (NaN / Inf loss, bad data configs) run the real pipeline on a tiny BERT saved to a temp
folder with MiniLM's tokenizer and two small JSON tasks (tests/dist_worker.py's ``make_fixture``).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import BUILDERS, batch_for
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

import mtpeft
from mtpeft.app.data import TaskDataError, TaskSpecError, UnknownTaskError
from mtpeft.lib.heads import MultiTaskEncoderClassifier
from mtpeft.lib.io import AdapterFileError, load_adapter_weights
from mtpeft.app.pipeline import train_run
from mtpeft.app.run_config import run_config_from_dict
from mtpeft.app.trainer import MultiTaskTrainer, NonFiniteLossError, complete_checkpoints


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ----------------------------------------------------------------------------------- "nothing changed"
def _model_state(model: torch.nn.Module) -> dict:
    state = {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "types": {n: type(m) for n, m in model.named_modules()},
        "training": {n: m.training for n, m in model.named_modules()},
    }
    if isinstance(model, mtpeft.MultiTaskModel):
        state["merged"] = {n: layer.merged_task for n, layer in model.adapted_layers()}
        state["routing_open"] = model.routing.open
    return state


def _folder_state(root: Path) -> dict | None:
    if not root.exists():
        return None
    if root.is_file():
        return {".": (root.read_bytes(), root.stat().st_mtime_ns)}
    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        state[rel] = (path.read_bytes(), path.stat().st_mtime_ns) if path.is_file() else "dir"
    return state


class Unchanged:
    """Snapshot of models and folders / files; ``check()`` asserts that none of them changed."""

    def __init__(self, *things):
        self.models = [(m, _model_state(m)) for m in things if isinstance(m, torch.nn.Module)]
        self.paths = [(Path(p), _folder_state(Path(p))) for p in things if not isinstance(p, torch.nn.Module)]

    def check(self) -> None:
        for model, before in self.models:
            after = _model_state(model)
            assert after["types"] == before["types"], "module types changed"
            assert after["requires_grad"] == before["requires_grad"], "requires_grad flags changed"
            assert after["training"] == before["training"], "train/eval mode changed"
            assert after.keys() == before.keys()
            for key in ("merged", "routing_open"):
                assert after.get(key) == before.get(key), key
            assert after["tensors"].keys() == before["tensors"].keys(), "state_dict keys changed"
            for name, value in before["tensors"].items():
                assert torch.equal(after["tensors"][name], value), f"{name} changed"
        for path, before in self.paths:
            after = _folder_state(path)
            if before is None:
                assert after is None, f"{path} was created"
                continue
            assert after is not None, f"{path} was removed"
            assert after.keys() == before.keys(), f"files added or removed under {path}"
            for rel, value in before.items():
                assert after[rel] == value, f"{path / rel} changed"


def refused(action, error, match, *untouched):
    """Run ``action``: it must raise ``error`` with a message matching ``match`` and leave ``untouched``
    (models, folders, files) exactly as they were."""
    snapshot = Unchanged(*untouched)
    with pytest.raises(error, match=match) as info:
        action()
    snapshot.check()
    return info.value


def randomise(model, seed: int = 1, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if model.parameter_role(name) is not None:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def wrapped(config=None, arch: str = "llama"):
    model = mtpeft.get_model(BUILDERS[arch](), config or mtpeft.TaskLoraConfig(r=4, n_tasks=3))
    randomise(model)
    return model


def save(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------- task ids
BAD_TASK_IDS = {  # id: (task_ids for a batch of 4, error, what the message must say)
    "out_of_range": (torch.tensor([0, 1, 3, 1]), ValueError, r"task id 3 is out of range.*n_tasks=3.*\[0, 2\]"),
    "negative": (torch.tensor([0, -1, 0, 1]), ValueError, r"task id -1 is out of range"),
    "float": (torch.tensor([0.0, 1.0, 0.0, 1.0]), TypeError, r"must hold integers.*torch.float32"),
    "bool": (torch.tensor([True, False, True, True]), TypeError, r"must hold integers.*torch.bool"),
    "python_list": ([0, 1, 0, 1], TypeError, r"must be a torch.LongTensor.*got list"),
    "wrong_length": (torch.tensor([0, 1, 0]), ValueError, r"3 entries but the batch has 4 examples"),
    "empty": (torch.tensor([], dtype=torch.long), ValueError, r"0 entries but the batch has 4 examples"),
    "two_dims": (torch.tensor([[0, 1, 0, 1]]), ValueError, r"must have shape \(batch,\).*\(1, 4\)"),
    "missing": (None, ValueError, r"routes each example by its task: pass task_ids"),
}


@pytest.mark.parametrize("case", list(BAD_TASK_IDS))
def test_bad_task_ids(case):
    task_ids, error, match = BAD_TASK_IDS[case]
    model = wrapped()
    model.train()
    refused(lambda: model(**batch_for("llama"), task_ids=task_ids), error, match, model)


@pytest.mark.parametrize("case", ["out_of_range", "missing", "float"])
def test_bad_task_ids_in_generate(case):
    task_ids, error, match = BAD_TASK_IDS[case]
    model = wrapped()
    b = batch_for("llama")
    refused(lambda: model.generate(**b, task_ids=task_ids, max_new_tokens=2, do_sample=False), error, match, model)


def test_token_routed_methods_validate_task_ids_they_are_given():
    """Token-routed methods need no task ids, but ids that do not fit n_tasks are still an error."""
    model = wrapped(mtpeft.MoELoraConfig(n_experts=4, top_k=2, r=2, n_tasks=3))
    refused(lambda: model(**batch_for("llama"), task_ids=torch.tensor([0, 5, 1, 2])), ValueError,
            r"task id 5 is out of range.*\[0, 2\]", model)


def test_task_ids_naming_another_task_than_the_merged_one():
    model = wrapped()
    model.merge(task=1)
    model(**batch_for("llama"), task_ids=torch.tensor([1, 1, 1, 1]))  # the merged task runs
    refused(lambda: model(**batch_for("llama"), task_ids=torch.tensor([1, 0, 1, 2])), ValueError,
            r"merged for task 1, but the batch has task ids \[0, 2\].*unmerge", model)


@pytest.mark.parametrize("task, match", [
    (3, r"task=3 is not a task of this adapter: use an int in \[0, 2\]"),
    (-1, r"task=-1 is not a task of this adapter"),
    ("1", r"task='1' is not a task of this adapter"),
    (None, r"one adapter per task: pass task=t"),
], ids=["too_large", "negative", "string", "missing"])
def test_bad_task_for_merge_and_export(tmp_path, task, match):
    model = wrapped()
    refused(lambda: model.merge(task=task), ValueError, match, model)
    refused(lambda: model.export_lora(tmp_path / "out", task=task), ValueError, match, model, tmp_path / "out")


# ----------------------------------------------------------------------------------- adapter folders
MISMATCHED = {  # id: (config saved, config of the wrapped model loading it, message)
    "method": (mtpeft.TaskLoraConfig(r=4, n_tasks=3), mtpeft.LoraConfig(r=4), r"method: model='lora' file='task_lora'"),
    "r": (mtpeft.TaskLoraConfig(r=4, n_tasks=3), mtpeft.TaskLoraConfig(r=8, n_tasks=3), r"r: model=8 file=4"),
    "n_experts": (mtpeft.MoELoraConfig(n_experts=4, top_k=2, r=2), mtpeft.MoELoraConfig(n_experts=2, top_k=2, r=2),
                  r"n_experts: model=2 file=4"),
    "target_modules": (mtpeft.TaskLoraConfig(r=4, n_tasks=3, target_modules=["q_proj", "v_proj"]),
                       mtpeft.TaskLoraConfig(r=4, n_tasks=3, target_modules=["q_proj"]),
                       r"target_modules: model=\['q_proj'\] file=\['q_proj', 'v_proj'\]"),
    "n_tasks": (mtpeft.TaskLoraConfig(r=4, n_tasks=3), mtpeft.TaskLoraConfig(r=4, n_tasks=2), r"n_tasks: model=2 file=3"),
}


@pytest.mark.parametrize("case", list(MISMATCHED))
def test_mismatched_adapter_folder_into_a_wrapped_model(tmp_path, case):
    saved_config, other_config, match = MISMATCHED[case]
    path = save(wrapped(saved_config), tmp_path / "adapter")
    other = wrapped(other_config)
    err = refused(lambda: load_adapter_weights(other, path), AdapterFileError, match, other, path)
    assert "was saved with another adapter config" in str(err)


def _wider_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()


def test_adapter_folder_for_another_base_model(tmp_path):
    path = save(wrapped(mtpeft.TaskLoraConfig(r=4, n_tasks=3, target_modules=["q_proj", "v_proj"])), tmp_path / "a")
    bert = BUILDERS["bert"]()  # another architecture: the folder's target modules name nothing in it
    refused(lambda: mtpeft.MultiTaskModel.from_pretrained(bert, path), ValueError,
            r"target module 'q_proj' matches no adaptable layer in BertModel", bert, path)
    wide = _wider_llama()  # the same architecture, another hidden size: shapes differ
    refused(lambda: mtpeft.MultiTaskModel.from_pretrained(wide, path), AdapterFileError,
            r"has shape \(3, .*\) but this model expects \(3, .*\);.*another base model", wide, path)


def test_adapter_weights_saved_with_other_target_modules(tmp_path):
    """A folder whose weights file came from other target modules than its config names."""
    path = save(wrapped(mtpeft.TaskLoraConfig(r=4, n_tasks=3, target_modules=["q_proj"])), tmp_path / "a")
    other = save(wrapped(mtpeft.TaskLoraConfig(r=4, n_tasks=3, target_modules=["o_proj"])), tmp_path / "b")
    (path / "adapter_model.safetensors").write_bytes((other / "adapter_model.safetensors").read_bytes())
    base = BUILDERS["llama"]()
    refused(lambda: mtpeft.MultiTaskModel.from_pretrained(base, path), AdapterFileError,
            r"4 missing keys.*q_proj.*4 unexpected keys.*o_proj.*other target_modules", base, path)


def _edit_tensors(edit):
    def apply(path: Path) -> None:
        tensors = load_file(str(path / "adapter_model.safetensors"))
        edit(tensors)
        save_file(tensors, str(path / "adapter_model.safetensors"))
    return apply


def _first_key(tensors):
    return sorted(tensors)[0]


def _write_weights(data: bytes):
    return lambda path: (path / "adapter_model.safetensors").write_bytes(data)


def _corrupt_header(path: Path) -> None:
    data = bytearray((path / "adapter_model.safetensors").read_bytes())
    data[8:40] = b"\x00\xff" * 16  # inside the JSON header
    (path / "adapter_model.safetensors").write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])


def _torch_save_as_safetensors(path: Path) -> None:
    torch.save({"x": torch.zeros(2)}, path / "adapter_model.safetensors")


def _weights_folder(path: Path) -> None:
    (path / "adapter_model.safetensors").unlink()
    (path / "adapter_model.safetensors").mkdir()


def _only_pickle(path: Path) -> None:
    (path / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(2)}, path / "adapter_model.bin")


BAD_WEIGHTS = {  # id: (how the saved folder is damaged, message)
    "missing_key": (_edit_tensors(lambda t: t.pop(_first_key(t))), r"1 missing keys \(e.g. \['model.layers.0"),
    "unexpected_key": (_edit_tensors(lambda t: t.update({"model.layers.9.extra.lora_A": torch.zeros(2)})),
                       r"1 unexpected keys \(e.g. \['model.layers.9.extra.lora_A'\]\)"),
    "wrong_shape": (_edit_tensors(lambda t: t.update({_first_key(t): torch.zeros(3, 5, 32)})),
                    r"tensor 'model.layers.0.self_attn.q_proj.lora_A' has shape \(3, 5, 32\) but this model "
                    r"expects \(3, 4, 32\)"),
    "truncated": (_truncate, r"not a readable safetensors file.*truncated or corrupted"),
    "corrupted_header": (_corrupt_header, r"not a readable safetensors file.*truncated or corrupted"),
    "empty_file": (_write_weights(b""), r"not a readable safetensors file"),
    "random_bytes": (_write_weights(bytes(range(256)) * 8), r"not a readable safetensors file"),
    "pickle_as_safetensors": (_write_weights(pickle.dumps({"x": [1, 2]})), r"not a readable safetensors file"),
    "torch_save_as_safetensors": (_torch_save_as_safetensors, r"not a readable safetensors file"),
    "weights_path_is_a_folder": (_weights_folder, r"not a readable safetensors file"),
    "no_weights_file": (lambda p: (p / "adapter_model.safetensors").unlink(), r"has no adapter_model.safetensors"),
    "pickle_instead_of_safetensors": (_only_pickle, r"holds adapter_model.bin \(a pickle\).*never unpickles"),
}


@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_bad_weight_files(tmp_path, case):
    damage, match = BAD_WEIGHTS[case]
    path = save(wrapped(), tmp_path / "adapter")
    damage(path)
    base = BUILDERS["llama"]()
    refused(lambda: mtpeft.MultiTaskModel.from_pretrained(base, path), AdapterFileError, match, base, path)
    model = wrapped()  # the same config, already wrapped: load_adapter_weights
    refused(lambda: load_adapter_weights(model, path), AdapterFileError, match, model, path)


def _write_config(text: str):
    return lambda path: (path / "adapter_config.json").write_text(text)


def _edit_config(**changes):
    def apply(path: Path) -> None:
        data = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**data, **changes}))
    return apply


BAD_CONFIGS = {  # id: (how the folder's config is damaged, which folder to pass, message)
    "no_config": (lambda p: (p / "adapter_config.json").unlink(), ".", r"has no adapter_config.json; is it an mtpeft"),
    "not_json": (_write_config("{'method': 'lora',"), ".", r"adapter_config.json is not valid JSON"),
    "not_utf8": (lambda p: (p / "adapter_config.json").write_bytes(b"\xff\xfe\x00garbage"), ".", r"is not valid JSON"),
    "not_a_mapping": (_write_config("[1, 2]"), ".", r"does not name a method; it was not written by mtpeft"),
    "peft_adapter": (_write_config(json.dumps({"peft_type": "LORA", "r": 8})), ".",
                     r"is a PEFT adapter \(peft_type=LORA\).*peft.PeftModel.from_pretrained"),
    "unknown_method": (_edit_config(method="tasklora"), ".", r"unknown method 'tasklora'. Did you mean 'task_lora'"),
    "unknown_field": (_edit_config(lora_alhpa=3), ".", r"unknown TaskLoraConfig field 'lora_alhpa'. Did you mean 'lora_alpha'"),
    "invalid_value": (_edit_config(r=-1), ".", r"TaskLoraConfig.r must be a positive integer, got -1"),
    "file_not_folder": (lambda p: None, "adapter_config.json", r"is not a folder; pass the folder that save_pretrained"),
    "missing_folder": (lambda p: None, "nope", r"nope is not a folder"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_adapter_config_files(tmp_path, case):
    damage, which, match = BAD_CONFIGS[case]
    path = save(wrapped(), tmp_path / "adapter")
    damage(path)
    target = path / which
    base = BUILDERS["llama"]()
    refused(lambda: mtpeft.MultiTaskModel.from_pretrained(base, target), AdapterFileError, match, base, path)
    model = wrapped()
    refused(lambda: load_adapter_weights(model, target), AdapterFileError, match, model, path)


# ----------------------------------------------------------------------------------- configs and targets
BAD_METHOD_CONFIGS = [  # (config class, fields, message)
    (mtpeft.LoraConfig, dict(r=0), r"LoraConfig.r must be a positive integer, got 0"),
    (mtpeft.LoraConfig, dict(r=-4), r"LoraConfig.r must be a positive integer, got -4"),
    (mtpeft.LoraConfig, dict(r=2.5), r"LoraConfig.r must be a positive integer, got 2.5"),
    (mtpeft.LoraConfig, dict(r=True), r"LoraConfig.r must be a positive integer, got True"),
    (mtpeft.TaskLoraConfig, dict(r=0, n_tasks=2), r"TaskLoraConfig.r must be a positive integer"),
    (mtpeft.MTLLoraConfig, dict(r=0, n_tasks=2), r"MTLLoraConfig.r must be a positive integer"),
    (mtpeft.PolyConfig, dict(r=0, n_tasks=2), r"PolyConfig.r must be a positive integer"),
    (mtpeft.CPolyConfig, dict(r=-1, n_tasks=2), r"CPolyConfig.r must be a positive integer"),
    (mtpeft.MoELoraConfig, dict(r=0), r"MoELoraConfig.r must be a positive integer"),
    (mtpeft.MoSLDConfig, dict(r=0), r"MoSLDConfig.r must be a positive integer"),
    (mtpeft.TeamLoraConfig, dict(r=0), r"TeamLoraConfig.r must be a positive integer"),
    (mtpeft.HydraLoraConfig, dict(r=0), r"HydraLoraConfig.r must be a positive integer"),
    (mtpeft.MoELoraConfig, dict(n_experts=2, top_k=3), r"MoELoraConfig.top_k=3 exceeds n_experts=2"),
    (mtpeft.MoSLDConfig, dict(expert_schedule="flat", n_experts=2, top_k=3),
     r"MoSLDConfig.top_k=3 exceeds the smallest expert count 2 of the 'flat' schedule"),
    (mtpeft.MoSLDConfig, dict(expert_counts=[1, 2, 4, 8], top_k=2), r"top_k=2 exceeds the smallest expert count 1"),
    (mtpeft.MoELoraConfig, dict(top_k=0), r"MoELoraConfig.top_k must be a positive integer, got 0"),
    (mtpeft.TeamLoraConfig, dict(n_experts=0), r"TeamLoraConfig.n_experts must be a positive integer, got 0"),
    (mtpeft.PolyConfig, dict(n_splits=0, n_tasks=2), r"PolyConfig.n_splits must be a positive integer"),
    (mtpeft.LoraConfig, dict(lora_dropout=1.0), r"LoraConfig.lora_dropout must be in \[0, 1\), got 1.0"),
    (mtpeft.TaskLoraConfig, dict(), r"TaskLoraConfig routes by task: set n_tasks"),
    (mtpeft.PolyConfig, dict(n_tasks=0), r"PolyConfig.n_tasks must be a positive integer, got 0"),
    (mtpeft.LoraConfig, dict(adapter_dtype="fp8"), r"adapter_dtype must be one of \['float32', 'bfloat16', 'base'\]"),
    (mtpeft.LoraConfig, dict(target_modules=[]), r"target_modules is an empty list"),
]


@pytest.mark.parametrize("cls, fields, match", BAD_METHOD_CONFIGS,
                         ids=[f"{c.__name__}-{'-'.join(f'{k}={v}' for k, v in f.items()) or 'no_n_tasks'}"
                              for c, f, _ in BAD_METHOD_CONFIGS])
def test_bad_method_config_values(cls, fields, match):
    """Refused when the config is built, before any model is touched."""
    base = BUILDERS["llama"]()
    refused(lambda: mtpeft.get_model(base, cls(**fields)), ValueError, match, base)


def test_expert_ranks_are_per_expert_so_no_rank_must_divide_by_e():
    """"A rank not divisible by E" cannot be asked for: MoELoRA's r and TeamLoRA's r are per expert
    (r_e, r_B), TeamLoRA's shared A has rank E·r, so every E and r fit."""
    for e, r in [(3, 5), (7, 1), (5, 3)]:
        model = mtpeft.get_model(BUILDERS["llama"](), mtpeft.TeamLoraConfig(n_experts=e, r=r))
        _, layer = model.adapted_layers()[0]
        assert layer.lora_A.shape[0] == e * r and layer.lora_B.shape[:2] == (e, r)


class _NoDefaults(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)


TARGETS = {  # id: (base builder, config, error, message)
    "name_matches_nothing": ("llama", mtpeft.LoraConfig(target_modules=["q_proj", "qproj"]), ValueError,
                             r"target module 'qproj' matches no adaptable layer in LlamaForCausalLM.*'q_proj'"),
    "regex_matches_nothing": ("gpt2", mtpeft.LoraConfig(target_modules=r".*\.nothing"), ValueError,
                              r"matches no adaptable layer in GPT2LMHeadModel. Adaptable layer names:.*'c_attn'"),
    "all_excluded": ("llama", mtpeft.LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]), ValueError,
                     r"minus exclude_modules=\['q_proj'\]\) matches no adaptable layer"),
    "not_a_linear": ("llama", mtpeft.LoraConfig(target_modules=["embed_tokens"]), ValueError,
                     r"target module 'model.embed_tokens' is a Embedding; mtpeft adapts torch.nn.Linear"),
    "modules_to_save_match_nothing": ("llama", mtpeft.LoraConfig(modules_to_save=["headz"]), ValueError,
                                      r"modules_to_save entry 'headz' matches no module of the model"),
    "no_default_targets": (_NoDefaults, mtpeft.LoraConfig(), ValueError,
                           r"no default target_modules for model type None.*\['proj'\]"),
    "n_splits_first_layer": ("llama", mtpeft.PolyConfig(n_tasks=2, n_splits=3), ValueError,
                             r"n_splits=3 cuts every skill into 3 blocks.*q_proj.*in_features=32 and "
                             r"out_features=32, which 3 does not divide"),
    # q_proj (32 -> 32) takes 32 splits, k_proj (32 -> 16) does not: refused after q_proj was replaced
    "n_splits_later_layer": ("llama", mtpeft.PolyConfig(n_tasks=2, n_splits=32, target_modules="all-linear"),
                             ValueError, r"n_splits=32 .*'model.layers.0.self_attn.k_proj' has in_features=32 and "
                                         r"out_features=16.*one of \[1, 2, 4, 8, 16\]"),
    "cpoly_n_splits": ("llama", mtpeft.CPolyConfig(n_tasks=2, n_splits=32, target_modules="all-linear"),
                       ValueError, r"CPolyConfig.n_splits=32"),
    "config_is_not_a_config": ("llama", {"r": 8}, TypeError, r"config must be an mtpeft method config"),
}


@pytest.mark.parametrize("case", list(TARGETS))
def test_bad_targets_leave_the_base_model_untouched(case):
    builder, config, error, match = TARGETS[case]
    base = BUILDERS[builder]() if isinstance(builder, str) else builder()
    refused(lambda: mtpeft.get_model(base, config), error, match, base)


def test_wrapping_a_wrapped_model():
    model = wrapped()
    refused(lambda: mtpeft.get_model(model, mtpeft.LoraConfig()), TypeError, r"already wrapped by mtpeft", model)


def test_merging_a_token_routed_method():
    model = wrapped(mtpeft.HydraLoraConfig(n_experts=2, r=2))
    refused(lambda: model.merge(), TypeError, r"hydralora cannot be merged or exported as a plain LoRA.*router", model)


# ----------------------------------------------------------------------------------- labels at the model
@pytest.mark.parametrize("labels, match", [
    ([0, 5, 1, 0], r"label 5 does not fit task 'b', whose head has 3 classes \(labels 0..2\)"),
    ([0, 1, -1, 0], r"label -1 does not fit task 'a', whose head has 2 classes"),
], ids=["too_large", "negative"])
def test_labels_out_of_range_at_the_model(labels, match):
    encoder = BUILDERS["bert"]()
    torch.manual_seed(0)
    model = mtpeft.get_model(MultiTaskEncoderClassifier(encoder, [2, 3], ["a", "b"]),
                             mtpeft.TaskLoraConfig(r=2, n_tasks=2, modules_to_save=["heads"]))
    model.train()
    b = batch_for("bert")
    refused(lambda: model(**b, labels=torch.tensor(labels), task_ids=torch.tensor([0, 1, 0, 1])),
            ValueError, match, model)


# ----------------------------------------------------------------------------------- data and training
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from dist_worker import make_fixture

    root = tmp_path_factory.mktemp("tiny")
    folder, tasks = make_fixture(root)
    return root, folder, tasks


def run_dict(tiny, out, method="lora", steps=6, **train) -> dict:
    from dist_worker import tiny_run_dict

    _, folder, tasks = tiny
    data = tiny_run_dict(folder, tasks, out, method=method, steps=steps)
    data["train"].update(train)
    return data


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"json:{path}"


def _bad_data(tiny, tmp_path, case):
    _, _, tasks = tiny
    good = tasks[0]
    if case == "unknown_task_name":
        return ["bbc_newz"], UnknownTaskError, r"Unknown task 'bbc_newz'. Did you mean 'bbc_news'\?"
    if case == "unknown_task_field":
        return [{**good, "labls": ["0", "1"]}], TaskSpecError, r"Unknown task field 'labls'.*Did you mean 'labels'"
    if case == "no_tasks":
        return [], ValueError, r"data.tasks is empty"
    if case == "empty_dataset":
        (tmp_path / "empty.json").write_text("")
        return ([good, {"name": "empty", "source": f"json:{tmp_path / 'empty.json'}"}], TaskDataError,
                r"Task 'empty': source .* gave no examples")
    if case == "missing_data_file":
        return ([good, {"name": "gone", "source": f"json:{tmp_path / 'gone.json'}"}], TaskDataError,
                r"Task 'gone': data file .*gone.json' does not exist")
    if case == "label_out_of_range":
        source = _jsonl(tmp_path / "five.json", [{"text": f"t{i}", "label": i % 5} for i in range(20)])
        return ([good, {"name": "five", "source": source, "labels": ["0", "1"]}], TaskDataError,
                r"Task 'five': label 2 is out of range for its 2 labels")
    if case == "unknown_label_name":
        source = _jsonl(tmp_path / "yn.json", [{"text": f"t{i}", "label": ["yes", "no", "maybe"][i % 3]}
                                               for i in range(12)])
        return ([good, {"name": "yn", "source": source, "labels": ["no", "yes"]}], TaskDataError,
                r"Task 'yn': label 'maybe' is not one of its labels")
    if case == "missing_text_column":
        source = _jsonl(tmp_path / "col.json", [{"sentence": f"t{i}", "label": i % 2} for i in range(12)])
        return ([good, {"name": "col", "source": source}], TaskDataError,
                r"Task 'col': the examples have no text column 'text'.*sentence")
    if case == "not_classification_for_an_encoder":
        source = _jsonl(tmp_path / "gen.json", [{"text": f"t{i}", "target": str(i)} for i in range(12)])
        return ([good, {"name": "gen", "source": source, "kind": "generation", "metric": "exact_match"}],
                ValueError, r"tasks \['gen'\] are .*; an encoder model")
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["unknown_task_name", "unknown_task_field", "no_tasks", "empty_dataset",
                                  "missing_data_file", "label_out_of_range", "unknown_label_name",
                                  "missing_text_column", "not_classification_for_an_encoder"])
def test_bad_data_configs_fail_before_writing_anything(tiny, tmp_path, case):
    tasks, error, match = _bad_data(tiny, tmp_path, case)
    out = tmp_path / "run"
    data = run_dict(tiny, out)
    data["data"]["tasks"] = tasks
    run = run_config_from_dict(data)
    refused(lambda: train_run(run, log=lambda *a: None), error, match, out, tiny[0])


@pytest.mark.parametrize("data, match", [
    ({"trian": {}}, r"unknown config key 'trian'. Did you mean 'train'"),
    ({"train": {"stpes": 3}}, r"unknown config key train.'stpes'. Did you mean 'steps'"),
    ({"method": "teamlor"}, r"unknown method 'teamlor'. Did you mean 'teamlora'"),
    ({"adapter": {"r": 0}}, r"r must be a positive integer"),
    ({"adapter": {"n_expert": 2}}, r"unknown config key adapter.'n_expert'. Did you mean 'n_experts'"),
    ({"train": {"steps": "many"}}, r"train.steps must be an integer, got 'many'"),
    ({"train": {"lr": [0.1]}}, r"train.lr must be a number, got \[0.1\]"),
    ({"adapter": {"lora_dropout": "high"}}, r"adapter.lora_dropout must be a number, got 'high'"),
], ids=["misspelt_section", "misspelt_key", "unknown_method", "bad_adapter_value", "misspelt_adapter_field",
        "steps_not_a_number", "lr_not_a_number", "adapter_field_not_a_number"])
def test_bad_run_configs(tiny, tmp_path, data, match):
    out = tmp_path / "run"

    def build_and_run():
        merged = run_dict(tiny, out, method="teamlora")
        for key, value in data.items():
            merged[key] = {**merged[key], **value} if isinstance(value, dict) and key in merged else value
        train_run(run_config_from_dict(merged), log=lambda *a: None)

    refused(build_and_run, ValueError, match, out, tiny[0])


class Poison(TrainerCallback):
    """Set every lora_B to ``value`` at the end of step ``step`` (after its optimizer update)."""

    def __init__(self, step: int, value=float("nan")):
        self.step, self.value = step, value

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.fill_(self.value)


def _assert_good_checkpoint(tiny, checkpoint: Path):
    """COMPLETE, loadable both ways, and finite."""
    from mtpeft.app.base_models import build_base
    from mtpeft.app.pipeline import build_model, load_run_tasks

    assert (checkpoint / "COMPLETE").exists()
    tensors = load_file(str(checkpoint / "adapter_model.safetensors"))
    assert tensors and all(torch.isfinite(v).all() for v in tensors.values())
    run = run_config_from_dict(run_dict(tiny, checkpoint.parent))
    tasks = load_run_tasks(run)
    model, _, _ = build_model(run, tasks)
    load_adapter_weights(model, checkpoint)
    base, _ = build_base(run.model.name, "encoder", tasks)
    loaded = mtpeft.MultiTaskModel.from_pretrained(base, checkpoint)
    for key, value in loaded.adapter_state_dict().items():
        assert torch.equal(value, tensors[key]), key


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    """Weights poisoned after step 3: the step-4 loss is NaN. Checked every step, before the optimizer
    update: with the old check at logging steps only (logging_steps=5) the run went on, saved NaN
    checkpoints 4, 6 and 8 (the Trainer's default logging_nan_inf_filter kept the logged loss finite) and
    finished with a NaN adapter."""
    out = tmp_path / "run"
    run = run_config_from_dict(run_dict(tiny, out, steps=8, save_steps=2, logging_steps=5,
                                        save_total_limit=None))
    err = refused(lambda: train_run(run, log=lambda *a: None, callbacks=[Poison(3)]), NonFiniteLossError,
                  r"the training loss became nan at step 4; training stopped before saving anything from it "
                  r"\(the last good checkpoint is .*checkpoint-2\). Lower the learning rate", tiny[0])
    assert isinstance(err, RuntimeError)
    assert complete_checkpoints(out) == [out / "checkpoint-2"]
    assert not (out / "checkpoint-4").exists() and not (out / "adapter").exists()
    _assert_good_checkpoint(tiny, out / "checkpoint-2")
    # The run resumes from it (here without the poison) and finishes.
    train_run(run, evaluate=False, log=lambda *a: None)
    final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values())


def test_inf_loss_stops_training(tiny, tmp_path, monkeypatch):
    original = MultiTaskTrainer.compute_loss

    def inf_at_step_3(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = original(self, model, inputs, return_outputs, num_items_in_batch)
        if self.state.global_step == 2:  # the third step
            return (result[0] * float("inf"), result[1]) if return_outputs else result * float("inf")
        return result

    monkeypatch.setattr(MultiTaskTrainer, "compute_loss", inf_at_step_3)
    out = tmp_path / "run"
    run = run_config_from_dict(run_dict(tiny, out, steps=6, save_steps=2, logging_steps=5))
    refused(lambda: train_run(run, log=lambda *a: None), NonFiniteLossError,
            r"the training loss became inf at step 3.*last good checkpoint is .*checkpoint-2", tiny[0])
    assert complete_checkpoints(out) == [out / "checkpoint-2"]
    _assert_good_checkpoint(tiny, out / "checkpoint-2")


def test_cli_reports_a_diverged_run_in_one_line(tiny, tmp_path, capsys):
    """`mtpeft train` with a learning rate that blows the weights up: exit code 2 and the trainer's
    message, not a traceback; the checkpoint before the divergence stays."""
    import yaml

    from mtpeft.app.cli import main

    out = tmp_path / "run"
    config = tmp_path / "diverge.yaml"
    config.write_text(yaml.safe_dump(run_dict(tiny, out, steps=6, save_steps=1, logging_steps=5)))
    assert main(["train", str(config), "train.lr=1e30", "train.warmup_ratio=0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "mtpeft train: error: " in err and "Lower the learning rate" in err
    assert complete_checkpoints(out) and not (out / "adapter").exists()


def test_non_finite_parameters_are_never_saved(tiny, tmp_path):
    """A finite loss with NaN parameters (poisoned after step 4's update, before its checkpoint): the
    checkpoint is refused; the previous one stays the last good one."""
    out = tmp_path / "run"
    run = run_config_from_dict(run_dict(tiny, out, steps=6, save_steps=2, logging_steps=1))
    refused(lambda: train_run(run, log=lambda *a: None, callbacks=[Poison(4, float("inf"))]), NonFiniteLossError,
            r"trained parameters became NaN or Inf \(base_model\..*lora_B.*\) at step 4.*last good checkpoint is "
            r".*checkpoint-2", tiny[0])
    assert complete_checkpoints(out) == [out / "checkpoint-2"] and not (out / "checkpoint-4").exists()
    _assert_good_checkpoint(tiny, out / "checkpoint-2")
