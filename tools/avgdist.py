"""AvgDist of masking strategies versus mask ratio (Figure 3a): prints the table and saves a plot.

    python -m tools.avgdist                                  # Figure 3a's settings at 192 px
    python -m tools.avgdist --settings random:32 blockwise:16 --ratios 0.4 0.6 --num-masks 500

A setting is STRATEGY:MASK_PATCH_SIZE with a strategy of data.masking.MASK_GENERATORS (block-wise
masks use the DATA.BLOCKWISE defaults). Each cell pools --num-masks masks; the plot's x axis is the
masked fraction actually drawn (square masks only come in whole squares of mask patches). A cell is
empty where a mask would have no visible pixel (e.g. random:64 at 0.9 masks all 9 patches).
"""

import argparse
import math
import os
import sys

from PIL import Image, ImageDraw, ImageFont

from data.avgdist import mean_avg_dist
from data.masking import MASK_GENERATORS
from engine.launch import prepare_output_dir, run_tool
from utils.errors import ConfigError

FIGURE_3A_SETTINGS = [
    'random:4',
    'random:8',
    'random:16',
    'random:32',
    'random:64',
    'square:16',
    'square:32',
    'blockwise:16',
    'blockwise:32',
]
COLORS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


def parse_setting(text):
    strategy, _, size = text.partition(':')
    if strategy not in MASK_GENERATORS or not size.isdigit():
        raise argparse.ArgumentTypeError(
            f'setting {text!r} is not STRATEGY:MASK_PATCH_SIZE with a '
            f'strategy in {sorted(MASK_GENERATORS)}'
        )
    return strategy, int(size)


def measure(settings, ratios, img_size, model_patch_size, num_masks, seed):
    """{(strategy, mask_patch_size): [(ratio, masked_fraction, avg_dist) or (ratio, nan, nan)]}."""
    table = {}
    for strategy, mask_patch_size in settings:
        row = []
        for ratio in ratios:
            try:
                generator = MASK_GENERATORS[strategy](
                    img_size, mask_patch_size, model_patch_size, ratio
                )
            except ValueError as e:  # the generator names the size or ratio that does not fit
                raise ConfigError(
                    f'Setting {strategy}:{mask_patch_size} at ratio {ratio} with '
                    f'--img-size {img_size} and --model-patch-size '
                    f'{model_patch_size}: {e}'
                ) from None
            try:
                dist, fraction = mean_avg_dist(generator, num_masks, seed)
            except ValueError:  # a mask without visible pixels
                dist, fraction = math.nan, math.nan
            row.append((ratio, fraction, dist))
        table[(strategy, mask_patch_size)] = row
    return table


def format_table(table, ratios):
    """AvgDist in pixels, with the masked fraction drawn in parentheses."""
    lines = [
        'AvgDist (px), masked fraction in parentheses',
        f'{"setting":<14}' + ''.join(f'{r:>14.1f}' for r in ratios),
    ]
    for (strategy, size), row in table.items():
        cells = ['-' if math.isnan(d) else f'{d:.2f} ({f:.2f})' for _, f, d in row]
        lines.append(f'{strategy + ":" + str(size):<14}' + ''.join(f'{c:>14}' for c in cells))
    return '\n'.join(lines)


def _nice_step(span, ticks=6):
    raw = span / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)


def plot(table, path, title, size=(900, 560)):
    """Line plot of AvgDist versus masked fraction, one line per setting, as a PNG."""
    width, height = size
    left, right, top, bottom = 70, 190, 40, 60
    points = [(f, d) for row in table.values() for _, f, d in row if not math.isnan(d)]
    y_step = _nice_step(max(d for _, d in points))
    y_max = y_step * math.ceil(max(d for _, d in points) / y_step)

    def to_px(x, y):
        return (
            left + x * (width - left - right),
            height - bottom - y / y_max * (height - top - bottom),
        )

    image = Image.new('RGB', size, 'white')
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for i in range(11):  # x: masked fraction 0 ... 1
        x, y = to_px(i / 10, 0)
        draw.line([(x, top), (x, y)], fill=(230, 230, 230))
        draw.text((x - 8, y + 6), f'{i / 10:.1f}', fill='black', font=font)
    for i in range(round(y_max / y_step) + 1):
        x, y = to_px(0, i * y_step)
        draw.line([(x, y), (width - right, y)], fill=(230, 230, 230))
        draw.text((x - 40, y - 6), f'{i * y_step:g}', fill='black', font=font)
    draw.rectangle([to_px(0, y_max), to_px(1, 0)], outline='black')
    draw.text(((width - right) / 2 - 40, height - 25), 'masked fraction', fill='black', font=font)
    draw.text((10, top - 30), 'AvgDist (px)', fill='black', font=font)
    draw.text((left + 120, 10), title, fill='black', font=font)
    for k, ((strategy, mask_size), row) in enumerate(table.items()):
        color = COLORS[k % len(COLORS)]
        line = [to_px(f, d) for _, f, d in sorted(row, key=lambda r: r[1]) if not math.isnan(d)]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        for x, y in line:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        legend_y = top + 18 * k
        draw.line(
            [(width - right + 15, legend_y + 6), (width - right + 40, legend_y + 6)],
            fill=color,
            width=3,
        )
        draw.text(
            (width - right + 48, legend_y), f'{strategy} {mask_size}px', fill='black', font=font
        )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--settings',
        nargs='+',
        type=parse_setting,
        default=[parse_setting(s) for s in FIGURE_3A_SETTINGS],
        metavar='STRATEGY:MASK_PATCH_SIZE',
    )
    parser.add_argument(
        '--ratios', nargs='+', type=float, default=[round(0.1 * i, 1) for i in range(1, 10)]
    )
    parser.add_argument('--img-size', type=int, default=192)
    parser.add_argument(
        '--model-patch-size',
        type=int,
        default=4,
        help='mask resolution of the encoder (4 for Swin, 16 for ViT)',
    )
    parser.add_argument('--num-masks', type=int, default=100, help='masks per cell')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--output', default='docs/images/avgdist.png', help='PNG plot path')
    args = parser.parse_args(argv)
    if args.num_masks < 1:
        raise ConfigError(f'--num-masks must be at least 1, got {args.num_masks}.')
    table = measure(
        args.settings, args.ratios, args.img_size, args.model_patch_size, args.num_masks, args.seed
    )
    print(
        f'image {args.img_size}px, model patch {args.model_patch_size}px, {args.num_masks} masks '
        f'per cell'
    )
    print(format_table(table, args.ratios))
    if all(math.isnan(d) for row in table.values() for _, _, d in row):
        raise ConfigError(
            'Every mask asked for masks the whole image, where AvgDist is undefined; '
            'nothing to plot. Use lower --ratios or smaller mask patch sizes.'
        )
    prepare_output_dir(os.path.dirname(os.path.abspath(args.output)))
    plot(table, args.output, f'AvgDist vs masked fraction, {args.img_size}x{args.img_size} images')
    print(f'plot saved to {args.output}')
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
