"""Find the compressible parts of a transformer from its own modules.

No list of BERT names: the transformer blocks are the longest ``nn.ModuleList`` of identical
modules that hold Linear layers; inside a block, shapes tell the roles apart. The FFN expands the
hidden size (``up``: hidden -> intermediate, including a gated MLP's gate) and contracts it back
(``down``: intermediate -> hidden); every other Linear that reads or writes the hidden size is
attention. The token embedding is the model's ``get_input_embeddings()`` when it has one, else its
largest ``nn.Embedding``; any other table outside the blocks (positions, token types) is listed too.
A language model's output projection (``get_output_embeddings()``, tied to the token table or not)
is the ``output_head``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import nn


class LayoutError(ValueError):
    """The model has no structure slimtune can compress."""


@dataclass(frozen=True)
class BlockLayout:
    name: str
    attention: tuple[str, ...]
    ffn_up: tuple[str, ...]
    ffn_down: tuple[str, ...]

    @property
    def ffn(self) -> tuple[str, ...]:
        return self.ffn_up + self.ffn_down

    @property
    def linears(self) -> tuple[str, ...]:
        return self.attention + self.ffn


@dataclass(frozen=True)
class ModelLayout:
    blocks: tuple[BlockLayout, ...]
    embedding: str | None
    hidden_size: int
    linear_shapes: tuple[tuple[str, int, int], ...] = ()  # (name, in_features, out_features)
    other_tables: tuple[str, ...] = ()  # lookup tables outside the blocks besides the token table (positions, types)
    output_head: str | None = None  # a language model's output projection (LM head) outside the blocks

    def shape(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of a Linear in the original model."""
        for linear, n_in, n_out in self.linear_shapes:
            if linear == name:
                return n_in, n_out
        raise KeyError(name)

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for block in self.blocks for name in block.linears)


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and the module of the model's list of transformer blocks."""
    return _block_list(model)


def _block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        n_linear = sum(isinstance(m, nn.Linear) for m in module.modules())
        if n_linear and (best is None or (len(module), n_linear) > (len(best[2]), best[0])):
            best = (n_linear, name, module)
    if best is None:
        if any(type(m).__name__ == "Conv1D" for m in model.modules()):
            raise LayoutError("the model's layers are Conv1D with fused projections (GPT-2 style), which slimtune "
                              "does not compress: it reads nn.Linear layers (Llama, Qwen2, Mistral, BERT-style models)")
        raise LayoutError("model has no list of transformer blocks with Linear layers; slimtune compresses transformers")
    return best[1], best[2]


def _block_layout(name: str, block: nn.Module) -> tuple[BlockLayout, int]:
    linears = [(f"{name}.{sub}", m) for sub, m in block.named_modules() if isinstance(m, nn.Linear)]
    hidden = Counter(m.in_features for _, m in linears).most_common(1)[0][0]
    widest = max(m.out_features for _, m in linears)
    ffn_up = tuple(n for n, m in linears if m.in_features == hidden and m.out_features == widest > hidden)
    ffn_down = tuple(n for n, m in linears if m.in_features == widest and m.out_features == hidden)
    if not (ffn_up and ffn_down):
        ffn_up, ffn_down = (), ()
    ffn = set(ffn_up + ffn_down)
    attention = tuple(
        n for n, m in linears if n not in ffn and hidden in (m.in_features, m.out_features)
    )
    return BlockLayout(name=name, attention=attention, ffn_up=ffn_up, ffn_down=ffn_down), hidden


def _embedding_name(model: nn.Module) -> str | None:
    names = {id(m): n for n, m in model.named_modules()}
    get = getattr(model, "get_input_embeddings", None)
    table = get() if callable(get) else None
    if isinstance(table, nn.Embedding) and id(table) in names:
        return names[id(table)]
    embeddings = [(m.num_embeddings, n) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    return max(embeddings)[1] if embeddings else None


def _output_head_name(model: nn.Module, list_name: str) -> str | None:
    """The model's ``get_output_embeddings()`` when it is a Linear outside the blocks (a causal LM's head)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear):
        return None
    name = next((n for n, m in model.named_modules() if m is head), None)
    return name if name is not None and not name.startswith(list_name + ".") else None


def discover_layout(model: nn.Module) -> ModelLayout:
    """Blocks, their attention and FFN Linears, and the token embedding, by module name."""
    list_name, blocks = _block_list(model)
    # Keys, not positions: after depth pruning the surviving blocks keep their original names.
    layouts, hiddens = zip(*(_block_layout(f"{list_name}.{key}", b) for key, b in blocks.named_children()),
                           strict=True)
    modules = dict(model.named_modules())
    shapes = tuple(
        (name, modules[name].in_features, modules[name].out_features) for b in layouts for name in b.linears
    )
    embedding = _embedding_name(model)
    others = tuple(name for name, module in model.named_modules() if isinstance(module, nn.Embedding)
                   and name != embedding and not name.startswith(list_name + "."))
    return ModelLayout(blocks=tuple(layouts), embedding=embedding, hidden_size=hiddens[0],
                       linear_shapes=shapes, other_tables=others, output_head=_output_head_name(model, list_name))


# Rotary variants whose frequencies change with the sequence length: a fixed cos/sin cache cannot hold them.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


@dataclass(frozen=True)
class DecoderGeometry:
    """The attention geometry of a rotary decoder (Llama, Mistral, Qwen2), read once from the model.

    ``head_dim``: features per head; ``query_heads`` / ``kv_heads``: the original model's counts (a
    pruned block has fewer: exporters read each block's counts from its weights); ``inv_freq``: the
    rotary inverse frequencies (radians per position, ``head_dim / 2`` of them, scaling variants
    such as llama3 or YaRN already applied); ``rotary_scale``: the factor on cos and sin;
    ``norm_eps``: the RMS norms' epsilon; ``max_positions``: positions the cos/sin cache covers
    (tokens); ``sliding_windows``: per block index, the attention window in tokens (None: full).
    """

    head_dim: int
    query_heads: int
    kv_heads: int
    inv_freq: tuple[float, ...]
    rotary_scale: float
    norm_eps: float
    max_positions: int
    sliding_windows: tuple[int | None, ...]
    activation: str

    @property
    def rotary_dim(self) -> int:
        return 2 * len(self.inv_freq)


def decoder_geometry(model: nn.Module) -> DecoderGeometry | None:
    """The geometry of a ``...ForCausalLM`` with a rotary embedding module and RMS norms, else None
    (no rotary module, a rotary variant that depends on the length, a partial rotary)."""
    config = getattr(model, "config", None)
    base = getattr(model, "model", None)
    rotary = getattr(base, "rotary_emb", None)
    if config is None or rotary is None or not hasattr(rotary, "inv_freq"):
        return None
    if getattr(rotary, "rope_type", "default") in _LENGTH_DEPENDENT_ROPE:
        return None
    query_heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // query_heads
    inv_freq = tuple(float(f) for f in rotary.inv_freq.detach().float().tolist())
    if 2 * len(inv_freq) != head_dim:
        return None
    blocks = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * blocks
    if getattr(config, "use_sliding_window", True) is False:
        types = ["full_attention"] * blocks
    windows = tuple(int(window) if kind == "sliding_attention" and window else None for kind in types)
    return DecoderGeometry(
        head_dim=int(head_dim), query_heads=query_heads,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or query_heads), inv_freq=inv_freq,
        rotary_scale=float(getattr(rotary, "attention_scaling", 1.0)), norm_eps=float(config.rms_norm_eps),
        max_positions=int(config.max_position_embeddings), sliding_windows=windows,
        activation=str(getattr(config, "hidden_act", "")))
