"""Export a checkpoint: as a timm or a transformers model folder, or whole without pickle.

    # OUT_DIR/config.json + OUT_DIR/model.safetensors: timm.create_model('local-dir:OUT_DIR',
    # pretrained=True) builds the matching timm model (swin_*, swinv2_*, beit_* or vit_*)
    python -m tools.export output/.../ckpt_epoch_799.pth --to timm exports/simmim_swin_base
    # OUT_DIR/config.json + model.safetensors + preprocessor_config.json: transformers'
    # Swin(v2)ForMaskedImageModeling (pre-training: encoder and linear decoder) or
    # Swin(v2)ForImageClassification (fine-tuned), from_pretrained(OUT_DIR)
    python -m tools.export output/.../ckpt_epoch_799.pth --to hf exports/simmim_swin_base_hf
    # our layout, no pickle: the 'model' weights plus the config YAML in the file's metadata;
    # --pretrained and --eval --resume read it
    python -m tools.export output/.../ckpt_epoch_799.pth --to safetensors ckpt_epoch_799.safetensors

CHECKPOINT is a pre-training or fine-tuning checkpoint, ours or official (its pickled yacs config
is read as plain data, never executed). The model config comes from the checkpoint, or from
--cfg FILE when it stores none. A timm export holds the encoder (and the classifier head of a
fine-tuned checkpoint); the SimMIM decoder and mask token are left out because they exist only for
masked-image pre-training and timm's models have no place for them. It is checked by running
ours and timm's model read from the written files on a random batch (--no-verify skips that);
a transformers export by comparing transformers' reconstruction (pre-training, on a random mask)
or logits with ours; a safetensors export is checked by reading it back. All are written beside
OUT first and replace an earlier export only once checked, so a failed export leaves it untouched.
Exit codes: 0 done, 2 bad input (the message says which and how to fix it; a checkpoint holding
NaN or infinite weights is one), 1 an export that does not reproduce the model.
"""

import argparse
import numbers
import os
import sys

from checkpoint import hf_folder
from checkpoint.sharded import read_checkpoint
from checkpoint.stored_config import checkpoint_config
from checkpoint.timm_folder import (
    MAX_RELATIVE_DIFFERENCE,
    export_timm_folder,
    load_timm_model,
    output_difference,
)
from engine.launch import prepare_output_file, run_tool
from utils.errors import ToolFailure
from utils.safe_load import check_reads_back
from utils.safetensors_io import SCALAR_KEYS, save_safetensors_checkpoint
from utils.state_dict import check_finite, encoder_weights, summarize_keys, unwrap_state_dict

FORMATS = ('timm', 'hf', 'safetensors')


def _verifier(args, out_dir, library, difference, limit):
    """(verify, differences) for an export folder: verify(folder) appends `difference(folder)`,
    ours vs the model `library` reads from the files as written (before they replace any), to
    `differences`, and raises ToolFailure when it exceeds `limit`; with --no-verify it does
    nothing."""
    differences = []

    def verify(folder):
        if args.verify:
            differences.append(difference(folder))
            if not differences[-1] <= limit:
                raise ToolFailure(
                    f"The exported {library} model's output differs from ours by "
                    f'{differences[-1]:.1e} (relative); the export is wrong, so it was not '
                    f'written (an earlier export in {out_dir} is untouched). Please report it '
                    f"with the checkpoint's config."
                )

    return verify, differences


def export_timm(checkpoint, state_dict, args, out_dir):
    weights, dropped = encoder_weights(state_dict)
    config = checkpoint_config(checkpoint, args.cfg, args.opts, source=args.checkpoint)
    info = {
        'exported_from': os.path.basename(args.checkpoint),
        'model_type': config.MODEL.TYPE,
        'left_out': dropped,
    }
    verify, differences = _verifier(
        args,
        out_dir,
        'timm',
        lambda folder: output_difference(config, weights, load_timm_model(folder)),
        MAX_RELATIVE_DIFFERENCE,
    )
    model = export_timm_folder(config, weights, out_dir, info, verify)
    print(
        f'Wrote {out_dir}/config.json and model.safetensors: timm '
        f'{model.pretrained_cfg["architecture"]} ({type(model).__name__}, '
        f'{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, '
        f'{model.num_classes or "no"} classes).'
    )
    if dropped:
        print(f'Left out (pre-training or probing only): {summarize_keys(dropped, dropped)}')
    if differences:
        print(
            f"timm's output (read from the written files) vs ours on a random batch: max "
            f'relative difference {differences[-1]:.1e}.'
        )
    print(
        f"Load it: timm.create_model('local-dir:{out_dir}', pretrained=True). Upload it: "
        f"hf upload USER/REPO {out_dir}, then timm.create_model('hf-hub:USER/REPO', "
        f'pretrained=True).'
    )


def export_hf(checkpoint, weights, args, out_dir):
    config = checkpoint_config(checkpoint, args.cfg, args.opts, source=args.checkpoint)
    verify, differences = _verifier(
        args,
        out_dir,
        'transformers',
        lambda folder: hf_folder.output_difference(
            config, weights, hf_folder.load_hf_model(folder)
        ),
        hf_folder.MAX_RELATIVE_DIFFERENCE,
    )
    model, left_out = hf_folder.export_hf_folder(config, weights, out_dir, verify)
    print(
        f'Wrote {out_dir}/config.json, model.safetensors and preprocessor_config.json: '
        f'transformers {type(model).__name__} '
        f'({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters).'
    )
    if left_out:
        print(f'Left out (no place in {type(model).__name__}): {", ".join(left_out)}')
    if differences:
        name = type(model).__name__
        what = 'reconstruction' if 'Masked' in name else 'logits' if 'For' in name else 'features'
        print(
            f"transformers' {what} (read from the written files) vs ours on a random batch: "
            f'max relative difference {differences[-1]:.1e}.'
        )
    print(
        f"Load it: transformers.{type(model).__name__}.from_pretrained('{out_dir}') (the "
        f'encoder alone: {type(model).__name__.split("For")[0].replace("Model", "")}Model or '
        f'...Backbone), or --pretrained hf:{out_dir}.'
    )


def export_safetensors(checkpoint, state_dict, args, out_file):
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
    prepare_output_file(out_file, 'OUT')
    save_safetensors_checkpoint(
        out_file,
        state_dict,
        config_text,
        info,
        verify=lambda tmp: check_reads_back(tmp, state_dict, f'The export {out_file}'),
    )
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
        help=f'FORMAT: {", ".join(FORMATS)}; OUT: a folder for timm and hf, a file for safetensors',
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
        help='skip comparing the exported timm / transformers model with ours',
    )
    args = parser.parse_args(argv)
    fmt, out = args.to
    if fmt not in FORMATS:
        parser.error(f'--to {fmt}: unknown format; use one of {", ".join(FORMATS)}.')
    checkpoint = read_checkpoint(args.checkpoint, 'CHECKPOINT', model_only=True)
    state_dict = unwrap_state_dict(checkpoint)  # once; each export reads it from here
    check_finite(state_dict, f'CHECKPOINT {args.checkpoint}')
    {'timm': export_timm, 'hf': export_hf, 'safetensors': export_safetensors}[fmt](
        checkpoint, state_dict, args, out
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit code: 0 done, 2 bad input, 1 a wrong result; failures print one paragraph."""
    return run_tool(_main, argv)


if __name__ == '__main__':
    sys.exit(main())
