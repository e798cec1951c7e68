"""``omnimri-node engines list | build MODEL | verify MODEL``.

* ``list``: engines and providers usable on this machine, and the model packages under
  ``models.path`` (with any package that fails validation and why).
* ``build MODEL``: the TensorRT plan of a package for this GPU (keyed by compute capability and
  TensorRT version); ``--variant int8`` builds the INT8 plan from the QDQ variant. Exit code 3
  with the reason where TensorRT or a GPU is missing.
* ``verify MODEL``: one fixed, seeded input through every engine that can run the package here
  and through every graph variant (``int8``, ...) on ONNX Runtime; prints each output's max abs
  difference to ONNX Runtime fp32 (and, for variants, the argmax agreement of the class
  outputs), exit code 1 when an engine differs beyond the tolerance. ``--accuracy N``: also the
  variants' accuracy check through the served path on N held-out cases (exit 1 if one fails).
* ``quantize MODEL``: write the INT8 QDQ variant (``1/model.int8.onnx``, calibrated on
  validation cases), run the accuracy check and declare the variant in ``model.yaml``; with
  ``--make-default`` it becomes the variant that runs, if it passed and is faster.
  ``--auto-exclude`` keeps the most quantisation-sensitive nodes in float (ranked on
  validation windows, as few as pass on validation cases; ``quantize.auto_exclude``) and
  records them, and why, in the variant's ``quantisation``.
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
             "torchscript": p.torchscript_path().is_file(),
             "variants": ",".join(p.variant_names()), "runs": p.spec.variant, "valid": True}
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
                    ("name", "version", "versions", "variants", "runs", "torchscript", "tasks",
                     "folder"), False)
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
        variant: Annotated[str | None, typer.Option(
            help="Build from a QDQ variant (int8, fp8) instead of model.onnx.")] = None,
    ) -> None:
        """Build the TensorRT plan of MODEL for this GPU and TensorRT version."""
        from inference.engines import EngineUnavailable
        from inference.engines.tensorrt import build_plan

        settings = load_or_exit(config)
        pkg = _resolve_package(model, settings)
        t0 = time.perf_counter()
        try:
            plan = build_plan(pkg, precision=precision, force=force, max_batch=max_batch,
                              variant=variant)
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
        accuracy: Annotated[int, typer.Option(
            help="Also run each variant's accuracy check on this many held-out cases.")] = 0,
        as_json: JsonOption = False,
    ) -> None:
        """Run a known input through every engine and variant for MODEL and compare outputs."""
        from inference.engines import EngineUnavailable, create_engine

        settings = load_or_exit(config)
        pkg = _resolve_package(model, settings)
        spec = pkg.spec.input
        shape = (spec.batch_size, spec.channels, *spec.patch_size)
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.dtype(spec.dtype))
        outputs: dict[str, dict[str, np.ndarray]] = {}
        rows: list[dict[str, Any]] = []
        runs: list[tuple[str, str, str | None]] = [
            (name, name, "fp32" if name in ("onnxruntime", "tensorrt") else None)
            for name in ("onnxruntime", "tensorrt", "torch", "triton")]
        runs += [(f"onnxruntime:{v}", "onnxruntime", v) for v in pkg.variant_names()[1:]]
        for label, name, variant in runs:
            try:
                engine = create_engine(
                    name, pkg, intra_op_threads=settings.models.intra_op_threads,
                    triton_url=settings.models.triton_url, build_plan=False, variant=variant,
                )
            except EngineUnavailable as err:
                rows.append({"engine": label, "provider": "", "status": f"skipped: {err}"})
                continue
            try:
                t0 = time.perf_counter()
                outputs[label] = engine.run({spec.name: x})
                ms = (time.perf_counter() - t0) * 1000
            finally:
                engine.close()
            rows.append({"engine": label, "provider": engine.provider, "status": "ran",
                         "ms": round(ms, 1), "variant": variant or ""})
        if not outputs:
            typer.echo("no engine can run this package here", err=True)
            raise typer.Exit(EXIT_UNAVAILABLE)
        ref_name = next(iter(outputs))
        ref = outputs[ref_name]
        class_outputs = {o.name for o in pkg.spec.outputs if o.kind in ("segmentation",
                                                                         "classification")}
        failed = False
        for row in rows:
            got = outputs.get(row["engine"])
            if got is None:
                continue
            diffs, agree = {}, {}
            for out_name, want in ref.items():
                if out_name not in got or got[out_name].shape != want.shape:
                    diffs[out_name] = float("inf")
                    continue
                diffs[out_name] = float(np.max(np.abs(got[out_name].astype(np.float64)
                                                      - want.astype(np.float64))))
                if out_name in class_outputs and want.ndim >= 2:
                    agree[out_name] = float(np.mean(got[out_name].argmax(1)
                                                    == want.argmax(1)))
            worst = max(diffs.values()) if diffs else 0.0
            row["max_abs_diff"] = f"{worst:.3g}"
            row["vs"] = ref_name
            row["per_output"] = {k: f"{v:.3g}" for k, v in diffs.items()}
            row["argmax_agreement"] = {k: round(v, 4) for k, v in agree.items()}
            if row["engine"].startswith("onnxruntime:"):
                # a quantised graph differs by design; its gate is the accuracy check
                row["ok"] = "see --accuracy"
                row["agree"] = f"{min(agree.values()):.3f}" if agree else ""
                continue
            row["ok"] = worst <= tolerance
            failed |= worst > tolerance
        checks: dict[str, Any] = {}
        if accuracy > 0:
            from inference.quantize import accuracy_check

            for v in pkg.variant_names()[1:]:
                if not pkg.model_path(variant=v).is_file():
                    continue
                res = accuracy_check(pkg, v, cases=accuracy,
                                     threads=settings.models.intra_op_threads)
                res.pop("per_case", None)
                checks[v] = res
                failed |= not res["passed"]
        if as_json:
            typer.echo(json.dumps({"engines": rows, "accuracy": checks} if accuracy else rows,
                                  indent=2))
        else:
            print_table(rows, ("engine", "provider", "ms", "max_abs_diff", "agree", "vs", "ok",
                               "status"), False)
            for v, res in checks.items():
                typer.echo(f"accuracy check {v} vs fp32 on {res['cases']} held-out cases: "
                           f"{'PASSED' if res['passed'] else 'FAILED'}")
                typer.echo("  " + json.dumps({k: w for k, w in res.items() if k != "passed"}))
        if failed:
            typer.echo(f"outputs differ by more than {tolerance}" if not checks or all(
                c["passed"] for c in checks.values()) else "a variant failed its accuracy check",
                err=True)
            raise typer.Exit(EXIT_MISMATCH)

    @group.command("quantize")
    def quantize(
        model: Annotated[str, typer.Argument(help="Package name or folder.")],
        config: ConfigOption = DEFAULT_CONFIG_PATH,
        cases: Annotated[int, typer.Option(help="Validation cases to calibrate on.")] = 6,
        every: Annotated[int, typer.Option(help="Keep every n-th window of a case.")] = 3,
        check: Annotated[int, typer.Option(help="Held-out cases of the accuracy check.")] = 6,
        method: Annotated[str, typer.Option(help="minmax, percentile or entropy.")] = "percentile",
        exclude_light: Annotated[bool, typer.Option(
            "--exclude-light", help="Keep stems, 1x1 heads and attention MatMuls in float.")]
        = False,
        auto_exclude: Annotated[bool, typer.Option(
            "--auto-exclude", help="Keep the most quantisation-sensitive nodes in float: the "
            "fewest that pass the accuracy rule on validation cases (layer-wise sensitivity).")]
        = False,
        sensitivity_mode: Annotated[str, typer.Option(
            help="--auto-exclude: quantise each node 'alone' or 'all-but-one' to rank it.")]
        = "alone",
        select_cases: Annotated[int, typer.Option(
            help="--auto-exclude: validation cases (seed 1) that choose how many stay float.")]
        = 6,
        margin: Annotated[float, typer.Option(
            help="--auto-exclude: fraction of the 0.005 tissue-Dice tolerance allowed on the "
                 "validation cases (headroom for the held-out check).")] = 0.5,
        select_on: Annotated[str, typer.Option(
            help="--auto-exclude: what a candidate must meet on the validation cases: "
                 "'tissue' (Dice) or 'all' (also the same detections and diagnoses).")]
        = "tissue",
        make_default: Annotated[bool, typer.Option(
            "--make-default", help="Run the variant by default if it passed and is faster.")]
        = False,
    ) -> None:
        """Write MODEL's INT8 QDQ variant, check its accuracy, declare it in model.yaml."""
        from inference.quantize import INT8_FILE, accuracy_check, add_variant, quantize_package

        settings = load_or_exit(config)
        pkg = _resolve_package(model, settings)
        if auto_exclude:
            from inference.quantize import auto_exclude as search

            try:
                path, info = search(pkg, cases=cases, every=every, method=method,
                                    mode=sensitivity_mode, select_cases=select_cases,
                                    margin=margin, select_on=select_on, threads=1,
                                    progress=lambda m: typer.echo(m, err=True))
            except (RuntimeError, ValueError) as err:
                typer.echo(f"cannot search for float nodes: {err}", err=True)
                raise typer.Exit(EXIT_UNAVAILABLE) from None
            found = info["auto_exclude"]
            typer.echo(f"{found['k']} of {found['quantisable_nodes']} quantisable nodes stay "
                       f"float: {', '.join(info['excluded_nodes']) or 'none'} "
                       f"({info['seconds']} s)")
        else:
            path, info = quantize_package(pkg, cases=cases, every=every, method=method,
                                          exclude_light=exclude_light)
        typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {info['seconds']} s, "
                   f"{info['calibration_windows']} validation windows)")
        add_variant(pkg.folder, "int8", INT8_FILE, "int8", quantisation=info, check=None,
                    make_default=False)
        from inference.package import ModelPackage

        pkg = ModelPackage.load(pkg.folder)
        res = accuracy_check(pkg, "int8", cases=check,
                             threads=settings.models.intra_op_threads,
                             progress=lambda m: typer.echo(m, err=True))
        res.pop("per_case", None)
        passed = bool(res["passed"])
        faster = float(res.get("speedup", 0.0)) > 1.0
        add_variant(pkg.folder, "int8", INT8_FILE, "int8", quantisation=info, check=res,
                    make_default=make_default and passed and faster)
        typer.echo(json.dumps(res, indent=2))
        verdict = "PASSED" if passed else "FAILED"
        typer.echo(f"accuracy check {verdict}; speed-up {res['speedup']}x; the package runs "
                   f"{ModelPackage.load(pkg.folder).spec.variant!r}")
        if not passed:
            raise typer.Exit(EXIT_MISMATCH)
