"""The image pyramid the patch stream samples from, for antialiased patches.

Each source image is stored at LEVELS_PER_OCTAVE sizes per octave, packed into one texture; a
patch samples the level that matches its shrink (data/patches.py), so a 960 -> 32 shrink matches
Pillow's antialiased resize instead of aliasing.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Antialiasing: the source is prefiltered at LEVELS_PER_OCTAVE sizes per octave; a patch
# samples (bilinear) the level k = floor(LEVELS_PER_OCTAVE * log2(source pixels per output
# pixel)), i.e. the smallest level whose texels are not larger than the output pixels.
# Output pixels are then 1 to 1.41 texels apart: no aliasing, little extra blur.
LEVELS_PER_OCTAVE = 2


class Pyramid:
    """An image at LEVELS_PER_OCTAVE sizes per octave (level k: 2^(-k/2) x the size), each
    level made from the full image with the antialiased bicubic resize Pillow uses
    (`F.interpolate(antialias=True)`), all shelf-packed into one texture so one
    `grid_sample` call serves every patch of the image.

    Each level has a one-texel replicated border, so a bilinear sample up to half a texel
    outside a level reads that level's edge, never its neighbour. `table[k] = (x offset,
    y offset, width, height)` of level k's interior. Values are clamped to [0, 1] (the
    bicubic filter rings slightly), so every sample is in [0, 1].
    """

    def __init__(self, image: torch.Tensor, min_side: int = 4):
        h0, w0 = image.shape[1:]
        levels = [image[None].clamp(0.0, 1.0)]
        k = 1
        while True:
            f = 2.0 ** (-k / LEVELS_PER_OCTAVE)
            h, w = round(h0 * f), round(w0 * f)
            if min(h, w) < min_side:
                break
            lv = F.interpolate(image[None], size=(h, w), mode="bicubic", antialias=True, align_corners=False)
            levels.append(lv.clamp_(0.0, 1.0))
            k += 1
        # shelf packing, largest first; shelf width = the two largest levels side by side
        sizes = [(lv.shape[2] + 2, lv.shape[3] + 2) for lv in levels]
        width = sizes[0][1] + (sizes[1][1] if len(sizes) > 1 else 0)
        places, x, y, shelf_h = [], 0, 0, 0
        for h, w in sizes:
            if x + w > width:
                x, y, shelf_h = 0, y + shelf_h, 0
            places.append((x, y))
            x, shelf_h = x + w, max(shelf_h, h)
        height = y + shelf_h
        tex = image.new_zeros(1, 3, height, width)
        for (ox, oy), lv in zip(places, levels):
            h, w = lv.shape[2:]
            tex[:, :, oy:oy + h + 2, ox:ox + w + 2] = F.pad(lv, (1, 1, 1, 1), mode="replicate")
        self.texture = tex.contiguous(memory_format=torch.channels_last)
        self.table = np.array([(ox + 1, oy + 1, lv.shape[3], lv.shape[2])
                               for (ox, oy), lv in zip(places, levels)], dtype=np.float64)
        self.max_level = len(levels) - 1
        self.height, self.width = h0, w0
