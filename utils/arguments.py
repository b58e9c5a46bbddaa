"""The command line of the entry scripts: the official SimMIM flags, and how they map to config
keys.

build_arg_parser(finetune=False)   the parser (fine-tuning adds --pretrained --eval --throughput)
apply_args(config, args)           flags given -> their config keys (after YAML and --opts);
                                   returns notes for the log on what a flag changed besides

A flag the config would make meaningless is never ignored silently: it takes effect (--data-path
with the built-in synthetic dataset switches DATA.DATASET to folder, with a note) or the run stops
with a paragraph saying why (--eval with a training-only flag).
"""

import argparse
import difflib
import os

from utils.errors import ConfigError

# Flags that only change how a model trains: --eval trains nothing, so they would do nothing.
TRAINING_ONLY_FLAGS = {
    'pretrained': '--pretrained (the weights fine-tuning starts from)',
    'accumulation_steps': '--accumulation-steps',
    'use_checkpoint': '--use-checkpoint',
}


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that suggests the closest known flag for a mistyped one."""

    def error(self, message):
        if 'unrecognized arguments' in message:
            flags = [s for a in self._actions for s in a.option_strings]
            for bad in message.split(':', 1)[1].split():
                close = difflib.get_close_matches(bad.split('=')[0], flags, n=2)
                if close:
                    message += f' (did you mean {" or ".join(close)}?)'
        super().error(message)


def build_arg_parser(finetune=False):
    """The official SimMIM flags (plus the Swin-Transformer repo's --enable-amp/--disable-amp)."""
    name = 'SimMIM fine-tuning' if finetune else 'SimMIM pre-training'
    parser = _ArgumentParser(name, allow_abbrev=False)
    parser.add_argument(
        '--cfg', type=str, required=True, metavar='FILE', help='path to config file'
    )
    parser.add_argument(
        '--opts',
        nargs='+',
        action='extend',
        default=None,
        metavar='KEY VALUE',
        help='override config keys, e.g. --opts TRAIN.EPOCHS 1 DATA.NUM_WORKERS 0 '
        '(given twice, both groups apply, in order)',
    )
    parser.add_argument('--batch-size', type=int, help='batch size per GPU (DATA.BATCH_SIZE)')
    parser.add_argument('--data-path', type=str, help='path to the dataset (DATA.DATA_PATH)')
    parser.add_argument('--resume', help='resume from this checkpoint (MODEL.RESUME)')
    parser.add_argument('--accumulation-steps', type=int, help='gradient accumulation steps')
    parser.add_argument(
        '--use-checkpoint',
        action='store_true',
        help='gradient checkpointing to save memory (TRAIN.USE_CHECKPOINT)',
    )
    parser.add_argument(
        '--amp-opt-level',
        type=str,
        choices=['O0', 'O1', 'O2'],
        default=None,
        help='O0 turns mixed precision off; O1/O2 turn torch.amp autocast on',
    )
    parser.add_argument(
        '--enable-amp',
        action='store_true',
        default=None,
        dest='enable_amp',
        help='turn torch.amp autocast on (ENABLE_AMP True)',
    )
    parser.add_argument(
        '--disable-amp',
        action='store_false',
        dest='enable_amp',
        help='turn mixed precision off (ENABLE_AMP False)',
    )
    parser.add_argument(
        '--output',
        default=None,
        type=str,
        metavar='PATH',
        help='root of the output folder (OUTPUT; default "output")',
    )
    parser.add_argument('--tag', help='tag of experiment (TAG)')
    parser.add_argument(
        '--wandb',
        action='store_true',
        help='also log to Weights & Biases, rank 0 (LOGGING.WANDB)',
    )
    parser.add_argument(
        '--compile',
        choices=['blocks', 'model'],
        default=None,
        help='torch.compile each transformer block or the whole model (TRAIN.COMPILE)',
    )
    # torch.distributed.launch passes one of these; torchrun sets LOCAL_RANK, which wins.
    parser.add_argument(
        '--local_rank',
        '--local-rank',
        type=int,
        default=None,
        dest='local_rank',
        help=argparse.SUPPRESS,
    )
    if finetune:
        parser.add_argument(
            '--pretrained',
            type=str,
            help='checkpoint to fine-tune from, or timm:NAME_OR_FOLDER or hf:FOLDER '
            '(MODEL.PRETRAINED)',
        )
        parser.add_argument('--eval', action='store_true', help='evaluate only')
        parser.add_argument('--throughput', action='store_true', help='measure throughput only')
    return parser


def _refuse_training_flags_with_eval(args):
    given = [text for name, text in TRAINING_ONLY_FLAGS.items() if getattr(args, name, None)]
    if getattr(args, 'eval', None) and given:
        hint = ''
        if getattr(args, 'pretrained', None):
            hint = f' To evaluate {args.pretrained}, pass it with --resume instead.'
        raise ConfigError(
            f"--eval only evaluates (the checkpoint --resume names, else OUTPUT's model_best.pth "
            f'or newest checkpoint) and trains nothing, so {" and ".join(given)} would do nothing '
            f'there. Leave {"them" if len(given) > 1 else "it"} out of the --eval command.{hint}'
        )


def apply_args(config, args):
    """Write the flags given in `args` (an argparse Namespace) into their config keys; return
    notes (strings) for the log about what a flag changed besides its own key."""
    notes = []
    _refuse_training_flags_with_eval(args)

    # Like the official update_config: each flag applies only when given.
    def given(name):
        return getattr(args, name, None)

    if given('batch_size') is not None:  # 0 is given too, and rejected by validation
        config.DATA.BATCH_SIZE = args.batch_size
    if given('data_path'):
        config.DATA.DATA_PATH = args.data_path
        if config.DATA.DATASET == 'synthetic':  # which reads no folder: the flag would do nothing
            config.DATA.DATASET = 'folder'
            notes.append(
                f'--data-path {args.data_path}: the config trains on the built-in synthetic '
                f'dataset (DATA.DATASET synthetic), which reads no folder, so DATA.DATASET is now '
                f'folder and the images of {args.data_path} are used.'
            )
    if given('resume'):
        config.MODEL.RESUME = args.resume
    if given('pretrained'):
        config.MODEL.PRETRAINED = args.pretrained
    if given('accumulation_steps') is not None:
        config.TRAIN.ACCUMULATION_STEPS = args.accumulation_steps
    if given('use_checkpoint'):
        config.TRAIN.USE_CHECKPOINT = True
    if given('amp_opt_level'):
        config.AMP_OPT_LEVEL = args.amp_opt_level
        config.ENABLE_AMP = args.amp_opt_level != 'O0'
    if given('enable_amp') is not None:
        config.ENABLE_AMP = args.enable_amp
    if given('output'):
        config.OUTPUT = args.output
    if given('tag'):
        config.TAG = args.tag
    if given('wandb'):
        config.LOGGING.WANDB = True
    if given('compile'):
        config.TRAIN.COMPILE = args.compile
    if given('eval'):
        config.EVAL_MODE = True
    if given('throughput'):
        config.THROUGHPUT_MODE = True
    local_rank = os.environ.get('LOCAL_RANK', given('local_rank'))
    config.LOCAL_RANK = int(local_rank) if local_rank is not None else 0
    return notes
