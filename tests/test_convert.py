"""Import of the released checkpoint layout (SPEC §5): round trip and bad input."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling_dina import DiNaRewardModel
from modeling_dina.cli import main as dina_main
from modeling_dina.convert import convert_released_checkpoint
from modeling_dina.tiny_sd3 import TINY_DINA


def write_released(model, folder, base_id="tiny", layers=([1, 2], [1, 2]), **head_options):
    """A checkpoint in the authors' layout, written with their key names."""
    os.makedirs(os.path.join(folder, "checkpoint", "backbone_lora"))
    config = {
        "model": {
            "num_transformer_layers": 2,
            "visual_head_idx": layers[0],
            "text_head_idx": layers[1],
            "use_lora": True,
            "lora_config": {"r": 4, "lora_alpha": 8, "init_lora_weights": "gaussian"},
            "reward_head": {
                "use_proj_in": False,
                "width": -1,
                "out_dim": 1,
                "num_queries": 4,
                "num_attn_heads": 4,
                "dropout": 0.0,
                **head_options,
            },
            "use_logistic": False,
            "freeze_backbone": False,
            "backbone_model_id": base_id,
        },
        "training": {"add_noise": True, "t_weighting_scheme": "uniform"},
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    state = model.trainable_state_dict()
    lora = {"base_model.model." + k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    save_file(lora, os.path.join(folder, "checkpoint", "backbone_lora", "adapter_model.safetensors"))
    with open(os.path.join(folder, "checkpoint", "backbone_lora", "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["to_q"]}, f)
    head = {k[len("reward_head.") :]: v for k, v in state.items() if k.startswith("reward_head.")}
    torch.save(head, os.path.join(folder, "checkpoint", "rm_head.pt"))
    return folder


@pytest.fixture(scope="module")
def source(tiny_sd3_dir):
    torch.manual_seed(0)
    model = DiNaRewardModel.from_base(tiny_sd3_dir, **TINY_DINA)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def rewards(model):
    g = torch.Generator().manual_seed(0)
    latents, text, pooled = (
        torch.randn(2, 4, 16, 16, generator=g),
        torch.randn(2, 48, 64, generator=g),
        torch.randn(2, 64, generator=g),
    )
    return model(latents, torch.tensor(400.0), text, pooled).rewards


def test_released_key_names_match_spec(source):
    keys = set(source.reward_head.state_dict())
    for key in [
        "layer_adapters_visual.0.layer_embed",
        "layer_adapters_visual.0.cond_mlp.0.weight",
        "layer_adapters_visual.0.cond_mlp.2.bias",
        "layer_adapters_text.1.proj.weight",
        "agg_visual.weight",
        "agg_text.bias",
        "query_tokens",
        "attn1.norm_q.weight",
        "attn1.norm_v.weight",
        "attn1.norm_t.weight",
        "attn1.to_q.weight",
        "attn1.to_k_vis.weight",
        "attn1.to_v_vis.weight",
        "attn1.to_k_text.weight",
        "attn1.to_v_text.weight",
        "attn1.to_out.0.weight",
        "attn1.gate_vis.0.weight",
        "attn1.gate_vis.2.weight",
        "attn1.gate_text.0.weight",
        "attn1.gate_text.2.bias",
        "attn2.norm_q.weight",
        "attn2.norm_v.weight",
        "attn2.to_q.weight",
        "attn2.to_k_vis.weight",
        "attn2.to_v_vis.weight",
        "attn2.to_out.0.weight",
        "norm_ff.weight",
        "ff.0.weight",
        "ff.2.weight",
        "head.weight",
        "head.bias",
    ]:
        assert key in keys, key
    assert not any("proj_in" in k or k.startswith("attn2.norm_t") or "attn2.gate" in k for k in keys)
    assert "attn1.norm_q.bias" not in keys


def test_round_trip_through_cli(source, tiny_sd3_dir, tmp_path):
    released = write_released(source, str(tmp_path / "released"))
    out = str(tmp_path / "converted")
    dina_main(["convert", released, "--base", tiny_sd3_dir, "--output", out, "--max-sequence-length", "16"])
    loaded = DiNaRewardModel.from_pretrained(out)
    assert torch.equal(rewards(loaded), rewards(source))
    assert loaded.config.max_sequence_length == 16 and loaded.config.lora_rank == 4


def test_missing_file_is_named(source, tiny_sd3_dir, tmp_path):
    released = write_released(source, str(tmp_path / "r"))
    os.remove(os.path.join(released, "checkpoint", "rm_head.pt"))
    with pytest.raises(FileNotFoundError, match="rm_head.pt"):
        convert_released_checkpoint(released, tiny_sd3_dir)


def test_head_with_unknown_or_missing_keys(source, tiny_sd3_dir, tmp_path):
    released = write_released(source, str(tmp_path / "r"))
    path = os.path.join(released, "checkpoint", "rm_head.pt")
    head = torch.load(path, weights_only=True)
    head["attn3.to_q.weight"] = torch.zeros(1)
    torch.save(head, path)
    with pytest.raises(KeyError, match=r"rm_head.pt.*attn3.to_q.weight"):
        convert_released_checkpoint(released, tiny_sd3_dir)
    head.pop("attn3.to_q.weight")
    head.pop("ff.0.bias")
    torch.save(head, path)
    with pytest.raises(KeyError, match=r"rm_head.pt.*ff.0.bias"):
        convert_released_checkpoint(released, tiny_sd3_dir)


def test_lora_for_a_different_depth(source, tiny_sd3_dir, tmp_path):
    released = write_released(source, str(tmp_path / "r"))
    path = os.path.join(released, "checkpoint", "backbone_lora", "adapter_model.safetensors")
    lora = load_file(path)
    lora["base_model.model.transformer_blocks.3.attn.to_q.lora_A.weight"] = torch.zeros(4, 32)
    save_file(lora, path)
    with pytest.raises(KeyError, match=r"adapter_model.safetensors.*block 3.*different depth"):
        convert_released_checkpoint(released, tiny_sd3_dir)


def test_pickled_code_is_refused(source, tiny_sd3_dir, tmp_path):
    released = write_released(source, str(tmp_path / "r"))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"head.weight": Evil()}, os.path.join(released, "checkpoint", "rm_head.pt"))
    with pytest.raises(ValueError, match="weights_only=True"):
        convert_released_checkpoint(released, tiny_sd3_dir)


@pytest.mark.parametrize("family", ["flux", "zimage"])
def test_the_authors_flux_and_zimage_layouts_convert(family, tmp_path):
    """Same layout, their key names (`transformer_blocks` / `layers`, `noise_refiner`, `context_refiner`); FLUX
    imports with the unscaled time embedding their code trained with."""
    from modeling_dina.tiny_families import TINY_FAMILY_DINA, TINY_PROMPT_WIDTHS, build_tiny_transformer

    base = tmp_path / "base"
    build_tiny_transformer(family).save_pretrained(base / "transformer")
    source = DiNaRewardModel.from_base(str(base), unscaled_time_embedding=family == "flux", **TINY_FAMILY_DINA)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    head = {"use_proj_in": True, "width": 16, **({"t_emb_dim": 32} if family == "zimage" else {})}
    write_released(source, tmp_path / "released", layers=([0, 1, 2], [1, 2]), **head)
    converted = convert_released_checkpoint(str(tmp_path / "released"), str(base), str(tmp_path / "out"))
    assert converted.config.unscaled_time_embedding == (family == "flux")
    if family == "zimage":
        assert any(k.startswith("backbone.noise_refiner.") for k in converted.trainable_state_dict())
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 12, TINY_PROMPT_WIDTHS[family], generator=g)
    pooled = torch.randn(2, 16, generator=g) if family == "flux" else None
    with torch.no_grad():
        expected = source.eval()(latents, torch.tensor(400.0), text, pooled).rewards
        loaded = DiNaRewardModel.from_pretrained(tmp_path / "out")
        assert torch.equal(loaded(latents, torch.tensor(400.0), text, pooled).rewards, expected)
    if family == "zimage":
        write_released(source, tmp_path / "wrong", layers=([0, 1, 2], [1, 2]), **{**head, "t_emb_dim": 256})
        with pytest.raises(ValueError, match="time embedding of width 256"):
            convert_released_checkpoint(str(tmp_path / "wrong"), str(base))
