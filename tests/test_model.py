"""DiNaRewardModel: shapes, trainable parameters, zero-inits, the ensemble of SPEC §3, save/load, Auto classes."""

import os
import subprocess
import sys

import pytest
import torch
from diffusers import SD3Transformer2DModel
from transformers import AutoModel

from modeling_dina import DiNaRewardModel
from modeling_dina import backbones as backbones_module
from modeling_dina.tiny_sd3 import TINY_DINA


def perturb(model, scale=0.05, seed=0):
    """Give LoRA B and zero-initialised head layers non-trivial values, so tests see their effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture(scope="module")
def tiny_model(tiny_sd3_dir):
    torch.manual_seed(0)
    return perturb(DiNaRewardModel.from_base(tiny_sd3_dir, **TINY_DINA)).eval()


def inputs(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 16, 16, generator=g),
        torch.randn(batch, 48, 64, generator=g),
        torch.randn(batch, 64, generator=g),
    )


def test_forward_shapes_and_normalisation(tiny_model):
    latents, text, pooled = inputs()
    out = tiny_model(latents, torch.tensor(400.0), text, pooled)
    assert out.rewards.shape == (3,) and torch.isfinite(out.rewards).all()
    assert torch.allclose(out.scores, (out.rewards + 10) / 10)
    rewards, scores = tiny_model(latents, torch.full((3,), 400.0), text, pooled, return_dict=False)
    assert torch.equal(rewards, out.rewards)


def test_rewards_depend_on_image_text_and_noise_level(tiny_model):
    latents, text, pooled = inputs()
    base = tiny_model(latents, torch.tensor(400.0), text, pooled).rewards
    assert not torch.allclose(base, tiny_model(latents.flip(-1), torch.tensor(400.0), text, pooled).rewards)
    assert not torch.allclose(base, tiny_model(latents, torch.tensor(400.0), text.roll(1, dims=0), pooled).rewards)
    assert not torch.allclose(base, tiny_model(latents, torch.tensor(800.0), text, pooled).rewards)


def test_only_lora_and_head_get_gradients(tiny_sd3_dir):
    model = perturb(DiNaRewardModel.from_base(tiny_sd3_dir, **TINY_DINA))
    latents, text, pooled = inputs()
    model(latents, torch.tensor(400.0), text, pooled).rewards.sum().backward()
    for name, p in model.named_parameters():
        trainable = "lora_" in name or name.startswith("reward_head.")
        assert p.requires_grad == trainable, name
        assert (p.grad is not None and p.grad.abs().sum() > 0) == trainable, name
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    # SD3.5-style blocks: LoRA lands on the dual attention `attn2` too; both kept blocks keep their text side
    assert "backbone.transformer_blocks.0.attn2.to_q" in lora_modules
    assert "backbone.transformer_blocks.1.attn.add_q_proj" in lora_modules


def test_last_block_text_projections_excluded_when_its_text_is_unused(tiny_sd3_dir):
    model = DiNaRewardModel.from_base(tiny_sd3_dir, **{**TINY_DINA, "text_layers": [1]})
    names = {n for n, _ in model.named_parameters() if ".lora_A." in n}
    assert not any("transformer_blocks.1.attn.add_" in n or "blocks.1.attn.to_add_out" in n for n in names)
    assert any("transformer_blocks.0.attn.add_q_proj" in n for n in names)


def test_zero_inits_hold_at_construction(tiny_sd3_dir):
    model = DiNaRewardModel.from_base(tiny_sd3_dir, **TINY_DINA)
    head = model.reward_head
    for adapter in [*head.layer_adapters_visual, *head.layer_adapters_text]:
        assert adapter.cond_mlp[2].weight.abs().sum() == 0 and adapter.cond_mlp[2].bias.abs().sum() == 0
    for gate in (head.attn1.gate_vis, head.attn1.gate_text):
        assert gate[2].weight.abs().sum() == 0 and gate[2].bias.abs().sum() == 0
    assert not hasattr(head.attn2, "gate_vis") or head.attn2.gate_vis is None
    assert 0 < head.query_tokens.std() < 0.05
    lora_b = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert lora_b and all(p.abs().sum() == 0 for p in lora_b)  # LoRA starts as the identity


def test_ensemble_equals_spec_definition(tiny_model):
    """K levels: per-level backbone pass, per-level adapter tokens with that level's temb, tokens concatenated."""
    latents, text, pooled = inputs(batch=2)
    noisy = torch.stack([latents, 0.5 * latents, -latents])
    timesteps = torch.tensor([200.0, 500.0, 700.0])
    batched = tiny_model(noisy, timesteps, text, pooled).rewards

    head = tiny_model.reward_head
    image, txt = [], []
    with torch.no_grad(), tiny_model.reward_adapter():
        for k in range(3):
            f = tiny_model.backbone(noisy[k], timesteps[k].expand(2), text, pooled)
            image.append(
                head.agg_visual(torch.cat([a(x, f.temb) for a, x in zip(head.layer_adapters_visual, f.visual)], -1))
            )
            txt.append(head.agg_text(torch.cat([a(x, f.temb) for a, x in zip(head.layer_adapters_text, f.text)], -1)))
        q = head.query_tokens.expand(2, -1, -1)
        q = head.attn1(q, torch.cat(image, 1), torch.cat(txt, 1))
        q = head.attn2(q, torch.cat(image, 1))
        q = q + head.ff(head.norm_ff(q))
        reference = head.head(q).mean(1).squeeze(-1)
    assert torch.allclose(batched, reference, atol=1e-5)
    # one level through the ensemble path equals the plain forward
    single = tiny_model(latents, torch.tensor(500.0), text, pooled).rewards
    assert torch.allclose(tiny_model(latents[None], torch.tensor([500.0]), text, pooled).rewards, single, atol=1e-6)


