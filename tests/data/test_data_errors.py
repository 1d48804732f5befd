"""Bad input is a ConfigError naming the option/file and what was expected, before any work starts."""

from __future__ import annotations

import json

import pytest

import mlmega.cli.main
from mlmega.config.errors import ConfigError
from mlmega.data import PrepareOptions, Tokenizer, prepare


def _opts(tmp_path, **kw) -> PrepareOptions:
    kw.setdefault("inputs", [str(tmp_path / "ok.txt")])
    kw.setdefault("doc_mode", "paragraph")
    kw.setdefault("vocab_size", 300)
    return PrepareOptions(out=tmp_path / "out", **kw)


@pytest.fixture
def tmp(tmp_path):
    (tmp_path / "ok.txt").write_text("One paragraph.\n\nAnother paragraph.\n\nA third one.\n")
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    (tmp_path / "one.txt").write_text("just one document")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "notjson.json").write_text("{not json")
    (tmp_path / "subdir").mkdir()
    (tmp_path / "rows.jsonl").write_text('{"text": "a b"}\n\n{"text": "c d"}\n')
    (tmp_path / "badline.jsonl").write_text('{"text": "a b"}\n{"text": "c\n')
    (tmp_path / "nofield.jsonl").write_text('{"text": "a b"}\n{"body": "c d", "n": 1}\n')
    (tmp_path / "number.jsonl").write_text('{"text": "a b"}\n{"text": 3}\n')
    (tmp_path / "list.jsonl").write_text('["a b"]\n')
    (tmp_path / "broken.parquet").write_text("not parquet")
    (tmp_path / "notds").mkdir()
    (tmp_path / "notds" / "x.txt").write_text("x")
    return tmp_path


CASES = [
    (dict(inputs=["{d}/missing.txt"]), r"--input '.*missing\.txt': no such file"),
    (dict(inputs=["{d}/*.nothing"]), r"--input '.*\*\.nothing': the glob matches no file"),
    (dict(inputs=["{d}/subdir"]), r"--input '.*subdir': is a directory; expected a text file or a glob"),
    (dict(inputs=["{d}/blank.txt"]), r"--input .*blank\.txt: the corpus is empty"),
    (dict(inputs=["{d}/one.txt"]), r"only 1 document; need at least 2"),
    (dict(inputs=["{d}/latin1.txt"]), r"--input .*latin1\.txt: not UTF-8 text"),
    (dict(inputs=["{d}/badline.jsonl"]), r"--input .*badline\.jsonl:2: not a JSON line"),
    (dict(inputs=["{d}/nofield.jsonl"]),
     r"--input .*nofield\.jsonl:2: no field 'text' \(--text-field\); the record has \['body', 'n'\]"),
    (dict(inputs=["{d}/number.jsonl"]), r"--input .*number\.jsonl:2: field 'text' holds int values; expected strings"),
    (dict(inputs=["{d}/list.jsonl"]), r"--input .*list\.jsonl:1: expected a JSON object, got list"),
    (dict(inputs=["{d}/rows.jsonl"], text_field="body"), r"--input .*rows\.jsonl:1: no field 'body'"),
    (dict(inputs=["{d}/broken.parquet"]), r"--input .*broken\.parquet: not a readable Parquet file"),
    (dict(inputs=[], hf_dataset="{d}/nowhere"), r"--hf-dataset .*nowhere: no such directory"),
    (dict(inputs=[], hf_dataset="{d}/notds"), r"--hf-dataset .*notds: cannot be read with datasets.load_from_disk"),
    (dict(hf_dataset="{d}/notds"), r"--input and --hf-dataset: give one source, not both"),
    (dict(vocab_file="{d}/ok.txt"), r"--vocab-file: needs --merges-file as well"),
    (dict(merges_file="{d}/ok.txt"), r"--merges-file: needs --vocab-file as well"),
    (dict(vocab_file="{d}/notjson.json", merges_file="{d}/ok.txt"), r"--vocab-file .*notjson\.json: expected a GPT-2 vocab\.json"),
    (dict(vocab_file="{d}/nope.json", merges_file="{d}/ok.txt"), r"--vocab-file .*nope\.json: no such file"),
    (dict(tokenizer="{d}/missing.json"), r"--tokenizer .*missing\.json: no such file \(expected 'train' or a tokenizer\.json\)"),
    (dict(tokenizer="{d}/notjson.json"), r"--tokenizer .*notjson\.json: not a tokenizers JSON file"),
    (dict(val_fraction=0.0), r"--val-fraction 0\.0: expected a fraction strictly between 0 and 1"),
    (dict(val_fraction=1.0), r"--val-fraction 1\.0: expected a fraction strictly between 0 and 1"),
    (dict(vocab_size=100), r"--vocab-size 100: expected at least 262"),
    (dict(arch="t5"), r"--arch 't5': expected one of gpt, bert"),
    (dict(doc_mode="sentence"), r"--doc-mode 'sentence': expected one of"),
    (dict(doc_mode="lines", doc_lines=0), r"--doc-lines 0: expected a positive number"),
]


