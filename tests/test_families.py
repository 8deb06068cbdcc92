"""FLUX.1, Qwen-Image and Z-Image backbones on tiny transformers built locally: the kept blocks give exactly what the
family's own full `forward` gives them (hooked), rewards, gradients, save/load, a training run, sharing."""

import diffusers
import pytest
import torch

from modeling_dina import DiNaRewardModel
from modeling_dina.backbones import backbone_type_for
from modeling_dina.losses import thurstone_loss
from modeling_dina.tiny_families import TINY_FAMILY_DINA, TINY_PROMPT_WIDTHS, build_tiny_transformer

FAMILIES = ["flux", "qwenimage", "zimage"]
TIMESTEP = 400.29  # a transformer timestep `sigma * 1000` on the SD3 grid (SPEC §1)


def prompt_inputs(family, batch=2, length=12, seed=0):
    """Latents (B, 4, 8, 8), prompt embeddings, pooled (FLUX) and the mask of real tokens (Qwen-Image, Z-Image: the
    second prompt is shorter than the first)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=g)
    embeds = torch.randn(batch, length, TINY_PROMPT_WIDTHS[family], generator=g)
    pooled = torch.randn(batch, 16, generator=g) if family == "flux" else None
    mask = None
    if family != "flux":
        mask = torch.ones(batch, length, dtype=torch.bool)
        mask[1:, length // 3 :] = False
    return latents, embeds, pooled, mask


def family_forward(family, transformer, latents, embeds, pooled, mask):
    """The base transformer's full forward, called as the family's diffusers pipeline calls it."""
    batch, channels, h, w = latents.shape
    sigma = torch.full((batch,), TIMESTEP) / 1000
    if family == "flux":
        packed = diffusers.FluxPipeline._pack_latents(latents, batch, channels, h, w)
        return transformer(
            hidden_states=packed,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=sigma,
            img_ids=diffusers.FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, "cpu", torch.float32),
            txt_ids=torch.zeros(embeds.shape[1], 3),
            guidance=torch.full([1], 3.5).expand(batch),
        )
    if family == "qwenimage":
        packed = diffusers.QwenImagePipeline._pack_latents(latents, batch, channels, h, w)
        return transformer(
            hidden_states=packed,
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            timestep=sigma,
            img_shapes=[[(1, h // 2, w // 2)]] * batch,
        )
    # ZImagePipeline: a list of (C, 1, h, w) latents, the real caption tokens only, timestep 1 - sigma.
    captions = [e[m] for e, m in zip(embeds, mask)]
    return transformer(list(latents.unsqueeze(2).unbind(0)), 1 - sigma, captions)


def hooked_block_outputs(family, transformer, inputs):
    blocks = transformer.layers if family == "zimage" else transformer.transformer_blocks
    outputs = []
    hooks = [block.register_forward_hook(lambda m, a, out: outputs.append(out)) for block in blocks]
    try:
        with torch.no_grad():
            family_forward(family, transformer, *inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_blocks_match_the_family_forward(family):
    transformer = build_tiny_transformer(family)
    model = DiNaRewardModel.from_base(transformer, **TINY_FAMILY_DINA).eval()
    assert model.config.backbone_type == family == backbone_type_for(type(transformer))
    inputs = prompt_inputs(family)
    expected = hooked_block_outputs(family, transformer, inputs)
    latents, embeds, pooled, mask = inputs
    with torch.no_grad(), model.reward_adapter():  # LoRA active, at its init (B = 0)
        features = model.backbone(latents, torch.full((2,), TIMESTEP), embeds, pooled, mask)
    assert len(features.visual) == 3 and len(features.text) == 2
    for index in (1, 2):
        out = expected[index - 1]
        if family == "zimage":
            image_length = features.visual[0].shape[1]
            image_out, text_out = out[:, :image_length], out[:, image_length:]
        else:
            text_out, image_out = out
        assert torch.equal(features.visual[index], image_out)
        assert torch.equal(features.text[index - 1], text_out)
    assert len(expected) == 3  # the base ran all its blocks, once


@pytest.mark.parametrize("family", FAMILIES)
def test_rewards_gradients_and_save_load(family, tmp_path):
    transformer = build_tiny_transformer(family)
    transformer.save_pretrained(tmp_path / "base" / "transformer")
    model = DiNaRewardModel.from_base(str(tmp_path / "base"), **TINY_FAMILY_DINA)
    latents, embeds, pooled, mask = prompt_inputs(family, batch=3)
    rewards = model(latents, torch.tensor(TIMESTEP), embeds, pooled, mask).rewards
    assert rewards.shape == (3,) and torch.isfinite(rewards).all()
    rewards.sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad <= trainable and trainable == {n for n in trainable if "lora_" in n or n.startswith("reward_")}
    assert any("lora_B" in n for n in with_grad) and any(n.startswith("reward_head.") for n in with_grad)

    with torch.no_grad():  # make the LoRA and the zero-initialised head layers non-trivial
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(tmp_path / "dina")
    loaded = DiNaRewardModel.from_pretrained(tmp_path / "dina")
    assert loaded.config.backbone_type == family
    other = build_tiny_transformer("zimage" if family == "flux" else "flux")
    with pytest.raises(ValueError, match="base is a"):
        DiNaRewardModel.from_pretrained(tmp_path / "dina", base_model=other)
    levels = torch.stack([latents, latents.flip(-1)])  # a 2-level ensemble round-trips too
    with torch.no_grad():
        for x, t in ((latents, torch.tensor(TIMESTEP)), (levels, torch.tensor([200.0, 700.0]))):
            assert torch.equal(model(x, t, embeds, pooled, mask).rewards, loaded(x, t, embeds, pooled, mask).rewards)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_tiny_training_run_lowers_the_loss(family):
    transformer = build_tiny_transformer(family)
    model = DiNaRewardModel.from_base(transformer, **TINY_FAMILY_DINA)
    latents, embeds, pooled, mask = prompt_inputs(family, batch=4, seed=1)
    chosen, rejected = latents, latents.flip(-1)  # a learnable rule: the unflipped latent wins
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    sigma = torch.full((4,), TIMESTEP / 1000)

    def loss():
        both = model(
            torch.cat([chosen, rejected]),
            torch.tensor(TIMESTEP),
            embeds.repeat(2, 1, 1),
            None if pooled is None else pooled.repeat(2, 1),
            None if mask is None else mask.repeat(2, 1),
        ).rewards
        return thurstone_loss(both[:4], both[4:], sigma, sigma)

    first = loss().item()
    for _ in range(15):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < first - 0.05


@pytest.mark.parametrize("family", FAMILIES)
def test_sharing_the_base_copies_nothing(family):
    transformer = build_tiny_transformer(family)
    model = DiNaRewardModel.from_base(transformer, **TINY_FAMILY_DINA)
    ours = {p.data_ptr() for n, p in model.backbone.named_parameters() if "lora_" not in n}
    theirs = {p.data_ptr() for p in transformer.parameters()}
    assert ours <= theirs
    blocks = model.backbone.layers if family == "zimage" else model.backbone.transformer_blocks
    assert blocks[0] is (transformer.layers if family == "zimage" else transformer.transformer_blocks)[0]
    # The generator's own forward is unchanged by the (inactive outside scoring) reward LoRA.
    inputs = prompt_inputs(family)
    before = hooked_block_outputs(family, build_tiny_transformer(family), inputs)
    after = hooked_block_outputs(family, transformer, inputs)
    assert all(torch.equal(a, b) for a, b in zip(flatten(before), flatten(after), strict=True))


def flatten(outputs):
    return [t for out in outputs for t in (out if isinstance(out, tuple) else (out,))]


def test_flux_time_embedding_conventions():
    """Default: as `FluxTransformer2DModel.forward` (sigma and guidance x 1000); the compatibility switch feeds
    sigma and 3.5 unscaled, as the authors' FLUX reward code does."""
    latents, embeds, pooled, _ = prompt_inputs("flux")
    sigma, guidance = torch.full((2,), TIMESTEP / 1000), torch.full((2,), 3.5)
    embeddings = []
    for unscaled, scale in ((False, 1000.0), (True, 1.0)):
        transformer = build_tiny_transformer("flux")
        model = DiNaRewardModel.from_base(transformer, unscaled_time_embedding=unscaled, **TINY_FAMILY_DINA)
        with torch.no_grad():
            temb = model.backbone(latents, sigma * 1000, embeds, pooled).temb
            expected = transformer.time_text_embed(sigma * scale, guidance * scale, pooled)
        assert torch.allclose(temb, expected, atol=1e-6)
        embeddings.append(temb)
    assert not torch.allclose(*embeddings, atol=1e-3)


