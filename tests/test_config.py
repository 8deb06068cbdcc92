"""DiNaConfig: released defaults, validation, Auto classes, hub configs."""

import pytest
import torch
from transformers import AutoConfig

from modeling_dina import DiNaConfig, DiNaRewardModel
from modeling_dina.training import DiNaTrainingArguments


def test_released_defaults(tmp_path):
    c = DiNaConfig()
    args = DiNaTrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    assert c.base_model_name_or_path == "stabilityai/stable-diffusion-3.5-medium"
    assert (c.num_backbone_layers, c.visual_layers, c.text_layers) == (12, [4, 8, 12], [4, 8, 12])
    assert (c.lora_rank, c.lora_alpha, c.lora_init) == (64, 128, "gaussian")
    assert (c.token_dim, c.resolved_head_width, c.resolved_head_feature_width) == (1536, 1536, 384)
    assert (c.head_num_queries, c.head_num_attention_heads, c.use_logistic) == (4, 8, False)
    assert (args.loss_type, args.loss_form, c.variance_scale, c.variance_floor) == ("thurstone", "fidelity", 2.0, 0.05)
    assert (args.noise_sampling, args.resolve_with(c)["variance_scale"]) == ("uniform", 2.0)
    assert (c.noise_level_latents, c.ensemble_noise_levels, c.max_sequence_length) == (0.4, [0.2, 0.5, 0.7], 128)
    assert (c.score_offset, c.score_scale) == (10.0, 10.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"visual_layers": [4, 13]}, "outside 0..12"),
        ({"num_backbone_layers": 30}, "beyond the base"),
        ({"head_num_attention_heads": 7}, "not divisible"),
        ({"num_backbone_layers": 24, "visual_layers": [24], "text_layers": [24]}, "no text stream"),
        ({"loss_type": "hinge"}, "unknown `loss_type`"),
        ({"loss_form": "mse"}, "unknown `loss_form`"),
        ({"ensemble_noise_levels": [0.2, 1.5]}, r"\[0, 1\]"),
        ({"noise_level_latents": -0.1}, r"\[0, 1\]"),
        ({"ensemble_noise_levels": []}, "must not be empty"),
        ({"noise_sampling": "cosine"}, "noise_sampling"),
        ({"visual_layers": [8, 4]}, "increasing"),
    ],
)
def test_validation_names_the_problem(kwargs, message):
    with pytest.raises(Exception, match=message):
        DiNaConfig(**kwargs)


def test_round_trip_and_auto_config(tmp_path):
    c = DiNaConfig(num_backbone_layers=8, visual_layers=[2, 8], text_layers=[8], loss_type="bt")
    c.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    drop = {"_name_or_path", "auto_map"}
    assert isinstance(loaded, DiNaConfig)
    assert {k: v for k, v in loaded.to_dict().items() if k not in drop} == {
        k: v for k, v in c.to_dict().items() if k not in drop
    }


def test_hub_configs_build_on_meta():
    config = DiNaConfig.from_pretrained("hub_configs/dina-sd35m-12layers")
    assert config.to_dict() | {"_name_or_path": ""} == {
        k: v for k, v in DiNaConfig().to_dict().items() if k != "auto_map"
    } | {"_name_or_path": ""}
    with torch.device("meta"):
        model = DiNaRewardModel(config)
    counts = {
        "lora": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n),
        "head": sum(p.numel() for p in model.reward_head.parameters()),
    }
    # 12 blocks x 12 LoRA targets (attn 4 + attn2 4 + context 4) x r(64) x (1536 + 1536)
    assert counts["lora"] == 12 * 12 * 64 * (1536 + 1536)
    assert counts["head"] == 139_296_003
    tiny = DiNaConfig.from_pretrained("hub_configs/tiny")
    assert tiny.num_backbone_layers == 2 and tiny.token_dim == 32


@pytest.mark.parametrize(
    "name, family, lora",
    [
        # 19 double-stream blocks x 8 attention projections x r64 x (3072 in + 3072 out)
        ("dina-flux1dev-19layers", "flux", 19 * 8 * 64 * (3072 + 3072)),
        # (16 layers + 2 noise + 2 context refiners) x to_q/k/v/out.0 x r32 x (3840 + 3840)
        ("dina-zimage-turbo-16layers", "zimage", 20 * 4 * 32 * (3840 + 3840)),
        ("dina-qwenimage-20layers", "qwenimage", 20 * 8 * 64 * (3072 + 3072)),
    ],
)
def test_family_hub_configs_build_on_meta(name, family, lora):
    config = DiNaConfig.from_pretrained(f"hub_configs/{name}")
    assert config.backbone_type == family and config.head_use_proj_in and config.resolved_head_width == 1536
    with torch.device("meta"):
        model = DiNaRewardModel(config)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == lora
    adapter = model.reward_head.layer_adapters_visual[0]
    assert adapter.proj_in.in_features == config.token_dim and adapter.proj_in.out_features == 1536
    assert adapter.cond_mlp[0].in_features == (256 if family == "zimage" else 3072)
    if family == "flux":  # the head by hand: 8 FiLM adapters 3072 -> 1536, aggregation, queries, attention, FFN, out
        film = (3072 * 1536 + 1536) + 1536 + 2 * (3072 * 3072 + 3072) + (1536 * 384 + 384)
        linear = 1536 * 1536 + 1536
        gates = 2 * (linear + 1536 + 1)
        attention = 3 * 1536 + 6 * linear + gates + 2 * 1536 + 4 * linear
        ffn = 1536 + (1536 * 6144 + 6144) + (6144 * 1536 + 1536)
        head = 8 * film + 2 * linear + 4 * 1536 + attention + ffn + 1537
        assert sum(p.numel() for p in model.reward_head.parameters()) == head == 245_492_739
