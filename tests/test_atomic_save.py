"""Saving over an existing model (issue 16, item 4): a save killed between its file moves never loads as a mix of
two models; its temporary folder is cleaned by the next save and never uploaded."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from modeling_dina import DiNaRewardModel
from modeling_dina.modeling_loading import MANIFEST_NAME
from modeling_dina.training import files_to_upload

KILLED_BETWEEN_MOVES = textwrap.dedent(
    """
    import os, signal, sys
    from modeling_dina import DiNaRewardModel

    moves, replace = [], os.replace

    def killed_after(count):
        def moving(source, target):
            if ".tmp-save-" in str(source) and ".tmp-save-" not in str(target):  # into the model folder
                moves.append(os.path.basename(target))
                if len(moves) > count:
                    os.kill(os.getpid(), signal.SIGKILL)
            replace(source, target)
        return moving

    model = DiNaRewardModel.from_pretrained(sys.argv[1])
    os.replace = killed_after(int(sys.argv[3]))
    model.save_pretrained(sys.argv[2])
    """
)


@pytest.fixture
def other_model_folder(tiny_dina_dir, tmp_path):
    """A folder holding a model that differs from `tiny_dina_dir`'s in its head weights and its config."""
    model = DiNaRewardModel.from_pretrained(tiny_dina_dir)
    with torch.no_grad():
        model.reward_head.head.weight.mul_(-2.0)
    model.config.score_offset = 3.0
    model.save_pretrained(tmp_path / "target")
    return tmp_path / "target"


def save_killed(source, target, moves: int) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    arguments = [sys.executable, "-c", KILLED_BETWEEN_MOVES, str(source), str(target), str(moves)]
    done = subprocess.run(arguments, env=env, capture_output=True, timeout=300)
    assert done.returncode == -9, done.stderr.decode()[-2000:]


@pytest.mark.parametrize("moves", [1, 2])  # the manifest only; the manifest and config.json (the weights move last)
def test_an_interrupted_overwrite_cannot_load_as_a_mix(tiny_dina_dir, other_model_folder, moves):
    save_killed(tiny_dina_dir, other_model_folder, moves)
    leftovers = [name for name in os.listdir(other_model_folder) if name.startswith(".tmp-save-")]
    assert len(leftovers) == 1
    with pytest.raises(ValueError, match=f"holds parts of two saves: its weights are not those {MANIFEST_NAME} names"):
        DiNaRewardModel.from_pretrained(other_model_folder)
    assert os.listdir(other_model_folder / leftovers[0])  # the killed save's files are still in it ...
    uploaded = files_to_upload(other_model_folder)
    assert "config.json" in uploaded and not any(path.startswith(".tmp-save-") for path in uploaded)  # ... not sent

    DiNaRewardModel.from_pretrained(tiny_dina_dir).save_pretrained(other_model_folder)  # the save done again
    assert not any(name.startswith(".tmp-save-") for name in os.listdir(other_model_folder))
    loaded, source = DiNaRewardModel.from_pretrained(other_model_folder), DiNaRewardModel.from_pretrained(tiny_dina_dir)
    assert loaded.config.score_offset == source.config.score_offset
    assert torch.equal(loaded.reward_head.head.weight, source.reward_head.head.weight)


def test_killed_before_the_manifest_moves_the_old_model_is_intact(tiny_dina_dir, other_model_folder):
    before = DiNaRewardModel.from_pretrained(other_model_folder).reward_head.head.weight.clone()
    save_killed(tiny_dina_dir, other_model_folder, 0)
    after = DiNaRewardModel.from_pretrained(other_model_folder)
    assert after.config.score_offset == 3.0 and torch.equal(after.reward_head.head.weight, before)


def test_hand_edited_configs_and_folders_without_a_manifest_still_load(tiny_dina_dir, other_model_folder):
    config = json.loads((other_model_folder / "config.json").read_text())
    (other_model_folder / "config.json").write_text(json.dumps({**config, "score_scale": 5.0}))
    assert DiNaRewardModel.from_pretrained(other_model_folder).config.score_scale == 5.0
    (other_model_folder / MANIFEST_NAME).unlink()
    assert DiNaRewardModel.from_pretrained(other_model_folder).config.score_offset == 3.0
