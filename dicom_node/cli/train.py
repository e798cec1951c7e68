"""``omnimri-node`` commands of the ``train`` group: the five OmniMRI stages, export, eval.

Examples::

    omnimri-node train all --seed 0                       # eight stages, then train language
    omnimri-node train multimodal --out training-runs/x   # one stage (resumes if interrupted)
    omnimri-node train export --out models/omnimri-tiny   # ONNX package, verified vs PyTorch
    omnimri-node train calibrate --model models/omnimri-tiny  # post-processing, validation set
    omnimri-node eval --model models/omnimri-tiny --cases 30
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from inference.omnimri.train import TrainSettings

train_app = typer.Typer(help="Train, export and evaluate the OmniMRI model family.",
                        no_args_is_help=True)


class Stage(enum.StrEnum):
    """Training stages (``all`` runs the eight in order, then ``train language``).

    The same as :data:`inference.omnimri.train.STAGES`, kept here so that the CLI loads without
    torch; a test holds the two equal.
    """

    pretrain = "pretrain"
    align = "align"
    multimodal = "multimodal"
    instruct = "instruct"
    finetune = "finetune"
    refine = "refine"
    refine2 = "refine2"
    refine3 = "refine3"
    all = "all"


def _echo(msg: str) -> None:
    typer.echo(msg)


def _train(stage: Stage, size: str, seed: int, out: Path | None, steps: int | None,
           batch: int | None, model: Path | None = None,
           language_steps: int | None = None) -> None:
    from inference.omnimri.train import STAGES, TrainSettings, run_stage

    s = TrainSettings(size=size, seed=seed,
                      out=out or Path(f"training-runs/omnimri-{size}-seed{seed}"))
    if batch:
        s.batch = batch
    if stage is Stage.all:
        ck = train_everything(s, {k: steps for k in STAGES} if steps else None, model,
                              language_steps, progress=_echo)
    else:
        ck = run_stage(stage.value, s, steps, progress=_echo)
    typer.echo(f"checkpoint: {ck}")


def _language_files(spec: object) -> list[str]:
    """File names (``*.json``, ``*.onnx``, ``*.txt``) anywhere in an ``extra.language`` spec."""
    if isinstance(spec, dict):
        return [n for v in spec.values() for n in _language_files(v)]
    if isinstance(spec, list):
        return [n for v in spec for n in _language_files(v)]
    return [spec] if isinstance(spec, str) and spec.endswith((".json", ".onnx", ".txt")) else []


def language_is_trained(model: Path, seed: int, steps: int | None = None) -> bool:
    """Whether ``model`` holds what ``train language --seed SEED [--steps STEPS]`` writes.

    That is ``extra.language`` in ``model.yaml`` with this seed, every file it names in the
    version folder's ``language/``, and a ``language.json`` whose settings are those the
    command trains with (``steps`` ``None``: the default schedule), so a package from older
    code (other settings, fewer models) is trained again.
    """
    from dataclasses import asdict

    from inference.omnimri.language.textmodel import LanguageTrainSettings
    from inference.package import ModelPackage, PackageError

    try:
        pkg = ModelPackage.load(model)
        folder = pkg.version_folder()
    except PackageError:
        return False
    spec = pkg.spec.extra.get("language")
    if not isinstance(spec, dict) or spec.get("seed") != seed:
        return False
    folder = folder / str(spec.get("folder", "language"))
    if not all((folder / n).is_file() for n in [*_language_files(spec), "language.json"]):
        return False
    try:
        made = json.loads((folder / "language.json").read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    want = LanguageTrainSettings(seed=seed)  # as 'train language' makes them
    if steps:
        want.steps = steps
    return bool(made == asdict(want))


def _require_language_package(model: Path) -> None:
    """Exit 2 unless ``model`` is a package that ``train language`` can write into."""
    if not (model / "model.yaml").is_file():
        typer.echo(f"error: {model} is not a model package (no model.yaml); the language half "
                   "is trained into a package: pass --model PACKAGE, or run 'train all "
                   f"--no-language', 'train export --out {model}', then 'train all' again "
                   "(finished stages are skipped)", err=True)
        raise typer.Exit(2)


def train_language_after(model: Path, seed: int, steps: int | None = None,
                         progress: Callable[[str], None] | None = None) -> bool:
    """The language step of ``train all``: ``train language --model MODEL --seed SEED``.

    Skipped (returns ``False``) when :func:`language_is_trained` says its outputs exist, as a
    finished stage is skipped. The package's ``reports`` setting (who writes reports) is
    kept (``decoder`` for a package without one). Returns ``True`` when it trained.
    """
    from dicom_node.cli.language import language_cmd
    from inference.package import ModelPackage

    say = progress or _echo
    if language_is_trained(model, seed, steps):
        say(f"language: {model} has the language model of seed {seed}, skipped")
        return False
    old = ModelPackage.load(model).spec.extra.get("language")
    reports = old.get("reports") if isinstance(old, dict) else None
    say(f"language: train language --model {model} --seed {seed}")
    language_cmd(model=model, seed=seed, steps=steps, reports=str(reports or "decoder"))
    return True


def train_everything(s: TrainSettings, steps: dict[str, int] | None, model: Path | None,
                     language_steps: int | None = None,
                     progress: Callable[[str], None] | None = None) -> Path:
    """What ``train all`` runs: the eight stages, then the language half into ``model``.

    The stages (:func:`inference.omnimri.train.train_all`, seed ``s.seed``, ``steps`` per
    stage) skip finished ones; then :func:`train_language_after` with the same seed (``model``
    ``None``: not trained). ``model`` is checked first, before hours of training.

    Returns:
        The soup checkpoint (the averaged weights that are exported).
    """
    from inference.omnimri.train import train_all

    say = progress or _echo
    if model is not None:
        _require_language_package(model)
    ck = train_all(s.seed, s, steps=steps, progress=progress)
    if model is None:
        say("language: not trained (--no-language)")
    else:
        train_language_after(model, s.seed, language_steps, progress=say)
    return ck


def _stage_command(stage: Stage) -> None:
    def cmd(
        size: Annotated[str, typer.Option(help="Model size: tiny, small, base, large.")] = "tiny",
        seed: Annotated[int, typer.Option(help="Random seed (data, initialisation).")] = 0,
        out: Annotated[Path | None, typer.Option(help="Run folder (checkpoints).")] = None,
        steps: Annotated[int | None, typer.Option(help="Steps (per stage for 'all'); default: "
                                         "the shipped schedule.")] = None,
        batch: Annotated[int | None, typer.Option(help="Slices per step (default 12).")] = None,
    ) -> None:
        _train(stage, size, seed, out, steps, batch)

    cmd.__doc__ = f"Run (or resume) the '{stage.value}' stage."
    train_app.command(stage.value)(cmd)


for _stage in Stage:
    if _stage is not Stage.all:
        _stage_command(_stage)


@train_app.command("all")
def all_cmd(
    size: Annotated[str, typer.Option(help="Model size: tiny, small, base, large.")] = "tiny",
    seed: Annotated[int, typer.Option(help="Random seed (data, initialisation; the language "
                                           "training's too).")] = 0,
    out: Annotated[Path | None, typer.Option(help="Run folder (checkpoints).")] = None,
    steps: Annotated[int | None, typer.Option(help="Steps per vision stage; default: the "
                                     "shipped schedule.")] = None,
    batch: Annotated[int | None, typer.Option(help="Slices per step (default 12).")] = None,
    model: Annotated[Path | None, typer.Option(help="Model package the language half is "
                                     "trained into (default models/omnimri-SIZE).")] = None,
    language: Annotated[bool, typer.Option(help="Then train the language half ('train "
                                                "language', same seed).")] = True,
    language_steps: Annotated[int | None, typer.Option(help="Language training steps "
                                                            "(default 2500).")] = None,
) -> None:
    """Run the eight stages in order, then 'train language' (each skipped when finished).

    The stages write the run folder (``train export`` makes the package of it); the language
    half is written into the package ``--model`` (a re-export keeps it), skipped when that
    package already holds the language model of this seed and these settings.
    """
    pkg = (model or Path(f"models/omnimri-{size}")) if language else None
    _train(Stage.all, size, seed, out, steps, batch, model=pkg, language_steps=language_steps)


@train_app.command("soup")
def soup_cmd(
    run: Annotated[Path, typer.Option(help="Run folder with the finished stages.")
                   ] = Path("training-runs/omnimri-tiny-seed0"),
) -> None:
    """Average the finetune, refine, refine2 and refine3 weights into soup.pt ('train all')."""
    from inference.omnimri.train import SOUP_OF, make_soup

    missing = [k for k in SOUP_OF if not (run / f"{k}.pt").is_file()]
    if missing:
        raise typer.BadParameter(f"{run} has no {', '.join(k + '.pt' for k in missing)}",
                                 param_hint="--run")
    typer.echo(f"checkpoint: {make_soup(run)} (average of {', '.join(SOUP_OF)})")


@train_app.command("embed")
def embed_cmd(
    run: Annotated[Path, typer.Option(help="Run folder with the checkpoint to add the head to.")
                   ] = Path("training-runs/omnimri-tiny-seed0"),
    source: Annotated[str, typer.Option(help="Checkpoint whose frozen vision model the head "
                                             "reads (soup: the shipped weights).")] = "soup",
    cases: Annotated[int | None, typer.Option(
        help="Training cases (held-out-layout cases of set 0, as align-text; default 120).")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Training steps (default 600).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the head's training.")] = 0,
    cache: Annotated[Path, typer.Option(
        help="Folder caching the training cases' window features (per vision weights).")
    ] = Path("/tmp/omnimri-embed-cache"),
) -> None:
    """Train the findings-aware embedding head on the frozen vision model: RUN/embed.pt.

    Only the ``embedding`` output changes (every other output keeps its weights and values);
    next: ``train export --run RUN --stage embed``, then ``train align-text`` on the package.
    Cost: the window features of each training case (tens of seconds a case, cached), then
    about a minute of training.
    """
    from inference.omnimri.embed_head import EmbedSettings, embed_run

    s = EmbedSettings(seed=seed)
    if cases is not None:
        if cases < 2:
            raise typer.BadParameter("at least 2", param_hint="--cases")
        s.train_cases = cases
    if steps:
        s.steps = steps
    try:
        ck = embed_run(run, source, s, cache=cache, progress=_echo)
    except FileNotFoundError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"checkpoint: {ck}; next: omnimri-node train export --run {run} --stage embed")


@train_app.command("export")
def export_cmd(
    run: Annotated[
        Path,
        typer.Option(help="Run folder with the checkpoint (soup.pt: the averaged weights)."),
    ] = Path("training-runs/omnimri-tiny-seed0"),
    out: Annotated[
        Path,
        typer.Option(help="Package folder to write."),
    ] = Path("models/omnimri-tiny"),
    name: Annotated[str, typer.Option()] = "omnimri-tiny",
    version: Annotated[str, typer.Option()] = "1.0.0",
    stage: Annotated[str, typer.Option(help="Checkpoint to export: soup (the shipped weights, "
                                             "made by 'train all' or 'train soup'), embed "
                                             "(soup with 'train embed''s head) or a stage.")
                     ] = "soup",
) -> None:
    """Export a checkpoint to an ONNX model package (verified against PyTorch).

    The package starts without metrics and with default post-processing settings (an old
    package's numbers would describe other weights): run ``train calibrate`` and
    ``eval --write-metrics`` next.
    """
    from inference.omnimri.export import export_package

    folder = export_package(run / f"{stage}.pt", out, name=name, version=version)
    typer.echo(f"package: {folder}; next: omnimri-node train calibrate --model {out}, "
               f"omnimri-node eval --model {out} --write-metrics")


def _require_package(model: Path) -> None:
    """Exit 2 with a one-line error unless ``model`` holds a ``model.yaml``."""
    if not (model / "model.yaml").is_file():
        typer.echo(f"error: {model} is not a model package (no model.yaml)", err=True)
        raise typer.Exit(2)


@train_app.command("calibrate")
def calibrate_cmd(
    model: Annotated[Path, typer.Option(help="Model package folder.")] = Path(
        "models/omnimri-tiny"),
    cases: Annotated[int, typer.Option(help="Validation cases (cycling the diagnoses).")] = 12,
    seed: Annotated[int, typer.Option(help="Validation set seed.")] = 0,
    write: Annotated[bool, typer.Option(help="Store the settings in model.yaml.")] = True,
) -> None:
    """Choose lesion threshold, smallest lesion and diagnosis settings on validation cases."""
    from inference.omnimri.calibrate import calibrate_package

    _require_package(model)
    cal = calibrate_package(model, cases, seed=seed, write=write)
    for line in cal.lines():
        typer.echo(line)
    typer.echo(f"chosen: {cal.settings}" + (f" (written to {model / 'model.yaml'})"
                                             if write else ""))


def eval_cmd(
    model: Annotated[
        Path,
        typer.Option(help="Model package folder."),
    ] = Path("models/omnimri-tiny"),
    cases: Annotated[int, typer.Option(
        help="Held-out cases per seed (cycling the three diagnoses, then the contrasts).")] = 30,
    seed: Annotated[list[int] | None, typer.Option(
        help="Held-out set seed (0: the model card's); repeat for several sets.")] = None,
    baselines: Annotated[bool, typer.Option(
        help="Also score the conventional baselines (Gaussian mixture, robust z > 3) on the "
             "same cases.")] = False,
    recon_cases: Annotated[int | None, typer.Option(
        help="Cases (the first of each seed) that also measure reconstruction; default all.")
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Evaluate a PyTorch checkpoint instead."),
    ] = None,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Also write metrics as JSON."),
    ] = None,
    write_metrics: Annotated[bool, typer.Option(help="Store the metrics in model.yaml.")] = False,
    verbose: Annotated[bool, typer.Option(help="Print every case.")] = False,
    layout: Annotated[str, typer.Option(
        help="Lesion layout of the cases: heldout (the metric) or training (a diagnostic: the "
             "same seeds with lesions where training puts them; the difference is what the "
             "model learned about where lesions may be).")] = "heldout",
    real_mr: Annotated[bool, typer.Option(
        help="Instead: describe the package's outputs on real MR from installed packages "
             "(nibabel, dipy, pydicom, the MNI152 template as DICOM: the acceptance list "
             "of inference/omnimri/real_mr.py).")] = False,
) -> None:
    """Evaluate a model on held-out synthetic cases through the served path.

    Each case runs what a node job runs; prints per-contrast tables and each target, PASS/MISS.
    """
    from inference.omnimri.evaluate import evaluate_checkpoint, evaluate_package, merge_reports

    prog = _echo if verbose else None
    if not verbose:  # the tables only: no per-run "model run" log lines
        from dicom_node.logs import configure_logging

        configure_logging("warning", fmt="console")
    if real_mr:
        from inference.omnimri.real_mr import describe
        from inference.package import ModelPackage

        _require_package(model)
        for line in describe(ModelPackage.load(model)):
            typer.echo(line)
        return
    from inference.omnimri.evaluate import LAYOUTS

    if layout not in LAYOUTS:
        raise typer.BadParameter(f"one of {', '.join(LAYOUTS)}", param_hint="--layout")
    if write_metrics and layout != "heldout":
        raise typer.BadParameter("only held-out-layout metrics go into model.yaml",
                                 param_hint="--write-metrics")
    reports = []
    if checkpoint is None:
        _require_package(model)
    for s in seed or [0]:
        if checkpoint is not None:
            r = evaluate_checkpoint(checkpoint, cases, seed=s, baselines=baselines,
                                    recon_cases=recon_cases, progress=prog, layout=layout)
        else:
            r = evaluate_package(model, cases, seed=s, baselines=baselines,
                                 recon_cases=recon_cases, progress=prog, layout=layout)
        reports.append(r)
        for line in r.lines():
            typer.echo(line)
    rep = reports[0] if len(reports) == 1 else merge_reports(reports)
    if len(reports) > 1:
        typer.echo("all seeds together:")
        for line in rep.lines():
            typer.echo(line)
    if json_out:
        json_out.write_text(json.dumps(rep.to_dict(), indent=1, default=str))
    if write_metrics and checkpoint is None:
        import yaml

        spec = yaml.safe_load((model / "model.yaml").read_text())
        spec["metrics"] = {k: round(float(v), 4) for k, v in rep.metrics.items()}
        (model / "model.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def register(app: typer.Typer) -> None:
    """Add this group's commands to ``app``."""
    app.add_typer(train_app, name="train")
    app.command("eval")(eval_cmd)