def test_ensemble_runs_backbone_once(tiny_model, monkeypatch):
    calls = []
    forward = type(tiny_model.backbone).forward

    def spy(self, latents, *args):
        calls.append(latents.shape[0])
        return forward(self, latents, *args)

    monkeypatch.setattr(type(tiny_model.backbone), "forward", spy)
    latents, text, pooled = inputs(batch=2)
    tiny_model(torch.stack([latents] * 3), torch.tensor([200.0, 500.0, 700.0]), text, pooled)
    assert calls == [6]


@pytest.mark.parametrize("fused", [False, True])
def test_backbone_and_head_trace_without_graph_breaks(tiny_sd3_dir, fused):
    """`torch.compile` sees the backbone (LoRA fused or not) and the head each as one graph."""
    model = perturb(DiNaRewardModel.from_base(tiny_sd3_dir, **TINY_DINA)).eval()
    model.fuse_reward_lora(fused)
    latents, text, pooled = inputs()
    timestep = torch.full((3,), 400.0)
    with torch.no_grad(), model.reward_adapter():
        backbone = torch._dynamo.explain(model.backbone)(latents, timestep, text, pooled)
        features = model.backbone(latents, timestep, text, pooled)
        head = torch._dynamo.explain(model.reward_head)(features.visual, features.text, features.temb)
    assert (backbone.graph_count, backbone.graph_break_count) == (1, 0), backbone.break_reasons
    assert (head.graph_count, head.graph_break_count) == (1, 0), head.break_reasons


def test_regional_compilation_gives_the_eager_rewards(tiny_sd3_dir):
    model = perturb(DiNaRewardModel.from_base(tiny_sd3_dir, **TINY_DINA)).eval()
    latents, text, pooled = inputs()
    with torch.no_grad():
        eager = model(latents, 400.0, text, pooled).rewards
        model.compile_regions(backend="eager")  # dynamo's capture without code generation: cheap for a test
        compiled = model(latents, 400.0, text, pooled).rewards
    assert all(block._compiled_call_impl is not None for block in model.backbone.transformer_blocks)
    assert model.reward_head._compiled_call_impl is not None
    torch.testing.assert_close(compiled, eager)


