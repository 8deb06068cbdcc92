"""`dina cache` input handling (issue 16, item 7): a missing image file and a prompt that is None are skipped and
reported like an unreadable image; a JSONL file that is not UTF-8 is a clear error naming the file and the row."""

import json

import pytest
from PIL import Image

from modeling_dina.cli import main
from modeling_dina.data import load_preference_data


@pytest.fixture
def rows(tmp_path) -> list[dict]:
    for name, colour in (("red.png", (220, 40, 40)), ("blue.png", (40, 40, 220))):
        Image.new("RGB", (32, 32), colour).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    return [{"prompt": f"a red circle {i}", "chosen": "red.png", "rejected": "blue.png"} for i in range(5)]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_missing_files_and_none_prompts_are_skipped_and_reported(rows, tiny_sd3_dir, tmp_path, capsys):
    rows[1]["rejected"] = "gone.png"
    rows[2]["prompt"] = None
    rows[3]["chosen"] = "broken.png"
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(FileNotFoundError, match="pairs rejected row 1: image not found"):  # the adapters' default
        load_preference_data(source, format="pairs")

    output = tmp_path / "cache"
    main(
        ["cache", source, "--format", "pairs", "--base", tiny_sd3_dir, "--output", str(output)]
        + ["--resolution", "32", "--max-sequence-length", "8"]
    )
    assert f"cached 2 of 5 pairs in {output}; 3 skipped" in capsys.readouterr().out
    skipped = json.loads((output / "skipped_rows.json").read_text())
    assert [(entry["row"], entry["column"]) for entry in skipped] == [(1, "rejected"), (2, "prompt"), (3, "chosen")]
    assert "FileNotFoundError" in skipped[0]["error"] and "gone.png" in skipped[0]["error"]
    assert skipped[1]["error"] == "prompt is None"
    assert "UnidentifiedImageError" in skipped[2]["error"]


def test_a_jsonl_file_that_is_not_utf8_names_the_file_and_row(rows, tmp_path):
    source = tmp_path / "latin1.jsonl"
    lines = [json.dumps(row, ensure_ascii=False).encode("utf-8") for row in rows]
    lines[3] = json.dumps({**rows[3], "prompt": "un café"}, ensure_ascii=False).encode("latin-1")
    source.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError, match=rf"{source}: line 4 \(row 3 of a JSONL file\) is not UTF-8 text"):
        load_preference_data(str(source), format="pairs")
