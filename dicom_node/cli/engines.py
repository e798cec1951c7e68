"""``omnimri-node engines list | build MODEL | verify MODEL``.

* ``list``: engines and providers usable on this machine, and the model packages under
  ``models.path`` (with any package that fails validation and why).
* ``build MODEL``: the TensorRT plan of a package for this GPU (keyed by compute capability and
  TensorRT version). Exit code 3 with the reason where TensorRT or a GPU is missing.
* ``verify MODEL``: one fixed, seeded input through every engine that can run the package here;
  prints each output's max abs difference to ONNX Runtime, exit code 1 beyond the tolerance.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from dicom_node.cli.common import ConfigOption, JsonOption, load_or_exit, print_table
from dicom_node.config import DEFAULT_CONFIG_PATH, NodeSettings

EXIT_MISMATCH = 1
"""``engines verify``: an engine's outputs differ beyond the tolerance."""

EXIT_UNAVAILABLE = 3
"""The engine (or model package) needed is not available on this machine."""


def _resolve_package(model: str, settings: NodeSettings) -> Any:
    """A package by folder path, folder name under ``models.path``, or ``name`` in model.yaml."""
    from inference.package import ModelPackage, PackageError, find_packages

    candidates = [Path(model), settings.models.path / model]
    for folder in candidates:
        if (folder / "model.yaml").is_file():
            try:
                return ModelPackage.load(folder)
            except PackageError as err:
                typer.echo(str(err), err=True)
                raise typer.Exit(EXIT_UNAVAILABLE) from None
    found, _ = find_packages(settings.models.path)
    for pkg in found:
        if pkg.name == model:
            return pkg
    typer.echo(f"no model package {model!r} (looked in {settings.models.path})", err=True)
    raise typer.Exit(EXIT_UNAVAILABLE)