def test_gradient_checkpointing_gives_same_rewards_and_grads(tiny_sd3_dir):
    latents, text, pooled = inputs()
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = perturb(DiNaRewardModel.from_base(tiny_sd3_dir, **TINY_DINA))
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.backbone.gradient_checkpointing
        rewards = model(latents, torch.tensor(400.0), text, pooled).rewards
        rewards.sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((rewards.detach(), grads))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(results[0][1], results[1][1]))


def test_bad_inputs(tiny_model):
    latents, text, pooled = inputs()
    with pytest.raises(ValueError, match="channels"):
        tiny_model(torch.randn(3, 16, 16, 16), torch.tensor(400.0), text, pooled)
    with pytest.raises(ValueError, match="prompt embeddings"):
        tiny_model(latents, torch.tensor(400.0), text[:2], pooled[:2])
    with pytest.raises(ValueError, match="latents"):
        tiny_model(latents[0], torch.tensor(400.0), text, pooled)


def test_loading_from_base_folder_reads_only_kept_blocks(tiny_sd3_dir, monkeypatch):
    read = []
    real_safe_open = backbones_module.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.inner = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.f.get_tensor(key)

    monkeypatch.setattr(backbones_module, "safe_open", Spy)
    model = DiNaRewardModel.from_base(tiny_sd3_dir, **TINY_DINA)
    assert read and not any(
        k.startswith(("transformer_blocks.2.", "transformer_blocks.3.", "norm_out", "proj_out")) for k in read
    )
    assert all(p.device.type == "cpu" for p in model.parameters())
    # the same weights as the full transformer's first blocks
    full = SD3Transformer2DModel.from_pretrained(tiny_sd3_dir, subfolder="transformer")
    assert torch.equal(
        model.backbone.transformer_blocks[1].attn.to_q.base_layer.weight, full.transformer_blocks[1].attn.to_q.weight
    )


def test_sharing_a_loaded_transformer_copies_nothing(tiny_sd3_dir):
    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3_dir, subfolder="transformer")
    model = DiNaRewardModel.from_base(transformer, **TINY_DINA)
    with pytest.raises(ValueError, match="already carries"):
        DiNaRewardModel.from_base(transformer, **TINY_DINA)
    base_ptrs = {p.data_ptr() for p in transformer.parameters()}
    backbone_base = [p for n, p in model.backbone.named_parameters() if "lora_" not in n]
    assert all(p.data_ptr() in base_ptrs for p in backbone_base)


def test_save_load_round_trip_is_exact(tiny_model, tmp_path):
    latents, text, pooled = inputs()
    expected = tiny_model(latents, torch.tensor(400.0), text, pooled).rewards
    tiny_model.save_pretrained(tmp_path / "dina")
    files = sorted(os.listdir(tmp_path / "dina"))
    assert "model.safetensors" in files and "config.json" in files and not any(f.startswith(".tmp") for f in files)
    loaded = DiNaRewardModel.from_pretrained(tmp_path / "dina")
    assert torch.equal(loaded(latents, torch.tensor(400.0), text, pooled).rewards, expected)
    # only LoRA + head were written (the base is named in the config)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "dina" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert all("lora_" in k or k.startswith("reward_head.") for k in keys)
    assert set(keys) == set(tiny_model.trainable_state_dict())
    # AutoModel knows dina_lrm once the package is imported
    assert isinstance(AutoModel.from_pretrained(tmp_path / "dina"), DiNaRewardModel)


def test_merged_folder_is_self_contained(tiny_model, tmp_path):
    latents, text, pooled = inputs()
    expected = tiny_model(latents, torch.tensor(400.0), text, pooled).rewards
    tiny_model.save_pretrained(tmp_path / "merged", merged=True)
    loaded = DiNaRewardModel.from_pretrained(tmp_path / "merged", base_model="/nonexistent")
    assert loaded.config.base_weights_included and not loaded.config.use_lora
    assert torch.allclose(loaded(latents, torch.tensor(400.0), text, pooled).rewards, expected, atol=1e-5)


