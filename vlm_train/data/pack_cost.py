"""Training FLOPs of one sample from its sizes: what the packer balances packs by (data.pack.flops_corridor).

Data must not import the model, so the coefficients live here and are filled from the model config by
`vlm_train.model.flops.flops_cost`, from the same terms as the model's own FLOPs count (tests check they agree).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass  # not frozen: it is a structured config (data.pack.flops_cost), which OmegaConf merges into
class FlopsCost:
    """Training FLOPs of one sample from its sizes; built from the model config by model.flops.flops_cost.

    The terms of model.flops (matmuls only, forward + backward): per LLM token, per sample length squared (LLM
    attention), per supervised token (LM head), per ViT patch, per merge unit (projector), per image frame's
    patches squared (full-attention blocks) and per window's patches squared (window-attention blocks). A pack's
    FLOPs are the sum over its samples, plus `no_image` when it holds no image (the dummy image).
    """

    token: int
    token_pair: int
    supervised: int
    patch: int
    unit: int
    frame_pair: int
    window_pair: int
    merge: int = 2
    window_units: int = 0  # window side in merge units; 0: no window attention
    no_image: int = 0

    def sample(self, tokens: int, supervised: int, patches: int, grids: tuple[tuple[int, int, int], ...]) -> int:
        """FLOPs of a sample of `tokens` LLM tokens (`supervised` of them learnt) and images of these patch grids
        (t, h, w) of which `patches` patches are kept (exact when none is dropped, else each image's attention is
        estimated as if it kept the sample's share of its patches)."""
        flops = tokens * self.token + tokens * tokens * self.token_pair + supervised * self.supervised
        if not grids:
            return flops
        unit, side = self.merge * self.merge, self.window_units
        frames = windows = 0
        for t, h, w in grids:
            frames += t * (h * w) ** 2
            if side:
                windows += t * unit * unit * _squares(h // self.merge, side) * _squares(w // self.merge, side)
        pairs = frames * self.frame_pair + windows * self.window_pair
        full = sum(t * h * w for t, h, w in grids)
        if patches != full:  # dropped merge units: attention shrinks with the kept share squared
            pairs = round(pairs * (patches / full) ** 2)
        return flops + patches * self.patch + patches // unit * self.unit + pairs


def _squares(units: int, window: int) -> int:
    """Sum of squared window sides along one axis of `units` merge units: full windows, then the partial edge."""
    return (units // window) * window * window + (units % window) ** 2
