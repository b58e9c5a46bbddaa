"""Train the discrete VAE tokenizer of the dvae_tokens target (BEiT's target, Table 5) on your own
images, and write it as safetensors with its architecture in the metadata.

    python -m tools.train_dvae /data/imagenet/train output/dvae_8192.safetensors \
        --vocab-size 8192 --hidden-dim 256 --num-groups 4 --image-size 112 --steps 100000
    python -m tools.train_dvae synthetic dvae_small.safetensors --vocab-size 64 --hidden-dim 32 \
        --num-groups 3 --blocks-per-group 1 --image-size 32 --steps 300

DATA_PATH is an image folder (searched recursively), tar shards (docs/data.md) or `synthetic`
(the built-in shapes). Every step draws a batch of random crops (--image-size pixels, as the
tokenizer will see them: 112 for BEiT's 14x14 tokens with 8x down-sampling), relaxes the code
choice with Gumbel-softmax at a temperature annealed from --temperature-start to --temperature-end
over the first --anneal-fraction of the steps, and minimises the reconstruction MSE (+ --kl-weight
x KL to the uniform prior). Every --checkpoint-every steps the training state goes to
OUT.train_state.pt (--resume continues from it, exactly: each step's batch and noise are a
function of --seed and the step), and a reconstruction figure (original | tokens decoded, one row
per image) to OUT.png.
"""

import argparse
import math
import os
import sys
import time

import torch
from torchvision import transforms
from torchvision.utils import make_grid
from tqdm import tqdm

from data.datasets import ImageFolderDataset
from data.shards import ShardDataset, find_shards, is_shard_source
from data.synthetic import SyntheticShapes
from engine.figures import save_png
from engine.launch import prepare_output_dir, run_tool
from engine.precision import autocast
from models.dvae import DiscreteVAE, dvae_loss, gumbel_temperature, save_tokenizer
from utils.atomic_write import atomic_save
from utils.errors import ConfigError
from utils.safe_load import load_checkpoint_file

SYNTHETIC = 'synthetic'
SYNTHETIC_IMAGES = 500


class CroppedImages(torch.utils.data.Dataset):
    """(index, seed) -> RGB crop in [0, 1], (3, size, size): a random resized crop and flip drawn
    from a generator seeded by the pair, so a batch is a function of (seed, step)."""

    def __init__(self, images, size, cache=False):
        self.images, self.size = images, size
        self.cache = {} if cache else None  # the synthetic shapes are re-drawn on every read
        self.crop = transforms.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index_and_seed):
        index, seed = index_and_seed
        image = self.cache.get(index) if self.cache is not None else None
        if image is None:
            image = transforms.functional.to_tensor(self.images[index][0])
            if self.cache is not None:
                self.cache[index] = image
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            image = self.crop(image)
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return image


def build_images(data_path, image_size):
    if data_path == SYNTHETIC:
        return SyntheticShapes(SYNTHETIC_IMAGES, 10, max(2 * image_size, 64), seed=0)
    if is_shard_source(data_path):  # every sample of the shards, in order, as a folder reads
        shards, info = find_shards(data_path, None)
        return ShardDataset(shards, info, 'skip', min_size=image_size, root=data_path)
    if not os.path.isdir(data_path):
        raise ConfigError(
            f'DATA_PATH {data_path} is not a folder. Pass a folder of images (searched '
            f'recursively), of .tar shards, or `{SYNTHETIC}` for the built-in shapes.'
        )
    return ImageFolderDataset(data_path, on_bad_image='skip', min_size=image_size)


