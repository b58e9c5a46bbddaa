"""Export a checkpoint: its encoder as a timm model folder, or the whole checkpoint without pickle.

    # OUT_DIR/config.json + OUT_DIR/model.safetensors: timm.create_model('local-dir:OUT_DIR',
    # pretrained=True) builds the matching timm model (swin_*, swinv2_*, beit_* or vit_*)
    python -m tools.export output/.../ckpt_epoch_799.pth --to timm exports/simmim_swin_base
    # our layout, no pickle: the 'model' weights plus the config YAML in the file's metadata;
    # --pretrained and --eval --resume read it
    python -m tools.export output/.../ckpt_epoch_799.pth --to safetensors ckpt_epoch_799.safetensors

CHECKPOINT is a pre-training or fine-tuning checkpoint, ours or official (its pickled yacs config
is read as plain data, never executed). The model config comes from the checkpoint, or from
--cfg FILE when it stores none. A timm export holds the encoder (and the classifier head of a
fine-tuned checkpoint); the SimMIM decoder and mask token are left out because they exist only for
masked-image pre-training and timm's models have no place for them. It is checked by running
ours and the exported timm model on a random batch (--no-verify skips that).
Exit codes: 0 done, 2 bad input (the message says which and how to fix it), 1 an export that does
not reproduce the model.
"""

import argparse
import numbers
import os
import sys

import torch

from checkpoint.sharded import read_checkpoint
from checkpoint.stored_config import checkpoint_config
from checkpoint.timm_folder import MAX_RELATIVE_DIFFERENCE, export_timm_folder, output_difference
from engine.launch import prepare_output_dir, run_tool
from utils.errors import ToolFailure
from utils.safe_load import load_checkpoint_file
from utils.safetensors_io import SCALAR_KEYS, save_safetensors_checkpoint
from utils.state_dict import encoder_weights, summarize_keys, unwrap_state_dict

FORMATS = ('timm', 'safetensors')


def export_timm(checkpoint, args, out_dir):
    weights, dropped = encoder_weights(checkpoint)
    config = checkpoint_config(checkpoint, args.cfg, args.opts, source=args.checkpoint)
    info = {
        'exported_from': os.path.basename(args.checkpoint),
        'model_type': config.MODEL.TYPE,
        'left_out': dropped,
    }
    model = export_timm_folder(config, weights, out_dir, info)
    print(
        f'Wrote {out_dir}/config.json and model.safetensors: timm '
        f'{model.pretrained_cfg["architecture"]} ({type(model).__name__}, '
        f'{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, '
        f'{model.num_classes or "no"} classes).'
    )
    if dropped:
        print(f'Left out (pre-training or probing only): {summarize_keys(dropped, dropped)}')
    if args.verify:
        difference = output_difference(config, weights, model)
        print(f"timm's output vs ours on a random batch: max relative difference {difference:.1e}.")
        if not difference <= MAX_RELATIVE_DIFFERENCE:
            raise ToolFailure(
                f"The exported timm model's output differs from ours by "
                f'{difference:.1e} (relative); the export is wrong. Please report it '
                f"with the checkpoint's config."
            )
    print(
        f"Load it: timm.create_model('local-dir:{out_dir}', pretrained=True). Upload it: "
        f"hf upload USER/REPO {out_dir}, then timm.create_model('hf-hub:USER/REPO', "
        f'pretrained=True).'
    )


def export_safetensors(checkpoint, args, out_file):
    state_dict = unwrap_state_dict(checkpoint)
    stored = checkpoint.get('config') if isinstance(checkpoint, dict) else None
    if isinstance(stored, str) and not args.cfg and not args.opts:
        config_text = stored  # ours, kept verbatim
    elif stored is not None or args.cfg:
        config_text = checkpoint_config(
            checkpoint, args.cfg, args.opts, source=args.checkpoint
        ).dump()
    else:
        config_text = ''
    info = {
        k: checkpoint[k]
        for k in SCALAR_KEYS
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(k), numbers.Number)
    }
    prepare_output_dir(os.path.dirname(os.path.abspath(out_file)))
    save_safetensors_checkpoint(out_file, state_dict, config_text, info)
    written = load_checkpoint_file(out_file, 'the exported file')['model']
    if written.keys() != state_dict.keys() or not all(
        torch.equal(written[k], state_dict[k].cpu()) for k in state_dict
    ):
        raise ToolFailure(f'{out_file} does not read back equal to {args.checkpoint}.')
    print(
        f'Wrote {out_file}: {len(state_dict)} tensors'
        f'{", the config" if config_text else " (no config: pass --cfg to include one)"}'
        f'{", " + ", ".join(info) if info else ""}; no pickled data.'
    )


def _main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], allow_abbrev=False)
    parser.add_argument(
        'checkpoint',
        metavar='CHECKPOINT',
        help='.pth (ours or official) or .safetensors checkpoint',
    )
    parser.add_argument(
        '--to',
        nargs=2,
        required=True,
        metavar=('FORMAT', 'OUT'),
        help=f'FORMAT: {" or ".join(FORMATS)}; OUT: a folder for timm, a file for safetensors',
    )
    parser.add_argument(
        '--cfg',
        metavar='FILE',
        help="the checkpoint's config, when it stores none (or to override it)",
    )
    parser.add_argument(
        '--opts',
        nargs='+',
        default=[],
        metavar='KEY VALUE',
        help='config overrides, e.g. --opts DATA.IMG_SIZE 224',
    )
    parser.add_argument(
        '--no-verify',
        dest='verify',
        action='store_false',
        help='skip comparing the exported timm model with ours',
    )
    args = parser.parse_args(argv)
    fmt, out = args.to
    if fmt not in FORMATS:
        parser.error(f'--to {fmt}: unknown format; use one of {", ".join(FORMATS)}.')
    checkpoint = read_checkpoint(args.checkpoint, 'CHECKPOINT', model_only=True)
    (export_timm if fmt == 'timm' else export_safetensors)(checkpoint, args, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit code: 0 done, 2 bad input, 1 a wrong result; failures print one paragraph."""
    return run_tool(_main, argv)


if __name__ == '__main__':
    sys.exit(main())
