"""``omnimri-node train language`` and ``train language-eval``: OmniMRI's text encoder.

The text encoder of the language half (issue #16), trained into a model package and evaluated
on held-out phrasings.

Examples::

    omnimri-node train language --seed 0          # models/omnimri-tiny/<version>/language/
    omnimri-node train align-text --seed 0        # stage-2 alignment: report encoder (LiT)
    omnimri-node train language-eval              # routing, refusal, QA, reports vs targets
    omnimri-node train language-eval --retrieval-cases 30 --seed 1   # + report<->image recall
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
    seed: Annotated[int, typer.Option(help="Held-out set seed (also of the retrieval "
                                           "cases: 1 and 2 are held-out sets).")] = 1,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write JSON.")] = None,
    retrieval_cases: Annotated[int, typer.Option(
        help="Also report<->image retrieval recall@1 among this many held-out cases of set "
             "--seed through the served path (issue #16: 30; each case is generated and run "
             "through the vision model, seconds each); 0: skip.")] = 0,
    cache: Annotated[Path | None, typer.Option(
        help="Folder caching the cases' image embeddings (per package weights).")] = None,
) -> None:
    """Issue #16 language targets on held-out phrasings: routing, refusal, QA, reports.

    With a report decoder in the package, also its report facts, contradictions, refusals by
    the grounding check, variety and ms per report (ONNX Runtime, key/value cache). With
    ``--retrieval-cases``, also report<->image recall@1 (the package needs the vision
    ``embedding`` output and the report encoder of ``train align-text``).
    """
    from inference.omnimri.language.evaluate import evaluate_package

    _require_package(model)
    if retrieval_cases < 0:
        typer.echo("error: --retrieval-cases must be >= 0", err=True)
        raise typer.Exit(2)
    try:
        rep = evaluate_package(model, texts, seed, reports)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    for line in rep.lines():
        typer.echo(line)
    out = rep.to_dict()
    if retrieval_cases:
        from inference.omnimri.retrieval import evaluate_retrieval

        try:
            ret = evaluate_retrieval(model, retrieval_cases, seed, cache=cache,
                                     progress=_echo)
        except ValueError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        for line in ret.lines():
            typer.echo(line)
        out["retrieval"] = ret.to_dict()
    if json_out:
        json_out.write_text(json.dumps(out, indent=1, default=str))


def align_text_cmd(
    model: Annotated[Path, typer.Option(help="Model package folder (its vision model needs the "
                                             "embedding output; its language folder the "
                                             "text encoder).")] = Path("models/omnimri-tiny"),
    seed: Annotated[int, typer.Option(help="Random seed of the projection's training.")] = 0,
    cases: Annotated[int | None, typer.Option(
        help="Training cases (held-out-layout cases of set 0; default 120).")] = None,
    steps: Annotated[int | None, typer.Option(help="Training steps (default 1500).")] = None,
    cache: Annotated[Path, typer.Option(
        help="Folder caching the training cases' image embeddings (per package weights).")
    ] = Path("/tmp/omnimri-align-cache"),
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads of the vision model.")] = 2,
) -> None:
    """Stage-2 alignment (LiT): the text encoder's states projected onto the image embedding.

    Image side frozen (the served vision ``embedding`` of each training case, computed once and
    cached), text side the frozen BERT text encoder's pooled states and a projection trained
    contrastively. Writes ``<version>/language/report_encoder.onnx`` (checked against PyTorch),
    ``align.json`` and the ``report_encoder``/``align_*`` keys of ``extra.language``. Cost: the
    image embeddings (seconds a case), then about a minute. Not part of ``train language``
    (retraining the text encoder drops the alignment: run this again after it).
    """
    from inference.omnimri.language.align import AlignSettings, train_align_text
    from inference.package import ModelPackage

    _require_package(model)
    s = AlignSettings(seed=seed)
    if cases is not None:
        if cases < 2:
            typer.echo("error: --cases must be >= 2", err=True)
            raise typer.Exit(2)
        s.train_cases = cases
    if steps:
        s.steps = steps
    try:
        keys = train_align_text(model, s, cache=cache, threads=threads, progress=_echo)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    _merge_language_spec(model, keys)
    lang = ModelPackage.load(model).spec.extra["language"]
    typer.echo(f"report encoder: {lang['report_encoder']} ({keys['align_train_cases']} cases, "
               f"{keys['align_train_seconds']} s); next: omnimri-node train language-eval "
               f"--model {model} --retrieval-cases 30 --seed 1")


def _merge_language_spec(model: Path, keys: dict[str, object]) -> None:
    """Add ``keys`` to ``extra.language`` of ``model/model.yaml`` (other keys kept)."""
    import yaml

    p = model / "model.yaml"
    doc = yaml.safe_load(p.read_text())
    doc.setdefault("extra", {}).setdefault("language", {}).update(keys)
    p.write_text(yaml.safe_dump(doc, sort_keys=False))


def register(app: typer.Typer) -> None:
    """Add ``language``, ``align-text`` and ``language-eval`` to the ``train`` group."""
    from dicom_node.cli.train import train_app

    train_app.command("language")(language_cmd)
    train_app.command("align-text")(align_text_cmd)
    train_app.command("language-eval")(language_eval_cmd)