def register(app: typer.Typer) -> None:
    """Add the ``engines`` group to ``app``."""
    group = typer.Typer(help="Inference engines and model packages on this machine.",
                        no_args_is_help=True)
    app.add_typer(group, name="engines")

    @group.command("list")
    def list_engines(config: ConfigOption = DEFAULT_CONFIG_PATH, as_json: JsonOption = False
                     ) -> None:
        """Engines/providers usable here, and the model packages under ``models.path``."""
        from inference.engines import engine_availability
        from inference.package import find_packages

        settings = load_or_exit(config)
        avail = engine_availability()
        if avail["triton"].startswith("ok"):
            url = settings.models.triton_url
            avail["triton"] = (f"ok: tritonclient installed, server {url}" if url else
                               "unavailable: tritonclient installed, no models.triton_url set")
        engines = [
            {"engine": k, "usable": v.startswith("ok"), "detail": v.split(": ", 1)[-1]}
            for k, v in avail.items()
        ]
        found, problems = find_packages(settings.models.path)
        packages = [
            {"name": p.name, "version": p.spec.version, "folder": str(p.folder),
             "versions": ",".join(map(str, p.versions())), "tasks": "; ".join(p.spec.tasks),
             "torchscript": p.torchscript_path().is_file(), "valid": True}
            for p in found
        ] + [{"name": "", "folder": str(f), "valid": False, "problem": why}
             for f, why in problems.items()]
        if as_json:
            typer.echo(json.dumps({"engines": engines, "packages": packages}, indent=2))
            return
        print_table(engines, ("engine", "usable", "detail"), False)
        typer.echo("")
        typer.echo(f"model packages in {settings.models.path}:")
        print_table([p for p in packages if p["valid"]],
                    ("name", "version", "versions", "torchscript", "tasks", "folder"), False)
        for p in packages:
            if not p["valid"]:
                typer.echo(f"INVALID {p['folder']}:\n{p['problem']}", err=True)

    @group.command("build")
    def build(
        model: Annotated[str, typer.Argument(help="Package name or folder.")],
        config: ConfigOption = DEFAULT_CONFIG_PATH,
        precision: Annotated[str, typer.Option(help="fp32, or fp16 (graph converted with "
                                                    "ModelOpt AutoCast).")] = "fp32",
        force: Annotated[bool, typer.Option("--force", help="Rebuild an existing plan.")] = False,
        max_batch: Annotated[int | None, typer.Option(help="Largest batch of the profile.")]
        = None,
    ) -> None:
        """Build the TensorRT plan of MODEL for this GPU and TensorRT version."""
        from inference.engines import EngineUnavailable
        from inference.engines.tensorrt import build_plan

        settings = load_or_exit(config)
        pkg = _resolve_package(model, settings)
        t0 = time.perf_counter()
        try:
            plan = build_plan(pkg, precision=precision, force=force, max_batch=max_batch)
        except EngineUnavailable as err:
            typer.echo(f"cannot build a TensorRT plan here: {err}", err=True)
            raise typer.Exit(EXIT_UNAVAILABLE) from None
        typer.echo(f"{plan} ({plan.stat().st_size / 1e6:.1f} MB, "
                   f"{time.perf_counter() - t0:.1f} s)")

    @group.command("verify")
    def verify(
        model: Annotated[str, typer.Argument(help="Package name or folder.")],
        config: ConfigOption = DEFAULT_CONFIG_PATH,
        tolerance: Annotated[float, typer.Option(help="Max abs difference allowed.")] = 1e-3,
        seed: Annotated[int, typer.Option(help="Seed of the known input.")] = 0,
        as_json: JsonOption = False,
    ) -> None:
        """Run a known input through every engine available for MODEL and compare outputs."""
        from inference.engines import EngineUnavailable, create_engine

        settings = load_or_exit(config)
        pkg = _resolve_package(model, settings)
        spec = pkg.spec.input
        shape = (spec.batch_size, spec.channels, *spec.patch_size)
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.dtype(spec.dtype))
        outputs: dict[str, dict[str, np.ndarray]] = {}
        rows: list[dict[str, Any]] = []
        for name in ("onnxruntime", "tensorrt", "torch", "triton"):
            try:
                engine = create_engine(
                    name, pkg, intra_op_threads=settings.models.intra_op_threads,
                    triton_url=settings.models.triton_url, build_plan=False,
                )
            except EngineUnavailable as err:
                rows.append({"engine": name, "provider": "", "status": f"skipped: {err}"})
                continue
            try:
                t0 = time.perf_counter()
                outputs[name] = engine.run({spec.name: x})
                ms = (time.perf_counter() - t0) * 1000
            finally:
                engine.close()
            rows.append({"engine": name, "provider": engine.provider, "status": "ran",
                         "ms": round(ms, 1)})
        if not outputs:
            typer.echo("no engine can run this package here", err=True)
            raise typer.Exit(EXIT_UNAVAILABLE)
        ref_name = next(iter(outputs))
        ref = outputs[ref_name]
        failed = False
        for row in rows:
            got = outputs.get(row["engine"])
            if got is None:
                continue
            diffs = {}
            for out_name, want in ref.items():
                if out_name not in got or got[out_name].shape != want.shape:
                    diffs[out_name] = float("inf")
                    continue
                diffs[out_name] = float(np.max(np.abs(got[out_name].astype(np.float64)
                                                      - want.astype(np.float64))))
            worst = max(diffs.values()) if diffs else 0.0
            row["max_abs_diff"] = f"{worst:.3g}"
            row["vs"] = ref_name
            row["ok"] = worst <= tolerance
            row["per_output"] = {k: f"{v:.3g}" for k, v in diffs.items()}
            failed |= worst > tolerance
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
        else:
            print_table(rows, ("engine", "provider", "ms", "max_abs_diff", "vs", "ok", "status"),
                        False)
        if failed:
            typer.echo(f"outputs differ by more than {tolerance}", err=True)
            raise typer.Exit(EXIT_MISMATCH)