def test_dtype_and_device_map_on_load(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "dina")
    loaded = DiNaRewardModel.from_pretrained(tmp_path / "dina", dtype=torch.bfloat16, device_map="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    latents, text, pooled = (x.bfloat16() for x in inputs())
    rewards = loaded(latents, torch.tensor(400.0), text, pooled).rewards
    # the read-out is fp32, so close candidates stay distinguishable in bf16
    assert rewards.dtype == torch.float32 and len(set(rewards.tolist())) == 3


def test_trust_remote_code_without_the_package(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "dina")
    assert (tmp_path / "dina" / "modeling_dina.py").is_file()
    code = (
        "import sys; sys.modules['modeling_dina'] = None\n"  # the package cannot be imported
        "from transformers import AutoModel\n"
        f"m = AutoModel.from_pretrained({str(tmp_path / 'dina')!r}, trust_remote_code=True)\n"
        "print(type(m).__module__)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("transformers_modules.")


def test_corrupt_and_pickled_folders_are_refused(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "dina")
    (tmp_path / "dina" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(OSError, match="safetensors"):
        DiNaRewardModel.from_pretrained(tmp_path / "dina")
    (tmp_path / "dina" / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, tmp_path / "dina" / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickled"):
        DiNaRewardModel.from_pretrained(tmp_path / "dina")


def test_wrong_weights_name_the_key(tiny_model, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tiny_model.save_pretrained(tmp_path / "dina")
    path = str(tmp_path / "dina" / "model.safetensors")
    state = load_file(path)
    state.pop("reward_head.query_tokens")
    with safe_open(path, framework="pt") as f:
        save_file(state, path, metadata=f.metadata())  # the same save id: the manifest still names these weights
    with pytest.raises(KeyError, match="query_tokens"):
        DiNaRewardModel.from_pretrained(tmp_path / "dina")


def test_generator_adapters_on_shared_blocks_stay_out_of_the_reward(tiny_sd3_dir, tmp_path):
    from peft import LoraConfig

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3_dir, subfolder="transformer")
    transformer.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k"]), adapter_name="generator")
    model = perturb(DiNaRewardModel.from_base(transformer, **TINY_DINA))
    state = model.trainable_state_dict()
    assert state and not any("generator" in k for k in state)
    model.save_pretrained(tmp_path / "dina")
    fresh = SD3Transformer2DModel.from_pretrained(tiny_sd3_dir, subfolder="transformer")
    fresh.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k"]), adapter_name="generator")
    reloaded = DiNaRewardModel.from_pretrained(tmp_path / "dina", base_model=fresh)
    latents, text, pooled = inputs()
    assert torch.equal(
        reloaded(latents, torch.tensor(400.0), text, pooled).rewards,
        model(latents, torch.tensor(400.0), text, pooled).rewards,
    )
    assert fresh.transformer_blocks[0].attn.to_q.active_adapters == ["generator"]


def test_base_path_relative_to_the_model_folder(tiny_model, tiny_sd3_dir, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(tiny_sd3_dir, tmp_path / "bundle" / "generator")
    tiny_model.save_pretrained(tmp_path / "bundle" / "reward")
    config = tmp_path / "bundle" / "reward" / "config.json"
    config.write_text(config.read_text().replace(f'"{tiny_sd3_dir}"', '"../generator"'))
    monkeypatch.chdir(tmp_path)  # the relative path does not resolve from the working directory
    loaded = DiNaRewardModel.from_pretrained(tmp_path / "bundle" / "reward")
    assert loaded.config.base_model_name_or_path == "../generator"
    assert loaded.base_location == str(tmp_path / "bundle" / "generator")
    latents, text, pooled = inputs()
    assert torch.equal(
        loaded(latents, torch.tensor(400.0), text, pooled).rewards,
        tiny_model(latents, torch.tensor(400.0), text, pooled).rewards,
    )
