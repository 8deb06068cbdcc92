"""The DiNa-LRM reward head (SPEC §3): FiLM adapters per tapped layer, learned queries, two cross-attention blocks,
a feed-forward and a linear read-out averaged over the queries. Parameter names follow the released checkpoint."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class FiLMLayerAdapter(nn.Module):
    """One tapped layer's tokens, modulated by the timestep embedding: `x (1 + gamma) + beta + layer_embed`."""

    def __init__(self, token_dim: int, temb_dim: int, width: int, feature_width: int, use_proj_in: bool = False):
        super().__init__()
        self.proj_in = nn.Linear(token_dim, width) if use_proj_in or token_dim != width else nn.Identity()
        self.layer_embed = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.cond_mlp = nn.Sequential(nn.Linear(temb_dim, 2 * width), nn.SiLU(), nn.Linear(2 * width, 2 * width))
        self.proj = nn.Linear(width, feature_width)
        # Starts as "no modulation".
        nn.init.zeros_(self.cond_mlp[-1].weight)
        nn.init.zeros_(self.cond_mlp[-1].bias)

    def forward(self, tokens: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.cond_mlp(temb).unsqueeze(1).chunk(2, dim=-1)
        return self.proj(self.proj_in(tokens) * (1 + gamma) + beta + self.layer_embed)


def _gate(width: int) -> nn.Sequential:
    """Per-token scalar gate on the values; starts at sigmoid(0) = 1/2 for every token."""
    gate = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))
    nn.init.zeros_(gate[-1].weight)
    nn.init.zeros_(gate[-1].bias)
    return gate


class GatedCrossAttention(nn.Module):
    """Queries attend over image tokens and, separately, text tokens; the two results are summed (residual)."""

    def __init__(self, width: int, num_heads: int, use_text: bool, use_gates: bool, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.norm_q = nn.RMSNorm(width)
        self.norm_v = nn.RMSNorm(width)
        self.to_q = nn.Linear(width, width)
        self.to_k_vis = nn.Linear(width, width)
        self.to_v_vis = nn.Linear(width, width)
        self.gate_vis = _gate(width) if use_gates else None
        if use_text:
            self.norm_t = nn.RMSNorm(width)
            self.to_k_text = nn.Linear(width, width)
            self.to_v_text = nn.Linear(width, width)
            self.gate_text = _gate(width) if use_gates else None
        self.use_text = use_text
        self.to_out = nn.Sequential(nn.Linear(width, width), nn.Dropout(dropout))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, heads = q.shape[0], self.num_heads
        q, k, v = (x.view(b, x.shape[1], heads, -1).transpose(1, 2) for x in (q, k, v))
        mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, -1, heads * q.shape[-1])

    def _branch(self, q, tokens, norm, to_k, to_v, gate, mask=None):
        tokens = norm(tokens)
        v = to_v(tokens)
        if gate is not None:
            v = v * torch.sigmoid(gate(tokens))
        return self._attend(q, to_k(tokens), v, mask)

    def forward(
        self,
        queries: torch.Tensor,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ):
        """`text_mask` `(B, N_text)` bool: the text tokens attended to (all when `None`)."""
        q = self.to_q(self.norm_q(queries))
        out = self._branch(q, image_tokens, self.norm_v, self.to_k_vis, self.to_v_vis, self.gate_vis)
        if self.use_text and text_tokens is not None:
            out = out + self._branch(
                q, text_tokens, self.norm_t, self.to_k_text, self.to_v_text, self.gate_text, text_mask
            )
        return queries + self.to_out(out)


