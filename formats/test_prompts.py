"""--prompts in every form: a file of every format, a hub dataset id (placed in the temporary hub cache; conftest:
offline), demo; each converted once, streaming, into a cache that a run reads one prompt at a time."""
import csv
import hashlib
import json
import os
import sys

import pytest

from conftest import run
from formats import prompts
from harness.flags import UsageError

PROMPTS = ["a red fox in the snow", "café ☕ 東京, at night", "a red fox in the snow", 'a "quoted", comma, prompt']


def write(path, fmt, items=PROMPTS):
    """`items` as a prompt file of `fmt`, in the shapes people publish them in."""
    if fmt == "txt":
        text = "\n".join(f"  {p}  " for p in items[:2]) + "\n\n" + "\n".join(items[2:]) + "\n"
        open(path, "w", encoding="utf-8").write(text)
    elif fmt == "jsonl":
        rows = [p if i % 2 else {"Prompt": p, "seed": i} for i, p in enumerate(items)]
        open(path, "w", encoding="utf-8").write("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    elif fmt == "json list of strings":
        json.dump(items, open(path, "w", encoding="utf-8"), ensure_ascii=False)
    elif fmt == "json list of objects":
        json.dump([{"id": i, "caption": p} for i, p in enumerate(items)], open(path, "w", encoding="utf-8"))
    elif fmt == "json object of ids":
        json.dump({f"img{i}": p if i % 2 else {"text": p} for i, p in enumerate(items)}, open(path, "w"), indent=1)
    elif fmt == "json object wrapping a list":
        json.dump({"prompts": [{"prompt": p} for p in items]}, open(path, "w"))
    elif fmt == "csv":
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "Prompt", "url"])
            w.writerows([i, p, f"http://x/{i}"] for i, p in enumerate(items))
    elif fmt == "parquet":
        pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.table({"text": items, "n": list(range(len(items)))}), path, row_group_size=2)
    return str(path)


FORMATS = {"txt": ".txt", "jsonl": ".jsonl", "json list of strings": ".json", "json list of objects": ".json",
           "json object of ids": ".json", "json object wrapping a list": ".json", "csv": ".csv", "parquet": ".parquet"}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_gives_its_prompts_in_order_with_repeats(fmt, tmp_path, capsys):
    path = write(tmp_path / f"prompts{FORMATS[fmt]}", fmt)
    got = prompts.open_prompts(path)
    assert len(got) == 4 and got[:] == PROMPTS and [got[i] for i in range(4)] == PROMPTS and got[-1] == PROMPTS[-1]
    assert got.sha256 == hashlib.sha256("\n".join(PROMPTS).encode()).hexdigest()  # the checkpoint's prompt hash
    assert "converting" in capsys.readouterr().out
    assert prompts.open_prompts(path)[:] == PROMPTS and "converting" not in capsys.readouterr().out  # once
    with pytest.raises(IndexError):
        got[4]


def test_a_json_is_read_value_by_value_and_a_run_holds_no_list(tmp_path, monkeypatch):
    """A .json is never decoded whole: chunks of 7 bytes cut every value, and nothing decodes the whole text; the
    PromptList holds two open files, a few numbers and strings, no list."""
    many = [f"prompt {i} " + "é" * (1 + i % 5) for i in range(3000)]
    path = write(tmp_path / "many.json", "json list of objects", many)
    monkeypatch.setattr(prompts, "CHUNK", 7)
    real_loads = json.loads  # json.load calls it too
    monkeypatch.setattr(json, "loads", lambda text, **k: pytest.fail("the prompts were decoded whole")
                        if len(text) > 10_000 else real_loads(text, **k))  # the cache's info.json is small
    got = prompts.open_prompts(path)
    assert len(got) == 3000 and got[1234] == many[1234] and got[2990:] == many[2990:]
    assert not any(isinstance(v, (list, tuple, dict, set)) for v in vars(got).values())


@pytest.mark.parametrize("name, text, words", [
    ("number.json", "3", "holds a number at its top level"),
    ("empty.json", "", "holds nothing"),
    ("lists.json", "[[1, 2]]", "element 0 is a JSON list"),
    ("urls.json", '[{"url": "x", "width": 3}]', "fields url, width, none of prompt, text or caption"),
    ("ids.json", '{"a": 3}', "the value of 'a' is a number"),
    ("nested.json", '[{"prompt": {"en": "a"}}]', "its 'prompt' is a JSON object"),
    ("cut.json", '["a", "b', "is not valid JSON"),
    ("bad.jsonl", '"a"\n{"prompt": \n', "line 2 is not JSON"),
    ("urls.csv", "id,url\n1,x\n", "no prompt, text or caption column (its columns: id, url)"),
    ("blank.txt", "\n \n", "has no prompts"),
])
def test_a_file_that_fits_no_shape_gets_one_line_naming_what_was_found(name, text, words, tmp_path):
    (tmp_path / name).write_text(text)
    with pytest.raises(UsageError) as e:
        prompts.open_prompts(str(tmp_path / name))
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_parquet_without_pyarrow_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UsageError, match=r"reading \.parquet needs pyarrow \(pip install pyarrow\)"):
        prompts.open_prompts(str(tmp_path / "p.parquet"))


def place_dataset(repo_id, files, tmp_path):
    """A dataset repository in the hub cache, as huggingface_hub lays one out: {name: format}."""
    from huggingface_hub import constants
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    cached = os.path.join(constants.HF_HUB_CACHE, "datasets--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(cached, "snapshots", commit)
    for i, (name, fmt) in enumerate(files.items()):
        os.makedirs(os.path.dirname(os.path.join(snapshot, name)), exist_ok=True)
        write(os.path.join(snapshot, name), fmt, [f"{p} ({i})" for p in PROMPTS])
    os.makedirs(os.path.join(cached, "refs"))
    with open(os.path.join(cached, "refs", "main"), "w") as f:
        f.write(commit)


def test_a_hub_dataset_of_every_format_trains(sd_root, tmp_path, capsys):
    """A dataset id resolves through the hub cache like --model; its train files, of every format, are read in
    order (the README and the test split are not), and a run trains on them."""
    pytest.importorskip("pyarrow")
    repo = "someone/tiny-prompts"
    formats = {"data/train-0.txt": "txt", "data/train-1.jsonl": "jsonl", "data/train-2.json": "json list of objects",
               "data/train-3.csv": "csv", "data/train-4.parquet": "parquet", "data/test-0.txt": "txt",
               "README.md": "txt"}
    place_dataset(repo, formats, tmp_path)
    got = prompts.open_prompts(repo)
    assert got[:] == [f"{p} ({i})" for i in range(5) for p in PROMPTS]
    m, state, log = run(sd_root, tmp_path / "run", 2, prompts=repo)
    assert len(log) == 2 and len(m.prompts) == 20 and m.prompts[:] == got[:]
    assert json.load(open(tmp_path / "run" / "swiftbrush.json"))["config"]["prompts"] == repo


def test_a_hub_dataset_offline_and_not_cached_is_one_line(tmp_path):
    with pytest.raises(UsageError) as e:
        prompts.open_prompts("nobody/no-such-prompts")
    line = str(e.value)
    assert "hf download nobody/no-such-prompts --repo-type dataset" in line and "HF_HUB_OFFLINE" in line
    assert "hub cache" in line and "--prompts demo" in line and "\n" not in line
