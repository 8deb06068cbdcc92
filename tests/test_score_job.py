"""`dina score-dataset` as a job (issue 16, item 1): shards written atomically as it goes, a rerun resumes, bad rows
skipped and reported by dataset row, the output location checked first, the final file complete or absent."""

import errno
import json
import os
import subprocess
import sys
import textwrap

import datasets
import numpy as np
import pytest
from PIL import Image

from modeling_dina import cli_score
from modeling_dina.cli import main
from modeling_dina.pipeline_dina import DiNaRewardPipeline

PROMPTS = ["a red circle", "a cat", "two blue squares", "a dog", "a tree"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A JSONL dataset of 10 rows whose `image` column holds absolute paths to 32x32 PNGs."""
    folder = tmp_path_factory.mktemp("score_source")
    rng = np.random.default_rng(0)
    with open(folder / "rows.jsonl", "w") as f:
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            f.write(json.dumps({"image": str(folder / f"{i}.png"), "prompt": PROMPTS[i % 5]}) + "\n")
    return folder


def command(model, dataset, output) -> list[str]:
    """`dina score-dataset` arguments: 5 shards of 2 rows, one batch each."""
    arguments = ["score-dataset", "--model", model, "--dataset", str(dataset), "--output", str(output)]
    return [*arguments, "--batch-size", "2", "--shard-size", "2"]


@pytest.fixture(scope="module")
def reference(tiny_dina_dir, source, tmp_path_factory):
    """An uninterrupted run over `source`: its rows."""
    output = tmp_path_factory.mktemp("score_reference") / "scores.jsonl"
    main(command(tiny_dina_dir, source / "rows.jsonl", output))
    return read_rows(output)


def read_rows(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def count_calls(monkeypatch):
    """The number of pipeline calls made since the fixture was set up."""
    calls = []
    original = DiNaRewardPipeline.__call__

    def counted(self, *args, **kwargs):
        calls.append(len(kwargs["images"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DiNaRewardPipeline, "__call__", counted)
    return calls


def test_bad_rows_are_skipped_and_reported_by_dataset_row(tiny_dina_dir, source, reference, tmp_path):
    rows = read_rows(source / "rows.jsonl")
    rows[3]["image"] = str(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows[7]["image"] = str(tmp_path / "broken.png")
    rows[8]["prompt"] = None
    with open(tmp_path / "bad.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    output = tmp_path / "scores.jsonl"
    main(command(tiny_dina_dir, tmp_path / "bad.jsonl", output))

    scored = read_rows(output)
    kept = [i for i in range(10) if i not in (3, 7, 8)]
    assert [row["image"] for row in scored] == [rows[i]["image"] for i in kept]
    expected = [reference[i]["dina_reward"] for i in kept]
    assert [row["dina_reward"] for row in scored] == pytest.approx(expected, abs=1e-5)  # batched differently
    skipped = json.loads((tmp_path / "scores.jsonl.skipped_rows.json").read_text())
    assert [entry["row"] for entry in skipped] == [3, 7, 8]
    assert "FileNotFoundError" in skipped[0]["error"] and "missing.png" in skipped[0]["error"]
    assert "UnidentifiedImageError" in skipped[1]["error"]
    assert skipped[2]["error"] == "TypeError: `prompt[8]` is None, not a string"
    assert not (tmp_path / "scores.jsonl.parts").exists()


KILLED = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from modeling_dina import cli_score
    from modeling_dina.cli import main
    from modeling_dina.pipeline_dina import DiNaRewardPipeline

    point, calls = sys.argv[1], []
    score, save = DiNaRewardPipeline.__call__, cli_score._save_dataset

    def killed_at_the_fourth_batch(self, *args, **kwargs):
        calls.append(1)
        if point == "scoring" and len(calls) == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return score(self, *args, **kwargs)

    def killed_after_writing_the_temporary(dataset, output):
        save(dataset, output)
        os.kill(os.getpid(), signal.SIGKILL)

    torch.set_num_threads(1)  # as in the test process: the same kernels, the same bits
    DiNaRewardPipeline.__call__ = killed_at_the_fourth_batch
    if point == "final write":
        cli_score._save_dataset = killed_after_writing_the_temporary
    main(sys.argv[2:])
    """
)


