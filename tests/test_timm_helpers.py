"""The timm helpers this project adopted give what the formulas they replaced give: the Swin/BEiT
relative position index, the SwinV2 log-spaced offsets, the bicubic position-embedding resize, and
model unwrapping (each checked against a reference written out here)."""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.utils import unwrap_model
from torch.nn.parallel import DistributedDataParallel

from models.attention import relative_position_index
from models.swin_transformer_v2 import log_spaced_coords_table
from utils.pos_embed import resize_abs_pos_embed


def reference_relative_position_index(wh, ww):
    """index[i, j] = (dy + Wh - 1) * (2Ww - 1) + (dx + Ww - 1) for the offset (dy, dx) = pos_i -
    pos_j."""
    positions = [(y, x) for y in range(wh) for x in range(ww)]
    return torch.tensor(
        [
            [(yi - yj + wh - 1) * (2 * ww - 1) + (xi - xj + ww - 1) for (yj, xj) in positions]
            for (yi, xi) in positions
        ]
    )


def test_relative_position_index_is_the_swin_formula():
    for window in ((1, 1), (2, 2), (2, 3), (7, 7), (3, 6)):
        index = relative_position_index(window)
        assert index.dtype == torch.int64
        assert torch.equal(index, reference_relative_position_index(*window))
    assert relative_position_index((2, 2)).tolist() == [
        [4, 3, 1, 0],
        [5, 4, 2, 1],
        [7, 6, 4, 3],
        [8, 7, 5, 4],
    ]


def test_log_spaced_coords_table_is_the_swinv2_formula():
    def reference(d, norm):  # sign(d) * log2(1 + |8 d / (norm - 1)|) / log2(8)
        v = 8 * d / (norm - 1)
        return math.copysign(math.log2(1 + abs(v)) / 3, v) if v else 0.0

    for window, pretrained in (((3, 4), (0, 0)), ((6, 6), (0, 0)), ((12, 12), (6, 6))):
        table = log_spaced_coords_table(window, pretrained)
        norm = pretrained if pretrained[0] else window
        assert table.shape == (1, 2 * window[0] - 1, 2 * window[1] - 1, 2)
        for i, dy in enumerate(range(-(window[0] - 1), window[0])):
            for j, dx in enumerate(range(-(window[1] - 1), window[1])):
                expected = torch.tensor([reference(dy, norm[0]), reference(dx, norm[1])])
                torch.testing.assert_close(table[0, i, j], expected)


def test_abs_pos_embed_resize_is_plain_bicubic_without_antialiasing():
    torch.manual_seed(0)
    for src, dst, extra in ((14, (16, 16), 1), (14, (7, 7), 1), (6, (4, 9), 0)):
        pos = torch.randn(1, extra + src * src, 8)
        grid = pos[:, extra:].reshape(1, src, src, 8).permute(0, 3, 1, 2)
        expected = F.interpolate(grid, size=dst, mode='bicubic', align_corners=False)
        expected = torch.cat([pos[:, :extra], expected.permute(0, 2, 3, 1).reshape(1, -1, 8)], 1)
        torch.testing.assert_close(resize_abs_pos_embed(pos, dst, extra), expected, rtol=0, atol=0)


def test_unwrap_model_removes_ddp_and_compile_in_any_order(tmp_path):
    model = torch.nn.Linear(2, 2)
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    try:
        for wrapped in (
            model,
            DistributedDataParallel(model),
            torch.compile(model),
            DistributedDataParallel(torch.compile(model)),
            torch.compile(DistributedDataParallel(model)),
        ):
            assert unwrap_model(wrapped) is model
    finally:
        dist.destroy_process_group()
