"""The `bioadapt` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from bioadapt.errors import BioadaptError


def _convert(args: argparse.Namespace) -> None:
    from bioadapt.data.convert import convert_to_ome_zarr

    chunks = [int(c) for c in args.chunks.split(",")] if args.chunks else None
    out = convert_to_ome_zarr(args.source, args.target, version=args.ngff_version, chunks=chunks,
                              n_levels=args.levels, overwrite=args.overwrite)
    print(f"wrote {out}")


def _demo(args: argparse.Namespace) -> None:
    from bioadapt.demo import run_demo

    run_demo(workdir=args.workdir, size=args.size, n_patches=args.patches, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bioadapt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert a TIFF to a multiscale OME-Zarr (streams large files)")
    convert.add_argument("source", help="input TIFF (anything tifffile reads)")
    convert.add_argument("target", help="output .ome.zarr directory")
    convert.add_argument("--ngff-version", choices=["0.4", "0.5"], default="0.5",
                         help="0.5 writes Zarr v3, 0.4 writes Zarr v2 (default 0.5)")
    convert.add_argument("--chunks", help="chunk shape in output axis order, e.g. 1,512,512")
    convert.add_argument("--levels", type=int, help="number of resolution levels (default: down to ~512 px)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output")
    convert.set_defaults(run=_convert)

    demo = commands.add_parser("demo", help="generate data and run what bioadapt can do so far, end to end")
    demo.add_argument("--workdir", default="demo-output", help="where the demo writes its files")
    demo.add_argument("--size", type=int, default=3072, help="side of the generated image in pixels")
    demo.add_argument("--patches", type=int, default=12, help="patches to sample and label")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except BioadaptError as err:
        print(f"bioadapt {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
