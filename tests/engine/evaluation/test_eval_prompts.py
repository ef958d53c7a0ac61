"""Prompt sets in their published formats, and one clear error per bad file."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sail.engine.data.pickapic import DataError
from sail.engine.evaluation.prompts import HPS_STYLES, read_benchmark


def write_parti(path, rows, header="Prompt\tCategory\tChallenge\tNote"):
    path.write_text("\n".join([header] + ["\t".join(r) for r in rows]) + "\n", encoding="utf-8")
    return str(path)


def write_hps(folder, per_style=3):
    folder.mkdir(exist_ok=True)
    for s in HPS_STYLES:
        (folder / f"{s}.json").write_text(json.dumps([f"{s} prompt {i}" for i in range(per_style)]))
    return str(folder)


def test_pickapic_unique_captions_in_file_order(tmp_path):
    folder = tmp_path / "val"
    folder.mkdir()
    pq.write_table(pa.table({"caption": ["b cat", "a dog", "b cat", " c "], "label_0": [1.0, 0.0, 1.0, 0.5]}),
                   folder / "validation_unique-0.parquet")
    pq.write_table(pa.table({"caption": ["a dog", "d"]}), folder / "validation_unique-1.parquet")
    ps = read_benchmark("pickapic", str(folder))
    assert ps.prompts == ["b cat", "a dog", "c", "d"] and ps.categories is None


def test_parti_prompts_and_categories(tmp_path):
    path = write_parti(tmp_path / "PartiPrompts.tsv", [["a red cat", "Animals", "Colors", ""],
                                                       ["a city at night", "World Knowledge", "Basic", "n"]])
    ps = read_benchmark("parti", path)
    assert ps.prompts == ["a red cat", "a city at night"] and ps.categories == ["Animals", "World Knowledge"]
    assert ps.head(1).prompts == ["a red cat"] and ps.head(1).categories == ["Animals"]


def test_hpsv2_four_styles(tmp_path):
    ps = read_benchmark("hpsv2", write_hps(tmp_path / "hps"))
    assert len(ps.prompts) == 12 and ps.categories[:3] == ["anime"] * 3 and ps.categories[-1] == "photo"
    assert ps.prompts[3] == "concept-art prompt 0"


@pytest.mark.parametrize("case,match", [
    ("parti_no_column", r"parti: .*bad.tsv: no 'Prompt' column"),
    ("parti_empty_prompt", r"parti: .*bad.tsv: row 3: empty or missing prompt"),
    ("pickapic_no_caption", r"pickapic: .*bad.parquet: no 'caption' column"),
    ("pickapic_empty_caption", r"pickapic: .*bad.parquet: row 1: empty or missing prompt"),
    ("pickapic_not_parquet", r"pickapic: .*bad.parquet: cannot read parquet"),
    ("hps_bad_json", r"hpsv2: .*paintings.json: cannot read the style's JSON list \(JSONDecodeError"),
    ("hps_missing_style", r"hpsv2: .*photo.json: cannot read"),
    ("hps_not_a_list", r"hpsv2: .*anime.json: expected a JSON list"),
])
def test_bad_files_give_one_clear_error(tmp_path, case, match):
    if case == "parti_no_column":
        path = write_parti(tmp_path / "bad.tsv", [["x", "y", "z", "w"]], header="Text\tCategory\tChallenge\tNote")
    elif case == "parti_empty_prompt":
        path = write_parti(tmp_path / "bad.tsv", [["ok", "A", "", ""], ["  ", "B", "", ""]])
    elif case.startswith("pickapic"):
        path = str(tmp_path / "bad.parquet")
        if case == "pickapic_no_caption":
            pq.write_table(pa.table({"prompt": ["a"]}), path)
        elif case == "pickapic_empty_caption":
            pq.write_table(pa.table({"caption": ["a", ""]}), path)
        else:
            (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    else:
        path = write_hps(tmp_path / "hps")
        if case == "hps_bad_json":
            (tmp_path / "hps" / "paintings.json").write_text('["a", ')
        elif case == "hps_missing_style":
            (tmp_path / "hps" / "photo.json").unlink()
        else:
            (tmp_path / "hps" / "anime.json").write_text('{"a": 1}')
    with pytest.raises(DataError, match=match):
        read_benchmark(case.split("_")[0].replace("hps", "hpsv2"), path)


def test_unknown_benchmark_and_missing_path():
    with pytest.raises(DataError, match="unknown 'coco'"):
        read_benchmark("coco", "x")
    with pytest.raises(DataError, match="set eval.benchmarks.parti"):
        read_benchmark("parti", None)