@pytest.mark.parametrize("kw,message", CASES, ids=[m.split(":")[0][:40] for _, m in CASES])
def test_bad_input_is_a_config_error(tmp, kw, message):
    kw = {k: ([v.format(d=tmp) for v in val] if isinstance(val, list) else
              val.format(d=tmp) if isinstance(val, str) else val) for k, val in kw.items()}
    with pytest.raises(ConfigError, match=message):
        prepare(_opts(tmp, **kw))
    assert not (tmp / "out" / "meta.json").exists()


def test_hf_dataset_checks_field_and_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a b", "c d"], "n": [1, 2]})
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ConfigError, match=r"--text-field 'body': not a column of .*; expected one of \['text', 'n'\]"):
        prepare(_opts(tmp_path, inputs=[], hf_dataset=str(tmp_path / "single"), text_field="body"))
    with pytest.raises(ConfigError, match=r"--text-field 'n': column of .* has type .*int64.*; expected a string column"):
        prepare(_opts(tmp_path, inputs=[], hf_dataset=str(tmp_path / "single"), text_field="n"))
    with pytest.raises(ConfigError, match=r"holds splits \['train', 'test'\]; choose one with --hf-split"):
        prepare(_opts(tmp_path, inputs=[], hf_dataset=str(tmp_path / "dict")))
    with pytest.raises(ConfigError, match=r"--hf-split 'dev': not a split of .*expected one of \['train', 'test'\]"):
        prepare(_opts(tmp_path, inputs=[], hf_dataset=str(tmp_path / "dict"), hf_split="dev"))
    res = prepare(_opts(tmp_path, inputs=[], hf_dataset=str(tmp_path / "dict"), hf_split="test", doc_mode="auto"))
    assert res.meta["documents"] == 2
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    with pytest.raises(ConfigError, match=r"--text-field 'body': not a column of .*rows\.parquet; expected one of \['text', 'n'\]"):
        prepare(_opts(tmp_path, inputs=[str(tmp_path / "rows.parquet")], text_field="body"))


def test_cli_reports_config_error_with_exit_code_2(tmp, monkeypatch, capsys):
    monkeypatch.setattr(mlmega.cli.main, "COMMAND_MODULES", ["mlmega.cli.data"])
    code = mlmega.cli.main.main(["data", "prepare", "--input", str(tmp / "missing.txt"), "--out", str(tmp / "o")])
    assert code == 2
    assert "mlmega: error: --input" in capsys.readouterr().err


def test_cli_prepares_then_is_up_to_date(tmp, monkeypatch, capsys):
    monkeypatch.setattr(mlmega.cli.main, "COMMAND_MODULES", ["mlmega.cli.data"])
    argv = ["data", "prepare", "--input", str(tmp / "ok.txt"), "--doc-mode", "paragraph",
            "--vocab-size", "300", "--val-fraction", "0.3", "--out", str(tmp / "o"), "--arch", "bert"]
    assert mlmega.cli.main.main(argv) == 0
    out = capsys.readouterr().out
    assert "bert data" in out and "train 2 documents" in out and "val 1 documents" in out
    assert mlmega.cli.main.main(argv) == 0
    assert "up to date, nothing to do" in capsys.readouterr().out
    assert Tokenizer.load(tmp / "o" / "tokenizer.json").vocab_size <= 300


def test_bad_rerun_keeps_the_previous_preparation(tmp):
    good = prepare(_opts(tmp))
    (tmp / "ok.txt").write_text("\n\n")  # now empty
    with pytest.raises(ConfigError, match="the corpus is empty"):
        prepare(_opts(tmp))
    assert (tmp / "out" / "meta.json").is_file()  # the earlier, complete result is still valid
    assert json.loads((tmp / "out" / "meta.json").read_text())["content_hash"] == good.meta["content_hash"]