def run_killed(point: str, arguments: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", KILLED, point, *arguments], env=env, capture_output=True, timeout=600)
    assert done.returncode == -9, done.stderr.decode()[-2000:]


def test_killed_at_70_percent_resumes_where_it_stopped(tiny_dina_dir, source, reference, tmp_path, count_calls):
    output = tmp_path / "scores.jsonl"
    arguments = command(tiny_dina_dir, source / "rows.jsonl", output)
    run_killed("scoring", arguments)
    parts = sorted(os.listdir(tmp_path / "scores.jsonl.parts"))
    assert [p for p in parts if p.startswith("shard-")] == [f"shard-0000{i}.json" for i in range(3)]
    assert not output.exists()

    with pytest.raises(ValueError, match=r"unfinished job with other settings \(batch_size differ\)"):
        main([*arguments[:-4], "--batch-size", "1", "--shard-size", "2"])
    main(arguments)
    assert count_calls == [2, 2]  # the two shards left, nothing scored twice
    assert read_rows(output) == reference  # the same as an uninterrupted run, to the bit
    assert json.loads((tmp_path / "scores.jsonl.skipped_rows.json").read_text()) == []


def test_killed_during_the_final_write_leaves_no_partial_file(tiny_dina_dir, source, reference, tmp_path, count_calls):
    output = tmp_path / "scores.jsonl"
    arguments = command(tiny_dina_dir, source / "rows.jsonl", output)
    run_killed("final write", arguments)
    assert not output.exists()  # the temporary was written, never renamed
    assert any(name.startswith(".tmp-") for name in os.listdir(tmp_path))
    main(arguments)
    assert count_calls == []  # every shard was kept
    assert read_rows(output) == reference
    assert not any(name.startswith(".tmp-") for name in os.listdir(tmp_path))


def test_the_output_location_is_checked_before_scoring(tiny_dina_dir, source, tmp_path, monkeypatch):
    def no_scoring(*args, **kwargs):
        raise AssertionError("the model was loaded before the output location was checked")

    monkeypatch.setattr(cli_score, "_load_pipeline", no_scoring)
    existing = tmp_path / "done.jsonl"
    existing.write_text("")
    with pytest.raises(FileExistsError, match="already exists"):
        main(command(tiny_dina_dir, source / "rows.jsonl", existing))

    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes through permission bits: refuse the writes as the file system would
        makedirs = os.makedirs

        def refused(path, *args, **kwargs):
            if str(path).startswith(str(read_only)):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            makedirs(path, *args, **kwargs)

        monkeypatch.setattr(cli_score.os, "makedirs", refused)
    with pytest.raises(PermissionError, match="cannot write next to `--output`.*nothing was scored"):
        main(command(tiny_dina_dir, source / "rows.jsonl", read_only / "scores.parquet"))


def test_a_full_disk_is_named_and_the_written_shards_are_kept(tiny_dina_dir, source, reference, tmp_path, monkeypatch):
    write = cli_score.write_json_atomic

    def disk_fills_at_shard_1(path, value):
        if path.endswith("shard-00001.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        write(path, value)

    monkeypatch.setattr(cli_score, "write_json_atomic", disk_fills_at_shard_1)
    output = tmp_path / "scores"
    with pytest.raises(OSError, match="is full .* the shards already written are kept"):
        main(command(tiny_dina_dir, source / "rows.jsonl", output))
    assert os.path.isfile(tmp_path / "scores.parts" / "shard-00000.json") and not output.exists()
    monkeypatch.setattr(cli_score, "write_json_atomic", write)
    main(command(tiny_dina_dir, source / "rows.jsonl", output))
    rewards = list(datasets.load_from_disk(output)["dina_reward"])
    assert rewards == pytest.approx([row["dina_reward"] for row in reference], abs=1e-9)  # JSONL keeps 10 digits
