"""`vitspec convert SRC DST`: convert a ViT checkpoint between layouts, exactly or not at all.

    vitspec convert vit.npz vit.pt                  # big_vision -> timm state dict
    vitspec convert model.pt model.npz --to flax --image-size 384 --check

Formats: ref (vitspec's own .safetensors/.npz), torch (timm, its DeiT/CLIP/DINOv2-style models
too), flax (the flax backend's big_vision-style tree), big_vision and big_vision_scan (what
big_vision's models/vit.py runs; SigLIP image towers read), vit_jax
(google-research/vision_transformer), hf and hf4 (transformers ViT), hf_deit, hf_clip, hf_siglip,
hf_dinov2 (the transformers families), scenic, vit_flax, tutorial. The source format is detected from
the file's keys (a directory is a transformers one, whose config.json settles what it states); the
config from its names and shapes. What a file cannot show (heads in torch layouts, the GELU form,
LayerNorm epsilon, a posemb that is no parameter, a non-square grid) comes from flags or the source
ecosystem's convention; a part whose parameters are absent (a head, q/k/v biases) is read as
absent. Each such value is printed with the flag that settles it, and --strict refuses to convert
while any is unsettled. The target file is written atomically and never over an existing file
without --overwrite.

--check runs the reference on the source tree and the target's own backend on the written file
(torch: backends.torch_vit, flax: backends.flax_vit, else the reference) on one random batch and
prints the largest logit difference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from vitspec.app.convert_check import CheckFailed, check_conversion, check_resampling
from vitspec.app.resampling import CHOICES as RESAMPLE_CHOICES
from vitspec.app.resampling import resample_method
from vitspec.config import GELUS, POOLS, POSEMBS, ViTConfig
from vitspec.formats import (
    EXTERNAL,
    FORMATS,
    REFERENCE,
    big_vision,
    flags_needed_to_read_back,
    format_of_suffix,
    open_with_notes,
    resolve_format,
    save_any,
    timm,
)
from vitspec.formats.big_vision import big_vision_construction
from vitspec.formats.checkpoint import CheckpointError
from vitspec.formats.flags import FLAGS, SHOWN_BY_NAMES
from vitspec.formats.scenic import scenic_construction
from vitspec.formats.strict import unsettled
from vitspec.formats.table import FormatError
from vitspec.formats.timm import timm_construction
from vitspec.formats.tutorial import tutorial_construction
from vitspec.formats.vit_flax import vit_flax_construction
from vitspec.params import ParamTreeError, num_params
from vitspec.posemb import COMPUTE_DTYPES, resample_model

Size = int | tuple[int, int]


# The other codebases' models a written file is the parameters of (vitspec.formats.scenic, ...).
FAMILY_CONSTRUCTIONS = {
    "scenic": scenic_construction,
    "vit_flax": vit_flax_construction,
    "tutorial": tutorial_construction,
}


class Conversion(NamedTuple):
    source_format: str
    target_format: str
    source_config: ViTConfig
    target_config: ViTConfig
    max_logit_diff: float | None  # with check=True


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    from_fmt: str | None = None,
    to_fmt: str | None = None,
    image_size: Size | None = None,
    source_image_size: Size | None = None,
    resample: str | None = None,
    resample_dtype: str = "float64",
    check: bool = False,
    overwrite: bool = False,
    strict: bool = False,
    out: TextIO | None = None,
    **flags: Any,
) -> Conversion:
    """Convert `src` to `dst`; `flags` (vitspec.formats.flags.READING_FLAGS) and `strict` as the CLI's.
    Prints a summary."""
    out = out or sys.stdout
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FormatError(f"{dst} exists; pass --overwrite (overwrite=True) to replace it")
    to_fmt = _target_format(dst, to_fmt, out)
    # Streamed: each source tensor is read, converted by its table row and written in turn (see
    # vitspec.formats.lazy), so memory holds a few tensors, not the source and target trees.
    source = open_with_notes(src, from_fmt, strict=strict, image_size=source_image_size, **flags)
    cfg, params = source.cfg, source.params
    if image_size is None and (resample or resample_dtype != "float64"):
        raise FormatError(
            "--resample and --resample-dtype choose how --image-size resamples: pass --image-size"
        )
    resampled = image_size is not None and _as_pair(image_size) != cfg.image_size
    method, how = "big_vision", None  # (how: None where no learned posemb is resampled)
    if resampled:
        posemb = {k: params[k] for k in ("pos_embed",) if k in params}  # all that resampling changes
        try:
            if cfg.posemb == "learned":
                method, how = resample_method(source.fmt, resample, resample_dtype)
            cfg, posemb = resample_model(cfg, posemb, _as_pair(image_size), method, resample_dtype)
        except ValueError as e:
            raise FormatError(f"--image-size {image_size}: {e}") from None
        params = params.replace(posemb)
    created = not dst.exists()
    try:
        save_any(dst, to_fmt, cfg, params)
    except BaseException:
        if created and dst.is_dir() and not any(dst.iterdir()):
            dst.rmdir()  # an hf directory made for a write that failed (a bad source tensor)
        raise
    _print_summary(out, src, dst, source, to_fmt, cfg, how)
    # --check runs float64 models on the whole tree: outside the streaming's memory bound.
    diff = check_conversion(cfg, dict(params), dst, to_fmt, resampled, out) if check else None
    if check and how:
        check_resampling(
            source.cfg, source.params["pos_embed"], cfg, params["pos_embed"], method, resample_dtype, out
        )
    return Conversion(source.fmt, to_fmt, source.cfg, cfg, diff)


def _target_format(dst: Path, to_fmt: str | None, out: TextIO) -> str:
    if to_fmt:
        return resolve_format(to_fmt)
    fmt = format_of_suffix(dst)
    if fmt is None:
        raise FormatError(
            f"{dst}: cannot tell the target format from suffix {dst.suffix!r}; "
            f"pass --to, one of {', '.join(FORMATS)}"
        )
    print(f"target format {fmt}: from the suffix {dst.suffix!r} (pass --to to choose another)", file=out)
    return fmt


def _print_summary(out: TextIO, src, dst: Path, source, to_fmt: str, cfg: ViTConfig, how: str | None) -> None:
    print(f"{Path(src).name} ({source.fmt}) -> {dst.name} ({to_fmt})", file=out)
    print(f"config: {cfg}", file=out)
    for note in source.notes:
        print(f"  {note}", file=out)
    inferred = unsettled(source.notes)
    if inferred:
        print(
            f"  {len(inferred)} value(s) above are inferred; --strict refuses them unless settled: "
            + " ".join(inferred),
            file=out,
        )
    print(f"parameters: {num_params(cfg):,}", file=out)
    if cfg.image_size != source.cfg.image_size:
        old, new = source.cfg.grid_size, cfg.grid_size
        if cfg.posemb == "learned":
            what = f"position embedding resampled {old[0]}x{old[1]} -> {new[0]}x{new[1]} {how}"
        else:
            what = f"no learned position embedding to resample ({cfg.posemb})"
        print(f"image size {source.cfg.image_size} -> {cfg.image_size}: {what}", file=out)
    if to_fmt != REFERENCE:
        _print_unstored(out, to_fmt, cfg, dst.is_dir())
    if to_fmt == timm.NAME:
        print(f"timm loads it (load_state_dict(strict=True)) into: {timm_construction(cfg)}", file=out)
    if to_fmt in (big_vision.NAME, big_vision.BIG_VISION_NAME, big_vision.SCAN_NAME):
        construction = big_vision_construction(cfg, scan=to_fmt == big_vision.SCAN_NAME)
        print(f"big_vision applies it in: {construction}", file=out)
    if to_fmt in FAMILY_CONSTRUCTIONS:
        print(f"the {to_fmt} model whose parameters it is: {FAMILY_CONSTRUCTIONS[to_fmt](cfg)}", file=out)


def _print_unstored(out: TextIO, fmt: str, cfg: ViTConfig, directory: bool) -> None:
    """Which flags a reader of the written file needs to get `cfg` back, i.e. what the file cannot show."""
    needed = flags_needed_to_read_back(fmt, cfg, directory)
    if needed:
        print(
            f"WARNING: a {fmt} file does not show all of this config; read it back with " + " ".join(needed),
            file=out,
        )


def _as_pair(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def _size(text: str) -> Size:
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected H or H,W (positive ints)") from None
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected H or H,W (positive ints)")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def build_parser(prog: str = "vitspec convert") -> argparse.ArgumentParser:
    formats = "\n".join(
        [f"  {REFERENCE:8} vitspec reference tree with its config (.safetensors, .npz)"]
        + [f"  {name:8} {layout.description}" for name, layout in EXTERNAL.items()]
    )
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        epilog=f"formats:\n{formats}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--from", dest="from_fmt", metavar="FMT", help=f"source format: {', '.join(FORMATS)}")
    parser.add_argument("--to", dest="to_fmt", metavar="FMT", help="target format (default: from the suffix)")
    parser.add_argument("--image-size", type=_size, metavar="H[,W]", help="resample the posemb to this size")
    parser.add_argument(
        "--resample",
        choices=RESAMPLE_CHOICES,
        help="how --image-size resamples the posemb, as that library does (default: the source format's own; "
        "vitspec's own files: big_vision)",
    )
    parser.add_argument(
        "--resample-dtype",
        choices=COMPUTE_DTYPES,
        default="float64",
        help="compute the timm/hf resampling in float32, as those libraries do on float32 tensors",
    )
    parser.add_argument(
        "--source-image-size",
        type=_size,
        metavar="H[,W]",
        help="the source's image size, where the posemb cannot show it",
    )
    parser.add_argument(
        "--patch-size",
        type=_size,
        metavar="H[,W]",
        help="the source's patch size, where its patch embedding cannot show it (vit_flax)",
    )
    parser.add_argument(
        "--heads", type=int, metavar="N", help="attention heads (torch and hf files do not store them)"
    )
    parser.add_argument("--gelu", choices=GELUS)
    parser.add_argument("--ln-eps", type=float, metavar="X")
    parser.add_argument("--posemb", choices=POSEMBS)
    parser.add_argument("--pool", choices=POOLS)
    parser.add_argument(
        "--pool-include-prefix",
        action=argparse.BooleanOptionalAction,
        help="the pool reduces the class/register tokens too (timm pool_include_prefix; default: no)",
    )
    shown = parser.add_argument_group(
        "parts a file shows by their parameters",
        "Missing parameters read as a missing part, with a note; these flags confirm that (--strict\n"
        "wants them), and one that the parameters contradict is refused.",
    )
    for keyword in SHOWN_BY_NAMES:
        flag = FLAGS[keyword]
        what = f"without its parameters: {flag.absent}"
        if flag.switch:
            shown.add_argument(flag.cli, dest=keyword, action=argparse.BooleanOptionalAction, help=what)
        else:
            what += " (0)" if keyword == "representation_size" else f" ({flag.field} 0)"
            shown.add_argument(flag.cli, dest=keyword, type=int, metavar="N", help=what)
    parser.add_argument(
        "--strict",
        action="store_true",
        help="refuse to convert if any value is inferred rather than read from the file, its format, "
        "its stored config or a flag (the error lists the flags that settle them)",
    )
    parser.add_argument("--check", action="store_true", help="compare logits of source and written file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    return parser


def main(argv: list[str] | None = None, prog: str = "vitspec convert") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        convert(
            args.src,
            args.dst,
            from_fmt=args.from_fmt,
            to_fmt=args.to_fmt,
            image_size=args.image_size,
            source_image_size=args.source_image_size,
            resample=args.resample,
            resample_dtype=args.resample_dtype,
            check=args.check,
            overwrite=args.overwrite,
            strict=args.strict,
            heads=args.heads,
            gelu=args.gelu,
            ln_eps=args.ln_eps,
            posemb=args.posemb,
            pool=args.pool,
            pool_include_prefix=args.pool_include_prefix,
            patch_size=args.patch_size,
            **{keyword: getattr(args, keyword) for keyword in SHOWN_BY_NAMES},
        )
    except CheckFailed as e:  # the file is written and wrong: a failure, not a user error
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (FormatError, CheckpointError, ParamTreeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
