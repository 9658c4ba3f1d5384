"""Task registry and loading: real BIG-bench and BBC data, local files through `datasets`, splits.

No example text of BIG-bench or BBC appears here (canary / licence): only counts and label sets.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from mtpeft.app.data import (  # noqa: E402
    TaskDataError,
    TaskSpec,
    TaskSpecError,
    UnknownBigBenchTaskError,
    UnknownTaskError,
    get_task,
    list_tasks,
    load_bigbench_examples,
    load_task,
    prefetch_bigbench_tasks,
    read_bigbench_task,
    register_task,
    task_from_dict,
)
from mtpeft.app.data.bigbench import bigbench_task_names  # noqa: E402

BUILTINS = {"bbc_news", "multiemo", "intent_recognition", "vitaminc_fact_verification", "social_iqa",
            "elementary_math_qa", "sports_understanding", "arithmetic", "fact_checker_fever", "winowhy"}
BB_TASKS = ["intent_recognition", "multiemo/all_text_en", "social_iqa", "arithmetic/*", "sports_understanding"]


@pytest.fixture(scope="module", autouse=True)
def _bigbench_once():
    """Pull every BIG-bench task these tests read out of the tarball in one pass (cached afterwards)."""
    prefetch_bigbench_tasks(BB_TASKS)


def _ids(examples):
    return {id(e) for e in examples}


# -- registry ---------------------------------------------------------------------------------------

def test_builtin_tasks_are_registered():
    assert BUILTINS <= set(list_tasks())
    assert get_task("arithmetic").kind == "generation"
    assert get_task("social_iqa").kind == "multiple_choice"
    assert get_task("vitaminc_fact_verification").max_examples == 3000


def test_unknown_task_lists_known_names_and_nearest():
    with pytest.raises(UnknownTaskError) as info:
        get_task("bbc_new")
    assert isinstance(info.value, KeyError)
    msg = str(info.value)
    assert "Did you mean 'bbc_news'" in msg
    for name in BUILTINS:
        assert name in msg


def test_get_task_returns_a_copy():
    spec = get_task("bbc_news")
    spec.max_examples = 5
    assert get_task("bbc_news").max_examples is None


def test_register_task_refuses_silent_overwrite():
    spec = TaskSpec("tmp_registered_task", "json:/nowhere.jsonl")
    register_task(spec)
    with pytest.raises(TaskSpecError, match="already registered"):
        register_task(spec)
    register_task(TaskSpec("tmp_registered_task", "csv:/nowhere.csv"), overwrite=True)
    assert get_task("tmp_registered_task").source == "csv:/nowhere.csv"


def test_task_from_dict_misspelt_key_names_it_and_suggests():
    with pytest.raises(TaskSpecError) as info:
        task_from_dict({"name": "x", "source": "json:a.jsonl", "lables": ["a", "b"]})
    assert "'lables'" in str(info.value) and "'labels'" in str(info.value)


def test_task_from_dict_builds_and_overrides_builtins():
    spec = task_from_dict({"name": "mine", "source": "csv:data.csv", "kind": "generation", "metric": "exact_match"})
    assert (spec.kind, spec.metric, spec.template) == ("generation", "exact_match", "{input}")
    over = task_from_dict({"name": "bbc_news", "max_examples": 100})
    assert over.source == "bbc_news" and over.max_examples == 100
    assert task_from_dict("social_iqa").kind == "multiple_choice"
    with pytest.raises(TaskSpecError, match="no 'source'"):
        task_from_dict({"name": "not_a_builtin"})


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"kind": "clasification"}, "Did you mean 'classification'"),
        ({"metric": "acuracy"}, "Did you mean 'accuracy'"),
        ({"kind": "generation", "metric": "accuracy"}, "does not fit kind"),
        ({"source": "jsn:file.json"}, "Did you mean 'json'"),
        ({"template": "no field"}, "uses no field"),
        ({"max_examples": 0}, "max_examples"),
    ],
)
def test_bad_specs_are_explained(kwargs, needle):
    with pytest.raises(TaskSpecError, match=needle):
        TaskSpec(**{"name": "t", "source": "json:f.jsonl", **kwargs})


# -- BIG-bench -------------------------------------------------------------------------------------

def test_bigbench_intent_recognition_has_7_labels():
    data = load_task("intent_recognition")
    assert data.num_labels == 7
    everything = data.train + data.validation + data.test
    assert len(everything) == 693
    assert {e["label"] for e in everything} == set(range(7))
    assert all(isinstance(e["text"], str) and e["text"] for e in everything)
    assert data.instruction  # BIG-bench task_prefix becomes the instruction


def test_bigbench_multiemo_has_4_sentiment_labels():
    data = load_task("multiemo")
    assert data.labels == ["ambivalent", "negative", "neutral", "positive"]
    assert len(data.train) + len(data.validation) + len(data.test) == 8215


def test_bigbench_multiple_choice_and_generation():
    mc = load_task("social_iqa")
    assert len(mc.train) + len(mc.validation) + len(mc.test) == 1954
    for e in mc.train:
        assert len(e["choices"]) >= 2 and 0 <= e["label"] < len(e["choices"])
    positions = {e["label"] for e in mc.train}
    assert len(positions) >= 3  # answers are shuffled over the positions, not all in one place
    gen = load_task("arithmetic")  # all 20 subtasks joined
    assert len(gen.train) > 10_000
    assert all(isinstance(e["target"], str) and e["target"] == e["references"][0] for e in gen.train)


def test_bigbench_task_with_per_example_choices_is_not_classification():
    with pytest.raises(TaskDataError, match="multiple_choice"):
        load_task(TaskSpec("siqa_cls", "bigbench:social_iqa", kind="classification"))


def test_bigbench_unknown_and_parent_tasks_are_explained():
    with pytest.raises(UnknownBigBenchTaskError) as info:
        load_bigbench_examples("intent_recogniton")
    assert "intent_recognition" in str(info.value)
    with pytest.raises(UnknownBigBenchTaskError) as info:
        load_bigbench_examples("multiemo")  # a parent: only its subtasks have examples
    assert "110 subtasks" in str(info.value) and "multiemo/all_" in str(info.value) and "multiemo/*" in str(info.value)
    with pytest.raises(UnknownBigBenchTaskError, match="Close names"):
        load_task(TaskSpec("x", "bigbench:sports_understandin"))


def test_bigbench_fresh_cache_scan_then_offsets(tmp_path):
    """A fresh cache: the first read builds the index in the same pass; the next reads use offsets."""
    from mtpeft.app.assets import bigbench_tarball

    link = tmp_path / "bigbench-1.0.0.tar.gz"
    link.symlink_to(bigbench_tarball())
    task = read_bigbench_task("sports_understanding", tarball=link)
    assert len(task["examples"]) == 1000
    assert (tmp_path / "bigbench-1.0.0.tar.gz.index.json").is_file()
    assert (tmp_path / "tasks" / "sports_understanding" / "task.json").is_file()
    assert len(bigbench_task_names(tarball=link)) > 200
    joined = load_bigbench_examples("arithmetic/*", tarball=link)  # offsets path: 20 files, one pass
    assert len(list((tmp_path / "tasks" / "arithmetic").glob("*/task.json"))) == 20
    assert len(joined) == len(load_bigbench_examples("arithmetic/*"))


# -- BBC News --------------------------------------------------------------------------------------

def test_bbc_news_loads_5_labels_2225_docs():
    data = load_task("bbc_news")
    assert data.labels == ["business", "entertainment", "politics", "sports", "tech"]
    assert data.spec.metric == "macro_f1"
    assert len(data.train) + len(data.validation) + len(data.test) == 2225
    assert {e["label"] for e in data.train} == set(range(5))


# -- splits ----------------------------------------------------------------------------------------

def test_splits_are_disjoint_sized_and_deterministic():
    a = load_task("intent_recognition", seed=3, val_fraction=0.2, test_fraction=0.1)
    assert (len(a.train), len(a.validation), len(a.test)) == (693 - 139 - 69, 139, 69)
    assert not (_ids(a.train) & _ids(a.validation)) and not (_ids(a.train) & _ids(a.test))
    assert not (_ids(a.validation) & _ids(a.test))
    b = load_task("intent_recognition", seed=3, val_fraction=0.2, test_fraction=0.1)
    assert [e["text"] for e in a.test] == [e["text"] for e in b.test]
    assert a.train == b.train
    c = load_task("intent_recognition", seed=4, val_fraction=0.2, test_fraction=0.1)
    assert [e["text"] for e in c.test] != [e["text"] for e in a.test]


def test_max_examples_subsamples_deterministically():
    spec = task_from_dict({"name": "sports_understanding", "max_examples": 200})
    a, b = load_task(spec, seed=1), load_task(spec, seed=1)
    assert len(a.train) + len(a.validation) + len(a.test) == 200
    assert a.test == b.test


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="val_fraction"):
        load_task("sports_understanding", val_fraction=1.2)
    with pytest.raises(ValueError, match="< 1"):
        load_task("sports_understanding", val_fraction=0.5, test_fraction=0.5)


# -- local files through datasets ---------------------------------------------------------------------

def _jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_string_labels_map_in_sorted_order(tmp_path):
    rows = [{"sentence": f"s{i}", "tag": tag} for i, tag in enumerate(["pos", "neg", "neu"] * 10)]
    f = _jsonl(tmp_path / "d.jsonl", rows)
    spec = TaskSpec("local", f"json:{f}", text_field="sentence", label_field="tag")
    data = load_task(spec, cache_dir=tmp_path / "cache")
    assert data.labels == ["neg", "neu", "pos"]
    by_text = {e["text"]: e["label"] for e in data.train + data.validation + data.test}
    assert by_text["s0"] == 2 and by_text["s1"] == 0 and by_text["s2"] == 1
    assert len(by_text) == 30 and (len(data.validation), len(data.test)) == (3, 3)


def test_csv_int_label_out_of_range_names_task_and_label(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("text,label\n" + "".join(f"t{i},{i % 3}\n" for i in range(12)))
    spec = TaskSpec("three_way_csv", f"csv:{f}", labels=["a", "b"])
    with pytest.raises(TaskDataError) as info:
        load_task(spec, cache_dir=tmp_path / "cache")
    assert "three_way_csv" in str(info.value) and "label 2" in str(info.value)
    ok = load_task(TaskSpec("three_way_csv", f"csv:{f}", labels=["a", "b", "c"]), cache_dir=tmp_path / "cache")
    assert ok.num_labels == 3


def test_string_label_not_in_given_labels(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": lab} for i, lab in enumerate(["yes", "no", "maybe"] * 4)])
    with pytest.raises(TaskDataError, match=r"yesno_task.*'maybe'"):
        load_task(TaskSpec("yesno_task", f"json:{f}", labels=["no", "yes"]), cache_dir=tmp_path / "cache")


def test_parquet_multiple_choice_and_json_generation(tmp_path):
    import datasets

    pq = tmp_path / "mc.parquet"
    datasets.Dataset.from_list(
        [{"q": f"q{i}", "options": ["x", "y", "z"], "answer": i % 3} for i in range(20)]
    ).to_parquet(str(pq))
    mc = load_task(TaskSpec("mc", f"parquet:{pq}", kind="multiple_choice", text_field="q",
                            choices_field="options", label_field="answer"), cache_dir=tmp_path / "c")
    assert all(e["choices"] == ["x", "y", "z"] and e["label"] == int(e["text"][1:]) % 3 for e in mc.train)

    gen_f = _jsonl(tmp_path / "g.jsonl", [{"question": f"{i}+1", "answer": str(i + 1)} for i in range(10)])
    gen = load_task(TaskSpec("gen", f"json:{gen_f}", kind="generation", metric="exact_match", text_field="question",
                             target_field="answer", template="Compute {input}"), cache_dir=tmp_path / "c")
    for e in gen.train:
        assert e["text"].startswith("Compute ") and e["target"] == str(int(e["text"].split()[1].split("+")[0]) + 1)


def test_template_with_several_fields_and_missing_field(tmp_path):
    f = _jsonl(tmp_path / "nli.jsonl", [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 2} for i in range(10)])
    spec = TaskSpec("nli", f"json:{f}", text_field="premise", template="{premise} || {hypothesis}")
    data = load_task(spec, cache_dir=tmp_path / "c")
    assert all(e["text"] == f"p{e['text'][1:].split(' ')[0]} || h{e['text'][1:].split(' ')[0]}" for e in data.train)
    bad = TaskSpec("nli_bad", f"json:{f}", text_field="premise", template="{premise} {hypotesis}")
    with pytest.raises(TaskDataError, match="hypotesis"):
        load_task(bad, cache_dir=tmp_path / "c")


def test_missing_column_empty_file_and_missing_file(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"sentence": f"s{i}", "label": 0} for i in range(10)])
    with pytest.raises(TaskDataError, match=r"no text column 'text'.*sentence"):
        load_task(TaskSpec("nocol", f"json:{f}"), cache_dir=tmp_path / "c")
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(TaskDataError, match="no examples"):
        load_task(TaskSpec("empty_task", f"csv:{empty}"), cache_dir=tmp_path / "c")
    with pytest.raises(TaskDataError, match="does not exist"):
        load_task(TaskSpec("gone", f"json:{tmp_path / 'gone.jsonl'}"), cache_dir=tmp_path / "c")


def test_hf_saved_folder_with_classlabel_and_split(tmp_path):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["zeta", "alpha"])})  # not sorted on purpose
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(20)], "label": [i % 2 for i in range(20)]}, features=features),
        "test": datasets.Dataset.from_dict({"text": ["x", "y"], "label": [0, 1]}, features=features),
    })
    dd.save_to_disk(str(tmp_path / "saved"))
    data = load_task(TaskSpec("saved", f"hf:{tmp_path / 'saved'}", split="train"), cache_dir=tmp_path / "c")
    assert data.labels == ["zeta", "alpha"]  # the ClassLabel's names, in its order
    assert len(data.train) + len(data.validation) + len(data.test) == 20
    pooled = load_task(TaskSpec("saved_all", f"hf:{tmp_path / 'saved'}"), cache_dir=tmp_path / "c")
    assert len(pooled.train) + len(pooled.validation) + len(pooled.test) == 22
    with pytest.raises(TaskDataError, match=r"split 'dev'.*\['test', 'train'\]"):
        load_task(TaskSpec("saved_dev", f"hf:{tmp_path / 'saved'}", split="dev"), cache_dir=tmp_path / "c")


def test_hf_source_unreachable_offline_is_explained(tmp_path):
    with pytest.raises(TaskDataError, match="could not load"):
        load_task(TaskSpec("remote", "hf:surely-not/a-dataset-xyz"), cache_dir=tmp_path / "c")