class DiNaRewardHead(nn.Module):
    """Tapped backbone tokens (+ timestep embedding) -> one raw reward per sample."""

    def __init__(
        self,
        token_dim: int,
        temb_dim: int,
        num_visual_layers: int,
        num_text_layers: int,
        width: int,
        feature_width: int,
        num_queries: int = 4,
        num_heads: int = 8,
        dropout: float = 0.0,
        use_proj_in: bool = False,
        use_logistic: bool = False,
    ):
        super().__init__()

        def adapters(n):
            return nn.ModuleList(
                FiLMLayerAdapter(token_dim, temb_dim, width, feature_width, use_proj_in) for _ in range(n)
            )

        self.layer_adapters_visual = adapters(num_visual_layers)
        self.layer_adapters_text = adapters(num_text_layers)
        self.agg_visual = nn.Linear(num_visual_layers * feature_width, width)
        self.agg_text = nn.Linear(num_text_layers * feature_width, width) if num_text_layers else None
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, width) * 0.02)
        self.attn1 = GatedCrossAttention(
            width, num_heads, use_text=num_text_layers > 0, use_gates=True, dropout=dropout
        )
        self.attn2 = GatedCrossAttention(width, num_heads, use_text=False, use_gates=False, dropout=dropout)
        self.norm_ff = nn.RMSNorm(width)
        self.ff = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout)
        )
        self.head = nn.Linear(width, 1)
        if use_logistic:
            self.logistic_center = nn.Parameter(torch.tensor(0.0))
            self.logistic_scale = nn.Parameter(torch.tensor(0.15))
        self.use_logistic = use_logistic

    @classmethod
    def from_config(cls, config, token_dim: int, temb_dim: int) -> DiNaRewardHead:
        """The head a `DiNaConfig` describes, on a backbone with these token and time-embedding widths."""
        return cls(
            token_dim=token_dim,
            temb_dim=temb_dim,
            num_visual_layers=len(config.visual_layers),
            num_text_layers=len(config.text_layers),
            width=config.resolved_head_width,
            feature_width=config.resolved_head_feature_width,
            num_queries=config.head_num_queries,
            num_heads=config.head_num_attention_heads,
            dropout=config.head_dropout,
            use_proj_in=config.head_use_proj_in,
            use_logistic=config.use_logistic,
        )

    @staticmethod
    def _tokens(adapters, agg, features, temb, num_levels):
        """Adapter outputs concatenated on channels, projected; the K noise levels concatenated on tokens."""
        tokens = agg(torch.cat([adapter(x, temb) for adapter, x in zip(adapters, features)], dim=-1))
        k_b, n, width = tokens.shape
        return _levels_side_by_side(tokens, num_levels)

    def forward(
        self,
        visual_features: list[torch.Tensor],
        text_features: list[torch.Tensor],
        temb: torch.Tensor,
        num_levels: int = 1,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Features of shape (K*B, N, C), level-major, and `temb` (K*B, C) -> raw rewards (B,). `text_mask`
        (K*B, N_text) bool marks real text tokens for families with variable-length prompts (`None`: all are)."""
        if len(visual_features) != len(self.layer_adapters_visual):
            raise ValueError(
                f"expected {len(self.layer_adapters_visual)} image feature maps, got {len(visual_features)}."
            )
        if len(text_features) != len(self.layer_adapters_text):
            raise ValueError(f"expected {len(self.layer_adapters_text)} text feature maps, got {len(text_features)}.")
        image_tokens = self._tokens(self.layer_adapters_visual, self.agg_visual, visual_features, temb, num_levels)
        text_tokens = None
        if self.agg_text is not None:
            text_tokens = self._tokens(self.layer_adapters_text, self.agg_text, text_features, temb, num_levels)
        if text_mask is not None:
            text_mask = _levels_side_by_side(text_mask.unsqueeze(-1), num_levels).squeeze(-1)

        queries = self.query_tokens.expand(image_tokens.shape[0], -1, -1)
        queries = self.attn1(queries, image_tokens, text_tokens, text_mask)
        queries = self.attn2(queries, image_tokens)
        queries = queries + self.ff(self.norm_ff(queries))
        # The read-out runs in fp32: in bf16 a reward keeps 8 mantissa bits, too coarse to rank close candidates.
        reward = F.linear(queries.float(), self.head.weight.float(), self.head.bias.float()).mean(dim=1).squeeze(-1)
        if self.use_logistic:
            # (2 - (-2)) / (1 + exp(-(r - c) / (|k| + 1e-6))) - 2: a learned squashing into (-2, 2).
            center, scale = self.logistic_center.float(), self.logistic_scale.float()
            reward = 4.0 * torch.sigmoid((reward - center) / (scale.abs() + 1e-6)) - 2.0
        return reward


def _levels_side_by_side(tokens: torch.Tensor, num_levels: int) -> torch.Tensor:
    """(K*B, N, C) level-major rows (level k of sample b at k * B + b) -> (B, K*N, C): each sample's K token sets."""
    k_b, n, width = tokens.shape
    return tokens.view(num_levels, k_b // num_levels, n, width).transpose(0, 1).reshape(-1, num_levels * n, width)
