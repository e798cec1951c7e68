"""``omnimri-node train language`` and ``train language-eval``: OmniMRI's text encoder.

The text encoder of the language half (issue #16), trained into a model package and evaluated
on held-out phrasings.

Examples::

    omnimri-node train language --seed 0          # models/omnimri-tiny/<version>/language/
    omnimri-node train language-eval              # routing, refusal, QA, reports vs targets
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def _echo(msg: str) -> None:
    typer.echo(msg)


def _require_package(model: Path) -> None:
    """Exit 2 with a one-line error unless ``model`` holds a ``model.yaml``."""
    if not (model / "model.yaml").is_file():
        typer.echo(f"error: {model} is not a model package (no model.yaml)", err=True)
        raise typer.Exit(2)


def language_cmd(
    model: Annotated[Path, typer.Option(help="Model package folder (written into its newest "
                                             "version folder, language/).")] = Path(
        "models/omnimri-tiny"),
    seed: Annotated[int, typer.Option(help="Random seed (data, initialisation).")] = 0,
    steps: Annotated[int | None, typer.Option(help="Training steps (default 2500).")] = None,
    reports: Annotated[str, typer.Option(
        help="Who writes reports: 'decoder' (the package's report decoder), 'natural' "
             "(varied sentences from the structured findings) or 'neural' (the grounded "
             "neural report decoder trained here, the grammar where a generation fails the "
             "check); the vision eval's report scoring reads only the decoder's grammar.")
    ] = "decoder",
) -> None:
    """Train the tokenizer, text encoder and report decoder on one CPU thread.

    Writes ``<version>/language/`` (tokenizer.json, text_encoder.onnx checked against PyTorch,
    report_tokenizer.json, report_decoder.onnx checked against PyTorch with its key/value
    cache, language.json) and ``extra.language`` in model.yaml.
    """
    from inference.omnimri.language.textmodel import (
        LanguageTrainSettings,
        train_language,
        write_spec,
    )
    from inference.package import ModelPackage

    _require_package(model)
    if reports not in ("decoder", "natural", "neural"):
        typer.echo(f"error: --reports is 'decoder', 'natural' or 'neural', not {reports!r}",
                   err=True)
        raise typer.Exit(2)
    s = LanguageTrainSettings(seed=seed)
    if steps:
        s.steps = steps
    folder = ModelPackage.load(model).version_folder() / "language"
    spec = train_language(folder, s, progress=_echo) | {"reports": reports}
    write_spec(model, spec)
    typer.echo(f"language model: {folder} ({spec['train_seconds']} s); extra.language in "
               f"{model / 'model.yaml'}; next: omnimri-node train language-eval --model {model}")


def language_eval_cmd(
    model: Annotated[Path, typer.Option(help="Model package folder.")] = Path(
        "models/omnimri-tiny"),
    texts: Annotated[int, typer.Option(help="Held-out texts (instructions, refusals, "
                                            "questions).")] = 2000,
    reports: Annotated[int, typer.Option(help="Sampled findings to write reports for.")] = 300,
    seed: Annotated[int, typer.Option(help="Held-out set seed.")] = 1,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write JSON.")] = None,
) -> None:
    """Issue #16 language targets on held-out phrasings: routing, refusal, QA, reports.

    With a report decoder in the package, also its report facts, contradictions, refusals by
    the grounding check, variety and ms per report (ONNX Runtime, key/value cache).
    """
    from inference.omnimri.language.evaluate import evaluate_package

    _require_package(model)
    try:
        rep = evaluate_package(model, texts, seed, reports)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    for line in rep.lines():
        typer.echo(line)
    if json_out:
        json_out.write_text(json.dumps(rep.to_dict(), indent=1, default=str))


def register(app: typer.Typer) -> None:
    """Add ``language`` and ``language-eval`` to the ``train`` group (registered before)."""
    from dicom_node.cli.train import train_app

    train_app.command("language")(language_cmd)
    train_app.command("language-eval")(language_eval_cmd)