@pytest.mark.parametrize("family", ["qwenimage", "zimage"])
def test_padding_does_not_change_a_prompts_reward(family):
    """With masks, a sample's reward does not depend on how far its prompt is padded (batch mates' lengths)."""
    model = DiNaRewardModel.from_base(build_tiny_transformer(family), **TINY_FAMILY_DINA).eval()
    latents, embeds, _, mask = prompt_inputs(family, length=12)
    short = mask[1].sum()
    with torch.no_grad():
        batched = model(latents, torch.tensor(TIMESTEP), embeds, None, mask).rewards[1]
        alone = model(latents[1:], torch.tensor(TIMESTEP), embeds[1:, :short], None, mask[1:, :short]).rewards[0]
    assert torch.allclose(batched, alone, atol=1e-5)


def test_family_inputs_are_checked():
    flux = DiNaRewardModel.from_base(build_tiny_transformer("flux"), **TINY_FAMILY_DINA)
    latents, embeds, pooled, _ = prompt_inputs("flux")
    with pytest.raises(ValueError, match="pooled"):
        flux(latents, torch.tensor(TIMESTEP), embeds)
    with pytest.raises(ValueError, match="mask"):
        flux(latents, torch.tensor(TIMESTEP), embeds, pooled, torch.ones(2, 12, dtype=torch.bool))
    zimage = DiNaRewardModel.from_base(build_tiny_transformer("zimage"), **TINY_FAMILY_DINA)
    latents, embeds, _, mask = prompt_inputs("zimage")
    with pytest.raises(ValueError, match="pooled"):
        zimage(latents, torch.tensor(TIMESTEP), embeds, torch.zeros(2, 16), mask)
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        zimage(latents, torch.tensor(TIMESTEP), embeds, None, mask[:, :5])
    with pytest.raises(TypeError, match="no DiNa backbone family"):
        backbone_type_for(torch.nn.Linear)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_folder_and_activation_checkpointing(family, tmp_path):
    """A self-contained (merged) folder loads without the base; checkpointing changes neither rewards nor grads."""
    latents, embeds, pooled, mask = prompt_inputs(family)
    results = []
    for checkpointing in (False, True):
        model = DiNaRewardModel.from_base(build_tiny_transformer(family), **TINY_FAMILY_DINA)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        if checkpointing:
            model.activation_checkpointing_enable()
        rewards = model(latents, torch.tensor(TIMESTEP), embeds, pooled, mask).rewards
        rewards.sum().backward()
        results.append((rewards.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*(r[1] for r in results), strict=True))

    model.eval().save_pretrained(tmp_path / "merged", merged=True)
    merged = DiNaRewardModel.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        expected = model(latents, torch.tensor(TIMESTEP), embeds, pooled, mask).rewards
        got = merged(latents, torch.tensor(TIMESTEP), embeds, pooled, mask).rewards
    assert torch.allclose(got, expected, atol=1e-5)