def batch_at(dataset, step, batch_size, seed):
    """The batch of `step`: indices and crop seeds drawn from a generator seeded by (seed, step)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    indices = torch.randint(len(dataset), (batch_size,), generator=generator).tolist()
    seeds = torch.randint(2**62, (batch_size,), generator=generator).tolist()
    return torch.stack([dataset[(i, s)] for i, s in zip(indices, seeds, strict=True)])


def learning_rate(step, steps, base_lr, warmup):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `steps`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return base_lr * 0.5 * (1 + math.cos(progress * math.pi))


def reconstruction_figure(model, images, path):
    """original | tokens decoded, one row per image, as a PNG at `path`."""
    was_training = model.training
    model.eval()
    reconstruction = model.decode_tokens(model.tokens(images))
    model.train(was_training)
    size = images.shape[-1]
    reconstruction = torch.nn.functional.interpolate(reconstruction, size=size, mode='nearest')
    rows = torch.stack([images, reconstruction], dim=1).flatten(0, 1).float().cpu()
    grid = make_grid(rows, nrow=2, padding=2, pad_value=1.0)
    save_png((grid * 255).round().to(torch.uint8), path)


def train_state_path(out):
    return out + '.train_state.pt'


def save_train_state(path, model, optimizer, step, args):
    state = {
        'model': model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'step': step,
        'architecture': model.architecture,
        'seed': args.seed,
    }
    atomic_save(state, path, checksum=True)


def resume(path, model, optimizer, args):
    """The step to continue from, with the model and optimizer restored from `path`."""
    if not os.path.isfile(path):
        raise ConfigError(
            f'--resume: no training state at {path}. Train without --resume first (it writes '
            f'that file every --checkpoint-every steps).'
        )
    state = load_checkpoint_file(path, '--resume training state')
    if state.get('architecture') != model.architecture or state.get('seed') != args.seed:
        raise ConfigError(
            f'--resume: {path} was written for architecture {state.get("architecture")} and '
            f'seed {state.get("seed")}, but the flags ask for {model.architecture} and seed '
            f'{args.seed}. Pass the same architecture flags and --seed, or a new OUT.'
        )
    model.load_state_dict(state['model'])
    optimizer.load_state_dict(state['optimizer'])
    return int(state['step'])


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        'data_path', metavar='DATA_PATH', help=f'image folder, tar shards or `{SYNTHETIC}`'
    )
    parser.add_argument('out', metavar='OUT', help='tokenizer file to write (.safetensors)')
    parser.add_argument('--vocab-size', type=int, default=8192)
    parser.add_argument('--hidden-dim', type=int, default=256, help='width of the first group')
    parser.add_argument('--num-groups', type=int, default=4, help='down-sampling 2**(G-1)')
    parser.add_argument('--blocks-per-group', type=int, default=2)
    parser.add_argument('--codebook-dim', type=int, default=128)
    parser.add_argument('--steps', type=int, default=10000)
    parser.add_argument('--image-size', type=int, default=112, help='crop size in pixels')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--warmup-steps', type=int, default=100)
    parser.add_argument('--weight-decay', type=float, default=0.0)
    parser.add_argument('--temperature-start', type=float, default=1.0)
    parser.add_argument('--temperature-end', type=float, default=1 / 16)
    parser.add_argument('--anneal-fraction', type=float, default=0.5)
    parser.add_argument('--kl-weight', type=float, default=0.0)
    parser.add_argument('--checkpoint-every', type=int, default=1000)
    parser.add_argument('--figure-images', type=int, default=4)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--resume', action='store_true', help='continue from OUT.train_state.pt')
    parser.add_argument(
        '--stop-after',
        type=int,
        help='stop after this many steps of the --steps schedule, with a training state to '
        '--resume from (a time-limited job)',
    )
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    return parser.parse_args(argv)


def check_args(args):
    for flag in ('vocab_size', 'steps', 'batch_size', 'checkpoint_every', 'image_size'):
        value = getattr(args, flag)
        if value < 1:
            raise ConfigError(f'--{flag.replace("_", "-")} must be at least 1, got {value}.')
    factor = 2 ** (args.num_groups - 1)
    if args.num_groups < 1 or args.image_size % factor:
        raise ConfigError(
            f'--image-size {args.image_size} must be a multiple of the down-sampling '
            f'2 ** (--num-groups - 1) = {factor} (--num-groups must be >= 1).'
        )
    if not 0 < args.temperature_end <= args.temperature_start:
        raise ConfigError('--temperature-end must be in (0, --temperature-start].')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise ConfigError(f'--device {args.device}: no CUDA device here; pass --device cpu.')


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    prepare_output_dir(os.path.dirname(os.path.abspath(args.out)))
    device = torch.device(args.device)
    images = build_images(args.data_path, args.image_size)
    dataset = CroppedImages(images, args.image_size, cache=args.data_path == SYNTHETIC)
    torch.manual_seed(args.seed)
    model = DiscreteVAE(
        args.vocab_size,
        args.hidden_dim,
        args.num_groups,
        args.blocks_per_group,
        args.codebook_dim,
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    state_path = train_state_path(args.out)
    start = resume(state_path, model, optimizer, args) if args.resume else 0
    dtype = torch.bfloat16 if device.type == 'cuda' and torch.cuda.is_bf16_supported() else None
    anneal_steps = int(args.anneal_fraction * args.steps)
    figure_batch = batch_at(dataset, args.steps, args.figure_images, args.seed).to(device)  # fixed
    stop = min(args.steps, args.stop_after or args.steps)
    bar = tqdm(range(start, stop), initial=start, total=args.steps, disable=args.no_progress)
    began, first_mse, mse = time.time(), None, None
    for step in bar:
        for group in optimizer.param_groups:
            group['lr'] = learning_rate(step, args.steps, args.lr, args.warmup_steps)
        temperature = gumbel_temperature(
            step, anneal_steps, args.temperature_start, args.temperature_end
        )
        images = batch_at(dataset, step, args.batch_size, args.seed).to(device)
        torch.manual_seed(args.seed * 1_000_003 + step)  # the Gumbel noise of this step
        with autocast(device, dtype):
            loss, mse = dvae_loss(model, images, temperature, args.kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == stop - 1:
            mse = mse.item()
            first_mse = mse if first_mse is None else first_mse
            bar.set_postfix(mse=f'{mse:.4f}', tau=f'{temperature:.3f}')
        if (step + 1) % args.checkpoint_every == 0 or step == stop - 1:
            save_train_state(state_path, model, optimizer, step + 1, args)
            reconstruction_figure(model, figure_batch, os.path.splitext(args.out)[0] + '.png')
    summary = (
        f'{args.vocab_size}-code tokenizer ({2 ** (args.num_groups - 1)}x down-sampling) trained '
        f'for steps {start}..{stop} of {args.steps} in {time.time() - began:.1f} s '
        f'(reconstruction MSE {first_mse} -> {mse})'
    )
    if stop < args.steps:
        print(f'{summary}; continue with --resume (training state in {state_path})')
        return 0
    save_tokenizer(model.cpu(), args.out)
    print(f'{summary}, written to {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(run_tool(main))
