"""Convert a timm model into this framework's layout: a checkpoint with the official state-dict
names and a config describing the model, to start SimMIM pre-training or fine-tuning from.

    python -m tools.import_timm exports/simmim_swin_base swin_base.safetensors   # a timm folder
    python -m tools.import_timm swin_base_patch4_window7_224 swin_base.pth       # a timm name

A folder holds config.json and model.safetensors (tools/export.py --to timm writes one, so do
timm's save_for_hf and the Hugging Face hub). A timm model name is read from the local Hugging
Face cache only ($HF_HUB_CACHE or --cache-dir); nothing is downloaded. OUT_FILE ending in
.safetensors is written without pickle, one ending in .pth or .pt with torch.save (any other
suffix is refused); both load with --pretrained (or --opts MODEL.PRETRAINED OUT_FILE for
pre-training) and --eval --resume. The file is written beside OUT_FILE, read back, and only then
renamed over it, so a failed import leaves an earlier OUT_FILE untouched.
MODEL.PRETRAINED timm:NAME_OR_FOLDER reads the same weights without this step.
Exit codes: 0 done, 2 bad input (a truncated weights file, NaN or infinite weights, a model our
layout cannot hold, an OUT_FILE that is a folder or has another suffix), 1 a wrong result.
"""

import argparse
import sys

from checkpoint.timm_folder import (
    MAX_RELATIVE_DIFFERENCE,
    load_timm_model,
    output_difference,
    timm_config_yaml,
    timm_weights,
)
from config import load_config_text
from engine.launch import prepare_output_file, run_tool
from models.timm_mapping import UnsupportedInTimm
from utils.atomic_write import atomic_save
from utils.errors import ToolFailure
from utils.safe_load import check_reads_back
from utils.safetensors_io import save_safetensors_checkpoint
from utils.state_dict import check_finite

SUFFIXES = ('.safetensors', '.pth', '.pt')  # what OUT_FILE may end with: the two formats written


def _main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], allow_abbrev=False)
    parser.add_argument('source', metavar='NAME_OR_FOLDER', help='a timm folder or model name')
    parser.add_argument('out_file', metavar='OUT_FILE', help='.safetensors or .pth')
    parser.add_argument(
        '--cache-dir',
        help='Hugging Face hub cache (default: $HF_HUB_CACHE or ~/.cache/huggingface/hub)',
    )
    args = parser.parse_args(argv)
    prepare_output_file(args.out_file, 'OUT_FILE', SUFFIXES)

    timm_model = load_timm_model(args.source, args.cache_dir)
    try:
        model_type, state_dict = timm_weights(timm_model, spec=args.source)
        check_finite(state_dict, f'The timm model {args.source}')
        config_text = timm_config_yaml(timm_model)
        difference = output_difference(load_config_text(config_text), state_dict, timm_model)
    except UnsupportedInTimm as e:
        raise UnsupportedInTimm(f'{args.source}: {e}') from None
    if not difference <= MAX_RELATIVE_DIFFERENCE:
        raise ToolFailure(
            f"Our model built from {args.source} differs from timm's by "
            f'{difference:.1e} (relative); the import is wrong. Please report it.'
        )

    def verify(tmp):  # the written file, before it replaces an earlier one
        check_reads_back(tmp, state_dict, f'The import {args.out_file}')

    if args.out_file.endswith('.safetensors'):
        save_safetensors_checkpoint(args.out_file, state_dict, config_text, verify=verify)
    else:
        checkpoint = {'model': state_dict, 'config': config_text}
        atomic_save(checkpoint, args.out_file, checksum=True, verify=verify)
    print(
        f"Wrote {args.out_file}: timm's {type(timm_model).__name__} as MODEL.TYPE {model_type} "
        f'({len(state_dict)} tensors, {timm_model.num_classes or "no"} classes) with its '
        f"config; our output vs timm's on a random batch: max relative difference "
        f'{difference:.1e}. Fine-tune from it with --pretrained {args.out_file}.'
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit code: 0 done, 2 bad input, 1 a wrong result; failures print one paragraph."""
    return run_tool(_main, argv)


if __name__ == '__main__':
    sys.exit(main())
