"""The `bioadapt` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from bioadapt.errors import BioadaptError


def _convert(args: argparse.Namespace) -> None:
    from bioadapt.data.convert import convert_to_ome_zarr

    chunks = [int(c) for c in args.chunks.split(",")] if args.chunks else None
    out = convert_to_ome_zarr(args.source, args.target, version=args.ngff_version, chunks=chunks,
                              n_levels=args.levels, overwrite=args.overwrite)
    print(f"wrote {out}")


def _signature_defaults(module: str, function: str) -> dict[str, object]:
    """A function's keyword defaults, read where they are declared."""
    import importlib
    import inspect

    parameters = inspect.signature(getattr(importlib.import_module(module), function)).parameters
    return {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}


def _demo(args: argparse.Namespace) -> None:
    from bioadapt.demo import run_demo

    given = {"workdir": args.workdir, "size": args.size, "n_patches": args.patches, "top_k": args.top_k,
             "patch_size": args.patch_size, "mc_passes": args.mc_passes, "epochs": args.epochs,
             "base_epochs": args.base_epochs, "seed": args.seed}
    run_demo(**{name: value for name, value in given.items() if value is not None})  # the rest: run_demo's own


def _serve(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from bioadapt.service.limits import Limits
    from bioadapt.service.serve import ServeOptions, serve

    limits = Limits.from_env()
    limits = replace(limits, calls=args.max_calls_per_user or limits.calls,
                     jobs=args.max_jobs_per_user or limits.jobs)
    serve(ServeOptions(server_url=args.server_url, workspace=args.workspace, token=args.token,
                       ray_address=args.ray_address, data_dir=args.data_dir, database_url=args.database_url,
                       public=args.public, allow_paths=args.allow_path, port=args.port, num_cpus=args.num_cpus,
                       device=args.device, actor_idle_s=args.actor_idle_s, user=args.user, limits=limits,
                       remote_timeout=args.remote_timeout))
    # serve() stopped calls, jobs, Ray and Hypha in order and waited a while for calls in flight. One still running
    # (a read from a store that hangs until its timeout) would hold the exit: Python joins the call pool's threads
    # at exit. Nothing is left to finalise, so leave now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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

    serve = commands.add_parser("serve", help="register the bioadapt service on Hypha (embedded server by default)")
    serve.add_argument("--server-url", help="join this Hypha server instead of starting one on 127.0.0.1")
    serve.add_argument("--workspace", help="workspace on --server-url")
    serve.add_argument("--token", default=os.environ.get("BIOADAPT_TOKEN"),
                       help="token for --server-url (default: $BIOADAPT_TOKEN, which keeps it out of `ps`)")
    serve.add_argument("--ray-address", help="join a Ray cluster (auto, host:port, ray://host:10001) instead of "
                       "starting a local one")
    serve.add_argument("--data-dir", help="projects, labels, model versions (default ~/.local/share/bioadapt)")
    serve.add_argument("--database-url", default=os.environ.get("BIOADAPT_DATABASE_URL"),
                       help="SQLAlchemy URL for the metadata (default: $BIOADAPT_DATABASE_URL, else SQLite in "
                       "--data-dir)")
    serve.add_argument("--public", action="store_true", help="let anyone on the server call the service "
                       "(projects stay private to their creator)")
    serve.add_argument("--allow-path", action="append", default=[], help="a folder of user data callers may "
                       "point at (repeatable); the data dir is never readable, even inside an allowed folder")
    serve.add_argument("--max-calls-per-user", type=int, help="calls of one user running at once, the rest wait "
                       "(default 8, or $BIOADAPT_MAX_CALLS_PER_USER); of those at most 2 slow ones "
                       "($BIOADAPT_MAX_SLOW_CALLS_PER_USER)")
    serve.add_argument("--max-jobs-per-user", type=int, help="jobs (score, fine_tune, evaluate, predict, export) "
                       "of one user running at once, more are refused (default 4, or $BIOADAPT_MAX_JOBS_PER_USER)")
    serve.add_argument("--remote-timeout", type=float, help="seconds an http(s) or s3 image store may take to "
                       "answer a read (default 30, or $BIOADAPT_REMOTE_TIMEOUT_S)")
    serve.add_argument("--port", type=int,
                       help="port of the embedded server (default 9527 when free, else any; 0: any free port)")
    serve.add_argument("--num-cpus", type=int, help="CPUs of the embedded Ray (default: all)")
    serve.add_argument("--device", default="auto", help="torch device of the model workers (auto, cpu, cuda)")
    serve.add_argument("--actor-idle-s", type=float,
                       help="seconds an idle model actor stays loaded for the next job on the same model")
    serve.add_argument("--user", help="user the printed token is for (embedded server; default: your login)")
    serve.set_defaults(run=_serve)

    demo = commands.add_parser("demo", help="one full active-learning round through the real service, on data "
                                "it generates")
    # left out, a setting keeps run_demo's default (shown), and a scoring setting the service's
    demo_defaults = _signature_defaults("bioadapt.demo", "run_demo")
    demo.add_argument("--workdir", help=f"where the demo writes its files (default: {demo_defaults['workdir']})")
    demo.add_argument("--size", type=int, help=f"side of the generated image in pixels (default: "
                                               f"{demo_defaults['size']})")
    demo.add_argument("--patches", type=int, help="patches to score (default: the service's)")
    demo.add_argument("--top-k", type=int, help="patches the service picks for the simulated annotator to label "
                                                f"(default: {demo_defaults['top_k']})")
    demo.add_argument("--patch-size", type=int, help="patch side in pixels (default: the service's)")
    demo.add_argument("--mc-passes", type=int, help="MC-dropout passes per patch (default: the service's)")
    demo.add_argument("--epochs", type=int, help=f"fine-tuning epochs (default: {demo_defaults['epochs']})")
    demo.add_argument("--base-epochs", type=int, help=f"epochs of the base model's training (default: "
                                                      f"{demo_defaults['base_epochs']})")
    demo.add_argument("--seed", type=int, help=f"(default: {demo_defaults['seed']})")
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
