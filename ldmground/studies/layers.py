"""Cross-attention layers by place, not by index: block and resolution of each layer, and the
paper's layer choice carried to another UNet by resolution.

Indices count the ``attn2`` layers in forward order (:func:`ldmground.method.attention.
cross_attention_layers`), so the same index means different places in different UNets. The
paper's layers {3, 4, 6, 7} of the MONAI UNet (64 x 64 latent) are four of its six layers at
its coarsest cross-attention resolution, 16 x 16: the second of the down path, the middle
block's, the second and third of the first up block. On another UNet the closest choice is
its own coarsest cross-attention layers (:func:`paper_equivalent`).
"""

from __future__ import annotations

import re

import pandas as pd

PAPER_LAYERS = (3, 4, 6, 7)
"""The paper's layer indices on the MONAI UNet (64 x 64 latent): all at 16 x 16."""


def _block(name: str) -> str:
    match = re.match(r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)", name)
    if match:
        kind, block, k = match.groups()
        return f"{kind} {block}.{k}"
    return "mid"


def layer_table(pipe) -> pd.DataFrame:
    """One row per cross-attention layer: ``layer`` (index), ``block`` (e.g. ``down 1.0``:
    down block 1, its attention 0; ``mid``; ``up 0.2``), ``resolution`` (side of its map in
    latent cells) and ``label`` (e.g. ``3 · down 2.1 · 16x16``).

    The resolution is measured: one forward pass of the UNet on a zero latent with forward
    hooks on the layers (a few milliseconds for the demo model)."""
    import torch

    from ..method.attention import cross_attention_layers

    names = cross_attention_layers(pipe.unet)
    modules = dict(pipe.unet.named_modules())
    sides: dict[str, int] = {}
    hooks = []
    for name in names:
        module = modules[name.removesuffix(".processor")]

        def hook(mod, args, kwargs, output, name=name):
            hidden = args[0] if args else kwargs["hidden_states"]
            sides[name] = int(round(hidden.shape[1] ** 0.5))

        hooks.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        unet = pipe.unet
        size = pipe.image_size // 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        latent = torch.zeros(1, unet.config.in_channels, size, size, device=unet.device, dtype=unet.dtype)
        context = torch.zeros(1, 1, unet.config.cross_attention_dim, device=unet.device, dtype=unet.dtype)
        with torch.no_grad():
            unet(latent, 0, encoder_hidden_states=context)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for i, name in enumerate(names):
        block, side = _block(name), sides[name]
        rows.append({"layer": i, "block": block, "resolution": side, "label": f"{i} · {block} · {side}x{side}"})
    return pd.DataFrame(rows)


def paper_equivalent(table: pd.DataFrame) -> tuple[int, ...]:
    """The layers at the coarsest cross-attention resolution of this UNet: where the paper's
    choice sits on its own UNet."""
    coarsest = table["resolution"].min()
    return tuple(int(i) for i in table.loc[table["resolution"] == coarsest, "layer"])


def describe(table: pd.DataFrame, layers) -> str:
    """``{1, 2, 3} (down 1.0, mid, up 0.0; 8x8)``: indices with their blocks and resolutions."""
    if layers is None:
        layers = table["layer"].tolist()
    rows = table.set_index("layer").loc[list(layers)]
    sizes = sorted({f"{r}x{r}" for r in rows["resolution"]}, key=lambda s: -int(s.split("x")[0]))
    return f"{{{', '.join(str(i) for i in layers)}}} ({', '.join(rows['block'])}; {', '.join(sizes)})"
