"""`dina eval` end to end, offline: a tiny DiNa model and a tiny random CLIP baseline on a fixture benchmark."""

import json

import pytest
from PIL import Image

from modeling_dina.cli import main as dina_main


@pytest.fixture()
def benchmark(tmp_path):
    """A JSONL pair benchmark (the `pairs` format) with images on disk, one tie."""
    colours = [(200, 30, 30), (30, 30, 200), (30, 160, 30), (220, 200, 40)]
    rows = []
    for i in range(6):
        chosen, rejected = tmp_path / f"c{i}.png", tmp_path / f"r{i}.png"
        Image.new("RGB", (32, 32), colours[i % 4]).save(chosen)
        Image.new("RGB", (32, 32), colours[(i + 1) % 4]).save(rejected)
        rows.append(
            {
                "prompt": "a red square",
                "chosen": chosen.name,
                "rejected": rejected.name,
                "label": 0.5 if i == 5 else 1.0,
            }
        )
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_eval_writes_json_markdown_and_plot(tiny_dina_dir, clip_parts, benchmark, tmp_path, capsys):
    model, processor = clip_parts
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    out = tmp_path / "eval"
    dina_main(
        [
            "eval",
            "--model",
            tiny_dina_dir,
            "--benchmark",
            "pairs",
            "--path",
            str(benchmark),
            "--noise-levels",
            "0.2,0.5",
            "--ensemble",
            "--clip",
            str(tmp_path / "clip"),
            "--bootstrap",
            "50",
            "--output",
            str(out),
        ]
    )
    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == "pairs" and results["n_items"] == 6
    assert {"dina@0.2", "dina@0.5", "dina@ensemble"} <= set(results["scorers"])
    assert any(name.startswith("clip:") for name in results["scorers"])
    markdown = (out / "results.md").read_text()
    for name in ("dina@0.2", "dina@0.5", "dina@ensemble", "clip:"):
        assert name in markdown
    assert (out / "accuracy_vs_noise.png").stat().st_size > 0
    assert "dina@ensemble" in capsys.readouterr().out
    assert any(p.name.startswith("dina@0.2") for p in (out / "cache").iterdir())  # per-item scores, for resuming


def test_eval_noise_modes_side_by_side(tiny_dina_dir, benchmark, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--model", tiny_dina_dir, "--benchmark", "pairs", "--path", str(benchmark), "--noise-levels", "0.5"]
    dina_main([*args, "--ensemble", "--noise", "both", "--bootstrap", "0", "--output", str(out)])
    scorers = json.loads((out / "results.json").read_text())["scorers"]
    assert set(scorers) == {"dina@0.5", "dina@ensemble", "dina-independent@0.5", "dina-independent@ensemble"}
    assert scorers["dina-independent@0.5"]["noise_level"] == 0.5
    # The independent draws are seeded: a second run in another folder scores every item the same.
    dina_main([*args, "--noise", "independent", "--bootstrap", "0", "--output", str(tmp_path / "again")])
    again = json.loads((tmp_path / "again" / "results.json").read_text())["scorers"]
    assert set(again) == {"dina-independent@0.5"}
    cached = [
        [json.loads(line)["scores"] for line in (folder / "cache" / "dina-independent@0.5.jsonl").open()]
        for folder in (out, tmp_path / "again")
    ]
    assert len(cached[0]) == 6 and cached[0] == cached[1]
