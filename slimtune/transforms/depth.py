"""Depth pruning (Minitron depth): remove whole transformer blocks.

Which blocks go is decided where the plan is made, from the block importance measured once on
calibration texts (``Calibration.least_important_blocks``); the plan names them, so a plan
rebuilds the same model anywhere. The surviving blocks keep their original names (the block
list keeps its keys), so every other entry of the plan, and every exported node name, still
refers to the module it was made for.
"""

from __future__ import annotations

from torch import nn

from slimtune.layout import block_list
from slimtune.plan import CompressionPlan, PlanError
from slimtune.transforms.calibration import Calibration


def drop_blocks(model: nn.Module, plan: CompressionPlan, calibration: Calibration | None = None) -> nn.Module:
    """Remove the blocks in ``plan.depth_prune`` from ``model`` in place; at least one block stays."""
    if not plan.depth_prune:
        return model
    list_name, blocks = block_list(model)
    present = {f"{list_name}.{key}": key for key in blocks._modules}
    unknown = sorted(set(plan.depth_prune) - set(present))
    if unknown:
        raise PlanError(f"depth_prune names {unknown[0]!r}, which is not a transformer block of this model "
                        f"(blocks: {list_name}.0 ...)")
    if len(plan.depth_prune) >= len(present):
        raise PlanError("depth_prune removes every transformer block; keep at least one")
    dropped = {present[name] for name in plan.depth_prune}
    # Rebuild the list's key -> module map without the dropped keys (ModuleList iterates its values).
    kept = [(key, module) for key, module in blocks._modules.items() if key not in dropped]
    blocks._modules.clear()
    blocks._modules.update(kept)
    # The config keeps its block count: blocks carry their own index (caches, per-layer attention
    # types are looked up by it), and models that slice their list by the count still get every block.
    return model
